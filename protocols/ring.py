"""Xen's shared producer/consumer rings (`io/ring.h`), with no I/O in it.

Theory of operation
-------------------
A split driver's frontend and backend share one ring: 1, 2, 4 ... pages
("ring-page-order") granted by the frontend.  The first 64 bytes are the
shared header that `DEFINE_RING_TYPES` lays out, then an array of entries:

    offset  0  u32 req_prod    requests produced by the front (free-running)
    offset  4  u32 req_event   "notify me when req_prod passes this" (back)
    offset  8  u32 rsp_prod    responses produced by the back (free-running)
    offset 12  u32 rsp_event   "notify me when rsp_prod passes this" (front)
    offset 16  u8  pvt[4]      union of per-protocol private bytes
    offset 20  u8  __pad[44]
    offset 64  entry[nr_ents]  union { request; response }

An entry is as large as the larger of the two messages, and the number of
entries is the largest power of two that fits (`__RING_SIZE`), so a
free-running index selects its slot with `index & (nr_ents - 1)`.  Indexes
are never reset: they count modulo 2**32, and every difference below is
taken modulo 2**32 exactly as C's unsigned `RING_IDX` arithmetic does.

Each side keeps private indexes that the peer never sees: the front its
`req_prod_pvt` (requests written but maybe not yet pushed) and `rsp_cons`;
the back its `rsp_prod_pvt` and `req_cons`.  A response reuses the slot of
the request it answers, so the front never has more than `nr_ents`
requests outstanding.

Notification hold-off: a producer that pushes from `old` to `new` needs to
notify the consumer only if the consumer's event index lies in (old, new].
A consumer about to sleep sets its event index to "one past what I have
consumed" and re-checks the ring (the final check), which closes the race
with a producer that pushed just before the event index moved.

Memory and the peer
-------------------
The buffer is usually an mmap of pages that another process (another
container) writes at the same time.  Three rules follow:

* Index fields are read and written only through a native `uint32`
  memoryview, never through `struct.pack_into`.  CPython's `pack_into`
  first zeroes the destination and then writes the value, so a peer spinning
  on the field observes a transient 0 -- measured: about 70,000 zero reads
  per four hundred million reads while Python rewrote the same value.  A
  memoryview item store is one aligned 4-byte `memcpy`, which compiles to a
  single store, so the peer sees the old index or the new one, never a torn
  or transient value (tests/unit/test_abi_conformance.py re-measures this).
* Entries are copied out of shared memory before anything looks at them
  (`take_request`, `take_response`): the peer may rewrite a slot after we
  read its index, and validating one copy while using another is the
  classic double-fetch bug (XSA-155).
* Barriers sit exactly where `ring.h` puts them: a write barrier before
  publishing a producer index (the entries must be visible first), a full
  barrier between publishing an index and reading the peer's event index,
  and between writing our event index and re-checking the peer's producer
  index (final check).  See `full_barrier()` for how Python gets one.

Misuse by the caller (putting into a full ring, taking from an empty one)
raises `RingUsageError`; a peer that publishes an impossible producer index
raises `RingOverflow`, after which the ring cannot be trusted and the
device must be closed.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import fields

__all__ = [
    "XEN_PAGE_SIZE",
    "RING_HEADER_SIZE",
    "RingError",
    "RingUsageError",
    "RingOverflow",
    "MalformedMessage",
    "MalformedRequest",
    "MalformedResponse",
    "RingMessage",
    "ring_bytes_for_order",
    "ring_size",
    "full_barrier",
    "SharedRing",
    "FrontRing",
    "BackRing",
]

XEN_PAGE_SIZE = 4096  # ring protocols always count in 4 KiB pages, whatever the OS page size
RING_HEADER_SIZE = 64  # offsetof(struct *_sring, ring)
IDX_MASK = 0xFFFFFFFF  # RING_IDX is a 32-bit unsigned int

# Byte offsets of the shared header fields, and their index in a u32 view.
REQ_PROD_OFFSET, REQ_EVENT_OFFSET, RSP_PROD_OFFSET, RSP_EVENT_OFFSET = 0, 4, 8, 12
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3
PVT_OFFSET, PVT_SIZE = 16, 4  # union pvt (netif.smartpoll_active, tapif_user.msg)
PAD_OFFSET, PAD_SIZE = 20, 44  # uint8_t __pad[44]

if sys.byteorder != "little":  # pragma: no cover - every Xen architecture is little-endian
    raise ImportError("xenbed rings use native u32 stores and need a little-endian host")


class RingError(Exception):
    """Base of the ring's errors."""


class RingUsageError(RingError):
    """The caller broke the ring discipline (a bug on this side)."""


class RingOverflow(RingError):
    """The peer published a producer index that cannot be true.

    This is peer misbehaviour (RING_REQUEST_PROD_OVERFLOW /
    RING_RESPONSE_PROD_OVERFLOW in ring.h): the ring is no longer
    trustworthy and the connection should be torn down.
    """

    def __init__(self, message: str, *, producer_index: int, private_index: int, ring_size: int):
        super().__init__(message)
        self.producer_index = producer_index
        self.private_index = private_index
        self.ring_size = ring_size


class MalformedMessage(Exception):
    """A message copied off a ring cannot be decoded (the peer's fault).

    Decoders raise nothing else, whatever bytes they are given.
    """


class MalformedRequest(MalformedMessage):
    """A request from the frontend cannot be decoded."""


class MalformedResponse(MalformedMessage):
    """A response from the backend cannot be decoded."""


def ring_bytes_for_order(order: int) -> int:
    """Bytes in a ring of 2**order pages ("ring-page-order" / "max-ring-page-order")."""
    if order < 0:
        raise ValueError(f"ring page order must be >= 0, not {order}")
    return XEN_PAGE_SIZE << order


def _round_down_to_power_of_two(n: int) -> int:
    """__RD32: 0 stays 0, otherwise the highest set bit."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def ring_size(entry_size: int, ring_bytes: int = XEN_PAGE_SIZE) -> int:
    """__RING_SIZE: how many entries of `entry_size` fit after the header,
    rounded down to a power of two so indexes can be masked."""
    if entry_size <= 0:
        raise ValueError(f"entry size must be positive, not {entry_size}")
    if ring_bytes < RING_HEADER_SIZE:
        return 0
    return _round_down_to_power_of_two((ring_bytes - RING_HEADER_SIZE) // entry_size)


_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """xen_mb(): make our earlier stores visible before our later loads.

    Python has no fence primitive.  Acquiring and releasing an uncontended
    lock runs an atomic read-modify-write in glibc (a `lock`-prefixed
    instruction on x86-64), and on x86-64 that is a full fence -- the only
    reordering x86's TSO model allows is a store passing a later load, which
    is exactly what xen_mb() exists to forbid.  Write and read barriers
    (xen_wmb/xen_rmb) are no-ops for the CPU on x86-64 (stores stay in order,
    loads stay in order), and CPython cannot reorder our memory accesses
    across its opaque C calls, so they need no instruction; we still call
    this function where ring.h has them so the code reads like the header
    and stays correct on CPUs whose locks are full fences.
    """
    with _barrier_lock:
        pass


write_barrier = full_barrier  # xen_wmb()
read_barrier = full_barrier  # xen_rmb()


def _distance(later: int, earlier: int) -> int:
    """(RING_IDX)(later - earlier): how far `later` is ahead, modulo 2**32."""
    return (later - earlier) & IDX_MASK


def _header_index(slot: int, doc: str) -> property:
    """One of the four u32 header fields, read and written as a single aligned
    native store through the ring's u32 view (see the module docstring)."""

    def get(self: SharedRing) -> int:
        return self._indexes[slot]

    def set_(self: SharedRing, value: int) -> None:
        self._indexes[slot] = value & IDX_MASK

    return property(get, set_, doc=doc)


class SharedRing:
    """The shared page(s): header fields and entry slots over any writable buffer.

    `buf` may be a bytearray, an mmap, or a memoryview of either; only the
    first `ring_bytes` bytes (default: all of it) belong to the ring.
    """

    def __init__(self, buf, entry_size: int, ring_bytes: int | None = None):
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise RingUsageError("a ring needs a writable buffer")
        ring_bytes = len(view) if ring_bytes is None else ring_bytes
        if ring_bytes > len(view):
            raise RingUsageError(f"ring of {ring_bytes} bytes does not fit a {len(view)}-byte buffer")
        nr_ents = ring_size(entry_size, ring_bytes)
        if nr_ents == 0:
            raise RingUsageError(f"no {entry_size}-byte entry fits a {ring_bytes}-byte ring")
        self._bytes = view
        # One aligned native u32 per header field: item stores are single
        # 4-byte stores (see the module docstring for why not struct).
        self._indexes = view[:16].cast("I")
        if self._indexes.itemsize != 4:  # pragma: no cover - 'I' is 4 bytes on every Xen platform
            raise ImportError("native unsigned int is not 4 bytes")
        self.entry_size = entry_size
        self.ring_bytes = ring_bytes
        self.nr_ents = nr_ents

    @staticmethod
    def init(buf) -> None:
        """SHARED_RING_INIT: only the frontend does this, before granting the page."""
        view = memoryview(buf).cast("B")
        if len(view) < RING_HEADER_SIZE:
            raise RingUsageError(f"a {len(view)}-byte buffer cannot hold the {RING_HEADER_SIZE}-byte ring header")
        indexes = view[:16].cast("I")
        indexes[_REQ_PROD] = 0
        indexes[_RSP_PROD] = 0
        indexes[_REQ_EVENT] = 1
        indexes[_RSP_EVENT] = 1
        view[PVT_OFFSET:RING_HEADER_SIZE] = bytes(RING_HEADER_SIZE - PVT_OFFSET)

    # The four shared indexes.  Each access is one 4-byte load or store.
    req_prod = _header_index(_REQ_PROD, "requests produced by the front (free-running)")
    req_event = _header_index(_REQ_EVENT, "the back's 'notify me when req_prod passes this'")
    rsp_prod = _header_index(_RSP_PROD, "responses produced by the back (free-running)")
    rsp_event = _header_index(_RSP_EVENT, "the front's 'notify me when rsp_prod passes this'")

    @property
    def pvt(self) -> memoryview:
        """The 4 per-protocol private bytes (netif's smartpoll_active lives here)."""
        return self._bytes[PVT_OFFSET : PVT_OFFSET + PVT_SIZE]

    def slot_offset(self, index: int) -> int:
        """Byte offset of the slot that free-running `index` maps to."""
        return RING_HEADER_SIZE + (index & (self.nr_ents - 1)) * self.entry_size

    def read_slot(self, index: int) -> bytes:
        """A private copy of a whole slot (RING_COPY_REQUEST/RESPONSE)."""
        start = self.slot_offset(index)
        return bytes(self._bytes[start : start + self.entry_size])

    def write_slot(self, index: int, message: bytes) -> None:
        """Write a message at the start of its slot; like assigning one member
        of the C union, bytes past the message keep their old contents."""
        if len(message) > self.entry_size:
            raise RingUsageError(f"{len(message)}-byte message does not fit a {self.entry_size}-byte entry")
        start = self.slot_offset(index)
        self._bytes[start : start + len(message)] = message

    def release(self) -> None:
        """Drop our views so the underlying mmap can be closed."""
        self._indexes.release()
        self._bytes.release()


def _private_index(attribute: str, doc: str) -> property:
    """One of a half's private indexes under the name ring.h gives it."""
    return property(lambda self: getattr(self, attribute), lambda self, value: setattr(self, attribute, value),
                    doc=doc)


class _RingEnd:
    """What the two halves do alike, each in its own direction.

    A half produces into one pair of header fields (its producer index and
    the peer's event index) and consumes from the other pair; ring.h spells
    each of these macros twice, once for requests and once for responses.
    `FrontRing` and `BackRing` give them their ring.h names.
    """

    # u32 header fields: ours to produce, the peer's "notify me" for it, ours to be notified.
    _PROD: int
    _PROD_EVENT: int
    _CONS_EVENT: int
    _TAKES: str  # what a take returns, for the misuse message
    _PEER: str  # who produces what we take, for the overflow message

    def __init__(self, buf, entry_size: int, *, ring_bytes: int | None = None, start_index: int = 0):
        self.sring = SharedRing(buf, entry_size, ring_bytes)
        self._prod_pvt = start_index & IDX_MASK
        self._cons = start_index & IDX_MASK

    @property
    def size(self) -> int:
        """RING_SIZE."""
        return self.sring.nr_ents

    def release(self) -> None:
        """Drop our views of the buffer (needed before closing an mmap)."""
        self.sring.release()

    def _unconsumed(self) -> int:
        raise NotImplementedError

    def _overflow(self, message: str, producer_index: int, private_index: int) -> RingOverflow:
        """The error for a peer's impossible producer index (RING_*_PROD_OVERFLOW)."""
        return RingOverflow(message, producer_index=producer_index, private_index=private_index, ring_size=self.size)

    def _ahead(self, prod_name: str, prod: int, private_name: str, private: int) -> int:
        """How far the peer's producer index `prod` runs ahead of our private
        index; more than the ring holds is RING_*_PROD_OVERFLOW."""
        ahead = _distance(prod, private)
        if ahead > self.size:
            raise self._overflow(f"{self._PEER} published {prod_name}={prod}, {ahead} past "
                                 f"{private_name}={private} on a ring of {self.size}", prod, private)
        return ahead

    def _put(self, message: bytes) -> int:
        index = self._prod_pvt
        self.sring.write_slot(index, message)
        self._prod_pvt = (index + 1) & IDX_MASK
        return index

    def _push(self) -> None:
        """RING_PUSH_REQUESTS / RING_PUSH_RESPONSES, for callers that notify unconditionally."""
        write_barrier()  # the peer must see the messages before the index that announces them
        self.sring._indexes[self._PROD] = self._prod_pvt

    def _push_and_check_notify(self) -> bool:
        """RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY: publish, then say
        whether the peer asked to be woken for any of the messages just published."""
        indexes = self.sring._indexes
        old = indexes[self._PROD]
        new = self._prod_pvt
        write_barrier()  # peer sees messages /before/ updated producer index
        indexes[self._PROD] = new
        full_barrier()  # peer sees new messages /before/ we check its event index
        return _distance(new, indexes[self._PROD_EVENT]) < _distance(new, old)

    def _take(self) -> bytes:
        """Copy the next message out of shared memory and consume it.

        The copy is taken before anyone decodes or validates it: the peer
        can rewrite the slot at any time, and everything after this call
        must look only at the copy.
        """
        if self._unconsumed() == 0:
            raise RingUsageError(f"no unconsumed {self._TAKES} to take")
        read_barrier()  # read the producer index /before/ the messages it announces
        message = self.sring.read_slot(self._cons)
        self._cons = (self._cons + 1) & IDX_MASK
        return message

    def _final_check(self) -> bool:
        """RING_FINAL_CHECK_FOR_{REQUESTS,RESPONSES}: before sleeping, ask to
        be notified of the very next message and re-check, so one pushed just
        before our event index moved is not slept through."""
        if self._unconsumed():
            return True
        self.sring._indexes[self._CONS_EVENT] = (self._cons + 1) & IDX_MASK
        full_barrier()  # the peer sees our event index /before/ we re-read its producer index
        return self._unconsumed() > 0


class FrontRing(_RingEnd):
    """The frontend's half: puts requests, takes responses (FRONT_RING_ATTACH)."""

    _PROD, _PROD_EVENT, _CONS_EVENT, _TAKES, _PEER = _REQ_PROD, _REQ_EVENT, _RSP_EVENT, "response", "backend"
    req_prod_pvt = _private_index("_prod_pvt", "requests written, pushed or not")
    rsp_cons = _private_index("_cons", "responses consumed")

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots neither holding a request nor an unconsumed response."""
        return self.size - _distance(self.req_prod_pvt, self.rsp_cons)

    def full(self) -> bool:
        """RING_FULL."""
        return self.free_requests() == 0

    def put_request(self, message: bytes) -> int:
        """Write a request into the next slot (not yet visible to the back:
        push it).  Returns the request's ring index."""
        if self.full():
            raise RingUsageError("front ring is full: take responses before putting more requests")
        return self._put(message)

    push_requests = _RingEnd._push
    push_requests_and_check_notify = _RingEnd._push_and_check_notify
    take_response = _RingEnd._take
    final_check_for_responses = _RingEnd._final_check

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES, rejecting a backend that claims
        more responses than the ring can hold (RING_RESPONSE_PROD_OVERFLOW)."""
        return self._ahead("rsp_prod", self.sring.rsp_prod, "rsp_cons", self.rsp_cons)

    def _unconsumed(self) -> int:
        return self.unconsumed_responses()


class BackRing(_RingEnd):
    """The backend's half: takes requests, puts responses (BACK_RING_ATTACH)."""

    _PROD, _PROD_EVENT, _CONS_EVENT, _TAKES, _PEER = _RSP_PROD, _RSP_EVENT, _REQ_EVENT, "request", "frontend"
    rsp_prod_pvt = _private_index("_prod_pvt", "responses written, pushed or not")
    req_cons = _private_index("_cons", "requests consumed")

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS, clamped as ring.h clamps it.

        The clamp (never more than the slots whose responses we have already
        produced) keeps a frontend that pushes too far from making us read a
        slot we have not answered yet.  A producer index that is impossible
        even for a ring full of requests is rejected outright
        (RING_REQUEST_PROD_OVERFLOW) instead of being silently clamped, and
        so -- stricter than ring.h, which would clamp it -- is one that moved
        back behind requests we already consumed: a frontend never un-pushes.
        """
        req_prod = self.sring.req_prod
        published = self._ahead("req_prod", req_prod, "rsp_prod_pvt", self.rsp_prod_pvt)
        if published < _distance(self.req_cons, self.rsp_prod_pvt):
            raise self._overflow(
                f"frontend moved req_prod back to {req_prod}, behind req_cons={self.req_cons}",
                req_prod, self.req_cons)
        requests = _distance(req_prod, self.req_cons)
        room = self.size - _distance(self.req_cons, self.rsp_prod_pvt)
        return min(requests, room)

    def _unconsumed(self) -> int:
        return self.unconsumed_requests()

    def request_cons_overflow(self, cons: int | None = None) -> bool:
        """RING_REQUEST_CONS_OVERFLOW: would consuming at `cons` overtake our responses?"""
        cons = self.req_cons if cons is None else cons
        return _distance(cons, self.rsp_prod_pvt) >= self.size

    take_request = _RingEnd._take

    def put_response(self, message: bytes) -> int:
        """Write a response into the slot of the oldest unanswered request.
        Returns the response's ring index."""
        if self.rsp_prod_pvt == self.req_cons:
            raise RingUsageError("every request taken already has a response")
        return self._put(message)

    push_responses = _RingEnd._push
    push_responses_and_check_notify = _RingEnd._push_and_check_notify
    final_check_for_requests = _RingEnd._final_check


def pack_fields(packer: struct.Struct, *values) -> bytes:
    """struct.pack for ring messages, but caller mistakes (a field out of
    range) are ValueErrors, not struct.error."""
    try:
        return packer.pack(*values)
    except struct.error as e:
        raise ValueError(f"field out of range for {packer.format!r}: {e}") from None


def require_length(data: bytes, size: int, what: str, error: type[Exception]) -> None:
    """A message shorter than its struct is the peer's fault: `error`."""
    if len(data) < size:
        raise error(f"{what} needs {size} bytes, got {len(data)}")


class RingMessage:
    """Base of a frozen dataclass that is one fixed-layout ring message.

    A subclass names its C struct and its layout when it is declared,

        @dataclass(frozen=True)
        class NetifTxResponse(RingMessage, layout=struct.Struct("<Hh"),
                              c_name="netif_tx_response", malformed=MalformedResponse):
            id: int
            status: int

    and, when its fields are the layout's values in order (padding written
    as `x` in the format), gets `SIZE`, `encode` and `decode` from here.  A
    message whose wire form differs from its fields overrides the two.
    `decode` raises `malformed` (the peer's fault) for input shorter than
    the struct and nothing else; `encode` raises ValueError for a field out
    of range (the caller's fault).
    """

    _LAYOUT: struct.Struct
    _C_NAME: str
    _MALFORMED: type[MalformedMessage]

    def __init_subclass__(cls, *, layout: struct.Struct, c_name: str,
                          malformed: type[MalformedMessage] = MalformedMessage, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._LAYOUT, cls._C_NAME, cls._MALFORMED = layout, c_name, malformed
        cls.SIZE = layout.size

    def encode(self) -> bytes:
        return pack_fields(self._LAYOUT, *(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def decode(cls, data: bytes, offset: int = 0):
        require_length(data[offset:], cls.SIZE, cls._C_NAME, cls._MALFORMED)
        return cls(*cls._LAYOUT.unpack_from(data, offset))
