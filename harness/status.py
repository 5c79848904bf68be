"""Status rows of a run's containers, and the fixed-width table people read."""

from __future__ import annotations

from typing import Iterable, Mapping

from .resources import SERVICE

COLUMNS = ("service", "container", "state", "health", "started")


def status_row(service: str, container) -> dict[str, str]:
    """One row; `container` is a docker Container (reloaded by the caller) or None if not created."""
    if container is None:
        return {"service": service, "container": "-", "state": "missing", "health": "-", "started": "-"}
    state = container.attrs.get("State", {})
    started = state.get("StartedAt", "")
    return {
        "service": service,
        "container": container.name,
        "state": state.get("Status", container.status),
        "health": (state.get("Health") or {}).get("Status", "-"),
        # "0001-01-01T00:00:00Z" is the engine's "never"; seconds are precise enough for people
        "started": "-" if not started or started.startswith("0001") else started[:19].replace("T", " "),
    }


def rows_from_containers(containers: Iterable) -> list[dict[str, str]]:
    """Rows for containers found by label (no compose file needed), sorted by service."""
    rows = [status_row(c.labels.get(SERVICE, c.name), c) for c in containers]
    return sorted(rows, key=lambda row: row["service"])


def render_status_table(rows: Iterable[Mapping[str, str]]) -> str:
    rows = list(rows)
    if not rows:
        return "(no containers)"
    widths = {col: max(len(col), *(len(str(row.get(col, ""))) for row in rows)) for col in COLUMNS}
    lines = ["  ".join(col.upper().ljust(widths[col]) for col in COLUMNS).rstrip()]
    lines += ["  ".join(str(row.get(col, "")).ljust(widths[col]) for col in COLUMNS).rstrip() for row in rows]
    return "\n".join(lines)
