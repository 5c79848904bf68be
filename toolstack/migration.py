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

    u32 length (big-endian, of what follows) | u8 kind | payload [| 32-byte tag]

Authentication (Xen runs `xl migrate` over ssh between dom0s; here the
dom0s of one testbed share a migration secret K that guests never see).
The stream opens with three AUTH frames, an HMAC-SHA256 challenge-response
each way, before the destination reads anything else:

    AUTH      json {"version", "nonce": Ns}                          source -> destination
    AUTH      json {"nonce": Nd, "proof": HMAC(K, destination|Ns|Nd)} destination -> source
    AUTH      json {"proof": HMAC(K, source|Ns|Nd)}                  source -> destination

A peer whose proof is wrong gets REFUSE and the connection closes: it
learns nothing and nothing is made.  Every later frame, both ways, carries
a tag HMAC(key, direction | sequence | kind | payload) with
key = HMAC(K, session|Ns|Nd) and a per-direction sequence number, so a
frame cannot be forged, replayed, reordered or reflected (`Session`).
After it:

    HELLO     json {"name", "memory_mb", "source", "disk_backend"}  source -> destination
    ACCEPT    json {"domid"}  or  REFUSE json {"reason"}            destination -> source
              (refused: a reserved name such as dom0, a name that exists
              there, a malformed name or size: `check_hello`)
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
import hmac
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PAGE_SIZE = 4096
TAG_SIZE = 32  # HMAC-SHA256 of an authenticated frame
MAX_FRAME = 64 * (4 + PAGE_SIZE) + 16 + TAG_SIZE  # PAGES carries at most 64 pages
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
    AUTH = 12


class StreamError(Exception):
    """The peer broke the migration protocol."""


class AuthError(StreamError):
    """The peer did not prove that it holds this testbed's migration secret,
    or a frame's tag is wrong: it is not one of our dom0s."""


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
    return encode(kind, json_payload(body))


def json_payload(body: Mapping) -> bytes:
    return json.dumps(body, sort_keys=True).encode()


def encode_pages(pages: Iterable[tuple[int, bytes]]) -> bytes:
    return encode(Kind.PAGES, pages_payload(pages))


def pages_payload(pages: Iterable[tuple[int, bytes]]) -> bytes:
    """A PAGES frame's payload (the frame is `encode` or `Session.seal` of it)."""
    pages = list(pages)
    if len(pages) > PAGES_PER_FRAME:
        raise ValueError(f"{len(pages)} pages in one frame, at most {PAGES_PER_FRAME}")
    parts = [_GFN.pack(len(pages))]
    for gfn, data in pages:
        if len(data) != PAGE_SIZE:
            raise ValueError(f"page {gfn} is {len(data)} bytes, not {PAGE_SIZE}")
        parts += [_GFN.pack(gfn), data]
    return b"".join(parts)


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


# -- authentication -----------------------------------------------------------------------------
AUTH_VERSION = 1
NONCE_SIZE = 32
MIN_SECRET = 16  # bytes: a shorter migration secret is refused (it could be guessed)
_DOMAIN = b"xenbed-migration/1\0"


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + b"\0".join(parts), hashlib.sha256).digest()


def proof(secret: bytes, role: str, source_nonce: bytes, destination_nonce: bytes) -> bytes:
    """What `role` ("source" or "destination") answers to prove it holds `secret`."""
    if role not in ("source", "destination"):
        raise ValueError(f"role {role!r}")
    return _mac(secret, role.encode(), source_nonce, destination_nonce)


def check_proof(secret: bytes, role: str, source_nonce: bytes, destination_nonce: bytes, claimed: object) -> None:
    """Raise AuthError unless `claimed` (hex, from the peer) is `role`'s proof."""
    try:
        got = bytes.fromhex(claimed) if isinstance(claimed, str) else b""
    except ValueError:
        got = b""
    if not hmac.compare_digest(got, proof(secret, role, source_nonce, destination_nonce)):
        raise AuthError(f"the {role} did not prove it holds the migration secret")


def nonce_of(body: Mapping) -> bytes:
    """The peer's nonce in an AUTH body, checked."""
    try:
        nonce = bytes.fromhex(str(body.get("nonce", "")))
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_SIZE:
        raise AuthError(f"an AUTH nonce must be {NONCE_SIZE} bytes")
    return nonce


class Session:
    """The authenticated stream after the handshake, one end of it.

    `seal` turns (kind, payload) into a frame whose payload is followed by
    HMAC(key, direction | sequence | kind | payload); `open` checks the tag
    of a frame the peer sent and gives the payload back, or raises
    AuthError.  Sequence numbers count per direction from 0, so a frame
    replayed, dropped, reordered or sent back to its sender fails."""

    def __init__(self, secret: bytes, role: str, source_nonce: bytes, destination_nonce: bytes) -> None:
        if role not in ("source", "destination"):
            raise ValueError(f"role {role!r}")
        self._key = _mac(secret, b"session", source_nonce, destination_nonce)
        self._out = role.encode()
        self._in = b"destination" if role == "source" else b"source"
        self._sent = 0
        self._received = 0

    def _tag(self, direction: bytes, seq: int, kind: Kind, payload: bytes) -> bytes:
        return hmac.new(self._key, direction + struct.pack(">QB", seq, kind) + payload, hashlib.sha256).digest()

    def seal(self, kind: Kind, payload: bytes) -> bytes:
        tag = self._tag(self._out, self._sent, kind, payload)
        self._sent += 1
        return encode(kind, payload + tag)

    def open(self, kind: Kind, body: bytes) -> bytes:
        if len(body) < TAG_SIZE:
            raise AuthError(f"{kind.name} frame without its tag")
        payload, tag = body[:-TAG_SIZE], body[-TAG_SIZE:]
        if not hmac.compare_digest(tag, self._tag(self._in, self._received, kind, payload)):
            raise AuthError(f"{kind.name} frame {self._received} has a wrong tag")
        self._received += 1
        return payload


# -- what a destination accepts -----------------------------------------------------------------
RESERVED_NAMES = frozenset({"dom0", "Domain-0"})  # the control domain never arrives by migration
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_MEMORY_MB = 1 << 20


class Refused(Exception):
    """The destination will not take this domain (the reason goes back in REFUSE)."""


def check_hello(body: Mapping, existing: Iterable[str]) -> tuple[str, int]:
    """(name, memory_mb) of an authenticated HELLO the destination may take:
    never the control domain's name or one that exists here (a domain created
    under it would get that domain's pre-provisioned credential), only a
    well-formed name and a sane size."""
    name, memory = body.get("name"), body.get("memory_mb")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Refused(f"{name!r} is not a domain name")
    if name in RESERVED_NAMES or name.lower().startswith("domain-") or re.fullmatch(r"dom\d+", name):
        raise Refused(f"{name} is a reserved name: the control domain does not migrate")
    if name in set(existing):
        raise Refused(f"a domain named {name} runs here already")
    if not isinstance(memory, int) or isinstance(memory, bool) or not 1 <= memory <= MAX_MEMORY_MB:
        raise Refused(f"memory_mb {memory!r} outside 1..{MAX_MEMORY_MB}")
    return name, memory
