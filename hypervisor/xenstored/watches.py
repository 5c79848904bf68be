"""Watches and the per-connection event queue (xenstored_watch.c).

A watch is (path, token) on a connection; its path is stored absolute, and
remembered as relative if the client gave it relative, in which case event
paths are sent relative too (the domain path and its slash stripped).

Matching: an ordinary event on P fires every watch whose path is P or an
ancestor of P; an "exact" event (a child inside a removed subtree) fires
only watches on exactly that path.  A connection only sees an event if it
may read the node, its old permissions or its parent (watch_permitted());
special events (@introduceDomain, @releaseDomain) go to connections that may
read the special node (privileged ones, or domains granted it by SET_PERMS).

Queue: events wait per connection until the shell takes them; the queue is
capped (quota "event-queue"); events beyond the cap, and events whose
payload would exceed XENSTORE_PAYLOAD_MAX (a huge token on a deep path;
xenstored silently drops those too and enforces no other token limit), are
dropped and counted in `dropped_events`.  Like send_event(), an ordinary
event identical to one still queued is not queued twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from xenbed.protocols.xs_wire import PAYLOAD_MAX, Op, Packet

from . import paths


@dataclass(frozen=True, slots=True)
class Watch:
    path: str  # absolute (or @special)
    token: str
    relative_to: str | None = None  # domain path if registered relative

    def event_path(self, path: str) -> str:
        if self.relative_to is None:
            return path
        rest = path[len(self.relative_to) :]
        return rest[1:] if rest.startswith("/") else rest

    def matches(self, path: str, exact: bool) -> bool:
        return path == self.path if exact else paths.is_child(path, self.path)


def encode_event(path: str, token: str) -> bytes:
    return path.encode("latin-1") + b"\0" + token.encode("latin-1") + b"\0"


class EventQueue:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: deque[Packet] = deque()
        self._pending: set[bytes] = set()
        self.dropped = 0

    def push(self, path: str, token: str) -> bool:
        payload = encode_event(path, token)
        if len(payload) > PAYLOAD_MAX:
            self.dropped += 1
            return False
        if not path.startswith("@") and payload in self._pending:
            return False
        if self.cap and len(self.items) >= self.cap:
            self.dropped += 1
            return False
        self.items.append(Packet(Op.WATCH_EVENT, 0, 0, payload))
        self._pending.add(payload)
        return True

    def take(self) -> list[Packet]:
        out = list(self.items)
        self.items.clear()
        self._pending.clear()
        return out

    def __len__(self) -> int:
        return len(self.items)
