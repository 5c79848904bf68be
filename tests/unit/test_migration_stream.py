"""Pre-copy rounds and the migration stream (toolstack/migration.py), pure."""

import pytest
from hypothesis import given, settings, strategies as st

from xenbed.toolstack.migration import (FrameReader, Kind, PrecopyPlanner, StreamError, decode_json,
                                        decode_pages, encode, encode_json, encode_pages, page_digest)


def digests(pages):
    return {g: page_digest(d) for g, d in pages.items()}


def test_rounds_send_everything_then_only_what_changed_and_what_went():
    memory = {g: bytes([g]) * 4096 for g in range(10)}
    plan = PrecopyPlanner(stop_pages=2)
    send, gone = plan.dirty(digests(memory))
    assert send == list(range(10)) and gone == []
    plan.record({g: page_digest(memory[g]) for g in send}, gone)
    memory[3] = b"x" * 4096  # the guest writes one page, frees one, allocates one
    del memory[7]
    memory[12] = b"y" * 4096
    send, gone = plan.dirty(digests(memory))
    assert (send, gone) == ([3, 12], [7])
    assert not plan.another_live_round(len(send))  # 2 <= stop_pages: stop and copy
    plan.record({g: page_digest(memory[g]) for g in send}, gone)
    assert plan.dirty(digests(memory)) == ([], [])
    assert plan.rounds == [10, 2]


def test_rounds_stop_when_they_do_not_converge_or_are_too_many():
    plan = PrecopyPlanner(max_rounds=3, stop_pages=0)
    plan.rounds = [100]
    assert plan.another_live_round(50)
    plan.rounds = [100, 50]
    assert not plan.another_live_round(48)  # not a tenth smaller
    assert plan.another_live_round(20)
    plan.rounds = [100, 50, 20]
    assert not plan.another_live_round(10)  # max_rounds


def test_frames_round_trip_in_pieces():
    pages = [(5, b"a" * 4096), (70000, b"b" * 4096)]
    stream = encode_json(Kind.HELLO, {"name": "domu1"}) + encode_pages(pages) + encode(Kind.DONE, b"{}")
    reader, frames = FrameReader(), []
    for i in range(0, len(stream), 999):
        frames += reader.feed(stream[i:i + 999])
    assert [k for k, _ in frames] == [Kind.HELLO, Kind.PAGES, Kind.DONE]
    assert decode_json(frames[0][1]) == {"name": "domu1"}
    assert decode_pages(frames[1][1]) == pages


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x00\x01", b"\x7f\xff\xff\xff\x04", b"\x00\x00\x00\x01\x63"])
def test_bad_frames_are_refused(bad):
    with pytest.raises(StreamError):
        FrameReader().feed(bad)


def test_bad_payloads_are_refused():
    with pytest.raises(StreamError):
        decode_pages(b"\x00\x00\x00\x02" + b"\x00" * 10)
    with pytest.raises(StreamError):
        decode_json(b"[1]")
    with pytest.raises(ValueError):
        encode_pages([(1, b"short")])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=8)), max_size=64))
def test_any_batch_of_pages_round_trips(short_pages):
    pages = [(gfn, (seed * 4096)[:4096]) for gfn, seed in short_pages]
    [(kind, payload)] = FrameReader().feed(encode_pages(pages))
    assert kind == Kind.PAGES and decode_pages(payload) == pages
