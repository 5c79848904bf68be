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
    SECTOR_SIZE, SECTORS_PER_PAGE, BlkifRequestDiscard, BlkifRequestIndirect, BlkifResponse, Segment,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, MalformedRequest

log = logging.getLogger("xenbed.blkback")

# What this backend offers (Linux blkback's defaults).
MAX_RING_PAGE_ORDER = 4  # xen_blkif_max_ring_order
MAX_INDIRECT_SEGMENTS = 256  # MAX_INDIRECT_SEGMENTS in xen-blkback/common.h
MAX_PERSISTENT_GRANTS = 1056  # xen_blkif_max_pgrants
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

    `grants` has GrantTable's `map_batch([(domid, gref, readonly)]) ->
    [Mapping(.mmap) | exception]` and `unmap_batch(mappings)`: a request's
    segments (or an indirect request's pages) are mapped with one call and
    unmapped with one.  `process()` takes every request on the ring,
    answers each, pushes the responses and returns whether the frontend
    wants an event (it does the final check itself).  RingOverflow
    propagates: the caller must close the device.
    """

    def __init__(self, ring: BackRing, grants, domid: int, fd: int, geometry: DiskGeometry,
                 *, persistent: bool = False, name: str = "blkif"):
        self.ring, self.grants, self.domid = ring, grants, domid
        self.fd, self.geometry = fd, geometry  # swapped together by a media change
        self.persistent = persistent
        self.name = name
        self.persistent_maps: dict[int, object] = {}
        self.stats = {"requests": 0, "errors": 0, "eopnotsupp": 0, "read_bytes": 0, "written_bytes": 0}

    # -- the loop ---------------------------------------------------------------
    def process(self, stop: threading.Event | None = None) -> bool:
        """Handle requests until the ring is empty after a final check (or
        `stop` is set); returns True if the frontend must be notified."""
        notify = False
        while True:
            while self.ring.unconsumed_requests():
                if stop is not None and stop.is_set():
                    return self._push() or notify
                entry = self.ring.take_request()  # a private copy: everything below looks only at it
                self.ring.put_response(self.handle_entry(entry).encode())
                notify = self._push() or notify
            if not self.ring.final_check_for_requests():
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
                status = self._rw(BLKIF_OP_WRITE, req.sector_number, req.segments)
                if status != BLKIF_RSP_OKAY:
                    return status
            os.fdatasync(self.fd)
            return BLKIF_RSP_OKAY
        return self._rw(req.operation, req.sector_number, req.segments)

    def _rw(self, op: int, sector_number: int, segments) -> int:
        extents = segment_extents(sector_number, segments)
        reading = op == BLKIF_OP_READ
        mappings, views = [], []
        try:
            mappings = self._map_all([ext.gref for ext in extents], readonly=not reading)
            for ext, mapping in zip(extents, mappings):
                page = memoryview(mapping.mmap)
                views.append(page)
                views.append(page[ext.page_offset:ext.page_offset + ext.length])
            buffers = views[1::2]
            total = sum(e.length for e in extents)
            offset = extents[0].disk_offset
            if reading:
                done = os.preadv(self.fd, buffers, offset)
                self.stats["read_bytes"] += done
            else:
                done = os.pwritev(self.fd, buffers, offset)
                self.stats["written_bytes"] += done
            if done != total:
                log.warning("%s: short %s at %d: %d of %d bytes", self.name, "read" if reading else "write",
                            offset, done, total)
                return BLKIF_RSP_ERROR
            return BLKIF_RSP_OKAY
        finally:
            for view in reversed(views):
                view.release()
            self._unmap_all(mappings)

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

    def _indirect_segments(self, req: BlkifRequestIndirect) -> tuple[Segment, ...]:
        segments: list[Segment] = []
        remaining = req.nr_segments
        mappings = self._map_all(req.indirect_grefs[:blkif.indirect_pages_needed(req.nr_segments)], readonly=True)
        try:
            pages = [bytes(m.mmap[:XEN_PAGE_SIZE]) for m in mappings]  # copies before decoding (double fetch)
        finally:
            self._unmap_all(mappings)
        for page in pages:
            count = min(remaining, blkif.SEGMENTS_PER_INDIRECT_PAGE)
            segments += blkif.decode_indirect_page(page, count)
            remaining -= count
        return tuple(segments)

    # -- grants -----------------------------------------------------------------
    def _map_all(self, grefs, readonly: bool) -> list:
        """Map a request's pages, in order, with one map_batch call (two when
        a persistent mapping is refused: see below).  Persistent grants are
        granted read-write by the frontend and mapped so, and kept; a page
        that is refused that way but wanted read-only (an indirect page, say)
        is mapped read-only for this request only.  If any page is refused,
        the others are unmapped again and the GrantError raised."""
        out: list = [None] * len(grefs)
        wanted: list[tuple[int, int, bool]] = []  # (index, gref, keep as persistent)
        room = MAX_PERSISTENT_GRANTS - len(self.persistent_maps) if self.persistent else 0
        planned: dict[int, int] = {}  # gref -> index of its first mapping in this request
        for i, gref in enumerate(grefs):
            if self.persistent and gref in self.persistent_maps:
                out[i] = self.persistent_maps[gref]
            elif gref in planned and wanted[planned[gref]][2]:
                out[i] = planned[gref]  # the same persistent page twice: resolved below
            else:
                keep = room > 0
                room -= keep
                planned.setdefault(gref, len(wanted))
                wanted.append((i, gref, keep))
        results = self.grants.map_batch([(self.domid, g, readonly and not keep) for _, g, keep in wanted]) \
            if wanted else []
        retry = [n for n, ((_, _, keep), r) in enumerate(zip(wanted, results))
                 if keep and readonly and isinstance(r, Exception)]
        if retry:
            again = self.grants.map_batch([(self.domid, wanted[n][1], True) for n in retry])
            for n, result in zip(retry, again):
                results[n] = result
                wanted[n] = (wanted[n][0], wanted[n][1], False)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            self._unmap_all([r for r in results if not isinstance(r, Exception)], keep=False)
            raise failed
        for (i, gref, keep), mapping in zip(wanted, results):
            out[i] = mapping
            if keep:
                self.persistent_maps[gref] = mapping
        return [m if not isinstance(m, int) else results[m] for m in out]

    def _unmap_all(self, mappings, keep: bool = True) -> None:
        """Unmap with one call what is not kept as a persistent grant (until disconnect)."""
        kept = self.persistent_maps if self.persistent and keep else {}
        gone = {id(m): m for m in mappings if kept.get(m.gref) is not m}
        if gone:
            self.grants.unmap_batch(list(gone.values()))

    def release(self) -> None:
        """Unmap every persistent grant (at disconnect)."""
        maps, self.persistent_maps = list(self.persistent_maps.values()), {}
        if maps:
            try:
                self.grants.unmap_batch(maps)
            except Exception as exc:
                log.warning("%s: unmapping %d persistent grants: %s", self.name, len(maps), exc)


_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")
