"""Session fixtures: thin wrappers over Testbed and the Docker client."""

from __future__ import annotations

import glob
import secrets
from typing import Iterator

import pytest

from .resources import DockerUnavailable, connect
from .runenv import run_environment
from .testbed import Testbed

TESTBED_KEY = pytest.StashKey[Testbed]()


@pytest.fixture(scope="session")
def docker_client():
    """A Docker client that answered a ping; without an engine the test fails, saying how to get one."""
    try:
        return connect()
    except DockerUnavailable as error:
        pytest.fail(str(error), pytrace=False)


def session_project_name(config: pytest.Config) -> str:
    """The option's name, else a fresh one; xdist workers each get their own run."""
    name = config.getoption("--testbed-project") or f"xenbed-{secrets.token_hex(3)}"
    worker = getattr(config, "workerinput", {}).get("workerid")
    return f"{name}-{worker}" if worker else name


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest, docker_client) -> Iterator[Testbed]:
    """The testbed of `--testbed-compose`, up for the whole session, torn down and checked for leaks."""
    config = request.config
    keep = config.getoption("--keep-testbed")
    compose_file = config.getoption("--testbed-compose")
    bed = Testbed.from_compose(compose_file, session_project_name(config), client=docker_client, keep=keep,
                               env=run_environment(docker_client, compose_file))
    config.stash[TESTBED_KEY] = bed
    loops_before = host_loop_devices()
    try:
        bed.up(progress=_progress_writer(config))
        yield bed
    finally:
        if keep:
            _progress_writer(config)(f"kept testbed {bed.project_name}; remove it with "
                                     f"`xenbed down -p {bed.project_name}`")
        else:
            bed.down()
            leaked = bed.leftovers() + [
                f"loop device {name} -> {backing}" for name, backing in host_loop_devices().items()
                if loops_before.get(name) != backing]
            if leaked:
                pytest.fail(f"testbed {bed.project_name} leaked after down:\n  " + "\n  ".join(leaked),
                            pytrace=False)


def host_loop_devices() -> dict[str, str]:
    """Attached loop devices of this host's kernel (global: containers share
    them), as {"loop3": backing file as its attacher named it}.  blkback sets
    autoclear, so a run's loops must be gone once its containers are."""
    found = {}
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(entry) as f:
                found[entry.split("/")[3]] = f.read().strip()
        except OSError:
            continue  # detached meanwhile
    return found


def _progress_writer(config: pytest.Config):
    """Progress lines go to the terminal even while pytest captures output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return print
    return lambda line: reporter.write_line(line)


TRANSITIONS_FILE = "/run/xen/transitions.jsonl"  # where every domain's XenBus records (XENBED_TRANSITIONS)
_SEEN_TRANSITIONS = pytest.StashKey[dict]()


@pytest.fixture(autouse=True)
def xenbus_invariant(request: pytest.FixtureRequest):
    """After every test that used the testbed: every XenBus state change any
    domain made during it must be one the seeds allow (DESIGN.md: a
    transition the seeds do not allow is a test failure, not a log line)."""
    yield
    if "testbed" not in request.fixturenames:
        return
    bed = request.config.stash.get(TESTBED_KEY, None)
    if not isinstance(bed, Testbed):  # not up (or a stand-in in the plugin's own tests)
        return
    from xenbed.protocols.xenbus_state import Transition, violations

    seen = request.config.stash.setdefault(_SEEN_TRANSITIONS, {})
    new = []
    for row in bed.status():
        service = row["service"]
        if row.get("state") != "running":
            continue
        result = bed.exec(service, ["sh", "-c", f"cat {TRANSITIONS_FILE} 2>/dev/null || true"])
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        new += [Transition.from_json(line) for line in lines[seen.get(service, 0):]]
        seen[service] = len(lines)
    bad = violations(new)
    if bad:
        pytest.fail("XenBus transitions the seeds do not allow:\n  " + "\n  ".join(map(str, bad)), pytrace=False)
