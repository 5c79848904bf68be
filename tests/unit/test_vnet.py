"""protocols/vnet.py: virtio_net_hdr <-> netif offloads (checksum flags, GSO
extra), whole and malformed (no Docker)."""

from __future__ import annotations

import struct

import pytest

from xenbed.protocols.inet import inet_checksum, ones_complement_sum
from xenbed.protocols.netif import (
    NETRXF_csum_blank, NETRXF_data_validated, NETTXF_csum_blank, NETTXF_data_validated, XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, ExtraGso, NetifExtraInfo,
)
from xenbed.protocols.vnet import (
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VNET_HDR_LEN, BadOffload, Offload, VnetHdr, checksum_setup,
    settle_checksum, split_vnet,
)

from .test_inet import DST4, SRC4, _eth, _ipv4, _tcp, _udp

SRC6, DST6 = bytes(15) + b"\x01", bytes(15) + b"\x02"


def _ipv6(proto: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + SRC6 + DST6 + l4


def tcp4(payload: bytes = b"x" * 3000) -> bytearray:
    return bytearray(_eth(_ipv4(6, _tcp(payload))))


def tcp6(payload: bytes = b"y" * 3000) -> bytearray:
    return bytearray(_eth(_ipv6(6, _tcp(payload)), ethertype=0x86DD))


def test_header_round_trips_and_is_ten_bytes():
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    raw = hdr.encode()
    assert len(raw) == VNET_HDR_LEN == 10
    assert raw == struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)
    assert VnetHdr.decode(raw) == hdr
    got, frame = split_vnet(raw + b"frame")
    assert got == hdr and bytes(frame) == b"frame"


@pytest.mark.parametrize("raw", [b"", b"\x01", bytes(9)])
def test_short_header_is_rejected_cleanly(raw):
    with pytest.raises(BadOffload):
        VnetHdr.decode(raw)
    with pytest.raises(BadOffload):
        split_vnet(raw)


def test_checksum_setup_writes_the_pseudo_header_sum():
    frame = tcp4()
    proto, start, offset = checksum_setup(frame)
    assert (proto, start, offset) == (6, 34, 16)
    l4_len = len(frame) - 34
    pseudo = SRC4 + DST4 + struct.pack("!BBH", 0, 6, l4_len)
    assert struct.unpack_from("!H", frame, 50)[0] == ones_complement_sum(pseudo)
    # finishing it as the kernel does gives a checksum that verifies
    frame[50:52] = struct.pack("!H", inet_checksum(frame[34:]))  # what the kernel does: the sum over the segment, pseudo sum included
    seg = bytes(frame[34:])
    assert inet_checksum(SRC4, DST4, bytes([0, 6]), struct.pack("!H", len(seg)), seg) == 0


def test_checksum_setup_udp_and_ipv6():
    assert checksum_setup(bytearray(_eth(_ipv4(17, _udp()))))[1:] == (34, 6)
    assert checksum_setup(tcp6())[1:] == (54, 16)


@pytest.mark.parametrize("frame", [
    bytearray(_eth(b"\x00" * 40, ethertype=0x0806)),  # ARP
    bytearray(_eth(_ipv4(1, b"\x08\x00" + bytes(30)))),  # ICMP
    bytearray(_eth(_ipv4(6, _tcp(), frag=0x2000))),  # first IPv4 fragment
    bytearray(_eth(_ipv4(6, b"\x00" * 10))),  # truncated TCP header
    bytearray(b"\x00" * 10),  # runt
], ids=["arp", "icmp", "fragment", "truncated-tcp", "runt"])
def test_checksum_setup_refuses_what_has_no_l4_checksum(frame):
    before = bytes(frame)
    with pytest.raises(BadOffload):
        checksum_setup(frame)
    assert bytes(frame) == before


def test_from_vnet_plain_partial_validated_and_gso():
    assert Offload.from_vnet(VnetHdr()) == Offload()
    assert Offload.from_vnet(VnetHdr(VIRTIO_NET_HDR_F_DATA_VALID)) == Offload(False, True)
    assert Offload.from_vnet(VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)) == Offload(True, True)
    gso = Offload.from_vnet(VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 74, 1428, 54, 16))
    assert gso == Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV6, 1428) and gso.gso


@pytest.mark.parametrize("hdr", [
    VnetHdr(1, VIRTIO_NET_HDR_GSO_UDP, 42, 1400, 34, 6),
    VnetHdr(1, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 54, 1448, 34, 16),
    VnetHdr(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0, 34, 16),
    VnetHdr(1, 0x42, 54, 1448, 34, 16),
], ids=["udp-gso", "ecn", "zero-mss", "unknown"])
def test_from_vnet_refuses_gso_netif_cannot_carry(hdr):
    with pytest.raises(BadOffload):
        Offload.from_vnet(hdr)


def test_netif_flags_and_gso_extra():
    off = Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448)
    assert off.tx_flags() == NETTXF_csum_blank | NETTXF_data_validated
    assert off.rx_flags() == NETRXF_csum_blank | NETRXF_data_validated
    extra = off.gso_extra()
    assert extra.type == XEN_NETIF_EXTRA_TYPE_GSO and extra.gso() == ExtraGso(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    assert Offload(False, True).tx_flags() == NETTXF_data_validated
    assert Offload().gso_extra() is None and Offload().tx_flags() == 0 and Offload().rx_flags() == 0


def test_from_netif_round_trips_the_extra():
    off = Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV6, 1428)
    assert Offload.from_netif(True, True, NetifExtraInfo.decode(off.gso_extra().encode())) == off
    # a GSO packet without csum_blank is made checksum-partial (Linux: "buggy peers")
    assert Offload.from_netif(False, False, off.gso_extra()).csum_blank
    assert Offload.from_netif(True, False, None) == Offload(True, True)


@pytest.mark.parametrize("extra", [
    NetifExtraInfo.for_gso(ExtraGso(0, XEN_NETIF_GSO_TYPE_TCPV4)),
    NetifExtraInfo.for_gso(ExtraGso(1448, 7)),
    NetifExtraInfo(XEN_NETIF_EXTRA_TYPE_HASH, 0),
], ids=["zero-size", "bad-type", "not-gso"])
def test_from_netif_refuses_a_bad_gso_descriptor(extra):
    with pytest.raises(BadOffload):
        Offload.from_netif(True, True, extra)


def test_to_vnet_partial_and_gso():
    frame = tcp4()
    hdr = Offload(True, True).to_vnet(frame)
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)
    frame = tcp4()
    hdr = Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448).to_vnet(frame)
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    hdr = Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV6, 1428).to_vnet(tcp6())
    assert hdr.gso_type == VIRTIO_NET_HDR_GSO_TCPV6 and hdr.csum_start == 54 and hdr.hdr_len == 74
    assert Offload(False, True).to_vnet(tcp4()) == VnetHdr(VIRTIO_NET_HDR_F_DATA_VALID)
    assert Offload().to_vnet(bytearray(b"anything")) == VnetHdr()


def test_to_vnet_refuses_what_cannot_be_set_up():
    with pytest.raises(BadOffload):
        Offload(True, True).to_vnet(bytearray(_eth(b"\x00" * 40, ethertype=0x0806)))
    with pytest.raises(BadOffload):  # TCP GSO over UDP
        Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1400).to_vnet(bytearray(_eth(_ipv4(17, _udp()))))


def test_settle_checksum_fills_in_what_the_receiver_cannot_take():
    v4, v6 = tcp4(), tcp6()
    blank = Offload(True, True)
    assert settle_checksum(v4, blank, csum=True, ipv6_csum=False) == (v4, blank)  # IPv4 is fine
    frame, off = settle_checksum(v6, blank, csum=True, ipv6_csum=False)  # IPv6 is not
    assert off == Offload(False, True) and frame is not v6
    seg = bytes(frame[54:])
    assert inet_checksum(SRC6, DST6, struct.pack("!I", len(seg)), bytes([0, 0, 0, 6]), seg) == 0
    frame, off = settle_checksum(v4, blank, csum=False, ipv6_csum=False)
    assert off == Offload(False, True)
    gso = Offload(True, True, XEN_NETIF_GSO_TYPE_TCPV4, 1448)
    assert settle_checksum(v4, gso, csum=False, ipv6_csum=False)[1] == gso
    with pytest.raises(BadOffload):
        settle_checksum(bytearray(_eth(b"\x00" * 40, ethertype=0x0806)), blank, csum=False, ipv6_csum=False)
