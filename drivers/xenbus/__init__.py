"""XenBus for xenbed's drivers: the device model both ends share.

`FrontendBus` (in a guest) and `BackendBus` (in dom0 or a driver domain)
watch the store, probe devices, watch the other end's state and call a
`XenbusDriver`'s callbacks; a driver changes its state only through
`switch_state`, reports errors with `dev_fatal`.  See docs/xenbus.md.
"""

from xenbed.protocols.xenbus_state import Role, TransitionRecorder, XenbusState

from .client import (
    XenbusDevice,
    XenbusDriver,
    XenbusFatal,
    XenbusHooks,
    alloc_evtchn,
    dev_error,
    dev_fatal,
    grant_ring,
    switch_state,
)
from .probe import BackendBus, FrontendBus, XenBus

__all__ = [
    "XenbusState", "Role", "TransitionRecorder",
    "XenbusDevice", "XenbusDriver", "XenbusHooks", "XenbusFatal",
    "FrontendBus", "BackendBus", "XenBus",
    "switch_state", "dev_error", "dev_fatal", "grant_ring", "alloc_evtchn",
]
