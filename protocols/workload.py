"""The block workload's two formats, with no I/O in it: the self-describing
block it writes, and the Jepsen-style history it records.

The workload (drivers/workload/blk.py, in a guest) writes blocks and records
what it did; the checker (harness/checker.py, on the host) reads the disk
back and judges the history.  Both ends use this module, so what one writes
the other reads byte for byte.

Block (little-endian, `block_size` bytes, default 4096, at offset
`slot * block_size` of the disk):

    offset  size  field
         0     8  magic        b"XENBEDWL"
         8     8  run          random id of one workload run (hex in the history)
        16     4  worker       the thread that wrote it (each owns disjoint slots)
        20     8  seq          the worker's op sequence number: (worker, seq) names one write
        28     8  slot         where the block was meant to land
        36     4  payload_len  block_size - HEADER.size
        40     4  crc32        of bytes 0..39 and the payload
        44     .  payload      derived from (run, worker, seq): a stale or mixed-up
                                payload is recognisable even where the crc matches

So a torn block (bad crc), a block at the wrong offset (slot field), a block of
an earlier run (run field) and a block no write of this run made (seq) are all
told apart from an honest one.

History: one JSON object per line.  The first line describes the run:

    {"type": "run", "run": "9f1c...", "block_size": 4096, "first_slot": 4096, "slot_count": 256, ...}

then every operation twice, as Jepsen records it: `invoke` before it is
issued, then its outcome --

    ok      it happened (a write: pwrite and fsync returned, so it is durable)
    fail    it certainly did not happen (the OS refused it before issuing it)
    info    unknown: it may or may not have happened, now or later

    {"index": 7, "time": 1732.0, "type": "invoke", "f": "write", "process": 0, "seq": 3, "slot": 4100}
    {"index": 8, "time": 1732.1, "type": "ok",     "f": "write", "process": 0, "seq": 3, "slot": 4100}
    {"index": 9, "time": 1732.1, "type": "invoke", "f": "read",  "process": 0, "seq": 4, "slot": 4100}
    {"index": 10, "time": 1732.2, "type": "ok",    "f": "read",  "process": 0, "seq": 4, "slot": 4100,
     "value": {"kind": "block", "worker": 0, "seq": 3, "slot": 4100}}

(process, seq) pairs an invoke with its outcome; an invoke with none (the
workload was killed) is unknown.  The last line, when the workload stopped
on its own terms, is {"type": "end", ...}.  File order is real-time order:
every record is written under one lock, invoke before the operation starts,
the outcome after it ended.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Iterable

MAGIC = b"XENBEDWL"
HEADER = struct.Struct("<8s8sIQQII")  # magic, run, worker, seq, slot, payload_len, crc32
DEFAULT_BLOCK_SIZE = 4096
RUN_ID_BYTES = 8
FORMAT_VERSION = 1

# history record types
RUN, END = "run", "end"
INVOKE, OK, FAIL, INFO = "invoke", "ok", "fail", "info"
OUTCOMES = (OK, FAIL, INFO)
WRITE, READ = "write", "read"

# what a block on disk turned out to be (Observation kind)
ZERO = "zero"          # all zero bytes: never written (or wiped)
BLOCK = "block"        # an intact block of this run
FOREIGN = "foreign"    # an intact block of another run: content from before this run
OTHER = "other"        # not our format at all: content from before this run
CORRUPT = "corrupt"    # our magic, but torn, damaged or inconsistent


def run_id_hex(run: bytes) -> str:
    return run.hex()


def payload_for(run: bytes, worker: int, seq: int, length: int) -> bytes:
    """The payload of write (worker, seq): a BLAKE2b stream, cheap and unique per write."""
    seed = hashlib.blake2b(run + struct.pack("<IQ", worker, seq), digest_size=64).digest()
    return (seed * (length // len(seed) + 1))[:length]


def encode_block(run: bytes, worker: int, seq: int, slot: int, block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    if len(run) != RUN_ID_BYTES:
        raise ValueError(f"run id must be {RUN_ID_BYTES} bytes, not {len(run)}")
    if block_size < HEADER.size:
        raise ValueError(f"block size {block_size} is smaller than the {HEADER.size}-byte header")
    payload = payload_for(run, worker, seq, block_size - HEADER.size)
    unsealed = HEADER.pack(MAGIC, run, worker, seq, slot, len(payload), 0)
    crc = zlib.crc32(payload, zlib.crc32(unsealed[:HEADER.size - 4]))
    return unsealed[:HEADER.size - 4] + struct.pack("<I", crc) + payload


def decode_block(data: bytes, run: bytes | None) -> dict:
    """What `data` (one block) is, as an observation dict (JSON-ready):

        {"kind": "zero"} | {"kind": "other"}
        {"kind": "block",   "worker": w, "seq": s, "slot": n}            intact, this run
        {"kind": "foreign", "run": hex, "worker": w, "seq": s, "slot": n} intact, another run
        {"kind": "corrupt", "reason": "...", ...header fields when readable}

    `run` None: any intact block counts as "block" (it carries its run)."""
    if not any(data):
        return {"kind": ZERO}
    if len(data) < HEADER.size or data[:len(MAGIC)] != MAGIC:
        return {"kind": OTHER}
    magic, block_run, worker, seq, slot, payload_len, crc = HEADER.unpack_from(data)
    fields = {"run": block_run.hex(), "worker": worker, "seq": seq, "slot": slot}
    if payload_len != len(data) - HEADER.size:
        return {"kind": CORRUPT, "reason": f"payload length {payload_len} in a {len(data)}-byte block", **fields}
    payload = data[HEADER.size:]
    if zlib.crc32(payload, zlib.crc32(data[:HEADER.size - 4])) != crc:
        return {"kind": CORRUPT, "reason": "crc32 mismatch (torn or damaged)", **fields}
    if payload != payload_for(block_run, worker, seq, payload_len):
        return {"kind": CORRUPT, "reason": "payload is not the one this write makes", **fields}
    if run is not None and block_run != run:
        return {"kind": FOREIGN, **fields}
    del fields["run"]
    return {"kind": BLOCK, **fields}


def describe(observation: dict) -> str:
    """An observation in a few words: 'w0:17 (slot 4100)', 'zeros', 'corrupt (crc32 mismatch)'."""
    kind = observation.get("kind")
    if kind == BLOCK:
        return f"w{observation['worker']}:{observation['seq']} (slot {observation['slot']})"
    if kind == ZERO:
        return "zeros"
    if kind == OTHER:
        return "data not written by any workload"
    if kind == FOREIGN:
        return f"a block of another run {observation['run'][:8]} (w{observation['worker']}:{observation['seq']})"
    if kind == CORRUPT:
        where = f", says w{observation['worker']}:{observation['seq']} slot {observation['slot']}" \
            if "seq" in observation else ""
        return f"corrupt ({observation.get('reason', '?')}{where})"
    return repr(observation)


def parse_history(lines: Iterable[str]) -> list[dict]:
    """History records from JSONL lines.  A line that does not parse is a
    line cut short by a kill; only the last line may be one."""
    lines = [line for line in lines if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ValueError(f"history line {number + 1} is not JSON: {line[:120]!r}") from None
    return records


def dump_record(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=True)
