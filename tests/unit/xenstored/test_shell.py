"""The asyncio shell's XenStoreConnection with a fake transport: turns
(one connection's flood does not starve the others) and the output limit
(what xenstored holds for a client that stops reading is bounded)."""

from __future__ import annotations

import pytest

from xenbed.hypervisor.domains import DomainTable
from xenbed.hypervisor.server import (
    XS_REQUESTS_PER_TURN,
    XS_WRITE_HIGH_WATER,
    HypervisorServer,
    XenStoreConnection,
)
from xenbed.hypervisor.sharing import Sharing
from xenbed.hypervisor.xenstored import Quota, XenStore
from xenbed.protocols.xs_wire import Op, Packet, PacketReader


class FakeTransport:
    def __init__(self) -> None:
        self.out = PacketReader()
        self.reading = True
        self.buffered = 0  # what the "kernel" did not take yet
        self.closing = False

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out.feed(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def packets(self) -> list[Packet]:
        return list(iter(self.out.next_packet, None))


class FakeLoop:
    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, fn, *args) -> None:
        self.ready.append((fn, args))

    def run(self) -> int:
        turns = 0
        while self.ready:
            fn, args = self.ready.pop(0)
            fn(*args)
            turns += 1
        return turns


@pytest.fixture
def shell(tmp_path):
    server = HypervisorServer(str(tmp_path), DomainTable({}), XenStore(Quota(event_queue=4)),
                              Sharing(str(tmp_path / "memory")))
    server.loop = FakeLoop()

    def connect(domid: int) -> tuple[XenStoreConnection, FakeTransport]:
        proto = XenStoreConnection(server, domid, domid == 0)
        transport = FakeTransport()
        proto.connection_made(transport)
        return proto, transport

    server.connect = connect
    return server


def requests(n: int, path: bytes = b"/tool\0") -> bytes:
    return b"".join(Packet(Op.READ, i, 0, path).encode() for i in range(n))


def test_a_flood_is_served_in_turns(shell):
    flood, flood_t = shell.connect(1)
    other, other_t = shell.connect(2)
    flood.data_received(requests(100))
    assert len(flood_t.packets()) == XS_REQUESTS_PER_TURN  # one turn: a bounded number of requests
    assert not flood_t.reading  # nothing more is read while requests wait
    assert len(shell.loop.ready) == 1  # the rest wait for another turn, behind everyone else's
    other.data_received(requests(1))
    assert len(other_t.packets()) == 1  # another connection is answered in its own turn at once
    turns = shell.loop.run()
    assert len(flood_t.packets()) == 100 - XS_REQUESTS_PER_TURN  # every request is answered, in turns
    assert turns == -(-(100 - XS_REQUESTS_PER_TURN) // XS_REQUESTS_PER_TURN)  # 8 at most in each
    assert flood_t.reading  # all handled: reading again


def test_outstanding_quota_bounds_a_turn(shell):
    shell.store.quota = shell.store.quota.set("outstanding", 3)
    flood, flood_t = shell.connect(1)
    flood.data_received(requests(10))
    assert len(flood_t.packets()) == 3  # no more requests than the quota between two writes


def test_a_client_that_does_not_read_is_not_served_and_its_events_are_bounded(shell):
    dom0, dom0_t = shell.connect(0)
    stalled, stalled_t = shell.connect(1)
    dom0.data_received(Packet(Op.WRITE, 1, 0, b"/local/domain/1/x\0").encode())
    dom0.data_received(Packet(Op.SET_PERMS, 2, 0, b"/local/domain/1/x\0n1\0").encode())
    stalled.data_received(Packet(Op.WATCH, 1, 0, b"x\0w\0").encode())
    assert [p.op for p in stalled_t.packets()] == [Op.WATCH, Op.WATCH_EVENT]  # reply, then the first event
    stalled_t.buffered = XS_WRITE_HIGH_WATER + 1  # the client stops reading...
    stalled.pause_writing()  # ...asyncio says so
    for i in range(10):
        dom0.data_received(Packet(Op.WRITE, 10 + i, 0, f"/local/domain/1/x/{i}\0".encode()).encode())
    assert stalled_t.packets() == []  # no room: nothing more is handed to its socket
    assert len(stalled.conn.events) == 4 and stalled.conn.dropped_events == 6  # queued within the cap, the rest counted
    stalled.data_received(requests(3, b"x\0"))
    assert stalled_t.packets() == [] and not stalled_t.reading  # its requests wait, unread
    assert len(dom0_t.packets()) == 12  # everyone else is served as usual
    stalled_t.buffered = 0
    stalled.resume_writing()  # it reads again
    shell.loop.run()
    got = stalled_t.packets()
    assert [p.op for p in got] == [Op.WATCH_EVENT] * 4 + [Op.READ] * 3  # what waited, then its replies
    assert stalled_t.reading
