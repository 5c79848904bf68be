"""netback over XenBus (seed 000) and both data paths, against an in-process
xenstored, in-process grants (with GNTTABOP_copy) and event channels, and a
SOCK_SEQPACKET socketpair in place of the tap (one frame per message, as a
tap): connect waits for hotplug, traffic both ways, closedown, reconnect,
refusals."""

from __future__ import annotations

import mmap
import os
import socket
import time

import pytest

from xenbed.drivers.net.back import Netback
from xenbed.drivers.xen.gnttab import GrantRef, LocalFrame
from xenbed.drivers.xen.store import XenStoreClient
from xenbed.drivers.xenbus import BackendBus
from xenbed.protocols import netif
from xenbed.protocols.netif import (
    NETIF_RSP_NULL, NETIF_RSP_OKAY, NETRXF_more_data, NETTXF_extra_info, NETTXF_more_data, NetifExtraInfo,
    NetifRxRequest, NetifRxResponse, NetifTxRequest, NetifTxResponse,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, FrontRing, SharedRing

from .test_blkback_support import FakeEvtchn, FakeGrants, InProcessXenstored

BACK = "/local/domain/0/backend/vif/1/0"
FRONT = "/local/domain/1/device/vif/0"


class NetGrants(FakeGrants):
    """FakeGrants plus GNTTABOP_copy between the guest's grants and our pages."""

    def __init__(self, memory, domid=1):
        super().__init__(domid)
        self.memory = memory
        self.copies = 0

    def _buf(self, end):
        if isinstance(end, GrantRef):
            if end.domid != self.domid or end.gref not in self.local:
                return None
            return self.local[end.gref]
        page = self.memory.pages.get(end.gfn)
        return page.mmap if page else None

    def copy(self, ops, check=True):
        self.copies += 1
        out = []
        for op in ops:
            src, dst = self._buf(op.src), self._buf(op.dst)
            if src is None or dst is None:
                out.append("GNTST_bad_gntref")
                continue
            dst[op.dst.offset:op.dst.offset + op.length] = src[op.src.offset:op.src.offset + op.length]
            out.append("GNTST_okay")
        return out


class Page:
    def __init__(self, gfn):
        self.gfn, self.mmap = gfn, mmap.mmap(-1, XEN_PAGE_SIZE)


class Memory:
    def __init__(self):
        self.pages, self.next = {}, 1000

    def alloc(self, n):
        out = []
        for _ in range(n):
            self.pages[self.next] = Page(self.next)
            out.append(self.pages[self.next])
            self.next += 1
        return out

    def free(self, pages):
        for p in pages:
            self.pages.pop(p.gfn).mmap.close()


class SockTap:
    def __init__(self, name):
        self.name = name
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._sock = ours
        self.fd = ours.fileno()
        self.closed = False

    def close(self):
        self.closed = True
        self._sock.close()


class World:
    def __init__(self, tmp_path):
        self.xsd = InProcessXenstored(str(tmp_path / "xs.sock"))
        self.store = XenStoreClient(self.xsd.path)
        self.memory = Memory()
        self.grants, self.evtchn = NetGrants(self.memory), FakeEvtchn()
        self.taps = []

        def open_tap(name):
            self.taps.append(SockTap(name))
            return self.taps[-1]

        self.open_tap = open_tap
        self.hotplug_runs: list[str] = []  # "add <backend>" / "remove <backend>", in order
        self.mtus: list[tuple[str, int]] = []  # (vif, mtu) as netback applied them
        self.driver = self.new_netback()
        self.bus = BackendBus(XenStoreClient(self.xsd.path), 0, [self.driver]).start()

    def new_netback(self):
        return Netback(self.grants, self.evtchn, self.memory, open_tap=self.open_tap,
                       hotplug_add=self.hotplug_add, hotplug_remove=self.hotplug_remove,
                       set_vif_mtu=lambda name, mtu: self.mtus.append((name, mtu)))

    # The vif hotplug step's store side (drivers/net/hotplug.py); its `ip link`
    # side needs real links, which a socketpair tap is not.
    def hotplug_add(self, store, backend):
        self.hotplug_runs.append(f"add {backend}")
        store.write(f"{backend}/hotplug-status", "connected")
        return "vif1.0"

    def hotplug_remove(self, store, backend, name=None):
        self.hotplug_runs.append(f"remove {backend}")
        for key in ("hotplug-status", "hotplug-error"):
            if store.try_read(f"{backend}/{key}") is not None:
                store.rm(f"{backend}/{key}")
        return False

    def toolstack_create(self, **extra):
        def body(tx):
            for k, v in {"frontend": FRONT, "frontend-id": "1", "state": "1", "online": "1", "handle": "0",
                         "mac": "00:16:3e:00:00:01", "bridge": "xenbr0", "type": "vif", "mtu": "1500",
                         "script": "/etc/xen/scripts/vif-bridge", **extra}.items():
                self.store.write(f"{BACK}/{k}", v, tx)
            for k, v in {"backend": BACK, "backend-id": "0", "state": "1", "handle": "0",
                         "mac": "00:16:3e:00:00:01"}.items():
                self.store.write(f"{FRONT}/{k}", v, tx)
        self.store.run_transaction(body)

    def frontend_connect(self, split=True, **override):
        tx_ref, self.tx_page = self.grants.grant_page()
        rx_ref, self.rx_page = self.grants.grant_page()
        SharedRing.init(self.tx_page)
        SharedRing.init(self.rx_page)
        self.tx = FrontRing(self.tx_page, netif.TX_RING_ENTRY_SIZE)
        self.rx = FrontRing(self.rx_page, netif.RX_RING_ENTRY_SIZE)
        keys = {"tx-ring-ref": str(tx_ref), "rx-ring-ref": str(rx_ref), "request-rx-copy": "1",
                "feature-rx-notify": "1", "feature-sg": "1"}
        keys |= {"event-channel-tx": "7", "event-channel-rx": "8"} if split else {"event-channel": "7"}
        for k, v in (keys | override).items():
            if v is not None:
                self.store.write(f"{FRONT}/{k}", v)
        self.store.write(f"{FRONT}/state", "4")  # netfront: straight to Connected

    def wait_state(self, path, value, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.try_read(f"{path}/state") == value:
                return
            time.sleep(0.02)
        raise AssertionError(f"{path}/state is {self.store.try_read(f'{path}/state')}, wanted {value}")

    def conn(self):
        return self.driver.connection(BACK)

    def send(self, *requests):
        conn = self.conn()
        before = self.evtchn.notified.get(conn.tx_port, 0)
        for r in requests:
            self.tx.put_request(r.encode())
        self.tx.push_requests()
        self.evtchn.kick(conn.tx_port)
        assert self.evtchn.wait_notified(conn.tx_port, before + 1)
        out = []
        while self.tx.unconsumed_responses():
            out.append(NetifTxResponse.decode(self.tx.take_response()))
        return out

    def post_rx(self, count):
        pages = {}
        for i in range(count):
            gref, page = self.grants.grant_page()
            pages[i] = page
            self.rx.put_request(NetifRxRequest(i, gref).encode())
        self.rx.push_requests()
        self.evtchn.kick(self.conn().rx_port)
        return pages

    def close(self):
        violations = self.bus.recorder.check()
        self.bus.close()
        self.driver.shutdown()
        self.store.close()
        self.bus.store.close()
        self.xsd.close()
        assert not violations, violations


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def connect(world, **kw):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    world.frontend_connect(**kw)
    time.sleep(0.3)
    assert world.store.read(f"{BACK}/state") == "2"  # mapped, but waiting for the hotplug script
    assert world.conn() is not None
    world.store.write(f"{BACK}/hotplug-status", "connected")
    world.wait_state(BACK, "4")


def test_probe_writes_features_and_creates_the_vif(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    for key, value in {"feature-sg": "1", "feature-rx-copy": "1", "feature-split-event-channels": "1",
                       "feature-gso-tcpv4": "0", "feature-ipv6-csum-offload": "1"}.items():
        assert world.store.read(f"{BACK}/{key}") == value
    assert [t.name for t in world.taps] == ["vif1.0"]


def test_vifname_names_the_tap(world):
    world.toolstack_create(vifname="guestnic")
    world.wait_state(BACK, "2")
    assert world.taps[-1].name == "guestnic"


@pytest.mark.parametrize("split", [True, False], ids=["split", "single-channel"])
def test_traffic_both_ways(world, split):
    connect(world, split=split)
    peer = world.taps[0].peer
    # TX: a 5000-byte frame in two slots, with a GSO-less extra slot in between
    frame = bytes(range(256)) * 19 + bytes(136)
    g1, p1 = world.grants.grant_page()
    g2, p2 = world.grants.grant_page()
    p1[96:96 + 4000] = frame[:4000]
    p2[0:1000] = frame[4000:]
    hash_extra = NetifExtraInfo(4, 0)
    rsps = world.send(NetifTxRequest(g1, 96, NETTXF_more_data | NETTXF_extra_info, 1, 5000), hash_extra,
                      NetifTxRequest(g2, 0, 0, 2, 1000))
    assert [(r.id, r.status) for r in rsps] == [(1, NETIF_RSP_OKAY), (0, NETIF_RSP_NULL), (2, NETIF_RSP_OKAY)]
    assert peer.recv(65536) == frame
    # RX: buffers first, then a 5000-byte frame from the world
    pages = world.post_rx(3)
    incoming = os.urandom(5000)
    before = world.evtchn.notified.get(world.conn().rx_port, 0)
    peer.send(incoming)
    assert world.evtchn.wait_notified(world.conn().rx_port, before + 1)
    rsps = []
    while world.rx.unconsumed_responses():
        rsps.append(NetifRxResponse.decode(world.rx.take_response()))
    assert [(r.id, r.offset, r.flags, r.status) for r in rsps] == [(0, 0, NETRXF_more_data, 4096), (1, 0, 0, 904)]
    assert pages[0][:4096] + pages[1][:904] == incoming
    stats = world.conn().server.stats
    assert stats["tx_packets"] == 1 and stats["rx_packets"] == 1 and stats["rx_dropped"] == 0


def test_rx_frame_waits_for_buffers(world):
    connect(world)
    peer = world.taps[0].peer
    peer.send(b"\x01" * 60)
    time.sleep(0.3)
    assert world.conn().server.backlog  # no buffer posted yet: it waits, not dropped
    pages = world.post_rx(1)
    deadline = time.monotonic() + 5
    while not world.rx.unconsumed_responses() and time.monotonic() < deadline:
        time.sleep(0.02)
    rsp = NetifRxResponse.decode(world.rx.take_response())
    assert rsp.status == 60 and pages[0][:60] == b"\x01" * 60


def test_frontend_without_rx_copy_is_refused(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    world.frontend_connect(**{"request-rx-copy": None})
    world.wait_state(BACK, "5")
    assert "rx-copy" in world.store.read(world.bus.devices[BACK].error_path)
    assert not world.grants.live


def test_malicious_tx_is_fatal(world):
    connect(world)
    g, _ = world.grants.grant_page()
    world.tx.put_request(NetifTxRequest(g, 4000, 0, 1, 200).encode())  # crosses its page
    world.tx.push_requests()
    world.evtchn.kick(world.conn().tx_port)
    world.wait_state(BACK, "5")
    assert "Cross page boundary" in world.store.read(world.bus.devices[BACK].error_path)
    deadline = time.monotonic() + 5
    while world.grants.live and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not world.grants.live


def test_toolstack_closedown_removes_the_vif(world):
    connect(world)
    world.store.run_transaction(lambda tx: (world.store.write(f"{BACK}/online", "0", tx),
                                            world.store.write(f"{BACK}/state", "5", tx)))
    world.store.write(f"{FRONT}/state", "5")
    world.wait_state(BACK, "5")
    world.store.write(f"{FRONT}/state", "6")
    world.wait_state(BACK, "6")
    # As Linux netback: Closed first, then the vif is unregistered (seed 000's
    # "Closed, then unregister device"), so the tap goes just after Closed.
    def torn_down():
        return world.taps[0].closed and not world.grants.live and world.evtchn.closed and world.memory.pages == {}
    deadline = time.monotonic() + 5
    while not torn_down() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert world.taps[0].closed and not world.grants.live and world.evtchn.closed
    assert world.memory.pages == {}  # bounce pages given back


def test_frontend_close_then_reconnect_keeps_the_vif(world):
    connect(world)
    world.store.write(f"{FRONT}/state", "5")
    world.wait_state(BACK, "5")
    world.store.write(f"{FRONT}/state", "6")
    world.wait_state(BACK, "6")
    deadline = time.monotonic() + 5  # the rings are unmapped around Closed, not necessarily before it
    while world.grants.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not world.taps[0].closed and not world.grants.live
    world.store.write(f"{FRONT}/state", "1")
    world.wait_state(BACK, "2")
    world.frontend_connect()
    world.wait_state(BACK, "4")  # hotplug-status is still "connected": no wait
    g, p = world.grants.grant_page()
    p[:60] = b"\x02" * 60
    assert world.send(NetifTxRequest(g, 0, 0, 5, 60))[0].status == NETIF_RSP_OKAY
    assert world.taps[0].peer.recv(100) == b"\x02" * 60
    assert len(world.taps) == 1


def test_rate_is_applied_and_reconfigured(world):
    world.toolstack_create(rate="100,1000000")  # 100 bytes per second
    world.wait_state(BACK, "2")
    world.frontend_connect()
    world.store.write(f"{BACK}/hotplug-status", "connected")
    world.wait_state(BACK, "4")
    assert world.conn().server.credit.rate == (100, 1000000)
    world.store.write(f"{BACK}/rate", "1000000,50000")
    deadline = time.monotonic() + 5
    while world.conn().server.credit.rate != (1000000, 50000) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world.conn().server.credit.rate == (1000000, 50000)


def test_mtu_is_applied_to_the_vif_live_without_a_state_change(world):
    connect(world)
    states_before = world.store.read(f"{BACK}/state")
    world.store.write(f"{BACK}/mtu", "1400")
    deadline = time.monotonic() + 5
    while ("vif1.0", 1400) not in world.mtus and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world.mtus[-1] == ("vif1.0", 1400)
    world.store.write(f"{BACK}/mtu", "12")  # nonsense: ignored, the vif keeps 1400
    time.sleep(0.2)
    assert world.mtus[-1] == ("vif1.0", 1400)
    assert world.store.read(f"{BACK}/state") == states_before == "4"
    assert [t.new for t in world.bus.recorder.for_path(BACK)][-1] == 4  # no transition since Connected


def restart_netback(world):
    """What a killed netback (or dom0) leaves: its rings, ports and taps are
    gone with the process (shutdown() closes them, as exit closes the fds and
    the hypervisor link), the store keeps every node it wrote.  A new netback
    on a new bus then finds them."""
    world.bus.close()
    world.driver.shutdown()
    assert not world.grants.live and all(t.closed for t in world.taps)
    world.bus.store.close()
    world.hotplug_runs.clear()
    world.driver = world.new_netback()
    world.bus = BackendBus(XenStoreClient(world.xsd.path), 0, [world.driver]).start()


def test_restarted_netback_recovers_a_connected_vif(world):
    connect(world)
    old_tap = world.taps[0]
    restart_netback(world)
    # Left Connected: the new netback says the connection is lost, makes the
    # vif again and runs the hotplug step itself (the toolstack is not there)
    world.wait_state(BACK, "6")
    deadline = time.monotonic() + 5
    while world.store.try_read(f"{BACK}/hotplug-status") != "connected" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world.hotplug_runs == [f"remove {BACK}", f"add {BACK}"]  # the stale status first cleared
    assert [t.name for t in world.taps] == ["vif1.0", "vif1.0"] and not world.taps[1].closed
    # The frontend's Connected is about the old rings: nothing happens until it resets
    time.sleep(0.3)
    assert world.store.read(f"{BACK}/state") == "6" and not world.grants.live
    world.store.write(f"{FRONT}/state", "6")
    world.store.write(f"{FRONT}/state", "1")  # xenbus_reset_frontend: Closed, then Initialising
    world.wait_state(BACK, "2")
    world.frontend_connect()
    world.wait_state(BACK, "4")
    g, p = world.grants.grant_page()
    p[:60] = b"\x03" * 60
    assert world.send(NetifTxRequest(g, 0, 0, 5, 60))[0].status == NETIF_RSP_OKAY
    assert world.taps[1].peer.recv(100) == b"\x03" * 60
    assert old_tap.closed
    assert world.bus.recorder.check() == []
    assert [t.new for t in world.bus.recorder.for_path(BACK)] == [6, 2, 4]


def test_restarted_netback_connects_a_vif_left_in_initwait(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    restart_netback(world)  # died before the toolstack ran the hotplug step
    world.frontend_connect()
    world.wait_state(BACK, "4")  # hotplug run by the new netback, then straight to Connected
    assert world.hotplug_runs == [f"remove {BACK}", f"add {BACK}"]
    assert [t.new for t in world.bus.recorder.for_path(BACK)] == [4]


def test_restarted_netback_waits_for_its_own_hotplug_step(world):
    """The old `hotplug-status=connected` is about a vif that is gone: a
    recovered device must not connect before the step ran again."""
    connect(world)
    failing = []

    def hotplug_fails(store, backend):
        failing.append(backend)
        store.write(f"{backend}/hotplug-error", "bridge xenbr0 does not exist")
        store.write(f"{backend}/hotplug-status", "error")
        raise OSError("bridge xenbr0 does not exist")

    world.hotplug_add = hotplug_fails
    restart_netback(world)
    world.wait_state(BACK, "6")
    world.store.write(f"{FRONT}/state", "6")
    world.store.write(f"{FRONT}/state", "1")
    world.wait_state(BACK, "2")
    world.frontend_connect()
    time.sleep(0.5)
    assert failing == [BACK]
    assert world.store.read(f"{BACK}/state") == "2"  # rings mapped, waiting for a hotplug that failed
