"""The backend keys a hotplug step reports through, as libxl reads them:
`hotplug-status` = connected | error, with `hotplug-error` saying why."""

from __future__ import annotations

import logging

log = logging.getLogger("xenbed.hotplug")


def write_error(store, backend: str, message: str) -> None:
    def body(tx: int) -> None:
        store.write(f"{backend}/hotplug-error", message, tx)
        store.write(f"{backend}/hotplug-status", "error", tx)

    try:
        store.run_transaction(body)
    except Exception as exc:  # the dir may be gone: nothing left to tell
        log.warning("%s: could not write hotplug-error: %s", backend, exc)
