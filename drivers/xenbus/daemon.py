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
