"""netback: the PV network backend, serving a guest's netfront through a tap.

How it is started (in dom0, or a driver domain, long-lived):

    python3 -m xenbed.drivers.net.back [--domid N] [--run-hotplug]
                                       [--bridge xenbr0] [--uplink auto|eth0|none|skip]

At start it brings dom0's bridge up (drivers/net/bridge.py: xenbr0 takes
eth0's addresses and default route; idempotent; `--uplink skip` or
XENBED_BRIDGE_SETUP=0 leaves the network alone).  Environment as blkback's.

`Netback` is a `XenbusDriver` for type "vif" on a `BackendBus`, following
Linux's xen-netback/xenbus.c:

* probe: read `handle`; write the features (feature-sg, feature-rx-copy,
  feature-split-event-channels, feature-ipv6-csum-offload = 1;
  feature-gso-tcpv4/6, feature-rx-flip, feature-multicast-control = 0);
  create the tap `vif<domid>.<handle>` (or `vifname`) with MAC
  fe:ff:ff:ff:ff:ff, holding its fd; InitWait; watch `hotplug-status`,
  `rate` and our own `state`.
* frontend Connected (or Initialised): read `tx-ring-ref`, `rx-ring-ref`,
  `event-channel` or `event-channel-tx` + `event-channel-rx`,
  `request-rx-copy` (must be 1: else dev_fatal EOPNOTSUPP, as Linux),
  `feature-rx-notify`, `feature-sg`, `multi-queue-num-queues` (only 1);
  map both rings, bind the port(s), start the vif thread; switch to
  Connected only once `hotplug-status` is "connected" (libxl: the backend
  waits for its hotplug script).
* frontend Closing: drain (the request in hand finishes), unmap, unbind,
  Closing; Closed: Closed, and with `online=0` (toolstack unplug) the tap
  is removed; Initialising after Closed: InitWait again (reconnect).
* recover (a restarted netback, or a restarted dom0, finds the device in
  the store in a state an earlier netback left; drivers/xenbus/probe.py):
  the old vif went with the old process (a tap lives as long as its fd)
  and, when dom0's container was restarted, with the old network namespace
  (xenbr0 and the uplink are set up again by `main` before the bus
  starts).  So the stale `hotplug-status` is removed, the vif created again
  and the hotplug step (bridge membership, MTU, up, `hotplug-status`) run
  here -- the toolstack that ran it is gone too.  A device left Connected
  (or Initialised) goes Closed, which netfront reads as "the backend lost
  the connection": it keeps its tap `eth0` (and the guest's addresses on
  it), frees its old rings, grants and ports, resets to Initialising and
  reconnects on new rings once we are in InitWait, then sends a gratuitous
  ARP.  Until the frontend shows that it reset (Closing, Closed,
  Initialising) its stale Initialised/Connected is ignored: those rings
  were the old process's.  A device left in InitWait stays there and
  connects as at boot.
* reconfiguration while Connected (seed 000: device-specific watches, both
  ends stay Connected): `rate` ("bytes,usecs", libxl's) is a TX credit
  scheduler, re-read on every change (Linux xen_net_rate_changed: the new
  credit applies at once, the current window's credit is clipped to it);
  `mtu` is applied to the vif on every change (libxl's vif-bridge applies
  it only at hotplug; live changes are a xenbed extension, written by
  `xl network-set`, which also writes the frontend's `mtu` node that
  netfront watches -- see drivers/net/front.py).  A bridge's MTU is the
  smallest of its ports' unless set explicitly, so lowering a vif's MTU
  lowers xenbr0's too, as on a real Xen host.

Data path (`NetifServer`, independent of XenBus, one thread per vif):

* TX (guest -> world): every slot is copied out of the ring before it is
  looked at; `parse_tx_packet` validates a packet as Linux's
  xenvif_tx_build_gops/xenvif_count_requests do -- malformed beyond repair
  (extra info missing or of an invalid type, a slot crossing its page, a
  chain longer than the published requests or than 20 slots, a bad GSO
  descriptor) is fatal for the device ("netbk_fatal_tx_err": dev_fatal
  and disconnect); merely bad (a chain over XEN_NETBK_LEGACY_SLOTS_MAX, a
  slot larger than what remains of the packet, a first slot under 14
  bytes) is dropped with NETIF_RSP_ERROR on every data slot.  Good packets
  are gathered with one batched GNTTABOP_copy (guest grefs -> our pages),
  a blank checksum (NETTXF_csum_blank) is filled in (IPv4/IPv6 TCP/UDP),
  the frame is written to the tap, and every slot is answered (OKAY, or
  NETIF_RSP_NULL for extra-info slots).  Multicast-control extras are
  answered OKAY and carry no frame (as Linux).  GSO is not offered: a
  valid GSO packet larger than one MTU is answered ERROR.
* RX (world -> guest): frames read from the tap wait in a short backlog
  until the guest has posted enough rx buffers (ceil(len / 4096) slots),
  are grant-copied into them (one GNTTABOP_copy per batch, our pages ->
  guest grefs) and answered with offset 0, status = bytes in the slot and
  NETRXF_more_data on all but the last; frames that wait longer than
  RX_STALL_SECONDS, or overflow the backlog, are dropped and counted.

Pure helpers (tests/unit/test_netback_*.py): `parse_tx_packet`,
`rx_layout`, `Credit`, `fill_checksum`, `parse_frontend_config`,
`parse_rate`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xenbed.drivers.xenbus import XenbusDevice, XenbusDriver, XenbusState
from xenbed.protocols import netif
from xenbed.protocols.netif import (
    NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETRXF_more_data, NETTXF_csum_blank, NETTXF_extra_info,
    NETTXF_more_data, XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6, XEN_NETIF_NR_SLOTS_MIN, NetifExtraInfo, NetifRxRequest, NetifRxResponse,
    NetifTxRequest, NetifTxResponse,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, RingOverflow, full_barrier

log = logging.getLogger("xenbed.netback")

ETH_HLEN = 14
XEN_NETBK_LEGACY_SLOTS_MAX = XEN_NETIF_NR_SLOTS_MIN  # 18 slots after the first: more is dropped
FATAL_SKB_SLOTS = 20  # FATAL_SKB_SLOTS_DEFAULT: more slots after the first is malicious
VIF_MAC = "fe:ff:ff:ff:ff:ff"  # Linux netback's vif address, so the bridge never takes the guest's
RX_BACKLOG_MAX = 256  # frames waiting for rx buffers
RX_STALL_SECONDS = 2.0  # a frame older than this is dropped (Linux: rx_drain_timeout 10 s)
RX_POLL_SECONDS = 0.03  # frontend without feature-rx-notify: poll (Linux: drain_timeout 30 ms)
TX_BATCH_SLOTS = 64  # local pages per copy batch (each direction)
MAX_BURST = 131072  # tx_add_credit

FEATURES = {
    "feature-sg": "1",
    "feature-gso-tcpv4": "0",
    "feature-gso-tcpv6": "0",
    "feature-ipv6-csum-offload": "1",
    "feature-rx-copy": "1",
    "feature-rx-flip": "0",
    "feature-multicast-control": "0",
    "feature-dynamic-multicast-control": "0",
    "feature-split-event-channels": "1",
}

UNKNOWN, INITIALISING, INITWAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = range(7)
STATE_NAMES = {0: "Unknown", 1: "Initialising", 2: "InitWait", 3: "Initialised", 4: "Connected",
               5: "Closing", 6: "Closed", 7: "Reconfiguring", 8: "Reconfigured"}


# ---------------------------------------------------------------------------------------------
# Pure parts: TX validation
# ---------------------------------------------------------------------------------------------

OK, DROP, FATAL, CONTROL = "ok", "drop", "fatal", "control"


@dataclass(frozen=True)
class Fragment:
    """Bytes of a packet in one granted page."""

    gref: int
    offset: int
    length: int


@dataclass
class TxPacket:
    """One packet taken off the tx ring (or the reason it is refused).

    `verdict`: OK (send `fragments`), DROP (answer ERROR), CONTROL (a
    multicast-control request: answer OKAY, nothing to send) or FATAL (the
    frontend is malicious: `reason`, no responses -- the device goes down).
    `responses` is one (id, status) per ring slot consumed, in ring order
    (status NETIF_RSP_NULL for extra-info slots); for OK the data slots'
    status is filled in by the caller (OKAY, or ERROR if the copy failed)."""

    verdict: str
    reason: str = ""
    size: int = 0
    flags: int = 0
    fragments: list[Fragment] = field(default_factory=list)
    extras: dict[int, NetifExtraInfo] = field(default_factory=dict)
    responses: list[list[int]] = field(default_factory=list)  # [id, status]

    def set_status(self, status: int) -> None:
        for rsp in self.responses:
            if rsp[1] != NETIF_RSP_NULL:
                rsp[1] = status


def parse_tx_packet(take: Callable[[], bytes], available: int) -> TxPacket:
    """Take one packet's slots with `take()` (each call: a private copy of
    the next unconsumed request) out of `available` published ones, and
    judge it as Linux netback does.  Consumes every slot of the packet,
    and nothing past it, except after FATAL (the ring is abandoned)."""
    first = NetifTxRequest.decode(take())
    remaining = available - 1
    pkt = TxPacket(OK, size=first.size, flags=first.flags)
    pkt.responses.append([first.id, NETIF_RSP_OKAY])
    if first.flags & NETTXF_extra_info:
        while True:
            if remaining <= 0:
                return TxPacket(FATAL, "Missing extra info")
            extra = NetifExtraInfo.decode(take())
            remaining -= 1
            pkt.responses.append([0, NETIF_RSP_NULL])
            if not 0 < extra.type < XEN_NETIF_EXTRA_TYPE_MAX:
                return TxPacket(FATAL, f"Invalid extra type: {extra.type}")
            pkt.extras[extra.type] = extra
            if not extra.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                break
    if XEN_NETIF_EXTRA_TYPE_MCAST_ADD in pkt.extras or XEN_NETIF_EXTRA_TYPE_MCAST_DEL in pkt.extras:
        pkt.verdict = CONTROL  # no data: the first slot is the whole request
        return pkt
    # xenvif_count_requests: `first_len` is what is left for the first slot.
    first_len = first.size
    drop = ""
    slots = 0
    more = bool(first.flags & NETTXF_more_data)
    frags: list[Fragment] = []
    while more:
        if slots >= remaining:
            return TxPacket(FATAL, f"Asked for {slots + 1} slots but exceeds this limit ({remaining} published)")
        if slots >= FATAL_SKB_SLOTS:
            return TxPacket(FATAL, f"Malicious frontend using {slots + 1} slots, threshold {FATAL_SKB_SLOTS}")
        if not drop and slots >= XEN_NETBK_LEGACY_SLOTS_MAX:
            drop = f"Too many slots ({slots + 1}) exceeding limit ({XEN_NETBK_LEGACY_SLOTS_MAX})"
        txp = NetifTxRequest.decode(take())
        slots += 1
        pkt.responses.append([txp.id, NETIF_RSP_OKAY])
        if not drop and txp.size > first_len:
            drop = f"Invalid tx request, slot size {txp.size} > remaining size {first_len}"
        first_len = (first_len - txp.size) & 0xFFFF
        if txp.offset + txp.size > XEN_PAGE_SIZE:
            return TxPacket(FATAL, f"Cross page boundary, txp->offset: {txp.offset}, size: {txp.size}")
        frags.append(Fragment(txp.gref, txp.offset, txp.size))
        more = bool(txp.flags & NETTXF_more_data)
    if not drop and first_len < ETH_HLEN:
        drop = f"Bad packet size: {first_len}"
    if drop:
        pkt.verdict, pkt.reason = DROP, drop
        pkt.set_status(NETIF_RSP_ERROR)
        return pkt
    if first.offset + first_len > XEN_PAGE_SIZE:
        return TxPacket(FATAL, f"Cross page boundary, txreq.offset: {first.offset}, size: {first_len}")
    gso = pkt.extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
    if gso is not None:
        info = gso.gso()
        if info.size == 0:
            return TxPacket(FATAL, "GSO size must not be zero")
        if info.type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
            return TxPacket(FATAL, f"Bad GSO type {info.type}")
    pkt.fragments = [Fragment(first.gref, first.offset, first_len)] + [f for f in frags if f.length]
    return pkt


# ---------------------------------------------------------------------------------------------
# Pure parts: RX slot filling
# ---------------------------------------------------------------------------------------------

def rx_slots_needed(length: int) -> int:
    """Rx buffers (whole pages, filled from offset 0) a frame of `length` needs."""
    return max(1, -(-length // XEN_PAGE_SIZE))


def rx_layout(length: int) -> list[tuple[int, int, int]]:
    """(frame offset, bytes, flags) for each rx slot of a frame: every slot
    but the last is full and flagged NETRXF_more_data."""
    out = []
    pos = 0
    for i in range(rx_slots_needed(length)):
        n = min(XEN_PAGE_SIZE, length - pos)
        last = pos + n >= length
        out.append((pos, n, 0 if last else NETRXF_more_data))
        pos += n
    return out


# ---------------------------------------------------------------------------------------------
# Pure parts: credit scheduler (Linux tx_credit_exceeded / tx_add_credit)
# ---------------------------------------------------------------------------------------------

def parse_rate(text: str | None) -> tuple[int, int] | None:
    """The backend's `rate` ("<bytes_per_interval>,<interval_usecs>", as libxl
    writes it) or None (unlimited; also for anything unreadable, as Linux)."""
    if not text:
        return None
    parts = text.strip().split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return None
    b, us = int(parts[0]), int(parts[1])
    return (b, us) if b > 0 and us > 0 else None


class Credit:
    """`bytes_per_interval` may go out per `interval_usecs`; a packet bigger
    than the remaining credit waits for the next window.  The burst is at
    least the packet at the head of the ring (up to 128 KiB), so a packet
    larger than one interval's credit still goes out once per window."""

    def __init__(self, rate: tuple[int, int] | None, now: float) -> None:
        self.set_rate(rate, now)

    def set_rate(self, rate: tuple[int, int] | None, now: float) -> None:
        self.rate = rate
        self.window_start = now
        self.remaining = rate[0] if rate else 0
        self.deferred_until = 0.0

    @property
    def limited(self) -> bool:
        return self.rate is not None

    def wait_for(self, size: int, now: float) -> float:
        """0 if a packet of `size` may go now, else seconds to wait."""
        if self.rate is None or size <= self.remaining:
            return 0.0
        interval = self.rate[1] / 1e6
        if self.deferred_until:
            if now < self.deferred_until:
                return self.deferred_until - now
            self.deferred_until = 0.0
            self._add_credit(size)  # tx_credit_callback: the timer fired
            if size <= self.remaining:
                return 0.0
        next_credit = self.window_start + interval
        if now >= next_credit:
            self.window_start = now
            self._add_credit(size)
            next_credit = now + interval
        if size > self.remaining:
            self.window_start = self.deferred_until = next_credit
            return next_credit - now
        return 0.0

    def _add_credit(self, head_size: int) -> None:
        per_interval = self.rate[0]
        max_burst = max(min(head_size, MAX_BURST), per_interval)
        self.remaining = min(self.remaining + per_interval, max_burst)

    def consume(self, size: int) -> None:
        if self.rate is not None:
            self.remaining = max(0, self.remaining - size)


# ---------------------------------------------------------------------------------------------
# Pure parts: completing a blank checksum (NETTXF_csum_blank)
# ---------------------------------------------------------------------------------------------

def _ones_complement_sum(data: bytes | memoryview, start: int = 0) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _l4(frame) -> tuple[int, int, int] | None:
    """(protocol, L4 offset, end of the IP packet) of an IPv4 or IPv6
    (no extension headers) Ethernet frame, else None."""
    if len(frame) < ETH_HLEN:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    l3 = ETH_HLEN
    if ethertype == 0x0800 and len(frame) >= l3 + 20:
        ihl = (frame[l3] & 0x0F) * 4
        end = min(len(frame), l3 + struct.unpack_from("!H", frame, l3 + 2)[0])
        if ihl < 20 or end <= l3 + ihl:
            return None
        return frame[l3 + 9], l3 + ihl, end
    if ethertype == 0x86DD and len(frame) >= l3 + 40:
        return frame[l3 + 6], l3 + 40, min(len(frame), l3 + 40 + struct.unpack_from("!H", frame, l3 + 4)[0])
    return None


def tcp_payload_length(frame) -> int:
    """Bytes of TCP payload in a frame (what a GSO packet would be cut into
    segments of at most `gso.size`); the frame length if it is not TCP."""
    l4 = _l4(frame)
    if l4 is None or l4[0] != 6 or l4[1] + 20 > l4[2]:
        return len(frame)
    proto, start, end = l4
    return end - start - (frame[start + 12] >> 4) * 4


def fill_checksum(frame: bytearray) -> bool:
    """Compute the TCP/UDP checksum of an Ethernet frame in place (IPv4, or
    IPv6 without extension headers).  False if the frame is none of those
    (Linux drops such a csum_blank packet: "Can't setup checksum")."""
    if len(frame) < ETH_HLEN:
        return False
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    l3 = ETH_HLEN
    if ethertype == 0x0800:
        if len(frame) < l3 + 20:
            return False
        ihl = (frame[l3] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, l3 + 2)[0]
        proto = frame[l3 + 9]
        l4 = l3 + ihl
        end = min(len(frame), l3 + total)
        if ihl < 20 or end <= l4:
            return False
        pseudo = bytes(frame[l3 + 12:l3 + 20]) + struct.pack("!BBH", 0, proto, end - l4)
    elif ethertype == 0x86DD:
        if len(frame) < l3 + 40:
            return False
        proto = frame[l3 + 6]
        l4 = l3 + 40
        end = min(len(frame), l4 + struct.unpack_from("!H", frame, l3 + 4)[0])
        pseudo = bytes(frame[l3 + 8:l3 + 40]) + struct.pack("!IxxxB", end - l4, proto)
    else:
        return False
    if proto == 6:
        csum_at = l4 + 16
    elif proto == 17:
        csum_at = l4 + 6
    else:
        return False
    if csum_at + 2 > end:
        return False
    frame[csum_at:csum_at + 2] = b"\0\0"
    csum = ~_ones_complement_sum(memoryview(frame)[l4:end], _ones_complement_sum(pseudo)) & 0xFFFF
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    struct.pack_into("!H", frame, csum_at, csum)
    return True


# ---------------------------------------------------------------------------------------------
# Frontend keys
# ---------------------------------------------------------------------------------------------

class FrontendConfigError(Exception):
    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.err = err


@dataclass(frozen=True)
class FrontendConfig:
    tx_ring_ref: int
    rx_ring_ref: int
    evtchn_tx: int
    evtchn_rx: int  # == evtchn_tx when not split
    split: bool
    rx_notify: bool
    sg: bool
    csum: bool  # not feature-no-csum-offload
    ipv6_csum: bool


def _uint(text: str | None, key: str) -> int:
    if text is None:
        raise FrontendConfigError(errno.ENOENT, f"reading {key}: missing")
    text = text.strip()
    if not text.isascii() or not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise FrontendConfigError(errno.EINVAL, f"reading {key}: {text!r} is not an unsigned number")
    return int(text)


def _flag(read, key: str, default: int = 0) -> bool:
    text = read(key)
    return (default if text is None else _uint(text, key)) != 0


def parse_frontend_config(read) -> FrontendConfig:
    """Read and check netfront's keys; `read(key)` -> value or None."""
    queues = read("multi-queue-num-queues")
    if queues is not None and _uint(queues, "multi-queue-num-queues") != 1:
        raise FrontendConfigError(errno.ENOSYS, f"guest requested {queues} queues, exceeding the maximum of 1")
    if not _flag(read, "request-rx-copy"):
        raise FrontendConfigError(errno.EOPNOTSUPP, "frontend does not request rx-copy (request-rx-copy)")
    tx_ref = _uint(read("tx-ring-ref"), "tx-ring-ref")
    rx_ref = _uint(read("rx-ring-ref"), "rx-ring-ref")
    tx_port_text, rx_port_text = read("event-channel-tx"), read("event-channel-rx")
    if tx_port_text is not None or rx_port_text is not None:
        tx_port = _uint(tx_port_text, "event-channel-tx")
        rx_port = _uint(rx_port_text, "event-channel-rx")
        split = True
    else:
        tx_port = rx_port = _uint(read("event-channel"), "event-channel")
        split = False
    return FrontendConfig(tx_ref, rx_ref, tx_port, rx_port, split,
                          rx_notify=_flag(read, "feature-rx-notify"), sg=_flag(read, "feature-sg"),
                          csum=not _flag(read, "feature-no-csum-offload"),
                          ipv6_csum=_flag(read, "feature-ipv6-csum-offload"))


# ---------------------------------------------------------------------------------------------
# The data path
# ---------------------------------------------------------------------------------------------

class FatalTxError(Exception):
    """The frontend broke the tx protocol (xenvif_fatal_tx_err)."""


class NetifServer:
    """Both rings of one vif and the tap fd.

    `grants` has GrantTable's `copy(ops, check=False) -> statuses`;
    `tx_pages`/`rx_pages` are our own pages (objects with `.gfn` and a
    4096-byte `.mmap`), used as bounce buffers for the copies; `copy_ops`
    builds the ops (`make_copy(src, dst, len)` with `grant_end(gref,
    offset)` / `local_end(gfn, offset)`), so tests can give fakes."""

    def __init__(self, tx_ring: BackRing, rx_ring: BackRing, grants, domid: int, tap_fd: int,
                 tx_pages: list, rx_pages: list, *, rate: tuple[int, int] | None = None,
                 rx_notify: bool = True, name: str = "vif", clock=time.monotonic) -> None:
        from xenbed.drivers.xen.gnttab import CopyOp, GrantRef, LocalFrame
        self._copy_op, self._gref, self._local = CopyOp, GrantRef, LocalFrame
        self.tx_ring, self.rx_ring = tx_ring, rx_ring
        self.grants = grants
        self.domid = domid
        self.tap_fd = tap_fd
        self.tx_pages, self.rx_pages = tx_pages, rx_pages
        self.rx_notify = rx_notify
        self.name = name
        self.clock = clock
        self.credit = Credit(rate, clock())
        self.backlog: deque[tuple[float, bytes]] = deque()
        self.stats = {"tx_packets": 0, "tx_bytes": 0, "tx_errors": 0, "tx_dropped": 0, "tx_control": 0,
                      "rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0, "rx_errors": 0}

    # -- TX ---------------------------------------------------------------------------
    def process_tx(self, stop: threading.Event | None = None) -> tuple[bool, float]:
        """Take every tx packet (within the credit); returns (notify the
        frontend, seconds until the credit allows the next one or 0).
        Raises FatalTxError or RingOverflow."""
        ring = self.tx_ring
        notify = False
        while True:
            batch: list[TxPacket] = []
            slots = 0
            # room for one more packet of the most slots we accept
            while slots <= TX_BATCH_SLOTS - (XEN_NETBK_LEGACY_SLOTS_MAX + 1) and (
                    available := ring.unconsumed_requests()):
                if stop is not None and stop.is_set():
                    break
                if self.credit.limited:
                    head = NetifTxRequest.decode(ring.sring.read_slot(ring.req_cons))
                    wait = self.credit.wait_for(head.size, self.clock())
                    if wait:
                        notify = self._send_and_respond(batch) or notify
                        return notify, wait
                pkt = parse_tx_packet(ring.take_request, available)
                if pkt.verdict == FATAL:
                    raise FatalTxError(pkt.reason)
                if pkt.verdict == OK:
                    self.credit.consume(pkt.size)
                    slots += len(pkt.fragments)
                elif pkt.verdict == DROP:
                    log.debug("%s: tx drop: %s", self.name, pkt.reason)
                    self.stats["tx_errors"] += 1
                batch.append(pkt)
            notify = self._send_and_respond(batch) or notify
            if stop is not None and stop.is_set():
                return notify, 0.0
            if not ring.final_check_for_requests():
                return notify, 0.0

    def _send_and_respond(self, batch: list[TxPacket]) -> bool:
        if not batch:
            return False
        ops, where = [], []  # where: (packet index, page index, length)
        page = 0
        for i, pkt in enumerate(batch):
            if pkt.verdict != OK:
                continue
            for frag in pkt.fragments:
                ops.append(self._copy_op(self._gref(self.domid, frag.gref, frag.offset),
                                         self._local(self.tx_pages[page].gfn, 0), frag.length))
                where.append((i, page, frag.length))
                page += 1
        statuses = self.grants.copy(ops, check=False) if ops else []
        frames: dict[int, bytearray] = {}
        failed: set[int] = set()
        for (i, pg, length), status in zip(where, statuses):
            if status != "GNTST_okay":
                failed.add(i)
            frames.setdefault(i, bytearray()).extend(self.tx_pages[pg].mmap[:length])
        for i, pkt in enumerate(batch):
            if pkt.verdict == CONTROL:
                self.stats["tx_control"] += 1
            if pkt.verdict != OK:
                continue
            if i in failed:
                pkt.set_status(NETIF_RSP_ERROR)
                self.stats["tx_errors"] += 1
                continue
            self._transmit(pkt, frames[i])
        for pkt in batch:
            for rsp_id, status in pkt.responses:
                self.tx_ring.put_response(NetifTxResponse(rsp_id, status).encode())
        return self.tx_ring.push_responses_and_check_notify()

    def _transmit(self, pkt: TxPacket, frame: bytearray) -> None:
        if len(frame) != pkt.size:  # cannot happen after parse_tx_packet; be safe
            self.stats["tx_dropped"] += 1
            return
        if pkt.flags & NETTXF_csum_blank and not fill_checksum(frame):
            self.stats["tx_dropped"] += 1  # Linux: "Can't setup checksum", dropped, answered OKAY
            return
        gso = pkt.extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
        if gso is not None and tcp_payload_length(frame) > gso.gso().size:
            pkt.set_status(NETIF_RSP_ERROR)  # GSO is not offered and cannot be segmented here
            self.stats["tx_errors"] += 1
            return
        try:
            os.write(self.tap_fd, frame)
        except OSError as exc:  # the tap is down (hotplug not run yet) or gone: the stack drops it
            log.debug("%s: tap write: %s", self.name, exc)
            self.stats["tx_dropped"] += 1
            return
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += len(frame)

    # -- RX ---------------------------------------------------------------------------
    def read_tap(self, limit: int = 64) -> int:
        """Move frames from the tap into the backlog (non-blocking fd)."""
        n = 0
        now = self.clock()
        while n < limit:
            try:
                frame = os.read(self.tap_fd, 65536 + ETH_HLEN)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
            if not frame:
                break
            n += 1
            if len(self.backlog) >= RX_BACKLOG_MAX:
                self.stats["rx_dropped"] += 1
                continue
            self.backlog.append((now, frame))
        return n

    def deliver_rx(self) -> bool:
        """Copy backlogged frames into the guest's posted buffers; True if
        the frontend must be notified.  Stale frames are dropped."""
        ring = self.rx_ring
        now = self.clock()
        notify = False
        while self.backlog and now - self.backlog[0][0] > RX_STALL_SECONDS:
            self.backlog.popleft()
            self.stats["rx_dropped"] += 1
        while self.backlog:
            ops, rsps = [], []  # rsps: (id, n, flags, op index)
            page = 0
            while self.backlog:
                _, frame = self.backlog[0]
                layout = rx_layout(len(frame))
                if len(layout) > ring.size:
                    self.backlog.popleft()
                    self.stats["rx_dropped"] += 1
                    continue
                if page + len(layout) > len(self.rx_pages):
                    break
                if not self._rx_slots_available(len(layout)):
                    break  # req_event asks the frontend to notify us when it posts more
                self.backlog.popleft()
                for pos, n, flags in layout:
                    req = NetifRxRequest.decode(ring.take_request())
                    local = self.rx_pages[page]
                    local.mmap[:n] = frame[pos:pos + n]
                    ops.append(self._copy_op(self._local(local.gfn, 0), self._gref(self.domid, req.gref, 0), n))
                    rsps.append((req.id, n, flags, len(ops) - 1))
                    page += 1
                self.stats["rx_packets"] += 1
                self.stats["rx_bytes"] += len(frame)
            if not ops:
                break
            statuses = self.grants.copy(ops, check=False)
            for rsp_id, n, flags, op in rsps:
                status = n if statuses[op] == "GNTST_okay" else NETIF_RSP_ERROR
                if status < 0:
                    self.stats["rx_errors"] += 1
                ring.put_response(NetifRxResponse(rsp_id, 0, flags, status).encode())
            notify = ring.push_responses_and_check_notify() or notify
        return notify

    def _rx_slots_available(self, needed: int) -> bool:
        """xenvif_rx_ring_slots_available: enough posted buffers?  If not,
        ask for an event on the next request and look again."""
        ring = self.rx_ring
        if ring.unconsumed_requests() >= needed:
            return True
        ring.sring.req_event = ring.sring.req_prod + 1
        full_barrier()
        return ring.unconsumed_requests() >= needed

    def release(self) -> None:
        self.tx_ring.release()
        self.rx_ring.release()


class Connection:
    """A connected vif: mapped rings, bound port(s), bounce pages and the
    thread that serves both directions."""

    def __init__(self, name: str, grants, evtchn, memory, domid: int, config: FrontendConfig, tap_fd: int,
                 rate, on_fatal) -> None:
        self.name = name
        self.grants, self.evtchn, self.memory = grants, evtchn, memory
        self.domid = domid
        self.config = config
        self.on_fatal = on_fatal
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.mappings: list = []
        self.pages: list = []
        self.ports: list[int] = []
        self.server: NetifServer | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            tx_map = self.grants.map(domid, config.tx_ring_ref, False)
            self.mappings.append(tx_map)
            rx_map = self.grants.map(domid, config.rx_ring_ref, False)
            self.mappings.append(rx_map)
            self.pages = memory.alloc(2 * TX_BATCH_SLOTS)
            self.server = NetifServer(
                BackRing(tx_map.mmap, netif.TX_RING_ENTRY_SIZE), BackRing(rx_map.mmap, netif.RX_RING_ENTRY_SIZE),
                grants, domid, tap_fd, self.pages[:TX_BATCH_SLOTS], self.pages[TX_BATCH_SLOTS:],
                rate=rate, rx_notify=config.rx_notify, name=name)
            self.ports.append(evtchn.bind_interdomain(domid, config.evtchn_tx))
            if config.split:
                self.ports.append(evtchn.bind_interdomain(domid, config.evtchn_rx))
        except BaseException:
            self.close()
            raise

    @property
    def tx_port(self) -> int:
        return self.ports[0]

    @property
    def rx_port(self) -> int:
        return self.ports[-1]

    def set_rate(self, rate) -> None:
        if self.server is not None:
            self.server.credit.set_rate(rate, self.server.clock())
            self.wake()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass

    def start(self) -> None:
        for port in self.ports:
            t = threading.Thread(target=self._wait_port, args=(port,), name=f"{self.name}-evtchn{port}", daemon=True)
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._serve, name=f"{self.name}-netif", daemon=True)
        t.start()
        self.threads.append(t)

    def _wait_port(self, port: int) -> None:
        # wait() clears the pending bit before we wake the server: no lost events
        while not self.stop.is_set():
            try:
                if self.evtchn.wait(port, timeout=0.25):
                    self.wake()
            except Exception as exc:
                if not self.stop.is_set():
                    log.warning("%s: waiting on port %d: %s", self.name, port, exc)
                return

    def _serve(self) -> None:
        server = self.server
        tap_fd = server.tap_fd
        timeout = 0.0
        try:
            while not self.stop.is_set():
                readable, _, _ = select.select([self.wake_r, tap_fd], [], [], timeout)
                if self.stop.is_set():
                    break
                if self.wake_r in readable:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                notify_tx, credit_wait = server.process_tx(self.stop)
                if notify_tx:
                    self.evtchn.notify(self.tx_port)
                if tap_fd in readable:
                    server.read_tap()
                if server.deliver_rx():
                    self.evtchn.notify(self.rx_port)
                timeout = 0.25
                if credit_wait:
                    timeout = min(timeout, credit_wait)
                if server.backlog:
                    timeout = min(timeout, RX_POLL_SECONDS if not server.rx_notify else 0.1)
        except (FatalTxError, RingOverflow) as exc:
            log.error("%s: fatal error on the tx ring: %s", self.name, exc)
            self.on_fatal(errno.EPROTO, f"fatal tx error: {exc}")
        except Exception as exc:
            if not self.stop.is_set():
                log.exception("%s: vif thread failed", self.name)
                self.on_fatal(errno.EIO, f"vif thread failed: {exc}")

    def close(self) -> None:
        self.stop.set()
        self.wake()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(5)
        if self.server is not None:
            try:
                self.server.tx_ring.push_responses()
                self.server.rx_ring.push_responses()
            except Exception:
                pass
            self.server.release()
        for port in self.ports:
            try:
                self.evtchn.close(port)
            except Exception as exc:
                log.warning("%s: closing port %d: %s", self.name, port, exc)
        self.ports = []
        for mapping in self.mappings:
            try:
                self.grants.unmap(mapping)
            except Exception as exc:
                log.warning("%s: unmapping a ring: %s", self.name, exc)
        self.mappings = []
        if self.pages:
            try:
                self.memory.free(self.pages)
            except Exception as exc:
                log.warning("%s: freeing bounce pages: %s", self.name, exc)
            self.pages = []
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.wake_r = self.wake_w = -1


# ---------------------------------------------------------------------------------------------
# The XenBus driver
# ---------------------------------------------------------------------------------------------

def default_open_tap(name: str):
    from . import tap
    t = tap.open_tap(name)
    try:
        tap.set_link(t.name, mac=VIF_MAC)
    except OSError as exc:
        log.warning("%s: setting the vif MAC: %s", t.name, exc)
    return t


@dataclass(eq=False)
class BackendInfo:
    lock: threading.RLock = field(default_factory=threading.RLock)
    frontend_state: int = UNKNOWN
    handle: int = 0
    tap: object | None = None  # .fd, .name, .close()
    connection: Connection | None = None
    watches: list = field(default_factory=list)
    hotplug_ran: bool = False
    # recovered from Connected/Initialised: the frontend's Initialised or
    # Connected describes the old process's rings until it resets
    awaiting_frontend_reset: bool = False
    mtu: int | None = None  # as last applied to the vif by the `mtu` watch


# A restarted netback may run while the kernel is still unregistering the tap
# the killed one held (its fd closed at exit): EBUSY until that finished.
TAP_RELEASE_WAIT = 5.0


def _open_tap_when_free(open_tap: Callable[[str], object], name: str):
    deadline = time.monotonic() + TAP_RELEASE_WAIT
    while True:
        try:
            return open_tap(name)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def default_set_vif_mtu(name: str, mtu: int) -> None:
    from . import tap
    tap.set_link(name, mtu=mtu)


class Netback(XenbusDriver):
    """The vif backend driver for a `BackendBus` (Linux's xen-netback/xenbus.c).

    `open_tap(name)` returns the tap (anything with .fd, .name, .close()):
    tests pass a socketpair; `memory` has GuestMemory's alloc/free.
    `hotplug_add(store, backend)` / `hotplug_remove(store, backend, name)`
    are the vif hotplug step (drivers/net/hotplug.py) and `set_vif_mtu(name,
    mtu)` changes the vif's MTU (`ip link`); tests without real links pass
    their own."""

    devicetype = "vif"
    recovers = True

    def __init__(self, grants, evtchn, memory, *, run_hotplug: bool = False,
                 open_tap: Callable[[str], object] = default_open_tap,
                 hotplug_add: Callable | None = None, hotplug_remove: Callable | None = None,
                 set_vif_mtu: Callable[[str, int], None] = default_set_vif_mtu) -> None:
        from . import hotplug
        self.grants, self.evtchn, self.memory = grants, evtchn, memory
        self.run_hotplug = run_hotplug
        self.open_tap = open_tap
        self.hotplug_add = hotplug_add or hotplug.add
        self.hotplug_remove = hotplug_remove or hotplug.remove
        self.set_vif_mtu = set_vif_mtu
        self._devices: dict[str, XenbusDevice] = {}
        self._lock = threading.Lock()

    # -- XenbusDriver ---------------------------------------------------------
    def probe(self, dev: XenbusDevice) -> None:
        from .hotplug import vif_name
        be = dev.priv = BackendInfo()
        with self._lock:
            self._devices[dev.nodename] = dev
        with be.lock:
            try:
                be.handle = _uint(dev.read("handle"), "handle")
            except FrontendConfigError as exc:
                dev.dev_fatal(exc.err, str(exc))
                return

            def features(tx: int) -> None:
                for key, value in FEATURES.items():
                    dev.write(key, value, tx)

            dev.store.run_transaction(features)
            name = vif_name(dev.otherend_id, be.handle, dev.read("vifname"))
            try:
                be.tap = self.open_tap(name)
            except (OSError, ValueError) as exc:
                dev.dev_fatal(exc, f"creating {name}: {exc}")
                return
            log.info("%s: created %s", dev.nodename, be.tap.name)
            dev.switch_state(XenbusState.InitWait)
            if self.run_hotplug:
                self._hotplug("add", dev)
        self._watch_own_nodes(dev)
        log.info("%s: probed (frontend %s)", dev.nodename, dev.otherend)

    def _watch_own_nodes(self, dev: XenbusDevice) -> None:
        """The hotplug step's `hotplug-status`; our own `state` (the toolstack
        writes Closing to unplug); `rate` and `mtu` (live reconfiguration).
        Each watch fires once at once, as Xen watches do."""
        be: BackendInfo = dev.priv
        for key, callback in (("hotplug-status", self._hotplug_status_changed),
                              ("state", self._own_state_changed),
                              ("rate", self._rate_changed),
                              ("mtu", self._mtu_changed)):
            token = f"netback:{key}:{dev.nodename}"
            dev.store.watch(f"{dev.nodename}/{key}", token, lambda _p, _t, cb=callback: cb(dev))
            be.watches.append((f"{dev.nodename}/{key}", token))

    def recover(self, dev: XenbusDevice) -> None:
        """A device an earlier netback served (see the module docstring)."""
        from .hotplug import vif_name
        stale = dev.state
        be = dev.priv = BackendInfo()
        with self._lock:
            self._devices[dev.nodename] = dev
        with be.lock:
            try:
                be.handle = _uint(dev.read("handle"), "handle")
            except FrontendConfigError as exc:
                dev.dev_fatal(exc.err, str(exc))
                return
            name = vif_name(dev.otherend_id, be.handle, dev.read("vifname"))
            # `hotplug-status` says "connected" about a vif that is gone: we
            # must not go Connected on it before the step ran again.
            try:
                self.hotplug_remove(dev.store, dev.nodename, name)
            except Exception as exc:
                log.warning("%s: clearing the old hotplug keys: %s", dev.nodename, exc)

            def features(tx: int) -> None:
                for key, value in FEATURES.items():
                    dev.write(key, value, tx)

            dev.store.run_transaction(features)
            try:
                be.tap = _open_tap_when_free(self.open_tap, name)
            except (OSError, ValueError) as exc:
                dev.dev_fatal(exc, f"creating {name}: {exc}")
                return
            log.info("%s: recreated %s", dev.nodename, be.tap.name)
            if stale != XenbusState.InitWait:
                be.awaiting_frontend_reset = True
                dev.switch_state(XenbusState.Closed)
            self._hotplug("add", dev)
        self._watch_own_nodes(dev)
        log.info("%s: recovering from %s (frontend %s)", dev.nodename, _name(stale), dev.otherend)

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        be: BackendInfo = dev.priv
        if be is None:
            return
        with be.lock:
            be.frontend_state = state
            log.info("%s: frontend is %s (we are %s)", dev.nodename, _name(state), _name(dev.state))
            if be.awaiting_frontend_reset:
                if state in (XenbusState.Initialised, XenbusState.Connected):
                    log.info("%s: frontend still %s on the old rings; waiting for it to reset",
                             dev.nodename, _name(state))
                    return
                be.awaiting_frontend_reset = False
            if state == XenbusState.Initialising:
                if dev.state == XenbusState.Closed:
                    log.info("%s: prepare for reconnect", dev.nodename)
                    dev.switch_state(XenbusState.InitWait)
            elif state in (XenbusState.Initialised, XenbusState.Connected):
                if dev.state == XenbusState.Connected:
                    return
                if dev.state == XenbusState.Closed:
                    dev.switch_state(XenbusState.InitWait)
                self._connect(dev)
            elif state == XenbusState.Closing:
                self._disconnect(dev)
                if dev.state != XenbusState.Closed:
                    dev.switch_state(XenbusState.Closing)
            elif state in (XenbusState.Closed, XenbusState.Unknown):
                self._disconnect(dev)
                dev.switch_state(XenbusState.Closed)
                if state == XenbusState.Unknown or dev.read("online") == "0":
                    self._close_tap(dev)

    def remove(self, dev: XenbusDevice) -> None:
        be: BackendInfo | None = dev.priv
        if be is None:
            return
        with be.lock:
            self._drop_watches(dev)
            self._disconnect(dev)
            if self.run_hotplug and be.hotplug_ran:
                self._hotplug("remove", dev)
            self._close_tap(dev)
        with self._lock:
            self._devices.pop(dev.nodename, None)
        log.info("%s: removed", dev.nodename)

    # -- watches -----------------------------------------------------------------------
    def _hotplug_status_changed(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        with be.lock:
            if dev.removed:
                return
            status = dev.read("hotplug-status")
            if status == "connected":
                if be.connection is not None and dev.state == XenbusState.InitWait:
                    dev.switch_state(XenbusState.Connected)
            elif status == "error":
                log.error("%s: hotplug failed: %s", dev.nodename, dev.read("hotplug-error"))

    def _own_state_changed(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        with be.lock:
            if dev.removed:
                return
            state = XenbusState.parse(dev.read("state"))
            if state != XenbusState.Closing or dev.state in (XenbusState.Closing, XenbusState.Closed):
                return
            log.info("%s: the toolstack asked to close", dev.nodename)
            dev.state = XenbusState.Closing
            if be.frontend_state in (XenbusState.Closed, XenbusState.Unknown):
                self._disconnect(dev)
                dev.switch_state(XenbusState.Closed)
                if dev.read("online") == "0":
                    self._close_tap(dev)

    def _rate_changed(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        with be.lock:
            if not dev.removed and be.connection is not None:
                rate = parse_rate(dev.read("rate"))
                be.connection.set_rate(rate)
                log.info("%s: rate now %s", dev.nodename, rate or "unlimited")

    def _mtu_changed(self, dev: XenbusDevice) -> None:
        """Apply `mtu` to the vif whenever it changes (and once at probe, when
        the hotplug step may not have run yet: applying it twice is harmless).
        An unreadable value is logged and ignored, the vif keeps its MTU."""
        be: BackendInfo = dev.priv
        with be.lock:
            if dev.removed or be.tap is None:
                return
            text = dev.read("mtu")
            if text is None:
                return
            try:
                mtu = int(text)
                if not 68 <= mtu <= 65535:
                    raise ValueError(f"{mtu} is outside 68..65535")
            except ValueError as exc:
                log.warning("%s: ignoring mtu %r: %s", dev.nodename, text, exc)
                return
            if be.mtu == mtu:
                return
            try:
                self.set_vif_mtu(be.tap.name, mtu)
            except OSError as exc:
                log.warning("%s: setting the MTU of %s to %d: %s", dev.nodename, be.tap.name, mtu, exc)
                return
            be.mtu = mtu
            log.info("%s: %s mtu now %d", dev.nodename, be.tap.name, mtu)

    def _drop_watches(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        watches, be.watches = be.watches, []
        for path, token in watches:
            try:
                dev.store.unwatch(path, token)
            except Exception as exc:
                log.debug("%s: unwatch %s: %s", dev.nodename, path, exc)

    # -- connect / disconnect -------------------------------------------------------------
    def _connect(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        if be.connection is not None or dev.state != XenbusState.InitWait:
            return
        if be.tap is None:
            dev.dev_fatal(errno.ENODEV, "no vif to connect")
            return
        try:
            config = parse_frontend_config(dev.otherend_read)
            be.connection = Connection(dev.nodename, self.grants, self.evtchn, self.memory, dev.otherend_id,
                                       config, be.tap.fd, parse_rate(dev.read("rate")),
                                       lambda err, msg: self._fatal_from_ring(dev, err, msg))
        except FrontendConfigError as exc:
            dev.dev_fatal(exc.err, str(exc))
            return
        except Exception as exc:
            log.exception("%s: connect failed", dev.nodename)
            dev.dev_fatal(exc, f"mapping shared-frames {dev.otherend}: {exc}")
            return
        be.connection.start()
        log.info("%s: rings mapped (tx %d, rx %d, ports %s%s)", dev.nodename, config.tx_ring_ref,
                 config.rx_ring_ref, be.connection.ports, ", split" if config.split else "")
        if dev.read("hotplug-status") == "connected":
            dev.switch_state(XenbusState.Connected)
        else:
            log.info("%s: waiting for the hotplug script", dev.nodename)

    def _disconnect(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        conn, be.connection = be.connection, None
        if conn is not None:
            stats = dict(conn.server.stats) if conn.server else {}
            conn.close()
            log.info("%s: disconnected (%s)", dev.nodename, stats)

    def _close_tap(self, dev: XenbusDevice) -> None:
        be: BackendInfo = dev.priv
        tap, be.tap = be.tap, None
        if tap is not None:
            tap.close()
            log.info("%s: removed %s", dev.nodename, tap.name)

    def _fatal_from_ring(self, dev: XenbusDevice, err: int, message: str) -> None:
        def fatal() -> None:
            with dev.priv.lock:
                self._disconnect(dev)
                dev.dev_fatal(err, message)
        threading.Thread(target=fatal, name="netif-fatal", daemon=True).start()

    def _hotplug(self, action: str, dev: XenbusDevice) -> None:
        try:
            if action == "add":
                self.hotplug_add(dev.store, dev.nodename)
                dev.priv.hotplug_ran = True
            else:
                self.hotplug_remove(dev.store, dev.nodename, dev.priv.tap.name if dev.priv.tap else None)
        except Exception as exc:
            log.error("%s: hotplug %s failed: %s", dev.nodename, action, exc)

    # -- daemon --------------------------------------------------------------------------
    def connection(self, nodename: str) -> Connection | None:
        dev = self._devices.get(nodename)
        return dev.priv.connection if dev is not None and dev.priv is not None else None

    def tap_of(self, nodename: str):
        dev = self._devices.get(nodename)
        return dev.priv.tap if dev is not None and dev.priv is not None else None

    def shutdown(self) -> None:
        with self._lock:
            devices = list(self._devices.values())
        for dev in devices:
            with dev.priv.lock:
                self._drop_watches(dev)
                self._disconnect(dev)
                self._close_tap(dev)


def _name(state) -> str:
    return STATE_NAMES.get(int(state), str(state))


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.net.back", description=__doc__.split("\n")[0])
    parser.add_argument("--domid", type=int, default=None)
    parser.add_argument("--run-hotplug", action="store_true",
                        help="run the vif hotplug step on probe/remove (default: the toolstack runs it)")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"))
    parser.add_argument("--bridge", default=os.environ.get("XENBED_BRIDGE", "xenbr0"))
    parser.add_argument("--uplink", default=os.environ.get("XENBED_UPLINK", "auto"),
                        help="interface the bridge enslaves: auto (the default route's), a name, none, "
                             "or skip (do not touch the network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s netback %(levelname)s %(message)s")
    from xenbed.drivers.xen.evtchn import EventChannels
    from xenbed.drivers.xen.gnttab import GrantTable
    from xenbed.drivers.xen.memory import GuestMemory
    from xenbed.drivers.xenbus.daemon import run_backend

    if args.uplink != "skip" and os.environ.get("XENBED_BRIDGE_SETUP", "1") != "0":
        from . import bridge
        try:
            bridge.setup(args.bridge, args.uplink)
        except Exception as exc:  # vifs will fail their hotplug step, with this reason in the log
            log.error("setting up bridge %s: %s", args.bridge, exc)

    return run_backend("netback", lambda link: Netback(GrantTable(link), EventChannels(link), GuestMemory(link),
                                                      run_hotplug=args.run_hotplug),
                       transitions=args.transitions, domid=args.domid)


if __name__ == "__main__":
    sys.exit(main())
