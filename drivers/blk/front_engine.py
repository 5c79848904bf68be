"""blkfront's I/O engine: blkif requests and responses on one device's ring
(the data path of Linux's drivers/block/xen-blkfront.c).

A pool of data pages granted to the backend once and reused for every
request (persistent grants).  Without indirect requests: ring-size x 11
pages, and each READ/WRITE carries up to 11 segments of one page each
(44 KiB).  When the backend offers `feature-max-indirect-segments`, a
READ/WRITE of more than 11 pages goes as BLKIF_OP_INDIRECT with up to
N = min(offered, 256) segments (1 MiB), listed in indirect pages that are
themselves persistent pool pages (one set per ring slot); the pool is then
sized to blkback's persistent-grant budget (1056 pages: 1024 data, 32
indirect), so every grant stays mapped.  Larger I/O is split by `split_io`
and the pieces are in flight together; a request waits for a ring slot and
for its pages.  A request's id is its index in the shadow table
(`IdAllocator`); responses are matched by id.  The shadow keeps each
request's operation, sectors, caller buffers and completion, so after a
migration (`resume`) the requests still in flight are put again on the new
ring (blkif_recover) -- cut into smaller pieces if the new backend takes
fewer segments -- while the FUSE file stays open and its callers keep
waiting.
Data are copied into the pool pages for writes and out of them, in the
response handler, for reads -- so no caller ever holds pages while waiting,
and the pool cannot deadlock.

Threads: responses are taken on the event-channel dispatcher thread,
callers wait in their own threads.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xenbed.drivers.xenbus.frontend import GrantedPage
from xenbed.protocols import blkif
from xenbed.protocols.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    Segment,
    SegmentArray,
    encode_indirect_pages,
    indirect_pages_needed,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, FrontRing, MalformedResponse

log = logging.getLogger("xenbed.blkfront")

MAX_SECTORS_PER_REQUEST = BLKIF_MAX_SEGMENTS_PER_REQUEST * SECTORS_PER_PAGE  # 88: 44 KiB
# Indirect requests (feature-max-indirect-segments): we use min(offered, this).
# Linux's default is 32 (xen_blkif_max_segments); blkback offers 256.
MAX_INDIRECT_SEGMENTS = 256
# Persistent grants: the backend keeps at most this many mapped
# (xen_blkif_max_pgrants); with indirect requests the pool (data pages plus
# indirect pages) is sized to it, so every grant stays persistent.
PERSISTENT_GRANTS = 1056


# Multi-page rings: we ask for min(the backend's max-ring-page-order, this).
# Linux's blkfront defaults to 0 (max_ring_page_order); a larger ring holds
# more requests in flight, and the pool stays within the persistent budget.
MAX_RING_PAGE_ORDER = 1


def ring_page_order_to_use(offered: str | None, ours: int = MAX_RING_PAGE_ORDER) -> int:
    """The ring-page-order to ask for, given the backend's
    `max-ring-page-order` node (None or junk: a one-page ring)."""
    try:
        theirs = int(offered) if offered is not None else 0
    except ValueError:
        return 0
    return max(0, min(theirs, ours))


def ring_nodes(grefs: Sequence[int], order: int) -> dict[str, str]:
    """The frontend's ring keys: `ring-ref` for a one-page ring, else
    `ring-page-order` and `ring-ref0..N` (as Linux writes them)."""
    if order == 0:
        return {"ring-ref": str(grefs[0])}
    return {"ring-page-order": str(order)} | {f"ring-ref{i}": str(g) for i, g in enumerate(grefs[:1 << order])}


def indirect_segments_to_use(offered: int) -> int:
    """Segments per indirect request for a backend's
    `feature-max-indirect-segments` (0: no indirect requests).  Like Linux,
    indirect is only worth it above the 11 a direct request carries."""
    n = min(max(offered, 0), MAX_INDIRECT_SEGMENTS)
    return n if n > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0


def pool_layout(ring_size: int, indirect_segments: int) -> tuple[int, int]:
    """(data pages, indirect pages) of a ring's persistent pool.  Direct:
    ring-size x 11 data pages, at most the persistent-grant budget (a
    request waits for pages, so a smaller pool only queues).  Indirect: one
    set of indirect pages per ring slot, and data pages for the rest of the
    budget (never fewer than one full request)."""
    direct = min(ring_size * BLKIF_MAX_SEGMENTS_PER_REQUEST, PERSISTENT_GRANTS)
    if not indirect_segments:
        return direct, 0
    ipages = ring_size * indirect_pages_needed(indirect_segments)
    return max(indirect_segments, PERSISTENT_GRANTS - ipages), ipages


@dataclass(frozen=True)
class Chunk:
    """One ring request's share of a larger I/O: `nr_sectors` 512-byte
    sectors from `sector`, whose bytes sit at `offset` in the caller's buffer.
    Its data go in `pages` pool pages, whole pages first, the last one
    partly (first_sect 0 .. last_sect)."""

    sector: int
    nr_sectors: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.nr_sectors * SECTOR_SIZE

    @property
    def pages(self) -> int:
        return -(-self.nr_sectors // SECTORS_PER_PAGE)

    def segments(self, grefs: Sequence[int]) -> tuple[Segment, ...]:
        """The blkif segments over `grefs` (one per page of the chunk)."""
        if len(grefs) != self.pages:
            raise ValueError(f"chunk of {self.nr_sectors} sectors needs {self.pages} pages, got {len(grefs)}")
        segs = []
        left = self.nr_sectors
        for gref in grefs:
            n = min(left, SECTORS_PER_PAGE)
            segs.append(Segment(gref, 0, n - 1))
            left -= n
        return tuple(segs)


def split_io(sector: int, nr_sectors: int, max_segments: int = BLKIF_MAX_SEGMENTS_PER_REQUEST) -> list[Chunk]:
    """Split `nr_sectors` from `sector` into ring requests of at most
    `max_segments` one-page segments each."""
    if sector < 0 or nr_sectors < 0:
        raise ValueError(f"bad extent: sector {sector}, {nr_sectors} sectors")
    if max_segments < 1:
        raise ValueError(f"need at least one segment per request, not {max_segments}")
    per_request = max_segments * SECTORS_PER_PAGE
    chunks = []
    done = 0
    while done < nr_sectors:
        n = min(per_request, nr_sectors - done)
        chunks.append(Chunk(sector + done, n, done * SECTOR_SIZE))
        done += n
    return chunks


class IdAllocator:
    """Request ids 0..size-1, like blkfront's shadow free list: an id is in
    use from put_request until its response is taken."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"need at least one id, not {size}")
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out 0 first
        self._used: set[int] = set()

    def alloc(self) -> int | None:
        """A free id, or None when every id is in flight."""
        if not self._free:
            return None
        rid = self._free.pop()
        self._used.add(rid)
        return rid

    def free(self, rid: int) -> None:
        if rid not in self._used:
            raise KeyError(f"request id {rid} is not in use")
        self._used.remove(rid)
        self._free.append(rid)

    def in_use(self, rid: int) -> bool:
        return rid in self._used

    def __len__(self) -> int:
        """Ids in use."""
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)


def status_errno(status: int) -> int:
    """The errno a caller sees for a BLKIF_RSP_* status."""
    if status == BLKIF_RSP_OKAY:
        return 0
    if status == BLKIF_RSP_EOPNOTSUPP:
        return errno.EOPNOTSUPP
    return errno.EIO


@dataclass(eq=False)
class Shadow:
    """An in-flight request (blkfront's `struct blk_shadow`): enough to
    complete it, or to put it again on a new ring after a migration."""

    operation: int
    sector: int
    nr_sectors: int = 0
    write_data: memoryview | None = None  # the caller's bytes (WRITE)
    read_into: memoryview | None = None  # the caller's buffer (READ)
    discard_flag: int = 0
    id: int = -1
    pages: list[int] = field(default_factory=list)  # pool indexes while on a ring
    indirect: list[int] = field(default_factory=list)  # indirect-pool indexes while on a ring (INDIRECT)
    status: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # A request too large for a new ring (replayed after a migration to a
    # backend with fewer indirect segments) is put again as pieces: each
    # piece names it as `parent`; it completes when `pending` reaches 0.
    parent: Shadow | None = None
    pending: int = 0

    @property
    def npages(self) -> int:
        """Data pages (= segments) the request needs."""
        if self.operation not in (BLKIF_OP_READ, BLKIF_OP_WRITE) or not self.nr_sectors:
            return 0
        return -(-self.nr_sectors // SECTORS_PER_PAGE)

    def split(self, max_segments: int) -> list[Shadow]:
        """This READ/WRITE as pieces of at most `max_segments` segments,
        each with its share of the caller's buffer; `self` becomes their parent."""
        pieces = []
        for c in split_io(self.sector, self.nr_sectors, max_segments):
            sl = slice(c.offset, c.offset + c.nbytes)
            pieces.append(Shadow(self.operation, c.sector, c.nr_sectors,
                                 write_data=None if self.write_data is None else self.write_data[sl],
                                 read_into=None if self.read_into is None else self.read_into[sl],
                                 parent=self))
        self.pending = len(pieces)
        return pieces


class EngineState:
    DETACHED = "detached"  # no ring yet or between rings (migration): callers wait
    RUNNING = "running"
    CLOSING = "closing"  # new I/O fails, in-flight completes
    CLOSED = "closed"  # everything fails


class BlkfrontEngine:
    """Requests and responses on one device's ring; outlives reconnections.

    `attach(ring, pages, kick)` gives it a ring, a pool of granted pages
    (ring.size x 11) and the function that notifies the backend; requests
    still in flight from an earlier ring are put again at once.
    With `indirect_segments` N > 11 (the backend offers
    feature-max-indirect-segments) and `indirect_pool` (granted pages for
    the segment arrays, one set per ring slot), a READ/WRITE of more than
    11 pages goes as one BLKIF_OP_INDIRECT request of up to N segments;
    `split_io` cuts I/O at `max_segments`.  A request waits for a ring slot
    and for its data pages, so any pool size is deadlock-free.
    `handle_responses()` is called after each event (port already cleared).
    """

    def __init__(self, handle: int = 0) -> None:
        self.handle = handle
        self._cond = threading.Condition()
        self.state = EngineState.DETACHED
        self.ring: FrontRing | None = None
        self.pool: list[GrantedPage] = []
        self._free_pages: list[int] = []
        self.indirect_pool: list[GrantedPage] = []
        self._free_indirect: list[int] = []
        self.indirect_segments = 0  # segments per INDIRECT request; 0: direct requests only
        self._kick: Callable[[], None] = lambda: None
        self.ids: IdAllocator | None = None
        self.shadow: dict[int, Shadow] = {}  # id -> in-flight request on the current ring
        self._waiting_replay: list[Shadow] = []  # taken off a dead ring, not yet put again
        self.flush_op: int | None = None
        self.discard_ok = False
        # Suspend (docs/suspend-resume.md): while frozen nothing new goes on
        # the ring -- callers wait in submit(), replays wait too -- and what
        # is in flight stays in the shadow; responses are still taken.
        self.frozen = False
        self.requests = 0  # counters, for tests and status
        self.responses = 0
        self.indirect_requests = 0

    @property
    def max_segments(self) -> int:
        """Segments (pages) one ring request may carry on the current ring."""
        return self.indirect_segments or BLKIF_MAX_SEGMENTS_PER_REQUEST

    # -- lifecycle ---------------------------------------------------------------
    def attach(self, ring: FrontRing, pool: list[GrantedPage], kick: Callable[[], None],
               indirect_pool: Sequence[GrantedPage] = (), indirect_segments: int = 0) -> None:
        with self._cond:
            if self.state in (EngineState.CLOSING, EngineState.CLOSED):
                raise RuntimeError(f"cannot attach a {self.state} engine")
            if indirect_segments and not indirect_pool:
                raise ValueError("indirect requests need an indirect pool")
            self.ring, self.pool, self._kick = ring, list(pool), kick
            self._free_pages = list(range(len(pool)))
            self.indirect_pool = list(indirect_pool) if indirect_segments else []
            self._free_indirect = list(range(len(self.indirect_pool)))
            self.indirect_segments = min(indirect_segments, len(pool)) if indirect_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
            self.ids = IdAllocator(ring.size)
            self.shadow = {}
            self.state = EngineState.RUNNING
            # blkif_recover: in the order they were first put, cut again to
            # what this ring carries
            replay, self._waiting_replay = self._waiting_replay, []
            for sh in replay:
                if sh.npages > self.max_segments:
                    self._waiting_replay += sh.split(self.max_segments)
                else:
                    self._waiting_replay.append(sh)
            if replay:
                log.info("replaying %d in-flight request(s) (%d on the new ring)", len(replay), len(self._waiting_replay))
                self._put_replays()
            self._cond.notify_all()

    def freeze(self) -> int:
        """Stop putting requests on the ring (new callers wait); returns how
        many are in flight, kept in the shadow."""
        with self._cond:
            self.frozen = True
            return len(self.shadow) + len(self._waiting_replay)

    def thaw(self) -> None:
        """Go on: on the same ring after a cancelled suspend, or (after
        detach) on the next one attach gives."""
        with self._cond:
            self.frozen = False
            if self.state == EngineState.RUNNING and self._waiting_replay:
                self._put_replays()
            self._cond.notify_all()

    def _fits(self, sh: Shadow) -> bool:  # lock held, RUNNING: its id and pages are free
        n = sh.npages
        if self.ids.available < 1 or n > len(self._free_pages):
            return False
        return n <= BLKIF_MAX_SEGMENTS_PER_REQUEST or len(self._free_indirect) >= indirect_pages_needed(n)

    def _put_replays(self) -> None:  # lock held, RUNNING
        if self.frozen:
            return
        put = 0
        while self._waiting_replay and self._fits(self._waiting_replay[0]):
            self._put(self._waiting_replay.pop(0))
            put += 1
        if put:
            self._push()

    def detach(self) -> list[Shadow]:
        """Forget the ring and pool (they are the caller's to free); requests
        in flight stay waiting and are put again by the next attach."""
        with self._cond:
            inflight = sorted(self.shadow.values(), key=lambda s: s.id)
            for sh in inflight:
                sh.pages, sh.indirect, sh.id = [], [], -1
            self._waiting_replay = inflight + self._waiting_replay
            self.shadow = {}
            self.ring, self.pool, self._free_pages, self.ids = None, [], [], None
            self.indirect_pool, self._free_indirect, self.indirect_segments = [], [], 0
            if self.state == EngineState.RUNNING:
                self.state = EngineState.DETACHED
            return list(self._waiting_replay)

    def begin_close(self) -> None:
        """New requests fail with EIO from now on; those in flight go on."""
        with self._cond:
            if self.state != EngineState.CLOSED:
                self.state = EngineState.CLOSING
            for sh in self._waiting_replay:  # no ring will come to carry them
                self._complete(sh, blkif.BLKIF_RSP_ERROR)
            self._waiting_replay = []
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight (True) or `timeout` passed."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.shadow, timeout)

    def close(self) -> None:
        """Fail whatever is still in flight; nothing more is accepted."""
        with self._cond:
            self.state = EngineState.CLOSED
            for sh in list(self.shadow.values()) + self._waiting_replay:
                self._complete(sh, blkif.BLKIF_RSP_ERROR)
            self.shadow, self._waiting_replay = {}, []
            self._cond.notify_all()

    def inflight(self) -> int:
        with self._cond:
            return len(self.shadow) + len(self._waiting_replay)

    # -- submitting ----------------------------------------------------------------
    def submit(self, shadow: Shadow, timeout: float | None = None) -> Shadow:
        """Put one request on the ring (waiting for a free slot, or for a ring
        while detached).  Returns at once; wait on `shadow.done`."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.state != EngineState.DETACHED
                and not (self.frozen and self.state == EngineState.RUNNING)
                and (self.state != EngineState.RUNNING
                     or shadow.npages > self.max_segments  # never fits: EINVAL below
                     or (not self._waiting_replay and self._fits(shadow))),
                timeout)
            if not ok:
                raise OSError(errno.ETIMEDOUT, "no ring slot became free")
            if self.state != EngineState.RUNNING:
                raise OSError(errno.EIO, f"device is {self.state}")
            if shadow.npages > self.max_segments:
                raise OSError(errno.EINVAL, f"request of {shadow.nr_sectors} sectors does not fit "
                                            f"({self.max_segments} segments per request)")
            self._put(shadow)
            self._push()
        return shadow

    def _put(self, sh: Shadow) -> None:  # lock held, state RUNNING, _fits(sh)
        rid = self.ids.alloc()
        assert rid is not None
        sh.id, sh.status = rid, None
        if sh.operation == BLKIF_OP_DISCARD:
            req = BlkifRequestDiscard(self.handle, rid, sh.sector, sh.nr_sectors, sh.discard_flag)
            sh.pages, sh.indirect = [], []
        else:
            npages = sh.npages
            free = self._free_pages
            sh.pages = pages = free[len(free) - npages:]
            del free[len(free) - npages:]
            pool = self.pool
            if sh.operation == BLKIF_OP_WRITE and sh.write_data is not None:
                data = sh.write_data
                for i, p in enumerate(pages):
                    piece = data[i * XEN_PAGE_SIZE:(i + 1) * XEN_PAGE_SIZE]
                    pool[p].buf[:len(piece)] = piece
            grefs = [pool[p].gref for p in pages]
            last = (sh.nr_sectors - 1) % SECTORS_PER_PAGE
            if npages > BLKIF_MAX_SEGMENTS_PER_REQUEST:  # INDIRECT: the segments go in granted pages
                sh.indirect = [self._free_indirect.pop() for _ in range(indirect_pages_needed(npages))]
                segs = SegmentArray.whole_pages(grefs, last)
                for ip, page in zip(sh.indirect, encode_indirect_pages(segs)):
                    self.indirect_pool[ip].buf[:XEN_PAGE_SIZE] = page
                req = BlkifRequestIndirect(sh.operation, npages, self.handle, rid, sh.sector,
                                           tuple(self.indirect_pool[ip].gref for ip in sh.indirect))
                self.indirect_requests += 1
            else:
                sh.indirect = []
                segs = Chunk(sh.sector, sh.nr_sectors, 0).segments(grefs) if npages else ()
                req = BlkifRequest(sh.operation, self.handle, rid, sh.sector, segs)
        self.shadow[rid] = sh
        self.ring.put_request(req.encode())
        self.requests += 1

    def _push(self) -> None:  # lock held
        if self.ring.push_requests_and_check_notify():
            self._kick()

    # -- responses -------------------------------------------------------------------
    def handle_responses(self) -> int:
        """Take every response (then the final check, again until quiet);
        returns how many.  RingError / MalformedResponse propagate: the
        backend broke the ring, the device must close."""
        taken = 0
        with self._cond:
            if self.ring is None:
                return 0
            while True:
                while self.ring.unconsumed_responses():
                    rsp = BlkifResponse.decode(self.ring.take_response())
                    taken += 1
                    self._response(rsp)
                if not self.ring.final_check_for_responses():
                    break
            if taken:
                if self._waiting_replay and self.state == EngineState.RUNNING:
                    self._put_replays()
                self._cond.notify_all()
        return taken

    def _response(self, rsp: BlkifResponse) -> None:  # lock held
        sh = self.shadow.get(rsp.id)
        if sh is None or not self.ids.in_use(rsp.id):
            raise MalformedResponse(f"response for id {rsp.id}, which is not in flight")
        if rsp.operation != sh.operation:
            log.warning("response id %d says operation %d, the request was %d", rsp.id, rsp.operation, sh.operation)
        del self.shadow[rsp.id]
        self.ids.free(rsp.id)
        self.responses += 1
        status = rsp.status
        if status == BLKIF_RSP_OKAY and sh.operation == BLKIF_OP_READ and sh.read_into is not None:
            out, pool = sh.read_into, self.pool
            size = len(out)
            start = 0
            for p in sh.pages:
                if size - start >= XEN_PAGE_SIZE:
                    out[start:start + XEN_PAGE_SIZE] = pool[p].buf
                elif start < size:
                    out[start:size] = pool[p].buf[:size - start]
                start += XEN_PAGE_SIZE
        if status == BLKIF_RSP_EOPNOTSUPP:
            if sh.operation in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                log.warning("backend refused %s: no more cache flushes", "flush" if sh.operation == BLKIF_OP_FLUSH_DISKCACHE else "barrier")
                self.flush_op = None
            elif sh.operation == BLKIF_OP_DISCARD:
                log.warning("backend refused discard: disabled")
                self.discard_ok = False
        self._free_pages.extend(sh.pages)
        self._free_indirect.extend(sh.indirect)
        sh.pages, sh.indirect = [], []
        self._complete(sh, status)

    @staticmethod
    def _complete(sh: Shadow, status: int) -> None:
        sh.status = status
        sh.done.set()
        parent = sh.parent
        if parent is not None:  # a piece of a request split on replay
            if status != BLKIF_RSP_OKAY and parent.status in (None, BLKIF_RSP_OKAY):
                parent.status = status
            elif parent.status is None:
                parent.status = BLKIF_RSP_OKAY
            parent.pending -= 1
            if parent.pending == 0:
                BlkfrontEngine._complete(parent, parent.status)

    # -- what callers use ---------------------------------------------------------------
    def wait(self, shadows: Sequence[Shadow], timeout: float | None = None) -> None:
        """Wait for every shadow; the first failure raises OSError(errno)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for sh in shadows:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not sh.done.wait(left):
                raise OSError(errno.ETIMEDOUT, "block request timed out")
        for sh in shadows:
            code = status_errno(sh.status)
            if code:
                raise OSError(code, f"{_opname(sh.operation)} of {sh.nr_sectors} sectors at {sh.sector}: "
                                    f"backend status {sh.status}")

    def read_sectors(self, sector: int, nr_sectors: int) -> bytearray:
        out = bytearray(nr_sectors * SECTOR_SIZE)
        view = memoryview(out)
        shadows = [self.submit(Shadow(BLKIF_OP_READ, c.sector, c.nr_sectors, read_into=view[c.offset:c.offset + c.nbytes]))
                   for c in split_io(sector, nr_sectors, self.max_segments)]
        self.wait(shadows)
        return out

    def write_sectors(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if len(view) % SECTOR_SIZE:
            raise ValueError(f"write of {len(view)} bytes is not whole sectors")
        shadows = [self.submit(Shadow(BLKIF_OP_WRITE, c.sector, c.nr_sectors, write_data=view[c.offset:c.offset + c.nbytes]))
                   for c in split_io(sector, len(view) // SECTOR_SIZE, self.max_segments)]
        self.wait(shadows)

    def flush(self) -> None:
        """A cache flush (or barrier) if the backend has one; else nothing to do."""
        op = self.flush_op
        if op is None:
            return
        sh = Shadow(op, 0, 0)
        self.wait([self.submit(sh)])

    def discard_sectors(self, sector: int, nr_sectors: int, secure: bool = False) -> None:
        if not self.discard_ok:
            raise OSError(errno.EOPNOTSUPP, "backend does not offer feature-discard")
        if nr_sectors == 0:
            return
        sh = Shadow(BLKIF_OP_DISCARD, sector, nr_sectors, discard_flag=blkif.BLKIF_DISCARD_SECURE if secure else 0)
        self.wait([self.submit(sh)])


def _opname(op: int) -> str:
    return {BLKIF_OP_READ: "read", BLKIF_OP_WRITE: "write", BLKIF_OP_WRITE_BARRIER: "barrier",
            BLKIF_OP_FLUSH_DISKCACHE: "flush", BLKIF_OP_DISCARD: "discard"}.get(op, f"op {op}")

