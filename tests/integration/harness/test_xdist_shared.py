"""`--testbed-shared` under pytest-xdist: every worker uses one testbed, and
the last worker to leave takes it down (checked on the tiny topology)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

INNER = '''
import json, os

def record(testbed):
    assert testbed.exec("server", ["true"]).exit_code == 0
    with open(os.environ["SHARED_OUT"], "a") as out:
        out.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"),
                              "project": testbed.project_name}) + "\\n")

def test_a(testbed): record(testbed)
def test_b(testbed): record(testbed)
def test_c(testbed): record(testbed)
def test_d(testbed): record(testbed)
'''


@pytest.mark.integration
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "one-per-worker"])
def test_workers_share_one_testbed_or_have_their_own(tmp_path, busybox_image, docker_client, shared):
    (tmp_path / "test_inner.py").write_text(INNER)
    out = tmp_path / "seen.jsonl"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "load",
               "--testbed-compose", str(HERE / "tiny.yml"), str(tmp_path / "test_inner.py")]
    if shared:
        command.insert(-1, "--testbed-shared")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SHARED_OUT": str(out), "XENBED_TEST_IMAGE": busybox_image})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    workers = {s["worker"] for s in seen}
    projects = {s["project"] for s in seen}
    assert len(seen) == 4 and len(workers) == 2, seen
    assert len(projects) == (1 if shared else 2), seen
    for project in projects:  # the last to leave took it down
        assert docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"}) == []
