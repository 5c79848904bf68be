"""Translation of a compose service into docker SDK arguments, and the labels runs carry."""

import os
import socket
import textwrap

from xenbed.harness import resources
from xenbed.harness.compose import load_project
from xenbed.harness.container_spec import container_spec, network_kwargs, volume_kwargs


def project(tmp_path):
    path = tmp_path / "testbed.yml"
    path.write_text(textwrap.dedent("""
        services:
          hypervisor:
            image: xenbed/hypervisor:latest
            volumes: [memory:/memory, ./domains:/etc/xen/auto:ro]
            devices: [/dev/fuse]
            healthcheck: {test: [CMD, "true"], interval: 1s, timeout: 500ms, retries: 3, start_period: 2m}
            stop_grace_period: 5s
            networks: {xennet: {ipv4_address: 10.9.0.2}, other: null}
          domu: {image: xenbed/domu:latest, network_mode: none, init: true}
          peer: {image: xenbed/peer:latest, network_mode: "service:hypervisor"}
        networks:
          xennet: {ipam: {config: [{subnet: 10.9.0.0/24, ip_range: 10.9.0.128/25, gateway: 10.9.0.1}]}}
          other: {}
        volumes:
          memory: {driver_opts: {type: tmpfs, device: tmpfs}}
    """))
    return load_project(path, {})


def test_container_spec(tmp_path):
    loaded = project(tmp_path)
    spec = container_spec("run1", loaded, loaded.services["hypervisor"])
    assert spec.name == "run1_hypervisor_1"
    assert spec.create["healthcheck"] == {"test": ["CMD", "true"], "interval": 1_000_000_000,
                                          "timeout": 500_000_000, "start_period": 120_000_000_000, "retries": 3}
    assert spec.create["stop_timeout"] == 5
    labels = spec.create["labels"]
    assert labels["com.docker.compose.project"] == labels["xenbed.run"] == "run1"
    assert labels["com.docker.compose.service"] == "hypervisor"
    assert labels["com.docker.compose.container-number"] == "1"
    assert labels["com.docker.compose.oneoff"] == "False"
    assert labels["com.docker.compose.project.config_files"] == str(tmp_path / "testbed.yml")
    assert labels["xenbed.owner"] == f"{socket.gethostname()}:{os.getpid()}"
    assert "xenbed.keep" not in labels
    assert spec.host_config["devices"] == ["/dev/fuse:/dev/fuse:rwm"]
    assert spec.host_config["binds"] == [f"{tmp_path}/domains:/etc/xen/auto:ro"]
    assert spec.host_config["mounts"] == [{"Type": "volume", "Target": "/memory", "ReadOnly": False,
                                           "Source": "run1_memory"}]
    assert spec.networks == {"run1_xennet": {"aliases": ["hypervisor"], "ipv4_address": "10.9.0.2"},
                             "run1_other": {"aliases": ["hypervisor"]}}
    assert spec.host_config["network_mode"] == "run1_xennet"


def test_network_modes(tmp_path):
    loaded = project(tmp_path)
    domu = container_spec("run1", loaded, loaded.services["domu"], keep=True)
    assert (domu.host_config["network_mode"], domu.networks, domu.host_config["init"]) == ("none", {}, True)
    assert domu.create["labels"]["xenbed.keep"] == "true"
    peer = container_spec("run1", loaded, loaded.services["peer"])
    assert peer.shares_network_of == "hypervisor" and "network_mode" not in peer.host_config


def test_network_and_volume_kwargs(tmp_path):
    loaded = project(tmp_path)
    network = network_kwargs("run1", loaded.networks["xennet"])
    assert network["name"] == "run1_xennet"
    assert network["ipam"] == {"Driver": "default", "Config": [
        {"Subnet": "10.9.0.0/24", "IPRange": "10.9.0.128/25", "Gateway": "10.9.0.1"}]}
    assert network["labels"]["com.docker.compose.network"] == "xennet"
    volume = volume_kwargs("run1", loaded.volumes["memory"])
    assert volume["name"] == "run1_memory" and volume["driver_opts"] == {"type": "tmpfs", "device": "tmpfs"}
    assert volume["labels"]["com.docker.compose.volume"] == "memory"


def test_staleness():
    here = socket.gethostname()
    now = resources.time.time()
    dead_pid = 2 ** 22 + 12345  # above pid_max on common kernels
    assert resources._is_stale([{"xenbed.owner": f"{here}:{dead_pid}", "xenbed.created": str(now)}], 12)
    assert not resources._is_stale([{"xenbed.owner": f"{here}:{os.getpid()}", "xenbed.created": "0"}], 12)
    assert not resources._is_stale([{"xenbed.owner": f"{here}:{dead_pid}", "xenbed.keep": "true"}], 12)
    # another host's owner cannot be checked: only age makes it stale
    assert not resources._is_stale([{"xenbed.owner": "elsewhere:1", "xenbed.created": str(now)}], 12)
    assert resources._is_stale([{"xenbed.owner": "elsewhere:1", "xenbed.created": str(now - 13 * 3600)}], 12)
