"""pytest plugin (entry point `xenbed`): options, markers and hooks only.

Importing it brings nothing up and needs no Docker engine; the testbed starts
when a test first asks for the `testbed` fixture (see fixtures.py).
"""

from __future__ import annotations

import pytest

from . import diagram, trace
from .fixtures import (FAILED, TESTBED_KEY, WORKLOAD, block_workload, docker_client, domains,  # noqa: F401
                       leak_audit, new_domain, private_testbed, shells, testbed, trace_dir, xen,
                       xenbus_invariant)  # (importing them registers the fixtures)

MARKERS = {
    "integration": "needs a Docker engine and the testbed images",
    "chaos": "kills or pauses containers on purpose",
    "slow": "takes more than a few seconds",
    "soak": "long chaos schedules and soaks: left out of `make test`, run by `make chaos`",
    "block_workload": "options of the block_workload fixture: block_workload(domain=, vdev=, workers=, rate=, ...)",
    "testbed_compose": "testbed_compose(FILE): the compose file of the module's private_testbed (e.g. compose/two-hosts.yml)",
}
FAILURE_LOG_LINES = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xenbed", "xenbed testbed")
    group.addoption("--testbed-compose", default="compose/testbed.yml",
                    help="compose file of the testbed (default: compose/testbed.yml)")
    group.addoption("--testbed-project", default=None,
                    help="compose project name of the run (default: a fresh xenbed-<hex> per session)")
    group.addoption("--testbed-scope", default="session", choices=("session", "package", "module"),
                    help="how long one testbed lives: the session (default), or a fresh one per package/module")
    group.addoption("--testbed-shared", action="store_true", default=False,
                    help="under pytest-xdist, all workers share one testbed (default: one per worker); "
                         "modules that use `private_testbed` (chaos) still get their own")
    group.addoption("--keep-testbed", action="store_true", default=False,
                    help="leave the testbed running after the session (remove it with `xenbed down -p NAME`)")
    group.addoption("--trace-dir", default=str(trace.TRACE_DIR),
                    help="where each testbed test's trace (JSONL) and a failed test's diagrams go, "
                         "relative to the rootdir (default: out/traces)")


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and "testbed" in getattr(item, "fixturenames", ()):
        # every testbed test's trace is written at its teardown: link it in the JUnit XML
        link = ("xenbed_trace", str(trace.trace_path(item.nodeid, trace_dir(item.config))))
        if link not in item.user_properties:
            item.user_properties.append(link)
    if report.failed and "testbed" in getattr(item, "fixturenames", ()):
        testbed = item.config.stash.get(TESTBED_KEY, None)
        if testbed is not None:
            _attach_logs(report, testbed)
            _link_trace(item, report)
            _link_workload(item, report)
    return report


def _link_workload(item: pytest.Item, report: pytest.TestReport) -> None:
    """A failing test with a block workload: the checker's report (if it
    checked) in a section, and where its history goes (written at teardown)."""
    workload = item.stash.get(WORKLOAD, None)
    if workload is None:
        return
    history_file, report_file = trace.workload_paths(item.nodeid, trace_dir(item.config))
    links = [("xenbed_workload_history", str(history_file))]
    if workload.last_result is not None:
        links.append(("xenbed_nothing_lost_report", str(report_file)))
    for link in links:
        for properties in (item.user_properties, report.user_properties):
            if link not in properties:
                properties.append(link)
    text = "\n".join(f"{name}: {path}" for name, path in links)
    if workload.last_result is not None:
        text += "\n\n" + workload.last_result.render()
    report.sections.append((f"xenbed workload {workload.name} on {workload.domain}:{workload.vdev}", text))


def _link_trace(item: pytest.Item, report: pytest.TestReport) -> None:
    """A failing test links its trace and diagrams: a report section, and JUnit
    properties (user_properties; JUnit writes those of the teardown report,
    which copies the item's).  The files are written at the test's teardown."""
    item.stash[FAILED] = True
    folder = trace_dir(item.config)
    markdown, svg = trace.diagram_paths(item.nodeid, folder)
    links = [("xenbed_trace", str(trace.trace_path(item.nodeid, folder))),
             ("xenbed_diagram", str(svg)), ("xenbed_diagram_mermaid", str(markdown))]
    for link in links:
        for properties in (item.user_properties, report.user_properties):
            if link not in properties:
                properties.append(link)
    report.sections.append(("xenbed trace", "\n".join(f"{name}: {path}" for name, path in links)))
    trace_file = trace.trace_path(item.nodeid, folder)
    if trace_file.exists() and not svg.exists():  # failed after its trace was written (a later teardown)
        try:
            diagram.write_diagrams(item.nodeid, trace.read(trace_file), folder)
        except (OSError, ValueError) as error:
            report.sections.append(("xenbed trace", f"could not draw the diagrams: {error!r}"))


def _attach_logs(report: pytest.TestReport, testbed) -> None:
    """One report section per container: the failure explains itself without `docker logs`."""
    try:
        services = testbed.services()
        for service in services:
            report.sections.append((f"xenbed logs: {service} (last {FAILURE_LOG_LINES} lines)",
                                    testbed.logs(service, tail=FAILURE_LOG_LINES)))
    except Exception as error:  # the engine may be what failed; the report must still be written
        report.sections.append(("xenbed logs", f"could not collect logs: {error!r}"))
