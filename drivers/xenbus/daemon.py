"""Running a backend driver as a domain's "module": connect, watch, serve
until SIGTERM or until the store or the hypervisor goes away.

    run_backend("blkback", lambda link: Blkback(GrantTable(link), EventChannels(link)), transitions=path)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("xenbed.xenbus.daemon")


def run_backend(name: str, make_driver: Callable, *, transitions: str | None = None,
                domid: int | None = None) -> int:
    """Serve `make_driver(link)` on a BackendBus; 0 after SIGTERM/SIGINT,
    1 when the store or the hypervisor link was lost."""
    from xenbed.drivers.xen.hypercall import HypervisorLink
    from xenbed.drivers.xen.store import XenStoreClient
    from xenbed.drivers.xenbus import BackendBus, TransitionRecorder

    link = HypervisorLink.open(role="device")
    store = XenStoreClient()
    domid = link.domid if domid is None else domid
    driver = make_driver(link)
    recorder = TransitionRecorder(transitions) if transitions else None
    bus = BackendBus(store, domid, [driver], recorder=recorder)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    bus.start()
    log.info("%s for dom%d watching %s/%s", name, domid, bus.base, driver.devicetype)
    while not done.wait(1.0):
        if store.closed.is_set() or link.closed.is_set():
            log.error("%s lost %s", name, "the store" if store.closed.is_set() else "the hypervisor link")
            break
    log.info("%s shutting down", name)
    bus.close()
    driver.shutdown()
    store.close()
    link.close()
    return 0 if done.is_set() else 1


class GuestXen:
    """The guest API objects a frontend needs (drivers/xen), on one link."""

    def __init__(self, link) -> None:
        from xenbed.drivers.xen.evtchn import EventChannels
        from xenbed.drivers.xen.gnttab import GrantTable
        from xenbed.drivers.xen.memory import GuestMemory

        self.link = link
        self.mem = GuestMemory(link)
        self.gnttab = GrantTable(link)
        self.evtchn = EventChannels(link)

    def relocate(self, link) -> None:
        """Live migration: the API objects now talk to the new host's
        hypervisor (drivers look them up here each time, never keep them)."""
        self.__init__(link)


def run_frontend(name: str, make_driver: Callable, *, transitions: str | None = None, interval: float = 1.0,
                 tick: Callable | None = None, before_close: Callable | None = None) -> int:
    """Serve `make_driver(xen)` on a FrontendBus until SIGTERM/SIGINT.

    The domain may not exist yet when the kernel starts its modules, so the
    link is retried; `tick(driver)` runs every `interval` seconds;
    `before_close()` runs first at shutdown (e.g. unmount, so that no new I/O
    reaches the rings), then the driver takes every device through Closing to
    Closed if the store and the hypervisor are still there."""
    import os

    from xenbed.drivers.xen.hypercall import connect_with_retry
    from xenbed.drivers.xen.store import XenStoreClient
    from xenbed.drivers.xenbus import FrontendBus, TransitionRecorder, XenbusHooks

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    link = connect_with_retry(os.environ.get("XENBED_CREDENTIAL", ""), "device", report=log.info, stop=stop)
    if link is None:
        return 0
    xen = GuestXen(link)
    store = XenStoreClient()
    driver = make_driver(xen)
    hooks = XenbusHooks(grant_access=lambda domid, frame, ro: xen.gnttab.grant(domid, frame, ro),
                        alloc_unbound=lambda domid: xen.evtchn.alloc_unbound(domid),
                        free_evtchn=lambda port: xen.evtchn.close(port))
    recorder = TransitionRecorder(transitions) if transitions else None
    bus = FrontendBus(store, link.domid, [driver], hooks=hooks, recorder=recorder)
    bus.start()
    control = serve_kernel_control(name, bus, driver, xen=xen, store=store)
    log.info("%s of domain %s: watching device/%s", name, link.domid, driver.devicetype)
    try:
        while not stop.wait(interval):
            # xen.link, not link: a live migration moves it to another host
            if bus.frozen:
                continue  # suspended: a migration may close the old host's link under us
            if xen.link.closed.is_set() or store.closed.is_set():
                log.error("%s lost the hypervisor or the store: exiting", name)
                break
            if tick is not None:
                tick(driver)
    finally:
        link = xen.link
        if before_close is not None:
            before_close()
        if not link.closed.is_set() and not store.closed.is_set():
            driver.close_all()
        if control is not None:
            control.close()
        bus.close()
        store.close()
        link.close()
    return 0


def relocate_module(name: str, bus, xen, store, target: dict) -> None:
    """Live migration, in a frozen module: a device link on the new host (its
    hypervisor socket as this container mounts it, and the domain's
    credential there), the guest API moved onto it, the bus and the store
    connection moved to the new domain (the kernel already hands new store
    connections to the new host's xenstored), the old link closed."""
    from xenbed.drivers.xen.hypercall import HypervisorLink

    new_link = HypervisorLink.open(target["credential"], "device", target["hypervisor"])
    old_link = xen.link
    xen.relocate(new_link)
    refused = []
    bus.relocate(lambda: refused.extend(store.reconnect()), new_link.domid)
    if refused:
        log.info("%s: watches of the old domain not kept: %s", name, ", ".join(refused))
    try:
        old_link.close()
    except Exception as exc:
        log.debug("closing the old link: %s", exc)
    log.info("%s relocated: dom%d via %s", name, new_link.domid, target["hypervisor"])


def serve_kernel_control(name: str, bus, driver, xen=None, store=None):
    """Answer the kernel's freeze / thaw (drivers/kernel/control.py) for a
    frontend: the order of Linux's do_suspend and its resume.

    freeze: the bus first (wait for the watch callback running, hold the
    others: no XenBus work while suspended), then the driver (nothing new
    on the rings, in-flight kept in the shadow).
    thaw cancelled: the driver goes on on its old rings, then the bus lets
    the held events through (xenbus "cancel": no state written).
    thaw not cancelled: the bus resumes every device (driver.resume: new
    backend details, rings, grants, ports, watches), then the driver lets
    its callers through -- onto the new rings once they are Connected.

    Returns the channel, or None when this process has no kernel to talk
    to (started by hand)."""
    from xenbed.drivers.kernel.control import KernelControl

    def freeze(message: dict) -> dict:
        bus.suspend()
        return driver.freeze()

    def thaw(message: dict) -> dict:
        cancelled = bool(message.get("cancelled", False))
        if cancelled:
            result = driver.thaw(True)
            bus.resume_cancelled()
        else:
            target = message.get("relocate")
            if target:
                relocate_module(name, bus, xen, store, target)
            bus.resume()
            result = driver.thaw(False)
        log.info("%s thawed (%s)", name, "cancelled: same rings" if cancelled else "resumed: new rings")
        return result or {}

    return KernelControl.from_environment(name, {"freeze": freeze, "thaw": thaw})
