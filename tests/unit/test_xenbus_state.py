"""The XenBus state table and the transition recorder (pure, no store)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbed.protocols.xenbus_state import (
    REASONS,
    TRANSITIONS,
    Role,
    TransitionRecorder,
    XenbusState as S,
    allowed,
    load_jsonl,
    reason,
    render_mermaid,
    render_text,
    violations,
)

F, B = Role.FRONTEND, Role.BACKEND


def test_values_are_those_of_io_xenbus_h():
    assert [(s.name, int(s)) for s in S] == [
        ("Unknown", 0), ("Initialising", 1), ("InitWait", 2), ("Initialised", 3), ("Connected", 4),
        ("Closing", 5), ("Closed", 6), ("Reconfiguring", 7), ("Reconfigured", 8),
    ]


@pytest.mark.parametrize("role,path", [
    # seed 000 Device Initialisation, blkfront/blkback
    (B, [S.Unknown, S.Initialising, S.InitWait, S.Connected]),
    (F, [S.Unknown, S.Initialising, S.Initialised, S.Connected]),
    # seed 000: netfront skips straight to Connected
    (F, [S.Initialising, S.Connected]),
    # seed 000 Device Closedown, first diagram (backend first)
    (B, [S.Connected, S.Closing, S.Closed]),
    (F, [S.Connected, S.Closing, S.Closed]),
    # seed 000 closedown prose: frontend may go straight to Closed; backend follows
    (F, [S.Connected, S.Closed]),
    (B, [S.Connected, S.Closed]),
    # reconnect after Closed (migration / resume / kexec)
    (F, [S.Closed, S.Initialising, S.Initialised, S.Connected]),
    (B, [S.Closed, S.InitWait, S.Connected]),
    # pciback/pcifront reconfiguration
    (B, [S.Connected, S.Reconfiguring, S.Reconfigured, S.Connected]),
    (F, [S.Connected, S.Reconfiguring, S.Connected]),
])
def test_seed_sequences_are_allowed(role, path):
    for old, new in zip(path, path[1:]):
        assert allowed(role, old, new), (role, old, new)
        assert reason(role, old, new)


@pytest.mark.parametrize("role,old,new", [
    (B, S.Connected, S.InitWait),  # going back without closing
    (F, S.Connected, S.Initialised),
    (F, S.Initialising, S.InitWait),  # InitWait is the backend's
    (B, S.Initialising, S.Initialised),  # Initialised is the frontend's (blk/net)
    (B, S.InitWait, S.Reconfiguring),  # reconfigure only from Connected
    (F, S.Closed, S.Connected),  # reconnect goes through Initialising
    (B, S.Closed, S.Connected),
    (F, S.Initialising, S.Unknown),  # nobody writes Unknown
    (F, S.Reconfigured, S.Connected),  # Reconfigured is the backend's
])
def test_forbidden_transitions(role, old, new):
    assert not allowed(role, old, new)
    assert reason(role, old, new) is None


def test_every_row_cites_its_source():
    assert REASONS and all(("seed 000" in why) or ("io/xenbus.h" in why) for why in REASONS.values())


@pytest.mark.parametrize("role", list(Role))
def test_closed_is_reachable_from_every_state_reachable_from_unknown(role):
    # No dead ends: whatever state an end gets to, it can still close down.
    edges = TRANSITIONS[role]
    reach, todo = {S.Unknown}, [S.Unknown]
    while todo:
        s = todo.pop()
        for a, b in edges:
            if a == s and b not in reach:
                reach.add(b)
                todo.append(b)
    for s in reach - {S.Unknown, S.Closed}:
        seen, todo = {s}, [s]
        while todo:
            x = todo.pop()
            for a, b in edges:
                if a == x and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert S.Closed in seen, s


@given(st.one_of(st.text(max_size=6), st.binary(max_size=6), st.none()))
@settings(max_examples=200)
def test_parse_is_total(text):
    assert isinstance(S.parse(text), S)


@pytest.mark.parametrize("text,state", [("4", S.Connected), ("4\n", S.Connected), ("", S.Unknown),
                                        ("9", S.Unknown), ("-1", S.Unknown), ("0x4", S.Unknown),
                                        (None, S.Unknown), (b"6", S.Closed)])
def test_parse(text, state):
    assert S.parse(text) is state


def test_recorder_flags_forbidden_and_noop_transitions():
    r = TransitionRecorder(clock=iter(range(100)).__next__)
    r.record("/local/domain/0/backend/vbd/1/51712", B, S.Initialising, S.InitWait)
    r.record("/local/domain/0/backend/vbd/1/51712", B, S.InitWait, S.Connected)
    bad = r.record("/local/domain/0/backend/vbd/1/51712", "backend", S.Connected, S.InitWait)
    same = r.record("/local/domain/1/device/vbd/51712", F, 4, 4)
    v = r.check()
    assert [x.transition for x in v] == [bad, same]
    assert "Connected -> InitWait" in str(v[0])
    assert [t.timestamp for t in r] == [0, 1, 2, 3]
    assert len(r.for_path("/local/domain/0/backend/vbd/1/51712", B)) == 3
    assert "(VIOLATION)" in r.render_mermaid()


def test_recorder_jsonl_sink_round_trips(tmp_path):
    sink = tmp_path / "transitions.jsonl"
    a = TransitionRecorder(sink)
    b = TransitionRecorder(str(sink))  # two ends, one file
    a.record("/x", F, S.Initialising, S.Initialised)
    b.record("/y", B, S.Initialising, S.Connected)  # not allowed
    lines = sink.read_text().splitlines()
    assert json.loads(lines[0])["from"] == "Initialising" and json.loads(lines[1])["role"] == "backend"
    loaded = load_jsonl(sink)
    assert [(t.path, t.old, t.new) for t in loaded] == [("/x", S.Initialising, S.Initialised),
                                                        ("/y", S.Initialising, S.Connected)]
    assert [v.transition.path for v in violations(loaded)] == ["/y"]


def test_recorder_callable_sink():
    got = []
    r = TransitionRecorder(got.append)
    t = r.record("/x", F, S.Connected, S.Closed)
    assert got == [t]


def test_rendering_draws_every_transition():
    for role in Role:
        diagram = render_mermaid(role)
        assert diagram.startswith("stateDiagram-v2")
        for old, new in TRANSITIONS[role]:
            assert f"{old.name} --> {new.name}" in diagram
    assert len(render_text().splitlines()) == sum(len(t) for t in TRANSITIONS.values())


def test_docs_draw_the_current_table():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "xenbus.md").read_text()
    for role in Role:
        assert render_mermaid(role) in doc, f"docs/xenbus.md is stale for {role.value}: regenerate it"
    assert render_text() in doc
