"""Adding and removing split devices the way libxl does, for any device type.

Add (seed 000, "Device Initialisation"): the frontend and backend directories
are written in ONE transaction, each with libxl's ownership -- the frontend
directory owned by the guest and readable by the backend domain, the backend
directory owned by the backend domain and readable by the guest -- then the
toolstack waits for the backend's InitWait and runs the hotplug step.

Remove (libxl__initiate_device_generic_remove): `online=0` and state Closing
on the backend, wait for Closed, force the removal after a timeout, run the
hotplug removal, remove both directories.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from xenbed.drivers.xen.store import XenStoreClient, XenStoreError

XENBUS_INITIALISING = 1
XENBUS_INITWAIT = 2
XENBUS_CONNECTED = 4
XENBUS_CLOSING = 5
XENBUS_CLOSED = 6


class DeviceError(Exception):
    pass


@dataclass
class Device:
    kind: str  # "vbd", "vif"
    frontend_domid: int
    backend_domid: int
    devid: int
    frontend_keys: dict[str, str] = field(default_factory=dict)
    backend_keys: dict[str, str] = field(default_factory=dict)

    @property
    def frontend_path(self) -> str:
        return f"/local/domain/{self.frontend_domid}/device/{self.kind}/{self.devid}"

    @property
    def backend_path(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/{self.kind}/{self.frontend_domid}/{self.devid}"


def wait_for_state(store: XenStoreClient, path: str, wanted: set[int], timeout: float, what: str) -> int:
    """Poll `<path>/state` until it is one of `wanted`; on timeout say what
    was awaited and every state seen on the way."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        value = store.try_read(f"{path}/state")
        if not seen or seen[-1] != value:
            seen.append(value)
        if value is not None and value.isdigit() and int(value) in wanted:
            return int(value)
        if time.monotonic() > deadline:
            raise DeviceError(f"timed out after {timeout:.0f}s waiting for {what} ({path}/state in "
                              f"{sorted(wanted)}); states seen: {' -> '.join(str(s) for s in seen)}")
        time.sleep(0.05)


TOOLSTACK_DOMID = 0  # the domain this toolstack runs in (libxl's LIBXL_TOOLSTACK_DOMID)


def backend_domid(store: XenStoreClient, backend: str | None) -> int:
    """The domid of the backend domain a device spec names (`backend=NAME`
    in xl's disk and vif syntax): a name or a domid; None is dom0.  Names are
    looked up in the store, as libxl_name_to_domid reads the domains' names."""
    if backend is None or backend in ("0", "Domain-0"):
        return TOOLSTACK_DOMID
    if backend.isdigit():
        if not store.exists(f"/local/domain/{backend}"):
            raise DeviceError(f"backend domain {backend} does not exist")
        return int(backend)
    for domid in store.directory("/local/domain"):
        if domid.isdigit() and store.try_read(f"/local/domain/{domid}/name") == backend:
            return int(domid)
    raise DeviceError(f"backend domain {backend!r} does not exist")


def wait_for_hotplug(store: XenStoreClient, backend_path: str, timeout: float, what: str) -> None:
    """A backend in a driver domain: the hotplug step runs THERE (Xen runs
    `xl devd` in the driver domain for it; here its blkback does it), so the
    toolstack only waits for its outcome, `hotplug-status` connected, and
    reports `hotplug-error` if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        status = store.try_read(f"{backend_path}/hotplug-status")
        if status == "connected":
            return
        if status == "error":
            reason = store.try_read(f"{backend_path}/hotplug-error", default="no reason given")
            raise DeviceError(f"the hotplug step of {what} failed in its backend domain: {reason}")
        if time.monotonic() > deadline:
            raise DeviceError(f"timed out after {timeout:.0f}s waiting for the backend domain's hotplug step "
                              f"of {what} ({backend_path}/hotplug-status is {status!r})")
        time.sleep(0.05)


def write_device(store: XenStoreClient, device: Device) -> None:
    front, back = device.frontend_path, device.backend_path
    fe, be = device.frontend_domid, device.backend_domid

    def body(tx: int) -> None:
        if store.exists(front, tx) or store.exists(back, tx):
            raise DeviceError(f"{device.kind} {device.devid} of dom{fe} exists already")
        frontend = {"backend": back, "backend-id": str(be), "state": str(XENBUS_INITIALISING),
                    **device.frontend_keys}
        backend = {"frontend": front, "frontend-id": str(fe), "online": "1", "state": str(XENBUS_INITIALISING),
                   **device.backend_keys}
        store.mkdir(front, tx)
        store.set_perms(front, [f"n{fe}", f"r{be}"], tx)
        for key, value in frontend.items():
            store.write(f"{front}/{key}", value, tx)
        write_backend_dir(store, device, backend, tx)

    store.run_transaction(body)


def write_backend_dir(store: XenStoreClient, device: Device, nodes: dict[str, str], tx: int) -> None:
    """`device`'s backend directory holding `nodes`, in transaction `tx`:
    owned by the backend domain and readable by the guest.  Its parents
    first, with the backend domain's ownership where libxl gives it
    (backend/<kind>/<fe> belongs to the backend domain)."""
    fe, be, back = device.frontend_domid, device.backend_domid, device.backend_path
    for path in (f"/local/domain/{be}/backend/{device.kind}", f"/local/domain/{be}/backend/{device.kind}/{fe}"):
        if not store.exists(path, tx):
            store.mkdir(path, tx)
            store.set_perms(path, [f"n{be}"], tx)
    store.mkdir(back, tx)
    store.set_perms(back, [f"n{be}", f"r{fe}"], tx)
    for key, value in nodes.items():
        store.write(f"{back}/{key}", value, tx)


def bring_up(store: XenStoreClient, device: Device, name: str, hotplug_add, remove, *,
             initwait_timeout: float, wait_connected: float) -> Device:
    """Seed 000's Device Initialisation from the toolstack's side, after the
    directories are written: the backend's InitWait, the hotplug step, then
    (if asked) both ends Connected.  On any failure the device is removed by
    force, so a refused attach leaves nothing behind."""
    try:
        wait_for_state(store, device.backend_path, {XENBUS_INITWAIT, XENBUS_CONNECTED}, initwait_timeout,
                       f"the backend of {name} to reach InitWait")
        hotplug_add(device.backend_path)
        if wait_connected:
            wait_for_state(store, device.backend_path, {XENBUS_CONNECTED}, wait_connected,
                           f"the backend of {name} to connect")
            wait_for_state(store, device.frontend_path, {XENBUS_CONNECTED}, wait_connected,
                           f"the frontend of {name} to connect")
    except BaseException:
        remove(store, device, force=True)
        raise
    return device


def request_close(store: XenStoreClient, device: Device) -> None:
    back = device.backend_path

    def body(tx: int) -> None:
        if not store.exists(back, tx):
            raise DeviceError(f"no backend at {back}")
        store.write(f"{back}/online", "0", tx)
        store.write(f"{back}/state", str(XENBUS_CLOSING), tx)

    store.run_transaction(body)


def close_orderly(store: XenStoreClient, device: Device, timeout: float) -> bool:
    """Ask the backend to close and wait until it is Closed.  False, said on
    stderr, when that failed and the removal must be forced."""
    try:
        request_close(store, device)
        wait_for_state(store, device.backend_path, {XENBUS_CLOSED}, timeout, "the backend to close")
    except DeviceError as exc:
        print(f"xl: {exc}; forcing the removal", file=sys.stderr)
        return False
    return True


def remove_directories(store: XenStoreClient, device: Device) -> None:
    """Both device directories, and the backend's per-guest folder
    (backend/<kind>/<domid>) once it holds no device any more, as libxl
    leaves nothing of a guest behind in the backend domain."""
    guest_folder = device.backend_path.rsplit("/", 1)[0]

    def body(tx: int) -> None:
        for path in (device.frontend_path, device.backend_path):
            try:
                store.rm(path, tx)
            except XenStoreError as exc:
                if exc.errno_name != "ENOENT":
                    raise
        try:
            if not store.directory(guest_folder, tx):
                store.rm(guest_folder, tx)
        except XenStoreError as exc:
            if exc.errno_name != "ENOENT":
                raise

    store.run_transaction(body)


def frontend_devids(store: XenStoreClient, kind: str, frontend_domid: int) -> list[str]:
    """The entries of the guest's device/<kind> directory; none when it has none."""
    try:
        return store.directory(f"/local/domain/{frontend_domid}/device/{kind}")
    except XenStoreError as exc:
        if exc.errno_name == "ENOENT":
            return []
        raise


def list_devices(store: XenStoreClient, kind: str, frontend_domid: int) -> list[dict]:
    base = f"/local/domain/{frontend_domid}/device/{kind}"
    rows = []
    for devid in sorted(frontend_devids(store, kind, frontend_domid), key=lambda d: int(d) if d.isdigit() else d):
        front = f"{base}/{devid}"
        backend = store.try_read(f"{front}/backend", default="")
        rows.append({
            "devid": devid,
            "backend_id": store.try_read(f"{front}/backend-id", default="-"),
            "state": store.try_read(f"{front}/state", default="-"),
            "backend_state": store.try_read(f"{backend}/state", default="-") if backend else "-",
            "event_channel": store.try_read(f"{front}/event-channel", default="-"),
            "ring_ref": store.try_read(f"{front}/ring-ref", default="-"),
            "backend": backend,
        })
    return rows
