"""Block devices end to end, across the containers (seed 000).

domu1 boots with xvda from compose/domains/domu1.cfg: blkback in dom0 serves a
real loop device, blkfront in domu1 exposes it as /run/xen/vbd/xvda through
FUSE.  Every state change of both ends is recorded (XENBED_TRANSITIONS) and
checked against the seed's table.
"""

from __future__ import annotations

import time

import pytest

from xenbed.protocols.xenbus_state import Transition, violations
from integration_helpers import run, sh, transitions, wait_until

pytestmark = pytest.mark.integration

TRANSITIONS = "/run/xen/transitions.jsonl"
XVDA = 51712
XVDB = 51728


def sequence(ts: list[Transition], path_suffix: str) -> list[tuple[str, str]]:
    return [(t.old.name, t.new.name) for t in ts if t.path.endswith(path_suffix)]


@pytest.fixture(scope="module")
def domu1(testbed) -> int:
    domid = int(testbed.exec("dom0", ["xl", "domid", "domu1"], check=True).stdout)
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvda"]).exit_code == 0,
               "/run/xen/vbd/xvda in domu1")
    return domid


def test_boot_disk_connects_as_seed_000_says(testbed, domu1):
    back = sequence(transitions(testbed, "dom0"), f"/backend/vbd/{domu1}/{XVDA}")
    front = sequence(transitions(testbed, "domu1"), f"/device/vbd/{XVDA}")
    assert back[:2] == [("Initialising", "InitWait"), ("InitWait", "Connected")], back
    assert front[:2] == [("Initialising", "Initialised"), ("Initialised", "Connected")], front
    assert violations(transitions(testbed, "dom0") + transitions(testbed, "domu1")) == []
    # the backend's details, written before Connected
    backend = f"/local/domain/0/backend/vbd/{domu1}/{XVDA}"
    assert sh(testbed, "dom0", f"xenstore-read {backend}/sectors").strip() == str(64 * 1024 * 1024 // 512)
    assert sh(testbed, "dom0", f"xenstore-read {backend}/physical-device").strip().startswith("7:")


def test_mkfs_and_fsck_on_the_guests_disk(testbed, domu1):
    sh(testbed, "domu1", "mkfs.ext4 -q -F /run/xen/vbd/xvda")
    result = run(testbed, "domu1", "fsck.ext4 -f -n /run/xen/vbd/xvda")
    assert result.exit_code == 0, result.stdout + result.stderr


def test_guest_writes_land_bit_for_bit_on_dom0s_loop_device(testbed, domu1):
    offset_mib = 40  # past the filesystem's busy start
    sh(testbed, "domu1", f"head -c 1048576 /dev/urandom > /tmp/chunk && "
                         f"dd if=/tmp/chunk of=/run/xen/vbd/xvda bs=1M seek={offset_mib} conv=fsync,notrunc status=none")
    guest = sh(testbed, "domu1", "sha256sum /tmp/chunk").split()[0]
    backend = f"/local/domain/0/backend/vbd/{domu1}/{XVDA}"
    major, minor = (int(x, 16) for x in sh(testbed, "dom0", f"xenstore-read {backend}/physical-device").split(":"))
    assert major == 7
    on_loop = sh(testbed, "dom0", f"dd if=/dev/loop{minor} bs=1M skip={offset_mib} count=1 status=none | sha256sum")
    assert on_loop.split()[0] == guest
    # and the other way: dom0 reads its image file, the guest reads the same bytes
    image = sh(testbed, "dom0", f"xenstore-read {backend}/params").strip()
    host_side = sh(testbed, "dom0", f"dd if={image} bs=1M skip={offset_mib} count=1 status=none | sha256sum")
    assert host_side.split()[0] == guest


def test_block_attach_and_detach_live(testbed, domu1):
    sh(testbed, "dom0", "truncate -s 16M /var/lib/xen/images/extra.img")
    sh(testbed, "dom0", "xl block-attach domu1 'format=raw, vdev=xvdb, access=rw, target=/var/lib/xen/images/extra.img'")
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvdb"]).exit_code == 0,
               "/run/xen/vbd/xvdb to appear in domu1")
    assert sh(testbed, "domu1", "stat -c %s /run/xen/vbd/xvdb").strip() == str(16 * 1024 * 1024)
    listing = sh(testbed, "dom0", "xl block-list domu1")
    assert str(XVDB) in listing and str(XVDA) in listing
    sh(testbed, "domu1", "printf hello | dd of=/run/xen/vbd/xvdb bs=512 seek=3 conv=fsync,notrunc status=none")
    assert sh(testbed, "dom0", "dd if=/var/lib/xen/images/extra.img bs=512 skip=3 count=1 status=none | head -c 5") == "hello"

    sh(testbed, "dom0", "xl block-detach domu1 xvdb")
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvdb"]).exit_code != 0,
               "/run/xen/vbd/xvdb to go away in domu1")
    assert "extra.img" not in sh(testbed, "dom0", "losetup -a || true"), "the loop device was left behind"
    assert run(testbed, "dom0", f"xenstore-exists /local/domain/0/backend/vbd/{domu1}/{XVDB}").exit_code != 0
    assert testbed.exec("dom0", ["xenstore-exists", f"/local/domain/{domu1}/device/vbd/{XVDB}"]).exit_code != 0
    # closedown as seed 000: backend Closing (toolstack) -> frontend Closing -> Closed, Closed
    front = sequence(transitions(testbed, "domu1"), f"/device/vbd/{XVDB}")
    back = sequence(transitions(testbed, "dom0"), f"/backend/vbd/{domu1}/{XVDB}")
    assert front == [("Initialising", "Initialised"), ("Initialised", "Connected"),
                     ("Connected", "Closing"), ("Closing", "Closed")], front
    assert back[:2] == [("Initialising", "InitWait"), ("InitWait", "Connected")], back
    assert back[-1] == ("Closing", "Closed"), back
    assert violations(transitions(testbed, "dom0") + transitions(testbed, "domu1")) == []


def test_a_read_only_disk_is_read_only_to_the_guest(testbed, domu1):
    sh(testbed, "dom0", "head -c 4194304 /dev/zero | tr '\\0' 'R' > /var/lib/xen/images/ro.img")
    sh(testbed, "dom0", "xl block-attach domu1 'format=raw, vdev=xvdc, access=ro, target=/var/lib/xen/images/ro.img'")
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvdc"]).exit_code == 0, "xvdc")
    assert sh(testbed, "domu1", "head -c 4 /run/xen/vbd/xvdc") == "RRRR"
    write = run(testbed, "domu1", "printf x | dd of=/run/xen/vbd/xvdc conv=notrunc status=none")
    assert write.exit_code != 0
    assert sh(testbed, "dom0", "head -c 1 /var/lib/xen/images/ro.img") == "R"
    sh(testbed, "dom0", "xl block-detach domu1 xvdc")
    assert "ro.img" not in sh(testbed, "dom0", "losetup -a || true")


def test_frontend_initiated_closedown_when_the_guest_shuts_its_disks(testbed, xen):
    """Seed 000's second closedown: the frontend goes Closing first (here the
    guest's blkfront stops, as at guest shutdown), the backend follows."""
    domid = xen.create_domain("closer", memory_mb=16)
    try:
        sh(testbed, "dom0", "truncate -s 8M /var/lib/xen/images/closer.img")
        sh(testbed, "dom0", "xl block-attach closer 'vdev=xvda, target=/var/lib/xen/images/closer.img'")
        wait_until(lambda: testbed.exec("closer", ["test", "-e", "/run/xen/vbd/xvda"]).exit_code == 0,
                   "/run/xen/vbd/xvda in closer")
        testbed.kill_process("closer", "[x]enbed.drivers.blk.front", "SIGTERM")
        backend = f"/local/domain/0/backend/vbd/{domid}/{XVDA}"
        wait_until(lambda: run(testbed, "dom0", f"xenstore-read {backend}/state").stdout.strip() == "6",
                   f"{backend} to reach Closed")
        front = sequence(transitions(testbed, "closer"), f"/device/vbd/{XVDA}")
        back = sequence(transitions(testbed, "dom0"), f"/backend/vbd/{domid}/{XVDA}")
        assert front == [("Initialising", "Initialised"), ("Initialised", "Connected"),
                         ("Connected", "Closing"), ("Closing", "Closed")], front
        assert back == [("Initialising", "InitWait"), ("InitWait", "Connected"),
                        ("Connected", "Closing"), ("Closing", "Closed")], back
        first_closing = {t.role.value: t.timestamp for t in
                         transitions(testbed, "closer") + transitions(testbed, "dom0")
                         if t.new.name == "Closing" and t.path.endswith(f"/{XVDA}") and
                         (f"/{domid}/" in t.path)}
        assert first_closing["frontend"] < first_closing["backend"], first_closing
        sh(testbed, "dom0", "xl block-detach closer xvda")
        assert "closer.img" not in sh(testbed, "dom0", "losetup -a || true")
    finally:
        xen.destroy_domain("closer")
