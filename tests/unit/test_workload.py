"""The block workload's formats (protocols/workload.py) and the program itself
(drivers/workload/blk.py), run for real against a plain file: the checker
must pass what it leaves, and a SIGTERM must end it cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from xenbed.harness import checker, cli
from xenbed.protocols import workload as fmt

RUN = bytes.fromhex("0123456789abcdef")


def test_a_block_describes_itself():
    data = fmt.encode_block(RUN, 3, 17, 4100)
    assert len(data) == fmt.DEFAULT_BLOCK_SIZE and data.startswith(fmt.MAGIC)
    assert fmt.decode_block(data, RUN) == {"kind": "block", "worker": 3, "seq": 17, "slot": 4100}
    assert fmt.decode_block(data, None)["kind"] == "block"
    assert fmt.decode_block(data, bytes(8))["kind"] == "foreign"
    assert fmt.encode_block(RUN, 3, 18, 4100)[fmt.HEADER.size:] != data[fmt.HEADER.size:]  # payload per write


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "crc32"),
    (lambda b: b[:2048] + bytes(2048), "crc32"),
    (lambda b: b[:36] + (999).to_bytes(4, "little") + b[40:], "payload length"),
])
def test_damaged_blocks_are_corrupt(damage, reason):
    seen = fmt.decode_block(damage(fmt.encode_block(RUN, 0, 1, 5)), RUN)
    assert seen["kind"] == "corrupt" and reason in seen["reason"]


def test_zeros_and_foreign_data():
    assert fmt.decode_block(bytes(512), RUN) == {"kind": "zero"}
    assert fmt.decode_block(b"\xeb\x3c\x90mkfs.fat" + bytes(500), RUN) == {"kind": "other"}


def test_parse_history_tolerates_only_a_cut_last_line():
    assert len(fmt.parse_history(['{"type": "run"}', "", '{"type": "in'])) == 1
    with pytest.raises(ValueError, match="line 1"):
        fmt.parse_history(['{"type": "ru', '{"type": "end"}'])


def workload(tmp_path, *args: str) -> list[str]:
    disk = tmp_path / "disk"
    if not disk.exists():
        disk.write_bytes(bytes(2 * 1024 * 1024))
    return [sys.executable, "-m", "xenbed.drivers.workload.blk", "--file", str(disk),
            "--history", str(tmp_path / "history.jsonl"), "--first-slot", "128", "--slot-count", "64",
            "--progress", "0.2", *args]


def final_region(tmp_path, run: dict) -> bytes:
    with open(tmp_path / "disk", "rb") as f:
        f.seek(run["first_slot"] * run["block_size"])
        return f.read(run["slot_count"] * run["block_size"])


def test_the_workload_leaves_a_history_the_checker_passes(tmp_path):
    subprocess.run(workload(tmp_path, "--workers", "3", "--ops", "400"), check=True, timeout=60)
    records = fmt.parse_history((tmp_path / "history.jsonl").read_text().splitlines())
    run, end = records[0], records[-1]
    assert run["type"] == "run" and end["type"] == "end" and end["reason"] == "ops done"
    assert sum(1 for r in records if r.get("type") == "invoke") == 400
    result = checker.check(records, final_region(tmp_path, run))
    assert result.ok, result.render()
    assert cli.main(["check", str(tmp_path / "history.jsonl"), str(tmp_path / "disk")]) == 0
    assert result.stats["writes_ok"] > 100 and result.stats["reads_consistent"] > 50
    # every worker kept to its own slots
    for r in records[1:-1]:
        assert (r["slot"] - run["first_slot"]) % 3 == r["process"]


def test_sigterm_stops_it_cleanly_and_a_wiped_slot_is_then_found(tmp_path):
    process = subprocess.Popen(workload(tmp_path, "--rate", "200"), stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "writes" in stderr and "stopped (signal SIGTERM)" in stderr  # progress lines, then the last one
    records = fmt.parse_history((tmp_path / "history.jsonl").read_text().splitlines())
    assert records[-1]["type"] == "end" and records[-1]["reason"] == "signal SIGTERM"
    run = records[0]
    result = checker.check(records, final_region(tmp_path, run))
    assert result.ok, result.render()

    last_ok = [r for r in records if r.get("type") == "ok" and r.get("f") == "write"][-1]
    with open(tmp_path / "disk", "r+b") as disk:
        disk.seek(last_ok["slot"] * run["block_size"])
        disk.write(bytes(run["block_size"]))
    result = checker.check(records, final_region(tmp_path, run))
    assert [(f.kind, f.slot) for f in result.findings] == [("lost-write", last_ok["slot"])]
    # the same verdict from the command line, on the files
    assert cli.main(["check", str(tmp_path / "history.jsonl"), str(tmp_path / "disk")]) == 1


def test_slots_beyond_the_disk_are_refused_before_anything_is_written(tmp_path):
    result = subprocess.run(workload(tmp_path, "--first-slot", "1000", "--ops", "1"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "beyond" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["end"]
