"""blkfront's pure pieces: vdev names, splitting I/O into blkif requests,
alignment, request ids, range locks, backend details (no Docker, no Xen)."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from xenbed.drivers.blk.disk import DiskInfo, RangeLock, align_span
from xenbed.drivers.blk.front_engine import MAX_SECTORS_PER_REQUEST, Chunk, IdAllocator, split_io, status_errno
from xenbed.protocols.vdev import EXTENDED, number_to_vdev
from xenbed.protocols.vdev import canonical_vdev_number as vdev_to_number
from xenbed.protocols.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifRequest,
    VDISK_CDROM,
    VDISK_READONLY,
    decode_request,
)


# -- devnum <-> vdev ---------------------------------------------------------------
@pytest.mark.parametrize("devnum, name", [
    (51712, "xvda"), (51728, "xvdb"), (51713, "xvda1"), (51727, "xvda15"), (51952, "xvdp"),
    ((1 << 28) | (16 << 8), "xvdq"), ((1 << 28) | (26 << 8) | 3, "xvdaa3"), ((1 << 28) | (0 << 8) | 20, "xvda20"),
    (768, "hda"), (832, "hdb"), (769, "hda1"), (5632, "hdc"), (5696, "hdd"), (5695, "hdc63"),
    (2048, "sda"), (2064, "sdb"), (2049, "sda1"), (2303, "sdp15"),
    # not in a format libxl writes: named in decimal, as the toolstack does
    (7 << 8, "1792"), (202, "202"), (65 << 8, "16640"), (EXTENDED | (1 << 8), str(EXTENDED | (1 << 8))),
])
def test_number_to_vdev(devnum, name):
    assert number_to_vdev(devnum) == name


@pytest.mark.parametrize("name", ["xvda", "xvdz", "xvdaa", "xvdzz", "xvda1", "xvdq7", "xvdaaa255",
                                  "hda", "hdb63", "hdd", "sda", "sdp15", "12345"])
def test_vdev_round_trip(name):
    assert number_to_vdev(vdev_to_number(name)) == name


def test_vdev_numbering_matches_xen():
    # docs/misc/vbd-interface: 202<<8 | disk<<4 | partition for xvd disks 0..15
    assert vdev_to_number("xvda") == 202 << 8
    assert vdev_to_number("xvdb") == (202 << 8) | (1 << 4)
    assert vdev_to_number("xvdq") == (1 << 28) | (16 << 8)  # disks 16 onwards: extended
    assert vdev_to_number("hdc") == 22 << 8


@pytest.mark.parametrize("devnum", [-1, 1 << 31])
def test_number_to_vdev_rejects(devnum):
    with pytest.raises(ValueError):
        number_to_vdev(devnum)


@pytest.mark.parametrize("name", ["", "xvd", "xvda0", "xvdA", "nvme0n1", "hde", "xvda256", "sda16", "sdq", "012"])
def test_vdev_to_number_rejects(name):
    with pytest.raises(ValueError):
        vdev_to_number(name)


# -- splitting ---------------------------------------------------------------------
def test_split_io_small_and_empty():
    assert split_io(0, 0) == []
    assert split_io(10, 1) == [Chunk(10, 1, 0)]


def test_split_io_request_limit():
    assert MAX_SECTORS_PER_REQUEST == 88  # 11 segments x 8 sectors = 44 KiB
    chunks = split_io(100, 256)  # 128 KiB: what FUSE sends at most
    assert [(c.sector, c.nr_sectors, c.offset) for c in chunks] == [
        (100, 88, 0), (188, 88, 88 * 512), (276, 80, 176 * 512)]
    assert all(c.pages <= BLKIF_MAX_SEGMENTS_PER_REQUEST for c in chunks)


@pytest.mark.parametrize("sector, n, max_segments", [(0, 1, 11), (7, 1000, 11), (3, 4096, 1), (1, 17, 2)])
def test_split_io_covers_exactly(sector, n, max_segments):
    chunks = split_io(sector, n, max_segments)
    assert sum(c.nr_sectors for c in chunks) == n
    pos = sector
    for c in chunks:
        assert c.sector == pos and c.offset == (pos - sector) * 512
        assert 0 < c.nr_sectors <= max_segments * 8
        pos += c.nr_sectors


def test_chunk_segments_pack_pages():
    c = Chunk(0, 19, 0)
    assert c.pages == 3 and c.nbytes == 19 * 512
    segs = c.segments([7, 8, 9])
    assert [(s.gref, s.first_sect, s.last_sect) for s in segs] == [(7, 0, 7), (8, 0, 7), (9, 0, 2)]
    assert sum(s.nr_sectors for s in segs) == 19
    with pytest.raises(ValueError):
        c.segments([1, 2])


def test_chunk_becomes_a_valid_blkif_request():
    c = split_io(2048, 88)[0]
    req = BlkifRequest(BLKIF_OP_WRITE, 0, 5, c.sector, c.segments(list(range(100, 111))))
    back = decode_request(req.encode())
    assert back.nr_segments == 11 and back.sector_number == 2048 and back.id == 5
    assert sum(s.nr_sectors for s in back.segments) == 88


def test_split_io_rejects_bad_input():
    with pytest.raises(ValueError):
        split_io(-1, 1)
    with pytest.raises(ValueError):
        split_io(0, 1, 0)


# -- alignment (FUSE writes may be unaligned: read-modify-write) --------------------
@pytest.mark.parametrize("offset, length, block, span", [
    (0, 512, 512, (0, 512)), (1, 1, 512, (0, 512)), (511, 2, 512, (0, 1024)),
    (1000, 11, 512, (512, 1024)), (1000, 100, 512, (512, 1536)), (4095, 5000, 512, (3584, 9216)), (4095, 5000, 4096, (0, 12288)),
    (1024, 0, 512, (1024, 1024)),
])
def test_align_span(offset, length, block, span):
    assert align_span(offset, length, block) == span


# -- ids ---------------------------------------------------------------------------
def test_id_allocator_hands_out_every_id_once():
    ids = IdAllocator(32)
    got = [ids.alloc() for _ in range(32)]
    assert sorted(got) == list(range(32)) and got[0] == 0
    assert ids.alloc() is None and len(ids) == 32 and ids.available == 0
    ids.free(17)
    assert not ids.in_use(17) and ids.alloc() == 17


def test_id_allocator_refuses_double_free():
    ids = IdAllocator(4)
    rid = ids.alloc()
    ids.free(rid)
    with pytest.raises(KeyError):
        ids.free(rid)
    with pytest.raises(KeyError):
        ids.free(3)  # never handed out


def test_ids_match_out_of_order_responses():
    ids = IdAllocator(8)
    inflight = {ids.alloc(): f"req{i}" for i in range(8)}
    for rid in (5, 0, 7, 2):  # responses in any order
        assert ids.in_use(rid)
        ids.free(rid)
        del inflight[rid]
    assert sorted(inflight) == [1, 3, 4, 6] and ids.available == 4


# -- range lock --------------------------------------------------------------------
def test_range_lock_serialises_overlaps_only():
    lock = RangeLock()
    assert lock.acquire(0, 512)
    assert lock.acquire(512, 1024, timeout=0.1)  # adjacent: no overlap
    assert not lock.acquire(500, 600, timeout=0.05)
    order = []

    def waiter():
        lock.acquire(0, 4096)
        order.append("got")
        lock.release(0, 4096)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    assert order == []
    lock.release(0, 512)
    lock.release(512, 1024)
    t.join(2)
    assert order == ["got"] and lock.held() == []


# -- statuses and backend details ----------------------------------------------------
def test_status_errno():
    assert status_errno(BLKIF_RSP_OKAY) == 0
    assert status_errno(BLKIF_RSP_ERROR) == errno.EIO
    assert status_errno(BLKIF_RSP_EOPNOTSUPP) == errno.EOPNOTSUPP
    assert status_errno(-7) == errno.EIO


def test_disk_info_parse():
    nodes = {"sectors": "2097152", "sector-size": "512", "info": str(VDISK_READONLY),
             "feature-flush-cache": "1", "feature-discard": "1", "discard-granularity": "4096",
             "feature-persistent": "1", "feature-max-indirect-segments": "256"}
    info = DiskInfo.parse(nodes.get)
    assert info.size == 1 << 30 and info.readonly and not info.cdrom
    assert info.flush and info.discard and info.persistent and not info.barrier
    assert info.discard_granularity == 4096 and info.max_indirect_segments == 256


def test_disk_info_defaults_and_cdrom():
    info = DiskInfo.parse({"sectors": "8", "info": str(VDISK_CDROM), "feature-flush-cache": "0"}.get)
    assert info.sector_size == 512 and info.cdrom and info.readonly and not info.flush


@pytest.mark.parametrize("nodes", [{}, {"sectors": "x"}, {"sectors": "8", "sector-size": "1000"},
                                   {"sectors": "8", "sector-size": "8192"}])
def test_disk_info_rejects(nodes):
    with pytest.raises(ValueError):
        DiskInfo.parse(nodes.get)


# -- byte-addressed disk over whole sectors (read-modify-write) ------------------------
class SectorStore:
    """A disk of whole sectors in memory, with BlkfrontEngine's caller interface; it
    refuses anything that is not whole 512-byte sectors, as the ring does."""

    def __init__(self, nbytes: int) -> None:
        self.data = bytearray(bytes(range(256)) * (nbytes // 256))
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []

    def read_sectors(self, sector, n):
        return bytearray(self.data[sector * 512:(sector + n) * 512])

    def write_sectors(self, sector, data):
        assert len(data) % 512 == 0
        self.writes.append((sector, len(data) // 512))
        self.data[sector * 512:sector * 512 + len(data)] = data

    def flush(self):
        self.flushes += 1

    def discard_sectors(self, sector, n, secure=False):
        self.discards.append((sector, n))
        self.data[sector * 512:(sector + n) * 512] = bytes(n * 512)


def _disk(nbytes=1 << 16, **info):
    from xenbed.drivers.blk.disk import BlkDisk

    store = SectorStore(nbytes)
    return BlkDisk("xvda", store, DiskInfo(sectors=nbytes // 512, **info)), store


@pytest.mark.parametrize("offset, data", [
    (0, b"a" * 512), (1000, b"hello world"), (511, b"xy"), (4095, b"Z" * 5000), (0, b"q"),
    (65535, b"!"), (512, b"b" * 1024), (3, b"c" * 509),
])
def test_disk_write_any_offset(offset, data):
    disk, store = _disk()
    expect = bytearray(store.data)
    expect[offset:offset + len(data)] = data
    assert disk.write(offset, data) == len(data)
    assert store.data == expect  # neighbours of a partial sector kept
    assert disk.read(offset, len(data)) == data
    for sector, n in store.writes:  # only the covering sectors were written
        assert sector * 512 <= offset and (sector + n) * 512 >= offset + len(data)


def test_disk_rmw_at_logical_block_size():
    disk, store = _disk(sector_size=4096)
    expect = bytearray(store.data)
    expect[5000:5010] = b"0123456789"
    disk.write(5000, b"0123456789")
    assert store.data == expect and store.writes == [(8, 8)]  # one whole 4 KiB block


def test_disk_read_clamps_at_end():
    disk, store = _disk(4096)
    assert disk.read(4000, 1000) == bytes(store.data[4000:])
    assert disk.read(4096, 10) == b"" and disk.read(99999, 1) == b""


def test_disk_refuses_write_past_end_and_readonly():
    disk, _ = _disk(4096)
    with pytest.raises(OSError) as e:
        disk.write(4090, b"1234567")
    assert e.value.errno == errno.ENOSPC
    ro, _ = _disk(4096, info=VDISK_READONLY)
    with pytest.raises(OSError) as e:
        ro.write(0, b"x")
    assert e.value.errno == errno.EROFS
    ro.flush()  # nothing to flush on a read-only disk


def test_disk_discard_whole_blocks_zeroes_partial_ones():
    disk, store = _disk()
    disk.discard(1000, 3000)  # sectors 2..6 whole; 1000..1023 and 3584..3999 partial
    assert store.discards == [(2, 5)]
    assert store.data[1000:4000] == bytes(3000)
    assert store.data[999] == 999 % 256 and store.data[4000] == 4000 % 256


# -- ring negotiation (talk_to_blkback) ----------------------------------------------------

def test_ring_page_order_follows_the_backends_offer_up_to_ours():
    from xenbed.drivers.blk.front_engine import ring_page_order_to_use
    assert ring_page_order_to_use(None) == 0  # a backend that offers nothing: one page
    assert ring_page_order_to_use("0", 4) == 0
    assert ring_page_order_to_use("4", 1) == 1
    assert ring_page_order_to_use("1", 4) == 1
    assert ring_page_order_to_use("4", 0) == 0  # a frontend that asks for none of it
    assert ring_page_order_to_use("junk", 2) == 0


def test_ring_nodes_as_linux_writes_them():
    from xenbed.drivers.blk.front_engine import ring_nodes
    assert ring_nodes([8], 0) == {"ring-ref": "8"}
    assert ring_nodes([8, 9], 1) == {"ring-page-order": "1", "ring-ref0": "8", "ring-ref1": "9"}


def test_frontend_ring_nodes_parse_back_in_blkback():
    from xenbed.drivers.blk.connection import parse_frontend_config
    from xenbed.drivers.blk.front_engine import ring_nodes
    for order, grefs in ((0, [8]), (2, [20, 21, 22, 23])):
        keys = ring_nodes(grefs, order) | {"event-channel": "5", "protocol": "x86_64-abi", "feature-persistent": "1"}
        cfg = parse_frontend_config(keys.get)
        assert cfg.ring_refs == tuple(grefs) and cfg.ring_page_order == order and len(cfg.queues) == 1


def test_pool_stays_within_the_persistent_budget_on_bigger_rings():
    from xenbed.drivers.blk.front_engine import PERSISTENT_GRANTS, pool_layout
    from xenbed.protocols.blkif import blkif_ring_size
    for order in range(5):
        size = blkif_ring_size(order)
        for segs in (0, 256):
            data, ind = pool_layout(size, segs)
            assert data >= max(segs, 11) and data + ind <= PERSISTENT_GRANTS
