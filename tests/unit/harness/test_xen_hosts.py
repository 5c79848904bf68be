"""Which services make up which Xen host (harness/xen_hosts.py), for the two
topologies in compose/ and for labels as containers carry them."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenbed.harness.runenv import fresh_credentials

from xenbed.harness.compose import load_project
from xenbed.harness.xen_hosts import DEFAULT_XEN_HOST, XenHostError, find_xen_hosts, resolve_xen_host

COMPOSE = Path(__file__).resolve().parents[3] / "compose"


def xen_hosts_of(file: str):
    project = load_project(COMPOSE / file, fresh_credentials(COMPOSE / file))
    return find_xen_hosts({name: service.labels for name, service in project.services.items()})


def test_the_default_topology_is_one_host_by_service_names():
    xen_hosts = xen_hosts_of("testbed.yml")
    assert list(xen_hosts) == [DEFAULT_XEN_HOST]
    xen_host = resolve_xen_host(xen_hosts)
    assert (xen_host.hypervisor, xen_host.dom0) == ("hypervisor", "dom0")
    assert resolve_xen_host(xen_hosts, "domu1") is xen_host and resolve_xen_host(xen_hosts, "peer") is xen_host


def test_two_hosts_each_with_its_own_pillars_and_guests_and_the_peer_on_neither():
    xen_hosts = xen_hosts_of("two-hosts.yml")
    assert {name: (h.hypervisor, h.dom0) for name, h in xen_hosts.items()} == {
        "host-a": ("hypervisor-a", "dom0-a"), "host-b": ("hypervisor-b", "dom0-b")}
    assert resolve_xen_host(xen_hosts, "domu1").name == "host-a"
    assert resolve_xen_host(xen_hosts, "domu2").dom0 == "dom0-b"
    assert resolve_xen_host(xen_hosts, "dom0-b").name == resolve_xen_host(xen_hosts, "host-b").name == "host-b"
    with pytest.raises(XenHostError, match="2 Xen hosts"):
        resolve_xen_host(xen_hosts)          # which one?
    with pytest.raises(XenHostError, match="neither a host nor a service"):
        resolve_xen_host(xen_hosts, "peer")  # on the uplink, part of no host


def test_the_driver_domain_topology_is_one_host():
    xen_host = resolve_xen_host(xen_hosts_of("driver-domain.yml"))
    assert xen_host.dom0 == "dom0" and "driverdom" in xen_host


def test_labels_as_containers_carry_them_and_a_host_with_two_dom0s_is_refused():
    labels = {"h": {"org.xenbed.host": "x", "org.xenbed.role": "hypervisor", "com.docker.compose.service": "h"},
              "d": {"org.xenbed.host": "x", "org.xenbed.role": "dom0"},
              "g": {"org.xenbed.host": "x"}}
    assert resolve_xen_host(find_xen_hosts(labels), "g").dom0 == "d"
    with pytest.raises(XenHostError, match="several dom0"):
        find_xen_hosts({**labels, "d2": {"org.xenbed.host": "x", "org.xenbed.role": "dom0"}})


def test_a_testbed_sends_each_domains_toolstack_calls_to_its_hosts_dom0():
    from xenbed.harness.testbed import Testbed
    from xenbed.harness.xen import Xen

    two = Xen(Testbed.from_compose(COMPOSE / "two-hosts.yml", "unit", client=object(),
                                   env=fresh_credentials(COMPOSE / "two-hosts.yml")))  # no engine is asked
    assert two.domain("domu1").dom0 == "dom0-a" and two.domain("domu2").dom0 == "dom0-b"
    assert two.domain("domu1", xen_host="dom0-b").dom0 == "dom0-b"  # where a migrated domu1 would be
    assert (two.domain("dom0-b").name, two.domain("dom0-b").service) == ("Domain-0", "dom0-b")
    assert two.hypervisor("domu2") == "hypervisor-b"
    with pytest.raises(XenHostError):
        two.domain("scratch")  # not a service: which host's toolstack knows it?
    assert two.domain("scratch", xen_host="host-a").dom0 == "dom0-a"
    one = Xen(Testbed.from_compose(COMPOSE / "testbed.yml", "unit", client=object(),
                                   env=fresh_credentials(COMPOSE / "testbed.yml")))
    assert (one.domain("dom0").name, one.domain("dom0").service) == ("Domain-0", "dom0")
    assert one.domain("scratch").dom0 == "dom0" and one.hypervisor() == "hypervisor"
