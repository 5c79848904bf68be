"""Event channels at memory speed: a real hypervisor-service in this
process (its asyncio loop on a thread, real Unix sockets, real eventfds)
and guest links in fd mode, no Docker.

What is checked is Xen's semantics (event_channel.c) on the new path:
coalescing while pending, masking, a send on an unbound port dropped, a
newly bound port pending, and a closed channel no longer waking the old
peer even if it kept a copy of the descriptor -- plus the one property the
fast path is for: a send does not go through the hypervisor's loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from xenbed.drivers.xen import EventChannels, HypervisorLink
from xenbed.hypervisor.domains import DomainTable
from xenbed.hypervisor.server import HypervisorServer
from xenbed.hypervisor.sharing import Sharing
from xenbed.hypervisor.trace import Tracer
from xenbed.hypervisor.xenstored import XenStore
from xenbed.protocols import hypercall as hc

CREDENTIALS = {"dom0": "c0" * 16, "front": "c1" * 16, "back": "c2" * 16}


class _ListSink:
    def __init__(self, records: list) -> None:
        self.records = records

    def __call__(self, data: bytes) -> bool:
        self.records.append(data)
        return True

    def close(self) -> None:
        pass


class Service:
    """The hypervisor-service on a thread of this process."""

    def __init__(self, tmp_path) -> None:
        self.records: list[bytes] = []
        self.tracer = Tracer(enabled=True)
        self.server = HypervisorServer(str(tmp_path / "run"), DomainTable(CREDENTIALS), XenStore(),
                                       Sharing(str(tmp_path / "memory")), self.tracer, trace_sink=_ListSink(self.records))
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            self.tracer.attach(self.loop.call_later, self.server.trace_sink)
            started.set()
            self.loop.run_until_complete(self.server.stopping.wait())
            self.loop.run_until_complete(self.server.close())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.path = self.server.socket_path

    def on_loop(self, fn, *args):
        done = threading.Event()
        result = []
        self.loop.call_soon_threadsafe(lambda: (result.append(fn(*args)), done.set()))
        assert done.wait(10)
        return result[0]

    def trace(self) -> list[dict]:
        import json
        self.on_loop(self.server.sharing.drain_sendlogs, list(self.server.links))
        self.on_loop(self.tracer.flush)
        return [json.loads(line) for chunk in self.records for line in chunk.decode().splitlines()]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stopping.set)
        self.thread.join(10)


@pytest.fixture
def service(tmp_path):
    svc = Service(tmp_path)
    dom0 = HypervisorLink.open(CREDENTIALS["dom0"], "kernel", svc.path)
    for name in ("front", "back"):
        dom0.call(hc.Call.DOMAIN_CREATE, {"name": name, "memory_mb": 4})
    svc.dom0 = dom0
    yield svc
    dom0.close()
    svc.stop()


@pytest.fixture
def pair(service):
    """front offers a port, back binds it: (front link, front evtchn, its port, back ..., back port)."""
    front = HypervisorLink.open(CREDENTIALS["front"], "kernel", service.path)
    back = HypervisorLink.open(CREDENTIALS["back"], "kernel", service.path)
    fe, be = EventChannels(front), EventChannels(back)
    fport = fe.alloc_unbound(back.domid)
    bport = be.bind_interdomain(front.domid, fport)
    assert be.wait(bport, 5), "a newly bound port starts pending"
    deadline = time.monotonic() + 5
    while fe._ports.get(fport) is None or fe._ports[fport].out_fd is None:  # UP_EVTCHN_BOUND handled
        assert time.monotonic() < deadline, "the unbound end never got its descriptors"
        time.sleep(0.01)
    yield front, fe, fport, back, be, bport
    front.close()
    back.close()


def test_links_take_the_fast_path_and_a_bind_hands_out_pending_bits(pair):
    front, fe, fport, back, be, bport = pair
    assert front.fd_mode and back.fd_mode
    assert be._ports[bport].in_fd is not None and be._ports[bport].out_fd is not None
    assert fe._ports[fport].in_fd is not None


def test_a_send_does_not_cross_the_hypervisors_loop(service, pair):
    """Ping-pong with the hypervisor's event loop stuck: only eventfds move."""
    front, fe, fport, back, be, bport = pair
    stuck, release = threading.Event(), threading.Event()
    service.loop.call_soon_threadsafe(lambda: (stuck.set(), release.wait(10)))
    assert stuck.wait(5)
    try:
        for _ in range(50):
            fe.notify(fport)
            assert be.wait(bport, 2), "the backend was not woken"
            be.notify(bport)
            assert fe.wait(fport, 2), "the frontend was not woken"
    finally:
        release.set()


def test_sends_coalesce_while_pending(pair):
    front, fe, fport, back, be, bport = pair
    for _ in range(5):
        fe.notify(fport)
    assert be.wait(bport, 2)
    assert not be.wait(bport, 0.2), "five sends before a clear are one event"


def test_a_masked_port_is_held_and_unmasking_delivers(pair):
    front, fe, fport, back, be, bport = pair
    be.mask(bport)
    fe.notify(fport)
    assert not be.wait(bport, 0.2)
    assert be.status(bport)["pending"] is True and be.status(bport)["masked"] is True
    be.unmask(bport)
    assert be.wait(bport, 2)


def test_closing_stops_waking_the_old_peer_even_through_a_kept_descriptor(pair):
    front, fe, fport, back, be, bport = pair
    kept = os.dup(be._ports[bport].out_fd)  # a hostile backend keeps the frontend's bit
    try:
        be.close(bport)
        deadline = time.monotonic() + 5
        while fe._ports[fport].in_fd is not None:  # UP_EVTCHN_UNBOUND handled
            assert time.monotonic() < deadline, "the frontend was never told its peer closed"
            time.sleep(0.01)
        assert fe.status(fport)["status"] == "unbound"
        os.eventfd_write(kept, 1)
        assert not fe.wait(fport, 0.3), "a closed channel's old peer woke the port"
    finally:
        os.close(kept)
    fe.notify(fport)  # a send on an unbound port is dropped, silently (Xen)
    with pytest.raises(Exception):
        be.notify(bport, checked=True)  # the port is closed: EINVAL


def test_an_event_set_before_the_peer_closed_is_kept(pair):
    front, fe, fport, back, be, bport = pair
    be.notify(bport)
    time.sleep(0.05)
    be.close(bport)
    deadline = time.monotonic() + 5
    while fe._ports[fport].in_fd is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fe.wait(fport, 1), "the pending bit set before the close was lost"


def test_callbacks_run_for_fd_ports(pair):
    front, fe, fport, back, be, bport = pair
    seen = []
    got = threading.Event()
    fe.on_event(fport, lambda port: (seen.append(port), got.set()))
    be.notify(bport)
    assert got.wait(2)
    assert seen[0] == fport
    assert fe._ports[fport].in_fd is not None
    assert not fe.wait(fport, 0.1), "the dispatcher clears the bit before the callback, as Linux does"


def test_direct_sends_reach_the_trace(service, pair):
    front, fe, fport, back, be, bport = pair
    for _ in range(3):
        fe.notify(fport)
        be.wait(bport, 1)
    sends = [r for r in service.trace() if r.get("kind") == "evtchn" and r.get("op") == "send"
             and r.get("domid") == front.domid and r.get("port") == fport]
    assert len(sends) == 3
    assert all(r["reported"] and r["remote_domid"] == back.domid and r["remote_port"] == bport for r in sends)
