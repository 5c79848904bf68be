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

Queue: events wait per connection until the shell takes them.  What the
store holds for one connection is bounded twice (XSA-326: a watcher that
stops reading must not make xenstored grow): at most "event-queue" events
and at most "event-bytes" bytes of them (header included).  Events beyond
either limit, and events whose payload would exceed XENSTORE_PAYLOAD_MAX (a
huge token on a deep path; xenstored silently drops those too and enforces
no other token limit), are dropped and counted in `dropped_events`, as C
xenstored drops an event that would break the domain's memory quota.  Like
send_event(), an ordinary event identical to one still queued is not queued
twice.  The shell takes events only as far as the connection's socket has
room (`take(max_bytes)`); the rest wait here, inside the limits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from xenbed.protocols.xs_wire import HEADER_SIZE, PAYLOAD_MAX, Op, Packet

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
    def __init__(self, cap: int, cap_bytes: int = 0) -> None:
        self.cap = cap
        self.cap_bytes = cap_bytes
        self.items: deque[Packet] = deque()
        self._pending: set[bytes] = set()
        self.bytes = 0  # wire size of the queued events
        self.dropped = 0

    def push(self, path: str, token: str) -> bool:
        payload = encode_event(path, token)
        if len(payload) > PAYLOAD_MAX:
            self.dropped += 1
            return False
        if not path.startswith("@") and payload in self._pending:
            return False
        size = HEADER_SIZE + len(payload)
        if (self.cap and len(self.items) >= self.cap) or (self.cap_bytes and self.bytes + size > self.cap_bytes):
            self.dropped += 1
            return False
        self.items.append(Packet(Op.WATCH_EVENT, 0, 0, payload))
        self._pending.add(payload)
        self.bytes += size
        return True

    def take(self, max_bytes: int | None = None) -> list[Packet]:
        """The queued events, oldest first; with `max_bytes`, only as many
        as fit in that many bytes (the rest stay queued)."""
        if max_bytes is None or max_bytes >= self.bytes:
            out = list(self.items)
            self.items.clear()
            self._pending.clear()
            self.bytes = 0
            return out
        out = []
        while self.items and HEADER_SIZE + len(self.items[0].payload) <= max_bytes:
            packet = self.items.popleft()
            size = HEADER_SIZE + len(packet.payload)
            max_bytes -= size
            self.bytes -= size
            self._pending.discard(packet.payload)
            out.append(packet)
        return out

    def __len__(self) -> int:
        return len(self.items)
