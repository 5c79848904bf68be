"""Event channel core: step tables, one rule per step, plus a property test.

Domains in every table: 0 (dom0, privileged), 1 (frontend), 2 (backend),
3 (a bystander).  Each step is (label, call, expected): expected is the
returned value (a port, a Notify, None, a dict subset) or an errno name when
the call must raise EvtchnError.  A step's value is kept under its label.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbed.hypervisor.evtchn import (
    DOMID_SELF, Bound, EventChannels, EvtchnError, EvtchnUsageError, Notify,
)


def fresh(**kw) -> EventChannels:
    e = EventChannels(**kw)
    for d in (0, 1, 2, 3):
        e.add_domain(d)
    return e


def run(e: EventChannels, steps) -> dict:
    seen: dict = {}
    for label, call, expected in steps:
        try:
            value = call(e, seen)
        except EvtchnError as err:
            value = err.code
        seen[label] = value
        if isinstance(expected, dict):
            assert isinstance(value, dict) and {k: value.get(k) for k in expected} == expected, (label, value)
        else:
            assert value == expected, f"step {label!r}: got {value!r}, want {expected!r}"
        e.check_invariants()
    return seen


CONNECT = [
    # the frontend offers a port to the backend; port 0 is never allocated
    ("offer", lambda e, s: e.alloc_unbound(1, 2), 1),
    ("offered", lambda e, s: e.status(1, 1), {"status": "unbound", "remote_dom": 2, "pending": False}),
    # send on an unbound port is dropped silently (no error, no upcall)
    ("send-unbound", lambda e, s: e.send(1, 1), None),
    # a port offered to someone else cannot be bound
    ("bind-wrong-dom", lambda e, s: e.bind_interdomain(3, 1, 1), "EINVAL"),
    # nor can a closed port, or one out of range
    ("bind-closed", lambda e, s: e.bind_interdomain(2, 1, 7), "EINVAL"),
    ("bind-range", lambda e, s: e.bind_interdomain(2, 1, 5000), "EINVAL"),
    ("bind-no-dom", lambda e, s: e.bind_interdomain(2, 42, 1), "ESRCH"),
    # the backend binds; its new port starts pending, so it gets an upcall at once
    ("bind", lambda e, s: e.bind_interdomain(2, 1, 1), Bound(1, Notify(2, 1))),
    ("backend-pending", lambda e, s: e.status(2, 1),
     {"status": "interdomain", "remote_dom": 1, "remote_port": 1, "pending": True}),
    ("frontend-bound", lambda e, s: e.status(1, 1),
     {"status": "interdomain", "remote_dom": 2, "remote_port": 1, "pending": False}),
    # an interdomain port cannot be bound a second time
    ("bind-twice", lambda e, s: e.bind_interdomain(2, 1, 1), "EINVAL"),
    # frontend notifies: the backend's port is already pending, so the notification coalesces
    ("coalesced", lambda e, s: e.send(1, 1), None),
    # the backend's clear arrives after that coalesced send: it is not lost,
    # the port stays pending and upcalls again (the clear is a message)
    ("consume-merged", lambda e, s: e.clear_pending(2, 1), Notify(2, 1)),
    # the backend consumes the event; the next send upcalls again
    ("consume", lambda e, s: e.clear_pending(2, 1), None),
    ("send", lambda e, s: e.send(1, 1), Notify(2, 1)),
    ("send-again", lambda e, s: e.send(1, 1), None),
    # the other direction works the same way
    ("reply", lambda e, s: e.send(2, 1), Notify(1, 1)),
    # a masked port records the event but suppresses the upcall...
    ("mask", lambda e, s: e.mask(1, 1), None),
    ("fe-consume", lambda e, s: e.clear_pending(1, 1), None),
    ("masked-send", lambda e, s: e.send(2, 1), None),
    ("masked-pending", lambda e, s: e.status(1, 1), {"pending": True, "masked": True}),
    # ... and unmasking delivers it
    ("unmask", lambda e, s: e.unmask(1, 1), Notify(1, 1)),
    # unmasking an unmasked port delivers nothing new (the upcall went out already)
    ("unmask-again", lambda e, s: e.unmask(1, 1), None),
    # unmask with nothing pending delivers nothing
    ("mask2", lambda e, s: e.mask(1, 1), None),
    ("consume2", lambda e, s: e.clear_pending(1, 1), None),
    ("unmask-idle", lambda e, s: e.unmask(1, 1), None),
]


CLOSE = CONNECT[:8] + [
    # the frontend closes: the backend's port becomes unbound, offered back to the frontend
    ("close", lambda e, s: e.close(1, 1), None),
    ("peer-unbound", lambda e, s: e.status(2, 1), {"status": "unbound", "remote_dom": 1}),
    ("closed", lambda e, s: e.status(1, 1), {"status": "closed", "pending": False}),
    # send on the closed port is an error; on the now-unbound peer it is dropped
    ("send-closed", lambda e, s: e.send(1, 1), "EINVAL"),
    ("send-peer", lambda e, s: e.send(2, 1), None),
    # closing twice, or port 0, is EINVAL
    ("close-again", lambda e, s: e.close(1, 1), "EINVAL"),
    ("close-0", lambda e, s: e.close(1, 0), "EINVAL"),
    ("send-0", lambda e, s: e.send(1, 0), "EINVAL"),
    # the frontend can re-bind the backend's port (reconnect), getting the lowest free port
    ("rebind", lambda e, s: e.bind_interdomain(1, 2, 1), Bound(1, Notify(1, 1))),
    ("back-bound", lambda e, s: e.status(2, 1), {"status": "interdomain", "remote_dom": 1, "remote_port": 1}),
    # closing an unbound port just frees it
    ("offer2", lambda e, s: e.alloc_unbound(2, 3), 2),
    ("close-unbound", lambda e, s: e.close(2, 2), None),
    ("ports", lambda e, s: e.ports_of(2), [1]),
]


PRIVILEGE = [
    # a guest allocates only for itself (DOMID_SELF or its own id)
    ("self", lambda e, s: e.alloc_unbound(DOMID_SELF, 2, caller=1), 1),
    ("other", lambda e, s: e.alloc_unbound(2, 1, caller=1), "EPERM"),
    # dom0 may allocate on behalf of another domain
    ("dom0-for-1", lambda e, s: e.alloc_unbound(1, 2, caller=0), 2),
    # remote DOMID_SELF means the caller (dom0 here), not the port's owner
    ("remote-self", lambda e, s: e.alloc_unbound(1, DOMID_SELF, caller=0), 3),
    ("remote-self-status", lambda e, s: e.status(1, 3), {"status": "unbound", "remote_dom": 0}),
    # unknown target domain
    ("no-dom", lambda e, s: e.alloc_unbound(42, 1, caller=0), "ESRCH"),
    # status of another's port needs privilege too
    ("peek", lambda e, s: e.status(1, 1, caller=2), "EPERM"),
    ("dom0-peek", lambda e, s: e.status(1, 1, caller=0), {"status": "unbound", "remote_dom": 2}),
    ("status-range", lambda e, s: e.status(1, 1024), "EINVAL"),
    # loopback: a domain may bind its own offered port
    ("loop-offer", lambda e, s: e.alloc_unbound(3, DOMID_SELF), 1),
    ("loop-bind", lambda e, s: e.bind_interdomain(3, DOMID_SELF, 1), Bound(2, Notify(3, 2))),
    ("loop-send", lambda e, s: e.send(3, 2), Notify(3, 1)),
]


DYING = CONNECT[:8] + [
    ("offer-to-3", lambda e, s: e.alloc_unbound(2, 3), 2),
    ("3-binds", lambda e, s: e.bind_interdomain(3, 2, 2), Bound(1, Notify(3, 1))),
    # the backend dies: all its ports close, the peers' ports go unbound (offered to it), no upcall
    ("dying", lambda e, s: e.domain_dying(2), [(1, 1), (3, 1)]),
    ("fe-unbound", lambda e, s: e.status(1, 1), {"status": "unbound", "remote_dom": 2}),
    ("no-ports", lambda e, s: e.ports_of(2), []),
    # sends from the peers are now dropped
    ("fe-send", lambda e, s: e.send(1, 1), None),
    # the dying domain allocates nothing more
    ("alloc-dying", lambda e, s: e.alloc_unbound(2, 1), "EINVAL"),
    ("bind-dying", lambda e, s: e.bind_interdomain(2, 1, 1), "EINVAL"),
    # the peers' ports dangle until they close them: the leak audit says so
    ("leaks", lambda e, s: [(d, p) for d, p, _ in e.leaks()], [(1, 1), (3, 1)]),
    ("fe-close", lambda e, s: e.close(1, 1), None),
    ("3-close", lambda e, s: e.close(3, 1), None),
    ("no-leaks", lambda e, s: e.leaks(), []),
    ("destroyed", lambda e, s: e.domain_destroyed(2), None),
    ("gone", lambda e, s: e.bind_interdomain(1, 2, 1), "ESRCH"),
]


@pytest.mark.parametrize("steps", [CONNECT, CLOSE, PRIVILEGE, DYING], ids=["connect", "close", "privilege", "dying"])
def test_rules(steps):
    run(fresh(), steps)


def test_port_limit():
    e = fresh(max_ports=4)
    # ports 1..3 are usable (0 reserved); the fourth allocation is ENOSPC
    assert [e.alloc_unbound(1, 2) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(EvtchnError) as err:
        e.alloc_unbound(1, 2)
    assert err.value.code == "ENOSPC"
    # binding needs a free local port too
    e.alloc_unbound(2, 1)
    with pytest.raises(EvtchnError) as err:
        e.bind_interdomain(1, 2, 1)
    assert err.value.code == "ENOSPC"
    # the lowest freed port is reused
    e.close(1, 2)
    assert e.alloc_unbound(1, 2) == 2


def test_default_limit_is_1023_usable_ports():
    e = fresh()
    ports = [e.alloc_unbound(1, 2) for _ in range(1023)]
    assert ports == list(range(1, 1024))
    with pytest.raises(EvtchnError):
        e.alloc_unbound(1, 2)


def test_pending_survives_close_of_peer_but_not_own_close():
    e = fresh()
    e.alloc_unbound(1, 2)
    e.bind_interdomain(2, 1, 1)
    assert e.send(2, 1) == Notify(1, 1)
    # the frontend's pending bit stays when the backend closes (Xen only clears the closer's)
    e.close(2, 1)
    assert e.status(1, 1)["pending"] is True
    # a closed port's pending bit is cleared, so a re-allocated port starts clean
    e.close(1, 1)
    assert e.alloc_unbound(1, 2) == 1 and e.status(1, 1)["pending"] is False


def test_custom_privilege_callback():
    # a toolstack in a driver domain: dom 2 may act for dom 1
    e = fresh(is_privileged=lambda caller, target: (caller, target) == (2, 1))
    assert e.alloc_unbound(1, 3, caller=2) == 1
    with pytest.raises(EvtchnError):
        e.alloc_unbound(1, 3, caller=0)


def test_programming_errors_raise():
    e = fresh()
    with pytest.raises(EvtchnUsageError):
        e.send(42, 1)  # unknown calling domain
    with pytest.raises(EvtchnUsageError):
        e.add_domain(1)
    with pytest.raises(EvtchnUsageError):
        e.send(1, "1")
    with pytest.raises(EvtchnUsageError):
        e.domain_destroyed(1)  # not dying first


# -- property: any sequence of guest operations -------------------------------------
DOMS = (0, 1, 2)
PORT = st.one_of(st.integers(1, 3), st.sampled_from([-1, 0, 5, 6]))  # mostly ports in use
ALLOC = st.tuples(st.just("alloc"), st.sampled_from(DOMS), st.sampled_from(DOMS), st.sampled_from(DOMS))
ops = st.one_of(
    ALLOC, ALLOC,
    st.tuples(st.just("bind"), st.sampled_from(DOMS), st.sampled_from(DOMS + (9,)), PORT),
    st.tuples(st.just("send"), st.sampled_from(DOMS), PORT),
    st.tuples(st.just("close"), st.sampled_from(DOMS), PORT),
    st.tuples(st.just("mask"), st.sampled_from(DOMS), PORT),
    st.tuples(st.just("unmask"), st.sampled_from(DOMS), PORT),
    st.tuples(st.just("clear"), st.sampled_from(DOMS), PORT),
    st.tuples(st.just("die"), st.sampled_from(DOMS)),
    # guided: bind a port that is offered, or act on a bound one, so successes are common too
    st.tuples(st.just("bind-offered"), st.integers(0, 7)),
    st.tuples(st.just("bind-offered"), st.integers(0, 7)),
    st.tuples(st.sampled_from(["send-open", "close-open", "mask-open", "unmask-open"]), st.integers(0, 7)),
)
ERRNOS = {"EINVAL", "ENOSPC", "ESRCH", "EPERM"}


@settings(max_examples=40, deadline=None)
@given(st.lists(ops, min_size=10, max_size=40))
def test_random_operations_keep_invariants(sequence):
    e = EventChannels(max_ports=6)
    for d in DOMS:
        e.add_domain(d)
    dying: set[int] = set()
    for op in sequence:
        if op[0].endswith("-offered") or op[0].endswith("-open"):
            ports = [(d, p, st_) for d, p, st_ in e.open_ports()
                     if op[0].endswith("-open") or st_["status"] == "unbound"]
            if not ports:
                continue
            d, p, st_ = ports[op[1] % len(ports)]
            if op[0] == "bind-offered":
                op = ("bind", st_["remote_dom"] if st_["remote_dom"] in DOMS else 0, d, p)
            else:
                op = (op[0].split("-")[0], d, p)
        kind, dom = op[0], op[1]
        if dom in dying and kind not in ("alloc", "bind"):
            continue  # a dead domain issues no calls; alloc/bind are checked to refuse
        try:
            if kind == "alloc":
                result = e.alloc_unbound(op[2], op[3], caller=dom)
                assert isinstance(result, int) and 1 <= result < 6
            elif kind == "bind":
                result = e.bind_interdomain(dom, op[2], op[3])
                assert result.notify in (None, Notify(dom, result.port))
            elif kind == "send":
                result = e.send(dom, op[2])
                assert result is None or isinstance(result, Notify)
            elif kind == "close":
                e.close(dom, op[2])
            elif kind == "mask":
                e.mask(dom, op[2])
            elif kind == "unmask":
                result = e.unmask(dom, op[2])
                assert result in (None, Notify(dom, op[2]))
            elif kind == "clear":
                e.clear_pending(dom, op[2])
            else:
                e.domain_dying(dom)
                dying.add(dom)
            if kind in ("alloc", "bind") and dom in dying:
                assert kind == "alloc" and dom != op[2], "a dying domain got a new port"
        except EvtchnError as err:
            assert err.code in ERRNOS
        e.check_invariants()
    # every open port can be closed; then nothing is left
    for d, p, _ in e.open_ports():
        if e.status(d, p)["status"] != "closed":  # may have closed with its loopback peer
            e.close(d, p)
    assert e.open_ports() == []


def test_a_send_overtaking_the_guests_clear_is_not_lost():
    # The clear is a message: a peer's send coalesced into the event being
    # cleared must raise a new upcall when the clear arrives.
    e = fresh()
    a = e.alloc_unbound(1, 2)
    bound = e.bind_interdomain(2, 1, a)
    b = bound.port
    assert e.clear_pending(2, b) is None          # the bind's initial event, consumed
    assert e.send(1, a) == Notify(2, b)           # upcall delivered...
    assert e.send(1, a) is None                   # ...a second send coalesces into it
    assert e.clear_pending(2, b) == Notify(2, b)  # the clear re-raises: still pending
    assert e.status(2, b)["pending"] is True
    assert e.clear_pending(2, b) is None          # nothing merged since: really cleared
    assert e.status(2, b)["pending"] is False
