"""Live migration's pure plan and stream, no I/O (the sockets and calls are migrate.py).

Its two parts: which pages each pre-copy round sends, and the stream
`xl migrate` and `xl migrate-receive` speak.

Pre-copy (Clark et al., "Live Migration of Virtual Machines", NSDI 2005, as
xc_domain_save does it): round 0 sends every page the guest has; each later
round sends the pages that changed since they were last sent, while the
guest keeps running; when a round is small enough (or rounds stop getting
smaller, or there have been enough), the guest is suspended and a final
stop-and-copy round sends what is still dirty.  Xen learns "changed" from
log-dirty page tables; here pages are files the guest writes through mmap,
so the source toolstack keeps a digest of each page as sent and a page is
dirty when its digest differs (or it is new).  Pages the guest freed since
are sent as "gone" so the destination does not keep stale ones.

The stream, one TCP connection from source to destination, frames of

    u32 length (big-endian, of what follows) | u8 kind | payload

    HELLO     json {"name", "memory_mb", "source", "disk_backend"}  source -> destination
    ACCEPT    json {"domid"}  or  REFUSE json {"reason"}            destination -> source
    PAGES     u32 count, then count x (u32 gfn | 4096 bytes)        source -> destination
    GONE      json {"gfns": [...]}                                  source -> destination
    ROUND     json {"round", "pages", "final"}                      source -> destination (round boundary)
    DEVICES   json {"devices": [...]}                               source -> destination (after round 0: backends made
                                                                    while the guest still runs here)
    COMMIT    json {}                                               source -> destination (guest suspended, last round sent)
    READY     json {"domid", "credential", "hypervisor"}            destination -> source (domain and devices made)
    ABORT     json {"reason"}                                       either way; the destination destroys what it made
    DONE      json {}                                               source -> destination (guest resumed there)

A frame longer than MAX_FRAME or of an unknown kind is a protocol error:
the receiving side aborts, the guest stays (or resumes) on the source.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PAGE_SIZE = 4096
MAX_FRAME = 64 * (4 + PAGE_SIZE) + 16  # PAGES carries at most 64 pages
PAGES_PER_FRAME = 64
_HEADER = struct.Struct(">IB")
_GFN = struct.Struct(">I")


class Kind(enum.IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    PAGES = 4
    GONE = 5
    ROUND = 6
    COMMIT = 7
    READY = 8
    ABORT = 9
    DONE = 10
    DEVICES = 11


class StreamError(Exception):
    """The peer broke the migration protocol."""


def page_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# -- pre-copy rounds ----------------------------------------------------------------------------
@dataclass
class PrecopyPlanner:
    """Decides what each round sends.  `max_rounds` live rounds at most;
    stop early when a round's dirty set is at most `stop_pages`, or when it
    did not shrink by at least a tenth (the guest dirties as fast as we send:
    more rounds only add time, as xc_domain_save's heuristics conclude)."""

    max_rounds: int = 8
    stop_pages: int = 64
    sent: dict[int, bytes] = field(default_factory=dict)  # gfn -> digest as last sent
    rounds: list[int] = field(default_factory=list)  # pages sent per round

    def dirty(self, current: Mapping[int, bytes]) -> tuple[list[int], list[int]]:
        """(gfns to send, gfns gone) given the digest of every page the guest has now."""
        send = sorted(g for g, d in current.items() if self.sent.get(g) != d)
        gone = sorted(set(self.sent) - set(current))
        return send, gone

    def record(self, sent: Mapping[int, bytes], gone: Iterable[int]) -> None:
        """The round went out: remember what the destination now holds."""
        self.sent.update(sent)
        for gfn in gone:
            self.sent.pop(gfn, None)
        self.rounds.append(len(sent))

    def another_live_round(self, next_dirty: int) -> bool:
        """After the rounds so far, with `next_dirty` pages dirty now: go on
        pre-copying (True) or suspend and stop-and-copy (False)."""
        if len(self.rounds) >= self.max_rounds or next_dirty <= self.stop_pages:
            return False
        if len(self.rounds) >= 2 and next_dirty > 0.9 * self.rounds[-1]:
            return False  # not converging
        return True


# -- frames -------------------------------------------------------------------------------------
def encode(kind: Kind, payload: bytes = b"") -> bytes:
    if len(payload) + 1 > MAX_FRAME:
        raise ValueError(f"{kind.name} frame of {len(payload)} bytes is larger than {MAX_FRAME}")
    return _HEADER.pack(len(payload) + 1, kind) + payload


def encode_json(kind: Kind, body: Mapping) -> bytes:
    return encode(kind, json.dumps(body, sort_keys=True).encode())


def encode_pages(pages: Iterable[tuple[int, bytes]]) -> bytes:
    pages = list(pages)
    if len(pages) > PAGES_PER_FRAME:
        raise ValueError(f"{len(pages)} pages in one frame, at most {PAGES_PER_FRAME}")
    parts = [_GFN.pack(len(pages))]
    for gfn, data in pages:
        if len(data) != PAGE_SIZE:
            raise ValueError(f"page {gfn} is {len(data)} bytes, not {PAGE_SIZE}")
        parts += [_GFN.pack(gfn), data]
    return encode(Kind.PAGES, b"".join(parts))


def decode_pages(payload: bytes) -> list[tuple[int, bytes]]:
    if len(payload) < 4:
        raise StreamError("PAGES frame without a count")
    (count,) = _GFN.unpack_from(payload)
    if len(payload) != 4 + count * (4 + PAGE_SIZE):
        raise StreamError(f"PAGES frame of {len(payload)} bytes does not hold {count} pages")
    out = []
    for i in range(count):
        at = 4 + i * (4 + PAGE_SIZE)
        (gfn,) = _GFN.unpack_from(payload, at)
        out.append((gfn, payload[at + 4: at + 4 + PAGE_SIZE]))
    return out


def decode_json(payload: bytes) -> dict:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamError(f"bad JSON in a frame: {exc}") from None
    if not isinstance(body, dict):
        raise StreamError("a JSON frame must hold an object")
    return body


class FrameReader:
    """Bytes in, (Kind, payload) out; refuses oversized and unknown frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buffer)
            if length < 1 or length > MAX_FRAME:
                raise StreamError(f"frame length {length} outside 1..{MAX_FRAME}")
            try:
                kind = Kind(kind)
            except ValueError:
                raise StreamError(f"unknown frame kind {kind}") from None
            end = 4 + length
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[_HEADER.size:end])))
            del self._buffer[:end]
        return frames
