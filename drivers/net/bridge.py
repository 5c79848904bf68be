"""dom0's bridge: what Xen's old network-bridge script did at boot.

    python3 -m xenbed.drivers.net.bridge [--bridge xenbr0] [--uplink auto|eth0|none]

Creates the bridge (no STP, forward delay 0), gives it the uplink's MAC (so
dom0's address keeps its MAC for the peer's ARP cache whatever vifs join),
enslaves the uplink ("physical" NIC: eth0, dom0's veth on the `uplink`
Docker network), moves the uplink's global addresses to the bridge and
re-creates the routes that went through the uplink with a gateway (the
default route) on the bridge.  Idempotent: run again (netback restarted,
dom0 container restarted) it issues only what is missing, i.e. "up" twice.

`plan(...)` is pure: it turns `ip -j addr show` and `ip -j route show` into
the `ip` commands to run (tests/unit/test_netback_bridge.py).  The uplink
"auto" is the device of the default route; if that is the bridge already,
the bridge's first non-vif port.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

log = logging.getLogger("xenbed.net.bridge")

DEFAULT_BRIDGE = "xenbr0"
VIF_PREFIXES = ("vif", "tap")


def _by_name(links: list[dict]) -> dict[str, dict]:
    return {link["ifname"]: link for link in links}


def choose_uplink(bridge: str, links: list[dict], routes: list[dict]) -> str | None:
    """The interface to enslave when the uplink is "auto"."""
    names = _by_name(links)
    for route in routes:
        if route.get("dst") == "default" and route.get("dev") in names:
            dev = route["dev"]
            if dev != bridge:
                return dev
            break
    for link in links:  # the bridge holds the default route already: its physical port
        if link.get("master") == bridge and not link["ifname"].startswith(VIF_PREFIXES):
            return link["ifname"]
    return None


def _global_addresses(link: dict) -> list[dict]:
    return [a for a in link.get("addr_info", ())
            if a.get("family") in ("inet", "inet6") and a.get("scope", "global") == "global"]


def plan(bridge: str, uplink: str | None, links: list[dict], routes: list[dict]) -> list[list[str]]:
    """The `ip` commands that make `bridge` carry `uplink` and its addresses.

    `links` is `ip -j addr show` (ifname, address, master, addr_info), `routes`
    `ip -j route show` (+ `ip -j -6 route show`), dst "default" for default."""
    names = _by_name(links)
    cmds: list[list[str]] = []
    up = names.get(uplink) if uplink else None
    if uplink and up is None:
        raise ValueError(f"uplink {uplink!r} does not exist")
    if bridge not in names:
        cmds.append(["ip", "link", "add", "name", bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        if up is not None and up.get("address"):
            cmds.append(["ip", "link", "set", "dev", bridge, "address", up["address"]])
    cmds.append(["ip", "link", "set", "dev", bridge, "up"])
    if up is None:
        return cmds
    if up.get("master") != bridge:
        cmds.append(["ip", "link", "set", "dev", uplink, "master", bridge])
    have = {(a["local"], a.get("prefixlen")) for a in _global_addresses(names.get(bridge, {}))}
    moved = _global_addresses(up)
    for a in moved:
        if (a["local"], a.get("prefixlen")) not in have:
            add = ["ip", "addr", "add", f"{a['local']}/{a['prefixlen']}"]
            if a.get("family") == "inet" and a.get("broadcast"):
                add += ["brd", a["broadcast"]]
            cmds.append(add + ["dev", bridge])
    for a in moved:
        cmds.append(["ip", "addr", "del", f"{a['local']}/{a['prefixlen']}", "dev", uplink])
    for route in routes:
        if route.get("dev") == uplink and route.get("gateway"):
            cmd = ["ip"] + (["-6"] if ":" in route["gateway"] else []) + ["route", "replace", route["dst"],
                                                                         "via", route["gateway"], "dev", bridge]
            if route.get("metric") is not None:
                cmd += ["metric", str(route["metric"])]
            cmds.append(cmd)
    cmds.append(["ip", "link", "set", "dev", uplink, "up"])
    return cmds


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def current_state() -> tuple[list[dict], list[dict]]:
    links = _ip_json("addr", "show")
    routes = _ip_json("route", "show")
    try:
        routes += _ip_json("-6", "route", "show")
    except (subprocess.CalledProcessError, ValueError):
        pass
    return links, routes


def setup(bridge: str = DEFAULT_BRIDGE, uplink: str | None = "auto") -> list[list[str]]:
    """Bring the bridge up (idempotent); returns the commands run."""
    links, routes = current_state()
    if uplink == "auto":
        uplink = choose_uplink(bridge, links, routes)
    elif uplink in ("", "none"):
        uplink = None
    cmds = plan(bridge, uplink, links, routes)
    for cmd in cmds:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    log.info("bridge %s up (uplink %s): %d commands", bridge, uplink or "none", len(cmds))
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.net.bridge", description=__doc__.split("\n")[0])
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE)
    parser.add_argument("--uplink", default="auto", help="interface to enslave, 'auto' (default route) or 'none'")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s bridge %(levelname)s %(message)s")
    if args.dry_run:
        links, routes = current_state()
        uplink = choose_uplink(args.bridge, links, routes) if args.uplink == "auto" else (
            None if args.uplink == "none" else args.uplink)
        for cmd in plan(args.bridge, uplink, links, routes):
            print(" ".join(cmd))
        return 0
    for cmd in setup(args.bridge, args.uplink):
        print(" ".join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
