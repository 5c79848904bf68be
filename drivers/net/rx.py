"""netback's RX data path (Linux's xen-netback/rx.c): frames read from the
vif's tap, held in a short backlog until the guest has posted enough rx
buffers, then grant-copied into them.  `RxPath` is the RX half of
netback.py's `NetifServer`; `rx_layout` is pure."""

from __future__ import annotations

import errno
import os

from xenbed.protocols.inet import ETH_HLEN
from xenbed.protocols.netif import NETIF_RSP_ERROR, NETRXF_more_data, NetifRxRequest, NetifRxResponse
from xenbed.protocols.ring import XEN_PAGE_SIZE, full_barrier

RX_BACKLOG_MAX = 256  # frames waiting for rx buffers
RX_STALL_SECONDS = 2.0  # a frame older than this is dropped (Linux: rx_drain_timeout 10 s)
RX_POLL_SECONDS = 0.03  # frontend without feature-rx-notify: poll (Linux: drain_timeout 30 ms)


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


class RxPath:
    """The RX half of a vif's server (NetifServer): `rx_ring`, `rx_pages`,
    `backlog`, `stats`, `grants`, `domid`, `tap_fd` and `clock` are set by
    NetifServer's constructor."""

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
