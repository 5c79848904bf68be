"""A test's trace: what every domain's XenBus did, what the hypervisor saw and
what the nemesis did, in one JSONL file.

Every domain records its XenBus state transitions in TRANSITIONS_FILE
(protocols/xenbus_state.py, one JSON object per line); the hypervisor
records every XenStore operation, watch event, grant and event-channel
operation in its own trace file (hypervisor/trace.py, HYPERVISOR_TRACE in
the `hypervisor` container); the Testbed records every chaos operation in
`testbed.history` (chaos.py).  After a test, `TranscriptReader.new_records`
takes what each running container wrote since it was last read (so the
first test also gets the boot's negotiation), and `merge` sorts it together
with the test's slice of the history into records

    {"ts": ..., "kind": "transition", "service": "dom0", "path": ..., "role": ..., "from": ..., "to": ...}
    {"ts": ..., "kind": "xenstore", "service": "hypervisor", "op": "WRITE", "domid": 1, "path": ..., ...}
    {"ts": ..., "kind": "watch" | "grant" | "evtchn" | "trace", "service": "hypervisor", ...}
    {"ts": ..., "kind": "chaos", "type": "invoke", "action": "kill", "service": "dom0", "detail": {...}}

written to `out/traces/<test id, sanitized>.jsonl`.  All times are
time.time() of one kernel's clock, so the order is the order things
happened in (to within the microseconds between a store write and the
domain noting its transition).  A restarted container starts a fresh
transitions file; a file shorter than what was read before is read from its
start.  The hypervisor's trace is read from a byte position (its rotation
is followed; a generation that went by unread is said with a `kind:
"trace", event: "lost"` record).  Everything but the readers' `new_*`
methods is pure or plain file I/O.  The diagrams drawn from a trace are
diagram.py's (`diagram.write_diagrams`); this module does not import it.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path
from typing import Iterable

from .xen_hosts import find_xen_hosts

TRANSITIONS_FILE = "/run/xen/transitions.jsonl"  # where every domain's XenBus records (XENBED_TRANSITIONS)
HYPERVISOR_SERVICE = "hypervisor"
HYPERVISOR_TRACE = "/var/log/xenbed/trace.jsonl"  # hypervisor/trace.py TRACE_FILE, in that container
TRACE_DIR = Path("out/traces")
TRANSITION, CHAOS, HOTPLUG = "transition", "chaos", "hotplug"
XENSTORE, WATCH, GRANT, EVTCHN, TRACE = "xenstore", "watch", "grant", "evtchn", "trace"
HYPERVISOR_KINDS = (XENSTORE, WATCH, GRANT, EVTCHN, TRACE)


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


def hypervisor_records(output: str, service: str = HYPERVISOR_SERVICE) -> tuple[dict | None, list[dict]]:
    """The output of `python3 -m xenbed.hypervisor.trace --since ...`: its
    header (the new read position; None if there is none) and its records,
    each marked as the hypervisor's (unreadable lines are skipped)."""
    lines = output.splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or "offset" not in header:
        return None, []
    records = []
    for line in lines[1:]:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("ts"), (int, float)):
            records.append({**data, "service": service})
    return header, records


def write_effects(records: Iterable[dict]) -> dict[int, float | None]:
    """When each OK store write took effect, by id() of its record: its own
    time outside a transaction, else the time its transaction committed;
    None when its transaction did not commit (or its end is not in these
    records).  A watch fires, and the other end can react, only then."""
    records = list(records)
    ends: dict[tuple, list[float]] = {}
    for r in records:
        if r.get("kind") == XENSTORE and r.get("op") == "TRANSACTION_END" and r.get("commit") \
                and r.get("result") == "OK":
            ends.setdefault((r.get("domid"), r.get("conn"), r.get("tx")), []).append(r["ts"])
    for times in ends.values():
        times.sort()
    out: dict[int, float | None] = {}
    for r in records:
        if r.get("kind") != XENSTORE or r.get("op") != "WRITE" or r.get("result") != "OK":
            continue
        if not r.get("tx"):
            out[id(r)] = r["ts"]
            continue
        later = ends.get((r.get("domid"), r.get("conn"), r.get("tx")), [])
        i = bisect.bisect_left(later, r["ts"])
        out[id(r)] = later[i] if i < len(later) else None
    return out


def write_times(records: Iterable[dict]) -> dict[tuple[str, str], list[float]]:
    """When the OK store writes took effect (`write_effects`), by (path, value)."""
    records = list(records)
    out: dict[tuple[str, str], list[float]] = {}
    effects = write_effects(records)
    by_id = {id(r): r for r in records}
    for key, when in effects.items():
        if when is not None:
            r = by_id[key]
            out.setdefault((r.get("path", ""), str(r.get("value", ""))), []).append(when)
    for times in out.values():
        times.sort()
    return out


def state_written_at(transition: dict, times: dict[tuple[str, str], list[float]], window: float = 2.0) -> float | None:
    """When the hypervisor saw `transition`'s state written (from
    `write_times`): the last such write at or before the domain noted the
    transition (domains note it after their write committed, so the
    transition's own ts lags the moment the other end could see it by up to
    milliseconds).  None when the trace has no such write."""
    from xenbed.protocols.xenbus_state import XenbusState
    to = transition.get("to")
    try:
        number = str(int(XenbusState[to])) if isinstance(to, str) else str(int(to))
    except (KeyError, ValueError, TypeError):
        return None
    candidates = times.get((f"{transition.get('path', '').rstrip('/')}/state", number), [])
    i = bisect.bisect_right(candidates, transition["ts"])
    if i and transition["ts"] - candidates[i - 1] <= window:
        return candidates[i - 1]
    return None


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


class TranscriptReader:
    """Reads each container's transitions file, and the trace of each Xen
    host's hypervisor (several in compose/two-hosts.yml), incrementally,
    across tests."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}  # service -> lines already read
        # hypervisor service -> "<file identity>:<byte offset>" read up to (trace.py read_since)
        self.hypervisor_positions: dict[str, str] = {}

    def new_records(self, testbed) -> list[dict]:
        """Everything since the last call: every domain's transitions and the
        hypervisors' records (unsorted; `merge` sorts)."""
        rows = testbed.status()
        return self.new_transitions(testbed, rows) + self.new_hypervisor_records(testbed, rows)

    def new_hypervisor_records(self, testbed, rows: list[dict] | None = None) -> list[dict]:
        """What each running hypervisor traced since the last call, each record
        marked with its hypervisor's service ([] when none runs or traces)."""
        running = {row["service"] for row in (testbed.status() if rows is None else rows)
                   if row.get("state") == "running"}
        hypervisors = [h.hypervisor for h in find_xen_hosts(testbed.service_labels()).values() if h.hypervisor]
        records = []
        for service in hypervisors:
            if service in running:
                records += self._hypervisor_records(testbed, service)
        return records

    def _hypervisor_records(self, testbed, service: str) -> list[dict]:
        position = self.hypervisor_positions.get(service, ":0")
        result = testbed.exec(service, ["python3", "-m", "xenbed.hypervisor.trace",
                                        "--since", position, "--file", HYPERVISOR_TRACE])
        if result.exit_code != 0:
            return []
        header, records = hypervisor_records(result.stdout, service)
        if header is None:
            return []
        if header.get("lost"):
            ts = records[0]["ts"] if records else 0.0
            records.insert(0, {"ts": ts, "kind": TRACE, "event": "lost", "service": service,
                               "why": "the hypervisor's trace rotated twice (or was replaced) between two reads"})
        self.hypervisor_positions[service] = f"{header.get('ident', '')}:{int(header['offset'])}"
        return records

    def new_transitions(self, testbed, rows: list[dict] | None = None) -> list[dict]:
        """The transition lines every running container wrote since the last call."""
        records = []
        for row in testbed.status() if rows is None else rows:
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
