"""netback's data path (Linux's xen-netback/netback.c; RX in rx.py).

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
  are gathered with one batched GNTTABOP_copy (guest grefs -> our pages)
  into one reused buffer and written to the tap.  On a vnet-header tap
  (the real vif) the offloads go with it as a virtio_net_hdr
  (protocols/vnet.py): a blank checksum (NETTXF_csum_blank) gets its
  pseudo-header sum and csum_start/offset, a GSO extra becomes gso_type /
  gso_size, and the kernel finishes the checksum and cuts the segments;
  without one (tests' socketpair) a blank checksum is summed here and a
  GSO packet larger than its segment size is answered ERROR.  Every slot
  is answered (OKAY, or NETIF_RSP_NULL for extra-info slots).
  Multicast-control extras are answered OKAY and carry no frame (as
  Linux).
* RX (world -> guest): frames read from the tap wait in a short backlog
  until the guest has posted enough rx buffers (ceil(len / 4096) slots,
  plus one for a GSO extra), are grant-copied into them (one
  GNTTABOP_copy per batch, our pages -> guest grefs) and answered with
  offset 0, status = bytes in the slot, NETRXF_more_data on all but the
  last, the checksum flags on the first and, for a GSO frame, its extra
  info in the slot after it; frames that wait longer than
  RX_STALL_SECONDS are dropped and counted; the backlog is RX_BACKLOG_MAX
  reused buffers, and what does not fit waits in the tap's own queue.

Pure helpers (tests/unit/test_netback_*.py): `parse_tx_packet`, `Credit`,
`fill_checksum`, and rx.py's `rx_layout`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xenbed.drivers.xen.gnttab import CopyOp, GrantRef, LocalFrame
from xenbed.protocols.netif import (
    NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETTXF_csum_blank, NETTXF_extra_info, NETTXF_more_data,
    XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_EXTRA_TYPE_MAX, XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, XEN_NETIF_NR_SLOTS_MIN,
    NetifExtraInfo, NetifTxRequest, NetifTxResponse,
)
from xenbed.protocols.inet import ETH_HLEN, fill_checksum, tcp_payload_length
from xenbed.protocols.netif import NETTXF_data_validated, XEN_NETIF_MAX_TX_SIZE
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing
from xenbed.protocols.vnet import BadOffload, Offload

from .rx import RX_BACKLOG_MAX, RX_READ_SIZE, RxFeatures, RxPath

log = logging.getLogger("xenbed.netback")

XEN_NETBK_LEGACY_SLOTS_MAX = XEN_NETIF_NR_SLOTS_MIN  # 18 slots after the first: more is dropped
FATAL_SKB_SLOTS = 20  # FATAL_SKB_SLOTS_DEFAULT: more slots after the first is malicious
TX_BATCH_SLOTS = 128  # local pages per copy batch (each direction): 7 GSO packets of 64 KiB
MAX_BURST = 131072  # tx_add_credit


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
# Pure parts: credit scheduler (Linux tx_credit_exceeded / tx_add_credit)
# ---------------------------------------------------------------------------------------------

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
# The data path
# ---------------------------------------------------------------------------------------------

class FatalTxError(Exception):
    """The frontend broke the tx protocol (xenvif_fatal_tx_err)."""


class NetifServer(RxPath):
    """Both rings of one vif and the tap fd.

    `grants` has GrantTable's `copy(ops, check=False) -> statuses`;
    `tx_pages`/`rx_pages` are our own pages (objects with `.gfn` and a
    4096-byte `.mmap`), used as bounce buffers for the copies; `copy_ops`
    builds the ops (`make_copy(src, dst, len)` with `grant_end(gref,
    offset)` / `local_end(gfn, offset)`), so tests can give fakes."""

    def __init__(self, tx_ring: BackRing, rx_ring: BackRing, grants, domid: int, tap_fd: int,
                 tx_pages: list, rx_pages: list, *, rate: tuple[int, int] | None = None,
                 rx_notify: bool = True, name: str = "vif", clock=time.monotonic, vnet_hdr: bool = False,
                 features: RxFeatures | None = None) -> None:
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
        self.vnet_hdr = vnet_hdr
        self.features = features or RxFeatures()
        self.frame_buf = bytearray(XEN_NETIF_MAX_TX_SIZE)  # every tx frame is put together here
        self.backlog: deque[tuple[float, bytearray, int]] = deque()  # (read at, buffer, length)
        self.rx_free = [bytearray(RX_READ_SIZE) for _ in range(RX_BACKLOG_MAX)]
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
        failed = {i for (i, _pg, _n), status in zip(where, statuses) if status != "GNTST_okay"}
        first = 0
        for i, pkt in enumerate(batch):
            if pkt.verdict == CONTROL:
                self.stats["tx_control"] += 1
            if pkt.verdict != OK:
                continue
            pieces = where[first:first + len(pkt.fragments)]
            first += len(pkt.fragments)
            if i in failed:
                pkt.set_status(NETIF_RSP_ERROR)
                self.stats["tx_errors"] += 1
                continue
            self._transmit(pkt, pieces)
        for pkt in batch:
            for rsp_id, status in pkt.responses:
                self.tx_ring.put_response(NetifTxResponse(rsp_id, status).encode())
        return self.tx_ring.push_responses_and_check_notify()

    def _transmit(self, pkt: TxPacket, pieces: list[tuple[int, int, int]]) -> None:
        """Put the packet's pieces (in our bounce pages) together in
        `frame_buf` and write it to the tap, with its offloads."""
        buf, pos = self.frame_buf, 0
        for _i, pg, length in pieces:
            buf[pos:pos + length] = self.tx_pages[pg].mmap[:length]
            pos += length
        if pos != pkt.size:  # cannot happen after parse_tx_packet; be safe
            self.stats["tx_dropped"] += 1
            return
        frame = memoryview(buf)[:pos]
        gso = pkt.extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
        try:
            if self.vnet_hdr:
                offload = Offload.from_netif(bool(pkt.flags & NETTXF_csum_blank),
                                             bool(pkt.flags & NETTXF_data_validated), gso)
                data = [offload.to_vnet(frame).encode(), frame]
            else:
                if pkt.flags & NETTXF_csum_blank and not fill_checksum(frame):
                    raise BadOffload("no checksum to fill in")
                if gso is not None and tcp_payload_length(frame) > gso.gso().size:
                    pkt.set_status(NETIF_RSP_ERROR)  # a tap without vnet header cannot take GSO
                    self.stats["tx_errors"] += 1
                    return
                data = [frame]
        except BadOffload as exc:  # Linux: "Can't setup checksum", dropped, answered OKAY
            log.debug("%s: tx drop: %s", self.name, exc)
            self.stats["tx_dropped"] += 1
            return
        try:
            os.writev(self.tap_fd, data)
        except OSError as exc:  # the tap is down (hotplug not run yet) or gone: the stack drops it
            log.debug("%s: tap write: %s", self.name, exc)
            self.stats["tx_dropped"] += 1
            return
        finally:
            frame.release()
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += pos

    def release(self) -> None:
        self.tx_ring.release()
        self.rx_ring.release()
