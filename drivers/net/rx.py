"""netback's RX data path (Linux's xen-netback/rx.c): frames read from the
vif's tap, held in a short backlog until the guest has posted enough rx
buffers, then grant-copied into them.  `RxPath` is the RX half of
netback.py's `NetifServer`; `rx_layout` and `rx_plan` are pure.

On a vnet-header tap every frame comes with its offloads (a blank
checksum, GSO): the first rx response carries NETRXF_csum_blank |
NETRXF_data_validated (or data_validated alone), and a GSO frame's
netif_extra_info (XEN_NETIF_EXTRA_TYPE_GSO) takes the slot after it, as
Linux's xenvif_rx_skb does.  What the kernel may hand us follows what the
frontend asked for (`RxFeatures`, TUNSETOFFLOAD at connect), so a frontend
without feature-sg is never sent a multi-slot frame and one with
feature-no-csum-offload never a blank checksum (an IPv6 one for a frontend
without feature-ipv6-csum-offload is summed here)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from xenbed.protocols.inet import ETH_HLEN
from xenbed.protocols.netif import (
    NETIF_RSP_ERROR, NETRXF_extra_info, NETRXF_more_data, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6,
    NetifRxRequest, NetifRxResponse,
)
from xenbed.protocols.ring import XEN_PAGE_SIZE, full_barrier
from xenbed.protocols.vnet import VNET_HDR_LEN, BadOffload, Offload, VnetHdr, settle_checksum

RX_BACKLOG_MAX = 64  # frames read ahead of the guest's rx buffers, each in a buffer of its own, reused
RX_READ_SIZE = 65536 + ETH_HLEN + 4 + VNET_HDR_LEN  # the largest read a tap returns
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


@dataclass(frozen=True)
class RxFeatures:
    """What the frontend takes on its rx ring (its xenstore keys)."""

    sg: bool = True  # feature-sg: multi-slot frames
    csum: bool = True  # not feature-no-csum-offload: blank checksums (IPv4)
    ipv6_csum: bool = False  # feature-ipv6-csum-offload
    gso_tcpv4: bool = False  # feature-gso-tcpv4
    gso_tcpv6: bool = False  # feature-gso-tcpv6

    def tap_offload(self) -> dict[str, bool]:
        """TUNSETOFFLOAD for the vif (Linux's xenvif_fix_features): GSO only
        with SG; IPv6 TSO only with IPv6 checksum offload."""
        return {"csum": self.csum, "tso4": self.sg and self.gso_tcpv4,
                "tso6": self.sg and self.gso_tcpv6 and self.ipv6_csum}

    def takes_gso(self, gso_type: int) -> bool:
        return self.sg and ((gso_type == XEN_NETIF_GSO_TYPE_TCPV4 and self.gso_tcpv4)
                            or (gso_type == XEN_NETIF_GSO_TYPE_TCPV6 and self.gso_tcpv6))


def rx_plan(frame: bytes | bytearray | memoryview, offload: Offload,
            features: RxFeatures) -> tuple[bytes | bytearray | memoryview, int, bool]:
    """(the frame, flags of the first response, whether a GSO extra follows
    it) for a frame with `offload` to a frontend with `features`; a blank
    checksum the frontend cannot take is filled in (in a copy).
    BadOffload: drop it."""
    if offload.gso and not features.takes_gso(offload.gso_type):
        raise BadOffload(f"frontend does not take GSO type {offload.gso_type}")
    if not features.sg and len(frame) > XEN_PAGE_SIZE:
        raise BadOffload(f"a {len(frame)}-byte frame for a frontend without feature-sg")
    frame, offload = settle_checksum(frame, offload, csum=features.csum, ipv6_csum=features.ipv6_csum)
    return frame, offload.rx_flags(), offload.gso


class RxPath:
    """The RX half of a vif's server (NetifServer): `rx_ring`, `rx_pages`,
    `backlog`, `stats`, `grants`, `domid`, `tap_fd` and `clock` are set by
    NetifServer's constructor."""

    def read_tap(self, limit: int = RX_BACKLOG_MAX) -> int:
        """Move frames from the tap into the backlog (non-blocking fd), each
        into a free buffer of `rx_free` (none free: they wait in the tap's
        queue, as in a stopped queue, and the kernel drops what overflows)."""
        n = 0
        now = self.clock()
        while n < limit and self.rx_free:
            buf = self.rx_free.pop()
            try:
                length = os.readv(self.tap_fd, [buf])
            except OSError as exc:
                self.rx_free.append(buf)
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
            if not length:
                self.rx_free.append(buf)
                break
            n += 1
            self.backlog.append((now, buf, length))
        return n

    def _rx_done(self, entry: tuple[float, bytearray, int], dropped: bool = False) -> None:
        self.rx_free.append(entry[1])
        if dropped:
            self.stats["rx_dropped"] += 1

    def deliver_rx(self) -> bool:
        """Copy backlogged frames into the guest's posted buffers; True if
        the frontend must be notified.  Stale frames are dropped."""
        ring = self.rx_ring
        now = self.clock()
        notify = False
        while self.backlog and now - self.backlog[0][0] > RX_STALL_SECONDS:
            self._rx_done(self.backlog.popleft(), dropped=True)
        while self.backlog:
            ops, rsps = [], []  # rsps: (id, n, flags, op index) or (encoded extra, None, None, None)
            page = 0
            while self.backlog:
                _, buf, length = self.backlog[0]
                try:
                    frame, flags, extra = self._rx_prepare(memoryview(buf)[:length])
                except BadOffload:
                    frame, flags, extra = None, 0, None
                layout = rx_layout(len(frame)) if frame is not None else []
                needed = len(layout) + (extra is not None)
                if frame is None or needed > ring.size:
                    self._rx_done(self.backlog.popleft(), dropped=True)
                    continue
                if page + len(layout) > len(self.rx_pages):
                    break
                if not self._rx_slots_available(needed):
                    break  # req_event asks the frontend to notify us when it posts more
                entry = self.backlog.popleft()
                for k, (pos, n, more) in enumerate(layout):
                    req = NetifRxRequest.decode(ring.take_request())
                    local = self.rx_pages[page]
                    local.mmap[:n] = frame[pos:pos + n]
                    ops.append(self._copy_op(self._local(local.gfn, 0), self._gref(self.domid, req.gref, 0), n))
                    first = flags | (NETRXF_extra_info if extra is not None else 0) if k == 0 else 0
                    rsps.append((req.id, n, more | first, len(ops) - 1))
                    page += 1
                    if k == 0 and extra is not None:
                        ring.take_request()  # the extra info takes a slot (its buffer stays posted-and-unused)
                        rsps.append((extra, None, None, None))
                self.stats["rx_packets"] += 1
                self.stats["rx_bytes"] += len(frame)
                self._rx_done(entry)  # its bytes are in our pages now
            if not ops:
                break
            statuses = self.grants.copy(ops, check=False)
            for rsp_id, n, flags, op in rsps:
                if op is None:
                    ring.put_response(rsp_id)
                    continue
                status = n if statuses[op] == "GNTST_okay" else NETIF_RSP_ERROR
                if status < 0:
                    self.stats["rx_errors"] += 1
                ring.put_response(NetifRxResponse(rsp_id, 0, flags, status).encode())
            notify = ring.push_responses_and_check_notify() or notify
        return notify

    def _rx_prepare(self, raw: memoryview) -> tuple[bytes | bytearray | memoryview, int, bytes | None]:
        """(frame, first response's flags, encoded GSO extra or None) of
        what the tap gave us."""
        if not self.vnet_hdr:
            if not self.features.sg and len(raw) > XEN_PAGE_SIZE:
                raise BadOffload("too long for a frontend without feature-sg")
            return raw, 0, None
        offload = Offload.from_vnet(VnetHdr.decode(raw))
        frame, flags, gso = rx_plan(raw[VNET_HDR_LEN:], offload, self.features)
        return frame, flags, offload.gso_extra().encode() if gso else None

    def _rx_slots_available(self, needed: int) -> bool:
        """xenvif_rx_ring_slots_available: enough posted buffers?  If not,
        ask for an event on the next request and look again."""
        ring = self.rx_ring
        if ring.unconsumed_requests() >= needed:
            return True
        ring.sring.req_event = ring.sring.req_prod + 1
        full_barrier()
        return ring.unconsumed_requests() >= needed
