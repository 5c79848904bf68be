"""Frames of the hypervisor socket (pure)."""

import pytest

from xenbed.protocols import hypercall as hc


def test_round_trip_whole_and_byte_by_byte():
    frames = [hc.call(hc.Call.HELLO, 1, {"credential": "x"}), hc.upcall(hc.Call.UP_XENSTORE_READY)]
    data = b"".join(f.encode() for f in frames)
    for chunk in (len(data), 1):
        reader = hc.FrameReader()
        out = []
        for i in range(0, len(data), chunk):
            reader.feed(data[i:i + chunk])
            while (f := reader.next_frame()) is not None:
                out.append(f)
        assert [(f.op, f.seq, f.body) for f in out] == [(f.op, f.seq, f.body) for f in frames]


def test_descriptors_are_handed_to_the_frame_that_carries_them():
    frame = hc.call(hc.Call.XS_ADOPT, 7, fds=[42])
    assert frame.flags & hc.Flag.CARRIES_FDS and frame.body["nfds"] == 1
    reader = hc.FrameReader()
    plain = hc.call(hc.Call.PING, 6).encode()
    reader.feed(plain)
    reader.feed(frame.encode(), [42])
    assert reader.next_frame().fds == []
    assert reader.next_frame().fds == [42]


def test_a_frame_claiming_descriptors_that_never_came_is_a_protocol_error():
    reader = hc.FrameReader()
    reader.feed(hc.call(hc.Call.XS_ADOPT, 7, fds=[1]).encode())  # no fds attached
    with pytest.raises(hc.FrameProtocolError):
        reader.next_frame()


@pytest.mark.parametrize("raw", [
    hc.FRAME_HEADER.pack(hc.BODY_MAX + 1, 1, 0, 1),
    hc.FRAME_HEADER.pack(3, 1, 0, 1) + b"{x}",
    hc.FRAME_HEADER.pack(2, 1, 0, 1) + b"[]",
])
def test_malformed_frames_raise_the_peer_error(raw):
    reader = hc.FrameReader()
    reader.feed(raw)
    with pytest.raises(hc.FrameProtocolError):
        reader.next_frame()


def test_error_replies_echo_op_and_seq():
    req = hc.call(hc.Call.DOMAIN_CREATE, 9, {"name": "x"})
    err = hc.error(req, "EPERM", "no")
    assert (err.op, err.seq, err.body["error"]) == (hc.Call.DOMAIN_CREATE, 9, "EPERM")
    assert err.flags & hc.Flag.ERROR and err.flags & hc.Flag.REPLY
