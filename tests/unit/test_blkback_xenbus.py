"""blkback's XenBus side (seed 000) against an in-process xenstored, a real
loop device (root + /dev/loop-control, as on the xenbed host) and in-process
grants/event channels: init in both orders, toolstack- and frontend-initiated
closedown, reconnect, bad frontend keys."""

from __future__ import annotations

import os
import time

import pytest

from xenbed.drivers.blk import hotplug, loop
from xenbed.drivers.blk.back import Blkback
from xenbed.drivers.xen.store import XenStoreClient
from xenbed.drivers.xenbus import BackendBus
from xenbed.protocols.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, BlkifRequest, Segment

from .test_blkback_support import FakeEvtchn, FakeFront, FakeGrants, InProcessXenstored

BACK = "/local/domain/0/backend/vbd/1/51712"
FRONT = "/local/domain/1/device/vbd/51712"


class World:
    def __init__(self, tmp_path):
        assert os.geteuid() == 0 and os.path.exists(loop.LOOP_CONTROL), "needs root and /dev/loop-control"
        self.xsd = InProcessXenstored(str(tmp_path / "xs.sock"))
        self.store = XenStoreClient(self.xsd.path)  # toolstack + frontend
        self.grants, self.evtchn = FakeGrants(domid=1), FakeEvtchn()
        self.driver = Blkback(self.grants, self.evtchn)
        self.bus = BackendBus(XenStoreClient(self.xsd.path), 0, [self.driver])
        self.image = str(tmp_path / "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(4 << 20)
        self.backend_states: list[str] = []
        self.store.watch(f"{BACK}/state", "states", lambda *_: self._record())
        self.bus.start()

    def _record(self):
        value = self.store.try_read(f"{BACK}/state")
        if value is not None and (not self.backend_states or self.backend_states[-1] != value):
            self.backend_states.append(value)

    def toolstack_create(self, mode="w"):
        def body(tx):
            for k, v in {"frontend": FRONT, "frontend-id": "1", "state": "1", "online": "1", "params": self.image,
                         "mode": mode, "device-type": "disk"}.items():
                self.store.write(f"{BACK}/{k}", v, tx)
            for k, v in {"backend": BACK, "backend-id": "0", "state": "1", "virtual-device": "51712"}.items():
                self.store.write(f"{FRONT}/{k}", v, tx)
        self.store.run_transaction(body)

    def frontend_initialise(self, **override):
        self.front = FakeFront(self.grants)
        keys = {"ring-ref": str(self.front.refs[0]), "event-channel": "7", "protocol": "x86_64-abi",
                "feature-persistent": "1"} | override
        for k, v in keys.items():
            self.store.write(f"{FRONT}/{k}", v)
        self.store.write(f"{FRONT}/state", "3")

    def wait_state(self, path, value, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.try_read(f"{path}/state") == value:
                return
            time.sleep(0.02)
        raise AssertionError(f"{path}/state is {self.store.try_read(f'{path}/state')}, wanted {value}; "
                             f"backend went {self.backend_states}")

    def port(self):
        return self.driver.connection(BACK).port

    def io(self, req):
        port = self.port()
        before = self.evtchn.notified.get(port, 0)
        self.front.push(req)
        self.evtchn.kick(port)
        assert self.evtchn.wait_notified(port, before + 1)
        [rsp] = self.front.responses()
        self.front.ring.final_check_for_responses()
        return rsp

    def loops(self):
        return loop.find_by_backing_file(self.image)

    def disk_open(self):
        dev = self.bus.devices.get(BACK)
        return dev is not None and dev.priv is not None and dev.priv.disk is not None

    def close(self):
        violations = self.bus.recorder.check()
        self.bus.close()
        self.driver.shutdown()
        for dev, _ in self.loops():
            loop.detach(dev)
        self.store.close()
        self.bus.store.close()
        self.xsd.close()
        assert not violations, violations


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def connect(world, hotplug_first=True):
    world.toolstack_create()
    world.wait_state(BACK, "2")  # probe -> InitWait
    assert world.store.read(f"{BACK}/feature-max-indirect-segments") == "256"
    if hotplug_first:
        hotplug.add(world.store, BACK)
        time.sleep(0.2)
        assert world.store.read(f"{BACK}/state") == "2"  # still waiting for the frontend
        world.frontend_initialise()
    else:
        world.frontend_initialise()
        time.sleep(0.2)
        assert world.store.read(f"{BACK}/state") == "2"  # still waiting for hotplug
        hotplug.add(world.store, BACK)
    world.wait_state(BACK, "4")


@pytest.mark.parametrize("hotplug_first", [True, False], ids=["hotplug-then-frontend", "frontend-then-hotplug"])
def test_init_in_either_order_then_io(world, hotplug_first):
    connect(world, hotplug_first)
    keys = {k: world.store.try_read(f"{BACK}/{k}") for k in (
        "sectors", "info", "sector-size", "physical-sector-size", "feature-flush-cache", "feature-discard",
        "discard-granularity", "discard-alignment", "feature-persistent", "feature-max-indirect-segments")}
    assert keys == {"sectors": "8192", "info": "0", "sector-size": "512", "physical-sector-size": "512",
                    "feature-flush-cache": "1", "feature-discard": "1", "discard-granularity": "4096",
                    "discard-alignment": "0", "feature-persistent": "1", "feature-max-indirect-segments": "256"}
    physdev = world.store.read(f"{BACK}/physical-device")
    [(dev, info)] = world.loops()
    assert physdev == dev.physical_device and info.autoclear  # blkback holds it open with autoclear
    g, page = world.grants.grant_page()
    page[:4096] = b"Z" * 4096
    assert world.io(BlkifRequest(BLKIF_OP_WRITE, 0, 1, 8, (Segment(g, 0, 7),))).status == BLKIF_RSP_OKAY
    with open(world.image, "rb") as f:  # acknowledged = on the loop device = in the file
        f.seek(4096)
        assert f.read(4096) == b"Z" * 4096
    r, rpage = world.grants.grant_page()
    assert world.io(BlkifRequest(BLKIF_OP_READ, 0, 2, 8, (Segment(r, 0, 7),))).status == BLKIF_RSP_OKAY
    assert rpage[:4096] == b"Z" * 4096
    assert world.backend_states == ["1", "2", "4"][-len(world.backend_states):]


def test_toolstack_initiated_closedown_frees_the_loop(world):
    connect(world)
    world.store.run_transaction(lambda tx: (world.store.write(f"{BACK}/online", "0", tx),
                                            world.store.write(f"{BACK}/state", "5", tx)))
    world.store.write(f"{FRONT}/state", "5")  # frontend follows: Closing, flushes
    time.sleep(0.2)
    assert world.store.read(f"{BACK}/state") == "5"
    world.store.write(f"{FRONT}/state", "6")
    world.wait_state(BACK, "6")
    deadline = time.monotonic() + 5
    while world.loops() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert world.loops() == []  # unregistered: disk closed, autoclear freed the loop
    assert not world.disk_open() and not world.grants.live
    assert world.evtchn.closed
    assert hotplug.remove(world.store, BACK) is False  # nothing left to detach
    assert world.store.try_read(f"{BACK}/physical-device") is None
    while world.backend_states[-1:] != ["6"] and time.monotonic() < deadline:  # the watch catches up
        time.sleep(0.01)
    assert world.backend_states[-3:] == ["4", "5", "6"]


def test_frontend_initiated_close_then_reconnect(world):
    connect(world)
    world.store.write(f"{FRONT}/state", "5")
    world.wait_state(BACK, "5")
    assert not world.grants.live  # drained and unmapped before Closing
    world.store.write(f"{FRONT}/state", "6")
    world.wait_state(BACK, "6")
    assert world.disk_open() and len(world.loops()) == 1  # online: the device and its disk stay
    world.store.write(f"{FRONT}/state", "1")  # frontend resets (migration / reconnect)
    world.wait_state(BACK, "2")
    world.frontend_initialise()
    world.wait_state(BACK, "4")
    g, page = world.grants.grant_page()
    assert world.io(BlkifRequest(BLKIF_OP_READ, 0, 3, 0, (Segment(g, 0, 7),))).status == BLKIF_RSP_OKAY
    # backend_states is filled by a watch: let it catch up with the store
    deadline = time.monotonic() + 5
    while world.backend_states[-1:] != ["4"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert world.backend_states[-5:] == ["4", "5", "6", "2", "4"]


def test_bad_frontend_protocol_is_fatal(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    hotplug.add(world.store, BACK)
    world.frontend_initialise(protocol="x86_32-abi")
    world.wait_state(BACK, "5")
    assert "x86_32-abi" in world.store.read(world.bus.devices[BACK].error_path)  # Linux: <domain>/error/<nodename>/error
    assert not world.grants.live  # nothing mapped


def test_read_only_disk_is_advertised_read_only(world):
    world.toolstack_create(mode="r")
    world.wait_state(BACK, "2")
    hotplug.add(world.store, BACK)
    world.frontend_initialise()
    world.wait_state(BACK, "4")
    assert world.store.read(f"{BACK}/info") == "4"  # VDISK_READONLY
    assert world.store.read(f"{BACK}/feature-discard") == "0"
    g, _ = world.grants.grant_page()
    assert world.io(BlkifRequest(BLKIF_OP_WRITE, 0, 1, 0, (Segment(g, 0, 7),))).status != BLKIF_RSP_OKAY


def test_removed_backend_dir_unregisters(world):
    connect(world)
    world.store.rm(BACK)
    deadline = time.monotonic() + 5
    while (BACK in world.bus.devices or world.loops()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert BACK not in world.bus.devices and world.loops() == [] and not world.grants.live
    assert BACK not in world.driver._devices


def test_hotplug_error_is_reported(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    world.store.write(f"{BACK}/params", "/nonexistent/disk.img")
    with pytest.raises(hotplug.HotplugError):
        hotplug.add(world.store, BACK)
    assert world.store.read(f"{BACK}/hotplug-status") == "error"
    assert "nonexistent" in world.store.read(f"{BACK}/hotplug-error")


def restart_blkback(world, holding_the_disk=True):
    """What a killed blkback (or dom0) leaves: its rings and loop are gone with
    the process (shutdown() closes them; autoclear frees the loop), the store
    keeps every node it wrote.  A new blkback on a new bus then finds them."""
    world.bus.close()
    world.driver.shutdown()
    deadline = time.monotonic() + 5
    while holding_the_disk and world.loops() and time.monotonic() < deadline:
        time.sleep(0.02)
    # a blkback that held the disk open: autoclear freed the loop with its last close
    assert world.loops() == [] or not holding_the_disk
    world.bus.store.close()
    world.driver = Blkback(world.grants, world.evtchn)
    world.bus = BackendBus(XenStoreClient(world.xsd.path), 0, [world.driver]).start()


def test_restarted_blkback_recovers_a_connected_device(world):
    connect(world)
    restart_blkback(world)
    # Left Connected: the new blkback says the connection is lost, and runs hotplug again itself
    world.wait_state(BACK, "6")
    deadline = time.monotonic() + 5
    while world.store.try_read(f"{BACK}/hotplug-status") != "connected" and time.monotonic() < deadline:
        time.sleep(0.02)
    [(dev, info)] = world.loops()
    assert world.store.read(f"{BACK}/physical-device") == dev.physical_device
    assert world.store.read(f"{BACK}/hotplug-status") == "connected"
    # The frontend's Connected is stale: nothing happens until it resets
    time.sleep(0.3)
    assert world.store.read(f"{BACK}/state") == "6" and not world.grants.live
    world.store.write(f"{FRONT}/state", "6")
    world.store.write(f"{FRONT}/state", "1")  # xenbus_reset_frontend: Closed, then Initialising
    world.wait_state(BACK, "2")
    world.frontend_initialise()
    world.wait_state(BACK, "4")
    g, page = world.grants.grant_page()
    page[:4096] = b"R" * 4096
    assert world.io(BlkifRequest(BLKIF_OP_WRITE, 0, 9, 16, (Segment(g, 0, 7),))).status == BLKIF_RSP_OKAY
    with open(world.image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"R" * 4096
    [(_, info)] = world.loops()
    assert info.autoclear  # the new blkback holds the new loop with autoclear, as at boot
    assert world.bus.recorder.check() == []


def test_restarted_blkback_connects_a_device_left_in_initwait(world):
    world.toolstack_create()
    world.wait_state(BACK, "2")
    restart_blkback(world)  # died before the hotplug step ran
    world.frontend_initialise()
    world.wait_state(BACK, "4")  # hotplug run by the new blkback, then straight to Connected
    assert len(world.loops()) == 1
    assert world.backend_states[-2:] == ["2", "4"] or world.backend_states[-1:] == ["4"]
    assert "6" not in world.backend_states


def test_blkback_killed_again_in_the_middle_of_recovering(world):
    connect(world)
    restart_blkback(world)
    world.wait_state(BACK, "6")  # the second blkback reset the connection ...
    # ... and died before the frontend reset (Closed, online=1), its hotplug's
    # loop attached but not yet opened (so no autoclear): the next one detaches it
    restart_blkback(world, holding_the_disk=False)
    deadline = time.monotonic() + 5
    while BACK not in world.bus.devices and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world.bus.devices[BACK].priv is not None  # the third one took it up
    world.store.write(f"{FRONT}/state", "6")
    world.store.write(f"{FRONT}/state", "1")
    world.wait_state(BACK, "2")
    world.frontend_initialise()
    world.wait_state(BACK, "4")
    g, _ = world.grants.grant_page()
    assert world.io(BlkifRequest(BLKIF_OP_READ, 0, 5, 0, (Segment(g, 0, 7),))).status == BLKIF_RSP_OKAY
    assert len(world.loops()) == 1
