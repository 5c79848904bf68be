"""Ethernet pieces netfront needs (pure): MAC addresses as the toolstack
writes them, and the gratuitous ARP a guest sends when its link comes back."""

from __future__ import annotations

import ipaddress
import struct

ETH_ALEN = 6
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ARPHRD_ETHER = 1
BROADCAST_MAC = b"\xff" * 6


def parse_mac(text: str | bytes | None) -> bytes:
    """'00:16:3e:0a:0b:0c' (any case; 1-2 hex digits a group; ':' or '-')
    -> 6 bytes.  Rejects multicast (and so broadcast) addresses: an
    interface needs a unicast one.  ValueError otherwise."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str):
        raise ValueError("no MAC address")
    text = text.strip()
    groups = text.replace("-", ":").split(":")
    if len(groups) != 6 or any(not 1 <= len(g) <= 2 for g in groups):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        raw = bytes(int(g, 16) for g in groups)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None
    if any(not c.isascii() or c not in "0123456789abcdefABCDEF" for g in groups for c in g):
        raise ValueError(f"not a MAC address: {text!r}")
    if raw[0] & 1:
        raise ValueError(f"{text!r} is a multicast address")
    return raw


def format_mac(raw: bytes) -> str:
    if len(raw) != ETH_ALEN:
        raise ValueError(f"a MAC address is 6 bytes, not {len(raw)}")
    return ":".join(f"{b:02x}" for b in raw)


def gratuitous_arp(mac: bytes | str, ip: str) -> bytes:
    """The frame Linux sends for netdev_notify_peers (arp_send(ARPOP_REQUEST,
    ETH_P_ARP, ip, dev, ip, NULL, dev_addr, NULL)): broadcast, an ARP request
    whose sender and target IP are both `ip`, target hardware address zero.
    42 bytes, unpadded, as the skb netfront puts on the ring."""
    src = parse_mac(mac) if isinstance(mac, str) else bytes(mac)
    if len(src) != ETH_ALEN:
        raise ValueError("a MAC address is 6 bytes")
    addr = ipaddress.IPv4Address(ip).packed
    eth = BROADCAST_MAC + src + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, ETH_ALEN, 4, ARPOP_REQUEST) + src + addr + bytes(6) + addr
    return eth + arp
