"""Testbed against a real engine, with the tiny busybox topology in tiny.yml.

Each test gives its runs their own subnet (XENBED_UPLINK_NET) so the tests can run in
parallel (pytest -n): an engine refuses two networks with overlapping pools.
"""

import contextlib
import subprocess
import sys

import pytest

from xenbed.harness import Testbed, TestbedError, reap_stale_runs, resources

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def running(compose, docker_client, **kwargs):
    """A Testbed that is up inside the block and gone (checked) after it, whatever happened."""
    testbed = Testbed.from_compose(compose, client=docker_client, **kwargs)
    try:
        testbed.up(timeout=90, progress=lambda line: None)
        yield testbed
    finally:
        testbed.down(timeout=2)
        assert testbed.leftovers() == []


def test_two_runs_side_by_side(tiny_compose, docker_client):
    # one engine cannot hold two networks with the same subnet: each run gets its own
    with running(tiny_compose, docker_client, env={"GREETING": "first"}) as first, \
            running(tiny_compose, docker_client, env={"GREETING": "second", "XENBED_UPLINK_NET": "172.31.251"}) as second:
        assert first.project_name != second.project_name
        for testbed, greeting in ((first, "first"), (second, "second")):
            rows = {row["service"]: row for row in testbed.status()}
            assert rows["server"]["health"] == "healthy" and rows["isolated"]["state"] == "running"
            # depends_on service_healthy: isolated started only after server wrote the marker
            assert testbed.exec("isolated", ["cat", "/shared/ready"], check=True).exit_code == 0
            assert testbed.exec("isolated", "echo $GREETING").stdout == f"{greeting}\n"

        # the named volume is a tmpfs volume, one per run
        mounts = first.exec("server", ["cat", "/proc/mounts"], check=True).stdout
        assert any(line.split()[1] == "/shared" and line.split()[0] == "tmpfs" for line in mounts.splitlines())
        first.exec("server", "echo only-first > /shared/mark", check=True)
        assert second.exec("server", ["test", "-e", "/shared/mark"]).exit_code == 1

        # network_mode none: loopback only; the static address on the ipam network
        assert first.exec("isolated", ["ls", "/sys/class/net"]).stdout.split() == ["lo"]
        assert "172.31.250.10" in first.exec("server", ["ip", "-4", "addr"]).stdout
        assert first.exec("isolated", ["cat", "/data/hello.txt"]).stdout == "bind-mounted\n"

        # docker-compose sees and drives a run the harness started
        compose = ["docker-compose", "-f", str(tiny_compose), "-p", first.project_name]
        ps = subprocess.run(compose + ["ps"], capture_output=True, text=True, check=True).stdout
        assert f"{first.project_name}_server_1" in ps and f"{first.project_name}_isolated_1" in ps
        assert second.project_name not in ps
        out = subprocess.run(compose + ["exec", "-T", "isolated", "cat", "/data/hello.txt"],
                             capture_output=True, text=True, check=True).stdout
        assert out == "bind-mounted\n"

        assert first.shell("server").file("/shared/ready").exists  # testinfra


def test_exec_check_and_timeout(tiny_compose, docker_client):
    from xenbed.harness.execs import ExecError, ExecTimeout
    with running(tiny_compose, docker_client, env={"XENBED_UPLINK_NET": "172.31.252"}) as testbed:
        with pytest.raises(ExecError) as error:
            testbed.exec("server", "echo to-out; echo to-err >&2; exit 3", check=True)
        assert "exited with 3" in str(error.value)
        assert "to-out" in str(error.value) and "to-err" in str(error.value)
        with pytest.raises(ExecTimeout, match="did not finish within 0.5s"):
            testbed.exec("server", "echo started; sleep 30", timeout=0.5)
        testbed.kill("isolated")
        assert {row["service"]: row["state"] for row in testbed.status()}["isolated"] == "exited"


def test_failed_up_says_what_it_waited_for_and_shows_logs(tmp_path, busybox_image, docker_client):
    compose = tmp_path / "broken.yml"
    compose.write_text(f"""
services:
  sick:
    image: {busybox_image}
    command: ["-c", "echo booting the sick service; exec sleep 600"]
    init: true
    healthcheck: {{test: ["CMD", "test", "-f", "/never"], interval: 200ms, retries: 2}}
  patient:
    image: {busybox_image}
    depends_on: {{sick: {{condition: service_healthy}}}}
""")
    testbed = Testbed.from_compose(compose, client=docker_client)
    try:
        with pytest.raises(TestbedError) as error:
            testbed.up(timeout=30, progress=lambda line: None)
        message = str(error.value)
        assert "sick is unhealthy" in message
        assert "booting the sick service" in message  # the failing container's logs
    finally:
        testbed.down(timeout=1)
    assert testbed.leftovers() == []


def test_stale_run_is_reaped(tiny_compose, docker_client, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that was ours and is gone
    owner = resources.owner_id().rsplit(":", 1)[0] + f":{dead.pid}"
    monkeypatch.setattr(resources, "owner_id", lambda: owner)
    crashed = Testbed.from_compose(tiny_compose, client=docker_client, env={"XENBED_UPLINK_NET": "172.31.253"})
    try:
        crashed.up(timeout=90, progress=lambda line: None)
        monkeypatch.undo()
        had_resources = bool(crashed.leftovers())
        reaped = reap_stale_runs(docker_client)
        assert crashed.leftovers() == []
        # under pytest -n another worker's `up` may have reaped it first; either way it is gone
        assert crashed.project_name in reaped or not had_resources
    finally:
        crashed.down(timeout=1)
