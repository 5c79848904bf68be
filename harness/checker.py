"""The "nothing lost" checker: a block workload's history against the disk it left.

Pure code, no I/O: give it the history (protocols/workload.py records, as a
list or JSONL lines) and the final content of the workload's slots, get a
`CheckResult`:

    result = check(history, region)        # region: bytes of slots first_slot.. in order,
                                           # or a function slot -> block bytes
    result.ok                              # nothing lost, nothing invented
    result.lost, result.corrupt, result.unacknowledged, result.impossible_reads
    print(result.render())                 # status table, then each finding with its history

The model (Jepsen's, for a set of independent registers, one per slot).
Time is history order: the workload writes every record under one lock,
`invoke` before the op is issued and the outcome after it ended, so if op B's
invoke comes after op A's outcome, B really started after A finished.

* A write is *possibly in effect* from its invoke on.  An `ok` write ended at
  its ok line; a `fail` write never takes effect; an `info` write (or one with
  no outcome: killed) never ends -- it may land at any later moment, even
  after writes that started after it, as a request blkfront replays late can.
* Write W is *superseded* when some `ok` write on the same slot was invoked
  after W ended.  Only an unsuperseded, not-failed write may be what a slot
  holds at the end; for a slot with no `ok` write, so may its initial content
  (zeros, or anything that is not a block of this run).

Findings, each with the slot's ops from the history (what explains it):

    lost-write            the slot does not hold its last acknowledged write nor
                          anything that may legally follow it
    corrupt-block         a block with our magic that is torn/damaged, lies at the
                          wrong slot, or names a write this run never made there
    unacknowledged-write  the slot (or a read) shows a write recorded as `fail`
    impossible-read       a read saw a value that cannot be there at that time:
                          superseded before the read began, initial content after a
                          write was acknowledged, a corrupt block, a value never written,
                          or one written only after the read had finished
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

from xenbed.protocols import workload as fmt

LOST, CORRUPT, UNACKNOWLEDGED, IMPOSSIBLE_READ = "lost-write", "corrupt-block", "unacknowledged-write", "impossible-read"
KINDS = (LOST, CORRUPT, UNACKNOWLEDGED, IMPOSSIBLE_READ)
INITIAL_KINDS = (fmt.ZERO, fmt.FOREIGN, fmt.OTHER)  # what a slot may hold before this run wrote it
NEVER = float("inf")  # when an unknown write ends


@dataclass
class Op:
    """One operation: its invoke and its outcome, paired by (process, seq)."""

    f: str
    process: int
    seq: int
    slot: int
    invoked_at: int  # position in the history's op records
    outcome: str = fmt.INFO  # no outcome recorded (killed): unknown
    completed_at: float = NEVER  # position of the outcome; NEVER for unknown
    value: dict | None = None  # what a read saw
    error: str | None = None
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"w{self.process}:{self.seq}"

    @property
    def acknowledged(self) -> bool:
        return self.outcome == fmt.OK

    def ends(self) -> float:
        return self.completed_at if self.outcome == fmt.OK else NEVER

    def __str__(self) -> str:
        return f"{self.f} {self.name} ({self.outcome})"


@dataclass
class Finding:
    kind: str
    slot: int
    summary: str
    found: dict | None = None  # the observation (final content, or what a read saw)
    op: Op | None = None  # the op the finding is about: the lost write, the read, the failed write
    history: list[dict] = field(default_factory=list)  # every record on this slot

    def to_dict(self) -> dict:
        return {"kind": self.kind, "slot": self.slot, "summary": self.summary, "found": self.found,
                "op": None if self.op is None else {"f": self.op.f, "process": self.op.process,
                                                    "seq": self.op.seq, "outcome": self.op.outcome},
                "history": self.history}


def _findings(kind: str) -> property:
    """A read-only attribute: the findings of one kind (`CheckResult.of_kind`)."""
    return property(lambda result: result.of_kind(kind), doc=f"the {kind} findings")


@dataclass
class CheckResult:
    run: dict  # the history's run record
    findings: list[Finding]
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.findings

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    lost = _findings(LOST)
    corrupt = _findings(CORRUPT)
    unacknowledged = _findings(UNACKNOWLEDGED)
    impossible_reads = _findings(IMPOSSIBLE_READ)

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(self.of_kind(kind)) for kind in KINDS}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "run": self.run, "stats": self.stats, "counts": self.counts,
                "findings": [f.to_dict() for f in self.findings]}

    def render(self, history_lines: int = 12) -> str:
        return render(self, history_lines)


# ---------------------------------------------------------------------------- parsing

def load_history(source: Iterable[str] | Iterable[dict] | str) -> list[dict]:
    """Records from JSONL text, lines, or records already parsed."""
    if isinstance(source, str):
        source = source.splitlines()
    items = list(source)
    if items and isinstance(items[0], str):
        return fmt.parse_history(items)
    return [dict(item) for item in items]


def pair_ops(records: list[dict]) -> tuple[dict, list[Op]]:
    """(run record, ops in invoke order).  An outcome with no invoke is ignored
    (it cannot be placed); an invoke with no outcome stays unknown."""
    run = next((r for r in records if r.get("type") == fmt.RUN), None)
    if run is None:
        raise ValueError("the history has no run record (its first line): is this a workload history?")
    ops: list[Op] = []
    open_ops: dict[tuple[int, int], Op] = {}
    position = 0
    for record in records:
        if record.get("type") not in (fmt.INVOKE, *fmt.OUTCOMES):
            continue
        key = (record["process"], record["seq"])
        if record["type"] == fmt.INVOKE:
            op = Op(record["f"], record["process"], record["seq"], record["slot"], position, records=[record])
            open_ops[key] = op
            ops.append(op)
        else:
            op = open_ops.pop(key, None)
            if op is not None:
                op.outcome = record["type"]
                op.completed_at = position if record["type"] != fmt.INFO else NEVER
                op.value = record.get("value")
                op.error = record.get("error")
                op.records.append(record)
        position += 1
    return run, ops


# ---------------------------------------------------------------------------- the check

def check(history: Iterable[str] | Iterable[dict] | str,
          region: bytes | bytearray | memoryview | Callable[[int], bytes]) -> CheckResult:
    """Judge `history` against the final disk: `region` holds the run's slots
    from `first_slot` on, `block_size` bytes each (or is slot -> bytes)."""
    records = load_history(history)
    run, ops = pair_ops(records)
    run_id = bytes.fromhex(run["run"])
    block_size, first, count = run["block_size"], run["first_slot"], run["slot_count"]
    block_at = _block_reader(region, first, count, block_size)

    writes_by_slot: dict[int, list[Op]] = {}
    reads_by_slot: dict[int, list[Op]] = {}
    write_by_name: dict[tuple[int, int], Op] = {}
    for op in ops:
        (writes_by_slot if op.f == fmt.WRITE else reads_by_slot).setdefault(op.slot, []).append(op)
        if op.f == fmt.WRITE:
            write_by_name[(op.process, op.seq)] = op
    slot_history = _records_by_slot(records)

    findings: list[Finding] = []
    stats = _op_stats(ops)
    stats.update(slots_checked=count, slots_acknowledged=0, slots_unknown_write=0, slots_initial=0,
                 unknown_writes_landed=0, reads_consistent=0)
    for slot in range(first, first + count):
        writes = writes_by_slot.get(slot, [])
        found = fmt.decode_block(block_at(slot), run_id)
        finding = _judge_final(slot, found, writes, write_by_name)
        if finding is None:
            holder = _holder(found, slot, write_by_name)
            if holder is None:
                stats["slots_initial"] += 1
            elif holder.acknowledged:
                stats["slots_acknowledged"] += 1
            else:
                stats["slots_unknown_write"] += 1
                stats["unknown_writes_landed"] += 1
        else:
            finding.history = slot_history.get(slot, [])
            findings.append(finding)
        for read in reads_by_slot.get(slot, []):
            if read.outcome != fmt.OK:
                continue
            bad = _judge_read(read, writes, write_by_name)
            if bad is None:
                stats["reads_consistent"] += 1
            else:
                bad.history = slot_history.get(slot, [])
                findings.append(bad)
    outside = sorted({op.slot for op in ops if not first <= op.slot < first + count})
    if outside:
        raise ValueError(f"ops on slots outside the run's region {first}..{first + count - 1}: {outside[:5]}")
    return CheckResult(run, findings, stats)


def _judge_final(slot: int, found: dict, writes: list[Op], write_by_name) -> Finding | None:
    acknowledged = [w for w in writes if w.acknowledged]
    last_ack = max(acknowledged, key=lambda w: w.completed_at, default=None)
    kind = found["kind"]
    if kind == fmt.CORRUPT:
        return Finding(CORRUPT, slot, f"slot {slot} holds a block that is {fmt.describe(found)}"
                       + (f" where acknowledged write {last_ack.name} should be" if last_ack else ""),
                       found, last_ack)
    if kind in INITIAL_KINDS:
        if last_ack is None:
            return None
        return Finding(LOST, slot, f"acknowledged write {last_ack.name} (ok at #{last_ack.completed_at}) is "
                       f"missing: slot {slot} holds {fmt.describe(found)}", found, last_ack)
    holder_problem = _misplaced_or_unknown(found, slot, write_by_name)
    if holder_problem:
        return Finding(CORRUPT, slot, holder_problem, found, last_ack)
    holder = write_by_name[(found["worker"], found["seq"])]
    if holder.outcome == fmt.FAIL:
        return Finding(UNACKNOWLEDGED, slot, f"slot {slot} holds write {holder.name}, recorded as failed "
                       f"({holder.error or 'no reason'})", found, holder)
    newer = _superseding(holder, acknowledged)
    if newer is not None:
        return Finding(LOST, slot, f"acknowledged write {newer.name} (ok at #{newer.completed_at}) is missing: "
                       f"slot {slot} still holds the older {holder.name} ({holder.outcome})", found, newer)
    return None


def _judge_read(read: Op, writes: list[Op], write_by_name) -> Finding | None:
    seen = read.value or {}
    slot, kind = read.slot, seen.get("kind")
    acknowledged = [w for w in writes if w.acknowledged]

    def impossible(why: str, op: Op | None = None) -> Finding:
        return Finding(IMPOSSIBLE_READ, slot, f"read {read.name} of slot {slot} (#{read.invoked_at}..#"
                       f"{read.completed_at}) saw {fmt.describe(seen)}: {why}", seen, read)

    if kind == fmt.CORRUPT:
        return impossible("a corrupt block")
    if kind in INITIAL_KINDS:
        done = [w for w in acknowledged if w.completed_at < read.invoked_at]
        if done:
            first_done = min(done, key=lambda w: w.completed_at)
            return impossible(f"initial content, after write {first_done.name} was acknowledged "
                              f"(#{first_done.completed_at})")
        return None
    if kind != fmt.BLOCK:
        return impossible("not an observation the checker knows")
    problem = _misplaced_or_unknown(seen, slot, write_by_name)
    if problem:
        return impossible(problem)
    holder = write_by_name[(seen["worker"], seen["seq"])]
    if holder.outcome == fmt.FAIL:
        return Finding(UNACKNOWLEDGED, slot, f"read {read.name} of slot {slot} saw write {holder.name}, "
                       f"recorded as failed ({holder.error or 'no reason'})", seen, holder)
    if holder.invoked_at > read.completed_at:
        return impossible(f"{holder.name} was invoked (#{holder.invoked_at}) after the read finished")
    newer = _superseding(holder, [w for w in acknowledged if w.completed_at < read.invoked_at])
    if newer is not None:
        return impossible(f"stale: {newer.name} was invoked after {holder.name} ended and acknowledged "
                          f"(#{newer.completed_at}) before the read began")
    return None


def _superseding(holder: Op, acknowledged: list[Op]) -> Op | None:
    """The latest acknowledged write that started after `holder` ended, if any."""
    later = [w for w in acknowledged if w is not holder and w.invoked_at > holder.ends()]
    return max(later, key=lambda w: w.completed_at, default=None)


def _misplaced_or_unknown(found: dict, slot: int, write_by_name) -> str | None:
    """Why an intact block of this run cannot be in `slot`, or None."""
    name = f"w{found['worker']}:{found['seq']}"
    if found["slot"] != slot:
        return f"block {name} made for slot {found['slot']} lies in slot {slot} (misplaced)"
    write = write_by_name.get((found["worker"], found["seq"]))
    if write is None:
        return f"block {name} names a write this run never invoked"
    if write.slot != slot:
        return f"block {name} says slot {slot} but the history has that write to slot {write.slot}"
    return None


def _holder(found: dict, slot: int, write_by_name) -> Op | None:
    if found["kind"] != fmt.BLOCK:
        return None
    return write_by_name.get((found["worker"], found["seq"]))


def _block_reader(region, first: int, count: int, block_size: int) -> Callable[[int], bytes]:
    if callable(region):
        return region
    view = memoryview(region)
    if len(view) < count * block_size:
        raise ValueError(f"region has {len(view)} bytes; {count} slots of {block_size} need {count * block_size}")
    return lambda slot: bytes(view[(slot - first) * block_size:(slot - first + 1) * block_size])


def _records_by_slot(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in records:
        if "slot" in record and record.get("type") in (fmt.INVOKE, *fmt.OUTCOMES):
            out.setdefault(record["slot"], []).append(record)
    return out


def _op_stats(ops: list[Op]) -> dict[str, int]:
    stats = {}
    for f in (fmt.WRITE, fmt.READ):
        mine = [op for op in ops if op.f == f]
        stats[f"{f}s_invoked"] = len(mine)
        for outcome in fmt.OUTCOMES:
            stats[f"{f}s_{outcome}"] = sum(op.outcome == outcome for op in mine)
    return stats


# ---------------------------------------------------------------------------- rendering

def render(result: CheckResult, history_lines: int = 12) -> str:
    run, s = result.run, result.stats
    first, count = run["first_slot"], run["slot_count"]
    lines = [f"nothing lost: {'yes' if result.ok else 'NO'} -- run {run['run']} on {run.get('file', '?')}, "
             f"slots {first}..{first + count - 1} ({count} x {run['block_size']} B, {run.get('workers', '?')} workers)"
             + (f", read back from dom0's {run['dom0_device']}" if run.get("dom0_device") else ""),
             f"  writes {s['writes_invoked']:6d} invoked  {s['writes_ok']:6d} ok  {s['writes_fail']:4d} fail  "
             f"{s['writes_info']:4d} unknown ({s['unknown_writes_landed']} of those landed)",
             f"  reads  {s['reads_invoked']:6d} invoked  {s['reads_ok']:6d} ok  {s['reads_fail']:4d} fail  "
             f"{s['reads_info']:4d} unknown; {s['reads_consistent']} consistent",
             f"  slots  {s['slots_checked']:6d} checked: {s['slots_acknowledged']} hold their last acknowledged "
             f"write, {s['slots_unknown_write']} an unknown write, {s['slots_initial']} their initial content",
             "",
             f"  {'finding':<22} {'count':>5}"]
    lines += [f"  {kind:<22} {n:>5}" for kind, n in result.counts.items()]
    start = run.get("time", 0.0)
    for finding in result.findings:
        lines += ["", f"{finding.kind}: {finding.summary}"]
        shown = finding.history[-history_lines:]
        if len(finding.history) > len(shown):
            lines.append(f"    ... {len(finding.history) - len(shown)} earlier records on slot {finding.slot}")
        lines += [f"    {format_record(record, start)}" for record in shown]
    return "\n".join(lines)


def format_record(record: dict, start: float = 0.0) -> str:
    """One history record as a line: '#35  +1.204s  ok      write w0:17 slot 4100'."""
    text = (f"#{record.get('index', '?'):<6} {'+%.3fs' % (record.get('time', start) - start):>9}  {record['type']:<6}  "
            f"{record['f']:<5} w{record['process']}:{record['seq']} slot {record['slot']}")
    if "value" in record:
        text += f" -> {fmt.describe(record['value'])}"
    if record.get("error"):
        text += f"  [{record['error']}]"
    return text


def dump_result(result: CheckResult) -> str:
    return json.dumps(result.to_dict(), indent=1, sort_keys=True)
