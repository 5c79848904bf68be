"""The block device ring messages of Xen's `io/blkif.h`, with no I/O in it.

Layout is the native x86-64 ABI ("x86_64-abi", what a 64-bit frontend
writes in its `protocol` node): C alignment rules apply, so `id` sits at
offset 8 behind 4 bytes of padding, not at offset 4 as in "x86_32-abi".
Every size and offset here is checked against the C compiler's view of
Debian's libxen-dev headers by tests/abi/ring_abi.c.

All request kinds share one ring slot (the union of `blkif_request` and
`blkif_response`, 112 bytes); which struct a slot holds is decided by its
first byte, `operation`: see `decode_request`.

Decoders copy nothing out of shared memory themselves -- give them the
private copy `BackRing.take_request()` returned -- and raise only
`MalformedRequest`/`MalformedResponse`, and only when the input is shorter
than the struct.  Field values are not judged here (an operation the
backend does not know, eleven-plus segments, first_sect > last_sect):
decoding preserves them so the backend can answer with the right error.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from .ring import XEN_PAGE_SIZE, MalformedRequest, MalformedResponse, RingMessage, ring_bytes_for_order, ring_size, pack_fields, require_length

# io/protocols.h: the values of the frontend's "protocol" node.
XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"
PROTOCOL = XEN_IO_PROTO_ABI_X86_64  # the only layout this module encodes

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4  # was BLKIF_OP_TRIM in old Citrix kernels; never valid
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_RSP_EOPNOTSUPP = -2  # operation not supported
BLKIF_RSP_ERROR = -1  # failed for some unspecified reason (-EIO)
BLKIF_RSP_OKAY = 0

BLKIF_DISCARD_SECURE = 1 << 0  # blkif_request_discard.flag
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8

# vdisk "info" node bits.
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# Segments address 512-byte sectors of a 4 KiB granted frame
# (first_sect..last_sect inclusive, 0..7), whatever the disk's "sector-size".
SECTOR_SIZE = 512
SECTORS_PER_PAGE = XEN_PAGE_SIZE // SECTOR_SIZE

# struct blkif_request_segment { grant_ref_t gref; uint8_t first_sect, last_sect; }
# -- 6 bytes of fields, 8 with the tail padding that the u32 alignment adds.
_SEGMENT = struct.Struct("<IBB2x")
# struct blkif_request: operation, nr_segments, handle, [4 pad], id, sector_number, seg[11]
_REQUEST_HEAD = struct.Struct("<BBH4xQQ")
# struct blkif_request_discard: operation, flag, handle, [4 pad], id, sector_number, nr_sectors
_DISCARD = struct.Struct("<BBH4xQQQ")
# struct blkif_request_indirect: operation, indirect_op, nr_segments, [4 pad], id,
# sector_number, handle, [2 pad], indirect_grefs[8], [4 tail pad to 8-byte alignment]
_INDIRECT = struct.Struct(f"<BBH4xQQH2x{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I4x")
# struct blkif_response: id, operation, [1 pad], status, [4 tail pad]
_RESPONSE = struct.Struct("<QBxh4x")

SEGMENT_SIZE = _SEGMENT.size  # 8
REQUEST_SIZE = _REQUEST_HEAD.size + BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT_SIZE  # 112
DISCARD_SIZE = _DISCARD.size  # 32
INDIRECT_SIZE = _INDIRECT.size  # 64
RESPONSE_SIZE = _RESPONSE.size  # 16
RING_ENTRY_SIZE = max(REQUEST_SIZE, RESPONSE_SIZE)  # union blkif_sring_entry

# An indirect page is an array of blkif_request_segment filling a 4 KiB frame.
SEGMENTS_PER_INDIRECT_PAGE = XEN_PAGE_SIZE // SEGMENT_SIZE  # 512
MAX_INDIRECT_SEGMENTS = SEGMENTS_PER_INDIRECT_PAGE * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST


def blkif_ring_size(order: int = 0) -> int:
    """Slots in a blkif ring of 2**order pages (__CONST_RING_SIZE(blkif, ...))."""
    return ring_size(RING_ENTRY_SIZE, ring_bytes_for_order(order))


def indirect_pages_needed(nr_segments: int) -> int:
    """ceil(nr_segments / segments per page), as blkif.h prescribes."""
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_PAGE)


@dataclass(frozen=True)
class Segment(RingMessage, layout=_SEGMENT, c_name="blkif_request_segment", malformed=MalformedRequest):
    """struct blkif_request_segment: sectors first_sect..last_sect of a granted frame."""

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sectors(self) -> int:
        """Sectors covered; 0 or negative when the peer sent first > last."""
        return self.last_sect - self.first_sect + 1


@dataclass(frozen=True)
class BlkifRequest:
    """struct blkif_request: read, write, barrier, flush (and any unknown operation).

    `nr_segments` is what the wire says; it defaults to len(segments).  A
    decoded request carries min(nr_segments, 11) segments, so a frontend
    that claims more than the slot holds keeps its claim visible.
    """

    operation: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...] = ()
    nr_segments: int = field(default=-1)

    SIZE = REQUEST_SIZE

    def __post_init__(self) -> None:
        if self.nr_segments == -1:
            object.__setattr__(self, "nr_segments", len(self.segments))
        if len(self.segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise ValueError(f"at most {BLKIF_MAX_SEGMENTS_PER_REQUEST} segments fit a request")

    def encode(self) -> bytes:
        head = pack_fields(_REQUEST_HEAD, self.operation, self.nr_segments, self.handle, self.id, self.sector_number)
        segs = b"".join(s.encode() for s in self.segments)
        return head + segs + bytes(REQUEST_SIZE - len(head) - len(segs))

    @classmethod
    def decode(cls, data: bytes) -> BlkifRequest:
        require_length(data, REQUEST_SIZE, "blkif_request", MalformedRequest)
        operation, nr_segments, handle, id_, sector = _REQUEST_HEAD.unpack_from(data, 0)
        carried = min(nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        segments = tuple(
            Segment(*_SEGMENT.unpack_from(data, _REQUEST_HEAD.size + i * SEGMENT_SIZE)) for i in range(carried)
        )
        return cls(operation, handle, id_, sector, segments, nr_segments)


@dataclass(frozen=True)
class BlkifRequestDiscard:
    """struct blkif_request_discard (operation is always BLKIF_OP_DISCARD)."""

    handle: int
    id: int
    sector_number: int
    nr_sectors: int
    flag: int = 0  # BLKIF_DISCARD_SECURE or 0

    SIZE = DISCARD_SIZE
    operation = BLKIF_OP_DISCARD

    def encode(self) -> bytes:
        return pack_fields(_DISCARD, BLKIF_OP_DISCARD, self.flag, self.handle, self.id, self.sector_number, self.nr_sectors)

    @classmethod
    def decode(cls, data: bytes) -> BlkifRequestDiscard:
        require_length(data, DISCARD_SIZE, "blkif_request_discard", MalformedRequest)
        _op, flag, handle, id_, sector, nr_sectors = _DISCARD.unpack_from(data, 0)
        return cls(handle, id_, sector, nr_sectors, flag)


@dataclass(frozen=True)
class BlkifRequestIndirect:
    """struct blkif_request_indirect (operation is always BLKIF_OP_INDIRECT).

    The segments live in granted pages listed by `indirect_grefs`; a
    decoded request carries the grefs its nr_segments needs, at most 8.
    """

    indirect_op: int  # BLKIF_OP_READ or BLKIF_OP_WRITE
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    indirect_grefs: tuple[int, ...] = ()

    SIZE = INDIRECT_SIZE
    operation = BLKIF_OP_INDIRECT

    def __post_init__(self) -> None:
        if len(self.indirect_grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise ValueError(f"at most {BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST} indirect pages per request")

    def encode(self) -> bytes:
        grefs = tuple(self.indirect_grefs) + (0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(self.indirect_grefs))
        return pack_fields(
            _INDIRECT,
            BLKIF_OP_INDIRECT,
            self.indirect_op,
            self.nr_segments,
            self.id,
            self.sector_number,
            self.handle,
            *grefs,
        )

    @classmethod
    def decode(cls, data: bytes) -> BlkifRequestIndirect:
        require_length(data, INDIRECT_SIZE, "blkif_request_indirect", MalformedRequest)
        _op, indirect_op, nr_segments, id_, sector, handle, *grefs = _INDIRECT.unpack_from(data, 0)
        carried = min(indirect_pages_needed(nr_segments), BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        return cls(indirect_op, nr_segments, handle, id_, sector, tuple(grefs[:carried]))


AnyBlkifRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect


def decode_request(entry: bytes) -> AnyBlkifRequest:
    """Decode a request slot by its operation byte.

    Unknown operations decode as a plain `BlkifRequest`, so the backend can
    echo id and operation in a BLKIF_RSP_EOPNOTSUPP response.
    """
    require_length(entry, 1, "blkif request", MalformedRequest)
    operation = entry[0]
    if operation == BLKIF_OP_DISCARD:
        return BlkifRequestDiscard.decode(entry)
    if operation == BLKIF_OP_INDIRECT:
        return BlkifRequestIndirect.decode(entry)
    return BlkifRequest.decode(entry)


@dataclass(frozen=True)
class BlkifResponse(RingMessage, layout=_RESPONSE, c_name="blkif_response", malformed=MalformedResponse):
    """struct blkif_response: id and operation copied from the request, BLKIF_RSP_* status."""

    id: int
    operation: int
    status: int


def encode_indirect_page(segments: list[Segment] | tuple[Segment, ...]) -> bytes:
    """One 4 KiB indirect page holding up to 512 segments (zero-filled after them)."""
    if len(segments) > SEGMENTS_PER_INDIRECT_PAGE:
        raise ValueError(f"at most {SEGMENTS_PER_INDIRECT_PAGE} segments fit an indirect page")
    body = b"".join(s.encode() for s in segments)
    return body + bytes(XEN_PAGE_SIZE - len(body))


def decode_indirect_page(page: bytes, count: int) -> tuple[Segment, ...]:
    """The first `count` segments of an indirect page (copy the page first)."""
    if not 0 <= count <= SEGMENTS_PER_INDIRECT_PAGE:
        raise ValueError(f"an indirect page holds 0..{SEGMENTS_PER_INDIRECT_PAGE} segments, not {count}")
    require_length(page, count * SEGMENT_SIZE, "indirect segment page", MalformedRequest)
    return tuple(Segment(*_SEGMENT.unpack_from(page, i * SEGMENT_SIZE)) for i in range(count))



@dataclass(frozen=True)
class SegmentArray:
    """Many segments at once, as three parallel columns (the data path's
    view of an indirect request: no object per segment).  `grefs` is an
    array('I'), `first_sects`/`last_sects` one byte per segment."""

    grefs: Sequence[int]
    first_sects: bytes
    last_sects: bytes

    def __len__(self) -> int:
        return len(self.grefs)

    @classmethod
    def whole_pages(cls, grefs: Sequence[int], last_sect: int = SECTORS_PER_PAGE - 1) -> SegmentArray:
        """Whole pages, the last one up to `last_sect` (blkfront's chunks)."""
        n = len(grefs)
        lasts = bytes([SECTORS_PER_PAGE - 1]) * (n - 1) + bytes([last_sect]) if n else b""
        return cls(array("I", grefs), bytes(n), lasts)

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> SegmentArray:
        return cls(array("I", [s.gref for s in segments]), bytes(s.first_sect for s in segments),
                   bytes(s.last_sect for s in segments))

    def segments(self) -> tuple[Segment, ...]:
        return tuple(Segment(g, f, la) for g, f, la in zip(self.grefs, self.first_sects, self.last_sects))

    def all_whole(self) -> bool:
        """Every segment is a full page (first 0, last 7): the common case."""
        n = len(self.grefs)
        return self.first_sects == bytes(n) and self.last_sects == _WHOLE * n

    def nr_sectors(self) -> int:
        """Sectors covered (segments must be valid: first <= last)."""
        return sum(self.last_sects) - sum(self.first_sects) + len(self.grefs)

    def pack_into(self, page, offset: int = 0) -> None:
        """Write the segments as blkif_request_segment structs at `offset` of a
        writable buffer (the padding bytes are zeroed)."""
        n = len(self.grefs)
        end = offset + n * SEGMENT_SIZE
        body = bytearray(n * SEGMENT_SIZE)
        words = memoryview(body).cast("I")
        words[0::2] = self.grefs if isinstance(self.grefs, array) else array("I", self.grefs)
        words.release()
        body[4::SEGMENT_SIZE] = self.first_sects
        body[5::SEGMENT_SIZE] = self.last_sects
        page[offset:end] = body

    @classmethod
    def unpack(cls, page, count: int, offset: int = 0) -> SegmentArray:
        """The `count` segments at `offset` of a (private) buffer."""
        data = bytes(page[offset:offset + count * SEGMENT_SIZE])
        require_length(data, count * SEGMENT_SIZE, "segment array", MalformedRequest)
        grefs = array("I")
        grefs.frombytes(data)
        return cls(grefs[0::2], data[4::SEGMENT_SIZE], data[5::SEGMENT_SIZE])


_WHOLE = bytes([SECTORS_PER_PAGE - 1])
if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian (x86_64-abi)
    raise ImportError("blkif.SegmentArray packs native words: little-endian hosts only")


def encode_indirect_pages(segments: SegmentArray) -> list[bytes]:
    """The indirect pages (4 KiB each, zero-filled after the segments) of an
    indirect request carrying `segments`."""
    pages = []
    for start in range(0, len(segments), SEGMENTS_PER_INDIRECT_PAGE):
        stop = start + SEGMENTS_PER_INDIRECT_PAGE
        page = bytearray(XEN_PAGE_SIZE)
        SegmentArray(segments.grefs[start:stop], segments.first_sects[start:stop],
                     segments.last_sects[start:stop]).pack_into(page)
        pages.append(bytes(page))
    return pages

# Where every field lives, named as tests/abi/ring_abi.c names it.
FIELDS = {  # "struct.member": (offset, size)
    "blkif_request_segment.gref": (0, 4),
    "blkif_request_segment.first_sect": (4, 1),
    "blkif_request_segment.last_sect": (5, 1),
    "blkif_request.operation": (0, 1),
    "blkif_request.nr_segments": (1, 1),
    "blkif_request.handle": (2, 2),
    "blkif_request.id": (8, 8),
    "blkif_request.sector_number": (16, 8),
    "blkif_request.seg": (24, 88),
    "blkif_request_discard.operation": (0, 1),
    "blkif_request_discard.flag": (1, 1),
    "blkif_request_discard.handle": (2, 2),
    "blkif_request_discard.id": (8, 8),
    "blkif_request_discard.sector_number": (16, 8),
    "blkif_request_discard.nr_sectors": (24, 8),
    "blkif_request_indirect.operation": (0, 1),
    "blkif_request_indirect.indirect_op": (1, 1),
    "blkif_request_indirect.nr_segments": (2, 2),
    "blkif_request_indirect.id": (8, 8),
    "blkif_request_indirect.sector_number": (16, 8),
    "blkif_request_indirect.handle": (24, 2),
    "blkif_request_indirect.indirect_grefs": (28, 32),
    "blkif_response.id": (0, 8),
    "blkif_response.operation": (8, 1),
    "blkif_response.status": (10, 2),
}

STRUCT_SIZES = {
    "blkif_request_segment": SEGMENT_SIZE,
    "blkif_request": REQUEST_SIZE,
    "blkif_request_discard": DISCARD_SIZE,
    "blkif_request_indirect": INDIRECT_SIZE,
    "blkif_response": RESPONSE_SIZE,
    "blkif_sring_entry": RING_ENTRY_SIZE,
}
