"""Offload metadata of a frame: Linux's `virtio_net_hdr` (what a tap opened
with IFF_VNET_HDR puts before every frame it reads and expects before every
frame written) and netif's way of saying the same (netif.h: NETTXF_* /
NETRXF_* checksum flags and a GSO `netif_extra_info`).  Pure: no I/O.

    hdr, frame = split_vnet(os.read(tap_fd, n))     # what the kernel handed us
    off = Offload.from_vnet(hdr)                    # -> netif flags + GSO extra
    flags = off.tx_flags(); extra = off.gso_extra()
    ...
    hdr = off.to_vnet(frame)                        # back: csum_start/offset set up

`Offload.to_vnet` is Linux netback's checksum_setup / skb_checksum_setup with
`recalculate_partial_csum`: a blank checksum gets the pseudo-header sum in
its field (what CHECKSUM_PARTIAL means) and csum_start/csum_offset from the
headers, so the kernel finishes it -- nothing sums the payload here.  A GSO
packet is always checksum-partial (Linux forces it, "buggy peers").  What
cannot be set up (not IPv4/IPv6 TCP/UDP, an IPv4 fragment, a GSO packet
that is not TCP) raises `BadOffload`: the caller drops the frame, as Linux
does ("Can't setup checksum").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .inet import ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, fill_checksum, l3_offset, l4_header, ones_complement_sum
from .netif import (
    NETRXF_csum_blank, NETRXF_data_validated, NETTXF_csum_blank, NETTXF_data_validated, XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_NONE, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, ExtraGso, NetifExtraInfo,
)

# linux/virtio_net.h
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

_VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = _VNET.size  # 10: the tap's default TUNSETVNETHDRSZ
_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
_GSO_TO_VNET = {XEN_NETIF_GSO_TYPE_TCPV4: VIRTIO_NET_HDR_GSO_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6: VIRTIO_NET_HDR_GSO_TCPV6}
_VNET_TO_GSO = {v: k for k, v in _GSO_TO_VNET.items()}


class BadOffload(ValueError):
    """The offload metadata cannot be honoured for this frame (or is not a
    virtio_net_hdr at all)."""


@dataclass(frozen=True)
class VnetHdr:
    """struct virtio_net_hdr (native little-endian on x86)."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def encode(self) -> bytes:
        return _VNET.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                          self.csum_offset)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> VnetHdr:
        if len(data) < VNET_HDR_LEN:
            raise BadOffload(f"a virtio_net_hdr is {VNET_HDR_LEN} bytes, got {len(data)}")
        return cls(*_VNET.unpack_from(data))


NO_VNET = VnetHdr().encode()


def split_vnet(data: bytes | bytearray | memoryview) -> tuple[VnetHdr, memoryview]:
    """(header, frame) of what a vnet-header tap read returned."""
    view = memoryview(data)
    return VnetHdr.decode(view), view[VNET_HDR_LEN:]


def checksum_setup(frame: bytearray) -> tuple[int, int, int]:
    """(L4 protocol, csum_start, csum_offset) of a TCP/UDP frame whose
    checksum is to be finished by the receiver; its checksum field gets the
    pseudo-header sum (skb_checksum_setup, recalculate).  BadOffload when the
    frame has no whole TCP/UDP header over IPv4/IPv6."""
    l4 = l4_header(frame)
    if l4 is None or l4.fragment or l4.proto not in _CSUM_AT:
        raise BadOffload("no TCP/UDP header to set a partial checksum up in")
    at = l4.start + _CSUM_AT[l4.proto]
    if at + 2 > l4.end or (l4.proto == IPPROTO_TCP and l4.start + 20 > l4.end):
        raise BadOffload("truncated L4 header")
    struct.pack_into("!H", frame, at, ones_complement_sum(l4.pseudo))
    return l4.proto, l4.start, at - l4.start


@dataclass(frozen=True)
class Offload:
    """What travels beside a frame: its checksum is blank (the receiver
    finishes it) or already validated, and it is a GSO packet of `gso_type`
    (XEN_NETIF_GSO_TYPE_*) to be cut into `gso_size`-byte segments."""

    csum_blank: bool = False
    data_validated: bool = False
    gso_type: int = XEN_NETIF_GSO_TYPE_NONE
    gso_size: int = 0

    @property
    def gso(self) -> bool:
        return self.gso_type != XEN_NETIF_GSO_TYPE_NONE

    # -- virtio_net_hdr -----------------------------------------------------------------
    @classmethod
    def from_vnet(cls, hdr: VnetHdr) -> Offload:
        """What a tap read says; BadOffload for a GSO kind netif cannot carry
        (UDP, ECN: never asked for in TUNSETOFFLOAD) or a zero segment size."""
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE:
            gso_type, size = XEN_NETIF_GSO_TYPE_NONE, 0
        else:
            gso_type = _VNET_TO_GSO.get(hdr.gso_type)
            if gso_type is None:
                raise BadOffload(f"virtio GSO type {hdr.gso_type:#x} has no netif equivalent")
            if hdr.gso_size == 0:
                raise BadOffload("GSO with a segment size of 0")
            size = hdr.gso_size
        blank = bool(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
        return cls(csum_blank=blank, data_validated=blank or bool(hdr.flags & VIRTIO_NET_HDR_F_DATA_VALID),
                   gso_type=gso_type, gso_size=size)

    def to_vnet(self, frame: bytearray) -> VnetHdr:
        """The header to write `frame` into a tap with (the frame's checksum
        field is set up in place when partial).  BadOffload: drop it."""
        if not self.csum_blank and not self.gso:
            return VnetHdr(VIRTIO_NET_HDR_F_DATA_VALID if self.data_validated else 0)
        proto, start, offset = checksum_setup(frame)
        if not self.gso:
            return VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=offset)
        if proto != IPPROTO_TCP:
            raise BadOffload("a TCP GSO packet that is not TCP")
        if self.gso_size == 0:
            raise BadOffload("GSO with a segment size of 0")
        vnet_type = _GSO_TO_VNET.get(self.gso_type)
        if vnet_type is None:
            raise BadOffload(f"netif GSO type {self.gso_type} unknown")
        hdr_len = start + (frame[start + 12] >> 4) * 4
        return VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, vnet_type, min(hdr_len, len(frame)), self.gso_size, start,
                       offset)

    # -- netif ---------------------------------------------------------------------------
    def tx_flags(self) -> int:
        """netif_tx_request.flags (Linux netfront: CHECKSUM_PARTIAL ->
        csum_blank | data_validated)."""
        return ((NETTXF_csum_blank if self.csum_blank else 0)
                | (NETTXF_data_validated if self.data_validated else 0))

    def rx_flags(self) -> int:
        """netif_rx_response.flags, as Linux netback sets them."""
        return ((NETRXF_csum_blank if self.csum_blank else 0)
                | (NETRXF_data_validated if self.data_validated else 0))

    def gso_extra(self) -> NetifExtraInfo | None:
        return NetifExtraInfo.for_gso(ExtraGso(self.gso_size, self.gso_type)) if self.gso else None

    @classmethod
    def from_netif(cls, csum_blank: bool, data_validated: bool, gso: NetifExtraInfo | None) -> Offload:
        """From a packet's flags and its GSO extra (already validated by the
        caller: type GSO, size > 0, a known kind)."""
        if gso is None:
            return cls(csum_blank, data_validated or csum_blank)
        if gso.type != XEN_NETIF_EXTRA_TYPE_GSO:
            raise BadOffload(f"extra info of type {gso.type} is not GSO")
        info = gso.gso()
        if info.type not in _GSO_TO_VNET or info.size == 0:
            raise BadOffload(f"bad GSO descriptor (type {info.type}, size {info.size})")
        return cls(True, True, info.type, info.size)  # a GSO packet is always checksum-partial


def settle_checksum(frame: bytes | bytearray | memoryview, offload: Offload, *, csum: bool,
                    ipv6_csum: bool) -> tuple[bytes | bytearray | memoryview, Offload]:
    """A blank checksum the other end cannot take (no checksum offload at
    all, or an IPv6 one without feature-ipv6-csum-offload) is summed here,
    in a copy of the frame, which then goes as data_validated.  GSO frames
    are left alone (the other end asked for them).  BadOffload: no TCP/UDP
    checksum to fill in."""
    if not offload.csum_blank or offload.gso:
        return frame, offload
    if csum and ipv6_csum:
        return frame, offload
    found = l3_offset(frame)
    if csum and (found is None or found[0] != ETH_P_IPV6):
        return frame, offload
    out = bytearray(frame)
    if not fill_checksum(out):
        raise BadOffload("cannot fill in a blank checksum")
    return out, Offload(data_validated=True)
