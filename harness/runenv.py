"""The environment a testbed run is interpolated with: what must differ
between two runs on one engine.

* `XENBED_UPLINK_NET`: the first three octets of the run's uplink /24.  Docker
  refuses two networks whose ranges overlap, so each run takes a /24 no
  existing network uses.
* `XENBED_CRED_<NAME>`: a fresh random credential for every domain credential
  the compose file refers to, so a run never authenticates with a value that
  is written in this repository.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from pathlib import Path

CANDIDATE_PREFIXES = [f"172.30.{n}" for n in range(256)] + [f"172.31.{n}" for n in range(256)]
_CREDENTIAL_VARIABLE = re.compile(r"\$\{(XENBED_CRED_[A-Z0-9_]+)")


def used_networks(client) -> list[ipaddress.IPv4Network]:
    used = []
    for network in client.networks.list():
        for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
            subnet = config.get("Subnet")
            if subnet and ":" not in subnet:
                used.append(ipaddress.ip_network(subnet, strict=False))
    return used


def free_uplink_prefix(client) -> str:
    """A free /24, chosen at random among the free ones: runs that start at
    the same moment (xdist workers) look before either creates its network,
    so taking the first free one would give them the same."""
    used = used_networks(client)
    free = [prefix for prefix in CANDIDATE_PREFIXES
            if not any(ipaddress.ip_network(f"{prefix}.0/24").overlaps(net) for net in used)]
    if not free:
        raise RuntimeError("no free /24 left in 172.30.0.0/15 for the run's uplink network")
    return secrets.choice(free)


def fresh_credentials(compose_file: str | Path) -> dict[str, str]:
    text = Path(compose_file).read_text()
    return {name: secrets.token_hex(16) for name in sorted(set(_CREDENTIAL_VARIABLE.findall(text)))}


def run_environment(client, compose_file: str | Path) -> dict[str, str]:
    return {"XENBED_UPLINK_NET": free_uplink_prefix(client), **fresh_credentials(compose_file)}
