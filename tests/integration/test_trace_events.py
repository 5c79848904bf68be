"""The trace is complete and in causal order: a disk attached at run time
leaves, in the hypervisor's records merged with both ends' transitions,
seed 000's negotiation step by step -- the frontend writes ring-ref and
event-channel, the backend maps that very grant and binds that very port,
then both ends go Connected.  Checked twice: on what the harness's reader
gathers, and on the per-test file the `xenbus_invariant` fixture wrote.
"""

from __future__ import annotations

import time

import pytest

from xenbed.harness import trace
from xenbed.harness.diagram import device_records, render_mermaid
from xenbed.harness.fixtures import trace_dir

pytestmark = pytest.mark.integration

VDEV, DEVID = "xvdf", 51792  # blkif: xvda 51712, 16 minors a disk
IMAGE = "/var/lib/xen/images/traced.img"
ATTACH_TEST = {}  # nodeid of the attach test, once it ran, for the test of its trace file


def wait_until(probe, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def negotiation(records: list[dict], guest: int) -> dict:
    """The records of the disk's negotiation, found by their content alone
    (not by the diagram's association, which is also checked), each the
    first of its sort.  A transition is taken at the time the hypervisor saw
    its state written (committed), its own ts kept as `noted_ts`: the domain
    notes a transition after its write, so the other end may react first."""
    front = f"/local/domain/{guest}/device/vbd/{DEVID}"
    back = f"/local/domain/0/backend/vbd/{guest}/{DEVID}"
    written = trace.write_times(records)
    found: dict[str, dict] = {}

    def first(name: str, record: dict) -> None:
        found.setdefault(name, record)

    for r in sorted(records, key=lambda r: r["ts"]):
        kind = r.get("kind")
        if kind == "transition" and r["path"] in (front, back):
            first(f"{r['role']} {r['to']}", {**r, "ts": trace.state_written_at(r, written), "noted_ts": r["ts"]})
        elif kind == "xenstore" and r.get("op") == "WRITE" and r.get("result") == "OK" and r.get("domid") == guest:
            if r.get("path") in (f"{front}/ring-ref", f"{front}/event-channel"):
                first(r["path"].rsplit("/", 1)[1], r)
        elif kind == "grant" and r.get("op") == "map" and r.get("granter") == guest and "ring-ref" in found:
            if r.get("ref") == int(found["ring-ref"]["value"]) and r.get("status") == "GNTST_okay":
                first("map", r)
        elif kind == "evtchn" and r.get("op") == "bind_interdomain" and "event-channel" in found:
            if r.get("remote_domid") == guest and r.get("remote_port") == int(found["event-channel"]["value"]):
                first("bind", r)
    return found


def assert_causal_order(records: list[dict], guest: int) -> None:
    steps = negotiation(records, guest)
    # blkfront publishes its ring at probe, without waiting for the backend's
    # InitWait (as Linux's blkfront did before multi-page rings): so
    # InitWait is ordered only before the map, which needs both.
    order = ["ring-ref", "frontend Initialised", "map", "backend Connected", "frontend Connected"]
    missing = [name for name in order + ["backend InitWait", "event-channel", "bind"] if name not in steps]
    assert not missing, f"the trace lacks {missing}; it has {sorted(steps)}"
    for name in order + ["backend InitWait"]:
        if "noted_ts" in steps[name]:  # the hypervisor saw the state written, before the domain noted it
            assert steps[name]["ts"] is not None, f"no store write of the state of {name} in the trace"
            assert steps[name]["ts"] <= steps[name]["noted_ts"] < steps[name]["ts"] + 2.0, steps[name]
    times = [steps[name]["ts"] for name in order]
    assert times == sorted(times), [(name, steps[name]["ts"]) for name in order]
    assert steps["backend InitWait"]["ts"] < steps["map"]["ts"]
    assert steps["event-channel"]["ts"] < steps["frontend Initialised"]["ts"] < steps["bind"]["ts"] \
        < steps["backend Connected"]["ts"]
    # the map is the backend's, of the very grant the frontend wrote, and it succeeded
    assert steps["map"]["domid"] == 0 and steps["map"]["readonly"] is False
    assert steps["bind"]["domid"] == 0 and steps["bind"]["port"] > 0
    # the writes were in the frontend's transaction, which committed
    tx = steps["ring-ref"]["tx"]
    assert tx != 0 and any(r.get("kind") == "xenstore" and r.get("op") == "TRANSACTION_END" and r.get("tx") == tx
                           and r.get("domid") == guest and r.get("commit") and r.get("result") == "OK"
                           and r["ts"] > steps["ring-ref"]["ts"] for r in records)
    # the watch that told the backend the frontend is Initialised fired between the two
    assert any(r.get("kind") == "watch" and r.get("domid") == 0
               and r.get("path") == f"/local/domain/{guest}/device/vbd/{DEVID}/state"
               and steps["frontend Initialised"]["ts"] - 0.5 <= r["ts"] <= steps["map"]["ts"] for r in records)


@pytest.fixture(scope="module")
def guest(testbed) -> int:
    domid = int(testbed.exec("dom0", ["xl", "domid", "domu1"], check=True).stdout)
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvda"]).exit_code == 0,
               "/run/xen/vbd/xvda in domu1")
    return domid


def test_an_attached_disks_negotiation_is_in_the_trace_in_causal_order(testbed, guest, request):
    testbed.exec("dom0", ["truncate", "-s", "8M", IMAGE], check=True)
    testbed.exec("dom0", ["xl", "block-attach", "domu1", f"format=raw, vdev={VDEV}, access=rw, target={IMAGE}"],
                 check=True)
    try:
        wait_until(lambda: testbed.exec("domu1", ["test", "-e", f"/run/xen/vbd/{VDEV}"]).exit_code == 0,
                   f"/run/xen/vbd/{VDEV} in domu1")
        # a fresh reader takes everything since boot: what the fixture's reader merges, for this test and more
        records = trace.merge(trace.TranscriptReader().new_records(testbed))
        assert {"transition", "xenstore", "watch", "grant", "evtchn"} <= {r["kind"] for r in records}
        assert_causal_order(records, guest)
        # the diagram's association finds the same map and bind, and draws them
        front = f"/local/domain/{guest}/device/vbd/{DEVID}"
        mine = device_records(records, front)
        assert any(r["kind"] == "grant" and r["op"] == "map" for r in mine)
        assert any(r["kind"] == "evtchn" and r["op"] == "bind_interdomain" for r in mine)
        assert not any(r["kind"] == "xenstore" and r["op"] != "WRITE" for r in mine), "reads drown the picture"
        mermaid = render_mermaid(records, front)
        assert "B-->>F: map gref" in mermaid and "B-->>F: bind port" in mermaid, mermaid
    finally:
        testbed.exec("dom0", ["xl", "block-detach", "domu1", VDEV])
        wait_until(lambda: testbed.exec("domu1", ["test", "-e", f"/run/xen/vbd/{VDEV}"]).exit_code != 0,
                   f"/run/xen/vbd/{VDEV} to go away in domu1")
        testbed.exec("dom0", ["rm", "-f", IMAGE])
    ATTACH_TEST["nodeid"] = request.node.nodeid


def test_the_attach_tests_own_trace_file_has_it_too(testbed, guest, request):
    """The per-test file (written by the xenbus_invariant fixture after the
    test above) holds the attach's records of every kind, by time."""
    if "nodeid" not in ATTACH_TEST:
        pytest.skip("runs after test_an_attached_disks_negotiation_is_in_the_trace_in_causal_order")
    records = trace.read(trace.trace_path(ATTACH_TEST["nodeid"], trace_dir(request.config)))
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)
    assert_causal_order(records, guest)
    # and the detach: the backend unmapped the ring, closed its port, and the frontend ended its grant
    steps = negotiation(records, guest)
    ref = int(steps["ring-ref"]["value"])
    unmap = [r for r in records if r.get("kind") == "grant" and r.get("op") == "unmap" and r.get("granter") == guest
             and r.get("ref") == ref and r["ts"] > steps["map"]["ts"]]
    ended = [r for r in records if r.get("kind") == "grant" and r.get("op") == "end" and r.get("domid") == guest
             and r.get("ref") == ref and r.get("status") == "GNTST_okay" and r["ts"] > steps["map"]["ts"]]
    assert unmap and ended and unmap[0]["ts"] < ended[0]["ts"], (unmap, ended)
    assert any(r.get("kind") == "transition" and r["path"].endswith(f"/{DEVID}") and r["to"] == "Closed"
               for r in records)
