"""blkback's data path over a real shared ring, in-process: the frontend's
pages are memfds granted through FakeGrants (a read-only grant maps
PROT_READ), the disk is a 4 MiB file."""

from __future__ import annotations

import os
import threading

import pytest

from xenbed.drivers.blk.blkback import BlkifServer, DiskGeometry
from xenbed.drivers.blk.connection import BlkbackConnection, Disk, FrontendConfig
from xenbed.protocols import blkif
from xenbed.protocols.blkif import (
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifResponse,
    Segment,
)
from xenbed.protocols.ring import BackRing, RingOverflow

from .test_blkback_support import FakeEvtchn, FakeFront, FakeGrants

DISK_BYTES = 4 << 20
SECTORS = DISK_BYTES // 512


@pytest.fixture
def disk_fd(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def make(grants, fd, *, persistent=False, readonly=False, order=0):
    front = FakeFront(grants, order)
    if order == 0:
        mapping = grants.map(grants.domid, front.refs[0])
        buf = mapping.mmap
    else:
        buf = front._contig.buf
    ring = BackRing(buf, blkif.RING_ENTRY_SIZE, ring_bytes=4096 << order)
    server = BlkifServer(ring, grants, grants.domid, fd, DiskGeometry(SECTORS, readonly), persistent=persistent)
    return front, server


def page_with(grants, data: bytes, readonly=False):
    gref, page = grants.grant_page(readonly)
    page[: len(data)] = data
    return gref, page


def test_write_then_read_round_trip(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    g1, _ = page_with(grants, b"A" * 4096, readonly=True)  # blkfront grants write data read-only
    g2, _ = page_with(grants, b"x" * 1024 + b"B" * 1024)
    front.push(BlkifRequest(BLKIF_OP_WRITE, 0, 1, 16, (Segment(g1, 0, 7), Segment(g2, 2, 3))))
    server.process()
    assert front.responses() == [BlkifResponse(1, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert os.pread(disk_fd, 4096 + 1024, 16 * 512) == b"A" * 4096 + b"B" * 1024
    r1, p1 = grants.grant_page()
    r2, p2 = grants.grant_page()
    front.push(BlkifRequest(BLKIF_OP_READ, 0, 2, 16 + 7, (Segment(r1, 1, 1), Segment(r2, 7, 7))))
    server.process()
    assert front.responses() == [BlkifResponse(2, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    assert p1[512:1024] == b"A" * 512 and p2[3584:4096] == b"B" * 512
    assert p1[:512] == bytes(512)  # only the requested sectors of the page are touched
    assert len(grants.live) == 1  # the ring only: every data mapping undone after its request


def test_response_slot_is_fully_initialised(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    slot = front.ring.sring.slot_offset(0)
    front.pages[0][slot:slot + 16] = b"\xff" * 16  # stale bytes where the response goes
    front.push(BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 0x1122334455667788, 0))
    server.process()
    raw = bytes(front.pages[0][slot:slot + 16])
    assert raw == BlkifResponse(0x1122334455667788, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY).encode()
    assert raw[9] == 0 and raw[12:16] == bytes(4)  # padding zeroed, no stale bytes leak


def test_read_into_a_read_only_grant_fails_only_that_request(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    ro, _ = grants.grant_page(readonly=True)
    ok, _ = grants.grant_page()
    front.push(BlkifRequest(BLKIF_OP_READ, 0, 1, 0, (Segment(ro, 0, 7),)),
               BlkifRequest(BLKIF_OP_READ, 0, 2, 0, (Segment(ok, 0, 7),)),
               BlkifRequest(BLKIF_OP_READ, 0, 3, 0, (Segment(999, 0, 7),)))  # a gref never granted
    server.process()
    assert [(r.id, r.status) for r in front.responses()] == [(1, BLKIF_RSP_ERROR), (2, BLKIF_RSP_OKAY),
                                                            (3, BLKIF_RSP_ERROR)]
    assert len(grants.live) == 1  # the ring


def test_invalid_and_unknown_requests_get_well_formed_answers(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd, readonly=True)
    g, _ = grants.grant_page()
    front.push(BlkifRequest(77, 0, 1, 0, (Segment(g, 0, 7),)),
               BlkifRequest(BLKIF_OP_WRITE, 0, 2, 0, (Segment(g, 0, 7),)),
               BlkifRequest(BLKIF_OP_READ, 0, 3, SECTORS, (Segment(g, 0, 0),)),
               BlkifRequest(BLKIF_OP_READ, 0, 4, 0, (Segment(g, 6, 5),)))
    server.process()
    assert front.responses() == [BlkifResponse(1, 77, BLKIF_RSP_EOPNOTSUPP),
                                 BlkifResponse(2, BLKIF_OP_WRITE, BLKIF_RSP_ERROR),
                                 BlkifResponse(3, BLKIF_OP_READ, BLKIF_RSP_ERROR),
                                 BlkifResponse(4, BLKIF_OP_READ, BLKIF_RSP_ERROR)]
    assert grants.map_calls == 1  # the ring only: nothing was mapped for refused requests


def test_persistent_grants_are_mapped_once_and_released(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd, persistent=True)
    g, page = page_with(grants, b"P" * 4096)
    before = grants.map_calls
    for i in range(10):
        front.push(BlkifRequest(BLKIF_OP_WRITE, 0, i, i * 8, (Segment(g, 0, 7),)))
        server.process()
    assert all(r.status == BLKIF_RSP_OKAY for r in front.responses())
    assert grants.map_calls == before + 1
    assert os.pread(disk_fd, 4096, 9 * 4096) == b"P" * 4096
    server.release()
    assert len(grants.live) == 1  # only the ring remains


def test_flush_and_discard(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    g, _ = page_with(grants, b"D" * 4096)
    for batch in range(8):
        front.push(*(BlkifRequest(BLKIF_OP_WRITE, 0, i, i * 8, (Segment(g, 0, 7),))
                     for i in range(batch * 32, batch * 32 + 32)))
        server.process()
        front.responses()
    blocks_before = os.fstat(disk_fd).st_blocks
    front.push(BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 1000, 0),
               BlkifRequestDiscard(0, 1001, 0, 1024))
    server.process()
    assert front.responses() == [BlkifResponse(1000, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY),
                                 BlkifResponse(1001, BLKIF_OP_DISCARD, BLKIF_RSP_OKAY)]
    assert os.pread(disk_fd, 512 * 1024, 0) == bytes(512 * 1024)  # discarded sectors read as zeros
    assert os.fstat(disk_fd).st_blocks < blocks_before  # the hole was punched
    assert os.pread(disk_fd, 4096, 512 * 1024) == b"D" * 4096  # and nothing beyond it


def test_flush_with_data_writes_it(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    g, _ = page_with(grants, b"F" * 4096, readonly=True)
    front.push(BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 0, 5, 100, (Segment(g, 0, 7),)))
    server.process()
    assert front.responses() == [BlkifResponse(5, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)]
    assert os.pread(disk_fd, 4096, 100 * 512) == b"F" * 4096


def test_indirect_write_and_read_of_200_segments(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    data = [page_with(grants, bytes([i]) * 4096, readonly=True)[0] for i in range(200)]
    ind, ind_page = grants.grant_page(readonly=True)
    ind_page[:] = blkif.encode_indirect_page([Segment(g, 0, 7) for g in data])
    front.push(BlkifRequestIndirect(BLKIF_OP_WRITE, 200, 0, 9, 8, (ind,)))
    calls = grants.batch_calls
    server.process()
    assert front.responses() == [BlkifResponse(9, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    # one map and one unmap call for the indirect page, one each for the 200 segments
    assert grants.batch_calls - calls == 4
    assert os.pread(disk_fd, 200 * 4096, 4096) == b"".join(bytes([i]) * 4096 for i in range(200))
    # read the same back into fresh pages, half a page each
    targets = [grants.grant_page() for _ in range(200)]
    ind2, ind2_page = grants.grant_page(readonly=True)
    ind2_page[:] = blkif.encode_indirect_page([Segment(g, 4, 7) for g, _ in targets])
    front.push(BlkifRequestIndirect(BLKIF_OP_READ, 200, 0, 10, 8, (ind2,)))
    server.process()
    assert front.responses() == [BlkifResponse(10, BLKIF_OP_READ, BLKIF_RSP_OKAY)]
    flat = os.pread(disk_fd, 200 * 2048, 4096)
    assert b"".join(bytes(p[2048:]) for _, p in targets) == flat
    assert len(grants.live) == 1


def test_indirect_page_with_a_bad_segment_is_refused(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    g, _ = grants.grant_page()
    ind, ind_page = grants.grant_page(readonly=True)
    ind_page[:] = blkif.encode_indirect_page([Segment(g, 0, 7), Segment(g, 3, 9)])
    front.push(BlkifRequestIndirect(BLKIF_OP_READ, 2, 0, 1, 0, (ind,)))
    server.process()
    assert front.responses() == [BlkifResponse(1, BLKIF_OP_READ, BLKIF_RSP_ERROR)]


def test_ring_overflow_raises_instead_of_serving(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd)
    front.ring.sring.req_prod = front.ring.size + 5
    with pytest.raises(RingOverflow):
        server.process()


def test_multi_page_ring_holds_more_requests(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd, order=2)
    assert front.ring.size == 128
    g, _ = page_with(grants, b"M" * 4096, readonly=True)
    front.push(*(BlkifRequest(BLKIF_OP_WRITE, 0, i, i * 8, (Segment(g, 0, 7),)) for i in range(100)))
    server.process()
    got = front.responses()
    assert [r.id for r in got] == list(range(100)) and {r.status for r in got} == {BLKIF_RSP_OKAY}


def test_connection_serves_on_events_and_closes_cleanly(tmp_path, disk_fd):
    grants, evtchn = FakeGrants(), FakeEvtchn()
    front = FakeFront(grants)
    disk = Disk.from_fd_for_tests(os.dup(disk_fd), SECTORS)
    fatal = []
    conn = BlkbackConnection("test", grants, evtchn, 1, FrontendConfig((front.refs[0],), 0, 3, "x86_64-abi", True),
                      disk, lambda err, msg: fatal.append((err, msg)))
    conn.start()
    g, _ = page_with(grants, b"E" * 4096)
    for i in range(50):
        front.push(BlkifRequest(BLKIF_OP_WRITE, 0, i, 0, (Segment(g, 0, 7),)))
        evtchn.kick(conn.port)
        assert evtchn.wait_notified(conn.port, i + 1)
        assert front.responses() == [BlkifResponse(i, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
        front.ring.final_check_for_responses()  # re-arm rsp_event, as blkfront does
    port = conn.port
    conn.close()
    disk.close()
    assert port in evtchn.closed and not grants.live and not fatal


def test_multi_queue_connection_serves_each_ring_on_its_own_port(disk_fd):
    """multi-queue-num-queues 2, two-page rings: a worker per ring, each
    answering on its own ring and port; close undoes every queue."""
    from xenbed.drivers.blk.connection import QueueConfig

    grants, evtchn = FakeGrants(), FakeEvtchn()
    fronts = [FakeFront(grants, 1), FakeFront(grants, 1)]
    disk = Disk.from_fd_for_tests(os.dup(disk_fd), SECTORS)
    queues = tuple(QueueConfig(tuple(f.refs), 40 + i) for i, f in enumerate(fronts))
    cfg = FrontendConfig(queues[0].ring_refs, 1, 40, "x86_64-abi", True, queues)
    conn = BlkbackConnection("mq", grants, evtchn, 1, cfg, disk, lambda err, msg: None)
    conn.start()
    assert len(conn.queues) == 2 and len({q.port for q in conn.queues}) == 2
    assert {q.thread.name for q in conn.queues} == {"blkif-mq/queue-0", "blkif-mq/queue-1"}
    for i, (front, queue) in enumerate(zip(fronts, conn.queues)):
        g, _ = page_with(grants, bytes([65 + i]) * 4096)
        front.push(BlkifRequest(BLKIF_OP_WRITE, 0, 7, i * 8, (Segment(g, 0, 7),)))
        evtchn.kick(queue.port)
        assert evtchn.wait_notified(queue.port, 1)
        assert front.responses() == [BlkifResponse(7, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert os.pread(disk_fd, 8192, 0) == b"A" * 4096 + b"B" * 4096
    ports = [q.port for q in conn.queues]
    conn.close()
    disk.close()
    assert set(ports) <= set(evtchn.closed) and not grants.live


def test_connection_reports_ring_overflow_as_fatal(disk_fd):
    grants, evtchn = FakeGrants(), FakeEvtchn()
    front = FakeFront(grants)
    disk = Disk.from_fd_for_tests(os.dup(disk_fd), SECTORS)
    fatal = threading.Event()
    conn = BlkbackConnection("test", grants, evtchn, 1, FrontendConfig((front.refs[0],), 0, 3, "x86_64-abi", False),
                      disk, lambda err, msg: fatal.set())
    conn.start()
    front.ring.sring.req_prod = 1000
    evtchn.kick(conn.port)
    assert fatal.wait(5)
    conn.close()
    disk.close()
    assert not grants.live


def test_persistent_backend_still_takes_a_read_only_grant_for_a_write(disk_fd):
    grants = FakeGrants()
    front, server = make(grants, disk_fd, persistent=True)
    g, _ = page_with(grants, b"Q" * 4096, readonly=True)
    front.push(BlkifRequest(BLKIF_OP_WRITE, 0, 1, 0, (Segment(g, 0, 7),)))
    server.process()
    assert front.responses() == [BlkifResponse(1, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert os.pread(disk_fd, 4096, 0) == b"Q" * 4096
    assert g not in server.persistent_maps and len(grants.live) == 1
