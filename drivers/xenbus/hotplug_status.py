"""What every hotplug step shares: the backend keys it reports through, as
libxl reads them (`hotplug-status` = connected | error, with `hotplug-error`
saying why), and how a step runs as a command (drivers/blk/hotplug.py,
drivers/net/hotplug.py; Xen's /etc/xen/scripts/block and vif-bridge)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable

log = logging.getLogger("xenbed.hotplug")


class HotplugError(Exception):
    """The step failed; its message is what `hotplug-error` says."""


def is_missing(exc: Exception) -> bool:
    return getattr(exc, "errno_name", None) == "ENOENT"


def rm_if_present(store, path: str, tx: int = 0) -> None:
    """Remove a node; one already gone is fine."""
    try:
        store.rm(path, tx)
    except Exception as exc:
        if not is_missing(exc):
            raise


def write_connected(store, backend: str, tx: int) -> None:
    """Inside the step's publishing transaction: success, no stale error."""
    rm_if_present(store, f"{backend}/hotplug-error", tx)
    store.write(f"{backend}/hotplug-status", "connected", tx)


def write_error(store, backend: str, message: str) -> None:
    def body(tx: int) -> None:
        store.write(f"{backend}/hotplug-error", message, tx)
        store.write(f"{backend}/hotplug-status", "error", tx)

    try:
        store.run_transaction(body)
    except Exception as exc:  # the dir may be gone: nothing left to tell
        log.warning("%s: could not write hotplug-error: %s", backend, exc)


def clear_keys(store, backend: str, keys: Iterable[str]) -> None:
    """Remove what the step wrote, in one transaction (the dir may be gone)."""
    def body(tx: int) -> None:
        for key in keys:
            rm_if_present(store, f"{backend}/{key}", tx)

    try:
        store.run_transaction(body)
    except Exception as exc:
        if not is_missing(exc):
            raise


def run_as_command(label: str, action: str, backend: str, step: Callable[[object], str | None]) -> int:
    """Run `step(store)` against the domain's store, printing what it returns;
    exit status 1 with the reason on stderr when it raises HotplugError."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s {label} %(levelname)s %(message)s")
    from xenbed.drivers.xen.store import XenStoreClient

    store = XenStoreClient()
    try:
        out = step(store)
        if out is not None:
            print(out)
        return 0
    except HotplugError as exc:
        print(f"{label} {action} {backend}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
