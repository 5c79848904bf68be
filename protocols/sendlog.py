"""The send log: how event-channel sends that never reach the hypervisor
still reach the trace (xentrace's idea: each CPU writes records into a
buffer that a collector drains).

A domain link in fd mode sends events by writing the peer port's eventfd
directly (docs/hypervisor-socket.md, "Event channels at memory speed"), so
the hypervisor no longer sees each send.  Instead the domain appends one
record per send to a shared page the hypervisor gave it at HELLO, and the
hypervisor drains it into the trace every tenth of a second.  Pure code
over a buffer (an mmap on both sides); both ends share it.

Layout (little-endian):

    offset  size  field
    0       4     magic     0x58534c47 ("XSLG")
    4       4     capacity  number of record slots
    8       4     enabled   written by the hypervisor: 0 = do not record
    12      4     (pad)
    16      8     prod      records ever appended (written by the domain)
    24      8     cons      records ever drained (written by the hypervisor)
    32      8     dropped   records lost because the log was full (domain)
    64      16 x capacity records: u64 time (ns since the epoch), u32 port, u32 flags

The domain writes a record, then advances `prod`; the hypervisor reads the
records between `cons` and `prod`, then advances `cons`.  Only one side
writes each counter, so no lock crosses the boundary (x86's stores are
seen in order; Python cannot reorder them).  The hypervisor trusts nothing
it reads: `prod` is clamped to at most `capacity` records ahead of `cons`,
and every record is reported as the domain's own word ("reported": true).
"""

from __future__ import annotations

import struct

MAGIC = 0x58534C47
HEADER = struct.Struct("<IIII QQQ")
HEADER_SIZE = 64
RECORD = struct.Struct("<QII")
DEFAULT_CAPACITY = 4096
_PROD, _CONS, _DROPPED, _ENABLED = 16, 24, 32, 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def size_for(capacity: int) -> int:
    """Bytes a log of `capacity` records needs, rounded up to whole pages."""
    raw = HEADER_SIZE + capacity * RECORD.size
    return -(-raw // 4096) * 4096


def init(buf, capacity: int, enabled: bool) -> None:
    HEADER.pack_into(buf, 0, MAGIC, capacity, int(enabled), 0, 0, 0, 0)


def set_enabled(buf, on: bool) -> None:
    _U32.pack_into(buf, _ENABLED, int(on))


def check(buf) -> int:
    """The capacity of a well-formed log; ValueError otherwise (the domain side
    checks what the hypervisor handed it)."""
    magic, capacity = struct.unpack_from("<II", buf, 0)
    if magic != MAGIC or capacity <= 0 or HEADER_SIZE + capacity * RECORD.size > len(buf):
        raise ValueError("not a send log")
    return capacity


class Writer:
    """The domain's end: `append(port, ns)` records one send."""

    def __init__(self, buf) -> None:
        self.buf = buf
        self.capacity = check(buf)

    def enabled(self) -> bool:
        return _U32.unpack_from(self.buf, _ENABLED)[0] != 0

    def append(self, port: int, time_ns: int, flags: int = 0) -> bool:
        """One record; False (and `dropped` counted) when the log is full.
        Callers serialise appends themselves (one lock per link)."""
        buf = self.buf
        prod = _U64.unpack_from(buf, _PROD)[0]
        cons = _U64.unpack_from(buf, _CONS)[0]
        if prod - cons >= self.capacity:
            _U64.pack_into(buf, _DROPPED, _U64.unpack_from(buf, _DROPPED)[0] + 1)
            return False
        RECORD.pack_into(buf, HEADER_SIZE + (prod % self.capacity) * RECORD.size, time_ns, port, flags)
        _U64.pack_into(buf, _PROD, prod + 1)
        return True


class Reader:
    """The hypervisor's end: `drain()` -> (records, newly dropped)."""

    def __init__(self, buf, capacity: int) -> None:
        self.buf = buf
        self.capacity = capacity
        self.dropped_seen = 0

    def drain(self) -> tuple[list[tuple[int, int, int]], int]:
        buf = self.buf
        prod = _U64.unpack_from(buf, _PROD)[0]
        cons = _U64.unpack_from(buf, _CONS)[0]
        behind = prod - cons
        if behind <= 0:
            records = []
        else:
            if behind > self.capacity:  # a domain lying about prod: take what the log can hold
                cons = prod - self.capacity
            records = [RECORD.unpack_from(buf, HEADER_SIZE + (i % self.capacity) * RECORD.size)
                       for i in range(cons, prod)]
        _U64.pack_into(buf, _CONS, max(prod, cons))
        dropped = _U64.unpack_from(buf, _DROPPED)[0]
        new_drops = max(0, dropped - self.dropped_seen)
        self.dropped_seen = max(self.dropped_seen, dropped)
        return records, new_drops
