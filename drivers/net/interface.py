"""One connected vif in netback (Linux's xen-netback/interface.c): the
mapped tx and rx rings, the bound event channel(s), the bounce pages and the
threads serving both directions over the vif's tap; and what the frontend
asks for in the store (connect_data_rings / read_xenbus_vif_flags in
xenbus.c).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from dataclasses import dataclass

from xenbed.drivers.xenbus.backend import run_ring_thread
from xenbed.drivers.xenbus.nodes import BadNode, read_flag, read_uint
from xenbed.protocols import netif
from xenbed.protocols.ring import BackRing, RingOverflow

from .netback import TX_BATCH_SLOTS, FatalTxError, NetifServer
from .rx import RX_POLL_SECONDS, RxFeatures

log = logging.getLogger("xenbed.netback")


# ---------------------------------------------------------------------------------------------
# What the frontend asks for
# ---------------------------------------------------------------------------------------------

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
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False

    def rx_features(self) -> RxFeatures:
        return RxFeatures(sg=self.sg, csum=self.csum, ipv6_csum=self.ipv6_csum, gso_tcpv4=self.gso_tcpv4,
                          gso_tcpv6=self.gso_tcpv6)


def parse_frontend_config(read) -> FrontendConfig:
    """Read and check netfront's keys; `read(key)` -> value or None.
    Missing or malformed keys raise BadNode (-> dev_fatal)."""
    def flag(key: str) -> bool:
        return read_flag(read(key), key)

    queues = read("multi-queue-num-queues")
    if queues is not None and read_uint(queues, "multi-queue-num-queues") != 1:
        raise BadNode(errno.ENOSYS, f"guest requested {queues} queues, exceeding the maximum of 1")
    if not flag("request-rx-copy"):
        raise BadNode(errno.EOPNOTSUPP, "frontend does not request rx-copy (request-rx-copy)")
    tx_ref = read_uint(read("tx-ring-ref"), "tx-ring-ref")
    rx_ref = read_uint(read("rx-ring-ref"), "rx-ring-ref")
    tx_port_text, rx_port_text = read("event-channel-tx"), read("event-channel-rx")
    if tx_port_text is not None or rx_port_text is not None:
        tx_port = read_uint(tx_port_text, "event-channel-tx")
        rx_port = read_uint(rx_port_text, "event-channel-rx")
        split = True
    else:
        tx_port = rx_port = read_uint(read("event-channel"), "event-channel")
        split = False
    return FrontendConfig(tx_ref, rx_ref, tx_port, rx_port, split,
                          rx_notify=flag("feature-rx-notify"), sg=flag("feature-sg"),
                          csum=not flag("feature-no-csum-offload"),
                          ipv6_csum=flag("feature-ipv6-csum-offload"), gso_tcpv4=flag("feature-gso-tcpv4"),
                          gso_tcpv6=flag("feature-gso-tcpv6"))


# ---------------------------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------------------------

class NetbackConnection:
    """A connected vif: mapped rings, bound port(s), bounce pages and the
    thread that serves both directions."""

    def __init__(self, name: str, grants, evtchn, memory, domid: int, config: FrontendConfig, tap_fd: int,
                 rate, on_fatal, vnet_hdr: bool = False) -> None:
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
                rate=rate, rx_notify=config.rx_notify, name=name, vnet_hdr=vnet_hdr,
                features=config.rx_features())
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
        run_ring_thread(self.name, self.stop, self.on_fatal, self._serve_rings, (FatalTxError, RingOverflow))

    def _serve_rings(self) -> None:
        server = self.server
        tap_fd = server.tap_fd
        timeout = 0.0
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
