"""Two independent Xen hosts on one engine (compose/two-hosts.yml), as
migration needs them: host-a (hypervisor-a, dom0-a, domu1) and host-b
(hypervisor-b, dom0-b, domu2), sharing only storage (the images volume both
dom0s mount) and a network (the uplink both xenbr0 bridges enslave).

Each host has its own domain table and store, so both guests are dom1 of
their host; the harness sends `xl` and store reads to the right dom0 by the
services' host labels (harness/xen_hosts.py)."""

from __future__ import annotations

import time

import pytest

from xenbed.harness import cli
from integration_helpers import sh, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.testbed_compose("compose/two-hosts.yml")]

GUESTS = {"domu1": "dom0-a", "domu2": "dom0-b"}  # guest -> the dom0 of its host
IMAGES = "/var/lib/xen/images"


@pytest.fixture(scope="module")
def testbed(private_testbed):
    return private_testbed


def names_in(xl_list: str) -> list[str]:
    return [line.split()[0] for line in xl_list.splitlines()[1:] if line.strip()]


def test_each_host_runs_only_its_own_domains(testbed, xen, capsys):
    assert names_in(sh(testbed, "dom0-a", "xl list")) == ["Domain-0", "domu1"]
    assert names_in(sh(testbed, "dom0-b", "xl list")) == ["Domain-0", "domu2", "driverdom"]  # host-b also has a driver domain
    # two domain tables: the same domid names a different guest on each host
    assert xen.domain("domu1").domid == xen.domain("domu2").domid == 1
    assert testbed.exec("dom0-a", ["xl", "domid", "domu2"]).exit_code != 0
    # each guest's devices, in its own host's store, served by its own dom0
    for guest, dom0 in GUESTS.items():
        domain = xen.domain(guest)
        assert domain.dom0 == dom0
        views = {v.kind: v for v in domain.devices()}
        assert set(views) == {"vbd", "vif"}, views
        assert all(v.backend.startswith("/local/domain/0/backend/") for v in views.values())
        assert " on /dev/loop" in domain.device("vbd", "xvda").wait().detail  # the loop device in its dom0
    # a host is named by its host name or any service of it
    assert xen.domain("Domain-0", xen_host="host-b").service == "dom0-b"
    # the command line, which finds the hosts by the containers' labels alone
    assert cli.main(["xl", "-p", testbed.project_name, "--xen-host", "dom0-b", "list"]) == 0
    assert names_in(capsys.readouterr().out) == ["Domain-0", "domu2", "driverdom"]  # host-b also has a driver domain
    assert cli.main(["status", "-p", testbed.project_name]) == 0
    status = capsys.readouterr().out
    assert "== host-a (xl and store of dom0-a) ==" in status and "== host-b (xl and store of dom0-b) ==" in status
    assert cli.main(["xl", "-p", testbed.project_name, "list"]) == 1  # which host? it says so
    assert "2 Xen hosts" in capsys.readouterr().err


def test_guests_reach_both_hypervisor_sockets_and_use_their_own_hosts(testbed):
    for guest, host in (("domu1", "host-a"), ("domu2", "host-b")):
        sh(testbed, guest, "test -S /run/xenbed/host-a/hypervisor.sock && test -S /run/xenbed/host-b/hypervisor.sock")
        assert sh(testbed, guest, "echo $XENBED_HYPERVISOR_SOCKET").strip() == f"/run/xenbed/{host}/hypervisor.sock"
        # the guest's own store socket, served by its kernel, answers as its host's dom1
        assert sh(testbed, guest, "xenstore-read name").strip() == guest
        assert sh(testbed, guest, "xenstore-read domid").strip() == "1"


def test_guests_write_their_disks_on_the_storage_both_hosts_share(testbed):
    offset_mib = 8
    sums = {}
    for guest in GUESTS:
        sh(testbed, guest, f"head -c 1048576 /dev/urandom > /tmp/chunk && dd if=/tmp/chunk of=/run/xen/vbd/xvda "
                           f"bs=1M seek={offset_mib} conv=fsync,notrunc status=none")
        sums[guest] = sh(testbed, guest, "sha256sum /tmp/chunk").split()[0]
        assert sh(testbed, guest, f"dd if=/run/xen/vbd/xvda bs=1M skip={offset_mib} count=1 status=none "
                                  f"| sha256sum").split()[0] == sums[guest]
    # every image, as either dom0 reads it from the shared mount
    for dom0 in ("dom0-a", "dom0-b"):
        for guest in GUESTS:
            seen = sh(testbed, dom0, f"dd if={IMAGES}/{guest}.img bs=1M skip={offset_mib} count=1 status=none "
                                     f"| sha256sum").split()[0]
            assert seen == sums[guest], f"{dom0} reads {guest}.img differently from what {guest} wrote"


def test_guests_ping_the_peer_and_each_other_across_both_bridges(testbed):
    peer = sh(testbed, "peer", "ip -4 -o addr show scope global").split()[3].split("/")[0]
    address = {guest: wait_until(
        lambda g=guest: (sh(testbed, g, "ip -4 -o addr show dev eth0 2>/dev/null || true").split() or [None] * 4)[3],
        f"{guest}'s eth0 address").split("/")[0] for guest in GUESTS}
    for guest, other in (("domu1", "domu2"), ("domu2", "domu1")):
        for target in (peer, address[other]):
            out = sh(testbed, guest, f"ping -c 3 -i 0.2 -W 3 {target}")
            assert " 0% packet loss" in out, out
    # domu1's frames to domu2 crossed both hosts' bridges: each dom0's own xenbr0 enslaves its own veth
    for dom0 in ("dom0-a", "dom0-b"):
        members = sh(testbed, dom0, "ls /sys/class/net/xenbr0/brif").split()
        assert "vif1.0" in members and len(members) == 2, members
