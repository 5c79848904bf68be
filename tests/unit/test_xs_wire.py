"""The xs_wire codec: whole and byte-at-a-time feeding, limits, unknown ops."""

import pytest

from xenbed.protocols.xs_wire import (
    HEADER, PAYLOAD_MAX, Op, Packet, PacketReader, WireProtocolError, error_payload,
    join_strings, split_strings, watch_event,
)

PACKETS = [
    Packet(Op.READ, 1, 0, b"/local/domain/0/name\0"),
    Packet(Op.WRITE, 2, 7, b"/a\0binary\0value"),
    Packet(Op.TRANSACTION_START, 3, 0, b"\0"),
    Packet(Op.DIRECTORY, 4, 0, b""),
    Packet(Op.WRITE, 5, 0, b"/big\0" + b"x" * (PAYLOAD_MAX - 5)),
]
STREAM = b"".join(p.encode() for p in PACKETS)


def test_whole_stream():
    r = PacketReader()
    r.feed(STREAM)
    assert list(r) == PACKETS
    assert r.buffered == 0


def test_byte_at_a_time():
    r = PacketReader()
    out = []
    for i in range(len(STREAM)):
        r.feed(STREAM[i : i + 1])
        out.extend(r)
    assert out == PACKETS


def test_oversize_header_raises():
    r = PacketReader()
    r.feed(HEADER.pack(Op.WRITE, 1, 0, PAYLOAD_MAX + 1))
    with pytest.raises(WireProtocolError):
        r.next_packet()


def test_oversize_encode_is_caller_error():
    with pytest.raises(ValueError):
        Packet(Op.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1)).encode()


def test_unknown_op_survives():
    r = PacketReader()
    r.feed(Packet(0xFFFF, 9, 0, b"zz").encode() + Packet(20, 10, 0, b"").encode())
    a, b = list(r)
    assert (a.op, a.req_id, a.payload) == (0xFFFF, 9, b"zz")
    assert b.op == 20 and b.op_name == "UNKNOWN(20)"


def test_helpers():
    assert split_strings(b"a\0b\0") == ["a", "b"]
    assert split_strings(b"") == []
    assert join_strings("a", "b") == b"a\0b\0"
    assert error_payload("ENOENT") == b"ENOENT\0"
    with pytest.raises(ValueError):
        error_payload("EWHAT")
    ev = watch_event("/a", "tok")
    assert (ev.op, ev.req_id, ev.tx_id, ev.payload) == (Op.WATCH_EVENT, 0, 0, b"/a\0tok\0")
    assert Packet(Op.READ, 3, 4, b"").error_reply("EACCES").error_name() == "EACCES"
