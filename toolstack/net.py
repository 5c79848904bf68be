"""Virtual network interfaces: `xl network-attach`, `network-detach`,
`network-list` and the `vif = [...]` of a domain config.

The store keys are libxl's (libxl__set_xenstore_nic / libxl_nic.c):

    frontend device/vif/<devid>:  backend backend-id state handle mac mtu
    backend  backend/vif/<domid>/<devid>:  frontend frontend-id online state
             script mac bridge handle type mtu [rate] [ip] [vifname]

netback creates the tap on probe and goes InitWait; then the toolstack runs
the vif hotplug step (drivers/net/hotplug.py: the tap joins `bridge`, gets
`mtu`, goes up, `hotplug-status=connected`), as libxl runs vif-bridge.
netback goes Connected only after that.

    attach(store, domid, "mac=00:16:3e:00:00:01,bridge=xenbr0", wait_connected=0)   # xl create
    attach(store, domid, "bridge=xenbr0")                      # xl network-attach: waits for Connected
    detach(store, domid, "0") / detach(store, domid, "00:16:3e:00:00:01")
    print(format_list(list_rows(store, domid)))
    set_live(store, domid, "0", parse_live_settings(["mtu=1400", "rate=10Mb/s"]))   # xl network-set

`xl network-set DOMAIN DEVID|MAC mtu=N rate=RATE` is a xenbed extension (real
xl has no command that changes a running vif): it changes a Connected vif
in place, through the device-specific watches seed 000 describes for
reconfiguration ("each driver stays in the Connected state throughout").
In ONE transaction it writes `mtu` in the backend dir (netback applies it
to the vif, as vif-bridge does at hotplug) and in the frontend dir (where
netif.h tells the frontend to look; netfront applies it to the guest's
tap), and `rate` in the backend dir as libxl writes it ("bytes,usecs";
netback re-reads it, as Linux's xen_net_rate_changed).  RATE is xl's syntax
(`10Mb/s`, `1MB/s@20ms`, see vif_spec.parse_rate); `rate=unlimited` (or
`rate=`) removes the limit.  Nothing else changes: no state is written.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from xenbed.drivers.xen.store import XenStoreClient, XenStoreError
from xenbed.toolstack import devices
from xenbed.toolstack.devices import Device, DeviceError
from xenbed.toolstack.vif_spec import VifSpec, parse_rate, parse_vif_spec

INITWAIT_TIMEOUT = 20.0
CLOSE_TIMEOUT = 10.0
DEFAULT_MTU = 1500  # libxl's default
VIF_SCRIPT = "/etc/xen/scripts/vif-bridge"


def next_devid(store: XenStoreClient, frontend_domid: int) -> int:
    """libxl__device_nextid: one past the highest devid in device/vif."""
    try:
        existing = store.directory(f"/local/domain/{frontend_domid}/device/vif")
    except XenStoreError as exc:
        if exc.errno_name == "ENOENT":
            return 0
        raise
    numbers = [int(d) for d in existing if d.isdigit()]
    return max(numbers) + 1 if numbers else 0


def vif_device(spec: VifSpec, frontend_domid: int, backend_domid: int, devid: int) -> Device:
    mtu = str(spec.mtu if spec.mtu is not None else DEFAULT_MTU)
    backend = {
        "script": spec.script or VIF_SCRIPT,
        "mac": spec.mac,
        "bridge": spec.bridge,
        "handle": str(devid),
        "type": "vif",
        "mtu": mtu,
    }
    if spec.rate is not None:
        backend["rate"] = spec.rate_store_value()
    if spec.ip is not None:
        backend["ip"] = spec.ip
    if spec.vifname is not None:
        backend["vifname"] = spec.vifname
    if spec.gatewaydev is not None:
        backend["gatewaydev"] = spec.gatewaydev
    if spec.model is not None:
        backend["model"] = spec.model
    return Device(kind="vif", frontend_domid=frontend_domid, backend_domid=backend_domid, devid=devid,
                  frontend_keys={"handle": str(devid), "mac": spec.mac, "mtu": mtu},
                  backend_keys=backend)


def run_hotplug(action: str, backend_path: str, vif: str | None = None) -> None:
    cmd = [sys.executable, "-m", "xenbed.drivers.net.hotplug", action, backend_path]
    if vif:
        cmd += ["--vif", vif]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DeviceError(f"vif hotplug {action} for {backend_path} failed: "
                          f"{result.stderr.strip() or result.stdout.strip()}")


def attach(store: XenStoreClient, frontend_domid: int, spec_text: str, backend_domid: int = 0,
           wait_connected: float = 20.0, devid: int | None = None) -> Device:
    """Add a vif (seed 000 Device Initialisation); `devid` defaults to the
    spec's, else the next free one (xl create passes the list index)."""
    spec = parse_vif_spec(spec_text)
    if devid is None:
        devid = spec.devid if spec.devid is not None else next_devid(store, frontend_domid)
    device = vif_device(spec, frontend_domid, backend_domid, devid)
    devices.write_device(store, device)
    return devices.bring_up(store, device, f"vif {devid}", lambda path: run_hotplug("add", path), remove,
                            initwait_timeout=INITWAIT_TIMEOUT, wait_connected=wait_connected)


def attach_all(store: XenStoreClient, frontend_domid: int, specs: list[str], backend_domid: int = 0) -> list[Device]:
    """`vif = [...]` at xl create: devid = index in the list, no wait for the guest."""
    return [attach(store, frontend_domid, spec, backend_domid, wait_connected=0, devid=i)
            for i, spec in enumerate(specs)]


def find(store: XenStoreClient, frontend_domid: int, which: str) -> Device:
    """A vif by devid ("0") or MAC ("00:16:3e:..."), as xl network-detach."""
    base = f"/local/domain/{frontend_domid}/device/vif"
    if which.isdigit():
        devid = int(which)
    else:
        wanted = which.strip().lower()
        try:
            devids = store.directory(base)
        except XenStoreError:
            devids = []
        matches = [d for d in devids if (store.try_read(f"{base}/{d}/mac") or "").lower() == wanted]
        if not matches:
            raise DeviceError(f"dom{frontend_domid} has no vif with MAC {which}")
        devid = int(matches[0])
    backend_id = store.try_read(f"{base}/{devid}/backend-id")
    if backend_id is None:
        raise DeviceError(f"dom{frontend_domid} has no vif {which}")
    return Device("vif", frontend_domid, int(backend_id), devid)


def detach(store: XenStoreClient, frontend_domid: int, which: str, timeout: float = CLOSE_TIMEOUT) -> bool:
    """Orderly closedown (seed 000); True if orderly, False if forced."""
    return remove(store, find(store, frontend_domid, which), timeout=timeout)


def _vif_name(store: XenStoreClient, device: Device) -> str:
    vifname = store.try_read(f"{device.backend_path}/vifname")
    return vifname or f"vif{device.frontend_domid}.{device.devid}"


def remove(store: XenStoreClient, device: Device, force: bool = False, timeout: float = CLOSE_TIMEOUT) -> bool:
    vif = _vif_name(store, device)
    orderly = not force and devices.close_orderly(store, device, timeout)
    try:
        run_hotplug("remove", device.backend_path, vif)
    finally:
        devices.remove_directories(store, device)
    return orderly


UNLIMITED = "unlimited"  # LiveSettings.rate: remove the backend's `rate`


@dataclass(frozen=True)
class LiveSettings:
    """What `xl network-set` changes; None: leave it as it is.  `rate` is
    (bytes per interval, interval in us), or UNLIMITED."""

    mtu: int | None = None
    rate: tuple[int, int] | str | None = None


def parse_live_settings(words: list[str]) -> LiveSettings:
    """`mtu=1400 rate=10Mb/s` (words, each may hold several comma-separated
    items as in a vif spec) -> LiveSettings.  ValueError names the item."""
    values: dict[str, object] = {}
    for word in words:
        for item in word.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected key=value (mtu=N, rate=RATE)")
            if key in values:
                raise ValueError(f"{key} given twice")
            try:
                if key == "mtu":
                    if not value.isascii() or not value.isdigit() or not 68 <= int(value) <= 65535:
                        raise ValueError(f"mtu {value!r} is not a number in 68..65535")
                    values[key] = int(value)
                elif key == "rate":
                    values[key] = UNLIMITED if value in ("", UNLIMITED) else parse_rate(value)
                else:
                    raise ValueError("only mtu and rate can be changed on a running vif")
            except ValueError as exc:
                raise ValueError(f"{item!r}: {exc}") from None
    if not values:
        raise ValueError("nothing to set: give mtu=N and/or rate=RATE")
    return LiveSettings(mtu=values.get("mtu"), rate=values.get("rate"))


def set_live(store: XenStoreClient, frontend_domid: int, which: str, settings: LiveSettings) -> Device:
    """Change a vif's MTU and/or rate while it stays connected (see the
    module docstring); returns the device.  One transaction, so both ends
    see the same MTU and no reader sees half of it."""
    device = find(store, frontend_domid, which)
    backend, frontend = device.backend_path, device.frontend_path

    def body(tx: int) -> None:
        if store.try_read(f"{backend}/state", tx) is None:
            raise DeviceError(f"{backend} is gone")
        if settings.mtu is not None:
            store.write(f"{backend}/mtu", str(settings.mtu), tx)
            store.write(f"{frontend}/mtu", str(settings.mtu), tx)
        if settings.rate == UNLIMITED:
            if store.try_read(f"{backend}/rate", tx) is not None:
                store.rm(f"{backend}/rate", tx)
        elif settings.rate is not None:
            store.write(f"{backend}/rate", f"{settings.rate[0]},{settings.rate[1]}", tx)

    store.run_transaction(body)
    return device


def list_rows(store: XenStoreClient, frontend_domid: int) -> list[dict]:
    base = f"/local/domain/{frontend_domid}/device/vif"
    rows = []
    devids = devices.frontend_devids(store, "vif", frontend_domid)
    for devid in sorted(devids, key=lambda d: int(d) if d.isdigit() else -1):
        front = f"{base}/{devid}"

        def num(key: str, path: str = front) -> int:
            value = store.try_read(f"{path}/{key}")
            return int(value) if value is not None and value.strip().lstrip("-").isdigit() else -1

        evtch = num("event-channel")
        if evtch < 0:
            evtch = num("event-channel-tx")
        rows.append({
            "devid": int(devid) if devid.isdigit() else -1,
            "backend_id": num("backend-id"),
            "mac": store.try_read(f"{front}/mac") or "00:00:00:00:00:00",
            "handle": num("handle"),
            "state": num("state"),
            "evtch": evtch,
            "tx_ring_ref": num("tx-ring-ref"),
            "rx_ring_ref": num("rx-ring-ref"),
            "backend": store.try_read(f"{front}/backend") or "",
        })
    return rows


def format_list(rows: list[dict]) -> str:
    """`xl network-list` (xl_vif.c main_networklist)."""
    lines = ["%-3s %-2s %-17s %-6s %-5s %-6s %5s/%-5s %-30s" % (
        "Idx", "BE", "Mac Addr.", "handle", "state", "evt-ch", "tx-", "rx-ring-ref", "BE-path")]
    for r in rows:
        lines.append("%-3d %-2d %s%6d %5d %6d %5d/%-11d %-30s" % (
            r["devid"], r["backend_id"], r["mac"], r["handle"], r["state"], r["evtch"],
            r["tx_ring_ref"], r["rx_ring_ref"], r["backend"]))
    return "\n".join(line.rstrip() for line in lines)
