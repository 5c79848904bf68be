"""What the toolstack writes to XenStore for a domain, as libxl does.

libxl creates `/local/domain/<id>` readable by the guest but owned by dom0
("roperm": n0 r<id>), and a few subdirectories the guest owns ("rwperm":
n<id>) because the guest writes there: `control/shutdown` (the guest acks
shutdown requests), `data`, `drivers`, `feature`, `attr`, `error`,
`device/suspend/event-channel`.  `device` itself stays dom0's: devices are
added under it by the toolstack only.  `/vm/<uuid>` holds the VM's identity
and `/libxl/<id>` the toolstack's private state (dom0 only).
"""

from __future__ import annotations

import uuid as uuidlib

from xenbed.drivers.xen.store import XenStoreClient


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def write_domain(store: XenStoreClient, domid: int, name: str, memory_mb: int, vm_uuid: str | None = None) -> str:
    """Create the domain's directories in one transaction; returns the VM uuid."""
    vm_uuid = vm_uuid or str(uuidlib.uuid4())
    dom = domain_path(domid)
    roperm = ["n0", f"r{domid}"]
    rwperm = [f"n{domid}"]

    def body(tx: int) -> None:
        for path, perms in ((dom, roperm), (f"/vm/{vm_uuid}", roperm), (f"/libxl/{domid}", ["n0"])):
            store.mkdir(path, tx)
            store.set_perms(path, perms, tx)
        store.write(f"/vm/{vm_uuid}/name", name, tx)
        store.write(f"/vm/{vm_uuid}/uuid", vm_uuid, tx)
        store.write(f"/libxl/{domid}/type", "pv", tx)
        store.write(f"{dom}/name", name, tx)
        store.write(f"{dom}/domid", str(domid), tx)
        store.write(f"{dom}/vm", f"/vm/{vm_uuid}", tx)
        store.write(f"{dom}/memory/target", str(memory_mb * 1024), tx)
        for sub in ("device", "control"):
            store.mkdir(f"{dom}/{sub}", tx)
            store.set_perms(f"{dom}/{sub}", roperm, tx)
        for sub in ("control/shutdown", "data", "drivers", "feature", "attr", "error", "device/suspend/event-channel"):
            path = f"{dom}/{sub}"
            store.write(path, "", tx)
            store.set_perms(path, rwperm, tx)
        store.write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1", tx)

    store.run_transaction(body)
    return vm_uuid


def remove_domain(store: XenStoreClient, domid: int) -> None:
    """Remove what write_domain made (the /local/domain part may already be
    gone: xenstored drops it when the domain dies)."""
    vm = store.try_read(f"{domain_path(domid)}/vm")

    def body(tx: int) -> None:
        for path in filter(None, (domain_path(domid), vm, f"/libxl/{domid}")):
            try:
                store.rm(path, tx)
            except Exception as exc:  # ENOENT is fine: already gone
                if getattr(exc, "errno_name", None) != "ENOENT":
                    raise

    store.run_transaction(body)
