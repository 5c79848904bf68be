"""The guest OS's network configuration, as /etc/network/interfaces would
give it: XENBED_IFCONFIG="eth0=172.30.0.129/24 eth1=10.0.0.2/24".

netfront creates the interfaces when the toolstack attaches vifs (any time,
in any order); this waits for each and gives it its address whenever it
(re)appears.  Static addresses only: the guest has no other network.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading

log = logging.getLogger("xenbed.kernel.netconfig")


def parse(spec: str) -> dict[str, str]:
    """"eth0=10.0.0.2/24 eth1=..." -> {"eth0": "10.0.0.2/24", ...}."""
    out = {}
    for item in spec.replace(",", " ").split():
        name, sep, address = item.partition("=")
        if not sep or not name or "/" not in address:
            raise ValueError(f"bad XENBED_IFCONFIG item {item!r}: expected NAME=ADDRESS/PREFIX")
        out[name] = address
    return out


def _configured(name: str, address: str) -> bool | None:
    """None: no such interface; else whether it has the address."""
    result = subprocess.run(["ip", "-o", "addr", "show", "dev", name], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return f" {address} " in result.stdout


def start(stop: threading.Event, spec: str | None = None) -> threading.Thread | None:
    spec = os.environ.get("XENBED_IFCONFIG", "") if spec is None else spec
    wanted = parse(spec)
    if not wanted:
        return None

    def loop() -> None:
        while not stop.wait(0.3):
            for name, address in wanted.items():
                state = _configured(name, address)
                if state is False:
                    subprocess.run(["ip", "addr", "add", address, "dev", name], capture_output=True)
                    log.info("%s: %s", name, address)

    thread = threading.Thread(target=loop, name="netconfig", daemon=True)
    thread.start()
    return thread
