"""blkback: the PV block backend, serving a loop device to a guest's blkfront.

How it is started (in dom0, or a driver domain, long-lived):

    python3 -m xenbed.drivers.blk.back [--domid N] [--run-hotplug]

Environment: XENBED_CREDENTIAL / XENBED_HYPERVISOR_SOCKET (the hypervisor
link, role "device"), XENSTORED_PATH (the store).  It logs one line per event
to stdout, each naming the backend path, and exits cleanly on SIGTERM/SIGINT
(every connected device is torn down: rings unmapped, ports closed, loop fds
closed -- autoclear then frees the loops).

What it watches, as Linux's xen-blkback does (seed 000, Device Initialisation
and Closedown).  `Blkback` is a `XenbusDriver` for type "vbd" on a
`BackendBus` (drivers/xenbus), which watches `/local/domain/<self>/backend/vbd`,
probes each new `<frontend-domid>/<devid>` dir in state Initialising, and
watches the frontend's `state`:

* probe: write `max-ring-page-order` and `feature-max-indirect-segments`,
  Initialising -> InitWait, watch `<backend>/physical-device` (the hotplug
  step writes it; the device is then opened, O_DIRECT, and a loop device's
  autoclear turned on, until the device is removed or unplugged) and
  `<backend>/state` (the toolstack writes `online=0` + Closing to unplug).
* when the frontend is Initialised (or Connected) AND `physical-device` is
  there, in either order: read and validate `ring-ref` (or
  `ring-page-order` + `ring-ref0..N`), `event-channel`, `protocol`,
  `feature-persistent`; map the ring, bind the event channel, write
  `sectors`, `info`, `sector-size`, `physical-sector-size`,
  `feature-flush-cache`, `feature-discard` (+ granularity/alignment),
  `feature-persistent` in ONE transaction, then Connected.  Bad keys:
  dev_fatal (`<domain>/error/<nodename>/error`, as Linux) and Closing.
* frontend Closing -> drain, unmap, unbind, Closing; frontend Closed ->
  Closed, and with `online=0` the disk is closed (autoclear frees the loop);
  frontend Initialising/Initialised after Closed (reset, migration) ->
  InitWait and connect again; backend dir removed -> remove().
* recover (a restarted blkback, or a restarted dom0, finds the device in
  the store in a state an earlier blkback left): the old loop device went
  with the old process (autoclear), so the stale hotplug keys are removed
  and the hotplug step runs again here (the toolstack that ran it is gone
  too); a device left Connected goes Closed, which blkfront reads as "the
  backend lost the connection": it keeps its disk open, shadows what was in
  flight, resets to Initialising and reconnects on a new ring, replaying the
  shadow.  A device left in InitWait stays there and connects as at boot.

Reconfiguration while Connected (seed 000, Device reconfiguration: device-
specific watches, both ends stay Connected):

* online resize (xen_vbd_resize in Linux's xen-blkback/xenbus.c): the ring
  thread compares the disk's BLKGETSIZE64 with the size it serves each time
  it wakes -- on a request, and on its 0.25 s idle timeout, so an idle disk's
  resize is seen within a second (Linux checks only when the ring kthread
  wakes, i.e. on I/O) -- and when it differs serves the new size, then
  rewrites `sectors` and our unchanged `state` (Connected) in ONE
  transaction.  blkfront sees `sectors` change through its watch on it.
  The state rewrite is a notification, not a transition: it bypasses
  switch_state and is not recorded (the checker would call Connected ->
  Connected "not a transition").  The toolstack grows the image and sets the
  loop's capacity (`xl block-resize`, toolstack/blk.py).
* cdrom media change (`device-type` cdrom; a PV take on xl cd-insert /
  cd-eject, which libxl offers only to QEMU): the hotplug `change` step
  rewrites `physical-device` (or removes it: no medium); our watch on it
  opens the new device (or none), swaps it under the ring thread's I/O
  lock, closes the old one (autoclear frees its loop) and publishes the new
  `sectors` (0 when empty) with Connected as above.  A non-removable disk
  keeps refusing a changed physical-device, as Linux's backend_changed does.

The hotplug step (`xenbed.drivers.blk.hotplug add`) is run by the toolstack
after InitWait, as libxl does; `--run-hotplug` makes the daemon run it itself
on probe and on removal instead (udev-style), for tests without xl.  In a
driver domain (a domain without the control privilege, seed 004) it is
always on: the disks it serves are its own storage, which dom0's toolstack
cannot reach, and there is no toolstack in it -- on Xen, `xl devd` runs in
the driver domain for exactly this.  There the step's removal also runs when
the toolstack unplugs the device (Closed with online=0), before dom0 removes
the directories, as devd runs the script on that state.

The data path (`BlkifServer`) is independent of XenBus: give it a BackRing,
something with GrantTable's `map`/`unmap`, a file descriptor and a
`DiskGeometry`, and call `process()`.  `validate_request` and
`segment_extents` are pure (tests/unit/test_blkback_*.py).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field, replace

from xenbed.protocols import blkif
from xenbed.protocols.blkif import (
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_DISCARD_SECURE,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE, SECTORS_PER_PAGE, BlkifRequest, BlkifRequestDiscard,
    BlkifRequestIndirect, BlkifResponse, Segment,
)
from xenbed.drivers.xenbus import XenbusDevice, XenbusDriver, XenbusState
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, MalformedRequest, RingOverflow

from . import loop

log = logging.getLogger("xenbed.blkback")

# What this backend offers (Linux blkback's defaults).
MAX_RING_PAGE_ORDER = 4  # xen_blkif_max_ring_order
MAX_INDIRECT_SEGMENTS = 256  # MAX_INDIRECT_SEGMENTS in xen-blkback/common.h
MAX_PERSISTENT_GRANTS = 1056  # xen_blkif_max_pgrants
DISCARD_GRANULARITY = 4096

# XenbusState values (io/xenbus.h); the bus's XenbusState enum has the same numbers.
UNKNOWN, INITIALISING, INITWAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = range(7)
STATE_NAMES = {0: "Unknown", 1: "Initialising", 2: "InitWait", 3: "Initialised", 4: "Connected",
               5: "Closing", 6: "Closed", 7: "Reconfiguring", 8: "Reconfigured"}

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
# Frontend keys
# ---------------------------------------------------------------------------------------------

class FrontendConfigError(Exception):
    """The frontend's keys are missing or invalid (-> dev_fatal)."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.err = err


@dataclass(frozen=True)
class FrontendConfig:
    ring_refs: tuple[int, ...]
    ring_page_order: int
    event_channel: int
    protocol: str
    persistent: bool


def _uint(text: str | None, key: str, limit: int = 0xFFFFFFFF) -> int:
    if text is None:
        raise FrontendConfigError(errno.ENOENT, f"reading {key}: missing")
    text = text.strip()
    if not text.isascii() or not text.isdigit() or int(text) > limit:
        raise FrontendConfigError(errno.EINVAL, f"reading {key}: {text!r} is not an unsigned number")
    return int(text)


def parse_frontend_config(read, max_ring_page_order: int = MAX_RING_PAGE_ORDER) -> FrontendConfig:
    """Read and validate the frontend's connection keys.  `read(key)` returns
    the value of `<frontend>/<key>` or None (xenbus_gather / read_per_ring_refs)."""
    protocol = read("protocol")
    if protocol is None or protocol == "":
        protocol = blkif.PROTOCOL  # native
    if protocol != blkif.XEN_IO_PROTO_ABI_X86_64:
        raise FrontendConfigError(errno.ENOSYS, f"unknown fe protocol {protocol!r}")
    queues = read("multi-queue-num-queues")
    if queues is not None and _uint(queues, "multi-queue-num-queues") != 1:
        raise FrontendConfigError(errno.ENOSYS, f"{queues} queues requested; multi-queue-max-queues is not offered")
    order_text = read("ring-page-order")
    if order_text is None:
        order = 0
        refs = (_uint(read("ring-ref"), "ring-ref"),)
    else:
        order = _uint(order_text, "ring-page-order")
        if order > max_ring_page_order:
            raise FrontendConfigError(errno.EINVAL, f"ring-page-order {order} exceeds max-ring-page-order "
                                                    f"{max_ring_page_order}")
        refs = tuple(_uint(read(f"ring-ref{i}"), f"ring-ref{i}") for i in range(1 << order))
    port = _uint(read("event-channel"), "event-channel")
    persistent_text = read("feature-persistent")
    persistent = False if persistent_text is None else _uint(persistent_text, "feature-persistent") != 0
    return FrontendConfig(refs, order, port, protocol, persistent)


# ---------------------------------------------------------------------------------------------
# Mapping a multi-page ring contiguously
# ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_memview_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_memview_from_memory.restype = ctypes.py_object
_memview_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PyBUF_WRITE = 0x200
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


class ContiguousPages:
    """Several page descriptors mapped side by side (vmap of a multi-page
    ring): `buf` is a writable memoryview over all of them."""

    def __init__(self, fds: list[int]):
        self.size = len(fds) * XEN_PAGE_SIZE
        addr = _libc.mmap(None, self.size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "reserving ring address space")
        self.addr = addr
        try:
            for i, fd in enumerate(fds):
                at = _libc.mmap(addr + i * XEN_PAGE_SIZE, XEN_PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
                if at != addr + i * XEN_PAGE_SIZE:
                    raise OSError(ctypes.get_errno(), f"mapping ring page {i}")
        except BaseException:
            _libc.munmap(addr, self.size)
            raise
        self.buf = _memview_from_memory(addr, self.size, _PyBUF_WRITE)

    def close(self) -> None:
        if self.addr is not None:
            self.buf.release()
            _libc.munmap(self.addr, self.size)
            self.addr = None


# ---------------------------------------------------------------------------------------------
# The data path
# ---------------------------------------------------------------------------------------------

class BlkifServer:
    """Serves one blkif ring over one open disk descriptor.

    `grants` has GrantTable's `map(domid, gref, readonly) -> Mapping(.mmap)`
    and `unmap(mapping)`.  `process()` takes every request on the ring,
    answers each, pushes the responses and returns whether the frontend
    wants an event (it does the final check itself).  RingOverflow
    propagates: the caller must close the device.
    """

    def __init__(self, ring: BackRing, grants, domid: int, fd: int, geometry: DiskGeometry,
                 *, persistent: bool = False, name: str = "blkif"):
        self.ring = ring
        self.grants = grants
        self.domid = domid
        self.fd = fd
        self.geometry = geometry
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
            for ext in extents:
                mapping = self._map(ext.gref, readonly=not reading)
                mappings.append(mapping)
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
            for mapping in mappings:
                self._unmap(mapping)

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
        for gref in req.indirect_grefs[:blkif.indirect_pages_needed(req.nr_segments)]:
            mapping = self._map(gref, readonly=True)
            try:
                page = bytes(mapping.mmap[:XEN_PAGE_SIZE])  # copy before decoding (double fetch)
            finally:
                self._unmap(mapping)
            count = min(remaining, blkif.SEGMENTS_PER_INDIRECT_PAGE)
            segments += blkif.decode_indirect_page(page, count)
            remaining -= count
        return tuple(segments)

    # -- grants -----------------------------------------------------------------
    def _map(self, gref: int, readonly: bool):
        if self.persistent:
            mapping = self.persistent_maps.get(gref)
            if mapping is not None:
                return mapping
            if len(self.persistent_maps) < MAX_PERSISTENT_GRANTS:
                # persistent grants are granted read-write by the frontend, and mapped so
                try:
                    mapping = self.grants.map(self.domid, gref, False)
                except Exception:
                    if not readonly:
                        raise
                    # a read-only grant after all (an indirect page, say): map it for this request only
                    return self.grants.map(self.domid, gref, True)
                self.persistent_maps[gref] = mapping
                return mapping
        return self.grants.map(self.domid, gref, readonly)

    def _unmap(self, mapping) -> None:
        if self.persistent and self.persistent_maps.get(mapping.gref) is mapping:
            return  # kept until disconnect
        self.grants.unmap(mapping)

    def release(self) -> None:
        """Unmap every persistent grant (at disconnect)."""
        maps, self.persistent_maps = list(self.persistent_maps.values()), {}
        for mapping in maps:
            try:
                self.grants.unmap(mapping)
            except Exception as exc:
                log.warning("%s: unmapping persistent gref %s: %s", self.name, getattr(mapping, "gref", "?"), exc)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


# ---------------------------------------------------------------------------------------------
# One connected device: ring + event channel + disk
# ---------------------------------------------------------------------------------------------

class Disk:
    """The backing device, open from the hotplug step's `physical-device`
    until the device is removed (xen_vbd_create .. xen_vbd_free).  A loop
    device gets AUTOCLEAR once open: our close -- or our death -- frees it."""

    def __init__(self, path: str, major: int, minor: int, readonly: bool, discard: bool, direct: bool = True):
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            # O_DIRECT: an acknowledged write has left our page cache for the loop driver (so it is in the
            # image file's cache, visible to anyone reading the file); granted pages are 4 KiB aligned and
            # segments 512-byte aligned, as direct I/O needs.
            fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
            self.direct = direct
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            fd = os.open(path, flags)
            self.direct = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
                raise OSError(errno.ENODEV, f"{path} is not block device {major:x}:{minor:x}")
            if major == loop.LOOP_MAJOR:
                loop.set_autoclear(path, fd)
            size = loop.device_size(fd)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.fd = fd
        self.physical_device = (major, minor)
        self.geometry = DiskGeometry(size // SECTOR_SIZE, readonly, discard and not readonly)

    @classmethod
    def no_media(cls) -> Disk:
        """An empty cdrom drive: 0 sectors, so every request fails validation
        before it could touch a descriptor."""
        disk = cls.__new__(cls)
        disk.path, disk.fd, disk.physical_device, disk.direct = "(no medium)", None, None, False
        disk.geometry = DiskGeometry(0, readonly=True, discard=False)
        return disk

    @classmethod
    def from_fd_for_tests(cls, fd: int, sectors: int, readonly: bool = False, discard: bool = True) -> Disk:
        disk = cls.__new__(cls)
        disk.path, disk.fd, disk.physical_device, disk.direct = f"fd:{fd}", fd, (0, 0), False
        disk.geometry = DiskGeometry(sectors, readonly, discard and not readonly)
        return disk

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Connection:
    """The live half of a connected vbd: the mapped ring, the bound port, the
    open loop device and the thread serving them."""

    def __init__(self, name: str, grants, evtchn, domid: int, config: FrontendConfig, disk: Disk, on_fatal):
        self.name = name
        self.grants = grants
        self.evtchn = evtchn
        self.domid = domid
        self.config = config
        self.on_fatal = on_fatal
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.ring_mappings: list = []
        self.ring_pages: ContiguousPages | None = None
        self.port: int | None = None
        self.server: BlkifServer | None = None
        self.disk = disk
        # Held while requests are served, so a media change never swaps the
        # descriptor under a request; `publish_lock` orders writers of `sectors`.
        self.io_lock = threading.Lock()
        self.publish_lock = threading.Lock()
        self.on_resize = None  # called on the ring thread with the new sector count
        try:
            self._open(disk)
        except BaseException:
            self.close()
            raise

    def _open(self, disk: Disk) -> None:
        cfg = self.config
        if cfg.ring_page_order == 0:
            mapping = self.grants.map(self.domid, cfg.ring_refs[0], False)
            self.ring_mappings.append(mapping)
            buf = mapping.mmap
        else:
            fds = []
            try:
                for ref in cfg.ring_refs:
                    handle, _gfn, fd = self.grants.map_fd(self.domid, ref, False)
                    self.ring_mappings.append(handle)
                    fds.append(fd)
                self.ring_pages = ContiguousPages(fds)
            finally:
                for fd in fds:
                    os.close(fd)
            buf = self.ring_pages.buf
        ring = BackRing(buf, blkif.RING_ENTRY_SIZE, ring_bytes=XEN_PAGE_SIZE << cfg.ring_page_order)
        self.server = BlkifServer(ring, self.grants, self.domid, disk.fd, disk.geometry,
                                  persistent=cfg.persistent, name=self.name)
        self.port = self.evtchn.bind_interdomain(self.domid, cfg.event_channel)

    @property
    def geometry(self) -> DiskGeometry:
        return self.server.geometry

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"blkif-{self.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while not self.stop.is_set():
                woken = self.evtchn.wait(self.port, timeout=0.25)  # clears the pending bit before we look
                self._check_capacity()  # xen_vbd_resize's check, on every wake (an idle one too)
                if not woken:
                    continue
                if self.stop.is_set():
                    break
                with self.io_lock:
                    notify = self.server.process(self.stop)
                if notify:
                    self.evtchn.notify(self.port)
        except RingOverflow as exc:
            log.error("%s: frontend overflowed the ring: %s", self.name, exc)
            self.on_fatal(errno.EPROTO, f"ring overflow: {exc}")
        except Exception as exc:
            if not self.stop.is_set():
                log.exception("%s: ring thread failed", self.name)
                self.on_fatal(errno.EIO, f"ring thread failed: {exc}")

    def _check_capacity(self) -> None:
        """Serve the disk's current size if it changed (a grown loop device),
        then tell `on_resize`.  One ioctl per wake: cheap beside a request."""
        disk = self.disk
        if disk.fd is None or self.stop.is_set():
            return
        try:
            sectors = loop.device_size(disk.fd) // SECTOR_SIZE
        except OSError:
            return
        with self.io_lock:
            if self.disk is not disk or sectors == self.server.geometry.sectors:
                return  # a media change came in between, or nothing changed
            old = self.server.geometry.sectors
            self.server.geometry = disk.geometry = replace(self.server.geometry, sectors=sectors)
        log.info("%s: %s changed size: %d -> %d sectors", self.name, disk.path, old, sectors)
        if self.on_resize is not None:
            self.on_resize(sectors)

    def swap_disk(self, disk: Disk) -> Disk:
        """Serve `disk` from the next request on (a media change); returns the
        old one, which no request uses any more (the caller closes it)."""
        with self.io_lock:
            old, self.disk = self.disk, disk
            self.server.fd = disk.fd
            self.server.geometry = disk.geometry
        return old

    def close(self) -> None:
        """Stop taking requests, let the one in hand finish, then unmap
        everything, unbind and close the disk (autoclear frees the loop)."""
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)
            if self.thread.is_alive():
                log.error("%s: ring thread did not stop", self.name)
        if self.server is not None:
            try:
                self.server.ring.push_responses()
            except Exception:
                pass
            self.server.release()
            self.server.ring.release()
        if self.port is not None:
            try:
                self.evtchn.remove_callbacks(self.port)
                self.evtchn.close(self.port)
            except Exception as exc:
                log.warning("%s: closing port %d: %s", self.name, self.port, exc)
            self.port = None
        if self.ring_pages is not None:
            self.ring_pages.close()
        for mapping in self.ring_mappings:
            try:
                if isinstance(mapping, int):
                    self.grants.unmap_handle(mapping)
                else:
                    self.grants.unmap(mapping)
            except Exception as exc:
                log.warning("%s: unmapping the ring: %s", self.name, exc)
        self.ring_mappings = []


# ---------------------------------------------------------------------------------------------
# The XenBus driver
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class BackendInfo:
    """blkback's private data for one device (Linux's struct backend_info), in dev.priv."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    frontend_state: int = UNKNOWN
    connection: Connection | None = None
    disk: Disk | None = None
    watches: list = field(default_factory=list)  # (path, token)
    hotplug_ran: bool = False
    # recover() told the frontend we lost the connection (Closed): its
    # Initialised/Connected are stale until it shows it reset (Closing,
    # Closed or Initialising); it cannot reach Initialised with a new ring
    # before we go InitWait again.
    awaiting_frontend_reset: bool = False


class Blkback(XenbusDriver):
    """The vbd backend driver for a `BackendBus` (Linux's xen-blkback/xenbus.c).

    Callbacks run on the bus's xenwatch thread; each device's ring runs on
    its own thread (Connection)."""

    devicetype = "vbd"
    recovers = True

    def __init__(self, grants, evtchn, *, run_hotplug: bool = False):
        self.grants = grants
        self.evtchn = evtchn
        self.run_hotplug = run_hotplug
        self._devices: dict[str, XenbusDevice] = {}
        self._lock = threading.Lock()

    # -- XenbusDriver ---------------------------------------------------------
    def probe(self, dev: XenbusDevice) -> None:
        be = dev.priv = BackendInfo()
        with self._lock:
            self._devices[dev.nodename] = dev
        with be.lock:
            dev.write("feature-max-indirect-segments", str(MAX_INDIRECT_SEGMENTS))
            dev.write("max-ring-page-order", str(MAX_RING_PAGE_ORDER))
            dev.switch_state(XenbusState.InitWait)
            if self.run_hotplug:
                self._hotplug("add", dev)
        self._watch_own_nodes(dev)
        log.info("%s: probed (frontend %s)", dev.nodename, dev.otherend)

    def _watch_own_nodes(self, dev: XenbusDevice) -> None:
        """backend_changed: the hotplug step's physical-device (fires at once:
        it may be there already); our own state: the toolstack writes Closing
        (with online=0) to unplug."""
        be: BackendInfo = dev.priv
        for key, callback in (("physical-device", self._physical_device_changed),
                              ("state", self._own_state_changed)):
            token = f"blkback:{key}:{dev.nodename}"
            dev.store.watch(f"{dev.nodename}/{key}", token, lambda _p, _t, cb=callback: cb(dev))
            be.watches.append((f"{dev.nodename}/{key}", token))

    def recover(self, dev: XenbusDevice) -> None:
        """A device an earlier blkback served (see the module docstring)."""
        stale = dev.state
        be = dev.priv = BackendInfo()
        with self._lock:
            self._devices[dev.nodename] = dev
        from . import hotplug
        with be.lock:
            # The loop the old hotplug step attached is freed (autoclear) or,
            # if the old dom0 died before blkback opened it, still ours:
            # remove() detaches it only when it still backs our target.
            hotplug.remove(dev.store, dev.nodename)
            dev.write("feature-max-indirect-segments", str(MAX_INDIRECT_SEGMENTS))
            dev.write("max-ring-page-order", str(MAX_RING_PAGE_ORDER))
            if stale != XenbusState.InitWait:
                be.awaiting_frontend_reset = True
                dev.switch_state(XenbusState.Closed)
            self._hotplug("add", dev)
            # The hotplug step attached the loop without autoclear (nobody
            # held it); hold it now, or a blkback killed again before the
            # frontend resets would leave it attached for good.
            self._open_disk(dev, any_state=True)
        self._watch_own_nodes(dev)
        log.info("%s: recovering from %s (frontend %s)", dev.nodename, _name(stale), dev.otherend)

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        be: BackendInfo = dev.priv
        with be.lock:
            be.frontend_state = state
            log.info("%s: frontend is %s (we are %s)", dev.nodename, _name(state), _name(dev.state))
            if be.awaiting_frontend_reset:
                if state in (XenbusState.Initialised, XenbusState.Connected):
                    log.info("%s: frontend still %s on the old ring; waiting for it to reset",
                             dev.nodename, _name(state))
                    return
                be.awaiting_frontend_reset = False
            if state == XenbusState.Initialising:
                if dev.state == XenbusState.Closed:  # reconnect (migration, frontend reset)
                    self._reopen(dev)
            elif state in (XenbusState.Initialised, XenbusState.Connected):
                if dev.state == XenbusState.Connected:
                    return  # two watches in quick succession: already connected
                if dev.state == XenbusState.Closed:
                    self._reopen(dev)
                self._maybe_connect(dev)
            elif state == XenbusState.Closing:
                self._disconnect(dev)
                if dev.state != XenbusState.Closed:
                    dev.switch_state(XenbusState.Closing)
            elif state in (XenbusState.Closed, XenbusState.Unknown):
                self._disconnect(dev)
                dev.switch_state(XenbusState.Closed)
                if state == XenbusState.Unknown or dev.read("online") == "0":
                    self._unregister(dev)

    def remove(self, dev: XenbusDevice) -> None:
        be: BackendInfo | None = dev.priv
        if be is None:
            return
        with be.lock:
            self._drop_watches(dev)
            self._disconnect(dev)
            self._close_disk(dev)
            if self.run_hotplug and be.hotplug_ran:
                self._hotplug("remove", dev)
        with self._lock:
            self._devices.pop(dev.nodename, None)
        log.info("%s: removed", dev.nodename)

    # -- backend watches ----------------------------------------------------------------
    def _physical_device_changed(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        try:
            with be.lock:
                if not dev.removed and be.disk is not None and dev.read("device-type") == "cdrom":
                    self._change_media(dev)
                    return
                if not dev.removed and self._open_disk(dev):
                    self._maybe_connect(dev)
        except Exception as exc:
            log.exception("%s: handling physical-device", dev.nodename)
            dev.dev_fatal(exc, f"handling physical-device: {exc}")

    def _own_state_changed(self, dev: XenbusDevice) -> None:
        """The toolstack wrote Closing on our node: the frontend is asked to
        close (it sees our Closing) and we follow it to Closed.  If it is
        already gone or closed, nothing will follow: go Closed now."""
        be: BackendInfo = dev.priv
        with be.lock:
            if dev.removed:
                return
            state = XenbusState.parse(dev.read("state"))
            if state != XenbusState.Closing or dev.state in (XenbusState.Closing, XenbusState.Closed):
                return
            log.info("%s: the toolstack asked to close", dev.nodename)
            dev.state = XenbusState.Closing  # as written by the toolstack; the frontend follows
            if be.frontend_state in (XenbusState.Closed, XenbusState.Unknown):
                self._disconnect(dev)
                dev.switch_state(XenbusState.Closed)
                if dev.read("online") == "0":
                    self._unregister(dev)

    def _drop_watches(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        watches, be.watches = be.watches, []
        for path, token in watches:
            try:
                dev.store.unwatch(path, token)
            except Exception as exc:
                log.debug("%s: unwatch %s: %s", dev.nodename, path, exc)

    # -- disk ------------------------------------------------------------------------------
    def _open_disk(self, dev: XenbusDevice, any_state: bool = False) -> bool:
        """Open the device the hotplug step named, once (xen_vbd_create).
        True when a disk is open.  `any_state`: also while Closed (recover
        holds the new loop at once, so that its autoclear covers a backend
        killed again before the frontend came back)."""
        be: BackendInfo = dev.priv
        if be.disk is not None:
            return True
        if dev.state not in (XenbusState.Initialising, XenbusState.InitWait) and not any_state:
            return False
        physdev = dev.read("physical-device")
        if physdev is None:
            return False
        try:
            major, minor = loop.parse_physical_device(physdev)
            path = dev.read("physical-device-path") or _node_for(major, minor)
            mode = (dev.read("mode") or "w").strip()
            be.disk = Disk(path, major, minor, readonly=mode.startswith("r"),
                           discard=dev.read("discard-enable") != "0")
        except (OSError, ValueError) as exc:
            dev.dev_fatal(exc, f"opening physical-device {physdev}: {exc}")
            return False
        log.info("%s: opened %s (%s, %d sectors%s%s)", dev.nodename, be.disk.path, physdev,
                 be.disk.geometry.sectors, ", read-only" if be.disk.geometry.readonly else "",
                 ", O_DIRECT" if be.disk.direct else "")
        return True

    def _close_disk(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        disk, be.disk = be.disk, None
        if disk is not None:
            disk.close()  # a loop device's autoclear frees it now
            log.info("%s: closed %s", dev.nodename, disk.path)

    def _unregister(self, dev: XenbusDevice) -> None:
        """device_unregister after a toolstack unplug: release the disk now
        (the dirs stay until the toolstack removes them).  Running our own
        hotplug step (a driver domain's devd), its removal too: a loop it
        attached that we never opened has no autoclear to free it."""
        self._close_disk(dev)
        if self.run_hotplug and dev.priv.hotplug_ran:
            self._hotplug("remove", dev)
            dev.priv.hotplug_ran = False

    def _reopen(self, dev: XenbusDevice) -> None:
        dev.switch_state(XenbusState.InitWait)
        self._open_disk(dev)

    # -- connect / disconnect -------------------------------------------------------------
    def _maybe_connect(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        if be.connection is not None or dev.state != XenbusState.InitWait:
            return
        if be.frontend_state not in (XenbusState.Initialised, XenbusState.Connected):
            return
        if be.disk is None and not self._open_disk(dev):
            log.info("%s: frontend ready, waiting for the hotplug step", dev.nodename)
            return
        try:
            self._connect(dev)
        except FrontendConfigError as exc:
            dev.dev_fatal(exc.err, str(exc))
        except Exception as exc:
            log.exception("%s: connect failed", dev.nodename)
            dev.dev_fatal(exc, f"connecting: {exc}")

    def _connect(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        disk = be.disk
        readonly = disk.geometry.readonly
        cdrom = dev.read("device-type") == "cdrom"
        config = parse_frontend_config(lambda key: dev.otherend_read(key))
        conn = Connection(dev.nodename, self.grants, self.evtchn, dev.otherend_id, config, disk,
                          lambda err, msg: self._fatal_from_ring(dev, err, msg))
        try:
            geometry = conn.geometry
            info = (blkif.VDISK_READONLY if readonly else 0) | (blkif.VDISK_CDROM | blkif.VDISK_REMOVABLE if cdrom else 0)
            details = {
                "sectors": str(geometry.sectors),
                "info": str(info),
                "sector-size": str(SECTOR_SIZE),
                "physical-sector-size": str(SECTOR_SIZE),
                "feature-flush-cache": "1",
                "feature-barrier": "0",
                "feature-discard": "1" if geometry.discard else "0",
                "feature-persistent": "1",
                "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
            }
            if geometry.discard:
                details["discard-granularity"] = str(DISCARD_GRANULARITY)
                details["discard-alignment"] = "0"
                details["discard-secure"] = "0"

            def publish(tx: int) -> None:
                for key, value in details.items():
                    dev.write(key, value, tx)

            dev.store.run_transaction(publish)
        except BaseException:
            conn.close()
            raise
        be.connection = conn
        conn.on_resize = lambda _sectors, conn=conn: self._publish_sectors(dev, conn)
        conn.start()
        log.info("%s: connected to dom%d: %s (%s sectors, %s, ring order %d, port %d, persistent %s)",
                 dev.nodename, dev.otherend_id, disk.path, geometry.sectors, "ro" if readonly else "rw",
                 config.ring_page_order, conn.port, config.persistent)
        dev.switch_state(XenbusState.Connected)

    def _disconnect(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        conn, be.connection = be.connection, None
        if conn is not None:
            stats = conn.server.stats if conn.server else {}
            conn.close()
            log.info("%s: disconnected (%s)", dev.nodename, stats)

    # -- reconfiguration while Connected ----------------------------------------------------
    def _change_media(self, dev: XenbusDevice) -> None:
        """A cdrom's `physical-device` changed (hotplug `change`): serve the
        new medium, or none, without leaving Connected.  be.lock held."""
        be: BackendInfo = dev.priv
        physdev = dev.read("physical-device")
        try:
            wanted = loop.parse_physical_device(physdev) if physdev else None
        except ValueError as exc:
            dev.dev_error(errno.EINVAL, f"media change: {exc}")
            return
        if wanted == be.disk.physical_device:
            return  # our own watch firing at registration, or a rewrite of the same device
        new = Disk.no_media()
        if wanted is not None:
            try:
                path = dev.read("physical-device-path") or _node_for(*wanted)
                new = Disk(path, *wanted, readonly=True, discard=False)
            except OSError as exc:  # the drive stays, empty: a bad medium, not a dead device
                dev.dev_error(exc, f"opening the new medium {physdev}: {exc}")
        conn = be.connection
        old = conn.swap_disk(new) if conn is not None else be.disk
        be.disk = new
        old.close()  # a loop device's autoclear frees it now
        log.info("%s: medium %s -> %s (%d sectors)", dev.nodename, old.path, new.path, new.geometry.sectors)
        if conn is not None:
            self._publish_sectors(dev, conn)

    def _publish_sectors(self, dev: XenbusDevice, conn: Connection) -> None:
        """xen_vbd_resize: the size we serve now as `sectors`, and our state
        written again as Connected, in ONE transaction -- only while the node
        still says Connected (never over the toolstack's Closing, never into
        a removed dir).  Not a transition, so not recorded (module doc).
        Runs on the ring thread (resize) or the xenwatch thread (media)."""
        class NotConnected(Exception):
            pass

        with conn.publish_lock:
            if conn.stop.is_set():
                return
            sectors = conn.geometry.sectors  # the latest, read under the lock that orders the writers

            def body(tx: int) -> None:
                if dev.read("state", None, tx) != str(CONNECTED):
                    raise NotConnected
                dev.write("sectors", str(sectors), tx)
                dev.write("state", str(CONNECTED), tx)

            try:
                dev.store.run_transaction(body)
            except NotConnected:
                log.info("%s: not Connected any more: %d sectors not published", dev.nodename, sectors)
                return
            except Exception as exc:
                log.warning("%s: publishing %d sectors: %s", dev.nodename, sectors, exc)
                return
        log.info("%s: published %d sectors (state Connected rewritten)", dev.nodename, sectors)

    def _fatal_from_ring(self, dev: XenbusDevice, err: int, message: str) -> None:
        # on the ring thread: Connection.close must not join itself, so tear down from another thread
        def fatal() -> None:
            with dev.priv.lock:
                self._disconnect(dev)
                dev.dev_fatal(err, message)
        threading.Thread(target=fatal, name="blkif-fatal", daemon=True).start()

    def _hotplug(self, action: str, dev: XenbusDevice) -> None:
        from . import hotplug
        try:
            if action == "add":
                hotplug.add(dev.store, dev.nodename)
                dev.priv.hotplug_ran = True
            else:
                hotplug.remove(dev.store, dev.nodename)
        except Exception as exc:
            log.error("%s: hotplug %s failed: %s", dev.nodename, action, exc)

    # -- daemon --------------------------------------------------------------------------
    def connection(self, nodename: str) -> Connection | None:
        dev = self._devices.get(nodename)
        return dev.priv.connection if dev is not None and dev.priv is not None else None

    def shutdown(self) -> None:
        """SIGTERM: tear every device down (rings, ports, disks); states are left as they are."""
        with self._lock:
            devices = list(self._devices.values())
        for dev in devices:
            with dev.priv.lock:
                self._drop_watches(dev)
                self._disconnect(dev)
                self._close_disk(dev)


def _name(state) -> str:
    return STATE_NAMES.get(int(state), str(state))


def _node_for(major: int, minor: int) -> str:
    if major == loop.LOOP_MAJOR:
        return loop.ensure_node(minor)
    raise OSError(errno.ENODEV, f"no device node known for {major}:{minor}")


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.blk.back", description=__doc__.split("\n")[0])
    parser.add_argument("--domid", type=int, default=None, help="our domid (default: the link's)")
    parser.add_argument("--run-hotplug", action="store_true",
                        help="run the block hotplug step on probe/remove (default: the toolstack runs it)")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"),
                        help="append every state transition to this JSONL file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s blkback %(levelname)s %(message)s")
    from xenbed.drivers.xen.evtchn import EventChannels
    from xenbed.drivers.xen.gnttab import GrantTable
    from xenbed.drivers.xenbus.daemon import run_backend

    # A driver domain runs its own hotplug step (module doc): xl devd's job.
    return run_backend("blkback", lambda link: Blkback(GrantTable(link), EventChannels(link),
                                                      run_hotplug=args.run_hotplug or link.privilege != "control"),
                       transitions=args.transitions, domid=args.domid)


if __name__ == "__main__":
    sys.exit(main())
