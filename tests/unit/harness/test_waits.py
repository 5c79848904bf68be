"""wait_for: returns the first truthy value; a timeout says what, how long, and what it last saw."""

import itertools

import pytest

from xenbed.harness.waits import StopWaiting, WaitTimeout, wait_for


def test_returns_first_truthy_value():
    values = iter([None, 0, "", "ready"])
    assert wait_for(lambda: next(values), what="x", timeout=5, interval=0) == "ready"


def test_timeout_names_what_how_long_and_last_value():
    counter = itertools.count()
    with pytest.raises(WaitTimeout) as error:
        wait_for(lambda: {"health": "starting", "polls": next(counter)} and False or [],
                 what="dom0 to be healthy", timeout=0.3, interval=0.05,
                 describe=lambda value: f"described {value!r}")
    message = str(error.value)
    assert "waiting for dom0 to be healthy" in message
    assert "limit 0.3s" in message and "timed out after" in message
    assert "last seen: described []" in message


def test_timeout_reports_the_last_exception():
    def probe():
        raise ConnectionRefusedError("xenstored not listening")

    with pytest.raises(WaitTimeout, match=r"last error: ConnectionRefusedError: xenstored not listening"):
        wait_for(probe, what="xenstored", timeout=0.2, interval=0.05)


def test_stop_waiting_propagates_at_once():
    calls = []

    def probe():
        calls.append(1)
        raise StopWaiting("container exited")

    with pytest.raises(StopWaiting, match="container exited"):
        wait_for(probe, what="x", timeout=10, interval=0.01)
    assert len(calls) == 1


def test_progress_lines_while_waiting():
    lines = []
    with pytest.raises(WaitTimeout):
        wait_for(lambda: False, what="peer", timeout=0.35, interval=0.05, progress=lines.append, progress_every=0.1)
    assert lines and all(line.startswith("still waiting for peer (") for line in lines)
    assert "last seen: False" in lines[-1]
