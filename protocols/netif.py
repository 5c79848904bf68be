"""The network device ring messages of Xen's `io/netif.h`, with no I/O in it.

A vif has two rings.  On the transmit (tx) ring the frontend posts packets
for the backend to send: each packet is one `netif_tx_request` per granted
fragment (NETTXF_more_data on all but the last), and a request flagged
NETTXF_extra_info is followed by `netif_extra_info` slots (GSO, multicast,
hash) that use request slots of their own.  The backend answers every slot
with a `netif_tx_response`; extra-info slots are answered NETIF_RSP_NULL.
On the receive (rx) ring the frontend posts empty granted buffers
(`netif_rx_request`) and the backend fills them, answering with a
`netif_rx_response` whose `status` is the byte count (or a NETIF_RSP_*
error); an rx response flagged NETRXF_extra_info is followed by
`netif_extra_info` in the next response slot.

Layout is the native x86-64 ABI; tests/abi/ring_abi.c checks every size
and offset against Debian's libxen-dev headers.  Decoders raise only a
`MalformedMessage` subclass, and only for input shorter than the struct.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .ring import MalformedRequest, MalformedResponse, RingMessage, ring_bytes_for_order, ring_size, pack_fields

XEN_NETIF_NR_SLOTS_MIN = 18  # slots a backend must accept for one packet
XEN_NETIF_MAX_TX_SIZE = 0xFFFF  # largest packet on the tx ring

# netif_tx_request.flags
NETTXF_csum_blank = 1 << 0  # protocol checksum field is blank
NETTXF_data_validated = 1 << 1  # protocol checksum already validated
NETTXF_more_data = 1 << 2  # packet continues in the next request
NETTXF_extra_info = 1 << 3  # netif_extra_info follow in the next slots

# netif_rx_response.flags
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4  # GSO prefix descriptor precedes the packet

# netif_extra_info.type
XEN_NETIF_EXTRA_TYPE_NONE = 0  # never used: invalid
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5

# netif_extra_info.flags
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0  # another extra info follows

# netif_extra_info.u.gso.type
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# Response status.  io/netif.h spells these NETIF_RSP_*; Linux calls them XEN_NETIF_RSP_*.
NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # no response: used for auxiliary (extra-info) requests

_TX_REQUEST = struct.Struct("<IHHHH")  # gref, offset, flags, id, size
_TX_RESPONSE = struct.Struct("<Hh")  # id, status
_RX_REQUEST = struct.Struct("<H2xI")  # id, [2 pad], gref
_RX_RESPONSE = struct.Struct("<HHHh")  # id, offset, flags, status
_EXTRA_INFO = struct.Struct("<BB6s")  # type, flags, union u (6 bytes)
_EXTRA_GSO = struct.Struct("<HBBH")  # size, type, pad, features
_EXTRA_HASH = struct.Struct("<BB4s")  # type, algorithm, value[4]

TX_REQUEST_SIZE = _TX_REQUEST.size  # 12
TX_RESPONSE_SIZE = _TX_RESPONSE.size  # 4
RX_REQUEST_SIZE = _RX_REQUEST.size  # 8
RX_RESPONSE_SIZE = _RX_RESPONSE.size  # 8
EXTRA_INFO_SIZE = _EXTRA_INFO.size  # 8
TX_RING_ENTRY_SIZE = max(TX_REQUEST_SIZE, TX_RESPONSE_SIZE)  # union netif_tx_sring_entry
RX_RING_ENTRY_SIZE = max(RX_REQUEST_SIZE, RX_RESPONSE_SIZE)  # union netif_rx_sring_entry


def tx_ring_size(order: int = 0) -> int:
    """Slots in a tx ring of 2**order pages (256 for one page)."""
    return ring_size(TX_RING_ENTRY_SIZE, ring_bytes_for_order(order))


def rx_ring_size(order: int = 0) -> int:
    """Slots in an rx ring of 2**order pages (256 for one page)."""
    return ring_size(RX_RING_ENTRY_SIZE, ring_bytes_for_order(order))


@dataclass(frozen=True)
class NetifTxRequest(RingMessage, layout=_TX_REQUEST, c_name="netif_tx_request", malformed=MalformedRequest):
    """struct netif_tx_request: one fragment `size` bytes at `offset` in frame `gref`.

    In the first request of a packet `size` is the whole packet's length.
    """

    gref: int
    offset: int
    flags: int
    id: int
    size: int


@dataclass(frozen=True)
class NetifTxResponse(RingMessage, layout=_TX_RESPONSE, c_name="netif_tx_response", malformed=MalformedResponse):
    """struct netif_tx_response."""

    id: int
    status: int


@dataclass(frozen=True)
class NetifRxRequest(RingMessage, layout=_RX_REQUEST, c_name="netif_rx_request", malformed=MalformedRequest):
    """struct netif_rx_request: an empty buffer (granted frame) for the backend to fill."""

    id: int
    gref: int


@dataclass(frozen=True)
class NetifRxResponse(RingMessage, layout=_RX_RESPONSE, c_name="netif_rx_response", malformed=MalformedResponse):
    """struct netif_rx_response: `status` bytes at `offset`, or a negative NETIF_RSP_*."""

    id: int
    offset: int
    flags: int
    status: int


@dataclass(frozen=True)
class ExtraGso:
    """netif_extra_info.u.gso: MSS, XEN_NETIF_GSO_TYPE_*, features (none defined yet)."""

    size: int
    type: int
    features: int = 0


@dataclass(frozen=True)
class ExtraHash:
    """netif_extra_info.u.hash: XEN_NETIF_CTRL_HASH_TYPE_* bit, algorithm, 4 value bytes."""

    type: int
    algorithm: int
    value: bytes


@dataclass(frozen=True)
class NetifExtraInfo(RingMessage, layout=_EXTRA_INFO, c_name="netif_extra_info"):
    """struct netif_extra_info: type, flags and the 6-byte union `u` kept raw.

    It travels in a tx *request* slot or an rx *response* slot, so
    `decode` raises the plain `MalformedMessage`.  Read the union with
    `gso()`, `mcast_addr()` or `hash()` according to `type`.
    """

    type: int
    flags: int
    union_bytes: bytes = bytes(6)

    def __post_init__(self) -> None:
        if len(self.union_bytes) != 6:
            raise ValueError("netif_extra_info.u is exactly 6 bytes")

    @classmethod
    def for_gso(cls, gso: ExtraGso, flags: int = 0) -> NetifExtraInfo:
        return cls(XEN_NETIF_EXTRA_TYPE_GSO, flags, pack_fields(_EXTRA_GSO, gso.size, gso.type, 0, gso.features))

    @classmethod
    def for_mcast(cls, add: bool, addr: bytes, flags: int = 0) -> NetifExtraInfo:
        if len(addr) != 6:
            raise ValueError("a multicast MAC address is 6 bytes")
        kind = XEN_NETIF_EXTRA_TYPE_MCAST_ADD if add else XEN_NETIF_EXTRA_TYPE_MCAST_DEL
        return cls(kind, flags, bytes(addr))

    @classmethod
    def for_hash(cls, hash_: ExtraHash, flags: int = 0) -> NetifExtraInfo:
        return cls(XEN_NETIF_EXTRA_TYPE_HASH, flags, pack_fields(_EXTRA_HASH, hash_.type, hash_.algorithm, hash_.value))

    def gso(self) -> ExtraGso:
        size, gso_type, _pad, features = _EXTRA_GSO.unpack(self.union_bytes)
        return ExtraGso(size, gso_type, features)

    def mcast_addr(self) -> bytes:
        return self.union_bytes

    def hash(self) -> ExtraHash:
        hash_type, algorithm, value = _EXTRA_HASH.unpack(self.union_bytes)
        return ExtraHash(hash_type, algorithm, value)

    @property
    def more(self) -> bool:
        """XEN_NETIF_EXTRA_FLAG_MORE: another extra info follows in the next slot."""
        return bool(self.flags & XEN_NETIF_EXTRA_FLAG_MORE)


# Where every field lives, named as tests/abi/ring_abi.c names it.
FIELDS = {  # "struct.member": (offset, size)
    "netif_tx_request.gref": (0, 4),
    "netif_tx_request.offset": (4, 2),
    "netif_tx_request.flags": (6, 2),
    "netif_tx_request.id": (8, 2),
    "netif_tx_request.size": (10, 2),
    "netif_tx_response.id": (0, 2),
    "netif_tx_response.status": (2, 2),
    "netif_rx_request.id": (0, 2),
    "netif_rx_request.pad": (2, 2),
    "netif_rx_request.gref": (4, 4),
    "netif_rx_response.id": (0, 2),
    "netif_rx_response.offset": (2, 2),
    "netif_rx_response.flags": (4, 2),
    "netif_rx_response.status": (6, 2),
    "netif_extra_info.type": (0, 1),
    "netif_extra_info.flags": (1, 1),
    "netif_extra_info.u": (2, 6),
    "netif_extra_info.u.gso.size": (2, 2),
    "netif_extra_info.u.gso.type": (4, 1),
    "netif_extra_info.u.gso.features": (6, 2),
    "netif_extra_info.u.mcast.addr": (2, 6),
    "netif_extra_info.u.hash.type": (2, 1),
    "netif_extra_info.u.hash.algorithm": (3, 1),
    "netif_extra_info.u.hash.value": (4, 4),
}

STRUCT_SIZES = {
    "netif_tx_request": TX_REQUEST_SIZE,
    "netif_tx_response": TX_RESPONSE_SIZE,
    "netif_rx_request": RX_REQUEST_SIZE,
    "netif_rx_response": RX_RESPONSE_SIZE,
    "netif_extra_info": EXTRA_INFO_SIZE,
    "netif_tx_sring_entry": TX_RING_ENTRY_SIZE,
    "netif_rx_sring_entry": RX_RING_ENTRY_SIZE,
}
