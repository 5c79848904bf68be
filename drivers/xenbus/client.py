"""A XenBus device and what a driver does with it (Linux's xenbus_client.c).

`switch_state` is the only way a driver changes its `state` node: it is
idempotent (nothing is written when the state is already the one asked
for), transactional (the node is read and written in one transaction,
retried on EAGAIN), and never resurrects a device whose directory the
toolstack removed (the node's existence is checked inside the transaction,
which is aborted when it is gone).  Every write it makes is recorded in the
bus's `TransitionRecorder`.

`dev_error` writes "<errno> <message>" to `<domain>/error/<nodename
relative to the domain>/error` (Linux: "error/device/vbd/51712/error");
`dev_fatal` does that and switches to Closing.
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xenbed.drivers.xen.store import StoreClosed, XenStoreError
from xenbed.protocols.xenbus_state import XenbusState

log = logging.getLogger("xenbed.xenbus")


class XenbusFatal(Exception):
    """Raised after `dev_fatal` has already reported the error, so the bus
    does not report it a second time when a driver lets it propagate."""


@dataclass
class XenbusHooks:
    """Grant-table and event-channel calls, supplied by whoever owns them
    (drivers/xen/gnttab.py and evtchn.py); the bus only adds error reporting.

    grant_access(otherend_id, frame, readonly) -> grant ref
    alloc_unbound(otherend_id) -> local port
    free_evtchn(port)
    """

    grant_access: Callable[[int, int, bool], int] | None = None
    alloc_unbound: Callable[[int], int] | None = None
    free_evtchn: Callable[[int], None] | None = None


class XenbusDriver:
    """What a driver module declares to its bus and its kernel (Linux's
    struct xenbus_driver plus the module's power-management hooks).
    Subclass and override; the defaults do nothing.

    Per device, on the bus's watch thread (the store client's "xenwatch"
    thread), free to use the store:

    probe(dev)                    the device dir appeared in state Initialising
    otherend_changed(dev, state)  the other end's `state` now reads `state`
                                  (never twice in a row with the same value)
    remove(dev)                   the device dir is gone
    resume(dev)                   after a migration: re-grant, re-advertise
    relocated(dev, old_nodename)  live migration moved the domain: the
                                  device's ports and grants were the old
                                  host's, forget them without releasing
    recover(dev)                  (backends with `recovers` True) a device
                                  this process never probed, left by an
                                  earlier incarnation of the driver (a
                                  restarted dom0 or driver process);
                                  `dev.state` is the state it left; False
                                  leaves the device unbound

    For the whole module, from the kernel's control channel or the daemon:

    freeze() -> dict              suspend: stop issuing work, keep what is in
                                  flight (the dict is the module's report)
    thaw(cancelled) -> dict       after the suspend hypercall returned
    close_all(timeout)            the domain is going away: close every device
    shutdown()                    SIGTERM to a backend: tear every device down,
                                  leaving the states as they are
    """

    devicetype: str = ""
    # A driver that does not recover ignores devices left by an earlier
    # process, as Linux does (its backends never outlive their kernel).
    recovers: bool = False

    def probe(self, dev: XenbusDevice) -> None:
        pass

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        pass

    def remove(self, dev: XenbusDevice) -> None:
        pass

    def resume(self, dev: XenbusDevice) -> None:
        pass

    def relocated(self, dev: XenbusDevice, old_nodename: str) -> None:
        pass

    def recover(self, dev: XenbusDevice) -> bool | None:
        return False

    def freeze(self) -> dict:
        return {}

    def thaw(self, cancelled: bool) -> dict:
        return {}

    def close_all(self, timeout: float = 5.0) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass(eq=False)
class XenbusDevice:
    bus: Any  # the XenBus (probe.py) that found it; typed loosely so client.py needs no probe.py
    devicetype: str
    nodename: str  # absolute: /local/domain/<domid>/device/vbd/51712
    otherend: str = ""  # absolute path of the other end's dir
    otherend_id: int = -1
    state: XenbusState = XenbusState.Initialising  # as this end last set it
    driver: XenbusDriver | None = None  # None: probe failed, device unbound
    priv: Any = None  # the driver's own data (dev_set_drvdata)
    otherend_state: XenbusState | None = None  # last one delivered
    removed: bool = False
    _token: str = ""
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # -- convenience -------------------------------------------------------------
    @property
    def store(self):
        return self.bus.store

    def read(self, key: str, default: str | None = None, tx: int = 0) -> str | None:
        return self.store.try_read(f"{self.nodename}/{key}", tx, default)

    def write(self, key: str, value: str | bytes, tx: int = 0) -> None:
        self.store.write(f"{self.nodename}/{key}", value, tx)

    def otherend_read(self, key: str, default: str | None = None, tx: int = 0) -> str | None:
        return self.store.try_read(f"{self.otherend}/{key}", tx, default)

    @property
    def error_path(self) -> str:
        return error_path(self.bus.domain_path, self.nodename)

    # -- xenbus_client -----------------------------------------------------------
    def switch_state(self, state: XenbusState | int) -> bool:
        return switch_state(self, state)

    def dev_error(self, err: object, msg: str) -> None:
        dev_error(self, err, msg)

    def dev_fatal(self, err: object, msg: str) -> None:
        dev_fatal(self, err, msg)

    def grant_ring(self, frames: Sequence[int], readonly: bool = False) -> list[int]:
        return grant_ring(self, frames, readonly)

    def alloc_evtchn(self) -> int:
        return alloc_evtchn(self)

    def free_evtchn(self, port: int) -> None:
        hook = self.bus.hooks.free_evtchn
        if hook is not None:
            try:
                hook(port)
            except Exception as exc:  # Linux: dev_error, carry on
                dev_error(self, exc, f"freeing event channel {port}")


def error_path(domain_path: str, nodename: str) -> str:
    """`<domain>/error/<nodename relative to the domain>/error`."""
    prefix = domain_path.rstrip("/") + "/"
    rel = nodename[len(prefix):] if nodename.startswith(prefix) else nodename.lstrip("/")
    return f"{prefix}error/{rel}/error"


def errno_of(err: object) -> int:
    """A positive errno for the error node, from an int, an errno name, a
    XenStoreError (by its name) or an OSError; EIO otherwise."""
    if isinstance(err, bool):
        return _errno.EIO
    if isinstance(err, int):
        return abs(err) or _errno.EIO
    if isinstance(err, str):
        return getattr(_errno, err, _errno.EIO)
    if isinstance(err, XenStoreError):
        return getattr(_errno, err.errno_name, _errno.EIO)
    if isinstance(err, OSError) and err.errno:
        return err.errno
    return _errno.EIO


class _Gone(Exception):
    """The device's state node vanished: abort the transaction."""


def switch_state(dev: XenbusDevice, state: XenbusState | int, *, _depth: int = 0) -> bool:
    """Set `<nodename>/state` to `state`; True when it was written.

    Like Linux's __xenbus_switch_state: nothing happens when `state` is the
    one this end last set; otherwise, in one transaction retried on EAGAIN,
    the node is read and written, unless it is gone (the device is being
    torn down; writing would resurrect its directory) or already holds
    `state` (the toolstack may have written it).  `dev.state` becomes
    `state` in every case but a store error, as in Linux.
    """
    state = XenbusState(state)
    store = dev.bus.store
    node = f"{dev.nodename}/state"
    with dev._lock:
        if state == dev.state:
            return False

        def body(tx: int) -> XenbusState | None:
            current = store.try_read(node, tx)
            if current is None:
                raise _Gone
            old = XenbusState.parse(current)
            if old == state:
                return None
            store.write(node, str(int(state)), tx)
            return old

        try:
            old = store.run_transaction(body)
        except _Gone:
            log.debug("%s: not switching to %s, the device dir is gone", dev.nodename, state.name)
            dev.state = state
            return False
        except (XenStoreError, StoreClosed, TimeoutError) as exc:
            log.warning("%s: switching to %s failed: %s", dev.nodename, state.name, exc)
            if _depth == 0:
                dev_error(dev, exc, f"writing new state {state.name}")
                if state != XenbusState.Closing:
                    switch_state(dev, XenbusState.Closing, _depth=1)
            return False
        dev.state = state
        if old is None:
            return False
        dev.bus.recorder.record(dev.nodename, dev.bus.role, old, state)
        return True


def dev_error(dev: XenbusDevice, err: object, msg: str) -> None:
    """Report an error where the toolstack looks for it (never raises)."""
    code = errno_of(err)
    log.error("%s: %s (errno %d: %s)", dev.nodename, msg, code, err)
    try:
        dev.bus.store.write(dev.error_path, f"{code} {msg}")
    except Exception as exc:
        log.error("%s: failed to write error node %s: %s", dev.nodename, dev.error_path, exc)


def dev_fatal(dev: XenbusDevice, err: object, msg: str) -> None:
    """dev_error, then switch to Closing (Linux xenbus_dev_fatal).

    Unlike Linux, a device already Closed stays Closed: Closed -> Closing
    is not in the seed table, and there is nothing left to close."""
    dev_error(dev, err, msg)
    if dev.state != XenbusState.Closed:
        switch_state(dev, XenbusState.Closing, _depth=1)


def grant_ring(dev: XenbusDevice, frames: Sequence[int], readonly: bool = False) -> list[int]:
    """Grant the other end each frame of a ring; one ref per frame.  On
    failure: dev_fatal, then XenbusFatal (refs already granted are the
    caller's to revoke; Linux does the same)."""
    hook = dev.bus.hooks.grant_access
    if hook is None:
        raise RuntimeError("no grant_access hook given to the bus")
    refs = []
    for frame in frames:
        try:
            refs.append(hook(dev.otherend_id, frame, readonly))
        except Exception as exc:
            dev_fatal(dev, exc, "granting access to ring page")
            raise XenbusFatal(f"{dev.nodename}: granting access to ring page: {exc}") from exc
    return refs


def alloc_evtchn(dev: XenbusDevice) -> int:
    """An unbound port the other end may bind (xenbus_alloc_evtchn)."""
    hook = dev.bus.hooks.alloc_unbound
    if hook is None:
        raise RuntimeError("no alloc_unbound hook given to the bus")
    try:
        return hook(dev.otherend_id)
    except Exception as exc:
        dev_fatal(dev, exc, "allocating event channel")
        raise XenbusFatal(f"{dev.nodename}: allocating event channel: {exc}") from exc
