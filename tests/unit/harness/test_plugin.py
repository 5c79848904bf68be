"""The pytest plugin itself, through pytester: options, markers, laziness, failure reports."""

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def no_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")


def test_options_and_markers(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["xenbed testbed:", "*--testbed-compose=*", "*--testbed-project=*", "*--keep-testbed*"])
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.integration:*", "@pytest.mark.chaos:*", "@pytest.mark.slow:*"])


def test_nothing_comes_up_unless_asked(pytester, no_engine):
    pytester.makepyfile("def test_plain():\n    assert True\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_missing_engine_fails_and_says_what_to_run(pytester, no_engine):
    pytester.makepyfile("def test_needs_docker(docker_client):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no Docker engine reachable*scripts/ensure-docker.sh*make test*"])


def test_failed_test_gets_every_containers_logs(pytester):
    pytester.makeconftest("""
        import pytest
        from xenbed.harness.fixtures import TESTBED_KEY

        class FakeTestbed:
            def services(self):
                return ["hypervisor", "dom0"]
            def logs(self, service, tail):
                return f"{service} last words\\n"

        @pytest.fixture
        def testbed(request):  # shadows the real one: no engine needed
            request.config.stash[TESTBED_KEY] = FakeTestbed()
            return request.config.stash[TESTBED_KEY]
    """)
    pytester.makepyfile("""
        def test_fails(testbed):
            assert False, "ring stalled"
        def test_passes(testbed):
            pass
    """)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*xenbed logs: hypervisor (last 100 lines)*", "hypervisor last words",
                                 "*xenbed logs: dom0*", "dom0 last words"])
    assert result.stdout.str().count("last words") == 2  # only the failing test carries them


def test_failed_test_with_a_block_workload_carries_the_checkers_report(pytester):
    pytester.makeconftest("""
        import pytest
        from xenbed.harness import checker
        from xenbed.harness.fixtures import TESTBED_KEY, WORKLOAD
        from xenbed.protocols import workload as fmt

        class FakeTestbed:
            def services(self):
                return []

        class FakeWorkload:
            name, domain, vdev = "w1", "domu1", "xvda"
            def __init__(self):
                run = {"type": "run", "run": "00" * 8, "block_size": 512, "first_slot": 0, "slot_count": 1}
                history = [run, {"index": 0, "type": "invoke", "f": "write", "process": 0, "seq": 1, "slot": 0},
                           {"index": 1, "type": "ok", "f": "write", "process": 0, "seq": 1, "slot": 0}]
                self.last_result = checker.check(history, bytes(512))

        @pytest.fixture
        def testbed(request):
            request.config.stash[TESTBED_KEY] = FakeTestbed()
            return request.config.stash[TESTBED_KEY]

        @pytest.fixture
        def block_workload(request, testbed):  # shadows the real one: no guest needed
            request.node.stash[WORKLOAD] = FakeWorkload()
            return request.node.stash[WORKLOAD]
    """)
    pytester.makepyfile("""
        def test_loses_a_write(testbed, block_workload):
            assert block_workload.last_result.ok, "lost"
    """)
    result = pytester.runpytest("-rA", "--junitxml=junit.xml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*xenbed workload w1 on domu1:xvda*",
                                 "xenbed_workload_history: *test_loses_a_write.workload.jsonl",
                                 "xenbed_nothing_lost_report: *test_loses_a_write.nothing-lost.txt",
                                 "nothing lost: NO*", "lost-write: acknowledged write w0:1*"])
    assert 'name="xenbed_nothing_lost_report"' in (pytester.path / "junit.xml").read_text()
