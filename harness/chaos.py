"""Chaos hooks as Jepsen's nemesis: every fault is an operation in a history.

Each operation is recorded twice, as Jepsen does: `invoke` before it is
attempted, then its result — `ok`, `fail` (the engine refused: nothing was
done) or `info` (outcome unknown: the call broke off, the fault may or may
not have happened; never hidden).  Records are plain dicts, ready for JSONL:

    {"ts": 1732233600.12, "type": "invoke", "action": "pause", "service": "domu2", "detail": {}}
    {"ts": 1732233600.19, "type": "ok",     "action": "pause", "service": "domu2", "detail": {}}

`Testbed.kill/stop/start/restart/pause/unpause/disconnect/reconnect` and
`Testbed.kill_process` (a signal to the processes of a container whose
command line matches, as `pkill -f`) go through `History.run`, so
`testbed.history` is the nemesis's side of a test's trace (trace.py merges it
with the domains' XenBus transitions).  A test injects no fault any other
way: a fault missing from the history would be missing from the trace.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from docker.errors import APIError

INVOKE, OK, FAIL, INFO = "invoke", "ok", "fail", "info"
ACTIONS = ("kill", "stop", "start", "restart", "pause", "unpause", "disconnect", "reconnect", "kill_process")
T = TypeVar("T")


class Refused(Exception):
    """The fault was not done, and we know it: e.g. no process matched."""


def pkill_command(pattern: str, signal: str | int = "SIGKILL") -> list[str]:
    """`pkill` sending `signal` to every process whose command line matches
    the extended regular expression `pattern`; exit status 1: none matched."""
    name = str(signal).removeprefix("SIG") if not str(signal).isdigit() else str(signal)
    return ["pkill", f"-{name}", "-f", pattern]


def check_pkill(service: str, pattern: str, exit_code: int, output: str) -> None:
    """pkill's exit status as an outcome: 0 ok, 1 `Refused` (nothing matched,
    nothing was signalled), anything else unknown (a RuntimeError: `info`)."""
    if exit_code == 1:
        raise Refused(f"no process in {service} matches {pattern!r}")
    if exit_code != 0:
        raise RuntimeError(f"pkill in {service} exited with {exit_code}: {output.strip()[-200:]}")


class History(list):
    """The nemesis's operations, in the order they happened (a list of dicts)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.clock = clock

    def record(self, type: str, action: str, service: str, detail: dict | None = None, **extra: Any) -> dict:
        entry = {"ts": self.clock(), "type": type, "action": action, "service": service,
                 "detail": dict(detail or {}), **extra}
        self.append(entry)
        return entry

    def run(self, action: str, service: str, detail: dict | None, operation: Callable[[], T]) -> T:
        """Record `invoke`, do `operation`, record its outcome; errors propagate."""
        self.record(INVOKE, action, service, detail)
        try:
            result = operation()
        except (APIError, Refused) as error:  # the engine (or the container) answered no: it did not happen
            self.record(FAIL, action, service, detail, error=_short(error))
            raise
        except BaseException as error:  # timeout, broken connection, Ctrl-C: we cannot know
            self.record(INFO, action, service, detail, error=_short(error))
            raise
        self.record(OK, action, service, detail)
        return result

    def since(self, index: int) -> list[dict]:
        return list(self[index:])

    def ops(self, type: str | None = OK) -> list[tuple[str, str]]:
        """(action, service) of each operation with outcome `type` (all invokes with INVOKE)."""
        return [(e["action"], e["service"]) for e in self if type is None or e["type"] == type]


def _short(error: BaseException) -> str:
    text = getattr(error, "explanation", None) or str(error) or type(error).__name__
    return str(text)[:300]
