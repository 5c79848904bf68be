"""Virtual block devices: `xl block-attach`, `block-detach`, `block-list`
and the `disk = [...]` of a domain config.

The store keys are libxl's.  The backend runs in dom0 (or the driver domain
the spec names with `backend=`); the hotplug step attaches the target to a
loop device and writes `physical-device`, after the backend went InitWait,
as libxl runs the block script.
"""

from __future__ import annotations

import subprocess
import sys

from xenbed.drivers.xen.store import XenStoreClient
from xenbed.toolstack import devices
from xenbed.toolstack.devices import Device, DeviceError
from xenbed.toolstack.disk_spec import DiskSpec, parse_disk_spec

INITWAIT_TIMEOUT = 20.0  # libxl waits LIBXL_INIT_TIMEOUT (10 s); containers start slower
CLOSE_TIMEOUT = 10.0  # libxl's LIBXL_DESTROY_TIMEOUT


def vbd_device(spec: DiskSpec, frontend_domid: int, backend_domid: int) -> Device:
    device_type = "cdrom" if spec.is_cdrom else "disk"
    return Device(
        kind="vbd",
        frontend_domid=frontend_domid,
        backend_domid=backend_domid,
        devid=spec.devnum,
        frontend_keys={"virtual-device": str(spec.devnum), "device-type": device_type},
        backend_keys={
            "params": spec.target or "",
            "mode": spec.mode,
            "type": "phy",
            "dev": spec.vdev,
            "device-type": device_type,
            "removable": "1" if spec.is_cdrom else "0",
            "bootable": "1",
            "discard-enable": "0" if spec.discard_enable is False else "1",
        },
    )


def run_hotplug(action: str, backend_path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "xenbed.drivers.blk.hotplug", action, backend_path],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise DeviceError(f"block hotplug {action} for {backend_path} failed: {result.stderr.strip() or result.stdout.strip()}")


def attach(store: XenStoreClient, frontend_domid: int, spec_text: str, backend_domid: int = 0,
           wait_connected: float = 20.0) -> Device:
    spec = parse_disk_spec(spec_text)
    device = vbd_device(spec, frontend_domid, backend_domid)
    devices.write_device(store, device)
    return devices.bring_up(store, device, spec.vdev, lambda path: run_hotplug("add", path), remove,
                            initwait_timeout=INITWAIT_TIMEOUT, wait_connected=wait_connected)


def find(store: XenStoreClient, frontend_domid: int, vdev: str) -> Device:
    from xenbed.toolstack.vdev import vdev_to_number

    devid = int(vdev) if vdev.isdigit() else vdev_to_number(vdev)
    front = f"/local/domain/{frontend_domid}/device/vbd/{devid}"
    backend_id = store.try_read(f"{front}/backend-id")
    if backend_id is None:
        raise DeviceError(f"dom{frontend_domid} has no disk {vdev}")
    return Device("vbd", frontend_domid, int(backend_id), devid)


def detach(store: XenStoreClient, frontend_domid: int, vdev: str, timeout: float = CLOSE_TIMEOUT) -> bool:
    """Orderly closedown (seed 000); True if it was orderly, False if forced."""
    device = find(store, frontend_domid, vdev)
    return remove(store, device, timeout=timeout)


def remove(store: XenStoreClient, device: Device, force: bool = False, timeout: float = CLOSE_TIMEOUT) -> bool:
    orderly = not force
    if not force:
        try:
            devices.request_close(store, device)
            devices.wait_for_state(store, device.backend_path, {devices.XENBUS_CLOSED}, timeout,
                                   "the backend to close")
        except DeviceError as exc:
            print(f"xl: {exc}; forcing the removal", file=sys.stderr)
            orderly = False
    try:
        run_hotplug("remove", device.backend_path)
    finally:
        devices.remove_directories(store, device)
    return orderly


def format_list(rows: list[dict]) -> str:
    lines = [f"{'Vdev':<6} {'BE':>3} {'handle':>6} {'state':>5} {'evt-ch':>6} {'ring-ref':>8} BE-path"]
    for r in rows:
        lines.append(f"{r['devid']:<6} {r['backend_id']:>3} {r['devid']:>6} {r['state']:>5} "
                     f"{r['event_channel']:>6} {r['ring_ref']:>8} {r['backend']}")
    return "\n".join(lines)
