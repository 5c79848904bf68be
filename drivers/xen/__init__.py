"""The guest-side Xen API: what a driver inside a domain calls, as a guest
kernel's Xen code would.

    link = HypervisorLink.open()          # this container's credential, a device link
    mem, gnttab, evtchn = GuestMemory(link), GrantTable(link), EventChannels(link)
    store = XenStoreClient()              # XENSTORED_PATH, served by the domain's kernel

See docs/hypervisor-socket.md, "The guest API".
"""

from .evtchn import EventChannels, EvtchnError
from .gnttab import CopyOp, GrantError, GrantRef, GrantTable, LocalFrame, Mapping
from .hypercall import HypercallError, HypervisorLink, LinkClosed
from .memory import GuestMemory, Page
from .store import XenStoreClient, XenStoreError

__all__ = [
    "CopyOp", "EventChannels", "EvtchnError", "GrantError", "GrantRef", "GrantTable", "GuestMemory",
    "HypercallError", "HypervisorLink", "LinkClosed", "LocalFrame", "Mapping", "Page",
    "XenStoreClient", "XenStoreError",
]
