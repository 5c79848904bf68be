"""blkback's pure parts: request validation, segment arithmetic, frontend keys."""

from __future__ import annotations

import errno

import pytest

from xenbed.drivers.blk.blkback import DiskGeometry, Extent, response_operation, segment_extents, validate_request
from xenbed.drivers.blk.connection import parse_frontend_config
from xenbed.drivers.xenbus.nodes import BadNode
from xenbed.protocols.blkif import (
    BLKIF_DISCARD_SECURE, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY, BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, Segment, decode_request,
)

OK, ERR, NOTSUP = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP
DISK = DiskGeometry(sectors=8192)  # 4 MiB
RO = DiskGeometry(sectors=8192, readonly=True, discard=False)
NODISCARD = DiskGeometry(sectors=8192, discard=False)
FULL = Segment(100, 0, 7)


def rw(op, sector=0, segs=(FULL,), nr=None):
    req = BlkifRequest(op, 0, 7, sector, tuple(segs), len(segs) if nr is None else nr)
    return decode_request(req.encode())  # as the backend sees it: decoded from a copied slot


CASES = [
    # (why, request, geometry, status)
    ("read of one page", rw(BLKIF_OP_READ), DISK, OK),
    ("write of eleven pages", rw(BLKIF_OP_WRITE, segs=[FULL] * 11), DISK, OK),
    ("read with no segment", rw(BLKIF_OP_READ, segs=[]), DISK, ERR),
    ("write with no segment", rw(BLKIF_OP_WRITE, segs=[]), DISK, ERR),
    ("nr_segments 12 claimed", rw(BLKIF_OP_READ, segs=[FULL] * 11, nr=12), DISK, ERR),
    ("nr_segments 255 claimed", rw(BLKIF_OP_WRITE, segs=[FULL] * 11, nr=255), DISK, ERR),
    ("flush without data", rw(BLKIF_OP_FLUSH_DISKCACHE, segs=[]), DISK, OK),
    ("flush with data", rw(BLKIF_OP_FLUSH_DISKCACHE), DISK, OK),
    ("flush on a read-only disk", rw(BLKIF_OP_FLUSH_DISKCACHE, segs=[]), RO, OK),
    ("flush carrying data on a read-only disk", rw(BLKIF_OP_FLUSH_DISKCACHE), RO, ERR),
    ("first_sect > last_sect", rw(BLKIF_OP_READ, segs=[Segment(1, 5, 4)]), DISK, ERR),
    ("last_sect 8", rw(BLKIF_OP_READ, segs=[Segment(1, 0, 8)]), DISK, ERR),
    ("first_sect = last_sect = 7", rw(BLKIF_OP_READ, segs=[Segment(1, 7, 7)]), DISK, OK),
    ("last sector of the disk", rw(BLKIF_OP_READ, sector=8191, segs=[Segment(1, 0, 0)]), DISK, OK),
    ("one sector past the end", rw(BLKIF_OP_READ, sector=8191, segs=[Segment(1, 0, 1)]), DISK, ERR),
    ("start past the end", rw(BLKIF_OP_WRITE, sector=8192, segs=[Segment(1, 0, 0)]), DISK, ERR),
    ("huge sector number", rw(BLKIF_OP_READ, sector=2**64 - 1), DISK, ERR),
    ("write to a read-only disk", rw(BLKIF_OP_WRITE), RO, ERR),
    ("read from a read-only disk", rw(BLKIF_OP_READ), RO, OK),
    ("write barrier (not advertised)", rw(BLKIF_OP_WRITE_BARRIER), DISK, NOTSUP),
    ("reserved op 4", rw(BLKIF_OP_RESERVED_1), DISK, NOTSUP),
    ("unknown op 200", rw(200), DISK, NOTSUP),
    ("discard", BlkifRequestDiscard(0, 1, 0, 8192), DISK, OK),
    ("discard past the end", BlkifRequestDiscard(0, 1, 1, 8192), DISK, ERR),
    ("secure discard (not advertised)", BlkifRequestDiscard(0, 1, 0, 8, BLKIF_DISCARD_SECURE), DISK, NOTSUP),
    ("discard without feature-discard", BlkifRequestDiscard(0, 1, 0, 8), NODISCARD, NOTSUP),
    ("discard on a read-only disk", BlkifRequestDiscard(0, 1, 0, 8), DiskGeometry(8192, True, True), ERR),
    ("indirect read of 256", BlkifRequestIndirect(BLKIF_OP_READ, 256, 0, 1, 0, (5,)), DISK, OK),
    ("indirect of 257", BlkifRequestIndirect(BLKIF_OP_READ, 257, 0, 1, 0, (5,)), DISK, ERR),
    ("indirect of 0", BlkifRequestIndirect(BLKIF_OP_READ, 0, 0, 1, 0, ()), DISK, ERR),
    ("indirect flush", BlkifRequestIndirect(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, 1, 0, (5,)), DISK, ERR),
    ("indirect write, read-only disk", BlkifRequestIndirect(BLKIF_OP_WRITE, 1, 0, 1, 0, (5,)), RO, ERR),
    ("indirect start past the end", BlkifRequestIndirect(BLKIF_OP_READ, 1, 0, 1, 8192, (5,)), DISK, ERR),
]


@pytest.mark.parametrize("why,req,geometry,status", CASES, ids=[c[0] for c in CASES])
def test_validation_table(why, req, geometry, status):
    assert validate_request(req, geometry) == status, why


def test_segment_extents_lay_sectors_end_to_end():
    segs = [Segment(10, 0, 7), Segment(11, 2, 3), Segment(12, 7, 7)]
    assert segment_extents(5, segs) == [
        Extent(10, 0, 4096, 5 * 512),
        Extent(11, 1024, 1024, 5 * 512 + 4096),
        Extent(12, 3584, 512, 5 * 512 + 4096 + 1024),
    ]


def test_response_operation_is_the_inner_op_for_indirect():
    assert response_operation(BlkifRequestIndirect(BLKIF_OP_WRITE, 1, 0, 1, 0, (5,))) == BLKIF_OP_WRITE
    assert response_operation(rw(BLKIF_OP_READ)) == BLKIF_OP_READ
    assert response_operation(BlkifRequestDiscard(0, 1, 0, 8)) == BLKIF_OP_DISCARD


def reader(keys):
    return lambda key: keys.get(key)


def test_frontend_keys_single_page():
    cfg = parse_frontend_config(reader({"ring-ref": "8", "event-channel": "3", "protocol": "x86_64-abi",
                                        "feature-persistent": "1"}))
    assert (cfg.ring_refs, cfg.ring_page_order, cfg.event_channel, cfg.persistent) == ((8,), 0, 3, True)


def test_frontend_keys_defaults_protocol_native_and_no_persistence():
    cfg = parse_frontend_config(reader({"ring-ref": "8", "event-channel": "3"}))
    assert cfg.protocol == "x86_64-abi" and not cfg.persistent


def test_frontend_keys_multi_page():
    keys = {"ring-page-order": "2", "event-channel": "3"} | {f"ring-ref{i}": str(20 + i) for i in range(4)}
    cfg = parse_frontend_config(reader(keys))
    assert cfg.ring_refs == (20, 21, 22, 23) and cfg.ring_page_order == 2


def test_frontend_keys_multi_queue_multi_page():
    """Linux's blkfront with two queues and two-page rings: ring-page-order
    at the top, each queue's ring-ref%u and event-channel under queue-%u."""
    keys = {"multi-queue-num-queues": "2", "ring-page-order": "1", "feature-persistent": "1"}
    for q in range(2):
        keys |= {f"queue-{q}/ring-ref0": str(10 * q + 1), f"queue-{q}/ring-ref1": str(10 * q + 2),
                 f"queue-{q}/event-channel": str(30 + q)}
    cfg = parse_frontend_config(reader(keys), max_queues=4)
    assert [(q.ring_refs, q.event_channel) for q in cfg.queues] == [((1, 2), 30), ((11, 12), 31)]
    assert cfg.ring_page_order == 1 and cfg.persistent
    assert (cfg.ring_refs, cfg.event_channel) == ((1, 2), 30)  # queue 0, for one-ring callers


def test_frontend_keys_one_queue_asked_explicitly_reads_the_top_keys():
    cfg = parse_frontend_config(reader({"multi-queue-num-queues": "1", "ring-ref": "8", "event-channel": "3"}))
    assert [(q.ring_refs, q.event_channel) for q in cfg.queues] == [((8,), 3)]


def test_frontend_asking_for_nothing_gets_one_one_page_queue():
    cfg = parse_frontend_config(reader({"ring-ref": "8", "event-channel": "3"}), max_queues=4)
    assert cfg.ring_page_order == 0 and [(q.ring_refs, q.event_channel) for q in cfg.queues] == [((8,), 3)]


BAD_KEYS = [
    ("no ring-ref", {"event-channel": "3"}, errno.ENOENT),
    ("no event-channel", {"ring-ref": "8"}, errno.ENOENT),
    ("ring-ref not a number", {"ring-ref": "eight", "event-channel": "3"}, errno.EINVAL),
    ("negative ring-ref", {"ring-ref": "-1", "event-channel": "3"}, errno.EINVAL),
    ("ring-ref beyond u32", {"ring-ref": str(2**32), "event-channel": "3"}, errno.EINVAL),
    ("32-bit protocol", {"ring-ref": "8", "event-channel": "3", "protocol": "x86_32-abi"}, errno.ENOSYS),
    ("bogus protocol", {"ring-ref": "8", "event-channel": "3", "protocol": "pdp11"}, errno.ENOSYS),
    ("ring order beyond max", {"ring-page-order": "5", "event-channel": "3"}, errno.EINVAL),
    ("missing ring-ref1", {"ring-page-order": "1", "ring-ref0": "8", "event-channel": "3"}, errno.ENOENT),
    ("more queues than offered", {"ring-ref": "8", "event-channel": "3", "multi-queue-num-queues": "99"},
     errno.ENOSYS),
    ("zero queues", {"ring-ref": "8", "event-channel": "3", "multi-queue-num-queues": "0"}, errno.ENOSYS),
    ("two queues, keys at the top", {"ring-ref": "8", "event-channel": "3", "multi-queue-num-queues": "2"},
     errno.ENOENT),
    ("queue-1 without its event-channel", {"multi-queue-num-queues": "2", "queue-0/ring-ref": "8",
                                           "queue-0/event-channel": "3", "queue-1/ring-ref": "9"}, errno.ENOENT),
    ("feature-persistent junk", {"ring-ref": "8", "event-channel": "3", "feature-persistent": "yes"}, errno.EINVAL),
]


@pytest.mark.parametrize("why,keys,err", BAD_KEYS, ids=[c[0] for c in BAD_KEYS])
def test_bad_frontend_keys(why, keys, err):
    with pytest.raises(BadNode) as info:
        parse_frontend_config(reader(keys))
    assert info.value.err == err, why
