"""netfront: the network frontend of a guest (Linux's drivers/net/xen-netfront.c).

`python3 -m xenbed.drivers.net.front` runs in every guest, started by its
kernel: it probes the guest's `device/vif/<devid>` directories through the
XenBus (`FrontendBus`) and connects each vif to its backend over a pair of
netif rings (tx and rx).  The guest side of each vif is a tap interface
(tapdev.py): `eth0`, `eth1`, ... in probe (devid) order, carrying the MAC
the toolstack wrote in the frontend's `mac` node.  A frame the guest's stack
sends out of eth0 goes on the tx ring; a frame the backend puts on the rx
ring is written into eth0.  The guest container has no other network.

Connection (seed 000, "netfront can skip immediately to Connected")
-------------------------------------------------------------------
probe (Initialising): read `mac`, create the tap (down, carrier off), and
wait.  Backend InitWait (Linux: talk_to_netback from netback_changed):
read the backend's features (`feature-rx-copy` must be 1, else dev_fatal;
`feature-split-event-channels`, `feature-sg`), allocate the tx and rx ring
pages, SHARED_RING_INIT them, grant them, allocate one event channel (or a
tx/rx pair when the backend offers split channels), and write in ONE
transaction `tx-ring-ref`, `rx-ring-ref`, `event-channel` (or
`event-channel-tx`/`event-channel-rx`), `request-rx-copy` 1,
`feature-rx-notify` 1, `feature-sg` 1, `feature-no-csum-offload` 1; post
rx buffers; switch straight to Connected.  Backend Connected: MTU from the
backend's `mtu` (default 1500), tap up, carrier on, gratuitous ARP for each
IPv4 address on the tap (netdev_notify_peers), transmit enabled.

MTU, and changing it live
-------------------------
netif.h ("MTU") puts the toolstack's MTU for the frontend in the
frontend's own area, `device/vif/<devid>/mtu`; libxl (Xen >= 4.14) writes
it there and in the backend dir, where vif-bridge applies it to the vif.
Linux netfront ignores it (its MTU is whatever the guest sets); Windows PV
drivers and MirageOS read it at connect.  We read it when the backend is
Connected (`vif_mtu`: our node, else the backend's, else 1500) AND watch
our node while connected: a change is applied to the tap at once, with no
XenBus transition (seed 000, "Device reconfiguration ... device-specific
watches ... each driver stays in the Connected state").  Why the frontend
node and a watch, rather than a state change: the MTU is a property of the
link that needs no new rings (the ring carries frames of any size up to
64 KiB), so nothing has to be renegotiated; the frontend node is where the
protocol says the frontend looks; and a watch is how Xen reconfigures a
connected device (netback's `rate` is the precedent).  netback watches the
backend's `mtu` likewise and applies it to the vif, so both ends of the
"cable" agree; `xl network-set` (a xenbed extension) writes both nodes in
one transaction.  Lowering the MTU does not drop frames already queued.

Recovery after a backend restart
--------------------------------
A backend that goes straight to Closed while we are Connected (no Closing
first, which is how the toolstack asks for an unplug) lost the connection:
netback or all of dom0 was restarted and recovered the device
(drivers/net/back.py, recover).  `_backend_lost` keeps the tap -- eth0
keeps its ifindex, MAC and addresses -- drops what was in flight (this is
Ethernet), frees the old rings, grants and ports, and goes Closed ->
Initialising (Linux's xenbus_reset_frontend); the backend's InitWait then
starts new rings as at boot, and its Connected brings the carrier back
with a gratuitous ARP.  `leaked_grants` in the status file counts grants
that could not be ended because the other end still mapped them (0 when
the dead backend's mappings went with it, as they must).

Closedown: backend Closing (or Closed): Closing, carrier off, no new
transmits, the tx requests in flight drained (their responses awaited, at
most `drain_timeout`), Closed; grants are ended when the backend is Closed
too (it has unmapped by then).  The tap stays; `remove` (the toolstack
deleted the device dir) deletes it.  Migration (`resume`): the old rings
are forgotten (tx requests in flight are counted as dropped, as Linux's
xennet_release_tx_bufs does), carrier off, and the connection is made
afresh when the new backend reaches InitWait; the tap stays open throughout.

The data path (`VifEngine`)
---------------------------
TX: every tx ring slot id owns one page, granted read-only to the backend
once per connection (persistent).  A frame is copied into as many pages as
it needs (one 4 KiB piece per slot, `tx_slot_sizes`), the first request's
`size` is the whole frame's length, every request but the last carries
NETTXF_more_data (`build_tx_requests`).  A full ring blocks the sender
(the tap reader thread) until responses free slots; responses are matched
by id, a frame is done when all its slots are answered; NETIF_RSP_OKAY /
ERROR / DROPPED are counted per frame.
RX: the rx ring is kept full of posted buffers, one page per slot granted
once (persistent).  As in Linux, a buffer's id is its ring index modulo the
ring size, so the buffer behind an extra-info slot (which has no id) is
known too.  Responses are reassembled (`RxReassembler`): `status` bytes at
`offset` of the buffer, NETRXF_more_data chains concatenated, extra-info
slots skipped; a frame is written to the tap, the buffers are posted again.
Events: clear, process, final check (drivers/xen/evtchn.py), on the event
channel dispatcher thread.  A tap reader thread per vif feeds the tx ring.

Counters (tx/rx packets, bytes, errors, drops) and the connection's details
are in `/run/xen/vif/<devid>.json`, rewritten every second and on every
state change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import argparse
import errno
import ipaddress
import json
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from xenbed.protocols.netif import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_csum_blank,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_more_data,
    RX_RING_ENTRY_SIZE,
    TX_RING_ENTRY_SIZE,
    XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, FrontRing, MalformedMessage, RingError, SharedRing

try:
    from xenbed.drivers.xenbus import XenbusDriver, XenbusFatal, XenbusState
except ImportError:  # pragma: no cover - an image without the XenBus
    import enum

    class XenbusState(enum.IntEnum):  # type: ignore[no-redef]
        Unknown, Initialising, InitWait, Initialised, Connected, Closing, Closed = range(7)
        Reconfiguring, Reconfigured = 7, 8

    class XenbusDriver:  # type: ignore[no-redef]
        devicetype = ""

    class XenbusFatal(Exception):  # type: ignore[no-redef]
        pass


if TYPE_CHECKING:
    from xenbed.drivers.xenbus.daemon import GuestXen

log = logging.getLogger("xenbed.netfront")

DEFAULT_STATUS_DIR = "/run/xen/vif"
DEFAULT_MTU = 1500
ETH_HLEN = 14
ETH_ALEN = 6
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ARPHRD_ETHER = 1
BROADCAST_MAC = b"\xff" * 6
MAX_RX_SLOTS = XEN_NETIF_NR_SLOTS_MIN  # a chain longer than this is a broken backend


# ---------------------------------------------------------------------------------
# Pure pieces (tests/unit/test_netfront.py)
# ---------------------------------------------------------------------------------
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


def tx_slot_sizes(length: int, page: int = XEN_PAGE_SIZE) -> list[int]:
    """How a frame of `length` bytes is spread over tx slots: one piece of at
    most a page each, every piece at offset 0 of its own page.  A zero-length
    frame would still take one slot (the caller refuses it)."""
    if length < 0:
        raise ValueError(f"negative frame length {length}")
    if length == 0:
        return [0]
    full, rest = divmod(length, page)
    return [page] * full + ([rest] if rest else [])


def tx_slots_needed(length: int) -> int:
    return len(tx_slot_sizes(length))


def build_tx_requests(length: int, slots: Sequence[tuple[int, int]], flags: int = 0) -> list[NetifTxRequest]:
    """The netif_tx_requests for one frame of `length` bytes whose pieces
    sit at offset 0 of the pages behind `slots` [(id, gref), ...] (one per
    `tx_slot_sizes` piece): the first request's size is the whole frame's
    length (netif.h), the others their own piece's; NETTXF_more_data on
    every request but the last.  `flags` (e.g. NETTXF_data_validated) go on
    the first request only."""
    sizes = tx_slot_sizes(length)
    if len(slots) != len(sizes):
        raise ValueError(f"a frame of {length} bytes takes {len(sizes)} slots, got {len(slots)}")
    if length > XEN_NETIF_MAX_TX_SIZE:
        raise ValueError(f"a frame of {length} bytes is larger than the tx ring carries ({XEN_NETIF_MAX_TX_SIZE})")
    out = []
    for i, ((rid, gref), size) in enumerate(zip(slots, sizes)):
        f = flags if i == 0 else 0
        if i < len(sizes) - 1:
            f |= NETTXF_more_data
        out.append(NetifTxRequest(gref=gref, offset=0, flags=f, id=rid, size=length if i == 0 else size))
    return out


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


def inet_checksum(*parts: bytes | memoryview) -> int:
    """The Internet checksum (RFC 1071) of the concatenation of `parts`."""
    data = b"".join(bytes(p) for p in parts)
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def complete_checksum(frame: bytes) -> bytes:
    """Fill in the TCP/UDP checksum of an IPv4 or IPv6 frame whose checksum
    is blank (NETRXF_csum_blank: checksum offloaded to the receiver).  Other
    frames come back unchanged.  IPv6 extension headers are not walked."""
    if len(frame) < ETH_HLEN:
        return frame
    ethertype, l3 = struct.unpack_from("!H", frame, 12)[0], ETH_HLEN
    if ethertype == 0x8100 and len(frame) >= 18:  # one VLAN tag
        ethertype, l3 = struct.unpack_from("!H", frame, 16)[0], 18
    if ethertype == ETH_P_IP and len(frame) >= l3 + 20:
        ihl = (frame[l3] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, l3 + 2)[0]
        proto, frag = frame[l3 + 9], struct.unpack_from("!H", frame, l3 + 6)[0]
        if frag & 0x3FFF:  # a fragment: no L4 header to fix
            return frame
        l4, end = l3 + ihl, min(len(frame), l3 + total)
        pseudo = frame[l3 + 12:l3 + 20] + struct.pack("!BBH", 0, proto, end - l4)
    elif ethertype == 0x86DD and len(frame) >= l3 + 40:
        proto = frame[l3 + 6]
        l4 = l3 + 40
        end = min(len(frame), l4 + struct.unpack_from("!H", frame, l3 + 4)[0])
        pseudo = frame[l3 + 8:l3 + 40] + struct.pack("!IxxxB", end - l4, proto)
    else:
        return frame
    field_at = {6: 16, 17: 6}.get(proto)
    if field_at is None or end - l4 < field_at + 2:
        return frame
    out = bytearray(frame)
    out[l4 + field_at:l4 + field_at + 2] = b"\0\0"
    csum = inet_checksum(pseudo, bytes(out[l4:end]))
    if proto == 17 and csum == 0:
        csum = 0xFFFF  # UDP: zero means "no checksum"
    struct.pack_into("!H", out, l4 + field_at, csum)
    return bytes(out)


@dataclass(frozen=True)
class RxFrame:
    """One chain taken off the rx ring: `data` (empty when dropped), whether
    it is good, why not, and how many ring slots it used."""

    data: bytes
    ok: bool
    slots: int
    reason: str = ""
    csum_blank: bool = False


class RxReassembler:
    """Turns rx response slots, fed in ring order, into frames (Linux's
    xennet_get_responses + xennet_get_extras).

    `feed(slot, fetch)`: `slot` is the raw ring entry; `fetch(id, offset,
    size)` returns those bytes of the buffer behind `id`.  Returns an
    `RxFrame` when a chain ends (a slot without NETRXF_more_data and no
    extra-info pending), else None.  A chain with an error status, a piece
    that overruns its page, or too many slots ends as a dropped frame
    (its slots still consumed, as Linux does).
    """

    def __init__(self, page: int = XEN_PAGE_SIZE, max_slots: int = MAX_RX_SLOTS,
                 max_len: int = XEN_NETIF_MAX_TX_SIZE + ETH_HLEN) -> None:
        self.page = page
        self.max_slots = max_slots
        self.max_len = max_len
        self._reset()

    def _reset(self) -> None:
        self._parts: list[bytes] = []
        self._slots = 0
        self._extras_pending = False
        self._error = ""
        self._csum_blank = False
        self._more = False

    @property
    def in_chain(self) -> bool:
        return self._slots > 0

    def feed(self, slot: bytes, fetch: Callable[[int, int, int], bytes]) -> RxFrame | None:
        self._slots += 1
        if self._extras_pending:  # this slot is a netif_extra_info
            try:
                extra = NetifExtraInfo.decode(slot)
            except MalformedMessage as exc:
                self._error = self._error or f"bad extra info: {exc}"
                extra = None
            if extra is None or not extra.type or extra.type >= 5:
                self._error = self._error or f"bad extra info type {extra.type if extra else '?'}"
                self._extras_pending = False
            else:
                self._extras_pending = extra.more
            if self._extras_pending:
                return None
            return None if self._more else self._finish()
        rsp = NetifRxResponse.decode(slot)
        if self._slots == 1 and rsp.flags & NETRXF_csum_blank:
            self._csum_blank = True
        if rsp.status < 0:
            self._error = self._error or f"status {rsp.status}"
        elif rsp.offset + rsp.status > self.page:
            self._error = self._error or f"{rsp.status} bytes at offset {rsp.offset} overrun the page"
        elif not self._error:
            self._parts.append(bytes(fetch(rsp.id, rsp.offset, rsp.status)))
        if self._slots > self.max_slots and not self._error:
            self._error = f"more than {self.max_slots} slots in one packet"
        self._more = bool(rsp.flags & NETRXF_more_data)
        if rsp.flags & NETRXF_extra_info and self._slots == 1:
            self._extras_pending = True
            return None
        if self._more:
            return None
        return self._finish()

    def _finish(self) -> RxFrame:
        data = b"".join(self._parts)
        slots, error, csum = self._slots, self._error, self._csum_blank
        if not error and len(data) < ETH_HLEN:
            error = f"runt frame of {len(data)} bytes"
        if not error and len(data) > self.max_len:
            error = f"frame of {len(data)} bytes is too long"
        self._reset()
        if error:
            return RxFrame(b"", False, slots, error, csum)
        return RxFrame(data, True, slots, "", csum)


def _flag(value: str | None) -> bool:
    try:
        return value is not None and int(value.strip() or "0") != 0
    except ValueError:
        return False


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value.strip()) if value is not None else default
    except ValueError:
        return default


@dataclass(frozen=True)
class BackendFeatures:
    """What the backend advertises by InitWait (xenstore keys in comments)."""

    rx_copy: bool = False  # feature-rx-copy
    split_event_channels: bool = False  # feature-split-event-channels
    sg: bool = False  # feature-sg
    rx_flip: bool = False  # feature-rx-flip (obsolete; never used)
    max_queues: int = 1  # multi-queue-max-queues (we use one queue)

    @classmethod
    def parse(cls, read: Callable[[str], str | None]) -> BackendFeatures:
        return cls(rx_copy=_flag(read("feature-rx-copy")),
                   split_event_channels=_flag(read("feature-split-event-channels")),
                   sg=_flag(read("feature-sg")),
                   rx_flip=_flag(read("feature-rx-flip")),
                   max_queues=max(1, _int(read("multi-queue-max-queues"), 1)))


def backend_mtu(read: Callable[[str], str | None], default: int = DEFAULT_MTU) -> int:
    """The backend's `mtu` node when present and sane (68..65535), else `default`."""
    mtu = _int(read("mtu"), 0)
    return mtu if 68 <= mtu <= 65535 else default


def vif_mtu(read_own: Callable[[str], str | None], read_backend: Callable[[str], str | None],
            default: int = DEFAULT_MTU) -> int:
    """The MTU the toolstack gives this vif: our own `mtu` node (netif.h,
    "MTU": the frontend area), else the backend's (a toolstack that writes
    only that one), else `default` (1500)."""
    return backend_mtu(read_own, backend_mtu(read_backend, default))


def frontend_keys(tx_ref: int, rx_ref: int, ports: Sequence[int], sg: bool = True) -> dict[str, str]:
    """The nodes netfront writes in its one transaction (talk_to_netback)."""
    keys = {"tx-ring-ref": str(tx_ref), "rx-ring-ref": str(rx_ref)}
    if len(ports) == 1:
        keys["event-channel"] = str(ports[0])
    elif len(ports) == 2:
        keys["event-channel-tx"], keys["event-channel-rx"] = str(ports[0]), str(ports[1])
    else:
        raise ValueError(f"one or two event channels, not {len(ports)}")
    keys["request-rx-copy"] = "1"
    keys["feature-rx-notify"] = "1"
    if sg:
        keys["feature-sg"] = "1"
    keys["feature-no-csum-offload"] = "1"
    return keys


def lowest_free_index(used: Iterable[int]) -> int:
    used = set(used)
    n = 0
    while n in used:
        n += 1
    return n


# ---------------------------------------------------------------------------------
# The data path
# ---------------------------------------------------------------------------------
@dataclass(eq=False)
class GrantedPage:
    """A pool page: its grant ref for the backend and a view of its bytes."""

    gref: int
    buf: memoryview


@dataclass
class Counters:
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0  # NETIF_RSP_ERROR (or a frame we could not send)
    tx_dropped: int = 0  # NETIF_RSP_DROPPED, too large, dropped on close / migration
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0  # bad chains from the backend
    rx_dropped: int = 0  # good frames the tap would not take
    rx_csum_blank: int = 0  # frames flagged csum_blank despite feature-no-csum-offload
    tx_slots: int = 0
    rx_slots: int = 0


@dataclass(eq=False)
class _TxPacket:
    length: int
    ids: list[int]
    remaining: int
    status: int = NETIF_RSP_OKAY
    done: threading.Event = field(default_factory=threading.Event)


class EngineState:
    DETACHED = "detached"  # no ring (before connecting, during migration): nothing is sent
    ATTACHED = "attached"  # rings up, rx posted; tx waits for the backend to be Connected
    RUNNING = "running"
    CLOSING = "closing"  # no new tx; in-flight tx completes
    CLOSED = "closed"


class VifEngine:
    """One vif's tx and rx rings; outlives reconnections.

    attach(tx_ring, rx_ring, tx_pool, rx_pool, kick_tx, kick_rx) gives it
    rings (fresh, SHARED_RING_INIT'd), one granted page per tx slot and per
    rx slot, and the functions that notify the backend; rx buffers are posted
    at once.  start() lets transmits through.  `deliver(frame)` receives each
    good rx frame (returns False when it could not take it).
    """

    def __init__(self, name: str, deliver: Callable[[bytes], bool]) -> None:
        self.name = name
        self.deliver = deliver
        self.state = EngineState.DETACHED
        self.counters = Counters()
        self._tx = threading.Condition()
        self._rx = threading.RLock()
        self.tx_ring: FrontRing | None = None
        self.rx_ring: FrontRing | None = None
        self.tx_pool: list[GrantedPage] = []
        self.rx_pool: list[GrantedPage] = []
        self._kick_tx: Callable[[], None] = lambda: None
        self._kick_rx: Callable[[], None] = lambda: None
        self._tx_free: list[int] = []
        self._tx_inflight: dict[int, _TxPacket] = {}
        self._rx_asm = RxReassembler()
        self._warned_ids = False
        self.max_tx_slots = XEN_NETIF_NR_SLOTS_MIN  # 1 when the backend has no feature-sg
        # Suspend: while frozen nothing is transmitted (the tap reader stops
        # reading, so the guest's stack queues or drops what it sends, as
        # on a stopped queue); frames in flight stay until answered or, on
        # a resume onto new rings, are counted as dropped (detach).
        self.frozen = False

    # -- lifecycle ---------------------------------------------------------------------
    def attach(self, tx_ring: FrontRing, rx_ring: FrontRing, tx_pool: Sequence[GrantedPage],
               rx_pool: Sequence[GrantedPage], kick_tx: Callable[[], None],
               kick_rx: Callable[[], None] | None = None) -> None:
        if len(tx_pool) < tx_ring.size or len(rx_pool) < rx_ring.size:
            raise ValueError(f"need {tx_ring.size} tx and {rx_ring.size} rx pages, "
                             f"got {len(tx_pool)} and {len(rx_pool)}")
        with self._tx, self._rx:
            if self.state in (EngineState.CLOSING, EngineState.CLOSED):
                raise RuntimeError(f"cannot attach a {self.state} engine")
            self.tx_ring, self.rx_ring = tx_ring, rx_ring
            self.tx_pool, self.rx_pool = list(tx_pool), list(rx_pool)
            self._kick_tx = kick_tx
            self._kick_rx = kick_rx or kick_tx
            self._tx_free = list(range(tx_ring.size - 1, -1, -1))  # pop() gives 0 first
            self._tx_inflight = {}
            self._rx_asm = RxReassembler()
            self.state = EngineState.ATTACHED
            self._fill_rx()
            self._tx.notify_all()

    def start(self) -> None:
        """The backend is Connected: transmits may go."""
        with self._tx:
            if self.state == EngineState.ATTACHED:
                self.state = EngineState.RUNNING
                self._tx.notify_all()

    def detach(self) -> int:
        """Forget the rings (their pages are the caller's to free).  Frames
        still in flight on the tx ring are counted as dropped (Linux:
        xennet_release_tx_bufs); returns how many."""
        with self._tx, self._rx:
            lost = self._drop_inflight()
            self.tx_ring = self.rx_ring = None
            self.tx_pool, self.rx_pool, self._tx_free = [], [], []
            self._rx_asm = RxReassembler()
            if self.state in (EngineState.ATTACHED, EngineState.RUNNING):
                self.state = EngineState.DETACHED
            self._tx.notify_all()
            return lost

    def begin_close(self) -> None:
        with self._tx:
            if self.state != EngineState.CLOSED:
                self.state = EngineState.CLOSING
            self._tx.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every tx frame in flight has its responses (True) or
        `timeout` passed.  Takes responses itself too, so a lost event
        cannot make it wait for nothing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.handle_tx_responses()
            with self._tx:
                if not self._tx_inflight or self.tx_ring is None:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._tx.wait(0.1 if left is None else min(0.1, left))

    def close(self) -> None:
        with self._tx, self._rx:
            self._drop_inflight()
            self.state = EngineState.CLOSED
            self._tx.notify_all()

    def reopen(self) -> None:
        """After a closedown, for a new connection on the same device."""
        with self._tx:
            if self.state in (EngineState.CLOSING, EngineState.CLOSED):
                self.state = EngineState.DETACHED

    def _drop_inflight(self) -> int:  # both locks held
        lost = 0
        for pkt in {id(p): p for p in self._tx_inflight.values()}.values():
            if not pkt.done.is_set():
                lost += 1
                self.counters.tx_dropped += 1
                pkt.status = NETIF_RSP_DROPPED
                pkt.done.set()
        self._tx_inflight = {}
        return lost

    def inflight(self) -> int:
        with self._tx:
            return len({id(p) for p in self._tx_inflight.values()})

    def wait_running(self, timeout: float | None = None) -> bool:
        with self._tx:
            return self._tx.wait_for(lambda: self.state == EngineState.RUNNING and not self.frozen, timeout)

    def freeze(self) -> int:
        """No new transmits; returns the frames in flight."""
        with self._tx:
            self.frozen = True
            self._tx.notify_all()
            return len({id(p) for p in self._tx_inflight.values()})

    def thaw(self) -> None:
        with self._tx:
            self.frozen = False
            self._tx.notify_all()

    # -- transmit ------------------------------------------------------------------------
    def transmit(self, frame: bytes | memoryview, timeout: float | None = None) -> _TxPacket | None:
        """Put one frame on the tx ring (waiting for free slots while the
        ring is full: backpressure).  Returns the in-flight packet, or None
        when it was dropped (not running, too large, timed out)."""
        length = len(frame)
        if length < ETH_HLEN or length > XEN_NETIF_MAX_TX_SIZE:
            with self._tx:
                self.counters.tx_dropped += 1
            log.debug("%s: dropping a %d-byte frame", self.name, length)
            return None
        nslots = tx_slots_needed(length)
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(frame).cast("B")
        with self._tx:
            while True:
                if self.state != EngineState.RUNNING or self.frozen:
                    self.counters.tx_dropped += 1
                    return None
                if nslots > min(self.tx_ring.size, self.max_tx_slots):
                    self.counters.tx_dropped += 1
                    return None
                self._tx_gc()  # xennet_tx_buf_gc: take what is answered already
                if len(self._tx_free) >= nslots and self.tx_ring.free_requests() >= nslots:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.counters.tx_dropped += 1
                    return None
                self._tx.wait(0.5 if left is None else min(0.5, left))
            ids = [self._tx_free.pop() for _ in range(nslots)]
            pos = 0
            for rid, size in zip(ids, tx_slot_sizes(length)):
                self.tx_pool[rid].buf[:size] = view[pos:pos + size]
                pos += size
            pkt = _TxPacket(length, ids, nslots)
            for req in build_tx_requests(length, [(rid, self.tx_pool[rid].gref) for rid in ids]):
                self.tx_ring.put_request(req.encode())
                self._tx_inflight[req.id] = pkt
            self.counters.tx_slots += nslots
            if self.tx_ring.push_requests_and_check_notify():
                self._kick_tx()
            return pkt

    def handle_tx_responses(self) -> int:
        """Take every tx response, then the final check, until quiet.
        RingError / MalformedMessage propagate (the backend broke the ring)."""
        with self._tx:
            if self.tx_ring is None:
                return 0
            taken = 0
            while True:
                taken += self._tx_gc()
                if not self.tx_ring.final_check_for_responses():
                    break
            return taken

    def _tx_gc(self) -> int:  # tx lock held
        ring, taken = self.tx_ring, 0
        while ring.unconsumed_responses():
            rsp = NetifTxResponse.decode(ring.take_response())
            taken += 1
            if rsp.status == NETIF_RSP_NULL:
                continue  # an extra-info slot's answer (we send none)
            pkt = self._tx_inflight.pop(rsp.id, None)
            if pkt is None:
                raise MalformedMessage(f"tx response for id {rsp.id}, which is not in flight")
            self._tx_free.append(rsp.id)
            if rsp.status != NETIF_RSP_OKAY and pkt.status == NETIF_RSP_OKAY:
                pkt.status = rsp.status
            pkt.remaining -= 1
            if pkt.remaining == 0:
                c = self.counters
                if pkt.status == NETIF_RSP_OKAY:
                    c.tx_packets += 1
                    c.tx_bytes += pkt.length
                elif pkt.status == NETIF_RSP_DROPPED:
                    c.tx_dropped += 1
                else:
                    c.tx_errors += 1
                pkt.done.set()
        if taken:
            self._tx.notify_all()
        return taken

    # -- receive ---------------------------------------------------------------------------
    def _fill_rx(self) -> None:  # rx lock held
        """Post a buffer in every free rx slot (xennet_alloc_rx_buffers); the
        buffer's id is its ring index modulo the ring size."""
        ring = self.rx_ring
        if ring is None:
            return
        mask = ring.size - 1
        posted = 0
        while ring.free_requests() > 0:
            rid = ring.req_prod_pvt & mask
            ring.put_request(NetifRxRequest(rid, self.rx_pool[rid].gref).encode())
            posted += 1
        if posted and ring.push_requests_and_check_notify():
            self._kick_rx()

    def handle_rx_responses(self) -> int:
        """Take every rx response, deliver the frames, post the buffers again,
        final check, until quiet.  Returns slots taken."""
        with self._rx:
            ring = self.rx_ring
            if ring is None:
                return 0
            taken = 0
            mask = ring.size - 1
            while True:
                while ring.unconsumed_responses():
                    index = ring.rsp_cons
                    slot = ring.take_response()
                    taken += 1
                    frame = self._rx_asm.feed(slot, lambda rid, off, size, index=index: self._rx_bytes(rid, index & mask, off, size))
                    if frame is not None:
                        self._rx_frame(frame)
                    if ring.free_requests() >= 32:  # re-post in batches, as Linux's NET_RX_SLOTS_MIN
                        self._fill_rx()
                self._fill_rx()
                if not ring.final_check_for_responses():
                    break
            self.counters.rx_slots += taken
            return taken

    def _rx_bytes(self, rid: int, index_id: int, offset: int, size: int) -> memoryview:
        if rid >= len(self.rx_pool):
            raise MalformedMessage(f"rx response for buffer id {rid}, ring has {len(self.rx_pool)}")
        if rid != index_id and not self._warned_ids:
            # netback answers in request order with the request's id (Linux
            # netfront relies on it); the data are still where the id says
            self._warned_ids = True
            log.warning("%s: rx response id %d in the slot of buffer %d: backend answers out of order",
                        self.name, rid, index_id)
        return self.rx_pool[rid].buf[offset:offset + size]

    def _rx_frame(self, frame: RxFrame) -> None:
        c = self.counters
        if not frame.ok:
            c.rx_errors += 1
            log.debug("%s: dropping an rx chain of %d slots: %s", self.name, frame.slots, frame.reason)
            return
        data = frame.data
        if frame.csum_blank:  # despite feature-no-csum-offload: complete it, as Linux would
            c.rx_csum_blank += 1
            data = complete_checksum(data)
        try:
            ok = self.deliver(data)
        except Exception as exc:
            log.debug("%s: delivering a frame: %s", self.name, exc)
            ok = False
        if ok is False:
            c.rx_dropped += 1
        else:
            c.rx_packets += 1
            c.rx_bytes += len(data)

    def kick(self) -> None:
        """Notify the backend on every channel (after it connected: it may
        have missed buffers posted before it mapped the ring)."""
        self._kick_rx()
        if self._kick_tx is not self._kick_rx:
            self._kick_tx()


# ---------------------------------------------------------------------------------
# The driver (XenbusDriver for type "vif")
# ---------------------------------------------------------------------------------
class _Connection:
    """One connection's resources: ring pages, grants, ports, data pools."""

    def __init__(self) -> None:
        self.pages: list = []  # every page we allocated, for freeing
        self.grefs: list[int] = []  # every grant we made, for ending
        self.views: list[memoryview] = []
        self.tx_ring: FrontRing | None = None
        self.rx_ring: FrontRing | None = None
        self.tx_ref: int | None = None
        self.rx_ref: int | None = None
        self.ports: list[int] = []  # [shared] or [tx, rx]
        self.features: BackendFeatures | None = None

    @property
    def split(self) -> bool:
        return len(self.ports) == 2


class Vif:
    """netfront_info: one virtual interface of this guest."""

    def __init__(self, dev, devid: int, mac: bytes, ifname: str, index: int) -> None:
        self.dev = dev
        self.devid = devid
        self.mac = mac
        self.ifname = ifname
        self.index = index
        self.tap = None
        self.engine = VifEngine(ifname, self._deliver)
        self.conn: _Connection | None = None
        self.mtu = DEFAULT_MTU
        self.carrier = False
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.reader: threading.Thread | None = None
        self.connects = 0
        self.resets = 0  # connections lost to a backend restart
        self.mtu_changes = 0  # applied while connected (the `mtu` watch)
        self.mtu_watch: tuple[str, str] | None = None
        self.rewatch_mtu = False  # set by a live migration's relocation, done by resume
        self.garps = 0
        self.leaked_grants = 0  # grants the backend still mapped when we ended them

    def _deliver(self, frame: bytes) -> bool:
        tap = self.tap
        return tap.write(frame) if tap is not None else False

    def status(self) -> dict:
        conn = self.conn
        return {
            "devid": self.devid,
            "ifname": self.ifname,
            "mac": format_mac(self.mac),
            "mtu": self.mtu,
            "nodename": self.dev.nodename,
            "backend": self.dev.otherend,
            "backend_id": self.dev.otherend_id,
            "state": XenbusState(self.dev.state).name,
            "engine": self.engine.state,
            "carrier": self.carrier,
            "connects": self.connects,
            "resets": self.resets,
            "mtu_changes": self.mtu_changes,
            "leaked_grants": self.leaked_grants,
            "gratuitous_arps": self.garps,
            "split_event_channels": bool(conn and conn.split),
            "tx_ring_ref": conn.tx_ref if conn else None,
            "rx_ring_ref": conn.rx_ref if conn else None,
            "event_channels": list(conn.ports) if conn else [],
            "tx_inflight": self.engine.inflight(),
            **asdict(self.engine.counters),
            "time": time.time(),
        }


def _open_tap(name: str):
    from .tapdev import TapDevice

    return TapDevice.open(name)


class NetFront(XenbusDriver):
    """The vif frontend driver.  `tap_factory(name)` opens the tap (tests
    pass a fake); `status_dir` gets one JSON file per vif (None: none)."""

    devicetype = "vif"

    def __init__(self, xen: GuestXen, *, tap_factory: Callable[[str], object] = _open_tap,
                 status_dir: str | None = DEFAULT_STATUS_DIR, drain_timeout: float = 5.0,
                 split_event_channels: bool = True) -> None:
        self.xen = xen
        self.tap_factory = tap_factory
        self.status_dir = status_dir
        self.drain_timeout = drain_timeout
        self.want_split = split_event_channels
        self.vifs: dict[str, Vif] = {}  # nodename -> Vif
        self._lock = threading.Lock()

    # -- XenbusDriver ------------------------------------------------------------------
    def probe(self, dev) -> None:
        """Read the MAC, create the tap (down, carrier off); the rings wait for
        the backend's InitWait."""
        try:
            devid = int(dev.nodename.rsplit("/", 1)[1])
            mac = parse_mac(dev.read("mac"))
        except ValueError as exc:
            dev.dev_fatal(errno.EINVAL, f"reading mac: {exc}")
            raise XenbusFatal(str(exc)) from exc
        with self._lock:
            index = lowest_free_index(v.index for v in self.vifs.values())
            vif = Vif(dev, devid, mac, f"eth{index}", index)
            self.vifs[dev.nodename] = vif
        try:
            vif.tap = self.tap_factory(vif.ifname)
            vif.ifname = getattr(vif.tap, "name", vif.ifname)
            vif.tap.set_carrier(False)
            vif.tap.set_mac(format_mac(mac))
        except Exception as exc:
            with self._lock:
                self.vifs.pop(dev.nodename, None)
            if vif.tap is not None:
                vif.tap.close()
            dev.dev_fatal(exc, f"creating tap {vif.ifname}")
            raise XenbusFatal(str(exc)) from exc
        dev.priv = vif
        self._watch_mtu(vif)
        vif.reader = threading.Thread(target=self._tap_reader, args=(vif,), name=f"netfront-{vif.ifname}",
                                      daemon=True)
        vif.reader.start()
        log.info("%s (%s): mac %s, waiting for the backend", vif.ifname, dev.nodename, format_mac(mac))
        self._write_status(vif)

    def otherend_changed(self, dev, state) -> None:
        vif: Vif | None = dev.priv
        if vif is None:
            return
        S = XenbusState
        log.info("%s (%s): backend %s, we are %s", vif.ifname, dev.nodename, S(state).name, S(dev.state).name)
        with vif.lock:
            if state == S.InitWait:
                if dev.state == S.Initialising and vif.conn is None:
                    self._talk_to_backend(vif)
            elif state == S.Connected:
                if dev.state == S.Connected and vif.conn is not None:
                    self._backend_connected(vif)
            elif state == S.Closing:
                self._closing(vif)
            elif state == S.Closed:
                if dev.state in (S.Initialised, S.Connected):
                    # Straight to Closed, no Closing first: not an unplug (the
                    # toolstack asks with Closing) but a backend that lost the
                    # connection -- a restarted netback or dom0 recovering the
                    # device (drivers/net/back.py, recover).
                    self._backend_lost(vif)
                elif dev.state in (S.Closing, S.Closed):
                    if dev.state == S.Closing:
                        self._closing(vif)
                    self._free_connection(vif)  # the backend has unmapped everything by now
                # Initialising: we reset already and wait for its InitWait
            # Initialising, Initialised, Unknown, Reconfiguring/ed: nothing to do
        self._write_status(vif)

    def remove(self, dev) -> None:
        vif: Vif | None = dev.priv
        if vif is None:
            return
        with self._lock:
            self.vifs.pop(dev.nodename, None)
        self._unwatch_mtu(vif)
        with vif.lock:
            self._carrier(vif, False)
            vif.stop.set()
            vif.engine.begin_close()
            vif.engine.drain(min(self.drain_timeout, 2.0))
            vif.engine.close()
            self._free_connection(vif)
            if vif.tap is not None:
                vif.tap.close()  # the interface disappears with the device
        if vif.reader is not None:
            vif.reader.join(2.0)
        self._remove_status(vif)
        dev.priv = None
        log.info("%s (%s): removed", vif.ifname, dev.nodename)

    def relocated(self, dev, old_nodename: str) -> None:
        """Live migration (XenBus.relocate): the device has a new path; the
        ports and grant refs of its connection were the old host's -- they
        went with it and must not be closed or ended on this one (the pages
        are the guest's and are freed here by resume)."""
        vif: Vif | None = dev.priv
        if vif is None:
            return
        with self._lock:
            if self.vifs.get(old_nodename) is vif:
                del self.vifs[old_nodename]
            self.vifs[dev.nodename] = vif
        # The MTU watch names the old path; it is set again by resume(), once
        # the new backend is known (a watch fires at once and reads it).
        vif.rewatch_mtu = vif.mtu_watch is not None
        self._unwatch_mtu(vif)
        if vif.conn is not None:
            vif.conn.ports, vif.conn.grefs = [], []

    def resume(self, dev) -> None:
        """After migration: forget the old rings (the tap stays), and connect
        afresh when the new backend is in InitWait."""
        vif: Vif | None = dev.priv
        if vif is None:
            return
        with vif.lock:
            self._carrier(vif, False)
            lost = vif.engine.detach()
            if lost:
                log.info("%s: %d frame(s) in flight on the old ring dropped", vif.ifname, lost)
            self._free_connection(vif)
            vif.engine.reopen()
        if vif.rewatch_mtu:
            vif.rewatch_mtu = False
            self._watch_mtu(vif)
        self._write_status(vif)

    # -- suspend (docs/suspend-resume.md) -----------------------------------------------
    def freeze(self) -> dict:
        """Before the suspend hypercall: nothing more goes on the tx rings
        (eth0 stays, with its carrier: the guest just stops running)."""
        with self._lock:
            vifs = list(self.vifs.values())
        return {"inflight": {vif.ifname: vif.engine.freeze() for vif in vifs}}

    def thaw(self, cancelled: bool) -> dict:
        """After the hypercall.  Cancelled: transmit again on the same rings,
        take what came meanwhile.  Not cancelled: `resume` (called by the
        bus already) forgot the old rings; the new backend's InitWait makes
        new ones and its Connected brings the carrier back."""
        with self._lock:
            vifs = list(self.vifs.values())
        for vif in vifs:
            vif.engine.thaw()
            if cancelled:
                try:
                    vif.engine.handle_tx_responses()
                    vif.engine.handle_rx_responses()
                except Exception as exc:
                    log.warning("%s: taking responses after a cancelled suspend: %s", vif.ifname, exc)
            self._write_status(vif)
        return {"interfaces": [vif.ifname for vif in vifs]}

    def _backend_lost(self, vif: Vif) -> None:
        """The backend went away under a live connection (it was killed, and
        a new one recovered the device).  Reset the XenBus side and keep the
        tap: carrier off, so the guest's stack queues or drops what it sends
        (Ethernet may drop; frames in flight on the old tx ring are counted as
        dropped, as Linux's xennet_release_tx_bufs does), the old rings'
        grants ended and pages freed, the ports closed (the dead backend's
        mappings and bindings went with its hypervisor link, so nothing is
        held on the other side any more), then Closed -> Initialising as
        Linux's xenbus_reset_frontend does.  The backend's next InitWait
        starts new rings (talk_to_backend); its Connected brings the carrier
        back and a gratuitous ARP tells the bridge and the peers where we
        are (netdev_notify_peers)."""
        dev = vif.dev
        self._carrier(vif, False)
        lost = vif.engine.detach()
        log.warning("%s: backend %s went Closed while we were %s: reconnecting on new rings, "
                    "%d frame(s) in flight dropped", vif.ifname, dev.otherend, XenbusState(dev.state).name, lost)
        self._free_connection(vif)
        vif.engine.reopen()
        vif.resets += 1
        dev.switch_state(XenbusState.Closed)
        dev.switch_state(XenbusState.Initialising)

    # -- connection ----------------------------------------------------------------------
    def _talk_to_backend(self, vif: Vif) -> None:
        """talk_to_netback: rings, grants, port(s), the nodes in ONE
        transaction, rx buffers posted, Connected."""
        dev, xen = vif.dev, self.xen
        features = BackendFeatures.parse(dev.otherend_read)
        if not features.rx_copy:
            dev.dev_fatal(errno.EOPNOTSUPP, "backend does not support copying receive path (feature-rx-copy)")
            raise XenbusFatal(f"{dev.nodename}: backend has no feature-rx-copy")
        conn = _Connection()
        conn.features = features
        try:
            tx_page, rx_page = xen.mem.alloc(2)
            conn.pages += [tx_page, rx_page]
            SharedRing.init(tx_page.mmap)
            SharedRing.init(rx_page.mmap)
            conn.tx_ring = FrontRing(tx_page.mmap, TX_RING_ENTRY_SIZE)
            conn.rx_ring = FrontRing(rx_page.mmap, RX_RING_ENTRY_SIZE)
            conn.tx_ref, conn.rx_ref = self._grant_rings(dev, [tx_page, rx_page])
            conn.grefs += [conn.tx_ref, conn.rx_ref]
            ntx, nrx = conn.tx_ring.size, conn.rx_ring.size
            pool = xen.mem.alloc(ntx + nrx)
            conn.pages += pool
            tx_pool, rx_pool = [], []
            for i, page in enumerate(pool):
                readonly = i < ntx  # the backend only reads what we send
                gref = xen.gnttab.grant(dev.otherend_id, page, readonly)
                conn.grefs.append(gref)
                view = memoryview(page.mmap)
                conn.views.append(view)
                (tx_pool if readonly else rx_pool).append(GrantedPage(gref, view))
            if features.split_event_channels and self.want_split:
                conn.ports = [xen.evtchn.alloc_unbound(dev.otherend_id), xen.evtchn.alloc_unbound(dev.otherend_id)]
            else:
                conn.ports = [xen.evtchn.alloc_unbound(dev.otherend_id)]
        except XenbusFatal:
            self._release(conn)
            raise
        except Exception as exc:
            self._release(conn)
            dev.dev_fatal(exc, "setting up rings")
            raise XenbusFatal(f"{dev.nodename}: setting up rings: {exc}") from exc

        keys = frontend_keys(conn.tx_ref, conn.rx_ref, conn.ports, sg=True)

        def body(tx: int) -> None:
            for key, value in keys.items():
                dev.write(key, value, tx)

        evtchn = self.xen.evtchn
        if conn.split:
            tx_port, rx_port = conn.ports
            evtchn.on_event(tx_port, lambda p, vif=vif, conn=conn: self._on_event(vif, conn, p, tx=True, rx=False))
            evtchn.on_event(rx_port, lambda p, vif=vif, conn=conn: self._on_event(vif, conn, p, tx=False, rx=True))
            kick_tx, kick_rx = (lambda: evtchn.notify(tx_port)), (lambda: evtchn.notify(rx_port))
        else:
            port = conn.ports[0]
            evtchn.on_event(port, lambda p, vif=vif, conn=conn: self._on_event(vif, conn, p, tx=True, rx=True))
            kick_tx = kick_rx = (lambda: evtchn.notify(port))
        vif.conn = conn
        try:
            dev.store.run_transaction(body)
        except Exception as exc:
            vif.conn = None
            self._release(conn)
            dev.dev_fatal(exc, "writing tx-ring-ref/rx-ring-ref/event-channel")
            raise XenbusFatal(str(exc)) from exc
        vif.engine.reopen()
        vif.engine.max_tx_slots = XEN_NETIF_NR_SLOTS_MIN if features.sg else 1
        vif.engine.attach(conn.tx_ring, conn.rx_ring, tx_pool, rx_pool, kick_tx, kick_rx)
        log.info("%s: rings granted (tx %d, rx %d), %s %s, %d rx buffers posted", vif.ifname, conn.tx_ref,
                 conn.rx_ref, "event channels" if conn.split else "event channel",
                 "/".join(map(str, conn.ports)), conn.rx_ring.size)
        dev.switch_state(XenbusState.Connected)  # netfront skips Initialised (seed 000)

    def _grant_rings(self, dev, pages) -> list[int]:
        hooks = getattr(getattr(dev, "bus", None), "hooks", None)
        if hooks is not None and hooks.grant_access is not None:
            return dev.grant_ring([p.gfn for p in pages])
        return [self.xen.gnttab.grant(dev.otherend_id, p) for p in pages]

    def _on_event(self, vif: Vif, conn: _Connection, port: int, *, tx: bool, rx: bool) -> None:
        if vif.conn is not conn:
            return
        try:
            self.xen.evtchn.clear(port)
            if tx:
                vif.engine.handle_tx_responses()
            if rx:
                vif.engine.handle_rx_responses()
        except (RingError, MalformedMessage) as exc:
            log.error("%s: backend broke the ring: %s", vif.ifname, exc)
            self._carrier(vif, False)
            vif.engine.begin_close()
            vif.dev.dev_fatal(errno.EIO, f"bad ring from backend: {exc}")
        except Exception as exc:  # link closed while tearing down, etc.
            log.debug("%s: event on port %d: %s", vif.ifname, port, exc)

    def _backend_connected(self, vif: Vif) -> None:
        """The backend mapped our rings: MTU, tap up, carrier on, transmit,
        gratuitous ARP (netdev_notify_peers)."""
        dev = vif.dev
        vif.mtu = vif_mtu(dev.read, dev.otherend_read)
        tap = vif.tap
        try:
            tap.set_mtu(vif.mtu)
            tap.set_up(True)
        except Exception as exc:
            log.warning("%s: bringing the tap up: %s", vif.ifname, exc)
        vif.engine.start()
        self._carrier(vif, True)
        vif.engine.kick()  # buffers posted before the backend mapped the ring
        vif.connects += 1
        log.info("%s: connected to %s (mtu %d)", vif.ifname, dev.otherend, vif.mtu)
        self.notify_peers(vif)

    # -- live reconfiguration: the MTU ----------------------------------------------------
    def _watch_mtu(self, vif: Vif) -> None:
        """Watch our own `mtu` node (netif.h's place for it): the toolstack
        changes it while we stay Connected (see the module docstring)."""
        dev = vif.dev
        path, token = f"{dev.nodename}/mtu", f"netfront:mtu:{dev.nodename}"
        try:
            dev.store.watch(path, token, lambda _p, _t, vif=vif: self._mtu_changed(vif))
        except Exception as exc:  # no live MTU changes then; the MTU is still read at connect
            log.warning("%s: cannot watch %s: %s", vif.ifname, path, exc)
            return
        vif.mtu_watch = (path, token)

    def _unwatch_mtu(self, vif: Vif) -> None:
        watch, vif.mtu_watch = vif.mtu_watch, None
        if watch is not None:
            _quietly(vif.dev.store.unwatch, *watch)

    def _mtu_changed(self, vif: Vif) -> None:
        """Apply a new MTU to the tap while connected (before that, the
        backend's Connected reads it).  No state change: the rings carry
        frames of any size, nothing is renegotiated."""
        dev = vif.dev
        with vif.lock:
            if dev.state != XenbusState.Connected or not vif.carrier or vif.tap is None:
                return
            mtu = vif_mtu(dev.read, dev.otherend_read)
            if mtu == vif.mtu:
                return
            try:
                vif.tap.set_mtu(mtu)
            except Exception as exc:
                log.warning("%s: setting mtu %d: %s", vif.ifname, mtu, exc)
                return
            log.info("%s: mtu %d -> %d (reconfigured while connected)", vif.ifname, vif.mtu, mtu)
            vif.mtu = mtu
            vif.mtu_changes += 1
        self._write_status(vif)

    def notify_peers(self, vif: Vif) -> int:
        """A gratuitous ARP for each IPv4 address of the tap, put on the tx
        ring by netfront itself.  Returns how many were sent."""
        try:
            addrs = vif.tap.ipv4_addresses()
        except Exception as exc:
            log.debug("%s: reading addresses: %s", vif.ifname, exc)
            addrs = []
        sent = 0
        for ip in addrs:
            if vif.engine.transmit(gratuitous_arp(vif.mac, ip), timeout=1.0) is not None:
                sent += 1
        if sent:
            vif.garps += sent
            log.info("%s: gratuitous ARP for %s", vif.ifname, ", ".join(addrs))
        return sent

    def _carrier(self, vif: Vif, on: bool) -> None:
        vif.carrier = on
        if vif.tap is not None:
            try:
                vif.tap.set_carrier(on)
            except Exception as exc:
                log.debug("%s: carrier %s: %s", vif.ifname, on, exc)

    def _closing(self, vif: Vif) -> None:
        """Seed 000 closedown: Closing, stop transmitting, flush what is in
        flight, Closed.  The tap stays."""
        dev = vif.dev
        if dev.state == XenbusState.Closed:
            return
        dev.switch_state(XenbusState.Closing)
        self._carrier(vif, False)
        vif.engine.begin_close()
        if not vif.engine.drain(self.drain_timeout):
            log.warning("%s: %d frame(s) still in flight after %.0fs: dropped", vif.ifname,
                        vif.engine.inflight(), self.drain_timeout)
        vif.engine.close()
        dev.switch_state(XenbusState.Closed)

    # -- the tap reader ------------------------------------------------------------------
    def _tap_reader(self, vif: Vif) -> None:
        """Frames the guest sends go on the tx ring.  While there is no
        running connection nothing is read: the tap's own queue holds (or
        drops) what the stack sends, with the carrier off it sends nothing."""
        engine = vif.engine
        while not vif.stop.is_set():
            if not engine.wait_running(0.5):
                continue
            tap = vif.tap
            if tap is None:
                return
            frame = tap.read(0.5)
            if frame is None:
                if getattr(tap, "closed", False):
                    return
                continue
            try:
                engine.transmit(frame)
            except (RingError, MalformedMessage) as exc:
                log.error("%s: backend broke the tx ring: %s", vif.ifname, exc)
                engine.begin_close()
                vif.dev.dev_fatal(errno.EIO, f"bad tx ring from backend: {exc}")
            except Exception as exc:
                log.warning("%s: transmit: %s", vif.ifname, exc)

    # -- freeing -------------------------------------------------------------------------
    def _free_connection(self, vif: Vif) -> None:
        conn, vif.conn = vif.conn, None
        if conn is not None:
            vif.engine.detach()
            leaked = self._release(conn)
            if leaked:
                vif.leaked_grants += leaked
                log.warning("%s: %d grant(s) still mapped by the backend could not be ended", vif.ifname, leaked)

    def _release(self, conn: _Connection) -> int:
        """Free one connection's ports, grants and pages; returns how many
        grants could not be ended (the backend still maps them)."""
        xen = self.xen
        leaked = 0
        for port in conn.ports:
            xen.evtchn.remove_callbacks(port)
            _quietly(xen.evtchn.close, port)
        for gref in conn.grefs:
            try:
                xen.gnttab.end(gref)
            except Exception as exc:  # still mapped (backend alive): the page leaks, as in Linux
                log.debug("ending grant %d: %s", gref, exc)
                leaked += 1
        for view in conn.views:
            view.release()
        for ring in (conn.tx_ring, conn.rx_ring):
            if ring is not None:
                ring.release()
        if conn.pages:
            _quietly(xen.mem.free, conn.pages)
        conn.ports, conn.grefs, conn.views, conn.pages = [], [], [], []
        conn.tx_ring = conn.rx_ring = None
        return leaked

    def close_all(self, timeout: float = 5.0) -> None:
        """Guest shutdown: every vif goes Closing, waits briefly for the
        backend, then Closed (xenbus_frontend_dev_shutdown)."""
        with self._lock:
            vifs = list(self.vifs.values())
        for vif in vifs:
            dev = vif.dev
            with vif.lock:
                self._carrier(vif, False)
                vif.engine.begin_close()
                vif.engine.drain(min(timeout, 2.0))
                vif.engine.close()
                if dev.state not in (XenbusState.Closed, XenbusState.Closing):
                    dev.switch_state(XenbusState.Closing)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                other = XenbusState.parse(dev.otherend_read("state"))
                if other in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
                    break
                time.sleep(0.05)
            dev.switch_state(XenbusState.Closed)
            vif.stop.set()
            self._write_status(vif)

    # -- status ------------------------------------------------------------------------------
    def _status_path(self, vif: Vif) -> str | None:
        return None if not self.status_dir else os.path.join(self.status_dir, f"{vif.devid}.json")

    def _write_status(self, vif: Vif) -> None:
        path = self._status_path(vif)
        if path is None:
            return
        try:
            os.makedirs(self.status_dir, exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(vif.status(), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except Exception as exc:
            log.debug("%s: writing %s: %s", vif.ifname, path, exc)

    def _remove_status(self, vif: Vif) -> None:
        path = self._status_path(vif)
        if path is not None:
            _quietly(os.unlink, path)

    def write_all_status(self) -> None:
        with self._lock:
            vifs = list(self.vifs.values())
        for vif in vifs:
            self._write_status(vif)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:
        log.debug("%s%r: %s", getattr(fn, "__name__", fn), args, exc)


# ---------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.net.front",
                                     description="xenbed netfront: each vif as a tap eth<N>")
    parser.add_argument("--status-dir", default=os.environ.get("XENBED_VIF_STATUS_DIR", DEFAULT_STATUS_DIR),
                        help="one <devid>.json of counters per vif ('' for none)")
    parser.add_argument("--no-split", action="store_true",
                        help="one event channel even when the backend offers split tx/rx channels")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"),
                        help="JSONL file to record our XenBus state changes in")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="netfront: %(levelname)s %(name)s: %(message)s")

    try:
        from xenbed.drivers.xenbus.daemon import run_frontend
    except ImportError as exc:  # the kernel restarts a module that exits: idle instead
        log.error("no XenBus in this image (%s): netfront idles until SIGTERM", exc)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return 0

    return run_frontend("netfront", lambda xen: NetFront(xen, status_dir=args.status_dir or None,
                                                         split_event_channels=not args.no_split),
                        transitions=args.transitions, tick=lambda driver: driver.write_all_status())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
