"""netfront on the real XenBus (FrontendBus) against the real xenstored core
in-process (tests/unit/xenbus_store.py), with a stand-in netback on a
BackendBus and a fake tap.  Grant tables, memory and event channels are
in-process fakes with the guest API's shape: pages are anonymous mmaps,
a grant ref names one, an event is a direct call of the registered handler.

Checked: the handshake (wait for InitWait, the keys in ONE transaction,
straight to Connected, tap up on backend Connected), traffic both ways
through the tap, gratuitous ARP, split/shared event channels, refusing a
backend without rx-copy, closedown (tap stays), removal (tap goes),
migration (tap stays, new rings), several vifs, the status file; and that
every recorded transition is one the seeds allow.
"""

from __future__ import annotations

import errno
import json
import mmap
import queue
import time

import pytest

from xenbed.drivers.net.ether import gratuitous_arp
from xenbed.drivers.net.front import NetFront
from xenbed.drivers.xen.memory import Page
from xenbed.drivers.xenbus import BackendBus, FrontendBus, TransitionRecorder, XenbusDriver, XenbusHooks
from xenbed.drivers.xenbus import XenbusState as S
from xenbed.protocols.netif import (
    NETIF_RSP_OKAY,
    NETTXF_more_data,
    RX_RING_ENTRY_SIZE,
    TX_RING_ENTRY_SIZE,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenbed.protocols.ring import BackRing
from xenbed.protocols.xs_wire import Op

from .xenbus_store import StoreHub

GUEST = 1


# -- the guest API, in-process --------------------------------------------------------------
class FakeXen:
    def __init__(self):
        self.mem = self.Mem()
        self.gnttab = self.Gnttab(self.mem)
        self.evtchn = self.Evtchn()

    class Mem:
        def __init__(self):
            self.pages: dict[int, Page] = {}
            self.next = 0x1000

        def alloc(self, n=1):
            out = []
            for _ in range(n):
                page = Page(self.next, mmap.mmap(-1, 4096))
                self.pages[page.gfn] = page
                self.next += 1
                out.append(page)
            return out

        def free(self, pages):
            for p in pages:
                self.pages.pop(p.gfn, None)
                p.close()

    class Gnttab:
        def __init__(self, mem):
            self.mem = mem
            self.grants: dict[int, tuple[int, int, bool]] = {}  # gref -> (domid, gfn, readonly)
            self.next = 8
            self.ended = 0

        def grant(self, domid, page, readonly=False):
            gfn = page.gfn if isinstance(page, Page) else int(page)
            assert gfn in self.mem.pages
            self.next += 1
            self.grants[self.next] = (domid, gfn, bool(readonly))
            return self.next

        def end(self, gref):
            del self.grants[gref]
            self.ended += 1

        def page(self, gref) -> mmap.mmap:
            return self.mem.pages[self.grants[gref][1]].mmap

    class Evtchn:
        def __init__(self):
            self.ports: dict[int, int] = {}  # port -> remote domid
            self.callbacks: dict[int, list] = {}
            self.notified: dict[int, int] = {}
            self.next = 3

        def alloc_unbound(self, remote):
            self.next += 1
            self.ports[self.next] = remote
            return self.next

        def on_event(self, port, cb, inline=False):
            self.callbacks.setdefault(port, []).append(cb)

        def remove_callbacks(self, port):
            self.callbacks.pop(port, None)

        def notify(self, port, checked=False):
            self.notified[port] = self.notified.get(port, 0) + 1

        def clear(self, port, oneway=False):
            pass

        def close(self, port):
            self.ports.pop(port)

        def fire(self, port):
            for cb in list(self.callbacks.get(port, ())):
                cb(port)


class FakeTap:
    """The tap's interface as netfront uses it; `inject` is the guest's stack
    sending a frame, `received` what netfront wrote into it."""

    def __init__(self, name):
        self.name = name
        self.mac = None
        self.mtu = None
        self.up = False
        self.carrier = None
        self.addresses: list[str] = []
        self.received: list[bytes] = []
        self.closed = False
        self._out: queue.Queue = queue.Queue()

    def set_mac(self, mac):
        self.mac = mac

    def set_mtu(self, mtu):
        self.mtu = mtu

    def set_up(self, up=True):
        self.up = up

    def set_carrier(self, on):
        self.carrier = on
        return True

    def ipv4_addresses(self):
        return list(self.addresses)

    def inject(self, frame):
        self._out.put(frame)

    def read(self, timeout=None):
        if self.closed:
            return None
        try:
            return self._out.get(timeout=timeout)
        except queue.Empty:
            return None

    def write(self, frame):
        if self.closed:
            return False
        self.received.append(bytes(frame))
        return True

    def close(self):
        self.closed = True


# -- a stand-in netback ---------------------------------------------------------------------
class MiniNetback(XenbusDriver):
    """Netback's XenBus side in a few lines: features at probe, InitWait;
    on the frontend's Connected: map the rings (through the fake grant
    table), Connected; follow closedown."""

    devicetype = "vif"

    def __init__(self, xen: FakeXen, *, rx_copy=True, split=True, sg=True, mtu=None):
        self.xen = xen
        self.rx_copy, self.split, self.sg, self.mtu = rx_copy, split, sg, mtu
        self.conns: dict[str, dict] = {}

    def probe(self, dev):
        dev.write("feature-rx-copy", "1" if self.rx_copy else "0")
        dev.write("feature-sg", "1" if self.sg else "0")
        if self.split:
            dev.write("feature-split-event-channels", "1")
        if self.mtu:
            dev.write("mtu", str(self.mtu))
        dev.switch_state(S.InitWait)

    def otherend_changed(self, dev, state):
        if state == S.Connected and dev.state != S.Connected:
            read = dev.otherend_read
            conn = {"tx": BackRing(self.xen.gnttab.page(int(read("tx-ring-ref"))), TX_RING_ENTRY_SIZE),
                    "rx": BackRing(self.xen.gnttab.page(int(read("rx-ring-ref"))), RX_RING_ENTRY_SIZE)}
            if read("event-channel") is not None:
                conn["tx_port"] = conn["rx_port"] = int(read("event-channel"))
            else:
                conn["tx_port"], conn["rx_port"] = int(read("event-channel-tx")), int(read("event-channel-rx"))
            self.conns[dev.nodename] = conn
            dev.switch_state(S.Connected)
        elif state == S.Closing:
            dev.switch_state(S.Closing)
        elif state in (S.Closed, S.Unknown):
            self.conns.pop(dev.nodename, None)
            dev.switch_state(S.Closed)

    def remove(self, dev):
        self.conns.pop(dev.nodename, None)

    # data path, driven by the tests
    def take_tx(self, be, wait=2.0) -> list[bytes]:
        conn = self.conns[be]
        ring, frames, pending = conn["tx"], [], []
        deadline = time.monotonic() + wait
        while not ring.unconsumed_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        while ring.unconsumed_requests() or pending:
            if not ring.unconsumed_requests():
                time.sleep(0.01)
                continue
            req = NetifTxRequest.decode(ring.take_request())
            assert self.xen.gnttab.grants[req.gref][2], "tx pages are granted read-only"
            pending.append(req)
            if not req.flags & NETTXF_more_data:
                head = pending[0].size - sum(r.size for r in pending[1:])
                data = b"".join(bytes(self.xen.gnttab.page(r.gref)[:n])
                                for r, n in zip(pending, [head] + [r.size for r in pending[1:]]))
                frames.append(data)
                for r in pending:
                    ring.put_response(NetifTxResponse(r.id, NETIF_RSP_OKAY).encode())
                pending = []
        if ring.push_responses_and_check_notify():
            self.xen.evtchn.fire(conn["tx_port"])
        return frames

    def send(self, be, frame: bytes):
        conn = self.conns[be]
        ring = conn["rx"]
        req = NetifRxRequest.decode(ring.take_request())
        self.xen.gnttab.page(req.gref)[:len(frame)] = frame
        ring.put_response(NetifRxResponse(req.id, 0, 0, len(frame)).encode())
        if ring.push_responses_and_check_notify():
            self.xen.evtchn.fire(conn["rx_port"])


# -- the host ---------------------------------------------------------------------------------
def fe_path(devid=0):
    return f"/local/domain/{GUEST}/device/vif/{devid}"


def be_path(devid=0):
    return f"/local/domain/0/backend/vif/{GUEST}/{devid}"


class Host:
    def __init__(self, tmp_path, **backend):
        self.hub = StoreHub()
        self.recorder = TransitionRecorder()
        self.xs = self.hub.connect(0)
        dom = f"/local/domain/{GUEST}"

        def body(tx):
            self.xs.mkdir(dom, tx)
            self.xs.set_perms(dom, ["n0", f"r{GUEST}"], tx)
            for sub in ("device", "error"):
                self.xs.mkdir(f"{dom}/{sub}", tx)
                self.xs.set_perms(f"{dom}/{sub}", [f"n{GUEST}"], tx)

        self.xs.run_transaction(body)
        self.xen = FakeXen()  # one fake for both ends: grants resolve to the guest's pages
        self.taps: dict[str, FakeTap] = {}
        self.status_dir = tmp_path / "vif"
        self.guest_xs = self.hub.connect(GUEST)
        self.front_drv = NetFront(self.xen, tap_factory=self._tap, status_dir=str(self.status_dir),
                                  drain_timeout=0.5)
        hooks = XenbusHooks(grant_access=lambda d, f, ro: self.xen.gnttab.grant(d, f, ro),
                            alloc_unbound=self.xen.evtchn.alloc_unbound, free_evtchn=self.xen.evtchn.close)
        self.front = FrontendBus(self.guest_xs, GUEST, [self.front_drv], recorder=self.recorder,
                                 hooks=hooks).start()
        self.back_drv = MiniNetback(self.xen, **backend)
        self.back = BackendBus(self.hub.connect(0), 0, [self.back_drv], recorder=self.recorder).start()
        self.pump()

    def _tap(self, name):
        tap = self.taps[name] = FakeTap(name)
        return tap

    def pump(self):
        return self.hub.pump()

    def add(self, devid=0, mac="00:16:3e:00:00:01"):
        fe, be = fe_path(devid), be_path(devid)

        def body(tx):
            self.xs.mkdir(fe, tx)
            self.xs.set_perms(fe, [f"n{GUEST}", "r0"], tx)
            self.xs.mkdir(be, tx)
            self.xs.set_perms(be, ["n0", f"r{GUEST}"], tx)
            for k, v in {"backend": be, "backend-id": "0", "state": "1", "handle": str(devid), "mac": mac}.items():
                self.xs.write(f"{fe}/{k}", v, tx)
            for k, v in {"frontend": fe, "frontend-id": str(GUEST), "state": "1", "handle": str(devid),
                         "mac": mac, "bridge": "xenbr0"}.items():
                self.xs.write(f"{be}/{k}", v, tx)

        self.xs.run_transaction(body)
        self.recorder.record(fe, "frontend", S.Unknown, S.Initialising)
        self.recorder.record(be, "backend", S.Unknown, S.Initialising)
        return fe, be

    def connect(self, devid=0, mac="00:16:3e:00:00:01"):
        fe, be = self.add(devid, mac)
        self.pump()
        return fe, be

    def state(self, path):
        return S.parse(self.xs.try_read(f"{path}/state"))

    def transitions(self, path):
        return [(t.old, t.new) for t in self.recorder.for_path(path)]

    def close(self):
        for vif in list(self.front_drv.devices.values()):
            vif.stop.set()
        assert self.recorder.check() == []


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.close()


def until(cond, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def eth(n, src="00:16:3e:00:00:01", seed=0):
    return bytes.fromhex("ffffffffffff") + bytes.fromhex(src.replace(":", "")) + b"\x08\x00" + \
        bytes((i + seed) & 0xFF for i in range(n - 14))


# -- initialisation ---------------------------------------------------------------------------
def test_handshake_skips_initialised_and_writes_the_keys_in_one_transaction(host):
    fe, be = host.add()
    host.guest_xs.requests.clear()
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Connected, S.Connected)
    assert host.transitions(fe) == [(S.Unknown, S.Initialising), (S.Initialising, S.Connected)]
    read = lambda k: host.xs.try_read(f"{fe}/{k}")  # noqa: E731
    for key, value in {"request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": "1",
                       "feature-no-csum-offload": "1"}.items():
        assert read(key) == value
    ports = (int(read("event-channel-tx")), int(read("event-channel-rx")))
    assert read("event-channel") is None and ports[0] != ports[1]
    assert all(host.xen.evtchn.ports[p] == 0 for p in ports)
    tx_ref, rx_ref = int(read("tx-ring-ref")), int(read("rx-ring-ref"))
    for ref in (tx_ref, rx_ref):  # ring pages: granted to the backend, writable
        assert host.xen.gnttab.grants[ref][0] == 0 and not host.xen.gnttab.grants[ref][2]
    # every key in one transaction
    writes = [p for p in host.guest_xs.requests if p.op == Op.WRITE
              and p.payload.split(b"\0")[0].decode().rsplit("/", 1)[1] in
              ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx", "request-rx-copy",
               "feature-rx-notify", "feature-sg", "feature-no-csum-offload")]
    assert len(writes) == 8 and len({p.tx_id for p in writes}) == 1 and writes[0].tx_id != 0
    # the tap: eth0 with the toolstack's MAC, up, carrier on
    tap = host.taps["eth0"]
    assert (tap.mac, tap.mtu, tap.up, tap.carrier) == ("00:16:3e:00:00:01", 1500, True, True)


def test_nothing_happens_before_the_backend_is_in_initwait(tmp_path):
    class LateBack(MiniNetback):
        def probe(self, dev):  # hotplug not finished: stays Initialising
            pass

    h = Host(tmp_path)
    h.back.drivers["vif"] = h.back_drv = LateBack(h.xen)
    fe, be = h.connect()
    assert h.state(fe) == S.Initialising
    assert h.xs.try_read(f"{fe}/tx-ring-ref") is None
    assert h.taps["eth0"].carrier is False and not h.taps["eth0"].up
    MiniNetback.probe(h.back_drv, h.back.device(be))  # hotplug done
    h.pump()
    assert (h.state(fe), h.state(be)) == (S.Connected, S.Connected)
    h.close()


def test_shared_event_channel_without_split(tmp_path):
    h = Host(tmp_path, split=False, mtu=9000)
    fe, be = h.connect()
    assert h.xs.try_read(f"{fe}/event-channel") is not None
    assert h.xs.try_read(f"{fe}/event-channel-tx") is None
    assert h.taps["eth0"].mtu == 9000
    f = eth(100)
    h.back_drv.send(be, f)
    assert h.taps["eth0"].received == [f]
    h.taps["eth0"].inject(eth(9014))
    assert h.back_drv.take_tx(be) == [eth(9014)]
    h.close()


def test_backend_without_rx_copy_is_refused(tmp_path):
    h = Host(tmp_path, rx_copy=False)
    fe, be = h.connect()
    assert h.state(fe) in (S.Closing, S.Closed)
    err = h.xs.read(f"/local/domain/{GUEST}/error/device/vif/0/error")
    assert err.startswith(f"{errno.EOPNOTSUPP} ") and "rx-copy" in err
    assert h.xs.try_read(f"{fe}/tx-ring-ref") is None
    h.close()


def test_bad_mac_is_refused(host):
    fe, be = host.connect(mac="01:00:5e:00:00:01")
    assert host.state(fe) == S.Closing
    assert "mac" in host.xs.read(f"/local/domain/{GUEST}/error/device/vif/0/error")
    assert host.taps == {}


# -- traffic ----------------------------------------------------------------------------------
def test_frames_both_ways(host):
    fe, be = host.connect()
    tap = host.taps["eth0"]
    inbound = [eth(60, seed=i) for i in range(5)] + [eth(1514, seed=9)]
    for f in inbound:
        host.back_drv.send(be, f)
    assert tap.received == inbound
    outbound = [eth(98, seed=i) for i in range(10)] + [eth(1514, seed=3)]
    for f in outbound:
        tap.inject(f)
    got = []
    assert until(lambda: got.extend(host.back_drv.take_tx(be, wait=0.1)) or len(got) == len(outbound))
    assert got == outbound
    vif = host.front_drv.devices[fe]
    assert until(lambda: vif.engine.counters.tx_packets == len(outbound))
    c = vif.engine.counters
    assert (c.rx_packets, c.rx_bytes) == (len(inbound), sum(map(len, inbound)))


def test_gratuitous_arp_on_connect(tmp_path):
    h = Host(tmp_path)

    def tap_with_address(name):
        tap = Host._tap(h, name)
        tap.addresses = ["192.0.2.7", "198.51.100.1"]
        return tap

    h.front_drv.tap_factory = tap_with_address
    fe, be = h.connect()
    assert h.back_drv.take_tx(be) == [gratuitous_arp("00:16:3e:00:00:01", "192.0.2.7"),
                                     gratuitous_arp("00:16:3e:00:00:01", "198.51.100.1")]
    h.close()


def test_status_file(host):
    fe, be = host.connect()
    host.back_drv.send(be, eth(60))
    host.front_drv.write_all_status()
    status = json.loads((host.status_dir / "0.json").read_text())
    assert status["ifname"] == "eth0" and status["state"] == "Connected" and status["carrier"]
    assert status["rx_packets"] == 1 and status["rx_bytes"] == 60
    assert status["mac"] == "00:16:3e:00:00:01" and status["split_event_channels"]


def test_two_vifs_are_eth0_and_eth1(host):
    fe0, be0 = host.connect(0, "00:16:3e:00:00:01")
    fe1, be1 = host.connect(1, "00:16:3e:00:00:02")
    assert host.taps["eth0"].mac == "00:16:3e:00:00:01" and host.taps["eth1"].mac == "00:16:3e:00:00:02"
    host.back_drv.send(be1, eth(70, seed=1))
    assert host.taps["eth1"].received == [eth(70, seed=1)] and host.taps["eth0"].received == []


# -- closedown, removal, migration ---------------------------------------------------------------
def unplug(host, be):
    host.xs.write(f"{be}/state", str(int(S.Closing)))
    host.recorder.record(be, "backend", S.Connected, S.Closing)
    host.pump()


def test_closedown_backend_first_keeps_the_tap_then_removal_deletes_it(host):
    fe, be = host.connect()
    tap = host.taps["eth0"]
    unplug(host, be)
    assert (host.state(fe), host.state(be)) == (S.Closed, S.Closed)
    assert host.transitions(fe)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]
    assert not tap.closed and tap.carrier is False
    assert host.xen.gnttab.grants == {}  # backend Closed: every grant ended
    assert host.xen.evtchn.ports == {}

    def body(tx):
        host.xs.rm(fe, tx)
        host.xs.rm(be, tx)

    host.xs.run_transaction(body)
    host.pump()
    assert tap.closed
    assert host.front_drv.devices == {}
    assert not (host.status_dir / "0.json").exists()


def test_frames_in_flight_are_drained_on_closing(host):
    fe, be = host.connect()
    tap = host.taps["eth0"]
    vif = host.front_drv.devices[fe]
    tap.inject(eth(500))
    assert until(lambda: vif.engine.inflight() == 1)
    ring = host.back_drv.conns[be]["tx"]
    req = NetifTxRequest.decode(ring.take_request())
    ring.put_response(NetifTxResponse(req.id, NETIF_RSP_OKAY).encode())
    ring.push_responses()  # answered, but no event: the drain takes it itself
    unplug(host, be)
    assert host.state(fe) == S.Closed
    assert vif.engine.counters.tx_packets == 1 and vif.engine.counters.tx_dropped == 0


def test_migration_keeps_the_tap_and_connects_new_rings(host):
    fe, be = host.connect()
    tap = host.taps["eth0"]
    tap.addresses = ["192.0.2.9"]

    # the old backend is gone with its host; the toolstack on the new host
    # writes a fresh backend dir and puts the frontend back to Initialising
    host.back_drv.conns.clear()

    def body(tx):
        host.xs.rm(be, tx)

    host.xs.run_transaction(body)
    host.pump()

    def body(tx):
        host.xs.mkdir(be, tx)
        host.xs.set_perms(be, ["n0", f"r{GUEST}"], tx)
        for k, v in {"frontend": fe, "frontend-id": str(GUEST), "state": "1", "mac": "00:16:3e:00:00:01"}.items():
            host.xs.write(f"{be}/{k}", v, tx)
        host.xs.write(f"{fe}/state", "1", tx)

    host.xs.run_transaction(body)
    host.recorder.record(be, "backend", S.Unknown, S.Initialising)
    host.recorder.record(fe, "frontend", S.Unknown, S.Initialising)
    host.front.resume()
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Connected, S.Connected)
    assert host.taps == {"eth0": tap} and not tap.closed and tap.carrier
    vif = host.front_drv.devices[fe]
    assert vif.connects == 2
    # the gratuitous ARP tells the new host's switch where we are
    assert host.back_drv.take_tx(be) == [gratuitous_arp("00:16:3e:00:00:01", "192.0.2.9")]
    host.back_drv.send(be, eth(80))
    assert tap.received[-1] == eth(80)


# -- reconfiguration while connected, recovery after a backend restart ---------------------------
def test_mtu_changes_live_on_our_own_node_without_a_transition(host):
    fe, be = host.connect()
    tap, vif = host.taps["eth0"], host.front_drv.devices[fe]
    assert tap.mtu == 1500
    before = host.transitions(fe)
    host.xs.write(f"{fe}/mtu", "1400")  # xl network-set writes it (and the backend's)
    host.pump()
    assert tap.mtu == 1400 and vif.mtu == 1400 and vif.mtu_changes == 1
    host.xs.write(f"{fe}/mtu", "1400")  # the same value again: nothing to do
    host.xs.write(f"{fe}/mtu", "junk")  # unreadable: the default applies, as at connect
    host.pump()
    assert tap.mtu == 1500 and vif.mtu_changes == 2
    assert host.transitions(fe) == before and (host.state(fe), host.state(be)) == (S.Connected, S.Connected)
    host.back_drv.send(be, eth(80))  # the rings never stopped
    assert tap.received[-1] == eth(80)


def test_frontend_mtu_node_wins_over_the_backends(tmp_path):
    h = Host(tmp_path, mtu=9000)
    fe, be = h.add()
    h.xs.write(f"{fe}/mtu", "1280")
    h.pump()
    assert h.taps["eth0"].mtu == 1280
    h.close()


def test_backend_restart_keeps_the_tap_and_reconnects_on_new_rings(host):
    fe, be = host.connect()
    tap, vif = host.taps["eth0"], host.front_drv.devices[fe]
    tap.addresses = ["192.0.2.9"]
    old_refs = (host.xs.read(f"{fe}/tx-ring-ref"), host.xs.read(f"{fe}/rx-ring-ref"))
    tap.inject(eth(300))  # in flight when the backend dies: never answered
    assert until(lambda: vif.engine.inflight() == 1)
    # netback (or dom0) was killed: its mappings and bindings went with it;
    # the restarted one recovers the device and says Closed, no Closing first
    host.back_drv.conns.clear()
    host.back.device(be).switch_state(S.Closed)
    host.pump()
    assert host.state(fe) == S.Initialising
    assert host.xen.gnttab.grants == {} and host.xen.evtchn.ports == {}  # old rings, pool and ports freed
    assert host.xen.mem.pages == {}
    assert not tap.closed and tap.carrier is False and host.taps == {"eth0": tap}
    assert vif.engine.counters.tx_dropped == 1 and vif.resets == 1 and vif.leaked_grants == 0
    host.back.device(be).switch_state(S.InitWait)  # its hotplug step ran again
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Connected, S.Connected)
    assert (host.xs.read(f"{fe}/tx-ring-ref"), host.xs.read(f"{fe}/rx-ring-ref")) != old_refs  # new grants
    assert tap.carrier and vif.connects == 2
    # the gratuitous ARP tells the bridge where we are, then traffic flows both ways
    assert host.back_drv.take_tx(be) == [gratuitous_arp("00:16:3e:00:00:01", "192.0.2.9")]
    host.back_drv.send(be, eth(90))
    assert tap.received[-1] == eth(90)
    tap.inject(eth(120, seed=4))
    assert host.back_drv.take_tx(be) == [eth(120, seed=4)]
    assert host.transitions(fe)[-3:] == [(S.Connected, S.Closed), (S.Closed, S.Initialising),
                                         (S.Initialising, S.Connected)]
    assert host.transitions(be)[-3:] == [(S.Connected, S.Closed), (S.Closed, S.InitWait),
                                         (S.InitWait, S.Connected)]


def test_unplug_still_goes_through_closing_and_keeps_closed(host):
    """The reset path is only for Closed-without-Closing: a toolstack unplug
    (backend Closing first) ends Closed, and the frontend stays Closed."""
    fe, be = host.connect()
    unplug(host, be)
    assert (host.state(fe), host.state(be)) == (S.Closed, S.Closed)
    assert host.front_drv.devices[fe].resets == 0
