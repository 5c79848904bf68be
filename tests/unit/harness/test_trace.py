"""trace.py: a test's trace file, and the plugin writing and linking it (pytester, no Docker)."""

import json
import xml.etree.ElementTree as ET

from xenbed.harness import trace
from xenbed.harness.chaos import FAIL, History

pytest_plugins = ["pytester"]


def test_test_ids_become_file_names():
    assert trace.sanitize("tests/x/test_a.py::test_b[1-dom0]") == "tests.x.test_a.py..test_b-1-dom0"
    assert trace.trace_path("t.py::t", "out/traces").as_posix() == "out/traces/t.py..t.jsonl"


def test_transitions_and_chaos_merge_by_time(tmp_path):
    lines = ['{"ts": 2.0, "path": "/p", "role": "backend", "from": "InitWait", "to": "Connected"}',
             '{"ts": 1.0, "path": "/p", "role": "backend", "from": "Initialising", "to": "InitWait"}',
             '{"ts": 3.0, "path": "/p", "ro']  # cut short by a kill
    history = History(clock=iter([1.5, 1.6]).__next__)
    history.run("pause", "domu2", {}, lambda: None)
    records = trace.merge(trace.transition_records(lines, "dom0"), trace.chaos_records(history))
    assert [(r["ts"], r["kind"]) for r in records] == [(1.0, "transition"), (1.5, "chaos"), (1.6, "chaos"),
                                                       (2.0, "transition")]
    assert records[0]["service"] == "dom0" and records[1]["type"] == "invoke" and records[2]["type"] == "ok"
    path = trace.write(tmp_path / "a" / "t.jsonl", records)
    assert trace.read(path) == records
    assert [t.new.name for t in trace.transitions_of(records)] == ["InitWait", "Connected"]


def test_a_refused_chaos_operation_is_a_fail_and_still_raises():
    from docker.errors import APIError
    history = History()

    def refuse():
        raise APIError("container is not running")
    try:
        history.run("pause", "dom0", {}, refuse)
    except APIError:
        pass
    assert [e["type"] for e in history] == ["invoke", FAIL]


FAKE_CONFTEST = """
import json, pytest
from xenbed.harness.fixtures import TESTBED_KEY
from xenbed.harness.testbed import Testbed
from xenbed.harness.execs import ExecResult

LINES = [json.dumps({"ts": 1.0 + i, "path": p, "role": r, "from": a, "to": b}) for i, (p, r, a, b) in enumerate([
    ("/local/domain/0/backend/vbd/1/51712", "backend", "Initialising", "InitWait"),
    ("/local/domain/1/device/vbd/51712", "frontend", "Initialising", "Initialised"),
    ("/local/domain/0/backend/vbd/1/51712", "backend", "InitWait", "Connected")])]

class FakeBed(Testbed):
    def audit(self):  # a stand-in hypervisor with nothing left behind
        return {}

    def status(self):
        return [{"service": "dom0", "state": "running"}]
    def exec(self, service, cmd, **kw):
        return ExecResult(0, "\\n".join(LINES) + "\\n", "")
    def services(self):
        return ["dom0"]
    def logs(self, service=None, tail=200):
        return "log line\\n"

@pytest.fixture(scope="session")
def testbed(request):
    bed = FakeBed("fake")
    request.config.stash[TESTBED_KEY] = bed
    return bed
"""


def test_every_testbed_test_writes_its_trace_and_a_failing_one_links_its_diagram(pytester):
    pytester.makeconftest(FAKE_CONFTEST)
    pytester.makepyfile("""
        def test_passes(testbed):
            testbed.history.record("invoke", "pause", "domu2")
        def test_fails(testbed):
            assert False
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*xenbed trace*", "xenbed_trace: *test_fails.jsonl",
                                 "xenbed_diagram: *test_fails.svg"])
    traces = pytester.path / "out" / "traces"
    passed = trace.read(traces / "test_every_testbed_test_writes_its_trace_and_a_failing_one_links_its_diagram.py"
                        "..test_passes.jsonl")
    assert [r["kind"] for r in passed] == ["transition"] * 3 + ["chaos"]  # the boot's, then the test's pause
    failed = sorted(p.name for p in traces.iterdir() if "test_fails" in p.name)
    assert [name.rsplit(".", 1)[1] for name in failed] == ["jsonl", "md", "svg"]
    assert not any(p.name.endswith(".svg") and "test_passes" in p.name for p in traces.iterdir())
    ET.parse(traces / [n for n in failed if n.endswith(".svg")][0])
    junit = ET.parse(pytester.path / "junit.xml")
    props = {(p.get("name"), p.get("value").rsplit("/", 1)[-1])
             for case in junit.iter("testcase") if case.get("name") == "test_fails" for p in case.iter("property")}
    assert {name for name, _ in props} == {"xenbed_trace", "xenbed_diagram", "xenbed_diagram_mermaid"}
    assert all("test_fails" in value for _, value in props)


def test_a_test_failing_after_its_trace_was_written_still_gets_its_diagrams(pytester):
    # e.g. the session's leak audit failing at the last test's teardown
    pytester.makeconftest(FAKE_CONFTEST.replace("    return bed\n", "    yield bed\n    raise RuntimeError('leaked')\n"))
    pytester.makepyfile("def test_last(testbed):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    names = sorted(p.name.rsplit(".", 1)[1] for p in (pytester.path / "out" / "traces").iterdir())
    assert names == ["jsonl", "md", "svg"]
