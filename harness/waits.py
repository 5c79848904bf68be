"""Polling with a message worth reading when it times out.

A bare "timed out" after three minutes of CI is useless; `WaitTimeout` says
what was awaited, for how long, and the last thing the probe saw.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, retry_if_result
from tenacity import stop_after_delay, wait_fixed

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The awaited condition did not come true in time (an AssertionError, so pytest shows it plainly)."""


class StopWaiting(Exception):
    """Raised by a probe when waiting longer cannot help (say, the container exited); not retried."""


class Observation:
    """What a probe saw: truthy when the condition holds, readable in a timeout message."""

    def __init__(self, ready: bool, seen: str):
        self.ready, self.seen = ready, seen

    def __bool__(self) -> bool:
        return self.ready

    def __repr__(self) -> str:
        return self.seen


def wait_for(
    probe: Callable[[], T],
    *,
    what: str,
    timeout: float,
    interval: float = 0.2,
    describe: Callable[[Any], str] = repr,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 10.0,
) -> T:
    """Call `probe()` until it returns something truthy, and return that.

    Exceptions from the probe count as "not yet" (the last one is reported),
    except `StopWaiting`, which propagates at once.  With `progress`, a line
    "still waiting for ..." is emitted every `progress_every` seconds.
    """
    started = time.monotonic()
    last_report = [started]

    def report(state: RetryCallState) -> None:
        now = time.monotonic()
        if progress is not None and now - last_report[0] >= progress_every:
            last_report[0] = now
            progress(f"still waiting for {what} ({now - started:.0f}s of {timeout:.0f}s): "
                     f"{_last_seen(state, describe)}")

    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry=(retry_if_result(lambda value: not value)
               | retry_if_exception(lambda error: not isinstance(error, StopWaiting))),
        before_sleep=report,
    )
    try:
        return retrying(probe)
    except RetryError as error:
        elapsed = time.monotonic() - started
        raise WaitTimeout(f"timed out after {elapsed:.1f}s (limit {timeout:g}s) waiting for {what}; "
                          f"{_last_seen(error.last_attempt, describe)}") from None


def _last_seen(state_or_future: Any, describe: Callable[[Any], str]) -> str:
    outcome = getattr(state_or_future, "outcome", state_or_future)
    if outcome is None:
        return "the probe never ran"
    if outcome.failed:
        error = outcome.exception()
        return f"last error: {type(error).__name__}: {error}"
    return f"last seen: {describe(outcome.result())}"
