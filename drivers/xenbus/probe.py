"""The bus: device discovery and lifecycle (Linux's xenbus_probe*.c).

A bus watches `<domain>/<root>/<type>` for each driver's device type
(frontend: root `device`, devices at `device/<type>/<devid>`; backend: root
`backend`, devices at `backend/<type>/<frontend-domid>/<devid>`).  For every
watch event it does what xenbus_dev_changed() does:

* the event path is gone: every device at or under it is removed
  (driver.remove), its other-end watch dropped;
* it names (something inside) a device dir not yet known: the device is
  probed if its own `state` reads Initialising (anything else is a device
  going away or one this bus already gave up on); probing reads the other
  end's path and domid (`backend`/`backend-id` for a frontend,
  `frontend`/`frontend-id` for a backend; missing or unreadable is
  dev_fatal), calls driver.probe, then watches `<otherend>/state`;
* a backend bus (`recovers`) also binds a device dir it does not know whose
  state says an earlier backend was serving it (InitWait, Initialised,
  Connected, Reconfiguring, Reconfigured, or Closed while `online` is 1):
  this process is a restarted backend (dom0 or the driver process was
  killed, perhaps in the middle of an earlier recovery).  driver.recover(dev) is
  called with `dev.state` = that stale state; the driver re-does its
  hotplug work and resets the connection (docs/xenbus.md, "Recovery").
* it names a level above the devices (the type dir itself, which fires
  when the watch is registered, or `backend/<type>/<domid>`): the devices
  under it are enumerated and new ones probed.

Other-end watch events are filtered twice.  On arrival (the store client,
as Linux since XSA-349): the watch on `<otherend>/state` admits only events
for that exact path -- the other end writing `state/x` a thousand times a
second queues nothing -- and at most one waiting event, since handling one
re-reads the state anyway.  Then before reaching the driver: events
for a device already removed or for a path outside the current other end
(stale after a resume) are ignored, as in Linux; then the state is re-read
and delivered only if it differs from the last one delivered, so duplicate
and coalesced events never produce duplicate callbacks.

Threading: watch callbacks come from the store client's single xenwatch
thread; driver callbacks run there and no bus lock is held while they run.
A driver callback that raises is logged and turned into dev_fatal.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable

from xenbed.drivers.xen.store import StoreClosed, XenStoreError
from xenbed.protocols.xenbus_state import Role, TransitionRecorder, XenbusState

from .client import XenbusDevice, XenbusDriver, XenbusFatal, XenbusHooks, dev_fatal

log = logging.getLogger("xenbed.xenbus")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


class XenBus:
    """Shared machinery; use FrontendBus or BackendBus."""

    role: Role
    recovers: bool = False  # binds devices left by an earlier backend (see driver.recover)
    root: str  # "device" or "backend"
    levels: int  # path components below root that name a device
    otherend_keys: tuple[str, str]  # (id key, path key)

    def __init__(self, store, domid: int, drivers: Iterable[XenbusDriver], *,
                 recorder: TransitionRecorder | None = None, hooks: XenbusHooks | None = None,
                 domain_path: str | None = None) -> None:
        self.store = store
        self.domid = domid
        self.domain_path = (domain_path or f"/local/domain/{domid}").rstrip("/")
        self.drivers: dict[str, XenbusDriver] = {}
        for d in drivers:
            if not d.devicetype or "/" in d.devicetype:
                raise ValueError(f"driver {d!r} needs a devicetype like 'vbd'")
            if d.devicetype in self.drivers:
                raise ValueError(f"two drivers for device type {d.devicetype!r}")
            self.drivers[d.devicetype] = d
        self.recorder = recorder if recorder is not None else TransitionRecorder()
        self.hooks = hooks or XenbusHooks()
        self.devices: dict[str, XenbusDevice] = {}
        self._by_token: dict[str, XenbusDevice] = {}
        self._bus_watches: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._closed = False
        self.base = f"{self.domain_path}/{self.root}"
        # Every watch callback runs holding this (Linux's xenwatch_mutex), so
        # suspend() waits for the one running; from suspend() until resume()
        # or resume_cancelled() events are held in `_held` instead of
        # handled (Linux: xs_suspend takes xs_watch_rwsem), and handled
        # after, in order, before any newer one.
        self._watch_mutex = threading.Lock()
        self.frozen = False
        self._held: list[tuple] = []

    # -- life of the bus -------------------------------------------------------------
    def start(self) -> XenBus:
        for devicetype in self.drivers:
            path = f"{self.base}/{devicetype}"
            token = f"xenbus-{self.role.value}:{path}"
            self.store.watch(path, token, self._bus_event)
            self._bus_watches.append((path, token))
        return self

    def close(self) -> None:
        """Stop watching; devices are forgotten without callbacks (the
        domain is going away, as opposed to its devices).  Events already
        queued on the watch thread are dropped."""
        self._closed = True
        watches, self._bus_watches = self._bus_watches, []
        with self._lock:
            devs = list(self.devices.values())
            self.devices.clear()
            self._by_token.clear()
        for dev in devs:
            dev.removed = True
            watches.append((f"{dev.otherend}/state", dev._token))
        for path, token in watches:
            self._unwatch(path, token)

    def __enter__(self) -> XenBus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def device(self, nodename: str) -> XenbusDevice | None:
        return self.devices.get(nodename)

    def _unwatch(self, path: str, token: str) -> None:
        try:
            self.store.unwatch(path, token)
        except (XenStoreError, StoreClosed, OSError, TimeoutError) as exc:
            log.debug("unwatch %s %s: %s", path, token, exc)

    # -- device discovery (xenbus_dev_changed) -----------------------------------------
    def _bus_event(self, path: str, token: str) -> None:
        self._handle_or_hold(self._bus_changed, path, token)

    def _handle_or_hold(self, handle: Callable[[str, str], None], path: str, token: str) -> None:
        """Every watch callback: handled now, or held while the bus is frozen."""
        with self._watch_mutex:
            if self.frozen:
                self._held.append((handle, path, token))
                return
            handle(path, token)

    def _bus_changed(self, path: str, token: str) -> None:
        if self._closed:
            return
        try:
            self._dev_changed(path)
        except Exception:
            log.exception("xenbus %s: handling watch event %s", self.role.value, path)

    def _dev_changed(self, path: str) -> None:
        if not _under(path, self.base) or path == self.base:
            return
        parts = path[len(self.base) + 1:].split("/")
        if parts[0] not in self.drivers:
            return
        if not self.store.exists(path):
            self._cleanup(path)
            return
        if len(parts) < self.levels:
            self._enumerate(path, self.levels - len(parts))
            return
        nodename = f"{self.base}/{'/'.join(parts[:self.levels])}"
        if nodename not in self.devices:
            self._probe_node(parts[0], nodename)

    def _enumerate(self, path: str, depth: int) -> None:
        try:
            children = self.store.directory(path)
        except XenStoreError as exc:
            if exc.errno_name == "ENOENT":
                self._cleanup(path)
                return
            raise
        for child in sorted(children, key=_natural):
            sub = f"{path}/{child}"
            if depth > 1:
                self._enumerate(sub, depth - 1)
            elif sub not in self.devices:
                self._probe_node(sub[len(self.base) + 1:].split("/")[0], sub)

    def _cleanup(self, prefix: str) -> None:
        with self._lock:
            gone = [d for n, d in self.devices.items() if _under(n, prefix)]
            for dev in gone:
                del self.devices[dev.nodename]
                self._by_token.pop(dev._token, None)
                dev.removed = True
        for dev in gone:
            if dev._token:
                self._unwatch(f"{dev.otherend}/state", dev._token)
            if dev.driver is not None:
                try:
                    dev.driver.remove(dev)
                except Exception:
                    log.exception("%s: driver remove failed", dev.nodename)

    def _probe_node(self, devicetype: str, nodename: str) -> None:
        state = XenbusState.parse(self.store.try_read(f"{nodename}/state"))
        driver = self.drivers[devicetype]
        recovering = (self.recovers and driver.recovers
                      and (state in RECOVERABLE_STATES or (state == XenbusState.Closed and self._online(nodename))))
        if state != XenbusState.Initialising and not recovering:
            # "Device is not new, so ignore it.  This can happen if a device
            # is going away after switching to Closed." (xenbus_probe_node)
            return
        dev = XenbusDevice(self, devicetype, nodename, state=state)
        with self._lock:
            if nodename in self.devices:
                return
            self.devices[nodename] = dev
        if not self._read_otherend_details(dev):
            return  # registered but unbound, like a Linux device whose probe failed
        try:
            if recovering:
                log.info("%s: found in state %s from an earlier backend: recovering", nodename, state.name)
                if driver.recover(dev) is False:
                    return
            else:
                driver.probe(dev)
        except Exception as exc:
            log.exception("%s: %s failed", nodename, "recover" if recovering else "probe")
            if not isinstance(exc, XenbusFatal):
                dev_fatal(dev, exc, f"xenbus_dev_probe on {nodename}")
            return
        dev.driver = driver
        self._watch_otherend(dev)

    def _online(self, nodename: str) -> bool:
        """A Closed backend the toolstack still wants (`online` = 1, as libxl
        writes it): an earlier backend closed it to reset the connection (and
        may have died before the frontend reset), or the frontend closed it
        and may come back.  An unplug writes `online` = 0 first."""
        return self.store.try_read(f"{nodename}/online") == "1"

    def _read_otherend_details(self, dev: XenbusDevice) -> bool:
        id_key, path_key = self.otherend_keys
        try:
            id_text = self.store.try_read(f"{dev.nodename}/{id_key}")
            otherend = self.store.try_read(f"{dev.nodename}/{path_key}")
            ok = (id_text is not None and id_text.isascii() and id_text.isdigit()
                  and bool(otherend) and otherend.startswith("/")
                  and self.store.exists(otherend))
        except XenStoreError as exc:
            if exc.errno_name != "EACCES":
                raise
            ok = False
        if not ok:
            dev_fatal(dev, "ENOENT", f"unable to read other end from {dev.nodename}.  "
                                     "missing or inaccessible.")
            return False
        dev.otherend_id = int(id_text)
        dev.otherend = otherend.rstrip("/")
        return True

    def _watch_otherend(self, dev: XenbusDevice) -> None:
        token = f"xenbus-otherend:{next(self._tokens)}:{dev.nodename}"
        with self._lock:
            if dev.removed:
                return
            dev._token = token
            dev.otherend_state = None
            self._by_token[token] = dev
        state_path = f"{dev.otherend}/state"
        try:
            self.store.watch(state_path, token, self._otherend_event,
                             will_handle=lambda path, _token: path == state_path, max_pending=1)
        except XenStoreError as exc:
            with self._lock:
                self._by_token.pop(token, None)
            dev_fatal(dev, exc, f"watching {dev.otherend}/state")

    # -- the other end's state (xenbus_otherend_changed) ---------------------------------
    def _otherend_event(self, path: str, token: str) -> None:
        self._handle_or_hold(self._otherend_changed, path, token)

    def _otherend_changed(self, path: str, token: str) -> None:
        dev = self._by_token.get(token)
        if dev is None or dev.removed or dev.driver is None or self._closed:
            return  # a watch already dropped; its events may still be queued
        # "Protect us against watches firing on old details when the otherend
        # details change, say immediately after a resume."
        if not _under(path, dev.otherend):
            return
        try:
            state = XenbusState.parse(self.store.try_read(f"{dev.otherend}/state"))
        except (XenStoreError, StoreClosed, TimeoutError) as exc:
            log.warning("%s: reading %s/state: %s", dev.nodename, dev.otherend, exc)
            return
        with dev._lock:
            if state == dev.otherend_state or dev.removed:
                return
            dev.otherend_state = state
        try:
            dev.driver.otherend_changed(dev, state)
        except Exception as exc:
            log.exception("%s: otherend_changed(%s) failed", dev.nodename, state.name)
            if not isinstance(exc, XenbusFatal):
                dev_fatal(dev, exc, f"otherend_changed {state.name}")

    # -- suspend / resume (xenbus_dev_suspend, _cancel, _resume) -----------------------------
    def suspend(self) -> None:
        """The domain is about to suspend: wait for the watch callback that
        may be running, then hold every watch event until resume() or
        resume_cancelled()."""
        with self._watch_mutex:
            self.frozen = True

    def resume_cancelled(self) -> None:
        """The suspend was cancelled (xenbus "cancel"): the devices go on on
        their old rings with their old backends, nothing on the bus
        changes; the events held meanwhile are delivered now, filtered as
        always (a state the driver saw already is not delivered again)."""
        self._thaw()

    def _thaw(self) -> None:
        with self._watch_mutex:
            self.frozen = False
            held, self._held = self._held, []
            for handle, path, token in held:
                handle(path, token)

    # -- migration (xenbus_dev_resume) -------------------------------------------------
    def resume(self) -> None:
        """After the domain was migrated or restored: for every bound device,
        re-read the other end (it is a new backend now), reset `dev.state`
        to Initialising without writing (the toolstack created the dirs
        afresh), call driver.resume, and watch the new other end.  After a
        suspend() the held watch events are let through at the end; those
        for the old other end are dropped (their token is forgotten)."""
        try:
            self._resume_devices()
        finally:
            self._thaw()

    def relocate(self, reconnect_store: Callable[[], object], domid: int) -> None:
        """Live migration, between suspend() and resume(): the domain runs on
        another host now, as `domid`, with another store.  Every watch of the
        bus names the old domain and goes; `reconnect_store()` moves the
        store connection (the client re-registers the watches left, as
        Linux's xs_resume); the devices are renamed under the new domain
        path and the bus watches registered again (their first events are
        held until resume()).  Each bound driver hears `relocated(dev,
        old_nodename)`: its connection's ports and grant refs were the old
        host's and must not be released on this one (its pages, guest
        memory, came along and are freed here as usual)."""
        with self._watch_mutex:
            self._held = []  # events of the old store
        with self._lock:
            devs = list(self.devices.values())
            watches, self._bus_watches = self._bus_watches, []
            self._by_token.clear()
        for dev in devs:
            if dev._token:
                watches.append((f"{dev.otherend}/state", dev._token))
                dev._token = ""
        for path, token in watches:
            self._unwatch(path, token)  # the old store may be gone: the client forgets it either way
        reconnect_store()
        old_base = self.base
        self.domid = domid
        self.domain_path = f"/local/domain/{domid}"
        self.base = f"{self.domain_path}/{self.root}"
        with self._lock:
            self.devices = {}
            for dev in devs:
                old_nodename = dev.nodename
                dev.nodename = self.base + old_nodename[len(old_base):]
                self.devices[dev.nodename] = dev
        for dev in devs:
            if dev.driver is not None:
                dev.driver.relocated(dev, old_base + dev.nodename[len(self.base):])
        for devicetype in self.drivers:
            path = f"{self.base}/{devicetype}"
            token = f"xenbus-{self.role.value}:{path}"
            self.store.watch(path, token, self._bus_event)
            self._bus_watches.append((path, token))

    def _resume_devices(self) -> None:
        with self._lock:
            devs = [d for d in self.devices.values() if d.driver is not None]
        for dev in devs:
            with self._lock:
                self._by_token.pop(dev._token, None)
            if dev._token:
                self._unwatch(f"{dev.otherend}/state", dev._token)
            dev._token = ""
            if not self._read_otherend_details(dev):
                continue
            dev.state = XenbusState.Initialising
            try:
                dev.driver.resume(dev)
            except Exception as exc:
                log.exception("%s: resume failed", dev.nodename)
                if not isinstance(exc, XenbusFatal):
                    dev_fatal(dev, exc, "xenbus_dev_resume")
                continue
            self._watch_otherend(dev)


# A backend dir in one of these states was being served by a backend that is
# gone (this bus never probed it).  Closing/Closed: the device was going away,
# so it is left alone, as Linux's xenbus_probe_node does.
RECOVERABLE_STATES = frozenset({XenbusState.InitWait, XenbusState.Initialised, XenbusState.Connected,
                                XenbusState.Reconfiguring, XenbusState.Reconfigured})


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


class FrontendBus(XenBus):
    """In a guest: devices at /local/domain/<domid>/device/<type>/<devid>."""

    role = Role.FRONTEND
    recovers = False  # a guest's frontend process restarting is a guest reboot
    root = "device"
    levels = 2
    otherend_keys = ("backend-id", "backend")


class BackendBus(XenBus):
    """In dom0 or a driver domain: devices at
    /local/domain/<domid>/backend/<type>/<frontend-domid>/<devid>."""

    role = Role.BACKEND
    recovers = True
    root = "backend"
    levels = 3
    otherend_keys = ("frontend-id", "frontend")
