"""pytest plugin (entry point `xenbed`): options, markers and hooks only.

Importing it brings nothing up and needs no Docker engine; the testbed starts
when a test first asks for the `testbed` fixture (see fixtures.py).
"""

from __future__ import annotations

import pytest

from .fixtures import TESTBED_KEY, docker_client, testbed, xenbus_invariant  # noqa: F401  (registers the fixtures)

MARKERS = {
    "integration": "needs a Docker engine and the testbed images",
    "chaos": "kills or pauses containers on purpose",
    "slow": "takes more than a few seconds",
}
FAILURE_LOG_LINES = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xenbed", "xenbed testbed")
    group.addoption("--testbed-compose", default="compose/testbed.yml",
                    help="compose file of the testbed (default: compose/testbed.yml)")
    group.addoption("--testbed-project", default=None,
                    help="compose project name of the run (default: a fresh xenbed-<hex> per session)")
    group.addoption("--keep-testbed", action="store_true", default=False,
                    help="leave the testbed running after the session (remove it with `xenbed down -p NAME`)")


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and "testbed" in getattr(item, "fixturenames", ()):
        testbed = item.config.stash.get(TESTBED_KEY, None)
        if testbed is not None:
            _attach_logs(report, testbed)
    return report


def _attach_logs(report: pytest.TestReport, testbed) -> None:
    """One report section per container: the failure explains itself without `docker logs`."""
    try:
        services = testbed.services()
        for service in services:
            report.sections.append((f"xenbed logs: {service} (last {FAILURE_LOG_LINES} lines)",
                                    testbed.logs(service, tail=FAILURE_LOG_LINES)))
    except Exception as error:  # the engine may be what failed; the report must still be written
        report.sections.append(("xenbed logs", f"could not collect logs: {error!r}"))
