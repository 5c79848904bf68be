"""Reconfiguration while Connected (seed 000, Device reconfiguration), on
blkback's side: an online resize of the loop device and a cdrom media change
through the hotplug `change` step, against an in-process xenstored and real
loop devices (root + /dev/loop-control, as on the xenbed host).  Both must
leave the backend Connected -- no state transition recorded -- while
`sectors` follows, and must leak no loop device."""

from __future__ import annotations

import errno
import os
import time

import pytest

from xenbed.drivers.blk import hotplug, loop
from xenbed.protocols.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, BlkifRequest, Segment

from .test_blkback_xenbus import BACK, FRONT, World, connect


def wait_for(probe, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def transitions_of_backend(world):
    return [(t.old.name, t.new.name) for t in world.bus.recorder.for_path(BACK)]


def test_a_grown_loop_device_is_published_within_a_second_while_idle(world):
    connect(world)
    before = transitions_of_backend(world)
    assert before == [("Initialising", "InitWait"), ("InitWait", "Connected")]
    [(dev, _)] = world.loops()
    os.truncate(world.image, 8 << 20)
    st = os.stat(world.image)
    assert loop.set_capacity(dev, st.st_dev, st.st_ino) == 8 << 20
    started = time.monotonic()
    wait_for(lambda: world.store.read(f"{BACK}/sectors") == str((8 << 20) // 512), "the new sectors")
    assert time.monotonic() - started < 1.0  # no I/O on the ring: the idle poll saw it
    assert world.store.read(f"{BACK}/state") == "4"
    assert transitions_of_backend(world) == before  # the Connected rewrite is not a transition
    # the new end is served: a write and a read past the old 4 MiB
    g, page = world.grants.grant_page()
    page[:4096] = b"N" * 4096
    last = (8 << 20) // 512 - 8
    assert world.io(BlkifRequest(BLKIF_OP_WRITE, 0, 1, last, (Segment(g, 0, 7),))).status == BLKIF_RSP_OKAY
    r, rpage = world.grants.grant_page()
    assert world.io(BlkifRequest(BLKIF_OP_READ, 0, 2, last, (Segment(r, 0, 7),))).status == BLKIF_RSP_OKAY
    assert rpage[:4096] == b"N" * 4096
    with open(world.image, "rb") as f:
        f.seek((8 << 20) - 4096)
        assert f.read(4096) == b"N" * 4096
    assert world.backend_states[-1] == "4" and "5" not in world.backend_states


def test_set_capacity_refuses_a_loop_that_backs_another_file(world, tmp_path):
    connect(world)
    [(dev, _)] = world.loops()
    other = os.stat(tmp_path)
    with pytest.raises(loop.LoopError) as raised:
        loop.set_capacity(dev, other.st_dev, other.st_ino)
    assert raised.value.errno == errno.ESTALE


class CdromWorld(World):
    """The World of test_blkback_xenbus with a cdrom drive and two media."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        with open(self.image, "wb") as f:
            f.write(b"A" * (1 << 20))
        self.second = str(tmp_path / "second.iso")
        with open(self.second, "wb") as f:
            f.write(b"B" * (2 << 20))

    def toolstack_create(self, mode="r"):
        super().toolstack_create(mode="r")
        self.store.write(f"{BACK}/device-type", "cdrom")
        self.store.write(f"{FRONT}/device-type", "cdrom")

    def all_loops(self):
        return self.loops() + loop.find_by_backing_file(self.second)

    def close(self):
        for dev, _ in loop.find_by_backing_file(self.second):
            loop.detach(dev)
        super().close()


@pytest.fixture
def cdrom(tmp_path):
    w = CdromWorld(tmp_path)
    yield w
    w.close()


def read_first_page(world) -> tuple[int, bytes]:
    g, page = world.grants.grant_page()
    rsp = world.io(BlkifRequest(BLKIF_OP_READ, 0, 9, 0, (Segment(g, 0, 7),)))
    return rsp.status, bytes(page[:4096])


def test_cdrom_eject_and_insert_stay_connected_and_leak_no_loop(cdrom):
    connect(cdrom)
    assert cdrom.store.read(f"{BACK}/info") == str(1 | 2 | 4)  # VDISK_CDROM | REMOVABLE | READONLY
    assert read_first_page(cdrom) == (BLKIF_RSP_OKAY, b"A" * 4096)
    before = transitions_of_backend(cdrom)

    cdrom.store.write(f"{BACK}/params", "")  # xl cd-eject
    assert hotplug.change(cdrom.store, BACK) is None
    wait_for(lambda: cdrom.store.read(f"{BACK}/sectors") == "0", "sectors 0")
    assert cdrom.store.try_read(f"{BACK}/physical-device") is None
    wait_for(lambda: cdrom.all_loops() == [], "the first medium's loop to go")
    status, _ = read_first_page(cdrom)
    assert status != BLKIF_RSP_OKAY  # nothing to read in an empty drive

    cdrom.store.write(f"{BACK}/params", cdrom.second)  # xl cd-insert
    dev = hotplug.change(cdrom.store, BACK)
    wait_for(lambda: cdrom.store.read(f"{BACK}/sectors") == str((2 << 20) // 512), "the second medium's sectors")
    assert cdrom.store.read(f"{BACK}/physical-device") == dev.physical_device
    assert read_first_page(cdrom) == (BLKIF_RSP_OKAY, b"B" * 4096)
    [(held, info)] = cdrom.all_loops()
    assert held == dev and info.autoclear and info.readonly

    cdrom.store.write(f"{BACK}/params", cdrom.image)  # and back, straight from one medium to another
    hotplug.change(cdrom.store, BACK)
    wait_for(lambda: cdrom.store.read(f"{BACK}/sectors") == str((1 << 20) // 512), "the first medium again")
    assert read_first_page(cdrom) == (BLKIF_RSP_OKAY, b"A" * 4096)
    wait_for(lambda: loop.find_by_backing_file(cdrom.second) == [], "the second medium's loop to go")
    assert len(cdrom.all_loops()) == 1

    assert cdrom.store.read(f"{BACK}/state") == "4"
    assert transitions_of_backend(cdrom) == before
    assert "5" not in cdrom.backend_states


def test_a_failed_insert_keeps_the_old_medium(cdrom):
    connect(cdrom)
    physdev = cdrom.store.read(f"{BACK}/physical-device")
    cdrom.store.write(f"{BACK}/params", "/nonexistent/disc.iso")
    with pytest.raises(hotplug.HotplugError):
        hotplug.change(cdrom.store, BACK)
    assert "nonexistent" in cdrom.store.read(f"{BACK}/hotplug-error")
    assert cdrom.store.read(f"{BACK}/hotplug-status") == "connected"
    assert cdrom.store.read(f"{BACK}/physical-device") == physdev
    assert read_first_page(cdrom) == (BLKIF_RSP_OKAY, b"A" * 4096)


def test_a_disk_refuses_a_new_physical_device_as_before(world, tmp_path):
    """Only a cdrom's medium may change under a live connection; a disk
    keeps the device it opened (Linux: "changing physical device ... not
    supported")."""
    connect(world)
    physdev = world.store.read(f"{BACK}/physical-device")
    other = tmp_path / "other.img"
    other.write_bytes(b"O" * (1 << 20))
    world.store.write(f"{BACK}/params", str(other))
    dev = hotplug.change(world.store, BACK)
    try:
        time.sleep(0.3)
        assert world.store.read(f"{BACK}/sectors") == "8192"
        g, page = world.grants.grant_page()
        assert world.io(BlkifRequest(BLKIF_OP_READ, 0, 4, 0, (Segment(g, 0, 7),))).status == BLKIF_RSP_OKAY
        assert bytes(page[:4]) != b"OOOO"
    finally:
        loop.detach(dev)
        world.store.write(f"{BACK}/physical-device", physdev)
