"""netfront's data path (NetfrontEngine) against a tiny netback written here on the
real ring code (protocols/ring.py BackRing): the rings and the granted pages
are plain bytearrays, grant refs index them.  No Docker, no Xen."""

from __future__ import annotations

import threading
import time

import pytest

from xenbed.drivers.net.front_engine import EngineState, NetfrontEngine
from xenbed.drivers.xenbus.frontend import GrantedPage
from xenbed.protocols.netif import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_ERROR,
    NETIF_RSP_OKAY,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_more_data,
    RX_RING_ENTRY_SIZE,
    TX_RING_ENTRY_SIZE,
    ExtraGso,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenbed.protocols.ring import BackRing, FrontRing, MalformedMessage, SharedRing

PAGE = 4096


class Wire:
    """Everything the two ends share: ring pages and granted pages by gref."""

    def __init__(self):
        self.tx_page, self.rx_page = bytearray(PAGE), bytearray(PAGE)
        SharedRing.init(self.tx_page)
        SharedRing.init(self.rx_page)
        self.grants: dict[int, bytearray] = {}
        self.readonly: set[int] = set()
        self.kicks = {"tx": 0, "rx": 0}

    def pool(self, n, first_gref, readonly):
        out = []
        for i in range(n):
            page = bytearray(PAGE)
            gref = first_gref + i
            self.grants[gref] = page
            if readonly:
                self.readonly.add(gref)
            out.append(GrantedPage(gref, memoryview(page)))
        return out


class Netback:
    """What a netback does with the rings (copy mode, in request order)."""

    def __init__(self, wire: Wire):
        self.wire = wire
        self.tx = BackRing(wire.tx_page, TX_RING_ENTRY_SIZE)
        self.rx = BackRing(wire.rx_page, RX_RING_ENTRY_SIZE)
        self.pending_tx: list[NetifTxRequest] = []
        self.frames: list[bytes] = []

    # tx: the guest's frames
    def take_tx(self, status=NETIF_RSP_OKAY, respond=True) -> list[bytes]:
        frames = []
        while self.tx.unconsumed_requests():
            req = NetifTxRequest.decode(self.tx.take_request())
            assert req.gref in self.wire.readonly, "tx pages are granted read-only"
            self.pending_tx.append(req)
            if not req.flags & NETTXF_more_data:
                first, rest = self.pending_tx[0], self.pending_tx[1:]
                head = first.size - sum(r.size for r in rest)
                assert 0 < head <= PAGE
                data = bytes(self.wire.grants[first.gref][first.offset:first.offset + head])
                for r in rest:
                    data += bytes(self.wire.grants[r.gref][r.offset:r.offset + r.size])
                assert len(data) == first.size
                frames.append(data)
                if respond:
                    for r in self.pending_tx:
                        self.tx.put_response(NetifTxResponse(r.id, status).encode())
                self.pending_tx = []
        if respond:
            self.tx.push_responses_and_check_notify()
        self.frames += frames
        return frames

    def respond_tx(self, reqs, status=NETIF_RSP_OKAY):
        for r in reqs:
            self.tx.put_response(NetifTxResponse(r.id, status).encode())
        self.tx.push_responses_and_check_notify()

    # rx: frames for the guest
    def posted(self) -> int:
        return self.rx.unconsumed_requests()

    def send(self, frame: bytes, chunk=PAGE, offset=0, extra=False) -> int:
        """Copy `frame` into posted buffers, `chunk` bytes a slot, as a chain."""
        pieces = [frame[i:i + chunk] for i in range(0, len(frame), chunk)] or [b""]
        need = len(pieces) + (1 if extra else 0)
        assert self.rx.unconsumed_requests() >= need, "not enough rx buffers posted"
        for i, piece in enumerate(pieces):
            req = NetifRxRequest.decode(self.rx.take_request())
            self.wire.grants[req.gref][offset:offset + len(piece)] = piece
            flags = NETRXF_more_data if i < len(pieces) - 1 else 0
            if i == 0 and extra:
                flags |= NETRXF_extra_info
            self.rx.put_response(NetifRxResponse(req.id, offset, flags, len(piece)).encode())
            if i == 0 and extra:
                self.rx.take_request()  # the extra info uses a slot (and its buffer) too
                self.rx.put_response(NetifExtraInfo.for_gso(ExtraGso(1448, 1)).encode())
        return self.rx.push_responses_and_check_notify()

    def send_error(self):
        req = NetifRxRequest.decode(self.rx.take_request())
        self.rx.put_response(NetifRxResponse(req.id, 0, 0, NETIF_RSP_ERROR).encode())
        self.rx.push_responses_and_check_notify()


class World:
    def __init__(self, running=True):
        self.wire = Wire()
        self.delivered: list[bytes] = []
        self.accept = True
        self.engine = NetfrontEngine("eth0", self._deliver)
        self.tx_ring = FrontRing(self.wire.tx_page, TX_RING_ENTRY_SIZE)
        self.rx_ring = FrontRing(self.wire.rx_page, RX_RING_ENTRY_SIZE)
        self.tx_pool = self.wire.pool(self.tx_ring.size, 1000, readonly=True)
        self.rx_pool = self.wire.pool(self.rx_ring.size, 2000, readonly=False)
        self.engine.attach(self.tx_ring, self.rx_ring, self.tx_pool, self.rx_pool,
                           lambda: self._kick("tx"), lambda: self._kick("rx"))
        self.back = Netback(self.wire)
        if running:
            self.engine.start()

    def _kick(self, which):
        self.wire.kicks[which] += 1

    def _deliver(self, frame):
        if not self.accept:
            return False
        self.delivered.append(frame)
        return True


def frame(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def world():
    return World()


# -- rx buffers -----------------------------------------------------------------------
def test_attach_posts_a_buffer_in_every_rx_slot(world):
    assert world.rx_ring.size == 256 and world.tx_ring.size == 256
    assert world.back.posted() == 256
    reqs = [NetifRxRequest.decode(world.wire.rx_page[64 + 8 * i:72 + 8 * i]) for i in range(256)]
    assert [r.id for r in reqs] == list(range(256))  # id = ring index
    assert [r.gref for r in reqs] == [2000 + i for i in range(256)]
    assert world.wire.kicks["rx"] == 1  # a fresh ring asks for the first request


# -- tx ---------------------------------------------------------------------------------
def test_one_frame_goes_out_and_is_counted(world):
    f = frame(1514)
    pkt = world.engine.transmit(f)
    assert pkt is not None and world.wire.kicks["tx"] == 1
    assert world.back.take_tx() == [f]
    assert world.engine.handle_tx_responses() == 1
    assert pkt.done.is_set() and pkt.status == NETIF_RSP_OKAY
    c = world.engine.counters
    assert (c.tx_packets, c.tx_bytes, c.tx_slots, c.tx_errors, c.tx_dropped) == (1, 1514, 1, 0, 0)
    assert world.engine.inflight() == 0


@pytest.mark.parametrize("n", [4096, 4097, 9014, 65535])
def test_large_frames_take_several_slots(world, n):
    f = frame(n, seed=n)
    world.engine.transmit(f)
    assert world.back.take_tx() == [f]
    world.engine.handle_tx_responses()
    assert world.engine.counters.tx_packets == 1
    assert world.engine.counters.tx_slots == -(-n // PAGE)


def test_without_sg_only_one_slot_frames(world):
    world.engine.max_tx_slots = 1
    assert world.engine.transmit(frame(1514)) is not None
    assert world.engine.transmit(frame(9014)) is None
    assert world.engine.counters.tx_dropped == 1


def test_many_frames_ids_are_reused(world):
    sent = [frame(60 + i % 1400, seed=i) for i in range(1000)]
    got = []
    for i, f in enumerate(sent):
        world.engine.transmit(f, timeout=1)
        if i % 50 == 49:
            got += world.back.take_tx()
            world.engine.handle_tx_responses()
    got += world.back.take_tx()
    world.engine.handle_tx_responses()
    assert got == sent
    assert world.engine.counters.tx_packets == 1000


def test_full_ring_blocks_the_sender_until_responses(world):
    for i in range(256):
        assert world.engine.transmit(frame(100, seed=i), timeout=0) is not None
    reqs = []
    while world.back.tx.unconsumed_requests():
        reqs.append(NetifTxRequest.decode(world.back.tx.take_request()))
    assert len(reqs) == 256
    # no free slot: a non-waiting transmit drops, a waiting one blocks
    assert world.engine.transmit(frame(100), timeout=0) is None
    done = threading.Event()
    t = threading.Thread(target=lambda: (world.engine.transmit(frame(100, seed=99), timeout=10), done.set()))
    t.start()
    time.sleep(0.2)
    assert not done.is_set()
    world.back.respond_tx(reqs[:1])
    world.engine.handle_tx_responses()  # what the event handler does
    assert done.wait(5)
    t.join()
    assert world.engine.counters.tx_packets == 1 and world.engine.counters.tx_dropped == 1


def test_sender_collects_responses_itself(world):
    """xennet_tx_buf_gc: a transmit takes answered slots even with no event."""
    for i in range(256):
        world.engine.transmit(frame(100, seed=i), timeout=0)
    world.back.take_tx()  # answers all, but nobody handles the event
    assert world.engine.transmit(frame(100), timeout=0) is not None
    assert world.engine.counters.tx_packets == 256


@pytest.mark.parametrize("status, counter", [(NETIF_RSP_ERROR, "tx_errors"), (NETIF_RSP_DROPPED, "tx_dropped")])
def test_tx_failures_are_counted_per_frame(world, status, counter):
    world.engine.transmit(frame(9000))
    world.back.take_tx(status=status)
    world.engine.handle_tx_responses()
    assert getattr(world.engine.counters, counter) == 1
    assert world.engine.counters.tx_packets == 0
    assert world.engine.inflight() == 0


def test_runts_and_giants_are_dropped(world):
    assert world.engine.transmit(b"short") is None
    assert world.engine.transmit(bytes(70000)) is None
    assert world.engine.counters.tx_dropped == 2
    assert world.back.tx.unconsumed_requests() == 0


def test_no_transmit_until_started():
    w = World(running=False)
    assert w.engine.state == EngineState.ATTACHED
    assert w.engine.transmit(frame(100), timeout=0) is None
    w.engine.start()
    assert w.engine.transmit(frame(100), timeout=0) is not None


def test_response_for_an_unknown_id_is_malformed(world):
    world.engine.transmit(frame(100))
    world.back.tx.take_request()
    world.back.tx.put_response(NetifTxResponse(17, NETIF_RSP_OKAY).encode())
    world.back.tx.push_responses()
    with pytest.raises(MalformedMessage):
        world.engine.handle_tx_responses()


# -- rx -----------------------------------------------------------------------------------
def test_frames_from_the_backend_reach_the_tap_and_buffers_are_reposted(world):
    frames = [frame(60, 1), frame(1514, 2), frame(9014, 3), frame(4096, 4), frame(65000, 5)]
    for f in frames:
        world.back.send(f)
    world.engine.handle_rx_responses()
    assert world.delivered == frames
    c = world.engine.counters
    assert (c.rx_packets, c.rx_bytes, c.rx_errors, c.rx_dropped) == (5, sum(map(len, frames)), 0, 0)
    assert world.back.posted() == 256  # the ring is full of buffers again


def test_rx_many_rounds_wrap_the_ring(world):
    sent = []
    for round_ in range(20):
        for i in range(40):
            f = frame(100 + i * 30, seed=round_ * 40 + i)
            sent.append(f)
            world.back.send(f, chunk=1000, offset=64)
        world.engine.handle_rx_responses()
    assert world.delivered == sent
    assert world.back.posted() == 256


def test_rx_extra_info_slot_is_skipped_and_its_buffer_reposted(world):
    f = frame(3000)
    world.back.send(f, chunk=2000, extra=True)
    world.engine.handle_rx_responses()
    assert world.delivered == [f]
    assert world.engine.counters.rx_slots == 3
    assert world.back.posted() == 256


def test_rx_errors_and_tap_refusals_are_counted(world):
    world.back.send_error()
    world.accept = False
    world.back.send(frame(100))
    world.engine.handle_rx_responses()
    c = world.engine.counters
    assert (c.rx_errors, c.rx_dropped, c.rx_packets) == (1, 1, 0)
    assert world.back.posted() == 256


def test_rx_notifies_the_backend_only_when_it_asks(world):
    kicks = world.wire.kicks["rx"]
    world.back.send(frame(100))
    world.engine.handle_rx_responses()  # backend's req_event still at 1: no kick wanted
    assert world.wire.kicks["rx"] == kicks
    # a backend that ran out of requests sets req_event and waits (RING_FINAL_CHECK_FOR_REQUESTS)
    while world.back.rx.unconsumed_requests():
        world.back.rx.take_request()
    world.back.rx.final_check_for_requests()
    for _ in range(256):
        world.back.rx.put_response(NetifRxResponse(0, 0, 0, NETIF_RSP_ERROR).encode())
    world.back.rx.push_responses()
    world.engine.handle_rx_responses()
    assert world.wire.kicks["rx"] > kicks


def test_rx_final_check_arms_the_event(world):
    world.engine.handle_rx_responses()
    assert world.wire.rx_page[12:16] == (world.rx_ring.rsp_cons + 1).to_bytes(4, "little")  # rsp_event


# -- lifecycle -------------------------------------------------------------------------------
def test_detach_drops_in_flight_frames_and_a_new_ring_works(world):
    world.engine.transmit(frame(100))
    world.engine.transmit(frame(9000))
    assert world.engine.inflight() == 2
    assert world.engine.detach() == 2
    assert world.engine.state == EngineState.DETACHED
    assert world.engine.counters.tx_dropped == 2
    assert world.engine.transmit(frame(100), timeout=0) is None  # no ring: dropped
    w2 = World()
    world.engine.attach(w2.tx_ring, w2.rx_ring, w2.tx_pool, w2.rx_pool, lambda: None)
    world.engine.start()
    f = frame(1234)
    world.engine.transmit(f)
    assert w2.back.take_tx() == [f]


def test_close_drains_then_fails(world):
    world.engine.transmit(frame(100))
    world.engine.begin_close()
    assert world.engine.transmit(frame(100), timeout=0) is None
    assert not world.engine.drain(0.2)
    world.back.take_tx()
    assert world.engine.drain(1.0)  # drain takes the responses itself
    world.engine.close()
    assert world.engine.state == EngineState.CLOSED
    assert world.engine.counters.tx_packets == 1


def test_wait_running(world):
    assert world.engine.wait_running(0)
    world.engine.detach()
    assert not world.engine.wait_running(0.05)


def test_rx_csum_blank_frames_get_their_checksum(world):
    from xenbed.protocols.inet import complete_checksum
    from xenbed.protocols.netif import NETRXF_csum_blank
    from .test_netfront import _udp4_frame
    f = _udp4_frame()
    req = NetifRxRequest.decode(world.back.rx.take_request())
    world.wire.grants[req.gref][:len(f)] = f
    world.back.rx.put_response(NetifRxResponse(req.id, 0, NETRXF_csum_blank, len(f)).encode())
    world.back.rx.push_responses()
    world.engine.handle_rx_responses()
    assert world.delivered == [complete_checksum(f)] and world.delivered[0] != f
    assert world.engine.counters.rx_csum_blank == 1
