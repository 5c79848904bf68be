"""A device's negotiation, drawn from trace records (pure: records in, text
out; only `write_diagrams` writes the two files beside a test's trace).

Theory of operation.  A trace (trace.py) is a time-sorted list of dicts:
`kind: "transition"` records (ts, path, role, from, to), `kind: "chaos"`
records (ts, action, service, detail, type) and, when something emits them,
`kind: "hotplug"` records (ts, path = the backend dir, event).  One device is
the pair of directories

    backend   /local/domain/<B>/backend/<type>/<U>/<id>
    frontend  /local/domain/<U>/device/<type>/<id>

and is named here by its frontend dir (`device_of` maps either to it).

The pictures follow seed 000's event diagrams: columns Hotplug | Backend |
Frontend, time going down, the new state's name in the column of the end
that changed.  A transition is an arrow to the other end when it is a state
the other end acts on (`SIGNALS`: the peer's InitWait, Initialised,
Connected, Closing, Closed, as blkfront/blkback's otherend_changed do) and
the device's next transition is indeed the other end's (it reacted, as
Initialised -> Connected or Closed <- Closed in the seed); otherwise it is a
note on its own column.  A transition the seed table does not allow carries
" (not allowed)".  Chaos operations (invoke, fail, info; not the plain "ok")
are notes across every column.  The Hotplug column appears in the Mermaid
diagram only when hotplug records exist; the SVG always draws it, as the seed.

The hypervisor's records (hypervisor/trace.py) add what the negotiation
*exchanges*, and only that, so the picture stays readable (`device_records`
picks them; every XenStore read, watch event and event-channel send is left
out, as are `state` writes, which the transitions already are):

* store writes of the shared-ring keys in the device's two dirs, as notes on
  the dir's column: `ring-ref`, `ring-refN`, `ring-page-order`,
  `tx-ring-ref`, `rx-ring-ref`, `event-channel`, `event-channel-tx/-rx`
  (`NEGOTIATION_KEYS`); `hotplug-status`, on the Hotplug column; and the
  `state` writes no end noted as its own transition (the toolstack's: both
  dirs' Initialising at creation, the backend's Closing on a detach), with
  the writer's domid.  A write counts when its transaction committed, and is
  drawn at that time; writes of aborted transactions are left out;
* the backend's grant map and unmap of a ref the frontend wrote for this
  device, and the frontend's end of that grant: dotted arrows from the
  backend to the frontend ("map ring-ref 8"), a note for the end;
* the event-channel bind of the port the frontend wrote for this device
  (a dotted arrow, "bind event-channel 12 -> port 9"), and the closes of
  both ends' ports.

A grant or port belongs to a device through the frontend's write: a map of
`granter`'s ref R belongs to the device whose frontend dir last got R
written by `granter` before the map (refs and ports are reused, so the last
write before wins).  `steps(..., kinds=...)` draws only the kinds asked for
(`xenbed trace --kinds transition` gives the picture without them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from xenbed.protocols.xenbus_state import allowed

from . import trace
from .trace import state_written_at, write_effects, write_times

_BACKEND = re.compile(r"^/local/domain/(\d+)/backend/([^/]+)/(\d+)/([^/]+)/?$")
_FRONTEND = re.compile(r"^/local/domain/(\d+)/device/([^/]+)/([^/]+)/?$")

_NEGOTIATION_KEY = re.compile(r"^(ring-ref\d*|ring-page-order|tx-ring-ref|rx-ring-ref|event-channel(-tx|-rx)?"
                              r"|hotplug-status)$")
_REF_KEY = re.compile(r"^(ring-ref\d*|tx-ring-ref|rx-ring-ref)$")
_PORT_KEY = re.compile(r"^event-channel(-tx|-rx)?$")
NEGOTIATION_KEYS = _NEGOTIATION_KEY.pattern
HYPERVISOR_KINDS = ("xenstore", "grant", "evtchn")
ALL_KINDS = ("transition", "hotplug", "chaos") + HYPERVISOR_KINDS

HOTPLUG, BACKEND, FRONTEND = "hotplug", "backend", "frontend"
_NAMES = {HOTPLUG: "Hotplug", BACKEND: "Backend", FRONTEND: "Frontend"}
_MERMAID_ID = {HOTPLUG: "H", BACKEND: "B", FRONTEND: "F"}
# The states of one end that the other end's otherend_changed acts on.
SIGNALS = {BACKEND: frozenset({"InitWait", "Connected", "Closing", "Closed"}),
           FRONTEND: frozenset({"Initialised", "Closing", "Closed"})}


def device_of(path: str) -> str:
    """The device a backend or frontend dir belongs to, as its frontend dir."""
    m = _BACKEND.match(path)
    if m:
        _, kind, guest, devid = m.groups()
        return f"/local/domain/{guest}/device/{kind}/{devid}"
    return path.rstrip("/")


def devices(records: list[dict]) -> list[str]:
    """Every device with a transition or hotplug record, in order of first appearance."""
    seen: dict[str, None] = {}
    for r in records:
        if r.get("kind") in ("transition", "hotplug") and r.get("path"):
            seen.setdefault(device_of(r["path"]), None)
    return list(seen)


@dataclass(frozen=True)
class Step:
    """One row of a picture: `label` in column `at`, an arrow to `to` if set."""

    ts: float
    at: str  # HOTPLUG | BACKEND | FRONTEND | "all" (a chaos note)
    label: str
    to: str | None = None
    kind: str = "transition"  # also hotplug, chaos, xenstore, grant, evtchn (dotted arrows)


# -- which hypervisor records belong to a device ----------------------------------

def _guest(device: str) -> int:
    """The frontend's domid of a device named by its frontend dir (-1 if it is not one)."""
    m = _FRONTEND.match(device)
    return int(m.group(1)) if m else -1


def _split_key(path: str) -> tuple[str, str]:
    folder, _, key = path.rpartition("/")
    return folder, key


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


class _Owners:
    """Who wrote which ref/port for which device: (granter domid, number) ->
    [(ts, device)] from the frontends' OK writes of the ring keys."""

    def __init__(self, records: list[dict]) -> None:
        self.refs: dict[tuple[int, int], list[tuple[float, str]]] = {}
        self.ports: dict[tuple[int, int], list[tuple[float, str]]] = {}
        for r in records:
            if r.get("kind") != "xenstore" or r.get("op") != "WRITE" or r.get("result") != "OK":
                continue
            folder, key = _split_key(r.get("path", ""))
            if not _FRONTEND.match(folder):
                continue
            number = _int(r.get("value"))
            table = self.refs if _REF_KEY.match(key) else self.ports if _PORT_KEY.match(key) else None
            if table is not None and number is not None:
                table.setdefault((r.get("domid"), number), []).append((r["ts"], device_of(folder)))

    @staticmethod
    def owner(table, domid, number, ts: float) -> str | None:
        best = None
        for when, device in table.get((domid, number), ()):
            if when <= ts and (best is None or when >= best[0]):
                best = (when, device)
        return best[1] if best else None


def device_records(records: list[dict], device: str, kinds=ALL_KINDS) -> list[dict]:
    """The records of `device`'s picture, in time order: its transitions and
    hotplug records, every chaos record, and the hypervisor's records of its
    negotiation (see the module's docstring); only those of `kinds`."""
    device = device_of(device)
    kinds = set(kinds)
    owners = _Owners(records) if kinds & set(HYPERVISOR_KINDS) else None
    guest = _guest(device)
    bound: set[tuple[int, int]] = set()  # (domid, port) of this device's ports, both ends
    mine = []
    for r in _by_effect(records):
        kind = r.get("kind")
        if kind not in kinds:
            continue
        if kind in ("transition", "hotplug", "chaos"):
            if concerns(r, device):
                mine.append(r)
        elif kind == "xenstore":
            if r.get("op") == "WRITE" and r.get("result") == "OK" and not r.get("aborted"):
                folder, key = _split_key(r.get("path", ""))
                if device_of(folder) == device and (_NEGOTIATION_KEY.match(key) or
                                                    (key == "state" and not r.get("anchors"))):
                    mine.append(r)
        elif kind == "grant":
            if r.get("op") in ("map", "unmap") and r.get("granter") == guest and \
                    owners.owner(owners.refs, guest, r.get("ref"), r["ts"]) == device:
                mine.append(r)
            elif r.get("op") == "end" and r.get("domid") == guest and \
                    owners.owner(owners.refs, guest, r.get("ref"), r["ts"]) == device:
                mine.append(r)
        elif kind == "evtchn":
            op, domid = r.get("op"), r.get("domid")
            if op == "bind_interdomain" and r.get("remote_domid") == guest and \
                    owners.owner(owners.ports, guest, r.get("remote_port"), r["ts"]) == device:
                mine.append(r)
                if "error" not in r:
                    bound.add((domid, r.get("port")))
                    bound.add((guest, r.get("remote_port")))
            elif op == "close" and (domid, r.get("port")) in bound:
                mine.append(r)
                bound.discard((domid, r.get("port")))
    return mine


def _by_effect(records: list[dict]) -> list[dict]:
    """Records in the order things took effect (copies where a time moves):
    a store write at the time its transaction committed (`written_ts`: when
    it was sent; `aborted` if it never committed), a transition at the time
    the hypervisor saw its state written (when the trace has that write),
    not the later moment the domain noted it (`noted_ts`) -- else the other
    end's reaction would be drawn before its cause.  A state write no
    transition was noted for (the toolstack's, e.g. the backend's Closing
    on `xl block-detach`) is left without `anchors`, so it is drawn."""
    if not any(r.get("kind") == "xenstore" for r in records):
        return sorted(records, key=lambda r: r["ts"])
    effects = write_effects(records)
    times = write_times(records)
    anchored: set[tuple[str, float]] = set()
    out = []
    for r in records:
        if r.get("kind") == "transition":
            written = state_written_at(r, times)
            if written is not None:
                anchored.add((f"{r['path'].rstrip('/')}/state", written))
                r = {**r, "ts": written, "noted_ts": r["ts"]}
        elif id(r) in effects:
            when = effects[id(r)]
            r = {**r, "aborted": True} if when is None else {**r, "ts": when, "written_ts": r["ts"]}
        out.append(r)
    for i, r in enumerate(out):
        if r.get("kind") == "xenstore" and (r.get("path"), r["ts"]) in anchored:
            out[i] = {**r, "anchors": True}
    return sorted(out, key=lambda r: r["ts"])


def steps(records: list[dict], device: str, kinds=ALL_KINDS) -> list[Step]:
    """The rows of `device`'s picture, in time order (chaos records included)."""
    device = device_of(device)
    guest = _guest(device)
    mine = device_records(records, device, kinds)
    ends = [_end(r, guest) if r["kind"] != "chaos" else None for r in mine]
    out = []
    for i, r in enumerate(mine):
        if r["kind"] == "chaos":
            if r.get("type", "invoke") != "ok":
                out.append(Step(r["ts"], "all", _chaos_label(r), kind="chaos"))
            continue
        end = ends[i]
        # who acts next: the hotplug script is nobody's answer to a state change
        following = next((e for e in ends[i + 1:] if e in (BACKEND, FRONTEND)), None)
        if r["kind"] == "hotplug" or (r["kind"] == "xenstore" and end == HOTPLUG):
            label = str(r.get("event", "hotplug")) if r["kind"] == "hotplug" else _write_label(r)
            out.append(Step(r["ts"], HOTPLUG, label, to=BACKEND if following == BACKEND else None, kind="hotplug"))
            continue
        if r["kind"] in HYPERVISOR_KINDS:
            step = _resource_step(r, end)
            if r["kind"] == "xenstore" and _split_key(r.get("path", ""))[1] == "state" and end in SIGNALS:
                # someone else's state write the other end acts on: an arrow, as a transition's
                other = FRONTEND if end == BACKEND else BACKEND
                if step.label.split()[2] in SIGNALS[end] and following == other:
                    step = Step(step.ts, end, step.label, to=other)
            out.append(step)
            continue
        label = r["to"]
        if not _allowed(r):
            label += " (not allowed)"
        other = FRONTEND if end == BACKEND else BACKEND
        signals = r["to"] in SIGNALS[end]
        out.append(Step(r["ts"], end, label, to=other if signals and following == other else None))
    return out


def _write_label(r: dict) -> str:
    folder, key = _split_key(r.get("path", ""))
    value = r.get("value", "")
    if key == "state":  # a state write no end noted as its transition: say whose it was
        try:
            value = _state(int(value)).name
        except ValueError:
            pass
        return f"state = {value} (by dom{r.get('domid')})"
    if key == "hotplug-status":
        return f"hotplug {value}"  # short: the Hotplug column is at the picture's edge
    return f"{key} = {value}"


def _resource_step(r: dict, end: str) -> Step:
    """A hypervisor record of the device's negotiation as a row: writes and
    closes as notes on their end, a map/unmap/bind as a dotted arrow to the
    other end (whose page or port it is)."""
    kind, op = r["kind"], r.get("op")
    other = FRONTEND if end == BACKEND else BACKEND
    failed = r.get("error") or (r.get("status") if r.get("status") not in (None, "GNTST_okay") else None)
    suffix = f" FAILED {failed}" if failed else ""
    if kind == "xenstore":
        return Step(r["ts"], end, _write_label(r), kind=kind)
    if kind == "grant" and op in ("map", "unmap"):
        return Step(r["ts"], end, f"{op} gref {r.get('ref')}{suffix}", to=other, kind=kind)
    if kind == "grant":
        return Step(r["ts"], end, f"{op} gref {r.get('ref')}{suffix}", kind=kind)
    if op == "bind_interdomain":
        port = f" -> port {r['port']}" if r.get("port") is not None else ""
        return Step(r["ts"], end, f"bind port {r.get('remote_port')}{port}{suffix}", to=other, kind=kind)
    return Step(r["ts"], end, f"{op} port {r.get('port')}{suffix}", kind=kind)


def participants(records: list[dict], device: str, kinds=ALL_KINDS) -> list[str]:
    device = device_of(device)
    guest = _guest(device)
    hotplug = any(r["kind"] != "chaos" and _end(r, guest) == HOTPLUG for r in device_records(records, device, kinds))
    return ([HOTPLUG] if hotplug else []) + [BACKEND, FRONTEND]


# -- Mermaid ------------------------------------------------------------------------

def render_mermaid(records: list[dict], device: str, kinds=ALL_KINDS) -> str:
    """`device`'s negotiation as a Mermaid sequenceDiagram."""
    device = device_of(device)
    ends = participants(records, device, kinds)
    lines = ["sequenceDiagram", f"    %% device {device}"]
    lines += [f"    participant {_MERMAID_ID[e]} as {_NAMES[e]}" for e in ends]
    span = f"{_MERMAID_ID[ends[0]]},{_MERMAID_ID[ends[-1]]}"
    for s in steps(records, device, kinds):
        text = _mermaid_text(s.label)
        if s.at == "all":
            lines.append(f"    Note over {span}: {text}")
        elif s.to is not None:
            arrow = "-->>" if s.kind in HYPERVISOR_KINDS else "->>"
            lines.append(f"    {_MERMAID_ID[s.at]}{arrow}{_MERMAID_ID[s.to]}: {text}")
        else:
            lines.append(f"    Note over {_MERMAID_ID[s.at]}: {text}")
    return "\n".join(lines) + "\n"


def render_markdown(records: list[dict], title: str = "", kinds=ALL_KINDS, only: str | None = None) -> str:
    """Every device of a trace (or `only` that one), one Mermaid block each (GitHub renders these)."""
    parts = [f"# {title}\n"] if title else []
    for device in [device_of(only)] if only else devices(records):
        parts.append(f"## {device}\n\n```mermaid\n{render_mermaid(records, device, kinds)}```\n")
    if len(parts) == (1 if title else 0):
        parts.append("(no device transitions in this trace)\n")
    return "\n".join(parts)


# -- SVG ----------------------------------------------------------------------------

_COLUMN_X = {HOTPLUG: 90, BACKEND: 290, FRONTEND: 490}
_WIDTH, _ROW, _TOP = 640, 36, 70


def render_svg(records: list[dict], device: str | None = None, kinds=ALL_KINDS) -> str:
    """`device`'s negotiation (every device, stacked, when None) as a standalone SVG
    document laid out like seed 000's event diagrams."""
    chosen = [device_of(device)] if device else devices(records)
    blocks, y = [], 0
    for d in chosen:
        body, height = _svg_device(records, d, kinds)
        blocks.append(f'<g transform="translate(0,{y})">\n{body}</g>\n')
        y += height
    if not blocks:
        blocks.append('<text x="20" y="40" class="title">no device transitions in this trace</text>\n')
        y = 60
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{y}" '
            f'viewBox="0 0 {_WIDTH} {y}" font-family="monospace" font-size="12">\n'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>\n'
            '<style>.title{font-weight:bold}.chaos{fill:#b00}.bad{fill:#b00;font-weight:bold}'
            '.time{fill:#777;font-size:10px}.xenstore,.grant,.evtchn{fill:#046;font-size:11px}</style>\n'
            + "".join(blocks) + "</svg>\n")


def _svg_device(records: list[dict], device: str, kinds=ALL_KINDS) -> tuple[str, int]:
    rows = steps(records, device, kinds)
    start = rows[0].ts if rows else 0.0
    bottom = _TOP + _ROW * (len(rows) + 1)
    out = [f'<text x="10" y="18" class="title">{escape(device)}</text>\n']
    for end, x in _COLUMN_X.items():
        heading = _NAMES[end] if end == HOTPLUG else f"Xenbus {_NAMES[end]}"
        out.append(f'<text x="{x}" y="40" text-anchor="middle">{escape(heading)}</text>\n'
                   f'<line x1="{x - 40}" y1="46" x2="{x + 40}" y2="46" stroke="black"/>\n'
                   f'<line x1="{x}" y1="{_TOP - 10}" x2="{x}" y2="{bottom}" stroke="black" '
                   f'stroke-dasharray="{"4 4" if end == HOTPLUG else "none"}"/>\n')
    for i, s in enumerate(rows):
        y = _TOP + _ROW * (i + 1)
        out.append(f'<text x="4" y="{y + 4}" class="time">+{s.ts - start:.3f}s</text>\n')
        if s.at == "all":
            out.append(f'<line x1="{_COLUMN_X[HOTPLUG] - 40}" y1="{y}" x2="{_COLUMN_X[FRONTEND] + 60}" y2="{y}" '
                       f'stroke="#b00" stroke-dasharray="6 3"/>\n'
                       f'<text x="{_COLUMN_X[BACKEND] + 100}" y="{y - 4}" text-anchor="middle" '
                       f'class="chaos">{escape(s.label)}</text>\n')
            continue
        x = _COLUMN_X[s.at]
        width = 7.5 * len(s.label) + 8
        if s.to is not None:  # from the label's edge to the other lifeline
            tx = _COLUMN_X[s.to]
            sx = x + (width / 2 + 2) * (1 if tx > x else -1)
            ex = tx - (6 if tx > x else -6)
            dash = ' stroke-dasharray="5 3"' if s.kind in HYPERVISOR_KINDS else ""
            out.append(f'<line x1="{sx:.1f}" y1="{y}" x2="{ex}" y2="{y}" stroke="black"{dash} '
                       f'marker-end="url(#arrow)"/>\n')
        css = "bad" if s.label.endswith("(not allowed)") or " FAILED " in s.label else s.kind
        out.append(f'<rect x="{x - width / 2:.1f}" y="{y - 12}" width="{width:.1f}" height="17" fill="white"/>\n'
                   f'<text x="{x}" y="{y + 2}" text-anchor="middle" class="{css}">{escape(s.label)}</text>\n')
    return "".join(out), bottom + 30


# -- helpers ------------------------------------------------------------------------

def concerns(record: dict, device: str) -> bool:
    """Whether a record belongs in `device`'s picture (chaos records belong in every one)."""
    if record.get("kind") == "chaos":
        return True
    return record.get("kind") in ("transition", "hotplug") and device_of(record.get("path", "")) == device


def _end(record: dict, guest: int = -1) -> str:
    """The column of a record: a transition's role; for the hypervisor's
    records, the frontend's column when the frontend's domain made the call,
    else the backend's (hotplug-status writes: the Hotplug column)."""
    kind = record["kind"]
    if kind == "hotplug":
        return HOTPLUG
    if kind == "transition":
        return BACKEND if record.get("role") == BACKEND else FRONTEND
    if kind == "xenstore":  # by the dir written, whoever wrote it
        folder, key = _split_key(record.get("path", ""))
        if key == "hotplug-status":
            return HOTPLUG
        return BACKEND if _BACKEND.match(folder) else FRONTEND
    return FRONTEND if record.get("domid") == guest else BACKEND


def _allowed(record: dict) -> bool:
    try:
        return record["from"] != record["to"] and allowed(record["role"], _state(record["from"]), _state(record["to"]))
    except (KeyError, ValueError):
        return False


def _state(value):
    from xenbed.protocols.xenbus_state import XenbusState
    return XenbusState[value] if isinstance(value, str) else XenbusState(value)


def _chaos_label(record: dict) -> str:
    detail = record.get("detail") or {}
    extra = " ".join(f"{k}={v}" for k, v in detail.items()) if isinstance(detail, dict) else str(detail)
    outcome = "" if record.get("type", "invoke") == "invoke" else f" -> {record['type']}"
    error = f" ({record['error']})" if record.get("error") else ""
    return f"chaos: {record.get('action')} {record.get('service')}{(' ' + extra) if extra else ''}{outcome}{error}"


def _mermaid_text(text: str) -> str:
    """Mermaid message text: no newlines, no `;` or `#` (statement/entity syntax)."""
    return " ".join(text.split()).replace(";", ",").replace("#", "no.")


def write_diagrams(nodeid: str, records: list[dict], directory: str | Path = trace.TRACE_DIR) -> tuple[Path, Path]:
    """The Mermaid markdown and the SVG of a test's trace, beside it (trace.diagram_paths)."""
    markdown, svg = trace.diagram_paths(nodeid, directory)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(records, nodeid), encoding="utf-8")
    svg.write_text(render_svg(records), encoding="utf-8")
    return markdown, svg
