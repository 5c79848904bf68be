"""Compose loading: strict keys, interpolation, paths, normalisation, dependency order."""

import textwrap

import pytest

from xenbed.harness.compose import ComposeError, Mount, dependency_order, load_project, parse_duration
from xenbed.harness.interpolation import InterpolationError, interpolate


def write(tmp_path, text, name="testbed.yml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path, text, environ=None):
    return load_project(write(tmp_path, text), environ or {})


# -- interpolation, as compose does it

@pytest.mark.parametrize("text, expected", [
    ("${SET}", "value"),
    ("$SET/x", "value/x"),
    ("${UNSET:-fallback}", "fallback"),
    ("${EMPTY:-fallback}", "fallback"),      # :- also replaces an empty value
    ("${EMPTY-fallback}", ""),               # - replaces only an unset one
    ("${UNSET-fallback}", "fallback"),
    ("${UNSET}", ""),
    ("cost $$5", "cost $5"),                 # $$ is a literal dollar
    ("$${SET}", "${SET}"),
    ("${SET:-a}-${UNSET:-b}", "value-b"),
])
def test_interpolation(text, expected):
    assert interpolate(text, {"SET": "value", "EMPTY": ""}) == expected


@pytest.mark.parametrize("text", ["${UNSET:?needed}", "${UNSET?needed}", "${EMPTY:?needed}", "${1bad}", "a $ b"])
def test_interpolation_errors(text):
    with pytest.raises(InterpolationError):
        interpolate(text, {"EMPTY": ""})


def test_variables_from_env_files_and_environment(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / ".env").write_text("# repo defaults\nIMAGE=from-root\nTAG=root\nexport MODE='quoted'\n")
    (tmp_path / "compose").mkdir()
    (tmp_path / "compose" / ".env").write_text("TAG=compose-dir\n")
    path = write(tmp_path / "compose", """
        services:
          a:
            image: ${IMAGE}:${TAG}
            environment: ["MODE=${MODE}", "LEVEL=${LEVEL:-3}"]
    """)
    project = load_project(path, {"LEVEL": "7"})
    service = project.services["a"]
    assert service.image == "from-root:compose-dir"      # the compose folder's .env wins over the root's
    assert service.environment == {"MODE": "quoted", "LEVEL": "7"}  # the process env wins over both


def test_environment_forms(tmp_path):
    project = load(tmp_path, """
        services:
          a: {image: x, environment: {NUMBER: 3, FLAG: true, FROM_HOST: null, ABSENT: null}}
          b: {image: x, environment: [PLAIN=1, FROM_HOST, ABSENT]}
    """, {"FROM_HOST": "h"})
    assert project.services["a"].environment == {"NUMBER": "3", "FLAG": "true", "FROM_HOST": "h"}
    assert project.services["b"].environment == {"PLAIN": "1", "FROM_HOST": "h"}


# -- strictness

@pytest.mark.parametrize("snippet, words", [
    ("services:\n  dom0:\n    image: x\n    cap_ad: [SYS_ADMIN]\n", ["service 'dom0'", "unknown key 'cap_ad'", "cap_add"]),
    ("services:\n  a:\n    image: x\n    healthcheck: {test: 'true', intervall: 1s}\n",
     ["service 'a' healthcheck", "'intervall'"]),
    ("services:\n  a: {image: x}\nnetworks:\n  n: {ipam: {config: [{subnett: 10.0.0.0/8}]}}\n",
     ["network 'n' ipam config[0]", "'subnett'"]),
    ("services:\n  a: {image: x}\nvolumes:\n  v: {drivr: local}\n", ["volume 'v'", "'drivr'"]),
    ("servics:\n  a: {image: x}\n", ["top level", "'servics'"]),
])
def test_unknown_keys_are_errors_naming_file_place_and_key(tmp_path, snippet, words):
    with pytest.raises(ComposeError) as error:
        load(tmp_path, snippet)
    for word in [str(tmp_path / "testbed.yml"), *words]:
        assert word in str(error.value)


def test_extension_keys_are_allowed(tmp_path):
    project = load(tmp_path, """
        x-common: &common {image: x}
        services:
          a: {<<: *common, x-note: anything}
    """)
    assert project.services["a"].image == "x"


@pytest.mark.parametrize("snippet, words", [
    ("services:\n  a: {image: x, depends_on: [b]}\n", ["unknown service 'b'"]),
    ("services:\n  a: {image: x, networks: [n]}\n", ["network 'n'"]),
    ("services:\n  a: {image: x, volumes: ['v:/v']}\n", ["volume 'v'"]),
    ("services:\n  a: {image: x, healthcheck: {disable: true}}\n"
     "  b: {image: x, depends_on: {a: {condition: service_healthy}}}\n",
     ["'a' has its healthcheck disabled"]),
    ("services:\n  a: {image: x, depends_on: {a: {condition: when_ready}}}\n", ["condition must be one of"]),
    ("services:\n  a: {image: x, network_mode: none, networks: [n]}\nnetworks: {n: {}}\n", ["cannot be used together"]),
    ("services:\n  a: {command: x}\n", ["needs an 'image'"]),
    ("services:\n  a: {image: x, stop_grace_period: soon}\n", ["key 'stop_grace_period'", "not a duration"]),
    ("services:\n  a: {image: '${TAG:?set TAG first}'}\n", ["TAG", "set TAG first"]),
])
def test_invalid_files_are_clear_errors(tmp_path, snippet, words):
    with pytest.raises(ComposeError) as error:
        load(tmp_path, snippet)
    for word in words:
        assert word in str(error.value)


# -- values

def test_full_service(tmp_path):
    project = load(tmp_path, """
        version: "2.4"
        services:
          dom0:
            image: xenbed/dom0:latest
            command: xl create --quiet "/etc/xen/auto/domu 1.cfg"
            entrypoint: ["/entry"]
            volumes:
              - ./domains:/etc/xen/auto:ro
              - memory:/var/lib/xenbed/memory
              - /abs/path:/abs
              - /anonymous
              - {type: tmpfs, target: /run/x}
            networks:
              xennet: {ipv4_address: 172.30.0.2, aliases: [dom0.local]}
            cap_add: [SYS_ADMIN, NET_ADMIN]
            devices: [/dev/fuse, "/dev/net/tun:/dev/tun0", "/dev/loop-control:rw"]
            device_cgroup_rules: ['b 7:* rmw']
            healthcheck:
              test: ["CMD", "xenstore-ls"]
              interval: 1m30s
              timeout: 500ms
              retries: 5
              start_period: 2s
            init: true
            labels: [role=dom0]
            stop_signal: SIGINT
            stop_grace_period: 1m
            tmpfs: /run
            working_dir: /root
            hostname: dom0
            restart: no
        networks:
          xennet: {ipam: {config: [{subnet: 172.30.0.0/24, ip_range: 172.30.0.128/25, gateway: 172.30.0.1}]}}
        volumes:
          memory: {driver_opts: {type: tmpfs, device: tmpfs, o: size=64m}}
    """)
    dom0 = project.services["dom0"]
    assert dom0.command == ("xl", "create", "--quiet", "/etc/xen/auto/domu 1.cfg")
    assert dom0.mounts == (
        Mount("bind", "/etc/xen/auto", str(tmp_path / "domains"), read_only=True),
        Mount("volume", "/var/lib/xenbed/memory", "memory"),
        Mount("bind", "/abs", "/abs/path"),
        Mount("volume", "/anonymous"),
        Mount("tmpfs", "/run/x"),
    )
    assert dom0.networks["xennet"].ipv4_address == "172.30.0.2"
    assert dom0.devices == ("/dev/fuse:/dev/fuse:rwm", "/dev/net/tun:/dev/tun0:rwm",
                            "/dev/loop-control:/dev/loop-control:rw")
    check = dom0.healthcheck
    assert (check.test, check.interval, check.timeout, check.retries, check.start_period) == \
        (("CMD", "xenstore-ls"), 90.0, 0.5, 5, 2.0)
    assert (dom0.stop_grace_period, dom0.tmpfs, dom0.labels, dom0.restart) == (60.0, ("/run",), {"role": "dom0"}, "no")
    pool = project.networks["xennet"].ipam_pools[0]
    assert (pool.subnet, pool.ip_range, pool.gateway) == ("172.30.0.0/24", "172.30.0.128/25", "172.30.0.1")
    assert project.volumes["memory"].driver_opts == {"type": "tmpfs", "device": "tmpfs", "o": "size=64m"}
    assert "default" not in project.networks  # nobody uses the implicit network


def test_implicit_default_network_and_string_healthcheck(tmp_path):
    project = load(tmp_path, """
        services:
          a: {image: x, healthcheck: {test: "test -S /run/sock"}}
          b: {image: x, network_mode: none}
          c: {image: x, healthcheck: {disable: true}}
    """)
    assert list(project.services["a"].networks) == ["default"]
    assert project.services["b"].networks == {}
    assert "default" in project.networks
    assert project.services["a"].healthcheck.test == ("CMD-SHELL", "test -S /run/sock")
    assert project.services["c"].healthcheck.test == ("NONE",)


@pytest.mark.parametrize("text, seconds", [("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("1h", 3600), (3, 3), ("2.5s", 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


# -- order

def test_start_order_puts_dependencies_first_and_keeps_file_order(tmp_path):
    project = load(tmp_path, """
        services:
          domu: {image: x, depends_on: [dom0, peer]}
          peer: {image: x, network_mode: "service:hypervisor"}
          dom0: {image: x, depends_on: {hypervisor: {condition: service_healthy}}}
          hypervisor: {image: x, healthcheck: {test: "true"}}
    """)
    assert project.start_order() == ["hypervisor", "dom0", "peer", "domu"]


def test_cycle_is_named(tmp_path):
    with pytest.raises(ComposeError, match="dependency cycle: a -> b -> c -> a"):
        load(tmp_path, """
            services:
              a: {image: x, depends_on: [b]}
              b: {image: x, depends_on: [c]}
              c: {image: x, depends_on: [a]}
        """)


def test_dependency_order_of_independent_nodes_is_input_order():
    assert dependency_order({"z": [], "y": [], "x": ["z"]}) == ["z", "y", "x"]
