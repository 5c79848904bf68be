"""Frames on a domain's socket to the hypervisor-service, with no I/O in it.

A real guest talks to Xen through hypercalls and receives upcalls (event
notifications) from it.  Here a domain talks to the hypervisor-service over
one Unix stream socket, `/run/xenbed/hypervisor.sock`, in frames:

    offset 0  u32 body length
    offset 4  u16 op          (Call)
    offset 6  u16 flags       (REPLY, UPCALL, ERROR, CARRIES_FDS, BINARY)
    offset 8  u32 seq         a reply echoes the call's seq; upcalls use 0
    offset 12 body            UTF-8 JSON object, or raw structs when BINARY

A frame that carries file descriptors (SCM_RIGHTS) sets CARRIES_FDS and says
how many in its body's "nfds" -- or, in a BINARY frame, in a u32 LE that
comes first in the body (the rest of the body follows it); the sender sends
the whole frame in one sendmsg with the descriptors attached, so they arrive
with its first byte.  BINARY frames carry little-endian structs (the batched
grant ops, protocols/gntbatch.py); `Frame.body` is then `bytes`.  Error
replies are always JSON, whatever the call was.
The receiver queues descriptors in arrival order and hands them to frames in
order.  `docs/hypervisor-socket.md` documents every op for drivers written in
other languages.
"""

from __future__ import annotations

import enum
import json
import os
import struct
from dataclasses import dataclass, field

FRAME_HEADER = struct.Struct("<IHHI")
BODY_MAX = 1 << 20  # a frame larger than this is a protocol violation


class Call(enum.IntEnum):
    # Unauthenticated: the only calls allowed before HELLO succeeds.
    PING = 1
    HELLO = 2  # {"credential": str, "role": "kernel"|"device"} -> {"domid", "name", "privilege"}
    # Any authenticated domain.
    XS_ADOPT = 10  # carries one fd: a connected stream socket that becomes a xenstored connection of the caller's domain
    WHOAMI = 11
    # The guest's own call on itself (Xen's SCHEDOP_shutdown): {"reason":
    # "suspend"|"poweroff"|"reboot"|"crash"}.  Suspend: the domain becomes
    # suspended (its memory stays) and the reply comes only when the
    # toolstack resumes it: {"cancelled": bool} -- SCHEDOP_shutdown returning
    # 1 in a guest whose suspend was cancelled (docs/suspend-resume.md).
    SCHEDOP_SHUTDOWN = 12
    # Control domain (dom0) only.
    DOMAIN_CREATE = 20  # {"name", "memory_mb", "privilege"} -> {"domid", "credential"}
    DOMAIN_DESTROY = 21  # {"domid"}
    DOMAIN_LIST = 22  # {} -> {"domains": [...]}
    DOMAIN_PAUSE = 23
    DOMAIN_UNPAUSE = 24
    DOMAIN_SUSPEND = 25  # {"domid"}: suspend a guest without its cooperation (no SCHEDOP reply pending); memory stays
    DOMAIN_RESUME = 26  # {"domid", "cancelled": bool}: run a suspended domain again; answers its SCHEDOP_SHUTDOWN
    AUDIT = 27  # {} -> what dead domains left behind (control only; the harness's leak audit)
    # Guest memory: pages are files on the hypervisor's tmpfs; a domain gets
    # them only as descriptors (SCM_RIGHTS).
    MEM_ALLOC = 30  # {"count" (1..64)} -> {"gfns": [...]} + one read-write fd per page
    MEM_MAP = 31  # {"gfn"} -> {} + the fd of one of the caller's own pages
    MEM_FREE = 32  # {"gfns": [...]}
    # The toolstack's view of another domain's memory (control only), for
    # save/migrate: which gfns it has (xc's p2m walk) and making exactly
    # these gfns exist, zeroed (xc_domain_populate_physmap_exact); the
    # contents go through dom0's own mount of the memory volume, as a
    # privileged foreign mapping would.
    MEM_LIST = 33  # {"domid"} -> {"gfns": [...], "max_pages"}
    MEM_POPULATE = 34  # {"domid", "gfns": [...], "remove"?: [...]} -> {"path": the domain's page folder}
    # Grant table v1 (the caller's own table; see docs/hypervisor-socket.md).
    GNTTAB_GRANT = 40  # {"domid", "gfn", "readonly"} -> {"gref"}
    GNTTAB_END = 41  # {"gref"} -> {}; GNTST_eagain while mapped
    GNTTAB_MAP = 42  # {"domid", "gref", "readonly"} -> {"handle", "gfn"} + fd (read-only fd for readonly)
    GNTTAB_UNMAP = 43  # {"handle"}
    GNTTAB_COPY = 44  # {"ops": [{"src": end, "dst": end, "len"}]} -> {"statuses": [...]}; end = {"domid","gref","offset"} or {"gfn","offset"}
    GNTTAB_QUERY_SIZE = 45  # {} -> {"nr_frames", "max_frames"}
    GNTTAB_SET_ENTRY = 46  # {"gref", "flags", "domid", "frame"}: write an entry of one's own table, raw
    # Batched grant ops, BINARY frames only (protocols/gntbatch.py): Xen's
    # arrays of gnttab_map_grant_ref / gnttab_unmap_grant_ref / gnttab_copy,
    # one GNTST_* status per entry.
    GNTTAB_MAP_BATCH = 47  # n x {domid, flags, gref} -> n x {status, handle, gfn} + one fd per mapped entry
    GNTTAB_UNMAP_BATCH = 48  # n x handle -> n x status
    GNTTAB_COPY_BATCH = 49  # n x gnttab_copy -> n x status
    # Event channels.  Ports belong to the link that allocated or bound them
    # (like an open /dev/xen/evtchn); upcalls go to that link.
    EVTCHN_ALLOC_UNBOUND = 50  # {"remote_dom"} -> {"port"}
    EVTCHN_BIND_INTERDOMAIN = 51  # {"remote_dom", "remote_port"} -> {"port"}
    EVTCHN_SEND = 52  # {"port"}; with seq 0 no reply is sent (the fast path)
    EVTCHN_CLEAR = 53  # {"port"}: the guest consumed the event (clears pending); seq 0: no reply
    EVTCHN_UNMASK = 54  # {"port"}
    EVTCHN_MASK = 55  # {"port"}
    EVTCHN_CLOSE = 56  # {"port"}
    EVTCHN_STATUS = 57  # {"port", "domid"?} -> {"status", "remote_dom", "remote_port", "pending", "masked"}
    # Upcalls, hypervisor -> domain.
    UP_XENSTORE_READY = 100  # the domain was introduced to xenstored; its store connections may start
    UP_DESTROYED = 101  # the domain was destroyed: its kernel should stop
    UP_EVTCHN = 102  # {"port"}: the port became pending (and is not masked)
    # fd mode (HELLO {"evtchn": "fd"}; docs/hypervisor-socket.md, "Event channels at memory speed"):
    UP_EVTCHN_BOUND = 103  # {"port", "remote_dom", "remote_port", "fds": ["in", "out"?]} + those descriptors
    UP_EVTCHN_UNBOUND = 104  # {"port"}: the peer closed; drop the port's descriptors


class Flag(enum.IntFlag):
    NONE = 0
    REPLY = 1
    UPCALL = 2
    ERROR = 4
    CARRIES_FDS = 8
    BINARY = 16


# The same flags as plain ints, for the per-frame path (IntFlag's operators
# build enum members and cost microseconds on every event-channel send).
REPLY, UPCALL, ERROR, CARRIES_FDS, BINARY = 1, 2, 4, 8, 16
# The calls whose frames are BINARY (both ways, errors excepted); every other
# call is JSON.  The hypervisor refuses a frame of the other kind (EINVAL).
BINARY_CALLS = frozenset({Call.GNTTAB_MAP_BATCH, Call.GNTTAB_UNMAP_BATCH, Call.GNTTAB_COPY_BATCH})
NFDS = struct.Struct("<I")  # a BINARY frame's descriptor count, first in its body when CARRIES_FDS
_encoder = json.JSONEncoder(separators=(",", ":"))
_decoder = json.JSONDecoder()


class FrameProtocolError(Exception):
    """The peer sent bytes that are not frames of this protocol."""


@dataclass(slots=True)
class Frame:
    op: int
    flags: int  # Flag bits
    seq: int
    body: dict | bytes  # bytes when flags has BINARY
    fds: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        if self.flags & BINARY:
            body = bytes(self.body)
            if self.flags & CARRIES_FDS:
                body = NFDS.pack(len(self.fds)) + body
        else:
            body = _encoder.encode(self.body).encode()
        if len(body) > BODY_MAX:
            raise ValueError(f"frame body of {len(body)} bytes exceeds {BODY_MAX}")
        return FRAME_HEADER.pack(len(body), int(self.op), int(self.flags), self.seq) + body

    @property
    def op_name(self) -> str:
        try:
            return Call(self.op).name
        except ValueError:
            return f"UNKNOWN({self.op})"


def close_fds(fds) -> None:
    """Close the descriptors a frame carried that nobody will take (either
    end: a reply no one waits for, a refused call)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _frame(op: int, flags: int, seq: int, body, fds) -> Frame:
    """A JSON frame for a dict body, a BINARY one for bytes; CARRIES_FDS and
    the descriptor count when there are descriptors."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        body, flags = bytes(body), flags | BINARY
        if fds:
            flags |= CARRIES_FDS
    else:
        body = dict(body or {})
        if fds:
            flags |= CARRIES_FDS
            body["nfds"] = len(fds)
    return Frame(op, flags, seq, body, list(fds or []))


def call(op: Call, seq: int, body: dict | bytes | None = None, fds: list[int] | None = None) -> Frame:
    return _frame(op, 0, seq, body, fds)


def reply(to: Frame, body: dict | bytes | None = None, fds: list[int] | None = None) -> Frame:
    return _frame(to.op, REPLY, to.seq, body, fds)


def error(to: Frame, code: str, message: str) -> Frame:
    """An error reply: `code` is an errno name (EACCES, ENOENT, EBUSY, ...)."""
    return Frame(to.op, REPLY | ERROR, to.seq, {"error": code, "message": message})


def upcall(op: Call, body: dict | None = None) -> Frame:
    return Frame(op, UPCALL, 0, dict(body or {}))


class FrameReader:
    """Bytes and descriptors in, frames out."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: list[int] | None = None) -> None:
        self._buffer += data
        if fds:
            self._fds.extend(fds)

    def next_frame(self) -> Frame | None:
        if len(self._buffer) < FRAME_HEADER.size:
            return None
        length, op, flags, seq = FRAME_HEADER.unpack_from(self._buffer)
        if length > BODY_MAX:
            raise FrameProtocolError(f"frame announces a {length}-byte body, above {BODY_MAX}")
        end = FRAME_HEADER.size + length
        if len(self._buffer) < end:
            return None
        raw = bytes(self._buffer[FRAME_HEADER.size:end])
        del self._buffer[:end]
        body: dict | bytes
        wanted = None
        if flags & BINARY:
            body = raw
            if flags & CARRIES_FDS:
                if len(raw) < NFDS.size:
                    raise FrameProtocolError(f"binary frame with descriptors has a {len(raw)}-byte body, "
                                             f"no room for its descriptor count")
                (wanted,) = NFDS.unpack_from(raw)
                body = raw[NFDS.size:]
        else:
            try:
                body = _decoder.decode(raw.decode()) if raw else {}
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
                raise FrameProtocolError(f"frame body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise FrameProtocolError("frame body is not a JSON object")
            wanted = body.get("nfds")
        fds: list[int] = []
        if flags & CARRIES_FDS:
            if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1 or wanted > len(self._fds):
                raise FrameProtocolError(
                    f"frame says it carries {wanted!r} descriptors, {len(self._fds)} arrived"
                )
            fds, self._fds = self._fds[:wanted], self._fds[wanted:]
        return Frame(op, flags, seq, body, fds)

    @property
    def buffered(self) -> int:
        """Bytes received that no whole frame has taken yet."""
        return len(self._buffer)

    @property
    def queued_fds(self) -> int:
        return len(self._fds)

    def take_stray_fds(self) -> list[int]:
        """Descriptors no frame claimed (to be closed by the owner)."""
        fds, self._fds = self._fds, []
        return fds
