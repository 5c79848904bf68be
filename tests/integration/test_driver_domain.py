"""A driver domain (seed 004: a domain with the backend, "physical device",
privilege only) serving a guest's disk (compose/driver-domain.yml).

dom0's `xl create` made `driverdom` with `driver_domain = 1`; its kernel runs
blkback, which runs the block hotplug step itself (what `xl devd` does on
Xen) on images in its own storage.  dom0's toolstack writes the device with
libxl's permissions and waits for the driver domain's hotplug outcome; the
guest grants its ring and data pages to the driver domain; the hypervisor
lets the driver domain map those and nothing else, and gives it no control.
"""

from __future__ import annotations

import json
import time

import pytest

from xenbed.protocols.xenbus_state import Transition, violations
from integration_helpers import run, sh, transitions, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.testbed_compose("compose/driver-domain.yml")]

IMAGES = "/var/lib/xen/images"
XVDA, XVDB, XVDC = 51712, 51728, 51744
TRANSITIONS = "/run/xen/transitions.jsonl"


@pytest.fixture(scope="module")
def testbed(private_testbed):
    return private_testbed


@pytest.fixture(scope="module")
def ids(testbed) -> dict[str, int]:
    found = {name: int(sh(testbed, "dom0", f"xl domid {name}")) for name in ("driverdom", "domu1")}
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvda"]).exit_code == 0, "domu1's xvda")
    return found


def attach_from_driverdom(testbed, vdev: str, image: str) -> None:
    sh(testbed, "driverdom", f"truncate -s 16M {IMAGES}/{image}")
    sh(testbed, "dom0", f"xl block-attach domu1 'backend=driverdom, vdev={vdev}, target={IMAGES}/{image}'")
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", f"/run/xen/vbd/{vdev}"]).exit_code == 0,
               f"/run/xen/vbd/{vdev} in domu1")


def loop_of(testbed, backend: str) -> str:
    """The driver domain's loop device behind a backend dir, as its hotplug step named it."""
    major, minor = (int(x, 16) for x in sh(testbed, "driverdom", f"xenstore-read {backend}/physical-device").split(":"))
    assert major == 7
    return f"/dev/loop{minor}"


def perms(testbed, path: str) -> str:
    """A node's permissions as `xenstore-ls -p` prints them in dom0 ("n2,r1")."""
    for line in sh(testbed, "dom0", f"xenstore-ls -f -p {path.rsplit('/', 1)[0]}").splitlines():
        if line.split(" = ")[0] == path:
            return line.rsplit("(", 1)[1].rstrip(")")
    raise AssertionError(f"{path} not in the store")


def test_the_driver_domain_has_the_backend_privilege_only(testbed, ids):
    listing = sh(testbed, "dom0", "xl list")
    assert "driverdom" in listing
    whoami = sh(testbed, "driverdom", "python3 -c \"import json; from xenbed.drivers.xen.hypercall import "
                                      "HypervisorLink as L; l = L.open(role='device'); "
                                      "print(json.dumps([l.domid, l.privilege]))\"")
    assert json.loads(whoami) == [ids["driverdom"], "backend"]


def test_a_guests_disk_served_by_the_driver_domain(testbed, ids):
    dd, guest = ids["driverdom"], ids["domu1"]
    attach_from_driverdom(testbed, "xvdb", "dd.img")
    backend = f"/local/domain/{dd}/backend/vbd/{guest}/{XVDB}"
    frontend = f"/local/domain/{guest}/device/vbd/{XVDB}"
    # where the toolstack put the device, and libxl's ownership of both dirs
    assert sh(testbed, "domu1", f"xenstore-read {frontend}/backend").strip() == backend
    assert sh(testbed, "domu1", f"xenstore-read {frontend}/backend-id").strip() == str(dd)
    assert perms(testbed, backend) == f"n{dd},r{guest}"     # the driver domain's, the guest reads it
    assert perms(testbed, frontend) == f"n{guest},r{dd}"    # the guest's, the driver domain reads it
    block_list = sh(testbed, "dom0", "xl block-list domu1").splitlines()
    row = next(line.split() for line in block_list if line.startswith(str(XVDB)))
    assert row[1] == str(dd) and row[-1] == backend, block_list
    # the image and its loop device are the driver domain's, not dom0's
    assert run(testbed, "dom0", f"test -e {IMAGES}/dd.img").exit_code != 0
    loop = loop_of(testbed, backend)
    assert sh(testbed, "driverdom", f"xenstore-read {backend}/physical-device-path").strip() == loop
    assert f"{IMAGES}/dd.img" in sh(testbed, "driverdom", f"losetup -nO BACK-FILE {loop}")

    # 1 MiB of random data from the guest, read back by it, and found on the driver domain's loop and image
    offset_mib = 5
    sh(testbed, "domu1", f"head -c 1048576 /dev/urandom > /tmp/chunk && dd if=/tmp/chunk of=/run/xen/vbd/xvdb "
                         f"bs=1M seek={offset_mib} conv=fsync,notrunc status=none")
    written = sh(testbed, "domu1", "sha256sum /tmp/chunk").split()[0]
    read_back = sh(testbed, "domu1", f"dd if=/run/xen/vbd/xvdb bs=1M skip={offset_mib} count=1 iflag=direct "
                                     f"status=none | sha256sum").split()[0]
    on_loop = sh(testbed, "driverdom", f"dd if={loop} bs=1M skip={offset_mib} count=1 iflag=direct status=none "
                                       f"| sha256sum").split()[0]
    in_image = sh(testbed, "driverdom", f"dd if={IMAGES}/dd.img bs=1M skip={offset_mib} count=1 status=none "
                                        f"| sha256sum").split()[0]
    assert read_back == on_loop == in_image == written

    # the driver domain's blkback negotiated as seed 000 says, and recorded it in the driver domain
    back = [(t.old.name, t.new.name) for t in transitions(testbed, "driverdom") if t.path == backend]
    assert back == [("Initialising", "InitWait"), ("InitWait", "Connected")], back

    sh(testbed, "dom0", "xl block-detach domu1 xvdb")
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvdb"]).exit_code != 0,
               "/run/xen/vbd/xvdb to go away in domu1")
    wait_until(lambda: "dd.img" not in sh(testbed, "driverdom", "losetup -a || true"),
               "the driver domain's loop device to be released", timeout=10)
    for path in (backend, frontend, f"/local/domain/{dd}/backend/vbd/{guest}"):
        assert run(testbed, "dom0", f"xenstore-exists {path}").exit_code != 0, f"{path} left behind"
    back = [(t.old.name, t.new.name) for t in transitions(testbed, "driverdom") if t.path == backend]
    assert back[-1] == ("Closing", "Closed"), back
    assert violations(transitions(testbed, "driverdom") + transitions(testbed, "domu1")) == []


REFUSALS = r"""
import json, sys
from xenbed.drivers.xen.hypercall import HypercallError, HypervisorLink
from xenbed.protocols import hypercall as hc
guest, ring_ref = int(sys.argv[1]), int(sys.argv[2])
link = HypervisorLink.open(role="device")
calls = {
    "create": (hc.Call.DOMAIN_CREATE, {"name": "evil", "memory_mb": 16, "privilege": "backend"}),
    "destroy": (hc.Call.DOMAIN_DESTROY, {"domid": guest}),
    "pause": (hc.Call.DOMAIN_PAUSE, {"domid": guest}),
    "list": (hc.Call.DOMAIN_LIST, {}),
    "audit": (hc.Call.AUDIT, {}),
    # the ring of the guest's dom0-served disk: granted to dom0, not to us
    "map_not_granted": (hc.Call.GNTTAB_MAP, {"domid": guest, "gref": ring_ref, "readonly": True}),
    "copy_not_granted": (hc.Call.GNTTAB_COPY, {"ops": [{"src": {"domid": guest, "gref": ring_ref, "offset": 0},
                                                        "dst": {"gfn": 0, "offset": 0}, "len": 8}]}),
}
out = {}
for name, (call, body) in calls.items():
    try:
        out[name] = ["allowed", link.call(call, body)]
    except HypercallError as exc:
        out[name] = [exc.code, exc.message]
print(json.dumps(out))
"""


def test_the_driver_domain_controls_nothing(testbed, ids):
    dd, guest = ids["driverdom"], ids["domu1"]
    ring_ref = sh(testbed, "dom0", f"xenstore-read /local/domain/{guest}/device/vbd/{XVDA}/ring-ref").strip()
    outcome = json.loads(testbed.exec("driverdom", ["python3", "-c", REFUSALS, str(guest), ring_ref],
                                      check=True).stdout)
    for call in ("create", "destroy", "pause", "list", "audit"):
        assert outcome[call][0] == "EPERM", (call, outcome[call])
    # Xen's answer to a grant entry that names another domain ("Bad flags or dom")
    assert outcome["map_not_granted"][0] == "GNTST_general_error", outcome["map_not_granted"]
    copy = outcome["copy_not_granted"]
    assert copy[0] != "allowed" or copy[1]["statuses"][0] != 0, copy
    # no guest memory to open behind the hypervisor's back: the volume is dom0's and the hypervisor's only
    assert run(testbed, "driverdom", "ls /var/lib/xenbed/memory").exit_code != 0
    # the toolstack, run there, is refused by the hypervisor
    refused = run(testbed, "driverdom", "printf 'name = \"evil\"\\nmemory = 16\\n' > /tmp/evil.cfg && xl create /tmp/evil.cfg")
    assert refused.exit_code != 0 and "control privilege" in refused.stderr, refused.stderr
    # the store: not dom0's nodes, not the guest's, not its device dirs
    for path in ("/local/domain/0/name", f"/local/domain/{guest}/name",
                 f"/local/domain/{guest}/device/vbd/{XVDA}/state"):
        result = run(testbed, "driverdom", f"xenstore-write {path} evil")
        assert result.exit_code != 0 and "could not write" in result.stderr, (path, result.stderr)
        assert sh(testbed, "dom0", f"xenstore-read {path}").strip() != "evil"
    assert run(testbed, "driverdom", f"xenstore-rm /local/domain/{guest}").exit_code != 0
    # and everything it was refused is still as it was
    assert sh(testbed, "dom0", "xl list domu1").splitlines()[1].split()[4] == "r-----"
    assert sh(testbed, "dom0", f"xenstore-read /local/domain/{guest}/name").strip() == "domu1"
    assert "evil" not in sh(testbed, "dom0", "xl list")


def test_a_killed_driver_domain_blkback_comes_back_and_the_guests_disk_recovers(testbed, ids):
    """Its kernel restarts the module; blkback.recover finds the device,
    redoes the hotplug step in the driver domain and takes it through Closed,
    and blkfront reconnects on a new ring, keeping its file open."""
    dd, guest = ids["driverdom"], ids["domu1"]
    attach_from_driverdom(testbed, "xvdc", "recover.img")
    backend = f"/local/domain/{dd}/backend/vbd/{guest}/{XVDC}"
    old_loop = loop_of(testbed, backend)
    testbed.kill_process("driverdom", "[x]enbed.drivers.blk.back")
    # writes in the guest wait for the new ring, then land on the new loop device
    sh(testbed, "domu1", "head -c 1048576 /dev/urandom > /tmp/chunk2 && timeout 60 dd if=/tmp/chunk2 "
                         "of=/run/xen/vbd/xvdc bs=1M seek=2 conv=fsync,notrunc status=none")
    written = sh(testbed, "domu1", "sha256sum /tmp/chunk2").split()[0]
    wait_until(lambda: run(testbed, "dom0", f"xenstore-read {backend}/state").stdout.strip() == "4",
               "the recovered backend to be Connected")
    loop = loop_of(testbed, backend)
    on_loop = sh(testbed, "driverdom", f"dd if={loop} bs=1M skip=2 count=1 iflag=direct status=none "
                                       f"| sha256sum").split()[0]
    assert on_loop == written
    back = [(t.old.name, t.new.name) for t in transitions(testbed, "driverdom") if t.path == backend]
    assert ("Connected", "Closed") in back and back[-1] == ("InitWait", "Connected"), back
    sh(testbed, "dom0", "xl block-detach domu1 xvdc")
    wait_until(lambda: "recover.img" not in sh(testbed, "driverdom", "losetup -a || true"),
               f"the driver domain's loop devices ({old_loop}, {loop}) to be released", timeout=10)
