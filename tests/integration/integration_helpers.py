"""What many integration modules say the same way: run a shell script in a
container, poll for a condition, read a container's XenBus transitions."""

from __future__ import annotations

import time

from xenbed.protocols.xenbus_state import Transition

TRANSITIONS = "/run/xen/transitions.jsonl"  # every domain's XenBus records here (XENBED_TRANSITIONS)


def sh(testbed, service: str, script: str) -> str:
    """Run a shell script in a container; its stdout (failing the test if it fails)."""
    return testbed.exec(service, ["sh", "-c", script], check=True).stdout


def run(testbed, service: str, script: str):
    """The same, for a script that may fail: the whole ExecResult."""
    return testbed.exec(service, ["sh", "-c", script])


def wait_until(probe, what: str, timeout: float = 30, interval: float = 0.2):
    """`probe()` until it returns something truthy (returned); on timeout say
    what was awaited and what the probe saw last."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")


def transitions(testbed, service: str) -> list[Transition]:
    out = testbed.exec(service, ["sh", "-c", f"cat {TRANSITIONS} 2>/dev/null || true"]).stdout
    return [Transition.from_json(line) for line in out.splitlines() if line.strip()]
