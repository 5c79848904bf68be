"""Binary frames and the batched grant ops: the codec (whole and byte by
byte), the hypervisor's handlers with real page files, and the guest's
GrantTable driving them through an in-process link (no Docker, no sockets)."""

import mmap
import os
import struct

import pytest

from xenbed.drivers.xen.gnttab import CopyOp, GrantError, GrantRef, GrantTable, LocalFrame
from xenbed.drivers.xen.hypercall import HypercallError
from xenbed.hypervisor import gnttab as gt
from xenbed.hypervisor.domains import DomainError
from xenbed.hypervisor.sharing import Sharing
from xenbed.protocols import gntbatch as gb
from xenbed.protocols import hypercall as hc

from .test_sharing import FakeDomain, Link, call, world  # noqa: F401  (the fixture)


# -- frames ---------------------------------------------------------------------------
def _frames_of(data: bytes, fds=(), chunk=None):
    reader = hc.FrameReader()
    out = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for i, piece in enumerate(pieces):
        reader.feed(piece, list(fds) if i == 0 else None)
        while (frame := reader.next_frame()) is not None:
            out.append(frame)
    return out


@pytest.mark.parametrize("chunk", [None, 1])
def test_binary_frames_round_trip_whole_and_byte_by_byte(chunk):
    body = gb.encode_map([(1, 8, True), (2, 9, False)])
    plain = hc.call(hc.Call.GNTTAB_MAP_BATCH, 7, body)
    r, w = os.pipe()
    try:
        with_fds = hc.reply(plain, b"\x01\x02\x03", [r, w])
        json_frame = hc.call(hc.Call.PING, 8, {})
        data = plain.encode() + with_fds.encode() + json_frame.encode()
        got = _frames_of(data, [r, w], chunk)
    finally:
        os.close(r)
        os.close(w)
    assert [f.flags for f in got] == [hc.BINARY, hc.REPLY | hc.BINARY | hc.CARRIES_FDS, 0]
    assert got[0].body == body and got[0].fds == []
    assert got[1].body == b"\x01\x02\x03" and got[1].fds == [r, w]
    assert got[2].body == {}
    # the descriptor count comes first in a binary body with descriptors
    assert with_fds.encode()[hc.FRAME_HEADER.size:hc.FRAME_HEADER.size + 4] == struct.pack("<I", 2)


@pytest.mark.parametrize("raw", [
    hc.FRAME_HEADER.pack(2, 47, hc.BINARY | hc.CARRIES_FDS, 1) + b"\0\0",  # no room for the count
    hc.FRAME_HEADER.pack(4, 47, hc.BINARY | hc.CARRIES_FDS, 1) + struct.pack("<I", 3),  # fds never came
    hc.FRAME_HEADER.pack(4, 47, hc.BINARY | hc.CARRIES_FDS, 1) + struct.pack("<I", 0),
])
def test_broken_binary_framing_is_a_protocol_error(raw):
    with pytest.raises(hc.FrameProtocolError):
        _frames_of(raw)


def test_batch_codec_round_trips_and_refuses_what_does_not_fit():
    assert gb.decode_map(gb.encode_map([(3, 9, True)])) == [(3, gb.GNTMAP_host_map | gb.GNTMAP_readonly, 9)]
    results = [(0, 4, 17), (gt.GNTST_bad_gntref, 0, 0)]
    assert gb.decode_map_results(gb.encode_map_results(results)) == results
    assert gb.decode_unmap(gb.encode_unmap([5, 6])) == [5, 6]
    assert gb.decode_statuses(gb.encode_statuses([0, -12])) == [0, -12]
    op = (8, 1, 100, 3, gb.DOMID_SELF, 0, 4096, gb.GNTCOPY_source_gref)
    assert gb.decode_copy(gb.encode_copy([op])) == [op]
    for bad in (b"", b"\0\0\0", struct.pack("<I", 0), struct.pack("<I", 2) + b"\0" * 4,
                struct.pack("<I", 1) + b"\0" * 5, struct.pack("<I", gb.MAX_BATCH + 1) + b"\0" * 4 * (gb.MAX_BATCH + 1)):
        with pytest.raises(gb.BatchError):
            gb.decode_unmap(bad)
    with pytest.raises(gb.BatchError):
        gb.decode_map(struct.pack("<I", gb.MAX_MAP_BATCH + 1) + b"\0" * 8 * (gb.MAX_MAP_BATCH + 1))
    with pytest.raises(gb.BatchError):
        gb.encode_map([(1, -1, False)])
    with pytest.raises(gb.BatchError):
        gb.encode_unmap([])


# -- the hypervisor's handlers --------------------------------------------------------
def _pages(sharing, link, count):
    reply = call(sharing, link, hc.Call.MEM_ALLOC, count=count)
    views = [mmap.mmap(fd, 4096) for fd in reply.fds]
    for fd in reply.fds:
        os.close(fd)
    return reply.body["gfns"], views


def _grant(sharing, link, to, gfn, readonly=False):
    return call(sharing, link, hc.Call.GNTTAB_GRANT, domid=to, gfn=gfn, readonly=readonly)["gref"]


def _binary(sharing, link, op, body):
    return Sharing.HANDLERS[op](sharing, link, hc.call(op, 1, body))


def test_a_map_batch_maps_each_entry_on_its_own(world):
    sharing, links = world
    gfns, views = _pages(sharing, links[1], 3)
    views[0][:3], views[1][:3] = b"one", b"two"
    rw, ro = _grant(sharing, links[1], 2, gfns[0]), _grant(sharing, links[1], 2, gfns[1], readonly=True)
    to_dom0 = _grant(sharing, links[1], 0, gfns[2])
    reply = _binary(sharing, links[2], hc.Call.GNTTAB_MAP_BATCH, gb.encode_map(
        [(1, rw, False), (1, to_dom0, False), (1, ro, False), (1, ro, True), (1, 4000, True)]))
    results = gb.decode_map_results(reply.body)
    assert [r[0] for r in results] == [gt.GNTST_okay, gt.GNTST_general_error, gt.GNTST_general_error,
                                       gt.GNTST_okay, gt.GNTST_bad_gntref]
    assert len(reply.fds) == 2 and not reply.owned  # the hypervisor keeps its descriptors
    assert results[0][2] == gfns[0] and results[3][2] == gfns[1]
    writable = mmap.mmap(reply.fds[0], 4096)
    assert writable[:3] == b"one"
    with pytest.raises(PermissionError):  # the read-only grant's descriptor is read-only
        mmap.mmap(reply.fds[1], 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    assert mmap.mmap(reply.fds[1], 4096, prot=mmap.PROT_READ)[:3] == b"two"
    assert links[2].resources.mappings == {results[0][1], results[3][1]}
    with pytest.raises(DomainError) as refused:
        call(sharing, links[1], hc.Call.GNTTAB_END, gref=rw)
    assert refused.value.code == "GNTST_eagain"
    statuses = gb.decode_statuses(_binary(sharing, links[2], hc.Call.GNTTAB_UNMAP_BATCH,
                                          gb.encode_unmap([results[0][1], 999, results[3][1]])))
    assert statuses == [gt.GNTST_okay, gt.GNTST_bad_handle, gt.GNTST_okay]
    assert not links[2].resources.mappings
    call(sharing, links[1], hc.Call.GNTTAB_END, gref=rw)
    sharing.gnttab.check_invariants()


def test_a_copy_batch_copies_what_it_may_and_says_why_not_the_rest(world):
    sharing, links = world
    theirs, their_views = _pages(sharing, links[1], 2)
    mine, my_views = _pages(sharing, links[2], 2)
    their_views[0][:4096] = bytes(range(256)) * 16
    gref = _grant(sharing, links[1], 2, theirs[0], readonly=True)
    ops = [(gref, 1, 0, mine[0], gb.DOMID_SELF, 0, 4096, gb.GNTCOPY_source_gref),       # grant -> mine
           (mine[0], gb.DOMID_SELF, 0, gref, 1, 0, 16, gb.GNTCOPY_dest_gref),         # into a r/o grant
           (gref, 1, 100, mine[1], gb.DOMID_SELF, 4000, 200, gb.GNTCOPY_source_gref),  # beyond the page
           (theirs[1], 1, 0, mine[1], gb.DOMID_SELF, 0, 1, 0),                         # a foreign frame
           (gref, 1, 10, mine[1], gb.DOMID_SELF, 20, 5, gb.GNTCOPY_source_gref)]
    statuses = gb.decode_statuses(_binary(sharing, links[2], hc.Call.GNTTAB_COPY_BATCH, gb.encode_copy(ops)))
    assert statuses == [gt.GNTST_okay, gt.GNTST_general_error, gt.GNTST_bad_copy_arg,
                        gt.GNTST_permission_denied, gt.GNTST_okay]
    assert my_views[0][:4096] == bytes(range(256)) * 16
    assert my_views[1][20:25] == bytes(range(10, 15)) and my_views[1][:20] == bytes(20)
    # the JSON copy takes the same path
    reply = call(sharing, links[2], hc.Call.GNTTAB_COPY, ops=[
        {"src": {"domid": 1, "gref": gref, "offset": 1}, "dst": {"gfn": mine[1], "offset": 0}, "len": 2}])
    assert reply == {"statuses": [gt.GNTST_okay]} and my_views[1][:2] == b"\x01\x02"


def test_freed_pages_are_not_served_from_the_caches(world):
    sharing, links = world
    mine, views = _pages(sharing, links[2], 1)
    views[0][:2] = b"hi"
    assert sharing.memory.read(2, mine[0], 0, 2) == b"hi"  # now cached
    call(sharing, links[2], hc.Call.MEM_FREE, gfns=mine)
    again, fresh = _pages(sharing, links[2], 1)
    assert again == mine and sharing.memory.read(2, mine[0], 0, 2) == b"\0\0"
    fresh[0][:2] = b"yo"
    assert sharing.memory.read(2, mine[0], 0, 2) == b"yo"


@pytest.mark.parametrize("op, body", [
    (hc.Call.GNTTAB_MAP_BATCH, struct.pack("<I", 1) + b"\0" * 7),
    (hc.Call.GNTTAB_UNMAP_BATCH, struct.pack("<I", gb.MAX_BATCH + 1) + b"\0" * 4 * (gb.MAX_BATCH + 1)),
    (hc.Call.GNTTAB_COPY_BATCH, b""),
])
def test_malformed_batches_are_refused_with_einval(world, op, body):
    sharing, links = world
    with pytest.raises(ValueError):  # the server answers EINVAL for ValueError
        _binary(sharing, links[2], op, body)


# -- the guest's client, through an in-process link -------------------------------------
class InProcessLink:
    """What HypervisorLink does, minus the socket: frames are encoded,
    parsed back and handled by Sharing; the reply's descriptors are
    duplicated, as SCM_RIGHTS would."""

    def __init__(self, sharing, link):
        self.sharing, self.link = sharing, link

    def call_with_fds(self, op, body=None, fds=None):
        [frame] = _frames_of(hc.call(op, 1, body, fds).encode())
        if bool(frame.flags & hc.BINARY) != (frame.op in hc.BINARY_CALLS):
            raise HypercallError(hc.Call(op).name, "EINVAL", "wrong kind of body")
        try:
            result = Sharing.HANDLERS[op](self.sharing, self.link, frame)
        except DomainError as exc:
            raise HypercallError(hc.Call(op).name, exc.code, exc.message) from None
        body, fds = (result.body, result.fds) if hasattr(result, "fds") else (result, [])
        [answer] = _frames_of(hc.reply(frame, body, fds).encode(), fds)
        return answer.body, [os.dup(fd) for fd in answer.fds]

    def call(self, op, body=None, fds=None):
        body, fds = self.call_with_fds(op, body, fds)
        hc.close_fds(fds)
        return body


def test_the_guest_maps_unmaps_and_copies_in_batches(world):
    sharing, links = world
    gfns, views = _pages(sharing, links[1], 2)
    views[0][:5], views[1][:5] = b"alpha", b"bravo"
    granter = GrantTable(InProcessLink(sharing, links[1]))
    rw, ro = granter.grant(2, gfns[0]), granter.grant(2, gfns[1], readonly=True)
    client = GrantTable(InProcessLink(sharing, links[2]))
    maps = client.map_batch([(1, rw, False), (1, ro, False), (1, ro, True)] + [(1, rw, True), (1, ro, True)] * 100)
    assert isinstance(maps[1], GrantError) and maps[1].status == "GNTST_general_error"
    assert maps[0].mmap[:5] == b"alpha" and maps[2].mmap[:5] == b"bravo"
    with pytest.raises(TypeError):
        maps[2].mmap[:1] = b"X"  # a read-only Mapping
    maps[0].mmap[:1] = b"A"
    assert views[0][:5] == b"Alpha"
    mapped = [m for m in maps if not isinstance(m, GrantError)]
    assert len(mapped) == 202  # split over two calls
    assert client.unmap_batch(mapped) == ["GNTST_okay"] * 202
    with pytest.raises(GrantError) as again:
        client.unmap_handle(mapped[0].handle)
    assert again.value.status == "GNTST_bad_handle"
    single = client.map(1, ro, readonly=True)
    client.unmap(single)
    with pytest.raises(GrantError):
        client.map(1, ro)
    mine, my_views = _pages(sharing, links[2], 1)
    ops = [CopyOp(GrantRef(1, ro, 0), LocalFrame(mine[0], 0), 5), CopyOp(LocalFrame(mine[0], 0), GrantRef(1, ro, 0), 5)]
    assert client.copy(ops, check=False) == ["GNTST_okay", "GNTST_general_error"]
    assert my_views[0][:5] == b"bravo"
    with pytest.raises(GrantError):
        client.copy(ops)
    assert client.copy([]) == []
    granter.end(rw)
    sharing.gnttab.check_invariants()
