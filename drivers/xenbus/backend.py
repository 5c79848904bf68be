"""What every backend driver does the same way (Linux: the common half of
xen-blkback/xenbus.c and xen-netback/xenbus.c), so blkback and netback
keep only what is theirs.

`BackendDriver` is a `XenbusDriver` that owns, for each device it serves:

* the registry (`connection(nodename)` for the daemon and the tests) and a
  per-device `BackendInfo` in `dev.priv` whose lock every callback holds;
* watches on the device's own backend nodes, declared by the driver in
  `own_watches` and dropped when the device goes (remove, shutdown);
* the frontend's state machine (seed 000's backend column):

      frontend            backend does
      Initialising        after Closed: `reconnect` (InitWait again)
      Initialised/        `reconnect` first if Closed, then `connect`
        Connected           (nothing if already Connected)
      Closing             `disconnect`, Closing
      Closed/Unknown      `disconnect`, Closed; unplugged (online=0) or the
                          frontend dir gone: `unplugged`

* the toolstack's Closing request (it writes Closing on our `state` with
  `online`=0): we are Closing; a frontend already Closed is not going to
  follow, so we go Closed at once;
* recovery after a backend restart: `lost_connection` says Closed to a
  frontend still on the old process's rings, and its stale Initialised /
  Connected are ignored until it shows it reset (Closing, Closed or
  Initialising) -- it cannot reach Initialised with new rings before we
  are back in InitWait;
* a fatal error on the ring thread (`fatal_from_ring`): torn down from
  another thread, since the ring thread cannot join itself;
* the hotplug step, when this process runs it itself (a driver domain, or
  `--run-hotplug`): `hotplug("add" | "remove", dev)` with its failure
  logged, and `hotplug_ran` remembered;
* SIGTERM (`shutdown`): every device torn down, states left as they are.

A driver supplies `setup(dev)` (probe's own work, before InitWait),
`recover_device(dev, stale)`, `connect(dev)`, `close_resource(dev)` (the
disk or tap), `release(dev)` (all of it, at remove), `hotplug_step(action,
dev)`, and may override `reconnect`, `unplugged`.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from xenbed.protocols.xenbus_state import XenbusState

from .client import XenbusDevice, XenbusDriver

log = logging.getLogger("xenbed.xenbus.backend")

S = XenbusState


@dataclass(eq=False)
class BackendInfo:
    """A backend's private data for one device (Linux's struct backend_info),
    in dev.priv.  Drivers subclass it for their own resources."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    frontend_state: XenbusState = XenbusState.Unknown
    connection: object | None = None  # the driver's live connection (rings, ports, thread)
    watches: list[tuple[str, str]] = field(default_factory=list)  # (path, token)
    hotplug_ran: bool = False
    # We told the frontend we lost the connection (Closed): its Initialised
    # or Connected describe the old process's rings until it resets.
    awaiting_frontend_reset: bool = False


class BackendDriver(XenbusDriver):
    """The skeleton described in the module docstring."""

    recovers = True
    name = "backend"  # in log lines, watch tokens and thread names
    info_class: type[BackendInfo] = BackendInfo
    # (key under the backend dir, method name called with dev): watched from probe to remove
    own_watches: tuple[tuple[str, str], ...] = ()

    def __init__(self, *, run_hotplug: bool = False) -> None:
        self.run_hotplug = run_hotplug
        self._devices: dict[str, XenbusDevice] = {}
        self._lock = threading.Lock()
        self.log = logging.getLogger(f"xenbed.{self.name}")

    # -- what a driver supplies ---------------------------------------------------------
    def setup(self, dev: XenbusDevice) -> bool:
        """probe's own work before InitWait (features, a tap...); False when
        it reported a fatal error and the device stays unbound."""
        return True

    def recover_device(self, dev: XenbusDevice, stale: XenbusState) -> bool:
        """recover's own work (see the module docstring); False as for setup."""
        return True

    def connect(self, dev: XenbusDevice) -> None:
        """The frontend is Initialised or Connected and we are InitWait."""

    def reconnect(self, dev: XenbusDevice) -> None:
        """The frontend starts again after we closed (reset, migration)."""
        dev.switch_state(S.InitWait)

    def close_resource(self, dev: XenbusDevice) -> None:
        """Close what the device is served from (the disk, the tap)."""

    def release(self, dev: XenbusDevice) -> None:
        """The device dir is gone: close the resource and undo the hotplug
        step if this process ran it."""
        self.close_resource(dev)

    def unplugged(self, dev: XenbusDevice) -> None:
        """The toolstack unplugged the device (Closed with online=0): release
        what it needs back before it removes the dirs."""
        self.close_resource(dev)

    def hotplug_step(self, action: str, dev: XenbusDevice) -> None:
        raise NotImplementedError

    # -- XenbusDriver ---------------------------------------------------------------------
    def probe(self, dev: XenbusDevice) -> None:
        be = self._register(dev)
        with be.lock:
            if not self.setup(dev):
                return
            dev.switch_state(S.InitWait)
            if self.run_hotplug:
                self.hotplug("add", dev)
        self._watch_own_nodes(dev)
        self.log.info("%s: probed (frontend %s)", dev.nodename, dev.otherend)

    def recover(self, dev: XenbusDevice) -> bool | None:
        stale = dev.state
        be = self._register(dev)
        with be.lock:
            if not self.recover_device(dev, stale):
                return None
        self._watch_own_nodes(dev)
        self.log.info("%s: recovering from %s (frontend %s)", dev.nodename, S(stale).name, dev.otherend)
        return None

    def lost_connection(self, dev: XenbusDevice, stale: XenbusState) -> None:
        """recover: a device left past InitWait by the old process goes
        Closed, and the frontend's stale states are ignored until it resets."""
        if stale != S.InitWait:
            dev.priv.awaiting_frontend_reset = True
            dev.switch_state(S.Closed)

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        be: BackendInfo | None = dev.priv
        if be is None:
            return
        with be.lock:
            be.frontend_state = state
            self.log.info("%s: frontend is %s (we are %s)", dev.nodename, S(state).name, S(dev.state).name)
            if be.awaiting_frontend_reset:
                if state in (S.Initialised, S.Connected):
                    self.log.info("%s: frontend still %s on the old rings; waiting for it to reset",
                                  dev.nodename, S(state).name)
                    return
                be.awaiting_frontend_reset = False
            if state == S.Initialising:
                if dev.state == S.Closed:
                    self.log.info("%s: prepare for reconnect", dev.nodename)
                    self.reconnect(dev)
            elif state in (S.Initialised, S.Connected):
                if dev.state == S.Connected:
                    return  # two watches in quick succession: already connected
                if dev.state == S.Closed:
                    self.reconnect(dev)
                self.connect(dev)
            elif state == S.Closing:
                self.disconnect(dev)
                if dev.state != S.Closed:
                    dev.switch_state(S.Closing)
            elif state in (S.Closed, S.Unknown):
                self.disconnect(dev)
                dev.switch_state(S.Closed)
                if state == S.Unknown or dev.read("online") == "0":
                    self.unplugged(dev)

    def remove(self, dev: XenbusDevice) -> None:
        be: BackendInfo | None = dev.priv
        if be is None:
            return
        with be.lock:
            self.drop_watches(dev)
            self.disconnect(dev)
            self.release(dev)
        with self._lock:
            self._devices.pop(dev.nodename, None)
        self.log.info("%s: removed", dev.nodename)

    def shutdown(self) -> None:
        """SIGTERM: tear every device down (rings, ports, disks or taps);
        states are left as they are for the next backend to recover."""
        with self._lock:
            devices = list(self._devices.values())
        for dev in devices:
            with dev.priv.lock:
                self.drop_watches(dev)
                self.disconnect(dev)
                self.close_resource(dev)

    # -- the registry -----------------------------------------------------------------------
    def _register(self, dev: XenbusDevice) -> BackendInfo:
        be = dev.priv = self.info_class()
        with self._lock:
            self._devices[dev.nodename] = dev
        return be

    def connection(self, nodename: str):
        dev = self._devices.get(nodename)
        return dev.priv.connection if dev is not None and dev.priv is not None else None

    def info(self, nodename: str) -> BackendInfo | None:
        dev = self._devices.get(nodename)
        return dev.priv if dev is not None else None

    # -- watches owned by the device ------------------------------------------------------------
    def _watch_own_nodes(self, dev: XenbusDevice) -> None:
        """Each watch fires once at once, as Xen watches do: a node written
        before we watched it is handled then."""
        for key, method in self.own_watches:
            callback: Callable[[XenbusDevice], None] = getattr(self, method)
            path, token = f"{dev.nodename}/{key}", f"{self.name}:{key}:{dev.nodename}"
            dev.store.watch(path, token, lambda _p, _t, cb=callback: cb(dev))
            dev.priv.watches.append((path, token))

    def drop_watches(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        watches, be.watches = be.watches, []
        for path, token in watches:
            try:
                dev.store.unwatch(path, token)
            except Exception as exc:
                self.log.debug("%s: unwatch %s: %s", dev.nodename, path, exc)

    def own_state_changed(self, dev: XenbusDevice) -> None:
        """The toolstack wrote Closing on our node: the frontend is asked to
        close (it sees our Closing) and we follow it to Closed.  If it is
        already gone or closed, nothing will follow: go Closed now."""
        be: BackendInfo = dev.priv
        with be.lock:
            if dev.removed:
                return
            state = XenbusState.parse(dev.read("state"))
            if state != S.Closing or dev.state in (S.Closing, S.Closed):
                return
            self.log.info("%s: the toolstack asked to close", dev.nodename)
            dev.state = S.Closing  # as written by the toolstack; the frontend follows
            if be.frontend_state in (S.Closed, S.Unknown):
                self.disconnect(dev)
                dev.switch_state(S.Closed)
                if dev.read("online") == "0":
                    self.unplugged(dev)

    # -- connection ---------------------------------------------------------------------------
    def disconnect(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        conn, be.connection = be.connection, None
        if conn is not None:
            stats = dict(conn.server.stats) if conn.server else {}
            conn.close()
            self.log.info("%s: disconnected (%s)", dev.nodename, stats)

    def fatal_from_ring(self, dev: XenbusDevice, err: int, message: str) -> None:
        """The ring thread found the frontend broken: disconnect and report.
        Runs the teardown on a thread of its own (the connection's close
        joins the ring thread, which cannot join itself)."""
        def fatal() -> None:
            with dev.priv.lock:
                self.disconnect(dev)
                dev.dev_fatal(err, message)
        threading.Thread(target=fatal, name=f"{self.name}-fatal", daemon=True).start()

    # -- the hotplug step --------------------------------------------------------------------
    def hotplug(self, action: str, dev: XenbusDevice) -> None:
        try:
            self.hotplug_step(action, dev)
            if action == "add":
                dev.priv.hotplug_ran = True
        except Exception as exc:
            self.log.error("%s: hotplug %s failed: %s", dev.nodename, action, exc)

    def write_features(self, dev: XenbusDevice, features: dict[str, str]) -> None:
        """Advertise `features` in one transaction."""
        def body(tx: int) -> None:
            for key, value in features.items():
                dev.write(key, value, tx)

        dev.store.run_transaction(body)


def run_ring_thread(name: str, stop: threading.Event, on_fatal: Callable[[int, str], None],
                    serve: Callable[[], None], protocol_errors: tuple[type[BaseException], ...]) -> None:
    """The body of a backend's ring thread: `serve()` until it returns.  A
    frontend that broke the ring protocol (`protocol_errors`: an overflowed
    ring, a malicious tx chain) is fatal with EPROTO; any other failure,
    unless we are stopping anyway, with EIO.  Either way `on_fatal` tears the
    device down from another thread (BackendDriver.fatal_from_ring)."""
    try:
        serve()
    except protocol_errors as exc:
        log.error("%s: the frontend broke the ring protocol: %s", name, exc)
        on_fatal(errno.EPROTO, f"ring protocol: {exc}")
    except Exception as exc:
        if not stop.is_set():
            log.exception("%s: ring thread failed", name)
            on_fatal(errno.EIO, f"ring thread failed: {exc}")
