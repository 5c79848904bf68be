"""The Internet checksum and the L4 (TCP/UDP) header of an Ethernet frame (pure).

One copy for both ends of a vif: netback fills the checksum of a frame its
frontend sent with NETTXF_csum_blank, netfront completes one that arrives
with NETRXF_csum_blank.  What a frame may be, as Linux's
skb_checksum_setup understands it:

- Ethernet II, with or without one 802.1Q VLAN tag;
- IPv4 (options allowed), or IPv6 whose next header is TCP or UDP itself
  (extension headers are not walked: such a frame has no L4 header here);
- an IPv4 fragment is never touched: a non-first fragment has no L4
  header, and a first one carries only part of the datagram the checksum
  covers (Linux refuses both: "Can't setup checksum").
"""

from __future__ import annotations

import struct
from typing import NamedTuple

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IP_MF = 0x2000  # more fragments
IP_OFFSET = 0x1FFF  # fragment offset, in 8-byte units

# where the checksum field sits in each L4 header
_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


def ones_complement_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The 16-bit one's complement sum of `data` (padded to an even length),
    added to `start`."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(*parts: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of the concatenation of `parts`."""
    return ~ones_complement_sum(b"".join(bytes(p) for p in parts)) & 0xFFFF


class L4(NamedTuple):
    """Where an IP packet's transport header is in a frame."""

    proto: int  # IPPROTO_*
    start: int  # offset of the L4 header
    end: int  # end of the IP packet (a frame may be padded past it)
    pseudo: bytes  # the pseudo-header the checksum covers
    fragment: bool  # an IPv4 fragment (MF set or a non-zero offset)


def l3_offset(frame: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(ethertype, offset of the L3 header), past one VLAN tag; None for a
    runt."""
    if len(frame) < ETH_HLEN:
        return None
    ethertype, l3 = struct.unpack_from("!H", frame, 12)[0], ETH_HLEN
    if ethertype == ETH_P_8021Q:
        if len(frame) < ETH_HLEN + VLAN_HLEN:
            return None
        ethertype, l3 = struct.unpack_from("!H", frame, 16)[0], ETH_HLEN + VLAN_HLEN
    return ethertype, l3


def l4_header(frame: bytes | bytearray | memoryview) -> L4 | None:
    """The L4 header of an IPv4 or IPv6 frame, or None (not IP, truncated,
    a non-first IPv4 fragment)."""
    found = l3_offset(frame)
    if found is None:
        return None
    ethertype, l3 = found
    if ethertype == ETH_P_IP and len(frame) >= l3 + 20:
        ihl = (frame[l3] & 0x0F) * 4
        end = min(len(frame), l3 + struct.unpack_from("!H", frame, l3 + 2)[0])
        proto, frag = frame[l3 + 9], struct.unpack_from("!H", frame, l3 + 6)[0]
        if ihl < 20 or end <= l3 + ihl or frag & IP_OFFSET:
            return None
        pseudo = bytes(frame[l3 + 12:l3 + 20]) + struct.pack("!BBH", 0, proto, end - l3 - ihl)
        return L4(proto, l3 + ihl, end, pseudo, bool(frag & IP_MF))
    if ethertype == ETH_P_IPV6 and len(frame) >= l3 + 40:
        proto, start = frame[l3 + 6], l3 + 40
        end = min(len(frame), start + struct.unpack_from("!H", frame, l3 + 4)[0])
        pseudo = bytes(frame[l3 + 8:l3 + 40]) + struct.pack("!IxxxB", end - start, proto)
        return L4(proto, start, end, pseudo, False)
    return None


def tcp_payload_length(frame: bytes | bytearray | memoryview) -> int:
    """Bytes of TCP payload in a frame (what a GSO packet would be cut into
    segments of at most `gso.size`); the frame length if it is not TCP."""
    l4 = l4_header(frame)
    if l4 is None or l4.proto != IPPROTO_TCP or l4.start + 20 > l4.end:
        return len(frame)
    return l4.end - l4.start - (frame[l4.start + 12] >> 4) * 4


def fill_checksum(frame: bytearray) -> bool:
    """Compute the TCP/UDP checksum of an Ethernet frame in place.  False
    (frame untouched) when it is not a whole TCP or UDP packet over IPv4 or
    IPv6 (Linux drops such a csum_blank packet: "Can't setup checksum")."""
    l4 = l4_header(frame)
    if l4 is None or l4.fragment or l4.proto not in _CSUM_AT:
        return False
    csum_at = l4.start + _CSUM_AT[l4.proto]
    if csum_at + 2 > l4.end:
        return False
    frame[csum_at:csum_at + 2] = b"\0\0"
    csum = ~ones_complement_sum(memoryview(frame)[l4.start:l4.end], ones_complement_sum(l4.pseudo)) & 0xFFFF
    if l4.proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF  # UDP: zero means "no checksum"
    struct.pack_into("!H", frame, csum_at, csum)
    return True


def complete_checksum(frame: bytes) -> bytes:
    """`frame` with its TCP/UDP checksum filled in (a frame that came with
    NETRXF_csum_blank: checksum offloaded to the receiver); any other frame
    comes back unchanged."""
    out = bytearray(frame)
    return bytes(out) if fill_checksum(out) else frame
