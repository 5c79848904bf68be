"""Issue #7's acceptance, on two hosts (compose/two-hosts.yml): with a block
workload writing and verifying continuously and an iperf3 TCP stream from
the guest to the peer, suspend/resume, then migrate host-a -> host-b ->
host-a.  Nothing acknowledged is lost, the TCP stream completes without
reconnecting, the guest's disk file and tap stay open (same descriptor,
same ifindex) while its XenBus side is torn down and made again each time.
And a migration whose destination dom0 dies halfway leaves the guest
running on host-a, intact.
"""

from __future__ import annotations

import json
import time

import pytest

from xenbed.harness.waits import wait_for
from xenbed.harness.workload import BlockWorkload, check_nothing_lost

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.testbed_compose("compose/two-hosts.yml")]


@pytest.fixture(scope="module")
def testbed(private_testbed):
    return private_testbed


def sh(testbed, service, command, check=True):
    return testbed.exec(service, ["sh", "-c", command], check=check).stdout


def xl_list(testbed, dom0) -> dict[str, str]:
    """name -> state flags, as `xl list` in that dom0 prints them."""
    rows = [line.split() for line in sh(testbed, dom0, "xl list").splitlines()[1:] if line.strip()]
    return {row[0]: row[4] for row in rows}


def migrate(testbed, source_dom0, destination_dom0) -> dict:
    report = sh(testbed, source_dom0, f"xl migrate domu1 {destination_dom0} --json 2>/dev/null")
    return json.loads(report.strip().splitlines()[-1])


def frontend_connects(testbed) -> int:
    """How many times domu1's disk frontend went Initialised -> Connected."""
    records = [json.loads(line) for line in sh(testbed, "domu1", "cat /run/xen/transitions.jsonl").splitlines()
               if line.strip()]
    return sum(1 for r in records if "/device/vbd/" in r["path"] and (r["from"], r["to"]) == ("Initialised", "Connected"))


def test_suspend_resume_then_migrate_there_and_back_loses_nothing(testbed, record_property):
    ifindex = sh(testbed, "domu1", "cat /sys/class/net/eth0/ifindex").strip()
    peer = testbed.container("peer")
    peer.reload()
    peer_ip = next(iter(peer.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    workload = BlockWorkload(testbed, "domu1", "xvda", workers=2).start()
    open_disk = f"ls -l /proc/{workload.pid}/fd | grep /run/xen/vbd/xvda | awk '{{print $9}}'"
    disk_fds = sh(testbed, "domu1", open_disk).split()  # the workload's descriptors of the disk file
    assert disk_fds
    testbed.exec("domu1", ["sh", "-c", f"iperf3 -J -t 25 -b 20M -c {peer_ip} > /tmp/iperf.json 2>&1 &"], check=True)
    time.sleep(2)
    connects_before = frontend_connects(testbed)

    sh(testbed, "dom0-a", "xl suspend domu1 && xl resume domu1")
    there = migrate(testbed, "dom0-a", "dom0-b")
    assert "domu1" in xl_list(testbed, "dom0-b") and "domu1" not in xl_list(testbed, "dom0-a")
    back = migrate(testbed, "dom0-b", "dom0-a")
    assert "domu1" in xl_list(testbed, "dom0-a") and "domu1" not in xl_list(testbed, "dom0-b")
    for report in (there, back):
        assert report["rounds"] and report["pages_sent"] >= report["rounds"][0] > 0, report
        assert 0 < report["downtime_ms"] < report["total_ms"], report
    record_property("migration_downtime_ms", round(max(there["downtime_ms"], back["downtime_ms"])))
    record_property("migration_total_ms", round(max(there["total_ms"], back["total_ms"])))

    iperf = wait_for(lambda: (text := sh(testbed, "domu1", "cat /tmp/iperf.json")).rstrip().endswith("}")
                     and "sum_received" in text and json.loads(text),
                     what="the iperf3 stream to finish", timeout=60, interval=1)
    assert "error" not in iperf, iperf.get("error")
    assert iperf["end"]["sum_received"]["bytes"] > 1_000_000
    assert len(iperf["start"]["connected"]) == 1  # one TCP connection throughout: it never reconnected
    # the guest's side never closed ...
    assert sh(testbed, "domu1", "cat /sys/class/net/eth0/ifindex").strip() == ifindex
    assert sh(testbed, "domu1", open_disk).split() == disk_fds  # the same descriptors, never reopened
    result = check_nothing_lost(testbed, workload)
    assert result.ok, result.render()
    assert result.stats["writes_ok"] > 100
    # ... while its XenBus side was made again three times (resume, there, back)
    assert frontend_connects(testbed) >= connects_before + 3


def test_a_migration_onto_a_driver_domains_disk_and_back(testbed):
    """Seed 004's driver domain as a migration's destination backend: on
    host-b the disk is served by `driverdom` (backend privilege only, its own
    hotplug step), the network by dom0-b; then back to dom0-a's backends."""
    workload = BlockWorkload(testbed, "domu1", "xvda", workers=2).start()
    acked = lambda: sum(1 for op in workload.history() if op.get("type") == "ok" and op.get("f") == "write")  # noqa: E731
    report = json.loads(sh(testbed, "dom0-a", "xl migrate --disk-backend driverdom domu1 dom0-b --json 2>/dev/null")
                        .strip().splitlines()[-1])
    assert report["downtime_ms"] > 0
    driverdom = sh(testbed, "dom0-b", "xl domid driverdom").strip()
    assert f"/local/domain/{driverdom}/backend/vbd/" in sh(testbed, "dom0-b", "xl block-list domu1")
    assert "/local/domain/0/backend/vif/" in sh(testbed, "dom0-b", "xl network-list domu1")
    before = acked()
    wait_for(lambda: acked() > before + 20, what="writes acknowledged through the driver domain", timeout=30)
    migrate(testbed, "dom0-b", "dom0-a")
    assert "/local/domain/0/backend/vbd/" in sh(testbed, "dom0-a", "xl block-list domu1")
    result = check_nothing_lost(testbed, workload)
    assert result.ok, result.render()


def test_a_migration_whose_destination_dies_leaves_the_guest_on_host_a(testbed, xen):
    assert "domu1" in xl_list(testbed, "dom0-a")
    workload = BlockWorkload(testbed, "domu1", "xvda", workers=1).start()
    rings_before = sh(testbed, "dom0-a", "xenstore-read /local/domain/$(xl domid domu1)/device/vbd/51712/ring-ref")
    sh(testbed, "dom0-b", "mkdir -p /run/xen && echo 'stall-at commit' > /run/xen/migrate-faults")
    try:
        testbed.exec("dom0-a", ["sh", "-c", "(xl migrate domu1 dom0-b > /tmp/migrate.out 2>&1; "
                                            "echo $? >> /tmp/migrate.out) </dev/null >/dev/null 2>&1 &"], check=True)
        # the guest is suspended and the final round sent when the receiver stalls: kill it there
        wait_for(lambda: "stalling at commit" in testbed.logs("dom0-b", tail=20), what="the receiver to stall",
                 timeout=60, interval=0.2)
        testbed.kill("dom0-b")
        out = wait_for(lambda: (o := sh(testbed, "dom0-a", "cat /tmp/migrate.out")).strip().endswith(("0", "1")) and o,
                       what="xl migrate to give up", timeout=90, interval=0.5)
        assert out.strip().endswith("1") and "keeps running here" in out, out
        assert xl_list(testbed, "dom0-a")["domu1"] == "r-----"
        # resumed in place, cancelled: the same rings, both ends still Connected
        assert sh(testbed, "dom0-a", "xenstore-read /local/domain/$(xl domid domu1)/device/vbd/51712/ring-ref") \
            == rings_before
        xen.domain("domu1").device("vbd", "xvda").wait(timeout=30)
        time.sleep(2)
        result = check_nothing_lost(testbed, workload)
        assert result.ok, result.render()
        assert result.stats["writes_ok"] > 10
    finally:
        testbed.start("dom0-b")
        wait_for(lambda: sh(testbed, "dom0-b", "test -f /run/xen/ready && echo y", check=False).strip() == "y",
                 what="dom0-b back", timeout=60)
        sh(testbed, "dom0-b", "rm -f /run/xen/migrate-faults")
        # the half-received domain its dead receiver could not destroy
        if "domu1" in xl_list(testbed, "dom0-b"):
            sh(testbed, "dom0-b", "xl destroy domu1")
