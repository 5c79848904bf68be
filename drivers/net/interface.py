"""One connected vif in netback (Linux's xen-netback/interface.c): the
mapped tx and rx rings, the bound event channel(s), the bounce pages and the
threads serving both directions over the vif's tap; and what the frontend
asks for in the store (connect_data_rings / read_xenbus_vif_flags in
xenbus.c).
"""

from __future__ import annotations

import dataclasses
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
    more_queues: tuple[FrontendConfig, ...] = ()  # queues 1.. of a multi-queue frontend (this one is queue 0)

    def all_queues(self) -> tuple[FrontendConfig, ...]:
        return (self, *self.more_queues)

    def rx_features(self) -> RxFeatures:
        return RxFeatures(sg=self.sg, csum=self.csum, ipv6_csum=self.ipv6_csum, gso_tcpv4=self.gso_tcpv4,
                          gso_tcpv6=self.gso_tcpv6)


def parse_frontend_config(read, max_queues: int = 1) -> FrontendConfig:
    """Read and check netfront's keys; `read(key)` -> value or None.
    Missing or malformed keys raise BadNode (-> dev_fatal).  A frontend
    asking for `multi-queue-num-queues` N > 1 (at most `max_queues`, what we
    advertise) has each queue's rings and ports under `queue-<i>/`
    (Linux's connect / connect_data_rings); one queue, at the top."""
    def flag(key: str) -> bool:
        return read_flag(read(key), key)

    text = read("multi-queue-num-queues")
    queues = 1 if text is None else read_uint(text, "multi-queue-num-queues")
    if queues > max_queues:
        raise BadNode(errno.ENOSYS, f"guest requested {queues} queues, exceeding the maximum of {max_queues}")
    if queues == 0:
        raise BadNode(errno.EINVAL, "guest requested 0 queues")
    if not flag("request-rx-copy"):
        raise BadNode(errno.EOPNOTSUPP, "frontend does not request rx-copy (request-rx-copy)")
    features = dict(rx_notify=flag("feature-rx-notify"), sg=flag("feature-sg"),
                    csum=not flag("feature-no-csum-offload"), ipv6_csum=flag("feature-ipv6-csum-offload"),
                    gso_tcpv4=flag("feature-gso-tcpv4"), gso_tcpv6=flag("feature-gso-tcpv6"))
    configs = [_queue_config(read, f"queue-{i}/" if queues > 1 else "", features) for i in range(queues)]
    return dataclasses.replace(configs[0], more_queues=tuple(configs[1:]))


def _queue_config(read, prefix: str, features: dict) -> FrontendConfig:
    def uint(key: str) -> int:
        return read_uint(read(prefix + key), prefix + key)

    tx_ref, rx_ref = uint("tx-ring-ref"), uint("rx-ring-ref")
    if read(prefix + "event-channel-tx") is not None or read(prefix + "event-channel-rx") is not None:
        tx_port, rx_port, split = uint("event-channel-tx"), uint("event-channel-rx"), True
    else:
        tx_port = rx_port = uint("event-channel")
        split = False
    return FrontendConfig(tx_ref, rx_ref, tx_port, rx_port, split, **features)


# ---------------------------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------------------------

class NetbackConnection:
    """A connected vif: one `NetbackQueue` per queue the frontend asked for
    (each with its own tap descriptor: the kernel spreads flows over a
    multi-queue tap's queues), and descriptors we opened for it."""

    def __init__(self, name: str, grants, evtchn, memory, domid: int, config: FrontendConfig,
                 tap_fds: list[int], rate, on_fatal, vnet_hdr: bool = False, owned_fds: tuple[int, ...] = ()) -> None:
        self.name, self.config, self.evtchn = name, config, evtchn
        self.owned_fds = list(owned_fds)
        self.queues: list[NetbackQueue] = []
        try:
            for i, queue in enumerate(config.all_queues()):
                self.queues.append(NetbackQueue(name if i == 0 else f"{name}/queue-{i}", grants, evtchn, memory,
                                                domid, queue, tap_fds[i], rate, on_fatal, vnet_hdr))
        except BaseException:
            self.close()
            raise

    @property
    def server(self) -> NetifServer | None:
        return self.queues[0].server if self.queues else None

    @property
    def tx_port(self) -> int:
        return self.queues[0].tx_port

    @property
    def rx_port(self) -> int:
        return self.queues[0].rx_port

    @property
    def ports(self) -> list[int]:
        return [port for queue in self.queues for port in queue.ports]

    def set_rate(self, rate) -> None:
        for queue in self.queues:  # as Linux: each queue has the vif's credit
            queue.set_rate(rate)

    def start(self) -> None:
        for queue in self.queues:
            queue.start()

    def close(self) -> None:
        for queue in self.queues:
            queue.close()
        for fd in self.owned_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned_fds = []


class NetbackQueue:
    """One queue of a connected vif: mapped rings, bound port(s), bounce
    pages and two threads, one per direction (Linux: the tx NAPI poll and the rx
    kthread), so a frame for the guest never waits behind a tx batch's
    grant copy, and the two copies overlap in the hypervisor."""

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
        self.wakers = {d: os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for d in ("tx", "rx")}  # (read, write) ends
        self.port_fds: dict[str, int] = {}  # direction -> our dup of its port's eventfd (fd mode, split)
        self._pollers: dict[tuple, select.poll] = {}  # (direction, *other fds) -> poller (_woken)
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

    def wake(self, *directions: str) -> None:
        for d in directions or ("tx", "rx"):
            pair = self.wakers.get(d)
            try:
                if pair is not None:
                    os.write(pair[1], b"!")
            except OSError:
                pass

    def start(self) -> None:
        for port in self.ports:
            # split channels in fd mode: each direction's thread polls its own
            # port's eventfd (one wake-up less per event); else a waiter thread
            if self.config.split:
                fd = self.evtchn.pending_fd(port)
                if fd is not None:
                    self.port_fds["tx" if port == self.tx_port else "rx"] = fd
                    continue
            # one channel: an event may be for either ring; split: each its own
            directions = ("tx", "rx") if not self.config.split else ("tx",) if port == self.tx_port else ("rx",)
            t = threading.Thread(target=self._wait_port, args=(port, directions), name=f"{self.name}-evtchn{port}",
                                 daemon=True)
            t.start()
            self.threads.append(t)
        for direction, serve in (("tx", self._serve_tx), ("rx", self._serve_rx)):
            t = threading.Thread(target=run_ring_thread, name=f"{self.name}-{direction}", daemon=True,
                                 args=(self.name, self.stop, self.on_fatal, serve, (FatalTxError, RingOverflow)))
            t.start()
            self.threads.append(t)

    def _wait_port(self, port: int, directions: tuple[str, ...]) -> None:
        # wait() clears the pending bit before we wake the server: no lost events
        while not self.stop.is_set():
            try:
                if self.evtchn.wait(port, timeout=0.25):
                    self.wake(*directions)
            except Exception as exc:
                if not self.stop.is_set():
                    log.warning("%s: waiting on port %d: %s", self.name, port, exc)
                return

    def _woken(self, direction: str, fds: list[int], timeout: float) -> list[int]:
        """Wait for our wake pipe or port (both cleared before the ring is
        looked at: no lost event) or one of `fds`; the ready ones."""
        wake_r, port_fd = self.wakers[direction][0], self.port_fds.get(direction)
        key = (direction, *fds)
        poller = self._pollers.get(key)
        if poller is None:  # a few per connection, made once: this runs per batch of frames
            poller = self._pollers[key] = select.poll()  # not select(2): dom0's descriptors go past 1024
            for fd in [wake_r, *fds] if port_fd is None else [wake_r, port_fd, *fds]:
                poller.register(fd, select.POLLIN)
        ms = 0 if timeout <= 0 else max(1, int(timeout * 1000))
        readable = [fd for fd, _ in poller.poll(ms)]
        for fd in (wake_r, port_fd):
            if fd is not None and fd in readable:
                try:
                    os.read(fd, 4096 if fd == wake_r else 8)
                except BlockingIOError:
                    pass
        return readable

    def _serve_tx(self) -> None:
        server = self.server
        timeout = 0.0
        while not self.stop.is_set():
            self._woken("tx", [], timeout)
            if self.stop.is_set():
                break
            notify, credit_wait = server.process_tx(self.stop)
            if notify:
                self.evtchn.notify(self.tx_port)
            timeout = min(0.25, credit_wait) if credit_wait else 0.25

    def _serve_rx(self) -> None:
        server = self.server
        tap_fd = server.tap_fd
        timeout = 0.0
        while not self.stop.is_set():
            readable = self._woken("rx", [tap_fd] if server.rx_free else [], timeout)
            if self.stop.is_set():
                break
            if tap_fd in readable:
                server.read_tap()
            if server.deliver_rx():
                self.evtchn.notify(self.rx_port)
            timeout = 0.25
            if server.backlog:
                timeout = RX_POLL_SECONDS if not server.rx_notify else 0.1

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
        for fd in [fd for pair in self.wakers.values() for fd in pair] + list(self.port_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.wakers, self.port_fds = {}, {}
