"""The hypervisor's records in a test's trace: reading them incrementally,
merging them with the transitions, when a write took effect, and which of
them a device's diagram draws (no Docker: the testbed is a stand-in)."""

import json

from xenbed.harness import cli, trace
from xenbed.harness.diagram import device_records, render_mermaid, steps
from xenbed.harness.execs import ExecResult

GUEST = 1
FRONT = "/local/domain/1/device/vbd/51712"
BACK = "/local/domain/0/backend/vbd/1/51712"


def xs(ts, domid, path, value, tx=0, conn=None, op="WRITE", result="OK"):
    return {"ts": ts, "kind": "xenstore", "op": op, "domid": domid, "conn": conn if conn is not None else 10 + domid,
            "tx": tx, "path": path, "value": value, "result": result, "service": "hypervisor"}


def commit(ts, domid, tx, ok=True, conn=None):
    return {"ts": ts, "kind": "xenstore", "op": "TRANSACTION_END", "domid": domid,
            "conn": conn if conn is not None else 10 + domid, "tx": tx, "commit": True,
            "result": "OK" if ok else "EAGAIN", "service": "hypervisor"}


def transition(ts, role, old, new):
    return {"ts": ts, "kind": "transition", "path": BACK if role == "backend" else FRONT, "role": role,
            "from": old, "to": new, "service": "dom0" if role == "backend" else "domu1"}


# seed 000's initialisation as the hypervisor and both ends saw it.  The
# domains note each transition a little after its write committed.
NEGOTIATION = [
    xs(1.00, 0, f"{BACK}/state", "2", tx=3), commit(1.01, 0, 3), transition(1.05, "backend", "Initialising", "InitWait"),
    xs(1.02, GUEST, f"{FRONT}/ring-ref", "8", tx=4), xs(1.021, GUEST, f"{FRONT}/event-channel", "5", tx=4),
    xs(1.022, GUEST, f"{FRONT}/protocol", "x86_64-abi", tx=4), commit(1.03, GUEST, 4),
    {"ts": 1.031, "kind": "xenstore", "op": "READ", "domid": 0, "conn": 10, "tx": 0, "path": f"{FRONT}/ring-ref",
     "value": "8", "result": "OK"},
    xs(1.04, GUEST, f"{FRONT}/state", "3"), transition(1.06, "frontend", "Initialising", "Initialised"),
    {"ts": 1.041, "kind": "watch", "domid": 0, "conn": 10, "path": f"{FRONT}/state", "token": "t"},
    xs(1.045, 0, f"{BACK}/hotplug-status", "connected"),
    {"ts": 1.07, "kind": "grant", "op": "map", "domid": 0, "granter": GUEST, "ref": 8, "readonly": False,
     "handle": 0, "status": "GNTST_okay"},
    {"ts": 1.075, "kind": "grant", "op": "map", "domid": 0, "granter": GUEST, "ref": 9, "readonly": True,
     "handle": 1, "status": "GNTST_okay"},  # a data page, not the ring: not drawn
    {"ts": 1.08, "kind": "evtchn", "op": "bind_interdomain", "domid": 0, "remote_domid": GUEST, "remote_port": 5,
     "port": 7, "upcall": True},
    {"ts": 1.085, "kind": "evtchn", "op": "send", "domid": 0, "port": 7, "result": "upcall"},
    xs(1.09, 0, f"{BACK}/state", "4"), transition(1.10, "backend", "InitWait", "Connected"),
]


def test_hypervisor_output_is_parsed_and_marked_as_the_hypervisors():
    output = ('{"ident":"12.ab","offset":99,"lost":false}\n'
              '{"ts":2.0,"kind":"evtchn","op":"close","domid":1,"port":4}\n'
              '{"ts":2.1,"kind":"evtc\n')  # cut short
    header, records = trace.hypervisor_records(output)
    assert header["offset"] == 99
    assert records == [{"ts": 2.0, "kind": "evtchn", "op": "close", "domid": 1, "port": 4, "service": "hypervisor"}]
    assert trace.hypervisor_records("") == (None, [])


class Bed:
    """A stand-in testbed: dom0 and the hypervisor run; exec answers as each would."""

    def __init__(self):
        self.hypervisor_reads = []
        self.lost = False

    def status(self):
        return [{"service": "dom0", "state": "running"}, {"service": "hypervisor", "state": "running"}]

    def service_labels(self):  # no labels: the default topology, one Xen host, by service names
        return {"dom0": {}, "hypervisor": {}}

    def exec(self, service, cmd, **kw):
        if service == "hypervisor" and cmd[0] == "sh":  # no transitions file there
            return ExecResult(0, "", "")
        if service == "dom0":
            return ExecResult(0, json.dumps({"ts": 1.5, "path": BACK, "role": "backend", "from": "Initialising",
                                             "to": "InitWait"}) + "\n", "")
        since = cmd[cmd.index("--since") + 1]
        self.hypervisor_reads.append(since)
        header = {"ident": "7.aa", "offset": 40 * len(self.hypervisor_reads), "lost": self.lost}
        body = json.dumps({"ts": 1.0 + len(self.hypervisor_reads), "kind": "grant", "op": "end", "domid": 1})
        return ExecResult(0, json.dumps(header) + "\n" + body + "\n", "")


def test_the_reader_takes_the_hypervisors_records_from_where_it_stopped():
    bed, reader = Bed(), trace.TranscriptReader()
    first = trace.merge(reader.new_records(bed))
    assert [(r["kind"], r["service"]) for r in first] == [("transition", "dom0"), ("grant", "hypervisor")]
    bed.lost = True
    second = reader.new_records(bed)
    assert bed.hypervisor_reads == [":0", "7.aa:40"]
    assert [r.get("event") for r in second if r["kind"] == "trace"] == ["lost"]
    assert trace.transitions_of(second) == []  # the same dom0 line is not read twice


def test_a_write_takes_effect_when_its_transaction_commits():
    aborted = [xs(1.0, 1, "/a", "x", tx=9), commit(1.1, 1, 9, ok=False)]
    effects = trace.write_effects(NEGOTIATION + aborted)
    assert effects[id(NEGOTIATION[3])] == 1.03  # ring-ref at its transaction's commit
    assert effects[id(NEGOTIATION[8])] == 1.04  # outside a transaction: at once
    assert effects[id(aborted[0])] is None
    times = trace.write_times(NEGOTIATION)
    assert trace.state_written_at(NEGOTIATION[2], times) == 1.01  # InitWait: when dom0's write committed
    assert trace.state_written_at(transition(9.0, "backend", "Connected", "Closing"), times) is None


def test_a_devices_picture_has_its_ring_grant_and_port_and_no_reads():
    drawn = device_records(NEGOTIATION, FRONT)
    kinds = [(r["kind"], r.get("op") or r.get("to")) for r in drawn]
    assert kinds == [("transition", "InitWait"), ("xenstore", "WRITE"), ("xenstore", "WRITE"),
                     ("transition", "Initialised"), ("xenstore", "WRITE"), ("grant", "map"),
                     ("evtchn", "bind_interdomain"), ("transition", "Connected")]
    assert [r["path"].rsplit("/", 1)[1] for r in drawn if r["kind"] == "xenstore"] == [
        "ring-ref", "event-channel", "hotplug-status"]
    assert render_mermaid(NEGOTIATION, FRONT).splitlines()[2:] == [
        "    participant H as Hotplug",
        "    participant B as Backend",
        "    participant F as Frontend",
        "    B->>F: InitWait",
        "    Note over F: ring-ref = 8",
        "    Note over F: event-channel = 5",
        "    F->>B: Initialised",
        "    H->>B: hotplug connected",  # the backend's next move answers it
        "    B-->>F: map gref 8",
        "    B-->>F: bind port 5 -> port 7",
        "    Note over B: Connected",
    ]


def test_kinds_leave_out_what_is_not_asked_for():
    assert [s.label for s in steps(NEGOTIATION, FRONT, kinds=("transition",))] == [
        "InitWait", "Initialised", "Connected"]


def test_a_reused_ref_belongs_to_the_device_that_wrote_it_last():
    other = "/local/domain/1/device/vbd/51728"
    records = NEGOTIATION + [
        {"ts": 2.0, "kind": "grant", "op": "unmap", "domid": 0, "granter": GUEST, "ref": 8, "handle": 0,
         "status": "GNTST_okay"},
        xs(3.0, GUEST, f"{other}/ring-ref", "8"),
        {"ts": 3.1, "kind": "grant", "op": "map", "domid": 0, "granter": GUEST, "ref": 8, "handle": 2,
         "status": "GNTST_okay"},
    ]
    assert [r["ts"] for r in device_records(records, FRONT) if r["kind"] == "grant"] == [1.07, 2.0]
    assert [r["ts"] for r in device_records(records, other) if r["kind"] == "grant"] == [3.1]


def test_a_state_write_nobody_noted_is_drawn_with_its_writer():
    records = NEGOTIATION + [xs(2.0, 0, f"{BACK}/state", "5", conn=99), transition(2.1, "frontend", "Initialised",
                                                                                     "Closing")]
    lines = render_mermaid(records, FRONT).splitlines()
    assert "    B->>F: state = Closing (by dom0)" in lines  # the toolstack's, and the frontend answered it
    assert not any("state = InitWait" in line for line in lines)  # noted as a transition: drawn once


def test_the_cli_filters_kinds_and_prints_a_devices_records(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    trace.write(path, trace.merge(NEGOTIATION))
    assert cli.main(["trace", str(path), "--kinds", "transition,grant"]) == 0
    out = capsys.readouterr().out
    assert "map gref 8" in out and "ring-ref" not in out
    assert cli.main(["trace", str(path), "--format", "jsonl", "--kinds", "evtchn"]) == 0
    assert [json.loads(line)["op"] for line in capsys.readouterr().out.splitlines()] == ["bind_interdomain"]
    assert cli.main(["trace", str(path), "--kinds", "bogus"]) == 2
