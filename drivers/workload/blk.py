"""A block workload for a guest: write and verify continuously, record everything.

    python3 -m xenbed.drivers.workload.blk --file /run/xen/vbd/xvda \\
        --history /run/xen/workload/w1.jsonl [--workers 2] [--first-slot 4096] \\
        [--slot-count 256] [--block-size 4096] [--rate 0] [--ops N] [--duration S]

Runs inside a domain container (standard library only).  `--workers`
threads each own the slots `first_slot + i` with `i % workers == worker`, so
the order of the ops on one slot is one thread's program order.  Each op is a
write of a fresh self-describing block (protocols/workload.py) to one of the
worker's slots, or -- `--read-fraction` of the time -- a verifying read of a
slot it wrote before, recorded with the value it saw.  The history
(protocols/workload.py) goes to `--history`; the checker
(harness/checker.py) judges it against what the disk holds at the end.

When is a write acknowledged?  After `pwrite` and then `fsync` on the same
descriptor both returned.  blkfront's FUSE file is opened with direct_io (no
guest page cache), so `pwrite` returning means the request went over the
ring and blkback answered it; `fsync` becomes BLKIF_OP_FLUSH_DISKCACHE, which
blkback turns into a flush of the loop device: only then is the write
durable on dom0's side.  An explicit fsync rather than O_DSYNC because it is
plainly visible where durability is asked for, and does not depend on how the
kernel's FUSE direct-I/O path honours O_DSYNC.

Outcomes (the `invoke` line is flushed to the history file before the write
is issued, so a killed workload still shows what it had started):

    ok    pwrite wrote the whole block and fsync returned
    fail  the OS refused before issuing it (EBADF, EINVAL, EROFS, EFBIG):
          it certainly did not happen, and its block must never appear
    info  anything else (EIO, ENOTCONN, a short write, an fsync error, still
          pending at stop): it may have happened, now or later

There are no timeouts: while the backend is gone (dom0 killed, blkback
reconnecting) a write simply blocks until blkfront replays it on the new
ring.  After an error the worker backs off and reopens the file (a restarted
blkfront mounts a new FUSE file; the old descriptor answers ENOTCONN forever).

Stopping: on SIGTERM/SIGINT, `--ops` reached or `--duration` over, workers
start no new op; ops in progress get `--stop-grace` seconds to finish, then
are recorded `info` ("pending at stop") and the history is closed -- an op
that completes after that is not recorded, so no outcome contradicts an
earlier one.  The last line is then {"type": "end", ...}.  A one-line summary
goes to stderr every `--progress` seconds.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import signal
import sys
import threading
import time

from xenbed.protocols import workload as fmt

# errnos that mean the OS refused a write before issuing it: nothing happened.
DEFINITELY_NOT_DONE = frozenset({errno.EBADF, errno.EINVAL, errno.EROFS, errno.EFBIG})
BACKOFF_AFTER_ERROR = 0.5  # seconds; a dead FUSE mount must not turn into a history of a million errors


class History:
    """The JSONL history: one lock orders every record, each line flushed at once."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "w", encoding="utf-8")
        self._lock = threading.Lock()
        self._index = 0
        self.closed = False
        self.in_progress: dict[int, dict] = {}  # process -> its invoke record

    def header(self, **fields) -> None:
        with self._lock:
            self._write({"type": fmt.RUN, "time": time.time(), "version": fmt.FORMAT_VERSION, **fields})

    def op(self, type: str, f: str, process: int, seq: int, slot: int, **extra) -> bool:
        """Record one op line; False once the history is closed (the record is dropped)."""
        with self._lock:
            if self.closed:
                return False
            record = {"index": self._index, "time": time.time(), "type": type, "f": f,
                      "process": process, "seq": seq, "slot": slot, **extra}
            self._index += 1
            self._write(record)
            if type == fmt.INVOKE:
                self.in_progress[process] = record
            else:
                self.in_progress.pop(process, None)
            return True

    def close(self, **end_fields) -> list[dict]:
        """Record every op still in progress as `info`, then the end line; returns those ops."""
        with self._lock:
            if self.closed:
                return []
            pending = list(self.in_progress.values())
            for invoke in pending:
                self._write({**invoke, "index": self._index, "time": time.time(), "type": fmt.INFO,
                             "error": "pending at stop"})
                self._index += 1
            self.in_progress.clear()
            self._write({"type": fmt.END, "time": time.time(), **end_fields})
            self.closed = True
            self._file.close()
            return pending

    def _write(self, record: dict) -> None:
        self._file.write(fmt.dump_record(record) + "\n")
        self._file.flush()  # to the OS: a killed workload loses nothing it recorded


class Counts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = {f"{f}_{outcome}": 0 for f in (fmt.WRITE, fmt.READ) for outcome in fmt.OUTCOMES}

    def add(self, f: str, outcome: str) -> None:
        with self._lock:
            self.values[f"{f}_{outcome}"] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.values)


class Budget:
    """`--ops` shared by all workers (None: unlimited)."""

    def __init__(self, total: int | None) -> None:
        self._left = total
        self._lock = threading.Lock()

    def take(self) -> bool:
        if self._left is None:
            return True
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


class Worker(threading.Thread):
    def __init__(self, number: int, workload: "Workload") -> None:
        super().__init__(name=f"worker-{number}", daemon=True)  # daemon: one blocked in pwrite must not hold exit
        self.number = number
        self.w = workload
        self.slots = list(range(workload.first_slot + number, workload.first_slot + workload.slot_count,
                                workload.workers))
        self.written: list[int] = []  # slots this worker wrote at least once (the ones worth reading)
        self.rng = random.Random(f"{workload.run.hex()}-{number}")
        self.seq = 0
        self.fd: int | None = None
        self.current: tuple[str, int, float] | None = None  # (f, slot, since) for the progress line

    def run(self) -> None:
        interval = self.w.workers / self.w.rate if self.w.rate else 0.0
        next_at = time.monotonic()
        try:
            while not self.w.stopping.is_set() and not self.w.history.closed:
                if self.fd is None and not self._open():
                    continue
                if not self.w.budget.take():
                    break
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0 and self.w.stopping.wait(delay):
                        break
                    next_at = max(next_at + interval, time.monotonic() - interval)
                if self.written and self.rng.random() < self.w.read_fraction:
                    ok = self._read(self.rng.choice(self.written))
                else:
                    ok = self._write(self.rng.choice(self.slots))
                if not ok:
                    self._reopen_after_error()
        finally:
            self._close()

    # -- one op each -------------------------------------------------------------
    def _write(self, slot: int) -> bool:
        self.seq += 1
        seq = self.seq
        block = fmt.encode_block(self.w.run, self.number, seq, slot, self.w.block_size)
        if not self.w.history.op(fmt.INVOKE, fmt.WRITE, self.number, seq, slot):
            return True
        self.current = (fmt.WRITE, slot, time.monotonic())
        try:
            try:
                written = os.pwrite(self.fd, block, slot * self.w.block_size)
            except OSError as error:
                outcome = fmt.FAIL if error.errno in DEFINITELY_NOT_DONE else fmt.INFO
                self._outcome(outcome, fmt.WRITE, seq, slot, error=f"pwrite: {error.strerror}",
                              errno=errno.errorcode.get(error.errno, error.errno))
                return False
            if written != len(block):
                self._outcome(fmt.INFO, fmt.WRITE, seq, slot, error=f"short write: {written} of {len(block)} bytes")
                return False
            try:
                os.fsync(self.fd)
            except OSError as error:  # the data was handed over: it may be durable or not
                self._outcome(fmt.INFO, fmt.WRITE, seq, slot, error=f"fsync: {error.strerror}",
                              errno=errno.errorcode.get(error.errno, error.errno))
                return False
            self._outcome(fmt.OK, fmt.WRITE, seq, slot)
            if slot not in self.written:
                self.written.append(slot)
            return True
        finally:
            self.current = None

    def _read(self, slot: int) -> bool:
        self.seq += 1
        seq = self.seq
        if not self.w.history.op(fmt.INVOKE, fmt.READ, self.number, seq, slot):
            return True
        self.current = (fmt.READ, slot, time.monotonic())
        try:
            try:
                data = os.pread(self.fd, self.w.block_size, slot * self.w.block_size)
            except OSError as error:  # a read changes nothing: failing it is always safe
                self._outcome(fmt.FAIL, fmt.READ, seq, slot, error=f"pread: {error.strerror}",
                              errno=errno.errorcode.get(error.errno, error.errno))
                return False
            if len(data) != self.w.block_size:
                self._outcome(fmt.FAIL, fmt.READ, seq, slot, error=f"short read: {len(data)} bytes")
                return False
            self._outcome(fmt.OK, fmt.READ, seq, slot, value=fmt.decode_block(data, self.w.run))
            return True
        finally:
            self.current = None

    def _outcome(self, outcome: str, f: str, seq: int, slot: int, **extra) -> None:
        if self.w.history.op(outcome, f, self.number, seq, slot, **extra):
            self.w.counts.add(f, outcome)

    # -- the file ----------------------------------------------------------------
    def _open(self) -> bool:
        try:
            self.fd = os.open(self.w.path, os.O_RDWR)
            return True
        except OSError as error:
            self.w.say(f"worker {self.number}: cannot open {self.w.path}: {error.strerror}; retrying")
            self.w.stopping.wait(BACKOFF_AFTER_ERROR)
            return False

    def _reopen_after_error(self) -> None:
        self._close()
        self.w.stopping.wait(BACKOFF_AFTER_ERROR)

    def _close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class Workload:
    def __init__(self, args: argparse.Namespace) -> None:
        self.path = args.file
        self.block_size = args.block_size
        self.first_slot = args.first_slot
        self.slot_count = args.slot_count
        self.workers = args.workers
        self.rate = args.rate
        self.read_fraction = args.read_fraction
        self.duration = args.duration
        self.stop_grace = args.stop_grace
        self.progress_every = args.progress
        self.run = bytes.fromhex(args.run) if args.run else os.urandom(fmt.RUN_ID_BYTES)
        self.stopping = threading.Event()
        self.stop_reason = ""
        self.budget = Budget(args.ops)
        self.counts = Counts()
        self.history = History(args.history)
        self.started = time.monotonic()
        self.pool = [Worker(n, self) for n in range(self.workers)]

    def say(self, line: str) -> None:
        print(f"blk-workload {self.run.hex()[:8]} {time.monotonic() - self.started:6.1f}s {line}",
              file=sys.stderr, flush=True)

    def stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.stop_reason = reason
            self.stopping.set()

    def main(self) -> int:
        size = _disk_size(self.path)
        end_offset = (self.first_slot + self.slot_count) * self.block_size
        if end_offset > size:
            self.history.close(reason=f"slots end at byte {end_offset}, beyond the disk's {size}")
            print(f"blk-workload: slots {self.first_slot}..{self.first_slot + self.slot_count - 1} of "
                  f"{self.block_size} B end at byte {end_offset}, beyond {self.path} ({size} bytes)", file=sys.stderr)
            return 2
        self.history.header(run=self.run.hex(), file=self.path, block_size=self.block_size,
                            first_slot=self.first_slot, slot_count=self.slot_count, workers=self.workers,
                            pid=os.getpid(), durability="pwrite+fsync")
        for worker in self.pool:
            worker.start()
        deadline = self.started + self.duration if self.duration else None
        next_progress = time.monotonic() + self.progress_every
        while any(w.is_alive() for w in self.pool) and not self.stopping.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.stop(f"duration {self.duration:g}s over")
                break
            if now >= next_progress:
                self.say(self.summary())
                next_progress = now + self.progress_every
            self.stopping.wait(min(0.2, max(0.0, (deadline or now + 1) - now)))
        if not self.stop_reason:
            self.stop_reason = "ops done"
        grace_end = time.monotonic() + self.stop_grace
        for worker in self.pool:
            worker.join(max(0.0, grace_end - time.monotonic()))
        pending = self.history.close(reason=self.stop_reason, counts=self.counts.snapshot(),
                                     seconds=round(time.monotonic() - self.started, 3))
        for invoke in pending:
            self.say(f"worker {invoke['process']}: {invoke['f']} of slot {invoke['slot']} still pending "
                     f"after {self.stop_grace:g}s grace: recorded as unknown")
        self.say(f"stopped ({self.stop_reason}): {self.summary()}")
        return 0

    def summary(self) -> str:
        c = self.counts.snapshot()
        line = (f"writes {c['write_ok']} ok {c['write_fail']} fail {c['write_info']} unknown, "
                f"reads {c['read_ok']} ok {c['read_fail']} fail")
        busy = [(w.number, w.current) for w in self.pool if w.current]
        slow = [f"w{n} {f} slot {slot} for {time.monotonic() - since:.1f}s"
                for n, (f, slot, since) in busy if time.monotonic() - since > 1.0]
        return line + (f"; waiting: {', '.join(slow)}" if slow else "")


def _disk_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.workload.blk",
                                     description="write and verify blocks on a disk, recording a Jepsen-style history")
    parser.add_argument("--file", required=True, help="the disk, e.g. /run/xen/vbd/xvda")
    parser.add_argument("--history", required=True, help="where the JSONL history goes")
    parser.add_argument("--block-size", type=int, default=fmt.DEFAULT_BLOCK_SIZE, help="bytes per block (default 4096)")
    parser.add_argument("--first-slot", type=int, default=4096,
                        help="first slot (in blocks) of the region used; default 4096 = 16 MiB in, "
                             "leaving the start of the disk (partition table, superblocks) alone")
    parser.add_argument("--slot-count", type=int, default=256, help="slots in the region (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="threads, each owning every workers-th slot")
    parser.add_argument("--rate", type=float, default=0.0, help="ops per second, all workers together (0: flat out)")
    parser.add_argument("--read-fraction", type=float, default=0.3, help="share of ops that are verifying reads")
    parser.add_argument("--ops", type=int, default=None, help="stop after this many ops in all")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until signalled)")
    parser.add_argument("--stop-grace", type=float, default=5.0,
                        help="seconds ops in progress get to finish at stop before they are recorded unknown")
    parser.add_argument("--progress", type=float, default=5.0, help="seconds between summary lines on stderr")
    parser.add_argument("--run", help="run id, 16 hex digits (default: random)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.slot_count < args.workers:
        parser.error("need at least one worker and at least one slot per worker")
    if not 0.0 <= args.read_fraction < 1.0:
        parser.error("--read-fraction must be in [0, 1)")
    if args.block_size < fmt.HEADER.size or args.block_size % 512:
        parser.error(f"--block-size must be a multiple of 512 and at least {fmt.HEADER.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    workload = Workload(parse_args(argv))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: workload.stop(f"signal {signal.Signals(number).name}"))
    code = workload.main()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: a worker still blocked in the kernel must not hold the process


if __name__ == "__main__":
    main()
