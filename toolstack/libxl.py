"""The operations behind `xl`'s subcommands, usable from Python too -- as
libxl is the library behind Xen's xl.

`xl` (toolstack/xl.py) parses the command line and prints; the migration
receiver (toolstack/migrate.py) drives the same `Toolstack` on the
destination host.  Both import it from here, so neither imports the other.
"""

from __future__ import annotations

import sys

from xenbed.drivers.xen.hypercall import HypervisorLink
from xenbed.drivers.xen.store import XenStoreClient
from xenbed.protocols import hypercall as hc
from xenbed.toolstack import blk, domain_store, net
from xenbed.toolstack.config import DomainConfig
from xenbed.toolstack.devices import DeviceError


# Nominal store ring frame and event channel passed to XS_INTRODUCE (see create).
STORE_RING_GFN = 0
STORE_EVTCHN_PORT = 1


class XlError(Exception):
    pass


class Toolstack:
    """The operations behind the subcommands, usable from Python too."""

    def __init__(self, link: HypervisorLink | None = None, store: XenStoreClient | None = None) -> None:
        self.link = link or HypervisorLink.open(role="device")
        self.store = store or XenStoreClient()

    def close(self) -> None:
        self.store.close()
        self.link.close()

    def domains(self) -> list[dict]:
        return self.link.call(hc.Call.DOMAIN_LIST)["domains"]

    def resolve(self, name_or_id: str) -> dict:
        for domain in self.domains():
            if domain["name"] == name_or_id or str(domain["domid"]) == name_or_id:
                return domain
        raise XlError(f"{name_or_id!r} is not a domain name or id")

    def create(self, config: DomainConfig) -> tuple[int, str]:
        privilege = "backend" if config.driver_domain else "none"
        created = self.link.call(hc.Call.DOMAIN_CREATE,
                                 {"name": config.name, "memory_mb": config.memory_mb, "privilege": privilege})
        domid = created["domid"]
        try:
            domain_store.write_domain(self.store, domid, config.name, config.memory_mb)
            # mfn and port name the store ring in real Xen; here the domain
            # reaches xenstored through its hypervisor link, so they are
            # nominal (xenstored still insists on a non-zero port).
            self.store.introduce(domid, STORE_RING_GFN, STORE_EVTCHN_PORT)
            for disk in config.disks:
                # The guest's frontend connects once its container boots;
                # creating the domain waits only for the backend side.
                blk.attach(self.store, domid, disk, wait_connected=0)
            net.attach_all(self.store, domid, config.vifs)
        except BaseException:
            self._destroy(domid)
            raise
        return domid, created["credential"]

    def destroy(self, name_or_id: str) -> int:
        domid = self.resolve(name_or_id)["domid"]
        if domid == 0:
            raise XlError("dom0 cannot be destroyed")
        self._destroy(domid)
        return domid

    def _destroy(self, domid: int) -> None:
        """As libxl: the domain goes at once, then its backends are removed by
        force (hotplug removal: loop devices and vifs go) and its nodes."""
        devices = self._devices_of(domid)
        try:
            self.link.call(hc.Call.DOMAIN_DESTROY, {"domid": domid})
        finally:
            for module, device in devices:
                try:
                    module.remove(self.store, device, force=True)
                except DeviceError as exc:
                    print(f"xl: removing {device.kind} {device.devid} of dom{domid}: {exc}", file=sys.stderr)
            domain_store.remove_domain(self.store, domid)

    def _devices_of(self, domid: int) -> list:
        from xenbed.toolstack.devices import Device

        # From the backend side: a guest that died already lost its own
        # /local/domain/<id> (xenstored drops it), its backends did not.
        found = []
        for backend_id in self.store.directory("/local/domain"):
            for kind, module in (("vbd", blk), ("vif", net)):
                base = f"/local/domain/{backend_id}/backend/{kind}/{domid}"
                if backend_id.isdigit() and self.store.exists(base):
                    found += [(module, Device(kind, domid, int(backend_id), int(devid)))
                              for devid in self.store.directory(base) if devid.isdigit()]
        return found

    def pause(self, name_or_id: str, paused: bool = True) -> None:
        domid = self.resolve(name_or_id)["domid"]
        self.link.call(hc.Call.DOMAIN_PAUSE if paused else hc.Call.DOMAIN_UNPAUSE, {"domid": domid})
