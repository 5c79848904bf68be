"""A test's trace: what every domain's XenBus did and what the nemesis did, in one JSONL file.

Every domain records its XenBus state transitions in TRANSITIONS_FILE
(protocols/xenbus_state.py, one JSON object per line); the Testbed records
every chaos operation in `testbed.history` (chaos.py).  After a test,
`TranscriptReader.new_transitions` takes the lines each running container
wrote since it was last read (so the first test also gets the boot's
negotiation), and `merge` sorts them together with the test's slice of the
history into records

    {"ts": ..., "kind": "transition", "service": "dom0", "path": ..., "role": ..., "from": ..., "to": ...}
    {"ts": ..., "kind": "chaos", "type": "invoke", "action": "kill", "service": "dom0", "detail": {...}}

written to `out/traces/<test id, sanitized>.jsonl`.  A restarted container
starts a fresh file; a file shorter than what was read before is read from
its start.  Everything but `new_transitions` is pure or plain file I/O.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

TRANSITIONS_FILE = "/run/xen/transitions.jsonl"  # where every domain's XenBus records (XENBED_TRANSITIONS)
TRACE_DIR = Path("out/traces")
TRANSITION, CHAOS, HOTPLUG = "transition", "chaos", "hotplug"


def sanitize(nodeid: str) -> str:
    """A test id as a file name: `tests/x/test_a.py::test_b[1-2]` -> `tests.x.test_a.py..test_b-1-2`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid.replace("/", ".").replace("::", ".."))
    return name.strip("-.")[:180] or "test"


def trace_path(nodeid: str, directory: str | Path = TRACE_DIR) -> Path:
    return Path(directory) / f"{sanitize(nodeid)}.jsonl"


def diagram_paths(nodeid: str, directory: str | Path = TRACE_DIR) -> tuple[Path, Path]:
    """(Mermaid markdown, SVG) of a test's trace, beside it."""
    base = Path(directory) / sanitize(nodeid)
    return base.with_name(base.name + ".md"), base.with_name(base.name + ".svg")


def workload_paths(nodeid: str, directory: str | Path = TRACE_DIR) -> tuple[Path, Path]:
    """(history JSONL, nothing-lost report) of a test's block workload, beside its trace."""
    base = sanitize(nodeid)
    return Path(directory) / f"{base}.workload.jsonl", Path(directory) / f"{base}.nothing-lost.txt"


def transition_records(lines: Iterable[str], service: str) -> list[dict]:
    """Transition lines of one container as trace records (unreadable lines are skipped)."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(data, dict) and "ts" in data:
            out.append({"ts": float(data["ts"]), "kind": data.pop("kind", TRANSITION), "service": service, **data})
    return out


def chaos_records(history: Iterable[dict]) -> list[dict]:
    return [{"kind": CHAOS, **entry} for entry in history]


def merge(*groups: Iterable[dict]) -> list[dict]:
    """All records, by time (stable: equal times keep their order)."""
    return sorted((r for group in groups for r in group), key=lambda r: r["ts"])


def write(path: str | Path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def read(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def transitions_of(records: Iterable[dict]):
    """The XenBus transitions among trace records, as protocol Transitions (for `violations`)."""
    from xenbed.protocols.xenbus_state import Transition
    return [Transition.from_json(json.dumps(r)) for r in records if r.get("kind") == TRANSITION]


def write_diagrams(nodeid: str, records: list[dict], directory: str | Path = TRACE_DIR) -> tuple[Path, Path]:
    from .diagram import render_markdown, render_svg
    markdown, svg = diagram_paths(nodeid, directory)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(records, nodeid), encoding="utf-8")
    svg.write_text(render_svg(records), encoding="utf-8")
    return markdown, svg


class TranscriptReader:
    """Reads each container's transitions file incrementally, across tests."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}  # service -> lines already read

    def new_transitions(self, testbed) -> list[dict]:
        """The transition lines every running container wrote since the last call."""
        records = []
        for row in testbed.status():
            service = row["service"]
            if row.get("state") != "running":
                continue
            result = testbed.exec(service, ["sh", "-c", f"cat {TRANSITIONS_FILE} 2>/dev/null || true"])
            lines = [line for line in result.stdout.splitlines() if line.strip()]
            start = self.seen.get(service, 0)
            if len(lines) < start:  # the container was recreated or restarted with a fresh file
                start = 0
            records += transition_records(lines[start:], service)
            self.seen[service] = len(lines)
        return records
