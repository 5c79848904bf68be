"""The store as `xenstore-ls -f` prints it -> devices and their states (pure)."""

from xenbed.harness.domains import devices_in, domain_names, parse_xenstore_ls, render_devices_table
from xenbed.protocols.xenbus_state import XenbusState

LISTING = r'''/local = ""
/local/domain = ""
/local/domain/0 = ""
/local/domain/0/name = "Domain-0"
/local/domain/0/backend/vbd/1/51712/state = "4"
/local/domain/0/backend/vbd/1/51712/params = "/var/lib/xen/images/domu1.img"
/local/domain/0/backend/vbd/1/51712/physical-device-path = "/dev/loop3"
/local/domain/0/backend/vif/1/0/state = "2"
/local/domain/0/backend/vif/1/0/bridge = "xenbr0"
/local/domain/1 = ""
/local/domain/1/name = "domu1"
/local/domain/1/device/vbd/51712/state = "4"
/local/domain/1/device/vbd/51712/backend = "/local/domain/0/backend/vbd/1/51712"
/local/domain/1/device/vbd/51712/virtual-device = "51712"
/local/domain/1/device/vif/0/state = "1"
/local/domain/1/device/vif/0/backend = "/local/domain/0/backend/vif/1/0"
/local/domain/1/device/vif/0/mac = "00:16:3e:00:00:01"
/local/domain/1/device/vif/1/state = "3"
/local/domain/1/data/odd = "a\nb\\c"
'''


def test_parse_decodes_escapes_and_full_paths():
    tree = parse_xenstore_ls(LISTING)
    assert tree["/local/domain/0/name"] == "Domain-0"
    assert tree["/local/domain/1/data/odd"] == "a\nb\\c"
    assert domain_names(tree) == {0: "Domain-0", 1: "domu1"}


def test_devices_with_both_states_and_details():
    devices = devices_in(parse_xenstore_ls(LISTING))
    by = {(d.kind, d.devid): d for d in devices}
    disk = by["vbd", "51712"]
    assert (disk.frontend_state, disk.backend_state) == (XenbusState.Connected, XenbusState.Connected)
    assert disk.detail == "xvda /var/lib/xen/images/domu1.img on /dev/loop3"
    nic = by["vif", "0"]
    assert (nic.frontend_state, nic.backend_state) == (XenbusState.Initialising, XenbusState.InitWait)
    assert nic.detail == "00:16:3e:00:00:01 xenbr0"
    orphan = by["vif", "1"]  # a frontend dir naming no backend: the backend's state reads Unknown
    assert orphan.backend == "" and orphan.backend_state == XenbusState.Unknown
    assert [d.devid for d in devices_in(parse_xenstore_ls(LISTING), domid=2)] == []


def test_table_names_domains_and_states():
    tree = parse_xenstore_ls(LISTING)
    table = render_devices_table(devices_in(tree), domain_names(tree)).splitlines()
    assert table[0].split() == ["DOMAIN", "DEVICE", "FRONTEND", "BACKEND", "DETAIL"]
    assert table[1].startswith("domu1") and "Connected (4)" in table[1] and "in dom0" in table[1]
    assert render_devices_table([]) == "(no PV devices)"
