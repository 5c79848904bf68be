"""Chaos hooks on the real testbed: each fault is an invoke/ok pair in `testbed.history`,
and the service works again once the fault is undone."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def uplink_address(testbed, service: str) -> str | None:
    container = testbed.container(service)
    container.reload()
    for name, endpoint in container.attrs["NetworkSettings"]["Networks"].items():
        if name == f"{testbed.project_name}_uplink":
            return endpoint.get("IPAddress") or None
    return None


def eventually(probe, timeout: float = 20, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def test_pause_and_network_cut_are_recorded_and_undone(testbed):
    start = len(testbed.history)

    testbed.pause("domu2")
    assert _status(testbed, "domu2") == "paused"
    testbed.unpause("domu2")
    # the guest's store connection survived the freeze
    assert eventually(lambda: testbed.exec("domu2", ["xenstore-read", "name"]).stdout.strip() == "domu2")

    testbed.disconnect("peer", "uplink")
    assert uplink_address(testbed, "peer") is None
    testbed.reconnect("peer", "uplink")
    address = uplink_address(testbed, "peer")
    assert address
    # dom0 reaches the peer again through its bridged uplink
    assert eventually(lambda: testbed.exec("dom0", ["ping", "-c", "1", "-W", "1", address]).exit_code == 0), \
        f"dom0 cannot reach peer at {address} after reconnect"

    ops = [(e["type"], e["action"], e["service"]) for e in testbed.history[start:]]
    assert ops == [("invoke", "pause", "domu2"), ("ok", "pause", "domu2"),
                   ("invoke", "unpause", "domu2"), ("ok", "unpause", "domu2"),
                   ("invoke", "disconnect", "peer"), ("ok", "disconnect", "peer"),
                   ("invoke", "reconnect", "peer"), ("ok", "reconnect", "peer")]
    assert all(e["detail"] == {"network": "uplink"} for e in testbed.history[start + 4:])
    times = [e["ts"] for e in testbed.history[start:]]
    assert times == sorted(times)


def test_a_refused_fault_is_a_fail_in_the_history(testbed):
    start = len(testbed.history)
    with pytest.raises(Exception):
        testbed.unpause("domu1")  # not paused: the engine refuses
    assert [(e["type"], e["action"]) for e in testbed.history[start:]] == [("invoke", "unpause"), ("fail", "unpause")]
    assert testbed.history[-1]["error"]


def _status(testbed, service: str) -> str:
    container = testbed.container(service)
    container.reload()
    return container.status
