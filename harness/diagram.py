"""A device's negotiation, drawn from trace records (pure: records in, text out).

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.sax.saxutils import escape

from xenbed.protocols.xenbus_state import allowed

_BACKEND = re.compile(r"^/local/domain/(\d+)/backend/([^/]+)/(\d+)/([^/]+)/?$")
_FRONTEND = re.compile(r"^/local/domain/(\d+)/device/([^/]+)/([^/]+)/?$")

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
    kind: str = "transition"


def steps(records: list[dict], device: str) -> list[Step]:
    """The rows of `device`'s picture, in time order (chaos records included)."""
    device = device_of(device)
    mine = sorted((r for r in records if concerns(r, device)), key=lambda r: r["ts"])
    ends = [_end(r) if r["kind"] != "chaos" else None for r in mine]
    out = []
    for i, r in enumerate(mine):
        if r["kind"] == "chaos":
            if r.get("type", "invoke") != "ok":
                out.append(Step(r["ts"], "all", _chaos_label(r), kind="chaos"))
            continue
        end = ends[i]
        following = next((e for e in ends[i + 1:] if e is not None), None)
        if r["kind"] == "hotplug":
            out.append(Step(r["ts"], HOTPLUG, str(r.get("event", "hotplug")),
                            to=BACKEND if following == BACKEND else None, kind="hotplug"))
            continue
        label = r["to"]
        if not _allowed(r):
            label += " (not allowed)"
        other = FRONTEND if end == BACKEND else BACKEND
        signals = r["to"] in SIGNALS[end]
        out.append(Step(r["ts"], end, label, to=other if signals and following == other else None))
    return out


def participants(records: list[dict], device: str) -> list[str]:
    device = device_of(device)
    hotplug = any(r.get("kind") == "hotplug" and concerns(r, device) for r in records)
    return ([HOTPLUG] if hotplug else []) + [BACKEND, FRONTEND]


# -- Mermaid ------------------------------------------------------------------------

def render_mermaid(records: list[dict], device: str) -> str:
    """`device`'s negotiation as a Mermaid sequenceDiagram."""
    device = device_of(device)
    ends = participants(records, device)
    lines = ["sequenceDiagram", f"    %% device {device}"]
    lines += [f"    participant {_MERMAID_ID[e]} as {_NAMES[e]}" for e in ends]
    span = f"{_MERMAID_ID[ends[0]]},{_MERMAID_ID[ends[-1]]}"
    for s in steps(records, device):
        text = _mermaid_text(s.label)
        if s.at == "all":
            lines.append(f"    Note over {span}: {text}")
        elif s.to is not None:
            lines.append(f"    {_MERMAID_ID[s.at]}->>{_MERMAID_ID[s.to]}: {text}")
        else:
            lines.append(f"    Note over {_MERMAID_ID[s.at]}: {text}")
    return "\n".join(lines) + "\n"


def render_markdown(records: list[dict], title: str = "") -> str:
    """Every device of a trace, one Mermaid block each (GitHub renders these)."""
    parts = [f"# {title}\n"] if title else []
    for device in devices(records):
        parts.append(f"## {device}\n\n```mermaid\n{render_mermaid(records, device)}```\n")
    if len(parts) == (1 if title else 0):
        parts.append("(no device transitions in this trace)\n")
    return "\n".join(parts)


# -- SVG ----------------------------------------------------------------------------

_COLUMN_X = {HOTPLUG: 90, BACKEND: 290, FRONTEND: 490}
_WIDTH, _ROW, _TOP = 640, 36, 70


def render_svg(records: list[dict], device: str | None = None) -> str:
    """`device`'s negotiation (every device, stacked, when None) as a standalone SVG
    document laid out like seed 000's event diagrams."""
    chosen = [device_of(device)] if device else devices(records)
    blocks, y = [], 0
    for d in chosen:
        body, height = _svg_device(records, d)
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
            '.time{fill:#777;font-size:10px}</style>\n'
            + "".join(blocks) + "</svg>\n")


def _svg_device(records: list[dict], device: str) -> tuple[str, int]:
    rows = steps(records, device)
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
            out.append(f'<line x1="{sx:.1f}" y1="{y}" x2="{ex}" y2="{y}" stroke="black" marker-end="url(#arrow)"/>\n')
        css = "bad" if s.label.endswith("(not allowed)") else s.kind
        out.append(f'<rect x="{x - width / 2:.1f}" y="{y - 12}" width="{width:.1f}" height="17" fill="white"/>\n'
                   f'<text x="{x}" y="{y + 2}" text-anchor="middle" class="{css}">{escape(s.label)}</text>\n')
    return "".join(out), bottom + 30


# -- helpers ------------------------------------------------------------------------

def concerns(record: dict, device: str) -> bool:
    """Whether a record belongs in `device`'s picture (chaos records belong in every one)."""
    if record.get("kind") == "chaos":
        return True
    return record.get("kind") in ("transition", "hotplug") and device_of(record.get("path", "")) == device


def _end(record: dict) -> str:
    if record["kind"] == "hotplug":
        return HOTPLUG
    return BACKEND if record.get("role") == BACKEND else FRONTEND


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
