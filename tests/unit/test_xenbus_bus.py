"""The bus against the real xenstored core, in-process (tests/unit/xenbus_store.py).

A toolstack connection (dom0) creates devices as libxl does: both dirs in
one transaction, the frontend dir owned by the guest and readable by the
backend domain, the backend dir owned by the backend domain and readable by
the guest.  A trivial "dummy" driver pair then walks the seed-000 diagrams.
Every test ends by checking the recorder: no transition outside the table.
"""

from __future__ import annotations

import errno

import pytest

from xenbed.drivers.xenbus import (
    BackendBus,
    FrontendBus,
    TransitionRecorder,
    XenbusDriver,
    XenbusHooks,
    XenbusState as S,
)
from xenbed.drivers.xenbus.client import XenbusFatal, error_path

from xenbed.protocols.xs_wire import Op

from .xenbus_store import StoreHub

GUEST = 1
DRIVER_DOM = 2


# -- the dummy driver pair ----------------------------------------------------------
class DummyBack(XenbusDriver):
    """blkback in a dozen lines: hotplug is instant, so probe goes InitWait."""

    devicetype = "dummy"

    def __init__(self):
        self.calls = []

    def probe(self, dev):
        self.calls.append(("probe", dev.nodename))
        dev.switch_state(S.InitWait)

    def otherend_changed(self, dev, state):
        self.calls.append(("changed", dev.nodename, state))
        match state:
            case S.Initialising if dev.state == S.Closed:
                dev.switch_state(S.InitWait)  # prepare for reconnect
            case S.Initialised | S.Connected if dev.state != S.Connected:
                dev.priv = dev.otherend_read("ring-ref")  # "map the ring"
                dev.write("sectors", "2048")
                dev.switch_state(S.Connected)
            case S.Closing:
                dev.switch_state(S.Closing)
            case S.Closed | S.Unknown:
                dev.switch_state(S.Closed)

    def remove(self, dev):
        self.calls.append(("remove", dev.nodename))
        dev.switch_state(S.Closed)  # as xenbus_dev_remove does: must not resurrect

    def resume(self, dev):
        self.calls.append(("resume", dev.nodename))


class DummyFront(XenbusDriver):
    """blkfront (skip=False: advertise at probe, Initialised) or netfront
    (skip=True: wait for backend InitWait, then straight to Connected)."""

    devicetype = "dummy"

    def __init__(self, skip=False):
        self.skip = skip
        self.calls = []

    def _advertise(self, dev):
        dev.write("ring-ref", "8")
        dev.write("event-channel", "3")

    def probe(self, dev):
        self.calls.append(("probe", dev.nodename))
        if not self.skip:
            self._advertise(dev)
            dev.switch_state(S.Initialised)

    def otherend_changed(self, dev, state):
        self.calls.append(("changed", dev.nodename, state))
        match state:
            case S.InitWait if dev.state == S.Initialising:
                self._advertise(dev)
                dev.switch_state(S.Connected if self.skip else S.Initialised)
            case S.Connected if dev.state == S.Initialised:
                dev.priv = dev.otherend_read("sectors")
                dev.switch_state(S.Connected)
            case S.Closing:
                dev.switch_state(S.Closing)
                dev.switch_state(S.Closed)  # flushed
            case S.Closed if dev.state != S.Closed:
                dev.switch_state(S.Closed)

    def remove(self, dev):
        self.calls.append(("remove", dev.nodename))

    def resume(self, dev):
        self.calls.append(("resume", dev.nodename))
        self._advertise(dev)
        dev.switch_state(S.Initialised)


# -- the toolstack ----------------------------------------------------------------------
def fe_path(devid=0, guest=GUEST):
    return f"/local/domain/{guest}/device/dummy/{devid}"


def be_path(devid=0, guest=GUEST, backend=0):
    return f"/local/domain/{backend}/backend/dummy/{guest}/{devid}"


class Toolstack:
    def __init__(self, xs, recorder):
        self.xs = xs  # a dom0 store client
        self.recorder = recorder

    def make_domain(self, domid):
        """As libxl__domain_make: the domain dir read-only to the guest,
        its device/ and error/ dirs owned by it."""
        dom = f"/local/domain/{domid}"

        def body(tx):
            self.xs.mkdir(dom, tx)
            self.xs.set_perms(dom, ["n0", f"r{domid}"], tx)
            for sub in ("device", "error", "backend"):
                self.xs.mkdir(f"{dom}/{sub}", tx)
                self.xs.set_perms(f"{dom}/{sub}", [f"n{domid}"], tx)

        self.xs.run_transaction(body)

    def add(self, devid=0, guest=GUEST, backend=0, *, state=S.Initialising, with_backend_key=True):
        fe, be = fe_path(devid, guest), be_path(devid, guest, backend)

        def body(tx):
            self.xs.mkdir(fe, tx)
            self.xs.set_perms(fe, [f"n{guest}", f"r{backend}"], tx)
            self.xs.mkdir(be, tx)
            self.xs.set_perms(be, [f"n{backend}", f"r{guest}"], tx)
            if with_backend_key:
                self.xs.write(f"{fe}/backend", be, tx)
            self.xs.write(f"{fe}/backend-id", str(backend), tx)
            self.xs.write(f"{fe}/state", str(int(state)), tx)
            self.xs.write(f"{be}/frontend", fe, tx)
            self.xs.write(f"{be}/frontend-id", str(guest), tx)
            self.xs.write(f"{be}/state", str(int(state)), tx)

        self.xs.run_transaction(body)
        if state == S.Initialising:  # other states: deliberately odd set-ups, not transitions
            self.recorder.record(fe, "frontend", S.Unknown, state)
            self.recorder.record(be, "backend", S.Unknown, state)
        return fe, be

    def unplug(self, be):
        """libxl's device remove: backend state Closing (recorded, it is a transition)."""
        old = S.parse(self.xs.read(f"{be}/state"))
        self.xs.write(f"{be}/state", str(int(S.Closing)))
        self.recorder.record(be, "backend", old, S.Closing)

    def destroy(self, *paths):
        def body(tx):
            for p in paths:
                self.xs.rm(p, tx)

        self.xs.run_transaction(body)


class Host:
    def __init__(self, *, skip=False, backend=0):
        self.hub = StoreHub()
        self.recorder = TransitionRecorder()
        self.tools = Toolstack(self.hub.connect(0), self.recorder)
        self.tools.make_domain(GUEST)
        if backend:
            self.tools.make_domain(backend)
        self.guest_xs = self.hub.connect(GUEST)
        self.back_xs = self.hub.connect(backend)
        self.front_drv, self.back_drv = DummyFront(skip), DummyBack()
        self.front = FrontendBus(self.guest_xs, GUEST, [self.front_drv], recorder=self.recorder).start()
        self.back = BackendBus(self.back_xs, backend, [self.back_drv], recorder=self.recorder).start()
        self.backend = backend
        self.pump()

    def pump(self):
        return self.hub.pump()

    def state(self, path):
        return S.parse(self.tools.xs.try_read(f"{path}/state"))

    def transitions(self, path):
        return [(t.old, t.new) for t in self.recorder.for_path(path)]


@pytest.fixture
def host():
    h = Host()
    yield h
    assert h.recorder.check() == []


def connect(host, devid=0):
    fe, be = host.tools.add(devid, backend=host.backend)
    host.pump()
    return fe, be


# -- initialisation ---------------------------------------------------------------------
def test_init_blkfront_style(host):
    fe, be = connect(host)
    assert (host.state(fe), host.state(be)) == (S.Connected, S.Connected)
    assert host.transitions(be) == [(S.Unknown, S.Initialising), (S.Initialising, S.InitWait),
                                    (S.InitWait, S.Connected)]
    assert host.transitions(fe) == [(S.Unknown, S.Initialising), (S.Initialising, S.Initialised),
                                    (S.Initialised, S.Connected)]
    fdev, bdev = host.front.device(fe), host.back.device(be)
    assert (fdev.otherend, fdev.otherend_id, bdev.otherend, bdev.otherend_id) == (be, 0, fe, GUEST)
    assert (fdev.devicetype, fdev.state, bdev.state) == ("dummy", S.Connected, S.Connected)
    assert bdev.priv == "8" and fdev.priv == "2048"  # each read what the other advertised
    assert host.back_drv.calls[0] == ("probe", be) and host.front_drv.calls[0] == ("probe", fe)


def test_init_netfront_skips_to_connected():
    h = Host(skip=True)
    fe, be = connect(h)
    assert (h.state(fe), h.state(be)) == (S.Connected, S.Connected)
    assert h.transitions(fe)[1:] == [(S.Initialising, S.Connected)]
    assert h.recorder.check() == []


def test_driver_domain_backend_with_libxl_permissions():
    # An unprivileged backend domain: it can only do its job through the ACLs.
    h = Host(backend=DRIVER_DOM)
    fe, be = connect(h)
    assert (h.state(fe), h.state(be)) == (S.Connected, S.Connected)
    assert h.back.device(be).otherend_id == GUEST
    assert h.recorder.check() == []


def test_devices_present_before_the_bus_starts_are_probed_in_order():
    hub = StoreHub()
    rec = TransitionRecorder()
    tools = Toolstack(hub.connect(0), rec)
    tools.make_domain(GUEST)
    for devid in (10, 2, 1):
        tools.add(devid)
    hub.pump()
    drv = DummyBack()
    BackendBus(hub.connect(0), 0, [drv], recorder=rec).start()
    hub.pump()
    assert [c for c in drv.calls if c[0] == "probe"] == [("probe", be_path(d)) for d in (1, 2, 10)]


def test_device_not_in_initialising_is_not_probed(host):
    fe, be = host.tools.add(state=S.Closed)
    host.pump()
    assert host.front.device(fe) is None and host.back.device(be) is None
    assert host.front_drv.calls == [] and host.back_drv.calls == []


def test_missing_other_end_is_dev_fatal_and_no_probe(host):
    fe, be = host.tools.add(with_backend_key=False)
    host.pump()
    assert host.front_drv.calls == []
    assert host.state(fe) == S.Closing
    err = host.tools.xs.read(f"/local/domain/{GUEST}/error/device/dummy/0/error")
    assert err.startswith(f"{errno.ENOENT} unable to read other end from {fe}")


# -- closedown ---------------------------------------------------------------------------
def test_closedown_backend_first(host):
    fe, be = connect(host)
    host.tools.unplug(be)  # seed: "Written by control tools"
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Closed, S.Closed)
    assert host.transitions(fe)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]
    # The backend's own switch to Closing found the tools' Closing: no write.
    assert host.transitions(be)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]
    host.tools.destroy(fe, be)  # "remove store directories"
    host.pump()
    assert ("remove", be) in host.back_drv.calls and ("remove", fe) in host.front_drv.calls
    assert host.front.devices == {} and host.back.devices == {}
    assert not host.tools.xs.exists(fe) and not host.tools.xs.exists(be)


def test_closedown_frontend_first(host):
    fe, be = connect(host)
    host.front.device(fe).switch_state(S.Closing)  # seed: "Written by frontend on error"
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Closed, S.Closed)
    assert host.transitions(be)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]
    assert host.transitions(fe)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]


def test_reconnect_after_closed(host):
    fe, be = connect(host)
    host.front.device(fe).switch_state(S.Closing)
    host.pump()
    fdev = host.front.device(fe)
    fdev.switch_state(S.Initialising)  # xenbus_reset_frontend: Closed -> Initialising
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Connected, S.Connected)
    assert host.transitions(be)[-2:] == [(S.Closed, S.InitWait), (S.InitWait, S.Connected)]


def test_resume_talks_to_the_new_backend():
    h = Host(backend=DRIVER_DOM)
    fe, old_be = connect(h)
    # Migration: the toolstack on the new host makes a new backend and a
    # fresh frontend dir pointing at it, in state Initialising.
    new_be = be_path(0, GUEST, 0)
    tools = h.tools.xs

    def body(tx):
        tools.rm(old_be, tx)
        tools.mkdir(new_be, tx)
        tools.set_perms(new_be, ["n0", f"r{GUEST}"], tx)
        tools.write(f"{new_be}/frontend", fe, tx)
        tools.write(f"{new_be}/frontend-id", str(GUEST), tx)
        tools.write(f"{new_be}/state", "1", tx)
        tools.write(f"{fe}/backend", new_be, tx)
        tools.write(f"{fe}/backend-id", "0", tx)
        tools.write(f"{fe}/state", "1", tx)

    tools.run_transaction(body)
    back0 = DummyBack()
    BackendBus(h.hub.connect(0), 0, [back0], recorder=h.recorder).start()
    h.front.resume()
    h.pump()
    fdev = h.front.device(fe)
    assert (fdev.otherend, fdev.otherend_id) == (new_be, 0)
    assert ("resume", fe) in h.front_drv.calls
    assert (h.state(fe), h.state(new_be)) == (S.Connected, S.Connected)
    assert h.recorder.check() == []


# -- switch_state -------------------------------------------------------------------------
def test_switch_state_is_idempotent(host):
    fe, be = connect(host)
    fdev = host.front.device(fe)
    before = len(host.guest_xs.requests)
    assert fdev.switch_state(S.Connected) is False
    assert len(host.guest_xs.requests) == before  # not even a transaction


def test_switch_state_does_not_rewrite_what_the_store_already_holds(host):
    fe, be = connect(host)
    host.tools.unplug(be)  # the tools wrote Closing on the backend's node
    bdev = host.back.device(be)
    before = len(host.back_xs.requests)
    assert bdev.switch_state(S.Closing) is False  # no write, so no watch fires
    assert bdev.state == S.Closing
    assert not any(p.op == Op.WRITE for p in host.back_xs.requests[before:])
    host.pump()
    assert host.transitions(be)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]


def test_switch_state_never_resurrects_a_removed_device(host):
    fe, be = connect(host)
    fdev, bdev = host.front.device(fe), host.back.device(be)
    host.tools.destroy(fe, be)
    assert fdev.switch_state(S.Closing) is False
    assert not host.tools.xs.exists(fe)
    n = len(host.recorder)
    host.pump()  # remove() runs; DummyBack.remove switches to Closed: nothing written
    assert ("remove", be) in host.back_drv.calls and bdev.removed
    assert not host.tools.xs.exists(be) and len(host.recorder) == n


def test_switch_state_retries_on_conflict(host):
    fe, be = connect(host)
    bdev = host.back.device(be)
    xs = host.back_xs
    real = xs.run_transaction
    conflicts = []

    def racing(body, attempts=32):
        def once(tx):
            if not conflicts:  # someone else writes the node mid-transaction
                conflicts.append(1)
                host.tools.xs.write(f"{be}/state", "4")
            return body(tx)
        return real(once, attempts)

    xs.run_transaction = racing
    assert bdev.switch_state(S.Closing) is True
    assert host.state(be) == S.Closing and conflicts == [1]
    host.pump()


def test_forbidden_transition_is_recorded_and_flagged(host):
    fe, be = connect(host)
    host.back.device(be).switch_state(S.InitWait)  # Connected -> InitWait: not in the table
    v = host.recorder.check()
    assert len(v) == 1 and (v[0].transition.old, v[0].transition.new) == (S.Connected, S.InitWait)
    host.recorder.transitions.remove(v[0].transition)  # let the fixture's check pass


# -- errors ---------------------------------------------------------------------------------
def test_dev_fatal_writes_the_error_node_and_closes(host):
    fe, be = connect(host)
    fdev = host.front.device(fe)
    fdev.dev_fatal(-errno.ENOMEM, "allocating ring")
    assert fdev.error_path == f"/local/domain/{GUEST}/error/device/dummy/0/error"
    assert host.tools.xs.read(fdev.error_path) == f"{errno.ENOMEM} allocating ring"
    assert host.state(fe) == S.Closing
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Closed, S.Closed)
    bdev = host.back.device(be)
    bdev.dev_fatal("EIO", "backend trouble")  # a Closed device stays Closed
    assert host.tools.xs.read("/local/domain/0/error/backend/dummy/1/0/error") == f"{errno.EIO} backend trouble"
    assert host.state(be) == S.Closed


def test_backend_dev_fatal_closes_both_ends(host):
    fe, be = connect(host)
    host.back.device(be).dev_fatal(errno.EIO, "physical device vanished")
    host.pump()
    assert (host.state(fe), host.state(be)) == (S.Closed, S.Closed)
    assert host.transitions(be)[-2:] == [(S.Connected, S.Closing), (S.Closing, S.Closed)]


def test_error_path_is_relative_to_the_domain():
    assert error_path("/local/domain/1", "/local/domain/1/device/vbd/51712") == \
        "/local/domain/1/error/device/vbd/51712/error"


def test_a_driver_that_raises_is_dev_fatal_not_a_dead_watch_thread(host):
    class Broken(DummyBack):
        def otherend_changed(self, dev, state):
            if state == S.Initialised:
                raise ValueError("bug")
            super().otherend_changed(dev, state)

    h = Host()
    h.back.close()
    BackendBus(h.back_xs, 0, [Broken()], recorder=h.recorder).start()
    fe, be = connect(h)
    assert h.state(be) in (S.Closing, S.Closed)
    assert "otherend_changed Initialised" in h.tools.xs.read("/local/domain/0/error/backend/dummy/1/0/error")
    assert h.recorder.check() == []


def test_grant_and_evtchn_hooks(host):
    calls = []
    hooks = XenbusHooks(grant_access=lambda d, f, ro: calls.append((d, f, ro)) or 100 + f,
                        alloc_unbound=lambda d: 7)
    h = Host()
    h.front.hooks = hooks
    fe, be = connect(h)
    fdev = h.front.device(fe)
    assert fdev.grant_ring([1, 2]) == [101, 102] and calls == [(0, 1, False), (0, 2, False)]
    assert fdev.alloc_evtchn() == 7

    def no_memory(d):
        raise OSError(errno.ENOSPC, "no free port")

    h.front.hooks = XenbusHooks(alloc_unbound=no_memory)
    with pytest.raises(XenbusFatal):
        fdev.alloc_evtchn()
    assert h.tools.xs.read(fdev.error_path) == f"{errno.ENOSPC} allocating event channel"
    assert h.state(fe) == S.Closing


# -- stale and duplicate watch events ---------------------------------------------------------
def test_duplicate_and_stale_watch_events_do_not_repeat_callbacks(host):
    fe, be = connect(host)
    fdev, bdev = host.front.device(fe), host.back.device(be)
    before = (list(host.front_drv.calls), list(host.back_drv.calls))
    # The same event again, many times, on both watches of each end.
    for _ in range(3):
        host.guest_xs.deliver(f"{be}/state", fdev._token)
        host.back_xs.deliver(f"{fe}/state", bdev._token)
        host.guest_xs.deliver(f"/local/domain/{GUEST}/device/dummy", f"xenbus-frontend:{host.front.base}/dummy")
        host.guest_xs.deliver(fe, f"xenbus-frontend:{host.front.base}/dummy")
    # A rewrite of the same value fires a real watch event: state unchanged, filtered.
    host.tools.xs.write(f"{be}/state", str(int(S.Connected)))
    # An event for a path that is not the other end (stale details) is
    # ignored, even while the other end's state has changed.
    host.tools.xs.write(f"{be}/state", str(int(S.Closing)))
    host.guest_xs.deliver("/local/domain/0/backend/dummy/1/99/state", fdev._token)
    assert host.front_drv.calls == before[0]
    host.tools.xs.write(f"{be}/state", str(int(S.Connected)))  # coalesces: no change seen
    # An event for a token whose watch was dropped is ignored.
    host.guest_xs.deliver(f"{be}/state", "xenbus-otherend:999:nothing")
    host.pump()
    assert (host.front_drv.calls, host.back_drv.calls) == before


def test_events_queued_for_a_removed_device_are_ignored(host):
    fe, be = connect(host)
    bdev = host.back.device(be)
    token = bdev._token
    host.tools.xs.write(f"{fe}/state", str(int(S.Closing)))  # queued, not delivered yet
    host.tools.destroy(fe, be)
    host.pump()
    assert host.back_drv.calls[-1] == ("remove", be)
    assert not any(c[0] == "changed" and c[2] == S.Closing for c in host.back_drv.calls)
    host.back_xs.deliver(f"{fe}/state", token)  # late delivery after unwatch
    assert host.back_drv.calls[-1] == ("remove", be)
    host.recorder.transitions.clear()  # the tools' raw write above is not a driver transition


def test_backend_learns_the_frontend_vanished(host):
    fe, be = connect(host)
    host.tools.destroy(fe)  # only the frontend dir: backend sees Unknown
    host.pump()
    assert ("changed", be, S.Unknown) in host.back_drv.calls
    assert host.state(be) == S.Closed
    assert host.transitions(be)[-1] == (S.Connected, S.Closed)


def test_several_devices_are_independent(host):
    devs = [connect(host, devid) for devid in (0, 1, 2)]
    host.front.device(devs[1][0]).switch_state(S.Closing)
    host.pump()
    assert [host.state(be) for _, be in devs] == [S.Connected, S.Closed, S.Connected]


def test_close_stops_the_bus(host):
    fe, be = connect(host)
    host.back.close()
    host.tools.destroy(fe, be)
    host.pump()
    assert ("remove", be) not in host.back_drv.calls
    assert host.back.devices == {}


# -- with the real client: sockets, reader and xenwatch threads ------------------------------
def test_init_and_closedown_with_the_real_threaded_client(tmp_path):
    import time

    from xenbed.drivers.xen.store import XenStoreClient

    from .xenbus_store import SocketStoreServer

    server = SocketStoreServer(str(tmp_path))
    paths = {d: server.listen(d) for d in (0, GUEST)}
    clients = []

    def client(domid):
        clients.append(XenStoreClient(paths[domid], timeout=5))
        return clients[-1]

    try:
        rec = TransitionRecorder(tmp_path / "transitions.jsonl")
        tools = Toolstack(client(0), rec)
        tools.make_domain(GUEST)
        front_drv, back_drv = DummyFront(), DummyBack()
        FrontendBus(client(GUEST), GUEST, [front_drv], recorder=rec).start()
        BackendBus(client(0), 0, [back_drv], recorder=rec).start()
        fe, be = tools.add()

        def wait_for(fe_state, be_state):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                got = (S.parse(tools.xs.try_read(f"{fe}/state")), S.parse(tools.xs.try_read(f"{be}/state")))
                if got == (fe_state, be_state):
                    return
                time.sleep(0.01)
            raise AssertionError(f"stuck at {got}")

        wait_for(S.Connected, S.Connected)
        tools.unplug(be)
        wait_for(S.Closed, S.Closed)
        tools.destroy(fe, be)
        deadline = time.monotonic() + 5
        while ("remove", be) not in back_drv.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("remove", be) in back_drv.calls
        assert not tools.xs.exists(be)
        from xenbed.protocols.xenbus_state import load_jsonl, violations

        assert violations(load_jsonl(tmp_path / "transitions.jsonl")) == []
        assert len(load_jsonl(tmp_path / "transitions.jsonl")) == len(rec) >= 8
    finally:
        for c in clients:
            c.close()
        server.close()


# -- watch events admitted on arrival (XSA-349) --------------------------------------------
def test_otherend_watch_wants_only_the_exact_state_path():
    host = Host()
    fe, _be = host.tools.add()
    host.pump()
    watchers = [w for (path, _t), w in host.back_xs._watches.items() if path == f"{fe}/state"]
    assert len(watchers) == 1  # the backend watches the frontend's state...
    wanted = watchers[0]
    assert wanted.will_handle(f"{fe}/state", "t")  # ...that exact path
    assert not wanted.will_handle(f"{fe}/state/x", "t")  # not what the guest writes below it
    assert wanted.max_pending == 1  # one waiting event is enough: handling re-reads the state


def test_store_client_discards_unwanted_and_excess_events_before_queueing(tmp_path):
    import threading
    import time

    from xenbed.drivers.xen.store import XenStoreClient

    from .test_blkback_support import InProcessXenstored

    daemon = InProcessXenstored(str(tmp_path / "xs.sock"))
    watcher, writer = XenStoreClient(daemon.path), XenStoreClient(daemon.path)
    state = "/local/domain/1/device/vbd/51712/state"
    busy, seen = threading.Event(), []

    def handle(path, token):
        seen.append((token, path))
        busy.wait(10)  # the xenwatch thread is busy while the flood arrives

    watcher.watch(state, "otherend", handle, will_handle=lambda path, _t: path == state, max_pending=1)
    watcher.watch("/local/domain/1/flood", "plain", lambda path, token: seen.append((token, path)),
                  max_pending=5)
    for i in range(200):
        writer.write(f"{state}/x", str(i))  # below the watched path: refused on arrival
        writer.write(state, str(i % 7))  # the path itself: one event waits, the rest are excess
        writer.write(f"/local/domain/1/flood/{i}", "")  # a plain watch: 5 wait (its first event is one)
    writer.read(state)  # every event was sent before this reply
    deadline = time.monotonic() + 5
    while watcher.discarded_events < 200 + 199 + 196 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watcher._events.qsize() <= 1 + 5  # the xenwatch queue stayed bounded
    assert watcher.discarded_events == 200 + 199 + 196  # everything else was counted and dropped
    busy.set()
    deadline = time.monotonic() + 5
    while len(seen) < 1 + 1 + 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [t for t, _ in seen].count("otherend") == 2  # the first event, then one of the flood
    assert [t for t, _ in seen].count("plain") == 5
    watcher.close()
    writer.close()
    daemon.close()
