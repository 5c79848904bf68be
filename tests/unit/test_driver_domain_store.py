"""A disk served by a driver domain (seed 004), as the toolstack writes it,
checked against the real xenstored core's permissions (no Docker).

libxl's ownership: the backend dir belongs to the driver domain and is
readable by the guest; the frontend dir belongs to the guest and is readable
by the driver domain; neither may touch anything else of the other, and the
driver domain nothing of dom0's."""

from __future__ import annotations

import pytest

from tests.unit.xenbus_store import StoreHub
from xenbed.drivers.xen.store import XenStoreError
from xenbed.toolstack import blk, devices, domain_store
from xenbed.toolstack.devices import DeviceError

GUEST, DRIVERDOM = 1, 2
XVDB = 51728


@pytest.fixture
def hub():
    hub = StoreHub()
    dom0 = hub.connect(0)
    domain_store.write_domain(dom0, GUEST, "domu1", 64)
    domain_store.write_domain(dom0, DRIVERDOM, "driverdom", 32)
    return hub


def written_device(hub):
    dom0 = hub.connect(0)
    spec = "backend=driverdom, vdev=xvdb, target=/var/lib/xen/images/dd.img"
    device = blk.vbd_device(blk.parse_disk_spec(spec), GUEST, devices.backend_domid(dom0, "driverdom"))
    devices.write_device(dom0, device)
    return device


def refused(client, op, *args) -> str:
    with pytest.raises(XenStoreError) as caught:
        getattr(client, op)(*args)
    return caught.value.errno_name


def test_backend_names_a_domain_by_name_or_id_and_dom0_by_default(hub):
    dom0 = hub.connect(0)
    assert devices.backend_domid(dom0, "driverdom") == DRIVERDOM
    assert devices.backend_domid(dom0, str(DRIVERDOM)) == DRIVERDOM
    assert devices.backend_domid(dom0, None) == 0
    assert devices.backend_domid(dom0, "Domain-0") == 0
    with pytest.raises(DeviceError, match="nosuch"):
        devices.backend_domid(dom0, "nosuch")
    with pytest.raises(DeviceError, match="99"):
        devices.backend_domid(dom0, "99")


def test_the_driver_domain_owns_its_backend_dir_and_only_reads_the_frontend(hub):
    device = written_device(hub)
    assert device.backend_path == f"/local/domain/{DRIVERDOM}/backend/vbd/{GUEST}/{XVDB}"
    dd, guest = hub.connect(DRIVERDOM), hub.connect(GUEST)
    assert dd.get_perms(device.backend_path) == [f"n{DRIVERDOM}", f"r{GUEST}"]
    assert dd.get_perms(device.frontend_path) == [f"n{GUEST}", f"r{DRIVERDOM}"]
    # the driver domain drives its end, reads the guest's
    dd.write(f"{device.backend_path}/state", "2")
    dd.write(f"{device.backend_path}/physical-device", "7:3")
    assert dd.read(f"{device.frontend_path}/backend-id") == str(DRIVERDOM)
    # the guest reads the backend's, writes only its own
    assert guest.read(f"{device.backend_path}/state") == "2"
    guest.write(f"{device.frontend_path}/state", "3")
    assert refused(guest, "write", f"{device.backend_path}/state", "6") == "EACCES"
    # and nothing else: not the guest's dir, not dom0's, not the guest's domain dir
    assert refused(dd, "write", f"{device.frontend_path}/state", "6") == "EACCES"
    assert refused(dd, "write", "/local/domain/0/name", "evil") == "EACCES"
    assert refused(dd, "write", f"/local/domain/{GUEST}/name", "evil") == "EACCES"
    assert refused(dd, "mkdir", f"/local/domain/{GUEST}/device/vbd/1") == "EACCES"


def test_a_driver_domains_hotplug_outcome_is_what_the_toolstack_waits_for(hub):
    device = written_device(hub)
    dom0, dd = hub.connect(0), hub.connect(DRIVERDOM)
    with pytest.raises(DeviceError, match="timed out"):
        devices.wait_for_hotplug(dom0, device.backend_path, 0.2, "xvdb")
    dd.write(f"{device.backend_path}/hotplug-status", "connected")
    devices.wait_for_hotplug(dom0, device.backend_path, 5, "xvdb")
    dd.write(f"{device.backend_path}/hotplug-error", "/var/lib/xen/images/dd.img: No such file or directory")
    dd.write(f"{device.backend_path}/hotplug-status", "error")
    with pytest.raises(DeviceError, match="No such file"):
        devices.wait_for_hotplug(dom0, device.backend_path, 5, "xvdb")
