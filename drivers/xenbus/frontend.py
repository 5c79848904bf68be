"""What every frontend driver does the same way (blkfront, netfront).

A frontend keeps one `FrontendDevice` per device (Linux's blkfront_info,
netfront_info) in `XenbusFrontend.devices`, keyed by nodename.  The device
lasts as long as the device dir: the guest's view of it (a FUSE file, a
tap) and its engine survive reconnections; only its `RingResources` -- the
ring and pool pages, their grants, the event channels of one connection --
are made afresh each time and released here.

What the base class does for both, so a driver only says what differs:

- the registry, and moving a device to its new path after a live
  migration (`relocated`: the connection's ports and grants were the old
  host's, they are forgotten, never closed or ended here);
- suspend: `freeze` stops every engine putting work on its rings, `thaw`
  lets it go on, taking what came meanwhile when the suspend was cancelled;
- a lost backend: one that goes straight to Closed, no Closing first,
  while we are Initialised or Connected, was restarted (a killed blkback,
  netback or dom0 recovering the device, docs/xenbus.md "Recovery"): not
  an unplug (the toolstack asks for that with Closing).  The driver drops
  the old rings (`_drop_rings`, keeping what the guest sees), then the
  device goes Closed -> Initialising as Linux's xenbus_reset_frontend does
  and the backend's next InitWait starts new rings;
- `close_all` at guest shutdown (xenbus_frontend_dev_shutdown);
- granting ring pages through the bus, and releasing a connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from xenbed.protocols.xenbus_state import XenbusState

from .client import XenbusDevice, XenbusDriver, XenbusFatal

log = logging.getLogger("xenbed.xenbus.frontend")


def quietly(fn, *args) -> None:
    """Call `fn(*args)`; a failure is only logged (tearing down goes on)."""
    try:
        fn(*args)
    except Exception as exc:
        log.debug("%s%r: %s", getattr(fn, "__name__", fn), args, exc)


@dataclass(eq=False)
class GrantedPage:
    """A pool page: its grant ref for the backend and a view of its bytes."""

    gref: int
    buf: memoryview


class RingResources:
    """One connection's resources: every page allocated (rings and pools),
    every grant made, the views on the pool pages, the rings, the event
    channel ports.  Drivers subclass it to name their parts."""

    def __init__(self) -> None:
        self.pages: list = []
        self.grefs: list[int] = []
        self.views: list[memoryview] = []
        self.rings: list = []  # FrontRing
        self.ports: list[int] = []

    def forget_remote(self) -> None:
        """Live migration: the ports and grants were the old host's."""
        self.ports, self.grefs = [], []

    def release(self, xen) -> int:
        """Close the ports, end the grants, free the pages; returns how many
        grants could not be ended (the backend still maps them: the page
        leaks, as in Linux)."""
        leaked = 0
        for port in self.ports:
            xen.evtchn.remove_callbacks(port)
            quietly(xen.evtchn.close, port)
        for gref in self.grefs:
            try:
                xen.gnttab.end(gref)
            except Exception as exc:
                log.debug("ending grant %d: %s", gref, exc)
                leaked += 1
        for view in self.views:
            view.release()
        for ring in self.rings:
            ring.release()
        if self.pages:
            quietly(xen.mem.free, self.pages)
        self.ports, self.grefs, self.views, self.rings, self.pages = [], [], [], [], []
        return leaked


class FrontendDevice:
    """One device of this guest, as long as its directory exists.  `engine`
    is the driver's ring engine (freeze, thaw, handle_responses, detach)."""

    def __init__(self, dev: XenbusDevice, name: str, engine: Any) -> None:
        self.dev = dev
        self.name = name
        self.engine = engine
        self.conn: RingResources | None = None
        self.lock = threading.RLock()
        self.leaked_grants = 0  # grants the backend still mapped when we ended them


class XenbusFrontend(XenbusDriver):
    """The part of a frontend driver that is not specific to its device
    type.  Subclasses set `devicetype` and `report_key` (what `thaw` calls
    the list of device names) and implement `_drop_rings` and `_stop_io`."""

    report_key = "devices"

    def __init__(self, xen) -> None:
        self.xen = xen
        self.devices: dict[str, FrontendDevice] = {}  # nodename -> device
        self._lock = threading.Lock()

    # -- the registry --------------------------------------------------------------------
    def _add(self, device: FrontendDevice) -> None:
        with self._lock:
            self.devices[device.dev.nodename] = device

    def _discard(self, dev: XenbusDevice) -> None:
        with self._lock:
            self.devices.pop(dev.nodename, None)

    def _all(self) -> list:
        with self._lock:
            return list(self.devices.values())

    # -- XenbusDriver ----------------------------------------------------------------------
    def relocated(self, dev: XenbusDevice, old_nodename: str) -> None:
        """Live migration (XenBus.relocate): the device has a new path; the
        ports and grant refs of its connection were the old host's -- they
        went with it and must not be closed or ended on this one (the pages
        are the guest's and are freed here by resume)."""
        device: FrontendDevice | None = dev.priv
        if device is None:
            return
        with self._lock:
            if self.devices.get(old_nodename) is device:
                del self.devices[old_nodename]
            self.devices[dev.nodename] = device
        if device.conn is not None:
            device.conn.forget_remote()

    def freeze(self) -> dict:
        """Before the suspend hypercall: nothing new goes on any ring; what
        is in flight stays (docs/suspend-resume.md)."""
        return {"inflight": {device.name: device.engine.freeze() for device in self._all()}}

    def thaw(self, cancelled: bool) -> dict:
        """After the hypercall.  Cancelled: the same rings go on, responses
        that came while suspended are taken now.  Not cancelled: the bus
        has called `resume` for every device already (old rings dropped,
        new ones offered)."""
        devices = self._all()
        for device in devices:
            device.engine.thaw()
            if cancelled:
                try:
                    device.engine.handle_responses()
                except Exception as exc:
                    log.warning("%s: taking responses after a cancelled suspend: %s", device.name, exc)
        return {self.report_key: [device.name for device in devices]}

    def close_all(self, timeout: float = 5.0) -> None:
        """Guest shutdown: every device stops its I/O, goes Closing, waits
        briefly for the backend, then Closed (xenbus_frontend_dev_shutdown)."""
        for device in self._all():
            dev = device.dev
            with device.lock:
                self._stop_io(device, timeout)
                if dev.state not in (XenbusState.Closed, XenbusState.Closing):
                    dev.switch_state(XenbusState.Closing)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                other = XenbusState.parse(dev.otherend_read("state"))
                if other in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
                    break
                time.sleep(0.05)
            dev.switch_state(XenbusState.Closed)

    # -- what drivers implement -----------------------------------------------------------
    def _stop_io(self, device: FrontendDevice, timeout: float) -> None:
        """close_all: no new I/O, what is in flight drained or failed."""
        raise NotImplementedError

    def _drop_rings(self, device: FrontendDevice) -> None:
        """The backend is gone: forget the rings (keeping what the guest
        sees) and free the connection."""
        raise NotImplementedError

    # -- a lost backend ---------------------------------------------------------------------
    @staticmethod
    def backend_lost(dev: XenbusDevice, state: XenbusState) -> bool:
        """The backend went straight to Closed while we were Initialised or
        Connected: restarted, not unplugging (see the module docstring)."""
        return state == XenbusState.Closed and dev.state in (XenbusState.Initialised, XenbusState.Connected)

    def _backend_lost(self, device: FrontendDevice) -> None:
        """Drop the old rings, then Closed -> Initialising; the backend's
        InitWait starts new ones."""
        dev = device.dev
        log.warning("%s: backend %s went Closed while we were %s: reconnecting on new rings",
                    device.name, dev.otherend, XenbusState(dev.state).name)
        self._drop_rings(device)
        device.dev.switch_state(XenbusState.Closed)
        device.dev.switch_state(XenbusState.Initialising)

    # -- connecting ---------------------------------------------------------------------------
    def _grant_rings(self, dev: XenbusDevice, pages: Sequence) -> list[int]:
        """One grant ref per ring page, through the bus (its errors become
        dev_fatal and XenbusFatal there)."""
        return dev.grant_ring([page.gfn for page in pages])

    @contextmanager
    def _setting_up(self, dev: XenbusDevice, conn: RingResources, what: str) -> Iterator[None]:
        """Allocating a connection: on any failure release what it holds,
        report `what` failed (dev_fatal) and raise XenbusFatal."""
        try:
            yield
        except XenbusFatal:
            conn.release(self.xen)
            raise
        except Exception as exc:
            conn.release(self.xen)
            dev.dev_fatal(exc, what)
            raise XenbusFatal(f"{dev.nodename}: {what}: {exc}") from exc

    @staticmethod
    def _publish(dev: XenbusDevice, keys: Mapping[str, str], what: str) -> None:
        """Write `keys` in ONE transaction (seed 000); dev_fatal and
        XenbusFatal when that fails."""

        def body(tx: int) -> None:
            for key, value in keys.items():
                dev.write(key, value, tx)

        try:
            dev.store.run_transaction(body)
        except Exception as exc:
            dev.dev_fatal(exc, what)
            raise XenbusFatal(str(exc)) from exc

    def _free_connection(self, device: FrontendDevice) -> None:
        """The engine forgets the rings, then their pages, grants and ports go."""
        conn, device.conn = device.conn, None
        if conn is None:
            return
        device.engine.detach()
        leaked = conn.release(self.xen)
        if leaked:
            device.leaked_grants += leaked
            log.warning("%s: %d grant(s) still mapped by the backend could not be ended", device.name, leaked)
