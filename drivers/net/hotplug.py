"""The vif hotplug step: what Xen's /etc/xen/scripts/vif-bridge does, in dom0.

    python3 -m xenbed.drivers.net.hotplug add    /local/domain/0/backend/vif/1/0
    python3 -m xenbed.drivers.net.hotplug remove /local/domain/0/backend/vif/1/0

The toolstack runs it after the backend reached InitWait (libxl runs the
script then); netback has created the tap `vif<domid>.<devid>` (or the
backend's `vifname`) by then and holds its fd.

add (online)
    adds the tap to the bridge named by the backend's `bridge` key (default
    xenbr0), applies `mtu` (default: the bridge's), installs the vif's
    anti-spoofing chain (below), sets it up, then writes `hotplug-status` =
    connected.  netback goes Connected only after that.
    On failure: `hotplug-error` (the reason), `hotplug-status` = error, exit 1.
remove (offline)
    takes the tap out of the bridge and down if it still exists (netback
    removes it when the device is unregistered), removes its chain and the
    keys.

Anti-spoofing, as vif-common.sh's frob_iptable does with `ip=` (and the
ebtables MAC rules distributions add): nftables, bridge family, one table
`bridge xenbed` whose forward and input hooks dispatch every frame by its
input port through the verdict map `vifs` to the chain of that vif
(`xv_<vif>`), so a vif's rules are added and removed with it, in one nft
transaction each.  A vif's chain drops what its guest sends

* from any MAC but the vif's `mac` (the Ethernet source and ARP's sender);
* to TCP port MIGRATION_PORT anywhere (dom0s' migration receivers are for
  dom0s: toolstack/migrate.py);
* when the backend has `ip`: IPv4 from any other address (DHCP's
  0.0.0.0:68 -> :67 excepted), ARP claiming any other address (0.0.0.0
  probes excepted) and VLAN-tagged frames, which would carry either past.

Frames *to* the guest are not filtered, as in Xen.  Only the bridge script
is implemented: a `script` other than vif-bridge is an error.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import subprocess
import sys

from xenbed.drivers.xenbus.hotplug_status import (
    HotplugError, clear_keys, run_as_command, write_connected, write_error,
)

from . import tap as taplib

log = logging.getLogger("xenbed.net.hotplug")

DEFAULT_BRIDGE = "xenbr0"
HOTPLUG_KEYS = ("hotplug-status", "hotplug-error")
NFT_TABLE = "bridge xenbed"
MIGRATION_PORT = 8002  # toolstack/migrate.py's (dom0 only: that room does not import this one)
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NFT_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


# -- anti-spoofing, pure ----------------------------------------------------------------------------
def chain_of(vif: str) -> str:
    """The nftables chain of a vif: `xv_<name>`, or hex when the name has
    characters nft does not take bare (interface names may)."""
    return f"xv_{vif}" if _NFT_WORD.fullmatch(vif) else f"xv_x{vif.encode().hex()}"


def parse_addresses(text: str | None) -> list[str]:
    """The backend's `ip` (space separated addresses or prefixes, as
    vif_spec writes it) as nft set members; only IPv4, as vif-common."""
    out = []
    for item in (text or "").split():
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise HotplugError(f"ip {item!r} is not an address") from None
        if net.version != 4:
            raise HotplugError(f"ip {item!r}: only IPv4 addresses are enforced")
        out.append(str(net.network_address) if net.prefixlen == 32 else str(net))
    return out


def _base() -> list[str]:
    """The table, its dispatch map and hooks; idempotent (the hooks' one rule each is rewritten)."""
    return [f"add table {NFT_TABLE}",
            f"add map {NFT_TABLE} vifs {{ type ifname : verdict; }}",
            f"add chain {NFT_TABLE} forward {{ type filter hook forward priority filter; policy accept; }}",
            f"add chain {NFT_TABLE} input {{ type filter hook input priority filter; policy accept; }}",
            f"flush chain {NFT_TABLE} forward", f"flush chain {NFT_TABLE} input",
            f"add rule {NFT_TABLE} forward iifname vmap @vifs", f"add rule {NFT_TABLE} input iifname vmap @vifs"]


def _element(vif: str) -> str:
    if not vif or any(c in vif for c in '"\\') or any(c.isspace() for c in vif):
        raise HotplugError(f"{vif!r} is not an interface name")
    return f'{NFT_TABLE} vifs {{ "{vif}" : jump {chain_of(vif)} }}'


def antispoof_add(vif: str, mac: str, addresses: list[str]) -> str:
    """The nft script (one transaction) giving `vif` its chain; run again it
    replaces the chain's rules."""
    mac = mac.lower()
    if not _MAC.fullmatch(mac):
        raise HotplugError(f"mac {mac!r} is not a MAC address")
    chain = f"{NFT_TABLE} {chain_of(vif)}"
    rules = [f"ether saddr != {mac} drop",
             f"ether type arp arp saddr ether != {mac} drop",
             f"meta l4proto tcp th dport {MIGRATION_PORT} drop"]
    if addresses:
        allowed = ", ".join(addresses)
        rules += [f"ether type ip ip saddr {{ {allowed} }} accept",
                  "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
                  "ether type ip drop",
                  f"ether type arp arp saddr ip {{ 0.0.0.0, {allowed} }} accept",
                  "ether type arp drop",
                  "ether type { 8021q, 8021ad } drop"]
    lines = _base() + [f"add chain {chain}", f"flush chain {chain}"]
    lines += [f"add rule {chain} {rule}" for rule in rules]
    lines.append(f"add element {_element(vif)}")
    return "\n".join(lines) + "\n"


def antispoof_remove(vif: str) -> str:
    """The nft script removing `vif`'s chain; fine if it is not there."""
    chain = f"{NFT_TABLE} {chain_of(vif)}"
    return "\n".join(_base() + [f"add chain {chain}", f"add element {_element(vif)}",
                                f"delete element {NFT_TABLE} vifs {{ \"{vif}\" }}",
                                f"flush chain {chain}", f"delete chain {chain}"]) + "\n"


def _nft(script: str) -> None:
    try:
        result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HotplugError("nft is not installed: no anti-spoofing rules, so the vif stays down") from None
    if result.returncode != 0:
        raise HotplugError(f"nft: {result.stderr.strip()}")


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
        mac = store.try_read(f"{backend}/mac")
        if not mac:
            raise HotplugError(f"{backend}/mac is missing: the vif's source address cannot be enforced")
        _nft(antispoof_add(name, mac, parse_addresses(store.try_read(f"{backend}/ip"))))
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
    if name:
        try:
            _nft(antispoof_remove(name))
        except HotplugError as exc:
            log.warning("%s: removing %s's rules: %s", backend, name, exc)

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
