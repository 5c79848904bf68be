"""blkback's data path (Linux's xen-blkback/blkback.c): requests off a
blkif ring, validated, served with `preadv`/`pwritev` on the granted pages,
answered on the ring.

It is independent of XenBus: give `BlkifServer` a BackRing, something with
GrantTable's `map`/`unmap`, a file descriptor and a `DiskGeometry`, and call
`process()`.  `validate_request` and `segment_extents` are pure
(tests/unit/test_blkback_*.py).  The XenBus side is drivers/blk/back.py,
one connected device (ring, port, disk, thread) drivers/blk/connection.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass

from xenbed.protocols import blkif
from xenbed.protocols.blkif import (
    BLKIF_DISCARD_SECURE, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
    SECTOR_SIZE, SECTORS_PER_PAGE, BlkifRequestDiscard, BlkifRequestIndirect, BlkifResponse,
    SegmentArray,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, MalformedRequest

from .pgrants import MAX_PERSISTENT_GRANTS, PersistentGrants

log = logging.getLogger("xenbed.blkback")

# What this backend offers (Linux blkback's defaults).
MAX_RING_PAGE_ORDER = 4  # xen_blkif_max_ring_order
MAX_INDIRECT_SEGMENTS = 256  # MAX_INDIRECT_SEGMENTS in xen-blkback/common.h
# xenblk_max_queues: Linux offers one queue per online CPU
MAX_QUEUES = max(1, min(os.cpu_count() or 1, 8))
DISCARD_GRANULARITY = 4096

BLKDISCARD = 0x1277  # _IO(0x12, 119)


# ---------------------------------------------------------------------------------------------
# Pure parts: validation and segment arithmetic
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskGeometry:
    """What validation needs to know about the disk."""

    sectors: int  # 512-byte sectors
    readonly: bool = False
    discard: bool = True  # feature-discard advertised
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS


def segments_status(segments, sector_number: int, geometry: DiskGeometry) -> int:
    """BLKIF_RSP_OKAY when every segment is well formed (first_sect <=
    last_sect <= 7) and the sectors they cover, laid end to end from
    `sector_number`, lie inside the disk; BLKIF_RSP_ERROR otherwise."""
    if isinstance(segments, SegmentArray):
        if not segments.all_whole():
            if any(not f <= la < SECTORS_PER_PAGE for f, la in zip(segments.first_sects, segments.last_sects)):
                return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY if sector_number + segments.nr_sectors() <= geometry.sectors else BLKIF_RSP_ERROR
    total = 0
    for seg in segments:
        if not 0 <= seg.first_sect <= seg.last_sect < SECTORS_PER_PAGE:
            return BLKIF_RSP_ERROR
        total += seg.last_sect - seg.first_sect + 1
    if sector_number + total > geometry.sectors:
        return BLKIF_RSP_ERROR
    return BLKIF_RSP_OKAY


def validate_request(req, geometry: DiskGeometry) -> int:
    """The status a request deserves before any I/O: BLKIF_RSP_OKAY (go on),
    BLKIF_RSP_ERROR (malformed, out of range, write to a read-only disk) or
    BLKIF_RSP_EOPNOTSUPP (an operation this backend does not offer).

    For an indirect request only the header is judged here (its segments
    live in granted pages): check them with `segments_status` once copied.
    """
    op = req.operation
    if op == BLKIF_OP_DISCARD:
        if not geometry.discard:
            return BLKIF_RSP_EOPNOTSUPP
        if req.flag & BLKIF_DISCARD_SECURE:
            return BLKIF_RSP_EOPNOTSUPP  # discard-secure is not advertised
        if geometry.readonly:
            return BLKIF_RSP_ERROR
        if req.sector_number + req.nr_sectors > geometry.sectors:
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY
    if op == BLKIF_OP_INDIRECT:
        if req.indirect_op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            return BLKIF_RSP_ERROR
        if not 1 <= req.nr_segments <= geometry.max_indirect_segments:
            return BLKIF_RSP_ERROR
        if len(req.indirect_grefs) < blkif.indirect_pages_needed(req.nr_segments):
            return BLKIF_RSP_ERROR
        if req.indirect_op == BLKIF_OP_WRITE and geometry.readonly:
            return BLKIF_RSP_ERROR
        if req.sector_number >= geometry.sectors:
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY
    if op in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE):
        minimum = 0 if op == BLKIF_OP_FLUSH_DISKCACHE else 1
        if not minimum <= req.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return BLKIF_RSP_ERROR
        if op != BLKIF_OP_READ and req.nr_segments and geometry.readonly:
            return BLKIF_RSP_ERROR  # a write, or a flush carrying data
        if op == BLKIF_OP_WRITE and geometry.readonly:
            return BLKIF_RSP_ERROR
        return segments_status(req.segments, req.sector_number, geometry)
    return BLKIF_RSP_EOPNOTSUPP  # WRITE_BARRIER (not advertised), RESERVED_1, unknown


@dataclass(frozen=True)
class Extent:
    """One segment's piece of an I/O: `length` bytes at `page_offset` in the
    segment's granted page, at byte `disk_offset` of the disk."""

    gref: int
    page_offset: int
    length: int
    disk_offset: int


def segment_extents(sector_number: int, segments) -> list[Extent]:
    """Where each (validated) segment's bytes go: segments cover consecutive
    disk sectors from `sector_number`, each its first_sect..last_sect of a
    4 KiB page."""
    extents, disk = [], sector_number * SECTOR_SIZE
    for seg in segments:
        length = (seg.last_sect - seg.first_sect + 1) * SECTOR_SIZE
        extents.append(Extent(seg.gref, seg.first_sect * SECTOR_SIZE, length, disk))
        disk += length
    return extents


def response_operation(req) -> int:
    """The operation a response echoes: an indirect request's inner op (as Linux)."""
    return req.indirect_op if req.operation == BLKIF_OP_INDIRECT else req.operation


# ---------------------------------------------------------------------------------------------
# The ring server
# ---------------------------------------------------------------------------------------------

class BlkifServer:
    """Serves one blkif ring over one open disk descriptor.

    `grants` has GrantTable's `map(domid, gref, readonly) -> Mapping(.mmap)`
    and `unmap(mapping)`.  `process()` takes every request on the ring --
    all that one notification brought, together -- answers each, pushes
    the responses once per batch with ring.h's notify check and returns
    whether the frontend wants an event (it does the final check itself).
    Data move between the disk and the granted pages with one
    `preadv`/`pwritev` per request, straight into the mappings: no Python
    copy.  RingOverflow propagates: the caller must close the device.
    """

    def __init__(self, ring: BackRing, grants, domid: int, fd: int, geometry: DiskGeometry,
                 *, persistent: bool = False, name: str = "blkif", max_grants: int = MAX_PERSISTENT_GRANTS):
        self.ring, self.grants, self.domid = ring, grants, domid
        self.fd, self.geometry = fd, geometry  # swapped together by a media change
        self.persistent = persistent
        self.name = name
        self.pgrants = PersistentGrants(grants, domid, persistent=persistent, max_grants=max_grants, name=name)
        self.stats = {"requests": 0, "errors": 0, "eopnotsupp": 0, "read_bytes": 0, "written_bytes": 0,
                      "batches": 0}

    @property
    def persistent_maps(self):
        """gref -> persistent mapping entry (for tests and status)."""
        return self.pgrants.table

    # -- the loop ---------------------------------------------------------------
    def process(self, stop: threading.Event | None = None) -> bool:
        """Handle requests until the ring is empty after a final check (or
        `stop` is set); returns True if the frontend must be notified."""
        notify = False
        ring = self.ring
        while True:
            while ring.unconsumed_requests():
                self.stats["batches"] += 1
                batch = []
                while ring.unconsumed_requests():  # everything this notification brought
                    batch.append(ring.take_request())  # private copies: everything below looks only at them
                for entry in batch:
                    ring.put_response(self.handle_entry(entry).encode())
                    if stop is not None and stop.is_set():
                        break
                notify = self._push() or notify
                if stop is not None and stop.is_set():
                    return notify
            if self.pgrants.purge_due():
                self.pgrants.purge()
            if not ring.final_check_for_requests():
                return notify

    def _push(self) -> bool:
        return self.ring.push_responses_and_check_notify()

    def handle_entry(self, entry: bytes) -> BlkifResponse:
        self.stats["requests"] += 1
        try:
            req = blkif.decode_request(entry)
        except MalformedRequest:  # cannot happen with a full slot; answer something well formed
            return self._respond(0, entry[0] if entry else 0, BLKIF_RSP_ERROR)
        status = validate_request(req, self.geometry)
        if status == BLKIF_RSP_OKAY:
            try:
                status = self._execute(req)
            except Exception as exc:  # a refused grant, an I/O error: this request fails, the device lives
                log.warning("%s: request id=%d op=%d sector=%d failed: %s", self.name, req.id, req.operation,
                            req.sector_number, exc)
                status = BLKIF_RSP_ERROR
            finally:
                self.pgrants.done()
        return self._respond(req.id, response_operation(req), status)

    def _respond(self, id_: int, op: int, status: int) -> BlkifResponse:
        if status == BLKIF_RSP_ERROR:
            self.stats["errors"] += 1
        elif status == BLKIF_RSP_EOPNOTSUPP:
            self.stats["eopnotsupp"] += 1
        return BlkifResponse(id_, op, status)

    # -- operations -------------------------------------------------------------
    def _execute(self, req) -> int:
        if req.operation == BLKIF_OP_DISCARD:
            return self._discard(req)
        if req.operation == BLKIF_OP_INDIRECT:
            segments = self._indirect_segments(req)
            status = segments_status(segments, req.sector_number, self.geometry)
            if status != BLKIF_RSP_OKAY:
                return status
            return self._rw(req.indirect_op, req.sector_number, segments)
        if req.operation == BLKIF_OP_FLUSH_DISKCACHE:
            if req.nr_segments:  # a write with REQ_PREFLUSH: data, then everything durable
                status = self._rw(BLKIF_OP_WRITE, req.sector_number, SegmentArray.of(req.segments))
                if status != BLKIF_RSP_OKAY:
                    return status
            os.fdatasync(self.fd)
            return BLKIF_RSP_OKAY
        return self._rw(req.operation, req.sector_number, SegmentArray.of(req.segments))

    def _rw(self, op: int, sector_number: int, segments: SegmentArray) -> int:
        """One preadv/pwritev over the (validated) segments' pieces of their pages."""
        reading = op == BLKIF_OP_READ
        views = self.pgrants.pages(segments.grefs, not reading)
        if segments.all_whole():
            buffers, total = views, len(views) * XEN_PAGE_SIZE
        else:
            buffers = [v[f * SECTOR_SIZE:(la + 1) * SECTOR_SIZE]
                       for v, f, la in zip(views, segments.first_sects, segments.last_sects)]
            total = segments.nr_sectors() * SECTOR_SIZE
        offset = sector_number * SECTOR_SIZE
        try:
            if reading:
                done = os.preadv(self.fd, buffers, offset)
                self.stats["read_bytes"] += done
            else:
                done = os.pwritev(self.fd, buffers, offset)
                self.stats["written_bytes"] += done
        finally:
            if buffers is not views:
                for b in buffers:
                    b.release()
        if done != total:
            log.warning("%s: short %s at %d: %d of %d bytes", self.name, "read" if reading else "write",
                        offset, done, total)
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY

    def _discard(self, req: BlkifRequestDiscard) -> int:
        if req.nr_sectors == 0:
            return BLKIF_RSP_OKAY
        start, length = req.sector_number * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE
        try:
            if stat.S_ISBLK(os.fstat(self.fd).st_mode):
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", start, length))
            else:
                _punch_hole(self.fd, start, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                return BLKIF_RSP_EOPNOTSUPP
            raise
        return BLKIF_RSP_OKAY

    def _indirect_segments(self, req: BlkifRequestIndirect) -> SegmentArray:
        """The segment array from the request's indirect pages, copied out of
        the granted pages before it is looked at (no double fetch)."""
        pages = req.indirect_grefs[:blkif.indirect_pages_needed(req.nr_segments)]
        data = b"".join(bytes(view[:XEN_PAGE_SIZE]) for view in self.pgrants.pages(pages, True))
        self.pgrants.done()  # the indirect pages mapped for this request only are not needed any more
        return SegmentArray.unpack(data, req.nr_segments)

    def release(self) -> None:
        """Unmap every persistent grant (at disconnect)."""
        self.pgrants.release()


_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")
