"""Unknown types, malformed payloads, reply framing, and fuzzing: `handle`
never raises, always answers once, and memory stays bounded."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from xenbed.protocols.xs_wire import PAYLOAD_MAX, Op, Packet, PacketReader

from .conftest import OK, World


@pytest.mark.parametrize("op", [20, 23, 99, 0xFFFF, Op.WATCH_EVENT, Op.ERROR])
def test_unknown_and_client_sent_reply_types_are_enosys(world, op):
    world.run([("d1", 0, op, b"x\0", "ENOSYS"), ("d0", 0, op, b"", "ENOSYS")])  # as wire_funcs[] has no handler


def test_malformed_payloads_are_einval(world):
    world.run([
        ("d0", 0, Op.READ, b"/tool", "EINVAL"),  # missing NUL
        ("d0", 0, Op.READ, b"/tool\0/x\0", "EINVAL"),  # one argument expected
        ("d0", 0, Op.READ, b"", "EINVAL"),  # empty payload
        ("d0", 0, Op.WRITE, b"/novalue", "EINVAL"),  # WRITE needs path\0value
        ("d0", 0, Op.DIRECTORY, b"\xff\0", "EINVAL"),  # non-ASCII path
        ("d0", 0, Op.GET_DOMAIN_PATH, b"-1\0", "EINVAL"),  # non-numeric domid
        ("d0", 0, Op.GET_DOMAIN_PATH, b"70000\0", "EINVAL"),  # out of range
        ("d0", 0, Op.SET_TARGET, b"1\0x\0", "EINVAL"),
    ])


def test_reply_echoes_ids(world):
    r = world.store.handle(world.conns["d0"], Packet(Op.READ, 77, 0, b"/tool\0"))
    assert (r.op, r.req_id, r.tx_id, r.payload) == (Op.READ, 77, 0, b"")
    r = world.store.handle(world.conns["d0"], Packet(Op.READ, 78, 5, b"/tool\0"))
    assert (r.op, r.req_id, r.tx_id, r.payload) == (Op.ERROR, 78, 5, b"ENOENT\0")  # errors echo both ids too
    r = world.store.handle(world.conns["d0"], Packet(Op.MKDIR, 1, 0, b"/m\0"))
    assert r.payload == OK


def _check_bounded(world: World) -> None:
    s = world.store
    assert s.tree.node_count() < 5000
    for c in s.connections:
        assert len(c.events) <= s.quota.event_queue
        if not c.privileged:
            assert len(c.transactions) <= s.quota.transactions
            assert len(c.watches) <= s.quota.watches


def _interesting_packet(rng: random.Random) -> Packet:
    words = [b"/", b"/a", b"/a/b", b"a", b"@releaseDomain", b"", b"x//y", b"1", b"0", b"T", b"F",
             b"n0", b"b1", b"r2", b"\xff", b"/local/domain/1/z", b"check", b"quota", b"set", b"nodes"]
    parts = [rng.choice(words) for _ in range(rng.randrange(0, 5))]
    payload = b"\0".join(parts) + (b"\0" if rng.random() < 0.8 else b"")
    op = rng.choice(list(range(0, 24)) + [0xFFFF, rng.randrange(0, 2**32)])
    tx = rng.choice([0, 0, 0, 1, 2, 3, rng.randrange(0, 2**32)])
    return Packet(op, rng.randrange(0, 2**32), tx, payload[:PAYLOAD_MAX])


def test_fuzz_structured_packets_never_raise():
    rng = random.Random(1234)
    world = World()
    names = list(world.conns)
    for i in range(6000):
        conn = world.conns[rng.choice(names)]
        p = _interesting_packet(rng)
        r = world.store.handle(conn, p)
        assert isinstance(r, Packet) and r.req_id == p.req_id and r.tx_id == p.tx_id
        assert len(r.payload) <= PAYLOAD_MAX
        assert r.payload != b"EIO\0", p  # no internal errors
        if i % 50 == 0:
            world.store.take_outgoing()
            _check_bounded(world)


def test_fuzz_random_bytes_through_the_reader():
    rng = random.Random(99)
    world = World()
    conn = world.conns["d1"]
    reader = PacketReader()
    for _ in range(300):
        chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        # Keep headers sane sometimes so packets actually come out.
        if rng.random() < 0.5:
            chunk = Packet(rng.randrange(25), 1, 0, chunk[: rng.randrange(0, 40)]).encode()
        reader.feed(chunk)
        try:
            for p in reader:
                r = world.store.handle(conn, p)
                assert r.payload != b"EIO\0"
        except Exception as e:  # the reader's only complaint: an oversize header
            assert type(e).__name__ == "WireProtocolError"
            reader = PacketReader()
    _check_bounded(world)


@settings(max_examples=150, deadline=None)
@given(op=st.integers(0, 2**32 - 1), tx=st.sampled_from([0, 1, 2**32 - 1]),
       payload=st.binary(max_size=200), who=st.sampled_from(["d0", "d1", "d2"]))
def test_hypothesis_any_packet_gets_one_reply(op, tx, payload, who):
    world = _shared_world()
    r = world.store.handle(world.conns[who], Packet(op, 5, tx, payload))
    assert r.req_id == 5 and r.tx_id == tx
    assert r.payload != b"EIO\0"


_WORLD: list[World] = []


def _shared_world() -> World:
    if not _WORLD:
        _WORLD.append(World())
    return _WORLD[0]
