"""netfront's data path: one vif's tx and rx rings (the data path of
Linux's drivers/net/xen-netfront.c).

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
slots skipped; a frame is delivered (to the tap), the buffers are posted
again.  Events: clear, process, final check (drivers/xen/evtchn.py), on the
event channel dispatcher thread.

Offloads (`offloads=True`: eth0 is a vnet-header tap): a frame comes with
its `Offload` (protocols/vnet.py); the first tx request carries
NETTXF_csum_blank | NETTXF_data_validated for a checksum-partial frame and,
for a GSO frame, NETTXF_extra_info with the GSO netif_extra_info in the
next request slot (answered NETIF_RSP_NULL).  On rx the first response's
NETRXF_csum_blank / data_validated and a GSO extra become the Offload
handed to `deliver(frame, offload)`.  Without offloads (tests' fake taps)
a blank rx checksum is completed here and `deliver(frame)` gets bare frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xenbed.drivers.xenbus.frontend import GrantedPage
from xenbed.protocols.inet import ETH_HLEN, complete_checksum
from xenbed.protocols.netif import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, FrontRing, MalformedMessage
from xenbed.protocols.vnet import VNET_HDR_LEN, BadOffload, Offload, VnetHdr, settle_checksum

log = logging.getLogger("xenbed.netfront")

MAX_RX_SLOTS = XEN_NETIF_NR_SLOTS_MIN  # a chain longer than this is a broken backend


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
    every request but the last.  `flags` (e.g. NETTXF_data_validated,
    NETTXF_extra_info) go on the first request only."""
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


def tx_offload(raw: bytes, ipv6_csum: bool) -> tuple[Offload | None, bytes | bytearray | memoryview | None]:
    """(offload, frame) of what a vnet-header eth0 gave us (a blank IPv6
    checksum for a backend without feature-ipv6-csum-offload filled in).
    (None, None): drop it (an offload netif cannot carry)."""
    try:
        offload, frame = Offload.from_vnet(VnetHdr.decode(raw)), memoryview(raw)[VNET_HDR_LEN:]
        frame, offload = settle_checksum(frame, offload, csum=True, ipv6_csum=ipv6_csum)
        return offload, frame
    except BadOffload:
        return None, None


@dataclass(frozen=True)
class RxFrame:
    """One chain taken off the rx ring: `data` (empty when dropped), whether
    it is good, why not, and how many ring slots it used."""

    data: bytes
    ok: bool
    slots: int
    reason: str = ""
    csum_blank: bool = False
    offload: Offload = Offload()


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
        self._validated = False
        self._gso: NetifExtraInfo | None = None
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
            if extra is None or not 0 < extra.type < XEN_NETIF_EXTRA_TYPE_MAX:
                self._error = self._error or f"bad extra info type {extra.type if extra else '?'}"
                self._extras_pending = False
            else:
                if extra.type == XEN_NETIF_EXTRA_TYPE_GSO:
                    self._gso = extra
                self._extras_pending = extra.more
            if self._extras_pending:
                return None
            return None if self._more else self._finish()
        rsp = NetifRxResponse.decode(slot)
        if self._slots == 1:
            self._csum_blank = bool(rsp.flags & NETRXF_csum_blank)
            self._validated = bool(rsp.flags & NETRXF_data_validated)
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
        offload = Offload()
        if not error and (csum or self._validated or self._gso is not None):
            try:
                offload = Offload.from_netif(csum, self._validated, self._gso)
            except BadOffload as exc:
                error = f"bad offload: {exc}"
        if not error and len(data) < ETH_HLEN:
            error = f"runt frame of {len(data)} bytes"
        if not error and len(data) > self.max_len:
            error = f"frame of {len(data)} bytes is too long"
        self._reset()
        if error:
            return RxFrame(b"", False, slots, error, csum)
        return RxFrame(data, True, slots, "", csum, offload)


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
    rx_csum_blank: int = 0  # frames flagged csum_blank (the receiver finishes the checksum)
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


class NetfrontEngine:
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
        self.offloads = False  # deliver(frame, offload); else bare frames, blank checksums completed
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
    def transmit(self, frame: bytes | memoryview, timeout: float | None = None,
                 offload: Offload | None = None) -> _TxPacket | None:
        """Put one frame on the tx ring (waiting for free slots while the
        ring is full: backpressure), with its offloads.  Returns the
        in-flight packet, or None when it was dropped (not running, too
        large, timed out)."""
        length = len(frame)
        extra = offload.gso_extra() if offload is not None else None
        flags = (offload.tx_flags() if offload is not None else 0) | (NETTXF_extra_info if extra else 0)
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
                if len(self._tx_free) >= nslots and self.tx_ring.free_requests() >= nslots + (extra is not None):
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
            for i, req in enumerate(build_tx_requests(length, [(rid, self.tx_pool[rid].gref) for rid in ids], flags)):
                self.tx_ring.put_request(req.encode())
                self._tx_inflight[req.id] = pkt
                if i == 0 and extra is not None:
                    self.tx_ring.put_request(extra.encode())  # the GSO extra: a slot of its own, no id
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
        if frame.csum_blank:
            c.rx_csum_blank += 1
        try:
            if self.offloads:
                ok = self.deliver(data, frame.offload)
            else:  # a bare tap: complete a blank checksum here (netfront said feature-no-csum-offload)
                ok = self.deliver(complete_checksum(data) if frame.csum_blank else data)
        except Exception as exc:
            log.debug("%s: delivering a frame: %s", self.name, exc)
            ok = False
        if ok is False:
            c.rx_dropped += 1
        else:
            c.rx_packets += 1
            c.rx_bytes += len(data)

    def handle_responses(self) -> None:
        """Take what both rings have (after a cancelled suspend)."""
        self.handle_tx_responses()
        self.handle_rx_responses()

    def kick(self) -> None:
        """Notify the backend on every channel (after it connected: it may
        have missed buffers posted before it mapped the ring)."""
        self._kick_rx()
        if self._kick_tx is not self._kick_rx:
            self._kick_tx()
