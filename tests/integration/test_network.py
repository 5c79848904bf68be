"""Network devices end to end (issue 5): the guests' only NIC is netfront's
eth0; every frame crosses the tx/rx rings to netback's vif in dom0, the
xenbr0 bridge and dom0's veth to the peer."""

from __future__ import annotations

import json
import time

import pytest
from integration_helpers import sh, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def addresses(testbed) -> dict[str, str]:
    # any global address: a chaos test may have reconnected the peer (new NIC name)
    peer = sh(testbed, "peer", "ip -4 -o addr show scope global").split()[3].split("/")[0]
    guests = {}
    for guest in ("domu1", "domu2"):
        guests[guest] = wait_until(
            lambda g=guest: (sh(testbed, g, "ip -4 -o addr show dev eth0 2>/dev/null || true").split() or [None] * 4)[3],
            f"{guest}'s eth0 address").split("/")[0]
    return {"peer": peer, **guests}


def test_guests_have_no_docker_network_only_netfront(testbed, addresses):
    links = sh(testbed, "domu1", "ls /sys/class/net").split()
    assert sorted(links) == ["eth0", "lo"]
    assert sh(testbed, "domu1", "cat /sys/class/net/eth0/address").startswith("00:16:3e:")


def test_ping_the_peer_and_the_other_guest_with_no_loss(testbed, addresses):
    for target in (addresses["peer"], addresses["domu2"]):
        out = sh(testbed, "domu1", f"ping -c 5 -i 0.2 -W 3 {target}")
        assert " 0% packet loss" in out, out


def test_iperf3_to_the_peer_and_its_bytes_are_accounted_for(testbed, addresses):
    domid = int(sh(testbed, "dom0", "xl domid domu1"))
    vif_rx_bytes = f"cat /sys/class/net/vif{domid}.0/statistics/rx_bytes"
    before = int(sh(testbed, "dom0", vif_rx_bytes))
    report = json.loads(sh(testbed, "domu1", f"timeout 60 iperf3 -J -t 2 -c {addresses['peer']}"))
    crossed = int(sh(testbed, "dom0", vif_rx_bytes)) - before
    sent = report["end"]["sum_sent"]["bytes"]          # written by the guest's iperf3
    received = report["end"]["sum_received"]["bytes"]  # read by the peer's iperf3 server
    assert received > 1_000_000, report["end"]
    # every payload byte the peer read crossed netback's vif (as Ethernet
    # frames with headers), and nothing the guest did not write arrived
    assert received <= sent and received < crossed, (sent, received, crossed)


def counters(testbed, domid: int) -> dict:
    status = json.loads(sh(testbed, "domu1", "cat /run/xen/vif/0.json"))
    vif = f"/sys/class/net/vif{domid}.0/statistics"
    dom0 = sh(testbed, "dom0", f"cat {vif}/rx_packets {vif}/tx_packets").split()
    guest = sh(testbed, "domu1", "cat /sys/class/net/eth0/statistics/tx_packets").split()
    return {"ring_tx": status["tx_packets"], "ring_rx": status["rx_packets"], "rx_dropped": status["rx_dropped"],
            "garps": status["gratuitous_arps"], "vif_rx": int(dom0[0]), "vif_tx": int(dom0[1]),
            "eth0_tx": int(guest[0])}


def test_frame_counts_match_on_both_ends_of_the_rings(testbed, addresses):
    domid = int(sh(testbed, "dom0", "xl domid domu1"))
    sh(testbed, "domu1", f"ping -c 20 -i 0.05 -W 3 {addresses['peer']} > /dev/null")

    def balanced():
        c = counters(testbed, domid)
        ok = (c["vif_rx"] == c["ring_tx"]                       # every frame the guest put on the tx ring
              and c["vif_tx"] == c["ring_rx"] + c["rx_dropped"]  # every frame netback sent, taken or counted
              and c["eth0_tx"] + c["garps"] == c["ring_tx"])      # eth0's frames plus netfront's own ARPs
        return c if ok else None
    # Counters move while the stack chatters (ARP, ND): wait for a quiet moment.
    c = wait_until(balanced, "the ring counters of both ends to agree", timeout=20)
    assert c["ring_tx"] > 20 and c["ring_rx"] > 20


def test_network_attach_adds_eth1_and_detach_removes_it(testbed, addresses):
    domid = int(sh(testbed, "dom0", "xl domid domu1"))
    sh(testbed, "dom0", "xl network-attach domu1 bridge=xenbr0 mac=00:16:3e:00:00:42")
    wait_until(lambda: "eth1" in sh(testbed, "domu1", "ls /sys/class/net"), "eth1 in domu1")
    assert sh(testbed, "domu1", "cat /sys/class/net/eth1/address").strip() == "00:16:3e:00:00:42"
    assert f"vif{domid}.1" in sh(testbed, "dom0", "ls /sys/class/net")
    listing = sh(testbed, "dom0", "xl network-list domu1")
    assert "00:16:3e:00:00:42" in listing
    sh(testbed, "dom0", "xl network-detach domu1 00:16:3e:00:00:42")
    wait_until(lambda: "eth1" not in sh(testbed, "domu1", "ls /sys/class/net"), "eth1 to go away")
    assert f"vif{domid}.1" not in sh(testbed, "dom0", "ls /sys/class/net")
    assert testbed.exec("dom0", ["xenstore-exists", f"/local/domain/0/backend/vif/{domid}/1"]).exit_code != 0
    # eth0 still works
    assert " 0% packet loss" in sh(testbed, "domu1", f"ping -c 2 -W 3 {addresses['peer']}")


def test_a_guest_whose_netfront_is_killed_leaves_nothing_in_dom0(testbed, xen):
    domid = xen.create_domain("netvictim", memory_mb=32)
    try:
        sh(testbed, "dom0", "xl network-attach netvictim bridge=xenbr0")
        wait_until(lambda: "eth0" in sh(testbed, "netvictim", "ls /sys/class/net"), "eth0 in netvictim")
        assert f"vif{domid}.0" in sh(testbed, "dom0", "ls /sys/class/net")
        testbed.kill("netvictim")
        xen.destroy_domain("netvictim")
        assert f"vif{domid}." not in sh(testbed, "dom0", "ls /sys/class/net")
        assert testbed.exec("dom0", ["xenstore-exists", f"/local/domain/0/backend/vif/{domid}"]).exit_code != 0
    finally:
        try:
            xen.destroy_domain("netvictim")
        except Exception:
            pass
