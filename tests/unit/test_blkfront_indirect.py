"""blkfront's INDIRECT requests: splitting, pool layout, the indirect page
contents, and the ring engine against an in-memory backend (no Docker, no Xen)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from xenbed.drivers.blk.front_engine import (
    MAX_INDIRECT_SEGMENTS,
    PERSISTENT_GRANTS,
    BlkfrontEngine,
    Shadow,
    indirect_segments_to_use,
    pool_layout,
    split_io,
)
from xenbed.drivers.xenbus.frontend import GrantedPage
from xenbed.protocols import blkif
from xenbed.protocols.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_OKAY,
    BlkifResponse,
    decode_indirect_page,
    decode_request,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, FrontRing, SharedRing

MIB = 1 << 20


# -- pure pieces -----------------------------------------------------------------------
@pytest.mark.parametrize("offered, used", [(0, 0), (-3, 0), (11, 0), (12, 12), (32, 32), (256, 256), (4096, 256)])
def test_indirect_segments_to_use(offered, used):
    assert indirect_segments_to_use(offered) == used
    assert MAX_INDIRECT_SEGMENTS == 256


def test_pool_layout():
    assert pool_layout(32, 0) == (32 * 11, 0)  # direct: a free slot always finds its pages
    data, ind = pool_layout(32, 256)
    assert ind == 32 and data + ind == PERSISTENT_GRANTS  # every grant stays persistent in blkback
    assert data >= 4 * 256  # four 1 MiB requests in flight
    assert pool_layout(1, 256) == (PERSISTENT_GRANTS - 1, 1)


def test_split_io_indirect_one_mib_is_one_request():
    chunks = split_io(2048, MIB // 512, 256)
    assert [(c.sector, c.nr_sectors, c.offset, c.pages) for c in chunks] == [(2048, 2048, 0, 256)]
    chunks = split_io(0, 3 * MIB // 512 + 9, 256)  # 3 MiB + 9 sectors
    assert [c.pages for c in chunks] == [256, 256, 256, 2]
    assert sum(c.nr_sectors for c in chunks) == 3 * 2048 + 9
    assert len(split_io(0, MIB // 512)) == 24  # direct: 11 pages a request


def test_shadow_split_keeps_caller_buffers():
    buf = memoryview(bytearray(range(256)) * 40)  # 10 KiB + ...
    sh = Shadow(BLKIF_OP_WRITE, 100, 20, write_data=buf[:20 * 512])
    pieces = sh.split(1)
    assert [(p.sector, p.nr_sectors) for p in pieces] == [(100, 8), (108, 8), (116, 4)]
    assert b"".join(bytes(p.write_data) for p in pieces) == bytes(buf[:20 * 512])
    assert all(p.parent is sh for p in pieces) and sh.pending == 3


# -- the engine against an in-memory backend ---------------------------------------------
class FakeBackend:
    """Pages by gref, a disk, and a thread that serves the ring like blkback
    (INDIRECT included) and lets the engine take the responses."""

    def __init__(self, nbytes: int, ring_page: bytearray) -> None:
        self.disk = bytearray(nbytes)
        self.pages: dict[int, memoryview] = {}
        self.back = BackRing(ring_page, blkif.RING_ENTRY_SIZE)
        self.seen: list = []  # every request decoded
        self.indirect_segments: list[tuple] = []  # segments read from indirect pages
        self.engine: BlkfrontEngine | None = None
        self.paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def grant_pool(self, n: int, first: int) -> list[GrantedPage]:
        out = []
        for i in range(n):
            view = memoryview(bytearray(XEN_PAGE_SIZE))
            self.pages[first + i] = view
            out.append(GrantedPage(first + i, view))
        return out

    def start(self, engine: BlkfrontEngine) -> None:
        self.engine = engine
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.paused and self.serve():
                self.engine.handle_responses()
            time.sleep(0.0005)

    def serve(self) -> int:
        n = 0
        while self.back.unconsumed_requests():
            req = decode_request(self.back.take_request())
            self.seen.append(req)
            if req.operation == BLKIF_OP_INDIRECT:
                op, segs, left = req.indirect_op, [], req.nr_segments
                for gref in req.indirect_grefs:
                    count = min(left, blkif.SEGMENTS_PER_INDIRECT_PAGE)
                    segs += decode_indirect_page(bytes(self.pages[gref]), count)
                    left -= count
                self.indirect_segments.append(tuple(segs))
            else:
                op, segs = req.operation, req.segments
            pos = req.sector_number * 512
            for s in segs:
                n_bytes = s.nr_sectors * 512
                page = self.pages[s.gref]
                at = s.first_sect * 512
                if op == BLKIF_OP_WRITE:
                    self.disk[pos:pos + n_bytes] = page[at:at + n_bytes]
                elif op == BLKIF_OP_READ:
                    page[at:at + n_bytes] = self.disk[pos:pos + n_bytes]
                pos += n_bytes
            self.back.put_response(BlkifResponse(req.id, op, BLKIF_RSP_OKAY).encode())
            n += 1
        if n:
            self.back.push_responses()
        return n


def make_engine(indirect_segments: int, nbytes: int = 4 * MIB):
    ring_page = bytearray(XEN_PAGE_SIZE)
    SharedRing.init(ring_page)
    front = FrontRing(ring_page, blkif.RING_ENTRY_SIZE)
    backend = FakeBackend(nbytes, ring_page)
    ndata, nind = pool_layout(front.size, indirect_segments)
    pool = backend.grant_pool(ndata, 1000)
    ipool = backend.grant_pool(nind, 1000 + ndata)
    engine = BlkfrontEngine(handle=7)
    engine.attach(front, pool, lambda: None, indirect_pool=ipool, indirect_segments=indirect_segments)
    backend.start(engine)
    return engine, backend, front


@pytest.fixture
def indirect():
    engine, backend, front = make_engine(256)
    yield engine, backend
    backend.stop()


def test_sequential_io_uses_indirect_requests(indirect):
    engine, backend = indirect
    data = os.urandom(MIB)
    engine.write_sectors(4096, data)
    assert engine.requests == 1 and engine.indirect_requests == 1  # 1 MiB in one request, not 24
    assert bytes(engine.read_sectors(4096, MIB // 512)) == data
    assert engine.requests == 2
    assert backend.disk[4096 * 512:4096 * 512 + MIB] == data
    req = backend.seen[0]
    assert req.operation == BLKIF_OP_INDIRECT and req.indirect_op == BLKIF_OP_WRITE
    assert req.nr_segments == 256 and req.sector_number == 4096 and req.handle == 7
    assert len(req.indirect_grefs) == 1
    # the indirect page lists one full-page segment per data page, each a pool gref
    segs = backend.indirect_segments[0]
    assert len(segs) == 256 and all((s.first_sect, s.last_sect) == (0, 7) for s in segs)
    pool_grefs = {p.gref for p in engine.pool}
    assert {s.gref for s in segs} <= pool_grefs and len({s.gref for s in segs}) == 256
    # the indirect page itself is a persistent pool page, not a data page
    assert req.indirect_grefs[0] in {p.gref for p in engine.indirect_pool}
    assert req.indirect_grefs[0] not in pool_grefs


def test_indirect_page_contents_partial_tail(indirect):
    engine, backend = indirect
    data = os.urandom(100 * 512)  # 12.5 pages: 13 segments, the last 4 sectors
    engine.write_sectors(3, data)
    req = backend.seen[-1]
    assert req.operation == BLKIF_OP_INDIRECT and req.nr_segments == 13
    [ipage] = [p for p in engine.indirect_pool if p.gref == req.indirect_grefs[0]]
    page = bytes(ipage.buf)
    segs = backend.indirect_segments[-1]
    assert [(s.first_sect, s.last_sect) for s in segs] == [(0, 7)] * 12 + [(0, 3)]
    assert decode_indirect_page(page, 13) == segs
    assert page[13 * 8:] == bytes(XEN_PAGE_SIZE - 13 * 8)  # zero after the segments
    assert bytes(backend.disk[3 * 512:3 * 512 + len(data)]) == data


def test_small_io_stays_direct(indirect):
    engine, backend = indirect
    engine.write_sectors(0, bytes(range(256)) * 2 * 88)  # 11 pages: direct is enough
    engine.read_sectors(0, 8)
    assert [r.operation for r in backend.seen] == [BLKIF_OP_WRITE, BLKIF_OP_READ]
    assert engine.indirect_requests == 0


def test_many_large_requests_wait_for_pages(indirect):
    engine, backend = indirect
    data = os.urandom(4 * MIB)  # 16 x 256 pages: more than the pool, must queue
    engine.write_sectors(0, data)
    assert engine.requests == 4 and engine.indirect_requests == 4
    assert bytes(engine.read_sectors(0, 4 * MIB // 512)) == data
    assert engine.inflight() == 0
    assert len(engine._free_pages) == len(engine.pool) and len(engine._free_indirect) == len(engine.indirect_pool)


def test_direct_when_not_offered():
    engine, backend, _ = make_engine(0)
    try:
        data = os.urandom(MIB)
        engine.write_sectors(0, data)
        assert engine.max_segments == BLKIF_MAX_SEGMENTS_PER_REQUEST
        assert engine.requests == 24 and engine.indirect_requests == 0
        assert all(r.operation == BLKIF_OP_WRITE and r.nr_segments <= 11 for r in backend.seen)
        assert bytes(engine.read_sectors(0, MIB // 512)) == data
        with pytest.raises(OSError):  # a request the ring cannot carry
            engine.submit(Shadow(BLKIF_OP_READ, 0, 12 * 8, read_into=memoryview(bytearray(12 * 4096))))
    finally:
        backend.stop()


def _migrate(engine, old_backend, indirect_segments):
    """detach (the old backend vanished with requests in flight), attach to a new one."""
    old_backend.stop()
    engine.detach()
    ring_page = bytearray(XEN_PAGE_SIZE)
    SharedRing.init(ring_page)
    front = FrontRing(ring_page, blkif.RING_ENTRY_SIZE)
    new = FakeBackend(len(old_backend.disk), ring_page)
    new.disk[:] = old_backend.disk
    ndata, nind = pool_layout(front.size, indirect_segments)
    pool, ipool = new.grant_pool(ndata, 5000), new.grant_pool(nind, 5000 + ndata)
    new.start(engine)
    engine.attach(front, pool, lambda: None, indirect_pool=ipool, indirect_segments=indirect_segments)
    return new


@pytest.mark.parametrize("new_segments", [256, 32, 0])
def test_resume_replays_indirect_requests(new_segments):
    """Requests in flight on an indirect ring are put again on the new ring,
    cut to what the new backend takes; callers only see their completion."""
    engine, backend, _ = make_engine(256)
    backend.paused = True  # the old backend never answers
    data = os.urandom(MIB)
    backend.disk[:MIB] = data
    buf = memoryview(bytearray(MIB))
    wdata = os.urandom(MIB)
    rd = engine.submit(Shadow(BLKIF_OP_READ, 0, MIB // 512, read_into=buf))
    wr = engine.submit(Shadow(BLKIF_OP_WRITE, MIB // 512, MIB // 512, write_data=memoryview(wdata)))
    time.sleep(0.01)
    assert not rd.done.is_set() and engine.inflight() == 2
    new = _migrate(engine, backend, new_segments)
    try:
        engine.wait([rd, wr], timeout=10)
        assert bytes(buf) == data
        assert bytes(new.disk[MIB:2 * MIB]) == wdata
        per = new_segments or 11
        assert len(new.seen) == 2 * -(-256 // per)
        assert all((r.nr_segments <= per) for r in new.seen)
        assert engine.inflight() == 0 and len(engine._free_pages) == len(engine.pool)
    finally:
        new.stop()
