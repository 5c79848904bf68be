"""blkif and netif ring message codecs, pure (their C view is in test_abi_conformance)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenbed.protocols import blkif, netif
from xenbed.protocols.blkif import (
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    Segment,
    decode_request,
)
from xenbed.protocols.netif import (
    ExtraGso,
    ExtraHash,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenbed.protocols.ring import MalformedMessage, MalformedRequest, MalformedResponse

u8, u16, u32, u64 = (st.integers(0, 2**bits - 1) for bits in (8, 16, 32, 64))
i16 = st.integers(-(2**15), 2**15 - 1)
segments = st.builds(Segment, u32, u8, u8)


@st.composite
def blkif_requests(draw):
    segs = tuple(draw(st.lists(segments, max_size=blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST)))
    operation = draw(u8.filter(lambda op: op not in (blkif.BLKIF_OP_DISCARD, blkif.BLKIF_OP_INDIRECT)))
    return BlkifRequest(operation, draw(u16), draw(u64), draw(u64), segs)


@st.composite
def indirect_requests(draw):
    nr_segments = draw(st.integers(0, 2**16 - 1))
    pages = min(blkif.indirect_pages_needed(nr_segments), blkif.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
    grefs = tuple(draw(st.lists(u32, min_size=pages, max_size=pages)))
    return BlkifRequestIndirect(draw(u8), nr_segments, draw(u16), draw(u64), draw(u64), grefs)


MESSAGES = {
    BlkifRequest: blkif_requests(),
    BlkifRequestDiscard: st.builds(BlkifRequestDiscard, u16, u64, u64, u64, u8),
    BlkifRequestIndirect: indirect_requests(),
    BlkifResponse: st.builds(BlkifResponse, u64, u8, i16),
    NetifTxRequest: st.builds(NetifTxRequest, u32, u16, u16, u16, u16),
    NetifTxResponse: st.builds(NetifTxResponse, u16, i16),
    NetifRxRequest: st.builds(NetifRxRequest, u16, u32),
    NetifRxResponse: st.builds(NetifRxResponse, u16, u16, u16, i16),
    NetifExtraInfo: st.builds(NetifExtraInfo, u8, u8, st.binary(min_size=6, max_size=6)),
}


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_encode_is_exactly_the_struct_size_and_decodes_back(cls, data):
    message = data.draw(MESSAGES[cls])
    encoded = message.encode()
    assert len(encoded) == cls.SIZE
    assert cls.decode(encoded) == message
    assert cls.decode(encoded + b"trailing slot bytes") == message  # a ring slot can be larger


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
@given(data=st.binary(max_size=130))
def test_decode_of_any_bytes_parses_or_raises_only_malformed(cls, data):
    try:
        message = cls.decode(data)
    except MalformedMessage:
        assert len(data) < cls.SIZE
    else:
        assert len(data) >= cls.SIZE
        assert isinstance(message, cls)


def test_short_input_raises_the_direction_specific_error():
    with pytest.raises(MalformedRequest):
        BlkifRequest.decode(bytes(111))
    with pytest.raises(MalformedResponse):
        BlkifResponse.decode(bytes(15))
    with pytest.raises(MalformedRequest):
        NetifTxRequest.decode(b"")
    with pytest.raises(MalformedResponse):
        NetifRxResponse.decode(bytes(7))
    with pytest.raises(MalformedRequest):
        decode_request(b"")


@given(data=st.binary(max_size=blkif.RING_ENTRY_SIZE + 8))
def test_decode_request_of_any_slot_parses_or_raises_malformed(data):
    try:
        request = decode_request(data)
    except MalformedRequest:
        return
    assert request.operation == data[0]


def test_decode_request_dispatches_on_the_operation_byte():
    discard = BlkifRequestDiscard(handle=1, id=2, sector_number=3, nr_sectors=4)
    indirect = BlkifRequestIndirect(blkif.BLKIF_OP_WRITE, 513, 1, 2, 3, (10, 11))
    read = BlkifRequest(blkif.BLKIF_OP_READ, 1, 2, 3, (Segment(9, 0, 7),))
    unknown = BlkifRequest(0x7F, 1, 2, 3)
    slot = bytes(blkif.RING_ENTRY_SIZE)
    for request in (discard, indirect, read, unknown):
        entry = request.encode() + slot[request.SIZE :]
        assert decode_request(entry) == request


def test_a_frontend_claiming_more_segments_than_fit_keeps_its_claim_visible():
    encoded = bytearray(BlkifRequest(blkif.BLKIF_OP_WRITE, 0, 1, 0, (Segment(5, 0, 7),) * 11).encode())
    encoded[1] = 200  # nr_segments
    request = BlkifRequest.decode(bytes(encoded))
    assert request.nr_segments == 200 and len(request.segments) == 11  # the backend must refuse it


def test_decoded_segments_and_grefs_follow_the_count_fields():
    request = BlkifRequest.decode(BlkifRequest(0, 0, 0, 0, (Segment(1, 0, 7),) * 11, nr_segments=2).encode())
    assert len(request.segments) == 2
    indirect = BlkifRequestIndirect.decode(BlkifRequestIndirect(0, 1025, 0, 0, 0, (1, 2, 3, 4)).encode())
    assert indirect.indirect_grefs == (1, 2, 3)  # 1025 segments need 3 pages of 512


def test_fields_out_of_range_are_caller_errors():
    with pytest.raises(ValueError):
        BlkifResponse(id=2**64, operation=0, status=0).encode()
    with pytest.raises(ValueError):
        NetifTxResponse(id=1, status=2**15).encode()
    with pytest.raises(ValueError):
        BlkifRequest(0, 0, 0, 0, (Segment(1, 0, 7),) * 12)
    with pytest.raises(ValueError):
        BlkifRequestIndirect(0, 0, 0, 0, 0, tuple(range(9)))


def test_blkif_constants_and_geometry():
    assert blkif.PROTOCOL == "x86_64-abi"
    assert (blkif.SECTOR_SIZE, blkif.SECTORS_PER_PAGE) == (512, 8)
    assert blkif.SEGMENTS_PER_INDIRECT_PAGE == 512
    assert blkif.MAX_INDIRECT_SEGMENTS == 4096
    assert [blkif.indirect_pages_needed(n) for n in (0, 1, 512, 513, 4096)] == [0, 1, 1, 2, 8]
    assert [blkif.blkif_ring_size(order) for order in range(4)] == [32, 64, 128, 256]
    assert Segment(1, 2, 7).nr_sectors == 6


def test_indirect_page_round_trip():
    segs = tuple(Segment(100 + i, i % 8, 7) for i in range(512))
    page = blkif.encode_indirect_page(segs)
    assert len(page) == 4096
    assert blkif.decode_indirect_page(page, 512) == segs
    assert blkif.decode_indirect_page(blkif.encode_indirect_page(segs[:3]), 3) == segs[:3]
    with pytest.raises(MalformedRequest):
        blkif.decode_indirect_page(page[:100], 13)
    with pytest.raises(ValueError):
        blkif.encode_indirect_page(segs + segs[:1])


def test_netif_ring_geometry():
    assert (netif.TX_RING_ENTRY_SIZE, netif.RX_RING_ENTRY_SIZE) == (12, 8)
    assert [netif.tx_ring_size(o) for o in range(3)] == [256, 512, 1024]
    assert [netif.rx_ring_size(o) for o in range(3)] == [256, 512, 1024]


def test_extra_info_union_views():
    gso = NetifExtraInfo.for_gso(ExtraGso(1448, netif.XEN_NETIF_GSO_TYPE_TCPV4), flags=netif.XEN_NETIF_EXTRA_FLAG_MORE)
    assert gso.encode() == bytes([1, 1]) + (1448).to_bytes(2, "little") + bytes([1, 0, 0, 0])
    assert NetifExtraInfo.decode(gso.encode()).gso() == ExtraGso(1448, 1, 0)
    assert gso.more
    mac = bytes.fromhex("01005e000001")
    assert NetifExtraInfo.for_mcast(True, mac).encode() == bytes([2, 0]) + mac
    assert NetifExtraInfo.for_mcast(False, mac).type == netif.XEN_NETIF_EXTRA_TYPE_MCAST_DEL
    hashed = NetifExtraInfo.for_hash(ExtraHash(1, 1, b"\x01\x02\x03\x04"))
    assert hashed.encode() == bytes([4, 0, 1, 1, 1, 2, 3, 4])
    assert hashed.hash() == ExtraHash(1, 1, b"\x01\x02\x03\x04")


# --- every field is where FIELDS says (and FIELDS is checked against C) -------


def _ones(size: int) -> int:
    return 2 ** (8 * size) - 1


def _field_setters():
    """For each C field name, a message whose only non-zero bytes are that field's."""
    full = Segment(_ones(4), _ones(1), _ones(1))
    return {
        "blkif_request_segment.gref": Segment(_ones(4), 0, 0),
        "blkif_request_segment.first_sect": Segment(0, 255, 0),
        "blkif_request_segment.last_sect": Segment(0, 0, 255),
        "blkif_request.operation": BlkifRequest(255, 0, 0, 0),
        "blkif_request.nr_segments": BlkifRequest(0, 0, 0, 0, nr_segments=255),
        "blkif_request.handle": BlkifRequest(0, _ones(2), 0, 0),
        "blkif_request.id": BlkifRequest(0, 0, _ones(8), 0),
        "blkif_request.sector_number": BlkifRequest(0, 0, 0, _ones(8)),
        "blkif_request.seg": BlkifRequest(0, 0, 0, 0, (full,) * 11, nr_segments=0),
        "blkif_request_discard.flag": BlkifRequestDiscard(0, 0, 0, 0, flag=255),
        "blkif_request_discard.handle": BlkifRequestDiscard(_ones(2), 0, 0, 0),
        "blkif_request_discard.id": BlkifRequestDiscard(0, _ones(8), 0, 0),
        "blkif_request_discard.sector_number": BlkifRequestDiscard(0, 0, _ones(8), 0),
        "blkif_request_discard.nr_sectors": BlkifRequestDiscard(0, 0, 0, _ones(8)),
        "blkif_request_indirect.indirect_op": BlkifRequestIndirect(255, 0, 0, 0, 0),
        "blkif_request_indirect.nr_segments": BlkifRequestIndirect(0, _ones(2), 0, 0, 0),
        "blkif_request_indirect.handle": BlkifRequestIndirect(0, 0, _ones(2), 0, 0),
        "blkif_request_indirect.id": BlkifRequestIndirect(0, 0, 0, _ones(8), 0),
        "blkif_request_indirect.sector_number": BlkifRequestIndirect(0, 0, 0, 0, _ones(8)),
        "blkif_request_indirect.indirect_grefs": BlkifRequestIndirect(0, 0, 0, 0, 0, (_ones(4),) * 8),
        "blkif_response.id": BlkifResponse(_ones(8), 0, 0),
        "blkif_response.operation": BlkifResponse(0, 255, 0),
        "blkif_response.status": BlkifResponse(0, 0, -1),
        "netif_tx_request.gref": NetifTxRequest(_ones(4), 0, 0, 0, 0),
        "netif_tx_request.offset": NetifTxRequest(0, _ones(2), 0, 0, 0),
        "netif_tx_request.flags": NetifTxRequest(0, 0, _ones(2), 0, 0),
        "netif_tx_request.id": NetifTxRequest(0, 0, 0, _ones(2), 0),
        "netif_tx_request.size": NetifTxRequest(0, 0, 0, 0, _ones(2)),
        "netif_tx_response.id": NetifTxResponse(_ones(2), 0),
        "netif_tx_response.status": NetifTxResponse(0, -1),
        "netif_rx_request.id": NetifRxRequest(_ones(2), 0),
        "netif_rx_request.gref": NetifRxRequest(0, _ones(4)),
        "netif_rx_response.id": NetifRxResponse(_ones(2), 0, 0, 0),
        "netif_rx_response.offset": NetifRxResponse(0, _ones(2), 0, 0),
        "netif_rx_response.flags": NetifRxResponse(0, 0, _ones(2), 0),
        "netif_rx_response.status": NetifRxResponse(0, 0, 0, -1),
        "netif_extra_info.type": NetifExtraInfo(255, 0),
        "netif_extra_info.flags": NetifExtraInfo(0, 255),
        "netif_extra_info.u": NetifExtraInfo(0, 0, b"\xff" * 6),
        "netif_extra_info.u.gso.size": NetifExtraInfo(0, 0, NetifExtraInfo.for_gso(ExtraGso(_ones(2), 0)).union_bytes),
        "netif_extra_info.u.gso.type": NetifExtraInfo(0, 0, NetifExtraInfo.for_gso(ExtraGso(0, 255)).union_bytes),
        "netif_extra_info.u.gso.features": NetifExtraInfo(
            0, 0, NetifExtraInfo.for_gso(ExtraGso(0, 0, _ones(2))).union_bytes
        ),
        "netif_extra_info.u.mcast.addr": NetifExtraInfo(0, 0, NetifExtraInfo.for_mcast(True, b"\xff" * 6).union_bytes),
        "netif_extra_info.u.hash.type": NetifExtraInfo(0, 0, NetifExtraInfo.for_hash(ExtraHash(255, 0, bytes(4))).union_bytes),
        "netif_extra_info.u.hash.algorithm": NetifExtraInfo(
            0, 0, NetifExtraInfo.for_hash(ExtraHash(0, 255, bytes(4))).union_bytes
        ),
        "netif_extra_info.u.hash.value": NetifExtraInfo(
            0, 0, NetifExtraInfo.for_hash(ExtraHash(0, 0, b"\xff" * 4)).union_bytes
        ),
    }


# Fields whose value the codec fixes (the discriminating operation byte, padding).
FIXED_FIELDS = {
    "blkif_request_discard.operation",
    "blkif_request_indirect.operation",
    "netif_rx_request.pad",
}


@pytest.mark.parametrize("name", sorted({**blkif.FIELDS, **netif.FIELDS}.keys() - FIXED_FIELDS))
def test_the_codec_writes_each_field_exactly_where_fields_says(name):
    offset, size = {**blkif.FIELDS, **netif.FIELDS}[name]
    encoded = _field_setters()[name].encode()
    set_bytes = [i for i, byte in enumerate(encoded) if byte]
    if name.startswith(("blkif_request_discard.", "blkif_request_indirect.")):
        set_bytes.remove(0)  # their operation byte is always set
    if name == "blkif_request.seg":  # an array of padded structs: its span, not every byte
        assert set_bytes[0] == offset and set_bytes[-1] < offset + size
    else:
        assert set_bytes == list(range(offset, offset + size))


def test_fixed_fields_hold_their_fixed_values():
    assert BlkifRequestDiscard(0, 0, 0, 0).encode()[0] == blkif.BLKIF_OP_DISCARD
    assert BlkifRequestIndirect(0, 0, 0, 0, 0).encode()[0] == blkif.BLKIF_OP_INDIRECT
    assert NetifRxRequest(0, 0).encode()[2:4] == b"\0\0"
