"""The vif hotplug step: what Xen's /etc/xen/scripts/vif-bridge does, in dom0.

    python3 -m xenbed.drivers.net.hotplug add    /local/domain/0/backend/vif/1/0
    python3 -m xenbed.drivers.net.hotplug remove /local/domain/0/backend/vif/1/0

The toolstack runs it after the backend reached InitWait (libxl runs the
script then); netback has created the tap `vif<domid>.<devid>` (or the
backend's `vifname`) by then and holds its fd.

add (online)
    adds the tap to the bridge named by the backend's `bridge` key (default
    xenbr0), applies `mtu` (default: the bridge's), sets it up, then writes
    `hotplug-status` = connected.  netback goes Connected only after that.
    On failure: `hotplug-error` (the reason), `hotplug-status` = error, exit 1.
remove (offline)
    takes the tap out of the bridge and down if it still exists (netback
    removes it when the device is unregistered), and removes the keys.

Only the bridge script is implemented: a `script` other than vif-bridge
is an error.  `ip` is not turned into anti-spoofing rules (vif-common's
iptables), it is only carried in the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from xenbed.drivers.xenbus.hotplug_status import (
    HotplugError, clear_keys, run_as_command, write_connected, write_error,
)

from . import tap as taplib

log = logging.getLogger("xenbed.net.hotplug")

DEFAULT_BRIDGE = "xenbr0"
HOTPLUG_KEYS = ("hotplug-status", "hotplug-error")


def vif_name(frontend_id: int | str, handle: int | str, vifname: str | None = None) -> str:
    """libxl__device_nic_devname: the backend's `vifname`, else vif<domid>.<devid>."""
    return vifname if vifname else f"vif{int(frontend_id)}.{int(handle)}"


def name_of(store, backend: str) -> str:
    frontend_id = store.try_read(f"{backend}/frontend-id")
    handle = store.try_read(f"{backend}/handle")
    if handle is None:
        handle = backend.rstrip("/").rsplit("/", 1)[-1]
    if frontend_id is None:
        raise HotplugError(f"{backend}/frontend-id is missing")
    return vif_name(frontend_id, handle, store.try_read(f"{backend}/vifname"))


def _mtu_of(name: str) -> int | None:
    try:
        with open(f"/sys/class/net/{name}/mtu") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def add(store, backend: str) -> str:
    """Plug the vif into its bridge; returns the interface name."""
    try:
        script = store.try_read(f"{backend}/script")
        if script and os.path.basename(script) not in ("vif-bridge", ""):
            raise HotplugError(f"script {script!r} is not supported (only vif-bridge)")
        name = name_of(store, backend)
        bridge = store.try_read(f"{backend}/bridge") or DEFAULT_BRIDGE
        mtu_text = store.try_read(f"{backend}/mtu")
        if not taplib.link_exists(name):
            raise HotplugError(f"{name} does not exist (has netback created it?)")
        if not taplib.link_exists(bridge):
            raise HotplugError(f"bridge {bridge} does not exist")
        try:
            mtu = int(mtu_text) if mtu_text else _mtu_of(bridge)
        except ValueError:
            raise HotplugError(f"mtu {mtu_text!r} is not a number") from None
        taplib.set_link(name, mtu=mtu)
        if taplib.link_master(name) != bridge:
            taplib.set_link(name, master=bridge)
        taplib.set_link(name, up=True)
    except (HotplugError, OSError) as exc:
        message = str(exc)
        log.error("%s: hotplug add failed: %s", backend, message)
        write_error(store, backend, message)
        raise HotplugError(message) from exc

    store.run_transaction(lambda tx: write_connected(store, backend, tx))
    log.info("%s: %s on %s (mtu %s), up", backend, name, bridge, mtu)
    return name


def remove(store, backend: str, name: str | None = None) -> bool:
    """Unplug; True if the interface was still there.  A backend dir already
    gone is fine if `name` is given (or the default name can be derived)."""
    if name is None:
        try:
            name = name_of(store, backend)
        except Exception as exc:
            log.info("%s: cannot name the vif (%s): nothing to unplug", backend, exc)
            name = None
    present = bool(name) and taplib.link_exists(name)
    if present:
        try:
            taplib.set_link(name, nomaster=True, up=False)
        except OSError as exc:  # netback may remove it under our feet
            log.info("%s: unplugging %s: %s", backend, name, exc)

    clear_keys(store, backend, HOTPLUG_KEYS)
    log.info("%s: %s %s", backend, name, "unplugged" if present else "already gone")
    return present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.net.hotplug",
                                     description="Xen's vif-bridge hotplug step for a vif backend dir")
    parser.add_argument("action", choices=("add", "remove", "online", "offline"))
    parser.add_argument("backend", help="backend dir, e.g. /local/domain/0/backend/vif/1/0")
    parser.add_argument("--vif", help="interface name (remove, when the dir is gone)")
    args = parser.parse_args(argv)

    def step(store) -> str | None:
        if args.action in ("add", "online"):
            return add(store, args.backend)
        remove(store, args.backend, args.vif)
        return None

    return run_as_command("vif hotplug", args.action, args.backend, step)


if __name__ == "__main__":
    sys.exit(main())
