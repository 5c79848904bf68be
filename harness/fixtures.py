"""Session fixtures: thin wrappers over Testbed, its Xen view and the Docker client."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import tempfile
import secrets
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from . import diagram, trace
from .resources import DockerUnavailable, connect
from .runenv import run_environment
from .testbed import Testbed
from .xen import Xen

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


def testbed_scope(fixture_name: str, config: pytest.Config) -> str:
    """`--testbed-scope`: one testbed for the session (default), or a fresh
    one per package or per module (isolation at the price of ~20 s each)."""
    return config.getoption("--testbed-scope", default="session")


@pytest.fixture(scope=testbed_scope)
def testbed(request: pytest.FixtureRequest, docker_client) -> Iterator[Testbed]:
    """The testbed of `--testbed-compose`: up once per `--testbed-scope`,
    torn down and checked for leaks after.  Under pytest-xdist each worker
    has its own run, or with `--testbed-shared` all workers share one (the
    first to arrive brings it up, the last to leave takes it down)."""
    config = request.config
    if config.getoption("--testbed-shared", default=False) and hasattr(config, "workerinput"):
        with shared_testbed(config, docker_client) as bed:
            yield bed
        return
    with own_testbed(config, docker_client, session_project_name(config)) as bed:
        yield bed


@pytest.fixture(scope="module")
def private_testbed(request: pytest.FixtureRequest, docker_client) -> Iterator[Testbed]:
    """A testbed of this module's own, whatever `--testbed-scope` and
    `--testbed-shared` say: for chaos tests, whose kills must not disturb
    other tests, and for modules that need another topology.  A module opts
    in by overriding `testbed` with it:

        pytestmark = [pytest.mark.integration,
                      pytest.mark.testbed_compose("compose/two-hosts.yml")]  # optional

        @pytest.fixture(scope="module")
        def testbed(private_testbed):
            return private_testbed

    The `testbed_compose` marker (on the module) names the compose file,
    relative to the rootdir; without it, `--testbed-compose`'s.
    """
    config = request.config
    before = config.stash.get(TESTBED_KEY, None)
    name = f"{session_project_name(config)}-{secrets.token_hex(2)}"
    marker = request.node.get_closest_marker("testbed_compose")
    compose_file = str(Path(config.rootpath, marker.args[0])) if marker else None
    try:
        with own_testbed(config, docker_client, name, compose_file) as bed:
            yield bed
            # leak_audit (module-scoped too) runs after this testbed is gone:
            # audit it here, while its hypervisor still answers
            leaks = {kind: found for kind, found in hypervisor_audit(bed).items() if found}
            if leaks:
                pytest.fail(f"{request.module.__name__} left behind in the hypervisor: {leaks}", pytrace=False)
    finally:
        config.stash[TESTBED_KEY] = before  # None: leak_audit has nothing more to ask


@contextlib.contextmanager
def own_testbed(config: pytest.Config, docker_client, project: str,
                compose_file: str | None = None) -> Iterator[Testbed]:
    keep = config.getoption("--keep-testbed")
    compose_file = compose_file or config.getoption("--testbed-compose")
    bed = Testbed.from_compose(compose_file, project, client=docker_client, keep=keep,
                               env=run_environment(docker_client, compose_file))
    config.stash[TESTBED_KEY] = bed
    try:
        bed.up(progress=_progress_writer(config))
        wait_devices_connected(bed, config)
        yield bed
    finally:
        if keep:
            _progress_writer(config)(f"kept testbed {bed.project_name}; remove it with "
                                     f"`xenbed down -p {bed.project_name}`")
        else:
            tear_down_and_check(bed)


def wait_devices_connected(bed: Testbed, config: pytest.Config) -> None:
    """A Xen topology (not a harness test's own) is ready once its PV devices are Connected."""
    xen = Xen(bed)
    if any(xen_host.dom0 for xen_host in xen.xen_hosts().values()):
        xen.wait_devices_connected(progress=_progress_writer(config))


def tear_down_and_check(bed: Testbed) -> None:
    run_files = volume_file_ids(bed)
    bed.down()
    leaked = bed.leftovers() + [
        f"loop device {name} -> {backing}" for name, (backing, file_id) in host_loop_devices().items()
        if file_id in run_files]
    if leaked:
        pytest.fail(f"testbed {bed.project_name} leaked after down:\n  " + "\n  ".join(leaked), pytrace=False)


@contextlib.contextmanager
def shared_testbed(config: pytest.Config, docker_client) -> Iterator[Testbed]:
    """One testbed for every xdist worker of this run.  The workers agree
    through a folder named by the run's `testrunuid`: a lock, the run's
    project and environment (its credentials), and how many workers use it."""
    uid = config.workerinput["testrunuid"]
    folder = Path(tempfile.gettempdir(), f"xenbed-shared-{uid}")
    folder.mkdir(exist_ok=True)
    state_file = folder / "testbed.json"
    compose_file = config.getoption("--testbed-compose")
    with _locked(folder / "lock"):
        if state_file.exists():
            state = json.loads(state_file.read_text())
            bed = Testbed.from_compose(compose_file, state["project"], client=docker_client, env=state["env"])
        else:
            base = config.getoption("--testbed-project") or f"xenbed-{uid[:6]}"
            env = run_environment(docker_client, compose_file)
            bed = Testbed.from_compose(compose_file, base, client=docker_client, env=env)
            bed.up(progress=_progress_writer(config))
            wait_devices_connected(bed, config)
            state = {"project": bed.project_name, "env": env, "users": 0}
        state["users"] += 1
        state_file.write_text(json.dumps(state))
    config.stash[TESTBED_KEY] = bed
    try:
        yield bed
    finally:
        with _locked(folder / "lock"):
            state = json.loads(state_file.read_text())
            state["users"] -= 1
            last = state["users"] == 0
            if last:
                state_file.unlink()
            else:
                state_file.write_text(json.dumps(state))
            if last and not config.getoption("--keep-testbed"):
                tear_down_and_check(bed)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _ByName(dict):
    """`domains["domu1"]`: made on first use."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, name):
        self[name] = value = self._make(name)
        return value


@pytest.fixture
def xen(testbed: Testbed) -> Xen:
    """The Xen view of the testbed (harness/xen.py): its Xen hosts' dom0s and
    hypervisors, `domain(name)`, `create_domain`, `destroy_domain`, `audit`."""
    return Xen(testbed)


@pytest.fixture
def domains(xen: Xen):
    """`domains["domu1"]`: a Domain (harness/domains.py) to drive through xl
    and to ask about its devices; `domains["dom0"]` is Domain-0."""
    return _ByName(xen.domain)


@pytest.fixture
def shells(testbed: Testbed):
    """`shells["domu1"]`: the pytest-testinfra host of that container."""
    return _ByName(testbed.shell)


@pytest.fixture
def new_domain(xen: Xen):
    """A factory for throwaway guests: `new_domain("scratch", memory_mb=16)`
    creates it (xl create + its container) and returns its Domain; every one
    made is destroyed at the end of the test."""
    made: list[str] = []

    def make(name: str, **kwargs):
        xen.create_domain(name, **kwargs)
        made.append(name)
        return xen.domain(name)

    yield make
    for name in reversed(made):
        try:
            xen.destroy_domain(name)
        except Exception as error:  # the test may have destroyed it itself
            warnings.warn(f"xenbed: destroying {name}: {error!r}")


def volume_file_ids(bed: Testbed) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file in the run's volumes, as this host sees
    them: what a loop device the run attached must point at."""
    ids = set()
    for volume in bed.client.volumes.list(filters={"label": bed.label}):
        for folder, _, files in os.walk(volume.attrs.get("Mountpoint") or "/nonexistent"):
            for name in files:
                try:
                    st = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                ids.add((st.st_dev, st.st_ino))
    return ids


def host_loop_devices() -> dict[str, tuple[str, tuple[int, int]]]:
    """Attached loop devices of this host's kernel (global: every container
    and every run shares them), as {"loop3": (backing file as its attacher
    named it, (st_dev, st_ino) of that file)}.  Paths look alike across runs
    (every dom0 has /var/lib/xen/images/domu1.img), so a run's loops are told
    apart by the backing file's identity.  blkback sets autoclear: a run's
    loops must be gone once its containers are."""
    from xenbed.drivers.blk.loop import LoopError, get_status

    found = {}
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        name = entry.split("/")[3]
        try:
            with open(entry) as f:
                backing = f.read().strip()
            status = get_status(f"/dev/{name}")
        except (OSError, LoopError):
            continue  # detached meanwhile, or no node for it on this host
        found[name] = (backing, (status.device, status.inode))
    return found


def _progress_writer(config: pytest.Config):
    """Progress lines go to the terminal even while pytest captures output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return print
    return lambda line: reporter.write_line(line)


TRANSITIONS_FILE = trace.TRANSITIONS_FILE  # where every domain's XenBus records (XENBED_TRANSITIONS)
_READER = pytest.StashKey[trace.TranscriptReader]()
FAILED = pytest.StashKey[bool]()  # set on an item by the plugin when a phase of it failed


def trace_dir(config: pytest.Config) -> Path:
    return Path(config.rootpath, config.getoption("--trace-dir", default=str(trace.TRACE_DIR)))


@pytest.fixture(autouse=True)
def xenbus_invariant(request: pytest.FixtureRequest):
    """After every test that used the testbed: its trace (the XenBus
    transitions every domain made during it, the hypervisor's store, watch,
    grant and event-channel records, and the chaos history) goes to
    out/traces/<test>.jsonl, with its diagrams when the test failed; and every
    transition must be one the seeds allow (DESIGN.md: a transition the seeds
    do not allow is a test failure, not a log line)."""
    before = request.config.stash.get(TESTBED_KEY, None)
    history_start = len(before.history) if isinstance(before, Testbed) else 0
    yield
    if "testbed" not in request.fixturenames:
        return
    bed = request.config.stash.get(TESTBED_KEY, None)
    if not isinstance(bed, Testbed):  # not up (or a stand-in in the plugin's own tests)
        return
    from xenbed.protocols.xenbus_state import violations

    reader = request.config.stash.setdefault(_READER, trace.TranscriptReader())
    try:
        new = reader.new_records(bed)
    except Exception as error:  # the engine may be what failed; say so, do not hide the test's own failure
        warnings.warn(f"xenbed: no trace for {request.node.nodeid}: {error!r}")
        return
    records = trace.merge(new, trace.chaos_records(bed.history.since(history_start)))
    nodeid, folder = request.node.nodeid, trace_dir(request.config)
    trace.write(trace.trace_path(nodeid, folder), records)
    bad = violations(trace.transitions_of(new))
    if bad or request.node.stash.get(FAILED, False):
        diagram.write_diagrams(nodeid, records, folder)
    if bad:
        pytest.fail("XenBus transitions the seeds do not allow:\n  " + "\n  ".join(map(str, bad)), pytrace=False)


WORKLOAD = pytest.StashKey[object]()  # the block_workload of an item, for its failure report


@pytest.fixture
def block_workload(request: pytest.FixtureRequest, testbed: Testbed):
    """A block workload writing and verifying on domu1's xvda, already started
    (harness/workload.py).  `@pytest.mark.block_workload(domain=..., vdev=...,
    workers=..., rate=..., ...)` sets BlockWorkload's options.  The test
    checks it (`block_workload.assert_nothing_lost()`); at teardown it is
    stopped if it still runs, and its history -- with the checker's report,
    when the test checked -- is saved beside the test's trace."""
    from .workload import BlockWorkload

    marker = request.node.get_closest_marker("block_workload")
    options = dict(marker.kwargs) if marker else {}
    domain, vdev = options.pop("domain", "domu1"), options.pop("vdev", "xvda")
    workload = BlockWorkload(testbed, domain, vdev, name=f"{trace.sanitize(request.node.name)[:60]}-"
                                                           f"{secrets.token_hex(2)}", **options)
    request.node.stash[WORKLOAD] = workload
    workload.start()
    yield workload
    history_file, report_file = trace.workload_paths(request.node.nodeid, trace_dir(request.config))
    try:
        history = workload.stop() if workload.running() else (workload.last_history or workload.history())
    except Exception as error:  # the guest may be what the test broke; keep what we have
        warnings.warn(f"xenbed: workload {workload.name}: no history at teardown: {error!r}")
        history = workload.last_history
    if history is not None:
        trace.write(history_file, history)
    if workload.last_result is not None:
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(workload.last_result.render(history_lines=50) + "\n", encoding="utf-8")


def hypervisor_audit(bed: Testbed) -> dict:
    """What dead domains left behind, as the hypervisor sees it (Xen.audit)."""
    return Xen(bed).audit()


@pytest.fixture(scope="module", autouse=True)
def leak_audit(request: pytest.FixtureRequest):
    """After each module that used the testbed: no grant mapping of a dead
    domain's page, no port offered to a dead domain, no store node or backend
    folder of a dead domain, no domain left dying (created and not destroyed)."""
    yield
    module = request.module
    if not any(getattr(item, "module", None) is module and "testbed" in getattr(item, "fixturenames", ())
               for item in request.session.items):
        return
    bed = request.config.stash.get(TESTBED_KEY, None)
    if not isinstance(bed, Testbed) or not any(h.dom0 in bed.services() for h in Xen(bed).xen_hosts().values()):
        return  # no hypervisor to ask (a topology of one's own, e.g. the harness's own tests)
    leaks = {kind: found for kind, found in hypervisor_audit(bed).items() if found}
    if leaks:
        pytest.fail(f"{module.__name__} left behind in the hypervisor: {leaks}", pytrace=False)
