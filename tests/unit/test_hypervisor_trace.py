"""hypervisor/trace.py: record shapes, batching, the in-memory bound and its
`dropped` accounting, the file's rotation and reading it back; and what
sharing.py tells the tracer (real page files in a temporary folder)."""

import json
import os

import pytest

from xenbed.hypervisor import trace as ht
from xenbed.hypervisor.sharing import Sharing
from xenbed.protocols import hypercall as hc
from xenbed.protocols.xs_wire import Op, Packet

from .test_sharing import FakeDomain, Link, call


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


# -- record shapes ------------------------------------------------------------------

def xs(op, payload, reply_op=None, reply=b"OK\0", domid=1, tx=0):
    return ht.xenstore_record(5.0, domid, 9, int(op), tx, payload, int(reply_op if reply_op is not None else op),
                              reply)


def test_a_relative_write_is_recorded_under_the_callers_domain_with_a_short_value():
    long_value = b"v" * 100
    record = xs(Op.WRITE, b"device/vbd/51712/ring-ref\0" + long_value, tx=4)
    assert record == {"ts": 5.0, "kind": "xenstore", "op": "WRITE", "domid": 1, "conn": 9, "tx": 4, "result": "OK",
                      "path": "/local/domain/1/device/vbd/51712/ring-ref", "value": "v" * ht.SHORT_VALUE,
                      "value_len": 100}


def test_reads_carry_the_value_read_and_errors_their_name():
    assert xs(Op.READ, b"/local/domain/0/name\0", reply=b"Domain-0")["value"] == "Domain-0"
    failed = xs(Op.READ, b"/nope\0", reply_op=Op.ERROR, reply=b"ENOENT\0")
    assert failed["result"] == "ENOENT" and failed["path"] == "/nope" and "value" not in failed
    assert xs(Op.DIRECTORY, b"/local\0", reply=b"domain\0")["entries"] == 1


def test_transactions_and_watches_say_what_they_did():
    assert xs(Op.TRANSACTION_START, b"\0", reply=b"17\0")["tx"] == 17
    assert xs(Op.TRANSACTION_END, b"T\0", tx=17)["commit"] is True
    assert xs(Op.TRANSACTION_END, b"F\0", tx=17)["commit"] is False
    watch = xs(Op.WATCH, b"backend/vbd\0tok-1\0", domid=0)
    assert (watch["path"], watch["token"]) == ("/local/domain/0/backend/vbd", "tok-1")
    assert xs(Op.WATCH, b"@releaseDomain\0t\0")["path"] == "@releaseDomain"
    assert xs(Op.SET_PERMS, b"/a\0n1\0r0\0")["perms"] == ["n1", "r0"]
    assert xs(Op.INTRODUCE, b"3\0-1\0" + b"5\0", domid=0)["args"] == ["3", "-1", "5"]
    assert xs(99, b"", reply_op=Op.ERROR, reply=b"ENOSYS\0")["op"] == "UNKNOWN(99)"


@pytest.mark.parametrize("op, payload, reply_op, reply", [
    (Op.READ, b"data/x\0", Op.READ, b"caf\xc3\xa9 \"quoted\"\n"),
    (Op.WRITE, b"/local/domain/1/data/x\0\xff\x00binary", Op.WRITE, b"OK\0"),
    (Op.READ, b"/nope\0", Op.ERROR, b"ENOENT\0"),
    (Op.TRANSACTION_START, b"\0", Op.TRANSACTION_START, b"3\0"),
])
def test_the_direct_json_line_is_the_record(op, payload, reply_op, reply):
    args = (1795310792.6869178, 1, 9, int(op), 2, payload, int(reply_op), reply)
    assert json.loads(ht.xenstore_line(*args)) == ht.xenstore_record(*args)


def test_watch_events_and_refusals():
    assert ht.watch_record(1.0, 1, 3, b"device/vbd\0tok\0") == {
        "ts": 1.0, "kind": "watch", "domid": 1, "conn": 3, "path": "/local/domain/1/device/vbd", "token": "tok"}
    refused = ht.refused_record(2.0, hc.Call.GNTTAB_MAP, 0, {"domid": 1, "gref": 8, "readonly": False},
                                "GNTST_bad_gntref")
    assert refused == {"ts": 2.0, "kind": "grant", "op": "map", "domid": 0, "granter": 1, "ref": 8,
                       "readonly": False, "status": "GNTST_bad_gntref"}
    bind = ht.refused_record(3.0, hc.Call.EVTCHN_BIND_INTERDOMAIN, 0, {"remote_dom": 1, "remote_port": 4}, "EINVAL")
    assert bind["remote_domid"] == 1 and bind["error"] == "EINVAL"
    assert ht.refused_record(4.0, hc.Call.MEM_ALLOC, 1, {}, "ENOMEM") is None  # memory calls are not traced


# -- batching and bounds ------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 1.0
        return self.now


def make(**kwargs):
    clock = Clock()
    tracer = ht.Tracer(clock=clock, **kwargs)
    scheduled, written = [], []
    accept = [True]

    def sink(data):
        if accept[0]:
            written.append(data)
        return accept[0]
    tracer.attach(lambda delay, callback: scheduled.append((delay, callback)), sink)
    [(_, flush_start)] = scheduled
    flush_start()  # the `start` record goes out on its timer
    assert lines(written.pop())[0]["event"] == "start"
    scheduled.clear()
    clock.now = 100.0
    return tracer, scheduled, written, accept


def test_the_first_record_schedules_a_flush_and_a_full_batch_flushes_at_once():
    tracer, scheduled, written, _ = make(flush_interval=0.1, batch_records=3)
    tracer.evtchn("close", 1, port=4)
    tracer.evtchn("close", 1, port=5)
    assert [delay for delay, _ in scheduled] == [0.1]  # one timer for the batch, not one per record
    tracer.evtchn("close", 1, port=6)
    assert [delay for delay, _ in scheduled] == [0.1, 0]
    scheduled[-1][1]()
    assert [r["port"] for r in lines(written[0])] == [4, 5, 6]
    assert [r["ts"] for r in lines(written[0])] == [101.0, 102.0, 103.0]
    assert tracer.pending == [] and tracer.written == 1 + 3  # the start record, then these


def test_a_scheduled_flush_takes_one_batch_and_schedules_the_rest():
    tracer, scheduled, written, _ = make(batch_records=2, max_pending=100)
    tracer._flush_due = 0  # pretend a flush is already coming, so adding schedules nothing
    for port in range(5):
        tracer.evtchn("close", 1, port=port)
    tracer._scheduled_flush()
    assert [r["port"] for r in lines(written[0])] == [0, 1] and len(tracer.pending) == 3
    assert scheduled[-1][0] == 0  # a full batch still waits: at once


def test_beyond_max_pending_records_are_counted_and_the_stream_says_so():
    tracer, _, written, _ = make(max_pending=2)
    for port in range(5):
        tracer.evtchn("close", 1, port=port)
    assert tracer.dropped == 3
    tracer.flush()
    got = lines(written[0])
    assert got[0] == {"ts": 103.0, "kind": "trace", "event": "dropped", "count": 3, "total": 3}
    assert [r["port"] for r in got[1:]] == [0, 1]
    tracer.evtchn("close", 1, port=9)
    tracer.flush()
    assert [r.get("event") for r in lines(written[1])] == [None]  # said once, not again


def test_a_batch_the_sink_refuses_is_counted_as_dropped():
    tracer, _, written, accept = make()
    tracer.evtchn("close", 1, port=1)
    tracer.evtchn("close", 1, port=2)
    accept[0] = False
    assert tracer.flush() == 0 and tracer.dropped == 2
    accept[0] = True
    tracer.evtchn("close", 1, port=3)
    tracer.flush()
    got = lines(written[0])
    assert (got[0]["event"], got[0]["count"]) == ("dropped", 2) and got[1]["port"] == 3


def test_off_records_nothing_and_switching_is_in_the_stream():
    tracer, _, written, _ = make()
    tracer.set_enabled(False)
    tracer.evtchn("close", 1, port=1)
    tracer.xenstore(1, 2, Packet(Op.READ, 1, 0, b"x\0"), Packet(Op.READ, 1, 0, b"v"))
    tracer.set_enabled(True)
    tracer.evtchn("close", 1, port=2)
    tracer.flush()
    assert [(r["kind"], r.get("event"), r.get("port")) for r in lines(written[0])] == [
        ("trace", "off", None), ("trace", "on", None), ("evtchn", None, 2)]
    assert not ht.Tracer.disabled().enabled


def test_a_record_that_cannot_be_formatted_costs_only_itself():
    tracer, _, written, _ = make()
    tracer.add(lambda ts: 1 / 0, ())
    tracer.evtchn("close", 1, port=1)
    tracer.flush()
    assert [r.get("event") for r in lines(written[0])] == ["unformattable", None]


def test_the_environment_switch():
    assert ht.enabled_by_environment({}) and ht.enabled_by_environment({"XENBED_TRACE": "1"})
    assert not ht.enabled_by_environment({"XENBED_TRACE": "0"})
    assert not ht.enabled_by_environment({"XENBED_TRACE": "off"})


# -- the file: rotation and reading back ----------------------------------------------

def test_the_file_rotates_and_a_reader_gets_every_line_once(tmp_path):
    path = str(tmp_path / "trace.jsonl")
    sink = ht.FileSink(path, max_bytes=700, clock=lambda: 7.0)  # one time for all: generations differ anyway
    tracer = ht.Tracer(batch_records=10**6)
    tracer.attach(lambda delay, callback: None, sink)
    position, seen = ("", 0), []

    def read():
        nonlocal position
        header, data = ht.read_since(path, *position)
        assert not header["lost"]
        position = (header["ident"], header["offset"])
        seen.extend(json.loads(line) for line in data.decode().splitlines())

    for port in range(30):
        tracer.evtchn("close", 1, port=port)
        if port % 3 == 2:
            tracer.flush()
            sink.close() if port == 29 else _wait(sink)
            if port % 6 == 5:
                read()
    read()
    assert os.path.exists(path + ".1") and os.path.getsize(path) <= 700
    assert [r["port"] for r in seen if r["kind"] == "evtchn"] == list(range(30))
    assert any(r.get("event") == "rotated" for r in seen)
    with open(path) as f:
        assert json.loads(f.readline())["event"] == "rotated"  # each generation says where it comes from


def test_a_generation_that_went_by_unread_is_said(tmp_path):
    path = str(tmp_path / "trace.jsonl")
    sink = ht.FileSink(path, max_bytes=100)
    sink(b'{"ts":1.0,"kind":"trace","event":"start"}\n')
    _wait(sink)
    header, _ = ht.read_since(path, "", 0)
    for n in range(4):  # rotates at every batch: the file read before is gone
        sink(b'{"ts":%d.0,"kind":"evtchn","padding":"%s"}\n' % (n + 2, b"x" * 60))
    sink.close()
    again, data = ht.read_since(path, header["ident"], header["offset"])
    assert again["lost"] and data


def test_a_batch_cut_mid_line_is_read_up_to_its_last_whole_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b'{"ts":1}\n{"ts":2}\n{"ts":')
    header, data = ht.read_since(str(path), "", 0)
    assert data == b'{"ts":1}\n{"ts":2}\n' and header["offset"] == len(data)
    with open(path, "ab") as f:
        f.write(b'3}\n')
    _, rest = ht.read_since(str(path), header["ident"], header["offset"])
    assert rest == b'{"ts":3}\n'


def _wait(sink):
    for future in list(sink._inflight):
        future.result(5)


# -- what sharing.py tells the tracer ----------------------------------------------------

@pytest.fixture
def traced(tmp_path):
    sharing = Sharing(str(tmp_path))
    sharing.deliver = lambda link, frame: link.upcalls.append(frame.body)
    tracer = ht.Tracer()
    written = []
    tracer.attach(lambda delay, callback: None, lambda data: written.append(data) or True)
    sharing.tracer = tracer
    for domid in (0, 1):
        sharing.add_domain(domid, 4, privileged=domid == 0)
    links = {d: Link(FakeDomain(d)) for d in (0, 1)}

    def records():
        tracer.flush()
        return [r for data in written for r in lines(data) if r["kind"] != "trace"]
    return sharing, links, records


def test_a_ring_handshake_is_traced_as_it_happened(traced):
    sharing, links, records = traced
    gfn = call(sharing, links[1], hc.Call.MEM_ALLOC, count=1).body["gfns"][0]
    gref = call(sharing, links[1], hc.Call.GNTTAB_GRANT, domid=0, gfn=gfn)["gref"]
    port = call(sharing, links[1], hc.Call.EVTCHN_ALLOC_UNBOUND, remote_dom=0)["port"]
    mapped = call(sharing, links[0], hc.Call.GNTTAB_MAP, domid=1, gref=gref)
    for fd in mapped.fds:
        os.close(fd)
    bound = call(sharing, links[0], hc.Call.EVTCHN_BIND_INTERDOMAIN, remote_dom=1, remote_port=port)["port"]
    call(sharing, links[1], hc.Call.EVTCHN_SEND, port=port)   # the bound port starts pending: coalesced
    call(sharing, links[0], hc.Call.EVTCHN_CLEAR, port=bound)  # the send merged into the pending: re-raised
    call(sharing, links[0], hc.Call.EVTCHN_CLEAR, port=bound)
    call(sharing, links[1], hc.Call.EVTCHN_SEND, port=port)
    call(sharing, links[1], hc.Call.EVTCHN_SEND, port=port)   # still pending: coalesced
    call(sharing, links[0], hc.Call.GNTTAB_UNMAP, handle=mapped.body["handle"])
    call(sharing, links[0], hc.Call.EVTCHN_CLOSE, port=bound)
    call(sharing, links[1], hc.Call.EVTCHN_SEND, port=port)   # unbound now: dropped
    call(sharing, links[1], hc.Call.GNTTAB_END, gref=gref)
    got = [(r["kind"], r["op"], r["domid"]) for r in records()]
    assert got == [("grant", "grant", 1), ("evtchn", "alloc_unbound", 1), ("grant", "map", 0),
                   ("evtchn", "bind_interdomain", 0), ("evtchn", "send", 1), ("evtchn", "send", 1),
                   ("evtchn", "send", 1), ("grant", "unmap", 0), ("evtchn", "close", 0), ("evtchn", "send", 1),
                   ("grant", "end", 1)]
    by_op = records()
    grant, _, mapping, bind, *sends = by_op[:7]
    assert (grant["to"], grant["ref"], grant["readonly"], grant["status"]) == (0, gref, False, "GNTST_okay")
    assert (mapping["granter"], mapping["ref"], mapping["status"]) == (1, gref, "GNTST_okay")
    assert (bind["remote_domid"], bind["remote_port"], bind["port"], bind["upcall"]) == (1, port, bound, True)
    assert [s["result"] for s in sends] == ["coalesced", "upcall", "coalesced"]
    assert (sends[1]["remote_domid"], sends[1]["remote_port"]) == (0, bound)
    unmap = by_op[7]
    assert (unmap["granter"], unmap["ref"], unmap["handle"]) == (1, gref, mapped.body["handle"])
    assert by_op[9]["result"] == "dropped"


def test_what_a_closing_link_undoes_is_traced_with_why(traced):
    sharing, links, records = traced
    gfn = call(sharing, links[1], hc.Call.MEM_ALLOC, count=1).body["gfns"][0]
    gref = call(sharing, links[1], hc.Call.GNTTAB_GRANT, domid=0, gfn=gfn)["gref"]
    for fd in call(sharing, links[0], hc.Call.GNTTAB_MAP, domid=1, gref=gref).fds:
        os.close(fd)
    sharing.release_link(0, links[0].resources)
    undone = [r for r in records() if r.get("why") == "link closed"]
    assert [(r["op"], r["granter"], r["ref"], r["status"]) for r in undone] == [("unmap", 1, gref, "GNTST_okay")]
