"""Suspend and resume in place (issue #7, docs/suspend-resume.md).

`xl suspend domu1` writes control/shutdown = "suspend"; domu1's kernel
acknowledges, freezes blkfront and netfront over their control channels and
blocks in SCHEDOP_shutdown(suspend).  Then:

* `xl resume domu1` (not cancelled, as after a restore): the toolstack tears
  the old backends down and writes both dirs of every vbd and vif afresh;
  the frontends reconnect on new rings, grants and ports, and blkfront
  replays what was in flight.  The guest's FUSE file stays open (a process
  holding one descriptor from before keeps writing through it), eth0 keeps
  its ifindex, the block workload loses nothing, the ping goes on.
* `xl resume --cancel domu1` (as `xl save -c`): SCHEDOP_shutdown returns
  "cancelled", the devices go on on their old rings: no XenBus transition.
* a guest whose kernel does not watch control/shutdown: `xl suspend` times
  out saying so, and the guest still runs.

A testbed of this module's own: a test that fails half-way must not leave
the session's domu1 suspended.  The plugin checks every XenBus transition
against the seed table after each test.
"""

from __future__ import annotations

import json
import time

import pytest

from xenbed.harness.waits import wait_for
from xenbed.harness.workload import BlockWorkload, check_nothing_lost

pytestmark = [pytest.mark.integration]

VBD = 51712  # xvda
XVDA = "/run/xen/vbd/xvda"
HOLDER_LOG = "/tmp/suspend-holder.log"
PING_LOG = "/tmp/suspend-ping.log"

# Opens xvda ONCE and writes a counter block through that descriptor every
# 0.1 s (pwrite + fsync), logging "<time> ok <n>" each time; it exits at the
# first error instead of reopening -- so answers after the resume prove the
# descriptor opened before the suspend stayed valid.
HOLDER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
offset = 48 << 20  # clear of the workload slots (16 MiB on) and of the end (64 MiB)
log = open(sys.argv[2], "a", buffering=1)
log.write(f"{time.time()} opened fd {fd} ino {os.fstat(fd).st_ino}\n")
n = 0
while n < 100000:
    n += 1
    try:
        os.pwrite(fd, n.to_bytes(8, "little") * 512, offset)
        os.fsync(fd)
        assert os.pread(fd, 8, offset) == n.to_bytes(8, "little")
    except Exception as exc:
        log.write(f"{time.time()} error {exc!r}\n")
        sys.exit(1)
    log.write(f"{time.time()} ok {n}\n")
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def testbed(private_testbed):
    return private_testbed


def sh(testbed, service: str, script: str, check: bool = True):
    return testbed.exec(service, ["sh", "-c", script], check=check)


def xl(testbed, *args: str, check: bool = False):
    return testbed.exec("dom0", ["xl", *args], check=check)


def domid_of(testbed, name: str) -> int:
    return int(xl(testbed, "domid", name, check=True).stdout.strip())


def domain_state(testbed, name: str) -> str:
    """The State column of `xl list NAME` (r----- / ---s-- ...)."""
    line = xl(testbed, "list", name, check=True).stdout.strip().splitlines()[-1]
    return line.split("\t")[1]


def states(testbed, domid: int, kind: str, devid: int) -> tuple[str | None, str | None]:
    def read(path):
        r = testbed.exec("dom0", ["xenstore-read", path])
        return r.stdout.strip() if r.exit_code == 0 else None
    return (read(f"/local/domain/{domid}/device/{kind}/{devid}/state"),
            read(f"/local/domain/0/backend/{kind}/{domid}/{devid}/state"))


def wait_connected(testbed, domid: int, timeout: float = 60) -> None:
    for kind, devid in (("vif", 0), ("vbd", VBD)):
        wait_for(lambda: states(testbed, domid, kind, devid) == ("4", "4"),
                 what=f"domu1's {kind} {devid}: both ends Connected", timeout=timeout, interval=0.3,
                 describe=lambda _: f"(frontend, backend) = {states(testbed, domid, kind, devid)}")


def eth0(testbed) -> dict:
    link = json.loads(sh(testbed, "domu1", "ip -j addr show dev eth0").stdout)[0]
    return {"ifindex": link["ifindex"], "mac": link["address"],
            "addresses": sorted(a["local"] for a in link["addr_info"] if a["family"] == "inet")}


def transitions_since(testbed, service: str, since: float) -> list[dict]:
    out = sh(testbed, service, "cat /run/xen/transitions.jsonl 2>/dev/null || true").stdout
    return [t for t in map(json.loads, filter(None, out.splitlines())) if t["ts"] >= since]


def of_device(transitions: list[dict], kind: str, devid: int) -> list[tuple[str, str, str]]:
    """(role, from, to) of one device: its frontend dir .../device/KIND/DEVID
    or its backend dir .../backend/KIND/DOMID/DEVID."""
    return [(t["role"], t["from"], t["to"]) for t in transitions
            if f"/{kind}/" in t["path"] and t["path"].endswith(f"/{devid}")]


def acknowledged_writes(workload: BlockWorkload) -> int:
    return sum(1 for op in workload.history() if op.get("type") == "ok" and op.get("f") == "write")


def holder_lines(testbed) -> list[str]:
    return sh(testbed, "domu1", f"cat {HOLDER_LOG} 2>/dev/null || true").stdout.splitlines()


def holder_ok_times(testbed) -> list[float]:
    return [float(line.split()[0]) for line in holder_lines(testbed) if " ok " in line]


def ping_replies(testbed) -> list[float]:
    out = sh(testbed, "domu1", f"cat {PING_LOG} 2>/dev/null || true").stdout
    return [float(line[1:line.index("]")]) for line in out.splitlines() if line.startswith("[") and "bytes from" in line]


def suspend_log(testbed) -> list[dict]:
    out = sh(testbed, "domu1", "cat /run/xen/suspend.jsonl 2>/dev/null || true").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def peer(testbed) -> str:
    return sh(testbed, "peer", "ip -4 -o addr show scope global").stdout.split()[3].split("/")[0]


class _Going(tuple):
    """(holder writes, ping replies): going once both reached 3."""

    def __bool__(self) -> bool:
        return self[0] >= 3 and self[1] >= 3


@pytest.fixture
def background(testbed, xen, peer):
    """The descriptor holder and a ping to the peer, in domu1, for one test."""
    # A testbed is "up" when its containers are healthy; the guest's devices
    # may still be connecting (the holder must find its disk file at once).
    guest = xen.domain("domu1")
    guest.device("vbd", "xvda").wait(timeout=60)
    guest.device("vif", "0").wait(timeout=60)
    wait_for(lambda: testbed.exec("domu1", ["test", "-e", XVDA]).exit_code == 0, what=f"{XVDA} in domu1", timeout=30)
    sh(testbed, "domu1", f"rm -f {HOLDER_LOG} {PING_LOG}; "
                         f"timeout 300 python3 -c '{HOLDER}' {XVDA} {HOLDER_LOG} >/dev/null 2>&1 & "
                         f"echo $! > /tmp/suspend-holder.pid; "
                         f"timeout 300 ping -D -i 0.2 -W 1 {peer} > {PING_LOG} 2>&1 & "
                         f"echo $! > /tmp/suspend-ping.pid")
    wait_for(lambda: _Going((len(holder_ok_times(testbed)), len(ping_replies(testbed)))),
             what="the descriptor holder and the ping to get going (3 writes, 3 replies)", timeout=30,
             describe=lambda seen: f"holder writes {seen[0]}, ping replies {seen[1]}")
    yield
    sh(testbed, "domu1", "kill $(cat /tmp/suspend-holder.pid /tmp/suspend-ping.pid) 2>/dev/null; true", check=False)


def test_suspend_then_resume_on_new_backends_keeps_the_disk_file_and_eth0(testbed, peer, background,
                                                                          record_property):
    domid = domid_of(testbed, "domu1")
    wait_connected(testbed, domid)
    before = eth0(testbed)
    workload = BlockWorkload(testbed, "domu1", "xvda", workers=2).start()
    try:
        wait_for(lambda: acknowledged_writes(workload) > 10 or None, what="the workload acknowledging writes",
                 timeout=60)
        started = time.time()
        suspended = xl(testbed, "suspend", "domu1")
        assert suspended.exit_code == 0, suspended.stderr
        assert domain_state(testbed, "domu1") == "---s--"
        # nothing is acknowledged while the guest is suspended: its frontends
        # put nothing new on the rings and the hypervisor holds its upcalls
        acked = acknowledged_writes(workload)
        holder = len(holder_ok_times(testbed))
        time.sleep(2)
        assert acknowledged_writes(workload) == acked
        assert len(holder_ok_times(testbed)) <= holder + 1  # one may have been answered while freezing
        resume_at = time.time()
        resumed = xl(testbed, "resume", "domu1")
        assert resumed.exit_code == 0, resumed.stderr
        assert "2 device(s) reconnected" in resumed.stderr, resumed.stderr
        assert domain_state(testbed, "domu1") == "r-----"
        wait_for(lambda: acknowledged_writes(workload) > acked + 10, timeout=60, interval=0.3,
                 what="the workload acknowledging writes again after the resume")
        # the descriptor opened before the suspend works after it
        wait_for(lambda: [t for t in holder_ok_times(testbed) if t > resume_at], timeout=30,
                 what="the descriptor holder writing through its old descriptor after the resume")
        wait_for(lambda: [t for t in ping_replies(testbed) if t > resume_at], timeout=30,
                 what="the ping to the peer getting answers after the resume")
    finally:
        workload.stop()
    assert not [line for line in holder_lines(testbed) if " error " in line], holder_lines(testbed)
    assert eth0(testbed) == before, "eth0 was never closed: same ifindex, MAC and addresses"
    assert " 0% packet loss" in sh(testbed, "domu1", f"ping -c 3 -i 0.2 -W 2 {peer}").stdout
    # TCP over the new rings
    report = json.loads(sh(testbed, "domu1", f"timeout 60 iperf3 -J -t 1 -c {peer}").stdout)
    assert report["end"]["sum_received"]["bytes"] > 0
    result = check_nothing_lost(testbed, workload)
    assert result.ok, result.render()

    # the XenBus side was torn down and made again, for the disk and the NIC
    guest = transitions_since(testbed, "domu1", started)
    backend = transitions_since(testbed, "dom0", started)
    assert of_device(guest, "vbd", VBD) == [("frontend", "Initialising", "Initialised"),
                                            ("frontend", "Initialised", "Connected")], guest
    assert of_device(guest, "vif", 0) == [("frontend", "Initialising", "Connected")], guest
    for kind, devid in (("vbd", VBD), ("vif", 0)):
        assert of_device(backend, kind, devid) == [("backend", "Initialising", "InitWait"),
                                                   ("backend", "InitWait", "Connected")], backend
    # the guest's kernel says what happened
    record = suspend_log(testbed)[-1]
    assert record["outcome"] == "resumed" and record["cancelled"] is False
    assert sorted(record["frozen"]) == ["xenbed.drivers.blk.front", "xenbed.drivers.net.front"]
    assert set(record["modules"].values()) == {"ok"}
    vif = json.loads(sh(testbed, "domu1", "cat /run/xen/vif/0.json").stdout)
    assert vif["state"] == "Connected" and vif["carrier"] and vif["leaked_grants"] == 0
    record_property("suspend_to_running_ms", round((record["thawed_at"] - record["requested_at"]) * 1000))


def test_cancelled_suspend_goes_on_on_the_same_rings_with_no_xenbus_transition(testbed, peer, background):
    domid = domid_of(testbed, "domu1")
    wait_connected(testbed, domid)
    ring_refs = {kind: sh(testbed, "dom0", f"xenstore-read /local/domain/{domid}/device/{kind}/{devid}/{key}").stdout
                 for kind, devid, key in (("vbd", VBD, "ring-ref"), ("vif", 0, "tx-ring-ref"))}
    workload = BlockWorkload(testbed, "domu1", "xvda", workers=2).start()
    try:
        wait_for(lambda: acknowledged_writes(workload) > 10 or None, what="the workload acknowledging writes",
                 timeout=60)
        started = time.time()
        assert xl(testbed, "suspend", "domu1").exit_code == 0
        assert domain_state(testbed, "domu1") == "---s--"
        acked = acknowledged_writes(workload)
        time.sleep(1)
        assert acknowledged_writes(workload) == acked
        resumed = xl(testbed, "resume", "--cancel", "domu1")
        assert resumed.exit_code == 0, resumed.stderr
        assert "suspend cancelled" in resumed.stderr
        assert domain_state(testbed, "domu1") == "r-----"
        resume_at = time.time()
        wait_for(lambda: acknowledged_writes(workload) > acked + 10, timeout=30, interval=0.3,
                 what="the workload acknowledging writes again after the cancelled suspend")
        wait_for(lambda: [t for t in ping_replies(testbed) if t > resume_at], timeout=30,
                 what="the ping to the peer getting answers after the cancelled suspend")
    finally:
        workload.stop()
    result = check_nothing_lost(testbed, workload)
    assert result.ok, result.render()
    # no XenBus transition of any device, at either end; the same rings
    assert transitions_since(testbed, "domu1", started) == []
    assert transitions_since(testbed, "dom0", started) == []
    for kind, devid, key in (("vbd", VBD, "ring-ref"), ("vif", 0, "tx-ring-ref")):
        now = sh(testbed, "dom0", f"xenstore-read /local/domain/{domid}/device/{kind}/{devid}/{key}").stdout
        assert now == ring_refs[kind]
    assert states(testbed, domid, "vbd", VBD) == ("4", "4") and states(testbed, domid, "vif", 0) == ("4", "4")
    record = suspend_log(testbed)[-1]
    assert record["outcome"] == "cancelled" and record["cancelled"] is True


def test_a_guest_that_does_not_answer_times_out_and_keeps_running(testbed, xen):
    # its kernel does not watch control/shutdown: a guest without PV drivers, or hung
    xen.create_domain("mute", environment={"XENBED_CONTROL_SHUTDOWN": "ignore", "XENBED_MODULES": ""})
    try:
        started = time.monotonic()
        result = xl(testbed, "suspend", "-t", "3", "mute")
        took = time.monotonic() - started
        assert result.exit_code == 1
        assert "did not acknowledge the suspend request within 3s" in result.stderr, result.stderr
        assert "request withdrawn" in result.stderr and "still running" in result.stderr
        assert 3 <= took < 15
        assert domain_state(testbed, "mute") == "r-----"
        assert testbed.exec("mute", ["xenstore-read", "control/shutdown"]).stdout.strip() == ""
        # and resuming a domain that is not suspended is refused
        refused = xl(testbed, "resume", "mute")
        assert refused.exit_code == 1 and "not suspended" in refused.stderr
    finally:
        xen.destroy_domain("mute")
