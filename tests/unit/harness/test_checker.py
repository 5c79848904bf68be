"""The nothing-lost checker finds each kind of fault and passes honest histories.

Histories are built by hand (`Story`) with the same records the workload
writes; the "disk" is a dict of slot -> block, zeros where nothing was put.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbed.harness import checker
from xenbed.protocols import workload as fmt

RUN = bytes.fromhex("00112233445566aa")
OTHER_RUN = bytes.fromhex("ffeeddccbbaa9988")
BS = 512
FIRST, COUNT = 10, 4


class Story:
    """A history under construction, and the disk it should leave."""

    def __init__(self) -> None:
        self.records: list[dict] = [{"type": "run", "run": RUN.hex(), "block_size": BS, "first_slot": FIRST,
                                     "slot_count": COUNT, "workers": 2, "file": "/dev/test", "time": 0.0}]
        self.disk: dict[int, bytes] = {}

    def rec(self, type: str, f: str, process: int, seq: int, slot: int, **extra) -> "Story":
        index = sum(1 for r in self.records if r["type"] != "run")
        self.records.append({"index": index, "time": float(index), "type": type, "f": f,
                             "process": process, "seq": seq, "slot": slot, **extra})
        return self

    def write(self, process: int, seq: int, slot: int, outcome: str | None = "ok", **extra) -> "Story":
        self.rec("invoke", "write", process, seq, slot)
        if outcome:
            self.rec(outcome, "write", process, seq, slot, **extra)
        return self

    def read(self, process: int, seq: int, slot: int, saw: dict, outcome: str = "ok") -> "Story":
        return self.rec("invoke", "read", process, seq, slot).rec(outcome, "read", process, seq, slot, value=saw)

    def put(self, slot: int, process: int, seq: int, *, run: bytes = RUN, meant_for: int | None = None) -> "Story":
        self.disk[slot] = fmt.encode_block(run, process, seq, slot if meant_for is None else meant_for, BS)
        return self

    def check(self) -> checker.CheckResult:
        return checker.check(self.records, lambda slot: self.disk.get(slot, bytes(BS)))


def block(process: int, seq: int, slot: int) -> dict:
    return {"kind": "block", "worker": process, "seq": seq, "slot": slot}


ZEROS = {"kind": "zero"}


# ------------------------------------------------------------------ clean histories

def test_sequential_history_with_the_last_writes_on_disk_passes():
    story = Story().write(0, 1, 10).write(0, 2, 10).write(1, 1, 11).read(0, 3, 10, block(0, 2, 10))
    story.put(10, 0, 2).put(11, 1, 1)
    result = story.check()
    assert result.ok, result.render()
    assert result.stats["writes_ok"] == 3 and result.stats["reads_consistent"] == 1
    assert result.stats["slots_acknowledged"] == 2 and result.stats["slots_initial"] == 2


def test_untouched_slots_may_hold_anything_from_before_the_run():
    story = Story().put(12, 0, 7, run=OTHER_RUN)
    story.disk[13] = b"\x01" * BS
    assert story.check().ok


def test_an_empty_history_on_a_zero_disk_passes():
    result = Story().check()
    assert result.ok and result.stats["writes_invoked"] == 0


# ------------------------------------------------------------------ lost writes

def test_slot_holding_an_older_write_than_the_last_acknowledged_one_is_a_lost_write():
    story = Story().write(0, 1, 10).write(0, 2, 10).put(10, 0, 1)
    result = story.check()
    assert [(f.kind, f.slot, f.op.name) for f in result.findings] == [("lost-write", 10, "w0:2")]
    assert len(result.lost[0].history) == 4  # the slot's ops explain it


def test_zeros_where_an_acknowledged_write_was_is_a_lost_write():
    result = Story().write(1, 5, 11).check()
    assert [(f.kind, f.slot, f.op.name, f.found) for f in result.findings] == [("lost-write", 11, "w1:5", ZEROS)]


def test_content_from_before_the_run_after_an_acknowledged_write_is_a_lost_write():
    story = Story().write(0, 1, 12).put(12, 0, 1, run=OTHER_RUN)
    assert [f.kind for f in story.check().findings] == ["lost-write"]


# ------------------------------------------------------------------ unknown outcomes

def test_unknown_write_then_acknowledged_write_either_may_be_last():
    # Jepsen: an `info` write never ends, so it may land after the later one
    for on_disk in (1, 2):
        story = Story().write(0, 1, 10, "info", error="pwrite: Input/output error").write(0, 2, 10)
        story.put(10, 0, on_disk)
        assert story.check().ok, on_disk


def test_acknowledged_then_unknown_write_either_may_be_last_but_not_zeros():
    for on_disk in (1, 2):
        story = Story().write(0, 1, 10).write(0, 2, 10, outcome=None)  # no outcome: killed
        story.put(10, 0, on_disk)
        result = story.check()
        assert result.ok, result.render()
    assert Story().write(0, 1, 10).write(0, 2, 10, "info").check().lost[0].op.name == "w0:1"


def test_a_slot_with_only_unknown_writes_may_hold_one_of_them_or_its_initial_content():
    assert Story().write(0, 1, 10, "info").check().ok
    landed = Story().write(0, 1, 10, "info").put(10, 0, 1).check()
    assert landed.ok and landed.stats["unknown_writes_landed"] == 1


def test_an_unknown_write_superseded_by_an_acknowledged_one_does_not_excuse_older_content():
    story = Story().write(0, 1, 10).write(0, 2, 10, "info").write(0, 3, 10).put(10, 0, 1)
    assert [f.op.name for f in story.check().lost] == ["w0:3"]


def test_concurrent_writes_on_one_slot_may_land_in_either_order():
    for on_disk in (0, 1):
        story = Story().rec("invoke", "write", 0, 1, 10).rec("invoke", "write", 1, 1, 10)
        story.rec("ok", "write", 0, 1, 10).rec("ok", "write", 1, 1, 10).put(10, on_disk, 1)
        assert story.check().ok, on_disk


def test_a_write_begun_after_another_ended_must_win():
    story = Story().write(0, 1, 10).write(1, 1, 10).put(10, 0, 1)
    assert [f.op.name for f in story.check().lost] == ["w1:1"]


# ------------------------------------------------------------------ failed writes that appeared

def test_a_failed_write_on_disk_is_an_unacknowledged_write():
    story = Story().write(0, 1, 10).write(0, 2, 10, "fail", error="pwrite: Bad file descriptor").put(10, 0, 2)
    result = story.check()
    assert [(f.kind, f.op.name) for f in result.findings] == [("unacknowledged-write", "w0:2")]
    assert "Bad file descriptor" in result.findings[0].summary


def test_a_failed_write_absent_from_disk_is_fine():
    assert Story().write(0, 1, 10).write(0, 2, 10, "fail").put(10, 0, 1).check().ok


# ------------------------------------------------------------------ corrupt blocks

def test_a_torn_block_is_corrupt():
    story = Story().write(0, 1, 10).put(10, 0, 1)
    torn = bytearray(story.disk[10])
    torn[BS // 2:] = bytes(BS // 2)  # second half never arrived
    story.disk[10] = bytes(torn)
    result = story.check()
    assert [f.kind for f in result.findings] == ["corrupt-block"]
    assert "crc32" in result.findings[0].summary


def test_a_block_at_the_wrong_slot_is_corrupt():
    story = Story().write(0, 1, 10).write(0, 2, 11).put(10, 0, 1).put(11, 0, 1, meant_for=10)
    result = story.check()
    assert [(f.kind, f.slot) for f in result.findings] == [("corrupt-block", 11)]
    assert "misplaced" in result.findings[0].summary


def test_a_block_of_this_run_that_no_write_made_is_corrupt():
    result = Story().put(12, 1, 99).check()
    assert [f.kind for f in result.findings] == ["corrupt-block"]
    assert "never invoked" in result.findings[0].summary


def test_a_block_claiming_a_slot_its_write_did_not_target_is_corrupt():
    result = Story().write(0, 1, 10).put(10, 0, 1).put(11, 0, 1, meant_for=11).check()
    assert [(f.kind, f.slot) for f in result.findings] == [("corrupt-block", 11)]


# ------------------------------------------------------------------ reads

def test_a_read_after_an_acknowledged_write_seeing_the_older_value_is_stale():
    story = Story().write(0, 1, 10).write(0, 2, 10).read(0, 3, 10, block(0, 1, 10)).put(10, 0, 2)
    result = story.check()
    assert [(f.kind, f.op.name) for f in result.findings] == [("impossible-read", "w0:3")]
    assert "stale" in result.findings[0].summary


def test_a_read_concurrent_with_a_write_may_see_either_value():
    for saw in (block(0, 1, 10), block(1, 1, 10)):
        story = Story().write(0, 1, 10).rec("invoke", "write", 1, 1, 10).rec("invoke", "read", 0, 2, 10)
        story.rec("ok", "write", 1, 1, 10).rec("ok", "read", 0, 2, 10, value=saw).put(10, 1, 1)
        result = story.check()
        assert result.ok and result.stats["reads_consistent"] == 1, result.render()


def test_a_read_seeing_zeros_after_an_acknowledged_write_is_impossible():
    story = Story().write(0, 1, 10).read(1, 1, 10, ZEROS).put(10, 0, 1)
    assert [f.kind for f in story.check().findings] == ["impossible-read"]


def test_a_read_seeing_zeros_before_any_acknowledged_write_is_fine():
    assert Story().read(1, 1, 10, ZEROS).write(0, 1, 10).put(10, 0, 1).check().ok


def test_a_read_seeing_a_value_never_written_or_corrupt_is_impossible():
    story = Story().write(0, 1, 10).read(0, 2, 10, block(0, 7, 10))
    story.read(0, 3, 10, {"kind": "corrupt", "reason": "crc32 mismatch (torn or damaged)"}).put(10, 0, 1)
    result = story.check()
    assert [f.kind for f in result.findings] == ["impossible-read", "impossible-read"]
    assert "never invoked" in result.findings[0].summary and "corrupt" in result.findings[1].summary


def test_a_read_seeing_a_write_invoked_after_it_finished_is_impossible():
    story = Story().read(0, 1, 10, block(1, 1, 10)).write(1, 1, 10).put(10, 1, 1)
    assert "after the read finished" in story.check().findings[0].summary


def test_a_read_seeing_a_failed_write_is_an_unacknowledged_write():
    story = Story().write(0, 1, 10, "fail").read(0, 2, 10, block(0, 1, 10))
    assert [f.kind for f in story.check().findings] == ["unacknowledged-write"]


def test_failed_and_unknown_reads_are_not_judged():
    story = Story().write(0, 1, 10).read(0, 2, 10, ZEROS, outcome="fail").put(10, 0, 1)
    story.rec("invoke", "read", 0, 3, 10)
    result = story.check()
    assert result.ok and result.stats["reads_fail"] == 1 and result.stats["reads_info"] == 1


# ------------------------------------------------------------------ input and output

def test_history_from_jsonl_with_a_line_cut_short_by_a_kill():
    story = Story().write(0, 1, 10).put(10, 0, 1)
    text = "\n".join(json.dumps(r) for r in story.records) + '\n{"index": 2, "type": "inv'
    region = b"".join(story.disk.get(slot, bytes(BS)) for slot in range(FIRST, FIRST + COUNT))
    assert checker.check(text, region).ok


def test_a_region_too_short_and_a_history_without_run_record_are_refused():
    with pytest.raises(ValueError, match="region has"):
        checker.check(Story().records, bytes(BS))
    with pytest.raises(ValueError, match="no run record"):
        checker.check(Story().records[1:], bytes(BS * COUNT))


def test_render_shows_the_table_and_the_slots_history():
    text = Story().write(0, 1, 10).write(0, 2, 10).put(10, 0, 1).check().render()
    assert "nothing lost: NO" in text
    assert "lost-write                 1" in text and "corrupt-block              0" in text
    assert "ok      write w0:2 slot 10" in text  # the record that makes it a loss
    assert Story().check().render().startswith("nothing lost: yes")


# ------------------------------------------------------------------ property: honest disks pass, losses are found

ops = st.lists(st.tuples(st.integers(0, 1),                       # worker
                         st.integers(0, COUNT // 2 - 1),          # index among the worker's slots
                         st.sampled_from(["ok", "ok", "ok", "fail", "info", "read"]),
                         st.booleans()),                          # does an unknown write land?
               max_size=40)


def simulate(plan) -> Story:
    """A sequential run against an honest disk: ok writes land, failed ones
    do not, unknown ones land or not; reads see what is there."""
    story, seqs = Story(), {0: 0, 1: 0}
    for worker, index, what, lands in plan:
        slot = FIRST + worker + 2 * index  # the workload's ownership: every second slot
        seqs[worker] += 1
        seq = seqs[worker]
        if what == "read":
            data = story.disk.get(slot, bytes(BS))
            story.read(worker, seq, slot, fmt.decode_block(data, RUN))
            continue
        story.write(worker, seq, slot, what)
        if what == "ok" or (what == "info" and lands):
            story.put(slot, worker, seq)
    return story


@settings(max_examples=200, deadline=None)
@given(ops)
def test_honest_disks_pass(plan):
    result = simulate(plan).check()
    assert result.ok, result.render()


@settings(max_examples=200, deadline=None)
@given(ops, st.data())
def test_wiping_a_slot_that_holds_an_acknowledged_write_is_always_found(plan, data):
    story = simulate(plan)
    acknowledged = sorted({r["slot"] for r in story.records if r.get("type") == "ok" and r.get("f") == "write"})
    if not acknowledged:
        return
    slot = data.draw(st.sampled_from(acknowledged))
    story.disk.pop(slot, None)
    result = story.check()
    assert [(f.kind, f.slot) for f in result.findings] == [("lost-write", slot)], result.render()
