"""Session fixtures: thin wrappers over Testbed and the Docker client."""

from __future__ import annotations

import glob
import os
import secrets
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from . import trace
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
    try:
        bed.up(progress=_progress_writer(config))
        yield bed
    finally:
        if keep:
            _progress_writer(config)(f"kept testbed {bed.project_name}; remove it with "
                                     f"`xenbed down -p {bed.project_name}`")
        else:
            run_files = volume_file_ids(bed)
            bed.down()
            leaked = bed.leftovers() + [
                f"loop device {name} -> {backing}" for name, (backing, file_id) in host_loop_devices().items()
                if file_id in run_files]
            if leaked:
                pytest.fail(f"testbed {bed.project_name} leaked after down:\n  " + "\n  ".join(leaked),
                            pytrace=False)


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
        trace.write_diagrams(nodeid, records, folder)
    if bad:
        pytest.fail("XenBus transitions the seeds do not allow:\n  " + "\n  ".join(map(str, bad)), pytrace=False)


def hypervisor_audit(bed: Testbed) -> dict:
    """What dead domains left behind, as the hypervisor sees it (Testbed.audit)."""
    return bed.audit()


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
    if not isinstance(bed, Testbed):
        return
    leaks = {kind: found for kind, found in bed.audit().items() if found}
    if leaks:
        pytest.fail(f"{module.__name__} left behind in the hypervisor: {leaks}", pytrace=False)
