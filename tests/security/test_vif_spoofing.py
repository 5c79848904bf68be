"""Issue #16, attack 2: a guest forging its MAC or IPv4 address on xenbr0,
and reaching dom0's migration receiver through its own vif.

domu1 sends raw frames (AF_PACKET on its netfront tap) towards the peer,
which captures what crosses dom0's bridge: frames from the vif's own MAC
pass, frames from any other MAC do not; on a vif whose spec has `ip=`, IPv4
and ARP pass only from that address (drivers/net/hotplug.py, as Xen's
vif-common.sh with `ip=`).  The vif's chain goes with it at detach.  And
dom0's port 8002 does not answer guests at all.
"""

from __future__ import annotations

import secrets
import time

import pytest

from xenbed.harness.waits import wait_for

from .attack import CONNECT, address_of, python_in, sh, uplink_of

pytestmark = pytest.mark.integration

SPOOFED_MAC = "00:16:3e:66:66:66"
ATTACHED_MAC = "00:16:3e:5e:c0:01"

# Sends each frame of FRAMES ([(ifname, src mac, src ip, kind, marker)]) on
# the guest's tap: "udp" to the peer's port 9999 carrying the marker, or an
# ARP reply claiming src ip.
SEND = """
    import json, socket, struct
    def mac(text): return bytes.fromhex(text.replace(":", ""))
    def csum(b):
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xFFFF); s += s >> 16
        return ~s & 0xFFFF
    def udp(src_mac, src_ip, marker):
        data = marker.encode()
        u = struct.pack("!HHHH", 40000, 9999, 8 + len(data), 0) + data
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(u), 0, 0, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(PEER_IP))
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        return mac(PEER_MAC) + mac(src_mac) + b"\\x08\\x00" + ip + u
    def arp(src_mac, src_ip, marker):
        body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac(src_mac), socket.inet_aton(src_ip),
                           mac(PEER_MAC), socket.inet_aton(PEER_IP))
        return mac(PEER_MAC) + mac(src_mac) + b"\\x08\\x06" + body
    sent = 0
    for ifname, src_mac, src_ip, kind, marker in FRAMES:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((ifname, 0))
        for _ in range(3):
            s.send((udp if kind == "udp" else arp)(src_mac, src_ip, marker)); sent += 1
        s.close()
    print(json.dumps({"sent": sent}))
"""


@pytest.fixture(scope="module")
def net(testbed) -> dict:
    domid = int(sh(testbed, "dom0", "xl domid domu1"))
    back = f"/local/domain/0/backend/vif/{domid}/0"
    wait_for(lambda: sh(testbed, "dom0", f"xenstore-read {back}/state").strip() == "4",
             what="domu1's vif 0 Connected", timeout=60)
    return {"domid": domid, "vif": f"vif{domid}.0",
            "mac": sh(testbed, "dom0", f"xenstore-read {back}/mac").strip(),
            "guest_ip": address_of(testbed, "domu1", "eth0"),
            "peer_ip": address_of(testbed, "peer"), "peer_if": uplink_of(testbed, "peer"),
            "peer_mac": sh(testbed, "peer", f"cat /sys/class/net/{uplink_of(testbed, 'peer')}/address").strip(),
            "dom0_ip": address_of(testbed, "dom0", "xenbr0")}


def captured(testbed, net: dict, frames: list[tuple]) -> str:
    """Send `frames` from domu1 and return what the peer saw of them."""
    capture = f"/tmp/capture-{secrets.token_hex(4)}"
    sh(testbed, "peer", f"timeout 20 tcpdump -i {net['peer_if']} -n -l -A 'udp port 9999 or arp' > {capture} 2>&1 &")
    wait_for(lambda: "listening" in sh(testbed, "peer", f"cat {capture}"), what="tcpdump on the peer", timeout=10)
    python_in(testbed, "domu1", f"PEER_IP, PEER_MAC, FRAMES = {net['peer_ip']!r}, {net['peer_mac']!r}, {frames!r}\n"
              + SEND.replace("\n    ", "\n"))
    time.sleep(2)
    return sh(testbed, "peer", f"cat {capture}; rm -f {capture}")


def marker(tag: str) -> str:
    return f"XB{tag}{secrets.token_hex(3)}"


def test_the_vif_has_its_chain_keyed_by_its_name(testbed, net):
    chain = sh(testbed, "dom0", f"nft list chain bridge xenbed xv_{net['vif']}")
    assert f"ether saddr != {net['mac']} drop" in chain
    assert "tcp dport 8002 drop" in chain
    assert f'"{net["vif"]}" : jump xv_{net["vif"]}' in sh(testbed, "dom0", "nft list map bridge xenbed vifs")


def test_frames_from_another_mac_do_not_leave_the_vif(testbed, net):
    own, spoofed = marker("own"), marker("mac")
    seen = captured(testbed, net, [("eth0", net["mac"], net["guest_ip"], "udp", own),
                                   ("eth0", SPOOFED_MAC, net["guest_ip"], "udp", spoofed),
                                   ("eth0", net["mac"], net["guest_ip"], "arp", "")])
    assert own in seen, seen
    assert spoofed not in seen and SPOOFED_MAC not in seen, seen


def test_with_ip_in_the_spec_ipv4_and_arp_only_from_that_address(testbed, net):
    prefix = net["guest_ip"].rsplit(".", 1)[0]
    allowed, forged = f"{prefix}.140", f"{prefix}.141"
    sh(testbed, "dom0", f"xl network-attach domu1 'bridge=xenbr0,mac={ATTACHED_MAC},ip={allowed}'")
    try:
        ifname = wait_for(lambda: sh(testbed, "domu1", f"grep -l {ATTACHED_MAC} /sys/class/net/*/address "
                                     "| cut -d/ -f5", check=False).strip(), what="the new NIC in domu1", timeout=60)
        sh(testbed, "domu1", f"ip link set {ifname} up")
        vif = f"vif{net['domid']}.1"
        assert f"ip saddr {allowed} accept" in sh(testbed, "dom0", f"nft list chain bridge xenbed xv_{vif}")
        own, spoofed = marker("ip"), marker("forged")
        seen = captured(testbed, net, [(ifname, ATTACHED_MAC, allowed, "udp", own),
                                       (ifname, ATTACHED_MAC, forged, "udp", spoofed),
                                       (ifname, ATTACHED_MAC, allowed, "arp", ""),
                                       (ifname, ATTACHED_MAC, forged, "arp", "")])
        assert own in seen and f"Reply {allowed} is-at" in seen, seen
        assert spoofed not in seen and f"Reply {forged} is-at" not in seen, seen
    finally:
        sh(testbed, "dom0", f"xl network-detach domu1 {ATTACHED_MAC}", check=False)
    # the vif's rules went with it; domu1's first vif keeps its own
    rules = sh(testbed, "dom0", "nft list table bridge xenbed")
    assert f"xv_vif{net['domid']}.1" not in rules and f"xv_{net['vif']}" in rules


def test_the_migration_receiver_does_not_answer_guests(testbed, net):
    names = "xl list | awk 'NR > 1 {print $1, $2}'"
    before = sh(testbed, "dom0", names)
    out = python_in(testbed, "domu1", CONNECT + f"""
    print(json.dumps({{"dom0": attempt({net['dom0_ip']!r}, 8002), "peer": attempt({net['peer_ip']!r}, 5201)}}))
    """)
    assert out == {"dom0": "timeout", "peer": "open"}, out  # dropped at the vif, the rest of the net works
    # the hypervisor, dom0 and the other guest still answer
    assert sh(testbed, "dom0", names) == before
    assert sh(testbed, "domu2", "xenstore-read domid").strip().isdigit()
