"""Virtual block devices: `xl block-attach`, `block-detach`, `block-list`,
`block-resize`, `cd-insert`, `cd-eject` and the `disk = [...]` of a domain
config.

The store keys are libxl's.  The backend runs in dom0 (or the driver domain
the spec names with `backend=`); the hotplug step attaches the target to a
loop device and writes `physical-device`, after the backend went InitWait,
as libxl runs the block script.

A driver domain's backend (`backend=driverdom`; seed 004: a domain with the
backend privilege only): the directories are written as for dom0, with
libxl's permissions -- the backend dir under /local/domain/<driverdom>/
backend/vbd/<guest>/<devid>, owned by the driver domain and readable by the
guest; the frontend dir owned by the guest and readable by the driver domain.
The target names a file IN the driver domain (its storage, not dom0's), so
the hotplug step runs there: on Xen `xl devd` in the driver domain runs the
block script; here the driver domain's blkback runs the same step itself
(drivers/blk/back.py, on for any domain without the control privilege), and
the toolstack waits for its `hotplug-status`.  On removal the driver domain
releases the loop device (blkback closes it at Closed with online=0 and runs
the hotplug removal); dom0 then removes both directories, as it may.

Reconfiguration while Connected (seed 000, Device reconfiguration; both ends
stay Connected, the guest's file stays open):

* `resize` (`xl block-resize`, a xenbed extension: real xl has none; on Xen
  one grows the backing device and blkback notices) grows the image file,
  then LOOP_SET_CAPACITY makes the loop device take the new size; blkback
  sees the device's size change within a second and rewrites `sectors` with
  Connected (drivers/blk/back.py); we wait for that `sectors`.  Grow only:
  shrinking a disk under a guest's filesystem destroys what lies past the
  new end, and requests in flight there would fail.
* `change_media` (`xl cd-insert` / `xl cd-eject`): libxl does these only for
  HVM guests, through QEMU (libxl_disk.c: libxl_cdrom_insert writes the new
  `params` and drives QEMU over QMP).  Here they are PV: on a cdrom drive
  (`device-type` cdrom) the toolstack writes the new `params` ("" ejects),
  runs the hotplug `change` step (new loop device, new `physical-device`,
  old loop released) and waits for the backend's `sectors` to match.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time

from xenbed.drivers.xen.store import XenStoreClient
from xenbed.toolstack import devices
from xenbed.toolstack.devices import Device, DeviceError
from xenbed.toolstack.disk_spec import DiskSpec, parse_disk_spec

INITWAIT_TIMEOUT = 20.0  # libxl waits LIBXL_INIT_TIMEOUT (10 s); containers start slower
HOTPLUG_TIMEOUT = 20.0  # for a driver domain's own hotplug step
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


def attach(store: XenStoreClient, frontend_domid: int, spec_text: str, backend_domid: int | None = None,
           wait_connected: float = 20.0) -> Device:
    """Add the disk; its backend domain is `backend_domid`, else the spec's
    `backend=` (a domain name or id), else dom0."""
    spec = parse_disk_spec(spec_text)
    if backend_domid is None:
        backend_domid = devices.backend_domid(store, spec.backend)
    device = vbd_device(spec, frontend_domid, backend_domid)
    devices.write_device(store, device)
    return devices.bring_up(store, device, spec.vdev, lambda path: _hotplug_add(store, device), remove,
                            initwait_timeout=INITWAIT_TIMEOUT, wait_connected=wait_connected)


def _hotplug_add(store: XenStoreClient, device: Device) -> None:
    """Here in dom0 for dom0's backends; a driver domain runs its own (module doc)."""
    if device.backend_domid == devices.TOOLSTACK_DOMID:
        run_hotplug("add", device.backend_path)
    else:
        devices.wait_for_hotplug(store, device.backend_path, HOTPLUG_TIMEOUT, f"vbd {device.devid}")


def find(store: XenStoreClient, frontend_domid: int, vdev: str) -> Device:
    from xenbed.protocols.vdev import vdev_to_number

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
    orderly = not force and devices.close_orderly(store, device, timeout)
    try:
        if device.backend_domid == devices.TOOLSTACK_DOMID:  # a driver domain releases its own (module doc)
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


# ---------------------------------------------------------------------------------------------
# Reconfiguration while Connected
# ---------------------------------------------------------------------------------------------

RECONFIGURE_TIMEOUT = 10.0  # for the backend to publish the new `sectors`
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^(\+)?(\d+)\s*([bkmgt]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(text: str, current: int = 0) -> int:
    """Bytes for a size as xl users write one: "1073741824", "128M", "1G",
    "512k", "2GiB", "64MB" -- binary units (K = 1024, as xl's memory sizes);
    a leading "+" grows `current` by that much.  It must be whole 512-byte
    sectors and not zero.  ValueError otherwise."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"size {text!r} is not a number with an optional unit (K, M, G, T), e.g. 128M")
    relative, number, unit = match.groups()
    size = int(number) * _UNITS[unit.lower()]
    if relative:
        size += current
    if size <= 0:
        raise ValueError(f"size {text!r} is zero")
    if size % 512:
        raise ValueError(f"size {text!r} = {size} bytes is not a whole number of 512-byte sectors")
    return size


def _backend_of(store: XenStoreClient, frontend_domid: int, vdev: str) -> tuple[Device, str]:
    device = find(store, frontend_domid, vdev)
    back = device.backend_path
    if not store.exists(back):
        raise DeviceError(f"dom{frontend_domid}'s disk {vdev} has no backend at {back}")
    return device, back


def _wait_for_sectors(store: XenStoreClient, back: str, sectors: int, timeout: float, what: str) -> bool:
    """Wait until the backend serves `sectors`; False (nothing to wait for)
    when it is not Connected -- it reads the size when it connects."""
    if store.try_read(f"{back}/state") != str(devices.XENBUS_CONNECTED):
        return False
    deadline = time.monotonic() + timeout
    while store.try_read(f"{back}/sectors") != str(sectors):
        if time.monotonic() > deadline:
            raise DeviceError(f"timed out after {timeout:.0f}s waiting for the backend to {what} "
                              f"({back}/sectors is {store.try_read(f'{back}/sectors')}, want {sectors})")
        time.sleep(0.05)
    return True


def resize(store: XenStoreClient, frontend_domid: int, vdev: str, size_text: str,
           timeout: float = RECONFIGURE_TIMEOUT) -> int:
    """Grow a disk online; returns its new size in bytes (see the module doc)."""
    from xenbed.drivers.blk import loop

    device, back = _backend_of(store, frontend_domid, vdev)
    if store.try_read(f"{back}/device-type") == "cdrom":
        raise DeviceError(f"{vdev} is a cdrom drive: its medium has the size it has (use cd-insert)")
    params = store.try_read(f"{back}/params") or ""
    physdev = store.try_read(f"{back}/physical-device")
    target = params.strip()
    for prefix in ("file:", "phy:", "aio:"):  # as the hotplug step reads params
        target = target[len(prefix):] if target.startswith(prefix) else target
    try:
        st = os.stat(target)
    except OSError as exc:
        raise DeviceError(f"{vdev}'s image {target!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeviceError(f"{vdev} is backed by {target}, not an image file: grow the device itself")
    if not physdev:
        raise DeviceError(f"{vdev} has no physical-device yet (the hotplug step has not run)")
    major, minor = loop.parse_physical_device(physdev)
    if major != loop.LOOP_MAJOR:
        raise DeviceError(f"{vdev}'s physical-device {physdev} is not a loop device")
    new_size = parse_size(size_text, st.st_size)
    if new_size < st.st_size:
        raise DeviceError(f"{vdev} is {st.st_size} bytes; shrinking to {new_size} is refused "
                          "(the guest's data past the new end would be lost)")
    if new_size > st.st_size:
        try:
            os.truncate(target, new_size)  # sparse: the new blocks read as zeroes
        except OSError as exc:
            raise DeviceError(f"growing {target} to {new_size} bytes: {exc.strerror}") from None
    try:
        served = loop.set_capacity(minor, st.st_dev, st.st_ino)
    except OSError as exc:
        raise DeviceError(f"setting the capacity of /dev/loop{minor}: {exc}") from None
    _wait_for_sectors(store, back, served // 512, timeout, f"serve {served} bytes")
    return served


def _medium_size(path: str) -> int:
    """Bytes of an image file or a block device (what blkback will serve)."""
    from xenbed.drivers.blk import loop

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    try:
        return loop.device_size(fd)
    finally:
        os.close(fd)


def change_media(store: XenStoreClient, frontend_domid: int, vdev: str, target: str | None,
                 timeout: float = RECONFIGURE_TIMEOUT) -> str:
    """`xl cd-insert` (target) / `xl cd-eject` (None) on a cdrom drive;
    returns the new `params`.  The target is checked as xl's cd-insert does,
    by parsing "vdev=<vdev>,access=r,devtype=cdrom,target=<target>" as a
    disk spec.  We return once the backend serves the new medium's size; a
    medium exactly as large as the old one is told apart by nothing in the
    store, so then we return once the hotplug step wrote it (blkback swaps
    within milliseconds of that write)."""
    device, back = _backend_of(store, frontend_domid, vdev)
    if store.try_read(f"{back}/device-type") != "cdrom":
        raise DeviceError(f"{vdev} is not a cdrom drive (devtype=cdrom): its medium cannot change")
    params = ""
    size = 0
    if target:
        spec = parse_disk_spec(f"vdev={vdev},access=r,devtype=cdrom,target={target}")
        params = spec.target
        path = spec.path
        size = _medium_size(path) if path else 0
    old_params = store.try_read(f"{back}/params") or ""

    def write_params(value: str):
        def body(tx: int) -> None:
            if not store.exists(back, tx):
                raise DeviceError(f"no backend at {back}")
            store.write(f"{back}/params", value, tx)
        store.run_transaction(body)

    write_params(params)
    try:
        run_hotplug("change", back)
    except DeviceError:
        write_params(old_params)  # the old medium is still in (the step leaves it on failure)
        raise
    _wait_for_sectors(store, back, size // 512, timeout, "eject the medium" if not target else f"serve {target}")
    return params
