"""The XenBus state machine of Xen's `io/xenbus.h`, as a table, with no I/O.

Theory of operation
-------------------
Each end of a split device publishes one number, `<its dir>/state`, and
reacts to the other end's.  Which changes of that number are legal is the
contract between a frontend and a backend; it comes from the seed document
`seeds/000_*` ("Architecture for Split Drivers Within Xen": Device
Initialisation, Device Closedown in both orders, Migration, Device
reconfiguration), completed where the seed is silent by what Linux's drivers
do (cited per row).

`TRANSITIONS[role]` is the whole contract: a set of (from, to) pairs per
role, built from `_ROWS`, where every row names the seed section (or Linux
source) that allows it.  Nothing else in xenbed decides legality: the bus
records every state it writes into a `TransitionRecorder`, and
`TransitionRecorder.check()` answers the transitions the table does not
allow.  `render_mermaid(role)` draws the same table for docs/xenbus.md.

What "from" means: the value of the `state` node just before the write, as
read inside the writing transaction (not a cached copy).  So a state written
by someone else (the toolstack writes `Initialising` at creation, `Closing`
to unplug, `Reconfiguring` for pciback) is the next transition's "from".

The only I/O here is the recorder's optional JSONL sink (one line appended
per transition; `load_jsonl` reads such files back for checking).
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


class XenbusState(enum.IntEnum):
    """enum xenbus_state, values exactly as in Xen's io/xenbus.h."""

    Unknown = 0
    Initialising = 1
    InitWait = 2  # finished early init, waiting for the peer or hotplug
    Initialised = 3  # waiting for a connection from the peer
    Connected = 4
    Closing = 5  # closing because of an error or an unplug event
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    @classmethod
    def parse(cls, text: str | bytes | None) -> XenbusState:
        """A `state` node's value; absent or unparsable reads as Unknown,
        as Linux's xenbus_read_driver_state() does."""
        if text is None:
            return cls.Unknown
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        text = text.strip()
        if not text.isascii() or not text.isdigit():
            return cls.Unknown
        try:
            return cls(int(text))
        except ValueError:
            return cls.Unknown


class Role(str, enum.Enum):
    FRONTEND = "frontend"
    BACKEND = "backend"


S = XenbusState
F, B = Role.FRONTEND, Role.BACKEND

_SEED_INIT = "seed 000 Device Initialisation"
_SEED_CLOSE = "seed 000 Device Closedown"
_SEED_MIGRATE = "seed 000 Migration"

# (role, from-states, to-state, why).  One row per reason.
_ROWS: tuple[tuple[Role, tuple[S, ...], S, str], ...] = (
    # -- creation -------------------------------------------------------------
    (F, (S.Unknown,), S.Initialising,
     f"{_SEED_INIT}: the toolstack writes both dirs, state Initialising"),
    (B, (S.Unknown,), S.Initialising,
     f"{_SEED_INIT}: the toolstack writes both dirs, state Initialising"),
    # -- initialisation ---------------------------------------------------------
    (B, (S.Initialising,), S.InitWait,
     f"{_SEED_INIT}: blkback waits for hotplug, switches to InitWait"),
    (F, (S.Initialising,), S.Initialised,
     f"{_SEED_INIT}: blkfront advertises ring/event channel, switches to Initialised"),
    (B, (S.InitWait,), S.Connected,
     f"{_SEED_INIT}: physdets and the ring both in, backend writes details, Connected"),
    (F, (S.Initialised,), S.Connected,
     f"{_SEED_INIT}: blkfront sees backend Connected, reads details, Connected"),
    (F, (S.Initialising,), S.Connected,
     f"{_SEED_INIT}: netfront can skip immediately to Connected"),
    # -- closedown ---------------------------------------------------------------
    (B, (S.Initialising, S.InitWait, S.Connected), S.Closing,
     f"{_SEED_CLOSE}: Closing written by the tools or by the backend on error, "
     "or in answer to the frontend's Closing (second diagram)"),
    (F, (S.Initialising, S.Initialised, S.Connected), S.Closing,
     f"{_SEED_CLOSE}: frontend follows backend Closing, or closes on its own error"),
    (F, (S.Closing,), S.Closed,
     f"{_SEED_CLOSE}: frontend flushes, then Closed (both diagrams)"),
    (F, (S.Initialising, S.Initialised, S.Connected), S.Closed,
     f"{_SEED_CLOSE}: 'tear down ... and then change to state Closed' "
     "(Linux netfront/xenbus_frontend_closed go straight to Closed)"),
    (B, (S.Closing,), S.Closed,
     f"{_SEED_CLOSE}: backend answers the frontend's Closed with Closed"),
    (B, (S.Initialising, S.InitWait, S.Connected), S.Closed,
     f"{_SEED_CLOSE}: 'frontends may tear down immediately on error, without "
     "requiring the backend state to change to Closing first': backend follows to Closed"),
    # -- reconnect (migration / resume / kexec) ---------------------------------
    (F, (S.Closed,), S.Initialising,
     f"{_SEED_MIGRATE}: 'new backend details are read and new watches established' "
     "(Linux xenbus_reset_frontend: Closed -> Initialising)"),
    (B, (S.Closed,), S.InitWait,
     f"{_SEED_MIGRATE}: frontend back in Initialising, backend prepares for reconnect "
     "(Linux blkback frontend_changed)"),
    # -- reconfiguration (io/xenbus.h states 7, 8; Linux pciback/pcifront) -------
    (B, (S.Connected,), S.Reconfiguring,
     "seed 000 Device reconfiguration + io/xenbus.h: tools write Reconfiguring (pciback)"),
    (B, (S.Reconfiguring,), S.Reconfigured,
     "io/xenbus.h: pciback has applied the change (xen_pcibk_reconfigure)"),
    (B, (S.Reconfigured,), S.Connected,
     "io/xenbus.h: pciback back to Connected when pcifront is Connected again"),
    (F, (S.Connected,), S.Reconfiguring,
     "io/xenbus.h: pcifront detached devices on backend Reconfiguring"),
    (F, (S.Reconfiguring,), S.Connected,
     "io/xenbus.h: pcifront attached devices on backend Reconfigured"),
    (B, (S.Reconfiguring, S.Reconfigured), S.Closing,
     f"{_SEED_CLOSE}: unplug or error during reconfiguration"),
    (B, (S.Reconfiguring, S.Reconfigured), S.Closed,
     f"{_SEED_CLOSE}: frontend tore down during reconfiguration"),
    (F, (S.Reconfiguring,), S.Closing,
     f"{_SEED_CLOSE}: unplug or error during reconfiguration"),
    (F, (S.Reconfiguring,), S.Closed,
     f"{_SEED_CLOSE}: pcifront_try_disconnect during reconfiguration"),
)


def _build() -> tuple[dict[Role, frozenset[tuple[S, S]]], dict[tuple[Role, S, S], str]]:
    why: dict[tuple[Role, S, S], str] = {}
    for role, sources, target, reason in _ROWS:
        for source in sources:
            why.setdefault((role, source, target), reason)
    table = {r: frozenset((a, b) for (rr, a, b) in why if rr is r) for r in Role}
    return table, why


TRANSITIONS, REASONS = _build()


def allowed(role: Role | str, old: XenbusState | int, new: XenbusState | int) -> bool:
    return (S(old), S(new)) in TRANSITIONS[Role(role)]


def reason(role: Role | str, old: XenbusState | int, new: XenbusState | int) -> str | None:
    """The seed section (or Linux source) that allows this transition."""
    return REASONS.get((Role(role), S(old), S(new)))


# -- drawing the table -----------------------------------------------------------
def render_mermaid(role: Role | str) -> str:
    """The table for one role as a mermaid stateDiagram (docs/xenbus.md)."""
    role = Role(role)
    lines = ["stateDiagram-v2", f"    %% XenBus {role.value} transitions (protocols/xenbus_state.py)"]
    lines.append("    [*] --> Unknown")
    for old, new in sorted(TRANSITIONS[role]):
        lines.append(f"    {old.name} --> {new.name}")
    lines.append("    Closed --> [*]")
    return "\n".join(lines) + "\n"


def render_text(role: Role | str | None = None) -> str:
    """The table as aligned text, one line per transition with its reason."""
    roles = [Role(role)] if role is not None else list(Role)
    out = []
    for r in roles:
        for old, new in sorted(TRANSITIONS[r]):
            out.append(f"{r.value:<8}  {old.name:>13} -> {new.name:<13}  {REASONS[(r, old, new)]}")
    return "\n".join(out) + "\n"


# -- recording and checking --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Transition:
    timestamp: float
    path: str  # the device dir whose `state` changed (absolute)
    role: Role
    old: XenbusState
    new: XenbusState

    def to_json(self) -> str:
        return json.dumps({"ts": self.timestamp, "path": self.path, "role": self.role.value,
                           "from": self.old.name, "to": self.new.name})

    @classmethod
    def from_json(cls, line: str) -> Transition:
        d = json.loads(line)
        return cls(float(d["ts"]), d["path"], Role(d["role"]), _state(d["from"]), _state(d["to"]))


def _state(v: str | int) -> XenbusState:
    return S[v] if isinstance(v, str) else S(v)


@dataclass(frozen=True, slots=True)
class Violation:
    transition: Transition
    why: str

    def __str__(self) -> str:
        t = self.transition
        return f"{t.role.value} {t.path}: {t.old.name} -> {t.new.name}: {self.why}"


def violations(transitions: Iterable[Transition]) -> list[Violation]:
    """Every transition the table does not allow (pure).

    A write of the state a node already holds is not a transition: nothing
    records one (switch_state skips it), so one here is a recorder bug.  The
    one such write the drivers make on purpose -- blkback's Connected written
    again beside a new `sectors` (online resize, cdrom media change; Linux's
    xen_vbd_resize) -- is a notification during seed 000's Device
    reconfiguration and goes around the recorder."""
    out = []
    for t in transitions:
        if t.old == t.new:
            out.append(Violation(t, "not a transition (state unchanged)"))
        elif not allowed(t.role, t.old, t.new):
            out.append(Violation(t, f"not allowed for a {t.role.value} by the seed table"))
    return out


class TransitionRecorder:
    """Collects (timestamp, device path, role, from, to); thread-safe.

    `sink` is a file path (one JSON object per line, appended, so several
    processes may share one file) or a callable taking each `Transition`.
    """

    def __init__(self, sink: str | os.PathLike | Callable[[Transition], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.transitions: list[Transition] = []
        self._lock = threading.Lock()
        if sink is None or callable(sink):
            self._sink = sink
        else:
            path = os.fspath(sink)
            # The file's folder may be on a tmpfs made at boot: make it here.
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

            def append(t: Transition) -> None:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(t.to_json() + "\n")

            self._sink = append

    def record(self, path: str, role: Role | str, old: XenbusState | int,
               new: XenbusState | int) -> Transition:
        t = Transition(self.clock(), path, Role(role), S(old), S(new))
        with self._lock:
            self.transitions.append(t)
            if self._sink is not None:
                self._sink(t)
        return t

    def __iter__(self) -> Iterator[Transition]:
        with self._lock:
            return iter(list(self.transitions))

    def __len__(self) -> int:
        return len(self.transitions)

    def for_path(self, path: str, role: Role | str | None = None) -> list[Transition]:
        return [t for t in self if t.path == path and (role is None or t.role == Role(role))]

    def check(self) -> list[Violation]:
        return violations(self)

    def render_mermaid(self) -> str:
        """What happened, as a mermaid sequence diagram (one lane per end)."""
        lanes: dict[tuple[str, Role], str] = {}
        body = []
        bad = {id(v.transition) for v in self.check()}
        for t in self:
            lane = lanes.setdefault((t.path, t.role), f"p{len(lanes)}")
            mark = " (VIOLATION)" if id(t) in bad else ""
            body.append(f"    Note over {lane}: {t.old.name} -> {t.new.name}{mark}")
        head = ["sequenceDiagram"]
        for (path, role), lane in lanes.items():
            head.append(f"    participant {lane} as {role.value} {path}")
        return "\n".join(head + body) + "\n"


def load_jsonl(path: str | os.PathLike) -> list[Transition]:
    """Transitions from JSONL sink files, e.g. to check a whole testbed run."""
    with open(path, encoding="utf-8") as f:
        return [Transition.from_json(line) for line in f if line.strip()]
