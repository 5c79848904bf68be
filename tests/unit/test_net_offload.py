"""Offload negotiation between netfront's keys and netback (no Docker): a
vnet-header vif advertises GSO, sets the tap's offloads from what the
frontend asked for, sends a GSO packet to the tap in one piece and a GSO
frame from the tap with its extra info; a frontend without feature-sg gets
its vif's MTU held at 1500 and only single-slot frames."""

from __future__ import annotations

import os
import socket
import time

import pytest

from xenbed.drivers.net.front import BackendFeatures, frontend_keys
from xenbed.protocols.netif import (
    NETIF_RSP_NULL, NETIF_RSP_OKAY, NETRXF_csum_blank, NETRXF_data_validated, NETRXF_extra_info, NETRXF_more_data,
    NETTXF_csum_blank, NETTXF_extra_info, NETTXF_more_data, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_GSO_TYPE_TCPV4,
    ExtraGso, NetifExtraInfo, NetifRxResponse, NetifTxRequest,
)
from xenbed.protocols.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN, VnetHdr,
)

from .test_netback_xenbus import BACK, SockTap, World, connect
from .test_vnet import tcp4


class VnetSockTap(SockTap):
    vnet_hdr = True
    max_queues = 2

    def __init__(self, name):
        super().__init__(name)
        self.offloads = []
        self.queue_peers = []  # the test's end of each extra queue

    def open_queues(self, count):
        fds = []
        for _ in range(count - 1):
            ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            self.queue_peers.append(peer)
            fds.append(ours.detach())
        return fds

    def set_offload(self, **flags):
        self.offloads.append(flags)
        return True


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)

    def open_tap(name):
        w.taps.append(VnetSockTap(name))
        return w.taps[-1]

    w.driver.open_tap = open_tap
    yield w
    w.close()


OFFLOAD_KEYS = {"feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1", "feature-ipv6-csum-offload": "1"}


def rx_responses(world, count):
    deadline = time.monotonic() + 5
    out = []
    while len(out) < count and time.monotonic() < deadline:
        while world.rx.unconsumed_responses():
            out.append(world.rx.take_response())
        time.sleep(0.01)
    return out


def test_vnet_vif_advertises_gso_and_takes_a_64k_packet_in_one_piece(world):
    connect(world, **OFFLOAD_KEYS)
    assert world.store.read(f"{BACK}/feature-gso-tcpv4") == "1"
    tap = world.taps[0]
    assert tap.offloads[-1] == {"csum": True, "tso4": True, "tso6": True}
    frame = tcp4(os.urandom(60000))
    grefs = []
    for i in range(0, len(frame), 4096):
        g, page = world.grants.grant_page()
        page[:len(frame[i:i + 4096])] = frame[i:i + 4096]
        grefs.append(g)
    gso = NetifExtraInfo.for_gso(ExtraGso(1448, XEN_NETIF_GSO_TYPE_TCPV4))
    reqs = [NetifTxRequest(grefs[0], 0, NETTXF_csum_blank | NETTXF_extra_info | NETTXF_more_data, 0, len(frame)), gso]
    for i, g in enumerate(grefs[1:], 1):
        size = min(4096, len(frame) - i * 4096)
        reqs.append(NetifTxRequest(g, 0, NETTXF_more_data if i < len(grefs) - 1 else 0, i, size))
    rsps = world.send(*reqs)
    assert [r.status for r in rsps] == [NETIF_RSP_OKAY, NETIF_RSP_NULL] + [NETIF_RSP_OKAY] * (len(grefs) - 1)
    got = tap.peer.recv(70000)
    hdr = VnetHdr.decode(got)
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    assert got[VNET_HDR_LEN:VNET_HDR_LEN + 50] == frame[:50] and got[VNET_HDR_LEN + 52:] == frame[52:]


def test_gso_frame_from_the_tap_goes_with_its_extra_info(world):
    connect(world, **OFFLOAD_KEYS)
    pages = world.post_rx(20)
    frame = tcp4(os.urandom(20000))
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    world.taps[0].peer.send(hdr.encode() + frame)
    slots = rx_responses(world, 7)  # 5 data slots + 1 extra, then nothing
    first = NetifRxResponse.decode(slots[0])
    assert first.flags == NETRXF_csum_blank | NETRXF_data_validated | NETRXF_extra_info | NETRXF_more_data
    extra = NetifExtraInfo.decode(slots[1])
    assert extra.type == XEN_NETIF_EXTRA_TYPE_GSO and extra.gso() == ExtraGso(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    data = [NetifRxResponse.decode(s) for s in [slots[0]] + slots[2:]]
    assert len(slots) == 6 and [r.id for r in data] == [0, 2, 3, 4, 5]
    assert b"".join(bytes(pages[r.id][:r.status]) for r in data) == frame


def test_frontend_without_sg_gets_mtu_1500_and_single_slot_frames(world):
    world.toolstack_create(mtu="9000")
    world.wait_state(BACK, "2")
    world.frontend_connect(**{"feature-sg": None})
    time.sleep(0.3)
    world.store.write(f"{BACK}/hotplug-status", "connected")
    world.wait_state(BACK, "4")
    assert world.mtus[-1] == ("vif1.0", 1500)
    assert world.taps[0].offloads[-1] == {"csum": True, "tso4": False, "tso6": False}
    world.store.write(f"{BACK}/mtu", "4000")  # refused above 1500 while this frontend is connected
    time.sleep(0.3)
    assert world.mtus[-1] == ("vif1.0", 1500)
    world.post_rx(4)
    peer = world.taps[0].peer
    peer.send(VnetHdr().encode() + os.urandom(5000))  # would take two slots: dropped
    peer.send(VnetHdr().encode() + b"\x02" * 1514)
    [slot] = rx_responses(world, 1)
    rsp = NetifRxResponse.decode(slot)
    assert rsp.status == 1514 and rsp.flags == 0
    assert world.conn().server.stats["rx_dropped"] == 1


def test_netfront_keys_and_offloads_follow_the_backend():
    keys = frontend_keys(8, 9, [3, 4], offloads=True)
    assert keys["feature-sg"] == "1" and "feature-no-csum-offload" not in keys
    assert all(keys[k] == "1" for k in OFFLOAD_KEYS)
    assert frontend_keys(8, 9, [3], offloads=False)["feature-no-csum-offload"] == "1"
    read = {"feature-sg": "1", "feature-gso-tcpv4": "1", "feature-rx-copy": "1"}.get
    assert BackendFeatures.parse(read).tap_offload() == {"csum": True, "tso4": True, "tso6": False}
    no_sg = BackendFeatures.parse({"feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1"}.get)
    assert no_sg.tap_offload() == {"csum": True, "tso4": False, "tso6": False}


# -- netfront's engine ------------------------------------------------------------------
def test_netfront_puts_the_gso_extra_right_after_the_first_request():
    from xenbed.protocols.netif import NETTXF_data_validated, NetifTxResponse
    from xenbed.protocols.vnet import Offload

    from .test_netfront_engine import World as EngineWorld

    w = EngineWorld()
    f = bytes(tcp4(os.urandom(9000)))
    off = Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448)
    pkt = w.engine.transmit(f, offload=off)
    assert pkt is not None
    ring = w.back.tx
    slots = [ring.take_request() for _ in range(ring.unconsumed_requests())]
    first, extra = NetifTxRequest.decode(slots[0]), NetifExtraInfo.decode(slots[1])
    assert first.flags == NETTXF_csum_blank | NETTXF_data_validated | NETTXF_extra_info | NETTXF_more_data
    assert first.size == len(f) and extra.gso() == ExtraGso(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    data = [NetifTxRequest.decode(s) for s in [slots[0]] + slots[2:]]
    assert len(data) == 3 and not data[-1].flags & NETTXF_more_data
    for i, s in enumerate(slots):  # answered as netback does: NULL for the extra
        rsp_id = 0 if i == 1 else NetifTxRequest.decode(s).id
        ring.put_response(NetifTxResponse(rsp_id, NETIF_RSP_NULL if i == 1 else NETIF_RSP_OKAY).encode())
    ring.push_responses_and_check_notify()
    w.engine.handle_tx_responses()
    assert pkt.done.is_set() and w.engine.counters.tx_packets == 1 and w.engine.counters.tx_errors == 0


def test_netfront_hands_rx_offloads_to_the_tap():
    from xenbed.protocols.vnet import Offload

    from .test_netfront_engine import World as EngineWorld

    got = []
    w = EngineWorld()
    w.engine.offloads = True
    w.engine.deliver = lambda frame, offload: got.append((frame, offload)) or True
    f = bytes(tcp4(os.urandom(6000)))
    w.back.send(f, extra=True)
    w.engine.handle_rx_responses()
    [(data, off)] = got
    assert data == f and off == Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448)


def test_two_queues_each_with_its_rings_ports_and_tap_queue(world):
    from xenbed.protocols import netif
    from xenbed.protocols.ring import FrontRing, SharedRing

    from .test_netback_xenbus import FRONT

    world.toolstack_create()
    world.wait_state(BACK, "2")
    assert world.store.read(f"{BACK}/multi-queue-max-queues") == "2"
    rings = []
    keys = {"multi-queue-num-queues": "2", "request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1"}
    for q in range(2):
        tx_ref, tx_page = world.grants.grant_page()
        rx_ref, rx_page = world.grants.grant_page()
        SharedRing.init(tx_page)
        SharedRing.init(rx_page)
        rings.append(FrontRing(tx_page, netif.TX_RING_ENTRY_SIZE))
        keys |= {f"queue-{q}/tx-ring-ref": str(tx_ref), f"queue-{q}/rx-ring-ref": str(rx_ref),
                 f"queue-{q}/event-channel-tx": str(10 + 2 * q), f"queue-{q}/event-channel-rx": str(11 + 2 * q)}
    for k, v in keys.items():
        world.store.write(f"{FRONT}/{k}", v)
    world.store.write(f"{FRONT}/state", "4")
    time.sleep(0.3)
    world.store.write(f"{BACK}/hotplug-status", "connected")
    world.wait_state(BACK, "4")
    conn = world.conn()
    assert len(conn.queues) == 2 and len(conn.ports) == 4
    # a frame on queue 1's tx ring comes out of the tap's second queue
    g, page = world.grants.grant_page()
    page[:60] = b"\x07" * 60
    rings[1].put_request(NetifTxRequest(g, 0, 0, 3, 60).encode())
    rings[1].push_requests()
    world.evtchn.kick(conn.queues[1].tx_port)
    got = world.taps[0].queue_peers[0].recv(100)
    assert VnetHdr.decode(got) == VnetHdr() and got[VNET_HDR_LEN:] == b"\x07" * 60


def test_more_queues_than_offered_is_refused(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    world.frontend_connect(**{"multi-queue-num-queues": "3"})
    world.wait_state(BACK, "5")
    assert "exceeding the maximum of 2" in world.store.read(world.bus.devices[BACK].error_path)
