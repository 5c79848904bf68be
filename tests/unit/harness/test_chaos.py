"""A process killed inside a container is a chaos operation like a container
kill: invoke, then ok / fail (nothing matched) / info (unknown), in
`testbed.history` (harness/chaos.py, Testbed.kill_process)."""

from __future__ import annotations

import pytest

from xenbed.harness.chaos import Refused, pkill_command
from xenbed.harness.execs import ExecResult
from xenbed.harness.testbed import Testbed


class PkillBed(Testbed):
    """A testbed whose containers answer every exec with one exit status."""

    def __init__(self, exit_code: int):
        super().__init__("unit", client=object())
        self.exit_code, self.calls = exit_code, []

    def exec(self, service, cmd, **kwargs):
        self.calls.append((service, cmd))
        return ExecResult(self.exit_code, "", "pkill: boom\n" if self.exit_code > 1 else "")


def test_pkill_command_names_the_signal_as_pkill_takes_it():
    assert pkill_command("python3 -m x") == ["pkill", "-KILL", "-f", "python3 -m x"]
    assert pkill_command("[x]enbed", "SIGTERM") == ["pkill", "-TERM", "-f", "[x]enbed"]
    assert pkill_command("y", 9) == ["pkill", "-9", "-f", "y"]


def test_a_killed_process_is_an_invoke_ok_pair_in_the_history():
    bed = PkillBed(0)
    bed.kill_process("dom0", "[x]enbed.drivers.blk.back", "SIGTERM")
    assert bed.calls == [("dom0", ["pkill", "-TERM", "-f", "[x]enbed.drivers.blk.back"])]
    assert [(e["type"], e["action"], e["service"]) for e in bed.history] == [
        ("invoke", "kill_process", "dom0"), ("ok", "kill_process", "dom0")]
    assert bed.history[0]["detail"] == {"pattern": "[x]enbed.drivers.blk.back", "signal": "SIGTERM"}


def test_no_matching_process_is_a_fail_and_an_unknown_exit_is_info():
    bed = PkillBed(1)
    with pytest.raises(Refused, match="no process in dom0"):
        bed.kill_process("dom0", "nothing-runs-this")
    assert [e["type"] for e in bed.history] == ["invoke", "fail"]
    bed = PkillBed(3)
    with pytest.raises(RuntimeError, match="exited with 3"):
        bed.kill_process("dom0", "x")
    assert [e["type"] for e in bed.history] == ["invoke", "info"]
