"""A chaos schedule (`make chaos`): a seeded random sequence of faults --
dom0 killed or restarted, blkback or netback killed inside dom0, dom0 frozen
-- while domu1 writes to its disk; at the end it must reach domu2.  After each fault the
devices must come back Connected and the writes go on; at the end the
checker finds no acknowledged write lost and the guest's network works.

Marked `soak`: `make test` leaves it out, `make chaos` runs it
(XENBED_CHAOS_ROUNDS faults, default 30; XENBED_CHAOS_SEED picks the schedule,
printed so a failing one can be replayed).
"""

from __future__ import annotations

import os
import random
import time

import pytest

from xenbed.harness.waits import wait_for
from xenbed.harness.workload import BlockWorkload, check_nothing_lost

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.soak]

ROUNDS = int(os.environ.get("XENBED_CHAOS_ROUNDS", "30"))
SEED = int(os.environ.get("XENBED_CHAOS_SEED", str(int(time.time()))))


@pytest.fixture(scope="module")
def testbed(private_testbed):
    return private_testbed


def kill_dom0(testbed):
    testbed.kill("dom0")
    testbed.start("dom0")


def restart_dom0(testbed):
    testbed.restart("dom0", timeout=5)  # SIGTERM first: the backends shut down cleanly, states stay


def kill_process(module: str):
    def fault(testbed):  # the kernel's module supervisor starts it again
        testbed.kill_process("dom0", f"python3 -m {module}")  # SIGKILL, in the chaos history
    fault.__name__ = f"kill {module.rsplit('.', 2)[-2]}back"
    return fault


def freeze_dom0(testbed):
    testbed.pause("dom0")
    time.sleep(2)
    testbed.unpause("dom0")


FAULTS = [kill_dom0, restart_dom0, kill_process("xenbed.drivers.blk.back"),
          kill_process("xenbed.drivers.net.back"), freeze_dom0]


def acknowledged_writes(workload: BlockWorkload) -> int:
    return sum(1 for op in workload.history() if op.get("type") == "ok" and op.get("f") == "write")


def test_random_faults_lose_nothing(testbed, domains, record_property):
    print(f"chaos schedule: XENBED_CHAOS_SEED={SEED} XENBED_CHAOS_ROUNDS={ROUNDS}")
    record_property("chaos_seed", SEED)
    chooser = random.Random(SEED)
    guest = domains["domu1"]
    disk, nic = guest.device("vbd", "xvda"), guest.device("vif", "0")
    disk.wait(timeout=60)
    ifconfig = testbed.project.services["domu2"].environment["XENBED_IFCONFIG"]  # "eth0=<net>.130/24"
    peer_ip = ifconfig.split("=", 1)[1].split("/")[0]  # domu2: across both guests' rings and dom0's bridge
    workload = BlockWorkload(testbed, "domu1", "xvda", workers=2).start()
    schedule = []
    try:
        for round_ in range(ROUNDS):
            fault = chooser.choice(FAULTS)
            before = acknowledged_writes(workload)
            fault(testbed)
            schedule.append(fault.__name__)
            disk.wait(timeout=90)
            nic.wait(timeout=90)
            wait_for(lambda: acknowledged_writes(workload) > before + 5,
                     what=f"round {round_} ({fault.__name__}): writes acknowledged again", timeout=90)
            time.sleep(chooser.uniform(0.1, 1.0))
    finally:
        workload.stop()
        print("schedule:", ", ".join(schedule))
    result = check_nothing_lost(testbed, workload)
    assert result.ok, result.render()
    wait_for(lambda: testbed.exec("domu1", ["ping", "-c", "1", "-W", "1", peer_ip]).exit_code == 0,
             what=f"domu1 reaching {peer_ip} over its recovered vif", timeout=30)
