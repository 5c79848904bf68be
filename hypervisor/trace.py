"""The hypervisor's trace: every XenStore operation, watch event, grant and
event-channel operation of a run, one JSON object a line.

What is recorded (every record has `ts`, time.time() as every other trace
record of xenbed, so they merge with the domains' XenBus transitions and the
host's chaos history, and `kind`):

    {"kind": "xenstore", "op": "WRITE", "domid": 1, "conn": 7, "tx": 3, "path": "/local/domain/1/...",
     "value": "8", "value_len": 1, "result": "OK"}          (READ: the value read; errors: "result": "ENOENT")
    {"kind": "watch", "domid": 0, "conn": 2, "path": "/local/domain/1/device/vbd/51712/state", "token": "..."}
    {"kind": "grant", "op": "map", "domid": 0, "granter": 1, "ref": 8, "readonly": false, "handle": 3,
     "status": "GNTST_okay"}                                 (also grant, set_entry, end, unmap, copy)
    {"kind": "evtchn", "op": "send", "domid": 1, "port": 5, "remote_domid": 0, "remote_port": 9,
     "result": "upcall"}                                     ("coalesced" while pending or masked,
                                                              "dropped" on an unbound port)
    {"kind": "trace", "event": "start" | "on" | "off" | "dropped" | "rotated", ...}   about the trace itself

`domid` is always the domain that made the call (for a store connection,
the domid it authenticated as); paths are absolute (a relative path is shown
under the caller's /local/domain/<domid>, as xenstored reads it).  A refused
grant or event-channel call is recorded with its `error` (GNTST or errno
name) and the call's arguments.  Calls not recorded: memory (alloc/map/free),
query_size, and the event-channel clear/mask/status calls a guest makes for
every event it consumes (they would double the record count and say nothing
about who talks to whom).

Theory of operation.  Tracing must cost the request path almost nothing: the
shell (server.py, sharing.py) calls `Tracer.xenstore(...)` and friends,
which append a tuple (time, formatter, arguments) to a list and return; the
record dict and its JSON are made later, in `flush`, in batches, off the
request's path (the shell schedules the flush on its loop: `flush_interval`
after the first record of a batch, at once when `batch_records` are
waiting).  The bytes go to a `sink`; in the service that is `FileSink`, a
single writer thread, so a slow disk never blocks the loop.  Bounds, each
said in the record stream when it bites: at most `max_pending` records wait
in memory (beyond, records are counted and a `dropped` record says how many
and since when); a sink that is behind refuses a batch (also `dropped`); the
file is rotated at `max_bytes` to `<file>.1` (one old generation kept, so
the disk holds at most twice that), the new file starting with a `rotated`
record.  `XENBED_TRACE=0` turns tracing off; SIGUSR1/SIGUSR2 turn it on/off
in a running service (the bench measures with it off and on).

What it costs (`xenbed bench --suite xenstore`, 2 busy cores): a READ round
trip from a guest 55 us untraced, about 12 us more traced (the append on the
request path is ~2 us; formatting ~5 us a record, done at flush, is the rest
as it shares the loop); pipelined throughput 137k -> 58k ops/s.  The bench
therefore measures with tracing off and reports these beside it.

Everything but `FileSink` and `read_since` is pure: records in, bytes out.
`python3 -m xenbed.hypervisor.trace --since IDENT:OFFSET` prints what was
written since a position (the harness reads each test's part with it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from xenbed.protocols import hypercall as hc
from xenbed.protocols.gntst import GNTST_NAMES
from xenbed.protocols.xs_wire import Op

TRACE_FILE = "/var/log/xenbed/trace.jsonl"  # inside the hypervisor container only: see `default_path`
DEFAULT_MAX_BYTES = 32 << 20
SHORT_VALUE = 64  # bytes of a store value kept in a record; `value_len` has the whole length
XENSTORE, WATCH, GRANT, EVTCHN, TRACE = "xenstore", "watch", "grant", "evtchn", "trace"

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_quote = json.encoder.encode_basestring  # a str as a JSON string, quotes included (C)

# Hypercalls whose refusals are recorded, as (kind, op, renames of the call's body keys).
TRACED_CALLS = {
    hc.Call.GNTTAB_GRANT: (GRANT, "grant", {"domid": "to", "gfn": "gfn"}),
    hc.Call.GNTTAB_SET_ENTRY: (GRANT, "set_entry", {"gref": "ref", "domid": "to"}),
    hc.Call.GNTTAB_END: (GRANT, "end", {"gref": "ref"}),
    hc.Call.GNTTAB_MAP: (GRANT, "map", {"domid": "granter", "gref": "ref"}),
    hc.Call.GNTTAB_UNMAP: (GRANT, "unmap", {}),
    hc.Call.GNTTAB_COPY: (GRANT, "copy", {}),
    hc.Call.GNTTAB_MAP_BATCH: (GRANT, "map", {}),
    hc.Call.GNTTAB_UNMAP_BATCH: (GRANT, "unmap", {}),
    hc.Call.GNTTAB_COPY_BATCH: (GRANT, "copy", {}),
    hc.Call.EVTCHN_ALLOC_UNBOUND: (EVTCHN, "alloc_unbound", {"remote_dom": "remote_domid"}),
    hc.Call.EVTCHN_BIND_INTERDOMAIN: (EVTCHN, "bind_interdomain", {"remote_dom": "remote_domid"}),
    hc.Call.EVTCHN_SEND: (EVTCHN, "send", {}),
    hc.Call.EVTCHN_UNMASK: (EVTCHN, "unmask", {}),
    hc.Call.EVTCHN_CLOSE: (EVTCHN, "close", {}),
}


def default_path() -> str:
    """The trace lives in the hypervisor container, not on the xenbus volume
    every guest mounts: it holds other domains' store values."""
    return os.environ.get("XENBED_TRACE_FILE", TRACE_FILE)


def enabled_by_environment(environ=os.environ) -> bool:
    return environ.get("XENBED_TRACE", "1").strip().lower() not in ("0", "off", "no", "false", "")


def gntst_name(status: int) -> str:
    return GNTST_NAMES.get(status, f"GNTST_{status}")


# -- formatting (pure; run at flush time) ------------------------------------------

def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _absolute(path: str, domid: int) -> str:
    """A path as xenstored reads it: relative ones are under the caller's domain."""
    if not path or path[0] in "/@":
        return path
    return f"/local/domain/{domid}/{path}"


def _args(payload: bytes) -> list[str]:
    return [_text(p) for p in payload.split(b"\0")[:-1]]


# Plain ints and a name table: IntEnum comparisons and lookups cost microseconds here.
_OP_NAMES = {int(op): op.name for op in Op}
_WRITE, _ERROR, _READ, _DIRECTORY = int(Op.WRITE), int(Op.ERROR), int(Op.READ), int(Op.DIRECTORY)
_ONE_PATH = frozenset(int(op) for op in (Op.READ, Op.DIRECTORY, Op.MKDIR, Op.RM, Op.GET_PERMS, Op.DIRECTORY_PART))
_WATCHES = frozenset((int(Op.WATCH), int(Op.UNWATCH)))
_SET_PERMS, _TX_START, _TX_END = int(Op.SET_PERMS), int(Op.TRANSACTION_START), int(Op.TRANSACTION_END)


def xenstore_record(ts: float, domid: int, conn: int, op: int, tx: int, payload: bytes,
                    reply_op: int, reply: bytes) -> dict:
    """One store request and how it was answered."""
    name = _OP_NAMES.get(op)
    record = {"ts": ts, "kind": XENSTORE, "op": name or f"UNKNOWN({op})", "domid": domid, "conn": conn, "tx": tx}
    failed = reply_op == _ERROR
    record["result"] = reply.rstrip(b"\0").decode("ascii", "replace") if failed else "OK"
    if op in _ONE_PATH:
        end = payload.find(b"\0")
        record["path"] = _absolute(_text(payload[:end] if end >= 0 else payload), domid)
        if op == _READ and not failed:
            record["value"] = _text(reply[:SHORT_VALUE])
            record["value_len"] = len(reply)
        elif op == _DIRECTORY and not failed:
            record["entries"] = reply.count(b"\0")
    elif op == _WRITE:
        raw_path, _, value = payload.partition(b"\0")
        record["path"] = _absolute(_text(raw_path), domid)
        record["value"] = _text(value[:SHORT_VALUE])
        record["value_len"] = len(value)
    elif op in _WATCHES:
        args = _args(payload) + ["", ""]
        record["path"] = _absolute(args[0], domid)
        record["token"] = args[1]
    elif op == _SET_PERMS:
        args = _args(payload)
        record["path"] = _absolute(args[0], domid) if args else ""
        record["perms"] = args[1:]
    elif op == _TX_START:
        if not failed:
            record["tx"] = int(reply.rstrip(b"\0") or 0)
    elif op == _TX_END:
        record["commit"] = payload[:1] == b"T"
    else:
        record["args"] = _args(payload)[:4]
    return record


def xenstore_line(ts: float, domid: int, conn: int, op: int, tx: int, payload: bytes,
                  reply_op: int, reply: bytes) -> str:
    """`xenstore_record` already as its JSON line.  A successful READ or
    WRITE (nearly every request) is written out directly, a few times
    cheaper than building the dict and encoding it; the rest goes through
    the dict.  Both give the same JSON object."""
    if reply_op != _ERROR and (op == _READ or op == _WRITE):
        if op == _READ:
            end = payload.find(b"\0")
            raw_path, value = (payload[:end] if end >= 0 else payload), reply
        else:
            raw_path, _, value = payload.partition(b"\0")
        path = _absolute(_text(raw_path), domid)
        return (f'{{"ts":{ts!r},"kind":"xenstore","op":"{_OP_NAMES[op]}","domid":{domid},"conn":{conn},'
                f'"tx":{tx},"result":"OK","path":{_quote(path)},"value":{_quote(_text(value[:SHORT_VALUE]))},'
                f'"value_len":{len(value)}}}')
    return _encode(xenstore_record(ts, domid, conn, op, tx, payload, reply_op, reply))


def watch_record(ts: float, domid: int, conn: int, payload: bytes) -> dict:
    """One XS_WATCH_EVENT sent to a connection (payload: path NUL token NUL)."""
    args = _args(payload) + ["", ""]
    return {"ts": ts, "kind": WATCH, "domid": domid, "conn": conn, "path": _absolute(args[0], domid),
            "token": args[1]}


def refused_record(ts: float, call: int, domid: int, body: dict, error: str) -> dict | None:
    """A grant or event-channel call the hypervisor refused, with its arguments."""
    spec = TRACED_CALLS.get(call)
    if spec is None:
        return None
    kind, op, renames = spec
    record = {"ts": ts, "kind": kind, "op": op, "domid": domid}
    for key, value in body.items():
        if key != "nfds" and isinstance(value, (int, str, bool)):
            record[renames.get(key, key)] = value
    if call == hc.Call.GNTTAB_COPY:
        record["count"] = len(body.get("ops") or ())
    record["status" if kind == GRANT else "error"] = error
    return record


# -- the tracer ---------------------------------------------------------------------

class Tracer:
    """Collects records cheaply, hands them to `sink` as JSONL in batches.

    `schedule(delay, callback)` (the loop's call_later) and `sink(data) ->
    bool` (False: refused, the records count as dropped) are attached by the
    shell with `attach`; until then records only accumulate (bounded), and
    tests call `flush` themselves."""

    def __init__(self, *, enabled: bool = True, clock: Callable[[], float] = time.time,
                 flush_interval: float = 0.1, batch_records: int = 2000, max_pending: int = 100_000) -> None:
        self.enabled = enabled
        self.clock = clock
        self.flush_interval = flush_interval
        self.batch_records = batch_records
        self.max_pending = max_pending
        self.pending: list[tuple] = []  # (ts, formatter or None, args or the record itself)
        self.dropped = 0  # records lost since the last `dropped` record was emitted
        self.dropped_since: float | None = None
        self.total_dropped = 0
        self.written = 0  # records handed to the sink
        self._schedule: Callable | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._flush_due: float | None = None  # delay of the flush scheduled, if any

    @classmethod
    def disabled(cls) -> Tracer:
        return cls(enabled=False)

    def attach(self, schedule: Callable, sink: Callable[[bytes], bool]) -> None:
        self._schedule, self._sink = schedule, sink
        self._note({"event": "start", "enabled": self.enabled, "pid": os.getpid()}, force=True)

    def set_enabled(self, on: bool) -> None:
        """Turn tracing on or off, saying so in the stream (both ways)."""
        if on == self.enabled:
            return
        self.enabled = True
        self._note({"event": "on" if on else "off"})
        self.enabled = on

    # -- the request path: append and return --------------------------------------
    def add(self, formatter: Callable | None, args) -> None:
        """Queue one record: `formatter(ts, *args)` makes it (a dict, or its
        JSON line) at flush time (formatter None: `args` is the record
        without its ts)."""
        pending = self.pending
        if len(pending) >= self.max_pending:
            self._lose(1)
            return
        pending.append((self.clock(), formatter, args))
        if len(pending) == 1:
            self._request_flush(self.flush_interval)
        elif len(pending) == self.batch_records:
            self._request_flush(0)

    def xenstore(self, domid: int, conn: int, packet, reply) -> None:
        if self.enabled:
            self.add(xenstore_line, (domid, conn, packet.op, packet.tx_id, packet.payload, reply.op, reply.payload))

    def watch_events(self, domid: int, conn: int, packets) -> None:
        if self.enabled:
            for packet in packets:
                self.add(watch_record, (domid, conn, packet.payload))

    def grant(self, op: str, domid: int, **fields) -> None:
        if self.enabled:
            if "status" in fields and isinstance(fields["status"], int):
                fields["status"] = gntst_name(fields["status"])
            self.add(None, {"kind": GRANT, "op": op, "domid": domid, **fields})

    def evtchn(self, op: str, domid: int, **fields) -> None:
        if self.enabled:
            self.add(None, {"kind": EVTCHN, "op": op, "domid": domid, **fields})

    def refused(self, call: int, domid: int, body: dict, error: str) -> None:
        if self.enabled and call in TRACED_CALLS:
            self.add(refused_record, (call, domid, dict(body), error))

    # -- batching -------------------------------------------------------------------
    def _request_flush(self, delay: float) -> None:
        if self._schedule is None:
            return
        if self._flush_due is not None and self._flush_due <= delay:
            return  # one as soon or sooner is already coming
        self._flush_due = delay
        self._schedule(delay, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_due = None
        self.flush(limit=self.batch_records)
        if self.pending:  # more than one batch waited: the rest goes on the next turn
            self._request_flush(0 if len(self.pending) >= self.batch_records else self.flush_interval)

    def take_batch(self, limit: int | None = None) -> tuple[bytes, int]:
        """The JSONL of up to `limit` pending records (oldest first), preceded
        by a `dropped` record if any were lost; (bytes, records in it)."""
        batch = self.pending if limit is None or len(self.pending) <= limit else self.pending[:limit]
        self.pending = [] if batch is self.pending else self.pending[limit:]
        lines = []
        if self.dropped:
            lines.append(_encode({"ts": self.dropped_since, "kind": TRACE, "event": "dropped",
                                  "count": self.dropped, "total": self.total_dropped}))
            self.dropped, self.dropped_since = 0, None
        for ts, formatter, args in batch:
            try:
                record = formatter(ts, *args) if formatter is not None else {"ts": ts, **args}
                lines.append(record if type(record) is str else _encode(record))  # a formatter may give the line
            except Exception as exc:  # a record we cannot format must not cost the others
                lines.append(_encode({"ts": ts, "kind": TRACE, "event": "unformattable", "error": repr(exc)}))
        if not lines:
            return b"", 0
        return ("\n".join(lines) + "\n").encode("utf-8"), len(lines)

    def flush(self, limit: int | None = None) -> int:
        """Hand pending records to the sink; how many were written."""
        if self._sink is None or (not self.pending and not self.dropped):
            return 0
        data, count = self.take_batch(limit)
        if not count:
            return 0
        if self._sink(data):
            self.written += count
            return count
        self._lose(count)
        return 0

    def _lose(self, count: int) -> None:
        if self.dropped == 0:
            self.dropped_since = self.clock()
        self.dropped += count
        self.total_dropped += count
        if self._flush_due is None:
            self._request_flush(self.flush_interval)

    def _note(self, fields: dict, force: bool = False) -> None:
        if self.enabled or force:
            self.add(None, {"kind": TRACE, **fields})


# -- I/O: the file and reading it back ------------------------------------------

class FileSink:
    """Appends batches to `path` from one writer thread; rotates at `max_bytes`.

    Callable as a Tracer's sink: returns False (the batch is refused and
    counted as dropped) when `max_behind` batches are still waiting for the
    disk.  A write that fails (disk full) loses that batch; the next batch
    written starts with a `dropped` record saying so."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, max_behind: int = 16,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_behind = max_behind
        self.clock = clock
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._lost = 0
        self.rotations = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trace-writer")
        self._inflight: deque[Future] = deque()
        self._lock = threading.Lock()  # close() vs the writer

    def __call__(self, data: bytes) -> bool:
        inflight = self._inflight
        while inflight and inflight[0].done():
            inflight.popleft()
        if len(inflight) >= self.max_behind:
            return False
        inflight.append(self._executor.submit(self._write, data))
        return True

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if self._lost:
                data = _encode({"ts": self.clock(), "kind": TRACE, "event": "dropped", "count": self._lost,
                                "why": "write failed"}).encode() + b"\n" + data
            try:
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                self._size += len(data)
                self._lost = 0
            except OSError:
                self._lost += data.count(b"\n")

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        os.replace(self.path, self.path + ".1")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.rotations += 1
        note = _encode({"ts": self.clock(), "kind": TRACE, "event": "rotated", "previous": self.path + ".1",
                        "generation": self.rotations, "pid": os.getpid()})
        os.write(self._fd, note.encode() + b"\n")
        self._size = len(note) + 1

    def close(self, timeout: float = 5.0) -> None:
        for future in list(self._inflight):
            try:
                future.result(timeout)
            except Exception:
                pass
        self._executor.shutdown(wait=True)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _complete_lines(data: bytes) -> bytes:
    """Up to and with the last newline: a batch being written may be cut."""
    end = data.rfind(b"\n")
    return data[:end + 1] if end >= 0 else b""


def _identity(path: str) -> str | None:
    """Which file generation is at `path`: its inode and a checksum of its
    first line (each generation starts with a `start` or `rotated` record
    carrying its own time), so a reused inode number is not mistaken for
    the file read before.  None while the file has no complete line."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            inode = os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return None
    end = head.find(b"\n")
    if end < 0:
        return None  # nothing complete in it yet: as good as absent
    return f"{inode}.{zlib.crc32(head[:end]):08x}"


def read_since(path: str, ident: str, offset: int) -> tuple[dict, bytes]:
    """What was written to the trace at `path` since position (ident,
    offset) (ident "": from the very start, the rotated generation
    included).  Returns the new position, and `lost` True when a whole
    generation went by unread (or the file was replaced), with the complete
    lines read."""

    def read_from(p, start):
        with open(p, "rb") as f:
            f.seek(start)
            return f.read()

    current, previous = _identity(path), _identity(path + ".1")
    if current is None:
        return {"ident": "", "offset": 0, "lost": bool(ident)}, b""
    lost = False
    chunks = []
    if ident == current:
        start = offset
    else:
        start = 0
        if previous is not None and ident in ("", previous):
            chunks.append(_complete_lines(read_from(path + ".1", offset if ident else 0)))
        elif ident:
            lost = True
    fresh = _complete_lines(read_from(path, start))
    chunks.append(fresh)
    return {"ident": current, "offset": start + len(fresh), "lost": lost}, b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    """`--since IDENT:OFFSET [--file PATH]`: a header line (JSON: the new
    position), then the records written since (`--since :0`: everything)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m xenbed.hypervisor.trace", description=main.__doc__)
    parser.add_argument("--since", default=":0")
    parser.add_argument("--file", default=default_path())
    args = parser.parse_args(argv)
    ident, _, offset = args.since.rpartition(":")
    header, data = read_since(args.file, ident, int(offset or 0))
    out = sys.stdout.buffer
    out.write(_encode(header).encode() + b"\n")
    out.write(data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
