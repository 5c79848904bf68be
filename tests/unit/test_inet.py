"""protocols/inet.py: the L4 checksum both ends of a vif fill, with VLAN tags
and IP fragments (no Docker)."""

from __future__ import annotations

import struct

from xenbed.protocols.inet import complete_checksum, fill_checksum, inet_checksum, tcp_payload_length

MACS = bytes.fromhex("ffffffffffff00163e000001")
SRC4, DST4 = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def _ipv4(proto: int, l4: bytes, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0, SRC4, DST4) + l4


def _udp(payload: bytes = b"hello") -> bytes:
    return struct.pack("!HHHH", 1234, 53, 8 + len(payload), 0) + payload


def _tcp(payload: bytes = b"payload", doff: int = 5) -> bytes:
    options = bytes((doff - 5) * 4)
    return struct.pack("!HHIIBBHHH", 80, 443, 1, 0, doff << 4, 0x18, 65535, 0, 0) + options + payload


def _eth(l3: bytes, vlan: int | None = None, ethertype: int = 0x0800) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return MACS + tag + struct.pack("!H", ethertype) + l3


def _verifies4(frame: bytes, l4_at: int, proto: int) -> bool:
    seg = frame[l4_at:]
    return inet_checksum(SRC4, DST4, bytes([0, proto]), struct.pack("!H", len(seg)), seg) == 0


def test_udp_and_tcp_over_ipv4_are_filled():
    for proto, l4 in ((17, _udp()), (6, _tcp())):
        frame = bytearray(_eth(_ipv4(proto, l4)))
        assert fill_checksum(frame)
        assert _verifies4(bytes(frame), 34, proto)


def test_a_vlan_tagged_frame_is_filled_past_the_tag():
    for proto, l4 in ((17, _udp()), (6, _tcp())):
        frame = bytearray(_eth(_ipv4(proto, l4), vlan=42))
        assert fill_checksum(frame)
        assert _verifies4(bytes(frame), 38, proto)
        assert frame[:38] == _eth(_ipv4(proto, l4), vlan=42)[:38]  # headers untouched


def test_a_vlan_tagged_ipv6_frame_is_filled():
    tcp = _tcp()
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    ip6 = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst
    frame = bytearray(_eth(ip6 + tcp, vlan=7, ethertype=0x86DD))
    assert fill_checksum(frame)
    seg = bytes(frame[58:])
    assert inet_checksum(src, dst, struct.pack("!I", len(seg)), bytes([0, 0, 0, 6]), seg) == 0


def test_fragments_are_never_touched():
    # a non-first fragment has no L4 header: its first bytes are payload
    later = _eth(_ipv4(17, b"\xaa" * 16, frag=185))
    # a first fragment (MF) has one, but the checksum covers the whole datagram
    first = _eth(_ipv4(17, _udp(b"x" * 32), frag=0x2000))
    for frame in (later, first, _eth(_ipv4(17, b"\xaa" * 16, frag=185), vlan=3)):
        buf = bytearray(frame)
        assert not fill_checksum(buf)
        assert buf == frame
        assert complete_checksum(frame) == frame


def test_tcp_payload_length_with_vlan_options_and_fragments():
    assert tcp_payload_length(_eth(_ipv4(6, _tcp(b"x" * 100)))) == 100
    assert tcp_payload_length(_eth(_ipv4(6, _tcp(b"x" * 100, doff=8)), vlan=5)) == 100
    udp = _eth(_ipv4(17, _udp()))
    assert tcp_payload_length(udp) == len(udp)
    later = _eth(_ipv4(6, b"x" * 40, frag=10))
    assert tcp_payload_length(later) == len(later)  # no TCP header in it


def test_padding_past_the_ip_packet_is_not_summed():
    frame = bytearray(_eth(_ipv4(17, _udp(b"hi"))) + bytes(20))  # padded to the minimum
    assert fill_checksum(frame)
    assert _verifies4(bytes(frame[:34 + 10]), 34, 17)


def test_other_frames_are_refused():
    arp = MACS + b"\x08\x06" + bytes(28)
    icmp = _eth(_ipv4(1, bytes(8)))
    for frame in (arp, icmp, b"short", MACS + b"\x81\x00"):
        buf = bytearray(frame)
        assert not fill_checksum(buf) and buf == frame
