"""The nothing-lost checker end to end (issue #6): a block workload in domu1
writes and verifies on xvda through blkfront, the checker reads the disk
back through dom0's loop device.  A quiet run must pass with real work done;
a slot wiped behind the guest's back must be reported as exactly that lost
write, so the check is known to be able to fail."""

from __future__ import annotations

import time

import pytest

from xenbed.harness.workload import find_dom0_disk

pytestmark = pytest.mark.integration


def acknowledged_writes(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("type") == "ok" and r.get("f") == "write"]


@pytest.mark.block_workload(workers=2)
def test_ten_quiet_seconds_lose_nothing(testbed, block_workload):
    time.sleep(10)
    result = block_workload.assert_nothing_lost()
    assert result.stats["writes_ok"] > 0, result.render()
    assert result.stats["reads_consistent"] > 0, result.render()
    assert result.stats["writes_info"] == 0 and result.stats["writes_fail"] == 0, result.render()
    assert result.run["dom0_device"].startswith("/dev/loop")
    assert "stopped (signal SIGTERM)" in block_workload.log()


@pytest.mark.block_workload(first_slot=8192, slot_count=64)
def test_a_slot_wiped_through_dom0s_loop_device_is_reported_lost(testbed, block_workload):
    deadline = time.monotonic() + 20
    while len(acknowledged_writes(block_workload.history())) < 20 and time.monotonic() < deadline:
        time.sleep(0.5)
    history = block_workload.stop()
    wiped = acknowledged_writes(history)[-1]  # the newest acknowledged write: nothing can excuse its absence
    disk = find_dom0_disk(testbed, "domu1", "xvda")
    testbed.exec("dom0", ["dd", "if=/dev/zero", f"of={disk.device}", "bs=4096", f"seek={wiped['slot']}",
                          "count=1", "oflag=direct", "conv=notrunc", "status=none"], check=True)

    result = block_workload.check()
    assert [(f.kind, f.slot, f.op.name) for f in result.findings] == \
        [("lost-write", wiped["slot"], f"w{wiped['process']}:{wiped['seq']}")], result.render()
    assert result.lost[0].found == {"kind": "zero"}
    assert any(r is not None and r.get("index") == wiped["index"] for r in result.lost[0].history)
    assert "lost-write                 1" in result.render()


def longest_write(history: list[dict]) -> float:
    invoked = {(r["process"], r["seq"]): r["time"] for r in history if r.get("type") == "invoke"}
    return max((r["time"] - invoked[(r["process"], r["seq"])] for r in acknowledged_writes(history)), default=0.0)


@pytest.mark.chaos
@pytest.mark.block_workload(first_slot=12288, slot_count=64)
def test_writes_wait_out_a_paused_dom0_and_nothing_is_lost(testbed, block_workload):
    """No timeout turns a slow write into a failure: while dom0 is frozen the
    guest's writes block, and they complete, acknowledged, once it thaws."""
    time.sleep(1)
    testbed.pause("dom0")
    try:
        time.sleep(3)
    finally:
        testbed.unpause("dom0")
    time.sleep(1)
    result = block_workload.assert_nothing_lost()
    assert result.stats["writes_fail"] == 0 and result.stats["writes_info"] == 0, result.render()
    assert longest_write(block_workload.last_history) > 2.5, "no write spanned the pause"
