"""Chaos hooks as Jepsen's nemesis: every fault is an operation in a history.

Each operation is recorded twice, as Jepsen does: `invoke` before it is
attempted, then its result — `ok`, `fail` (the engine refused: nothing was
done) or `info` (outcome unknown: the call broke off, the fault may or may
not have happened; never hidden).  Records are plain dicts, ready for JSONL:

    {"ts": 1732233600.12, "type": "invoke", "action": "pause", "service": "domu2", "detail": {}}
    {"ts": 1732233600.19, "type": "ok",     "action": "pause", "service": "domu2", "detail": {}}

`Testbed.kill/stop/start/restart/pause/unpause/disconnect/reconnect` go
through `History.run`, so `testbed.history` is the nemesis's side of a test's
trace (trace.py merges it with the domains' XenBus transitions).
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from docker.errors import APIError

INVOKE, OK, FAIL, INFO = "invoke", "ok", "fail", "info"
ACTIONS = ("kill", "stop", "start", "restart", "pause", "unpause", "disconnect", "reconnect")
T = TypeVar("T")


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
        except APIError as error:  # the engine answered no: the fault did not happen
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
