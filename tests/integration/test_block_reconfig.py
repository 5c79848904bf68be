"""Block reconfiguration while Connected, across the containers (seed 000,
Device reconfiguration: "handled with device-specific watches on the store.
Each driver stays in the Connected state throughout this.").

* `xl block-resize` in dom0 grows a disk the guest holds open: the open
  descriptor's fstat shows the new size, I/O past the old end round-trips.
* `xl cd-eject` / `xl cd-insert` change a cdrom drive's medium: one
  descriptor the guest opened before sees the first medium, then ENOMEDIUM,
  then the second medium; no loop device is left behind.

Both must leave both ends Connected: no XenBus transition is recorded for the
device (by dom0's blkback or the guest's blkfront) during the change -- the
records the test's trace (out/traces) is made of -- a watch on both `state`
nodes sees every write of them carry Connected (4), including blkback's
repeated Connected that announces the new `sectors` (Linux's
xen_vbd_resize), and both read Connected afterwards.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from xenbed.protocols.xenbus_state import Transition
from integration_helpers import run, sh, transitions, wait_until

pytestmark = pytest.mark.integration

TRANSITIONS = "/run/xen/transitions.jsonl"  # every domain's XenBus records here (XENBED_TRANSITIONS)


IMAGES = "/var/lib/xen/images"
XVDD = 51760  # (202 << 8) | (3 << 4)
HDC = 5632  # (22 << 8) | 0


@pytest.fixture(scope="module")
def domu1(testbed) -> int:
    domid = int(testbed.exec("dom0", ["xl", "domid", "domu1"], check=True).stdout)
    wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvda"]).exit_code == 0,
               "/run/xen/vbd/xvda in domu1")
    return domid


def device_transitions(testbed, domid: int, devid: int) -> list[tuple[str, str, str]]:
    """Every recorded transition of this vbd, by either end: (role, from, to)."""
    ends = (f"/local/domain/0/backend/vbd/{domid}/{devid}", f"/local/domain/{domid}/device/vbd/{devid}")
    return [(t.role.value, t.old.name, t.new.name)
            for t in transitions(testbed, "dom0") + transitions(testbed, "domu1") if t.path in ends]


def states(testbed, domid: int, devid: int) -> tuple[str, str]:
    back = sh(testbed, "dom0", f"xenstore-read /local/domain/0/backend/vbd/{domid}/{devid}/state").strip()
    front = sh(testbed, "dom0", f"xenstore-read /local/domain/{domid}/device/vbd/{devid}/state").strip()
    return back, front


def loops_backing(testbed, image: str) -> list[str]:
    """Loop devices (host-wide) whose backing file is dom0's `image`, matched by inode."""
    script = ("import sys; from xenbed.drivers.blk import loop; "
              "print(' '.join(d.path for d, _ in loop.find_by_backing_file(sys.argv[1])))")
    return sh(testbed, "dom0", f"python3 -c \"{script}\" {image}").split()


class GuestScript(threading.Thread):
    """A Python script run in a guest while the test goes on (it holds a
    descriptor open across what dom0 does meanwhile); `.result` is its JSON."""

    def __init__(self, testbed, service: str, script: str, args: list[str] = ()):
        super().__init__(daemon=True)
        self.testbed, self.service, self.script, self.args = testbed, service, script, list(args)
        self.result = None

    def run(self) -> None:
        self.result = self.testbed.exec(self.service, ["python3", "-c", self.script, *self.args], timeout=120)

    def output(self, timeout: float = 90) -> dict:
        self.join(timeout)
        assert not self.is_alive(), "the guest script did not finish"
        assert self.result.exit_code == 0, self.result.stdout + self.result.stderr
        return json.loads(self.result.stdout.strip().splitlines()[-1])


WATCH_BOTH_STATES = r"""
import json, os, sys, threading, time
from xenbed.drivers.xen.store import XenStoreClient
store, seen, lock = XenStoreClient(), [], threading.Lock()
def fired(path, _token):
    with lock:
        seen.append(["backend" if "/backend/" in path else "frontend", store.try_read(path)])
for i, path in enumerate(sys.argv[1:]):
    store.watch(path, f"state{i}", fired)
with open("/tmp/states-watched", "w") as f:
    f.write("1")
deadline = time.monotonic() + 90
while not os.path.exists("/tmp/states-stop") and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.3)
with lock:
    print(json.dumps(seen))
"""


class StateWatch:
    """A XenStore watch in dom0 on both ends' `state` nodes for the length of
    a change: every write of either node fires it (xenstored fires a watch
    per write, value changed or not), and the value read then is kept.  So
    a state that left Connected even for a moment, or was written by
    something that does not record transitions, shows here."""

    def __init__(self, testbed, domid: int, devid: int):
        self.testbed = testbed
        run(testbed, "dom0", "rm -f /tmp/states-watched /tmp/states-stop")
        paths = (f"/local/domain/0/backend/vbd/{domid}/{devid}/state", f"/local/domain/{domid}/device/vbd/{devid}/state")
        self.script = GuestScript(testbed, "dom0", WATCH_BOTH_STATES, args=list(paths))
        self.script.start()
        wait_until(lambda: run(testbed, "dom0", "cat /tmp/states-watched").stdout.strip(), "the state watch")

    def stop(self) -> list[tuple[str, str]]:
        """[(end, value)] for every write seen, the registration's firing first."""
        sh(self.testbed, "dom0", "touch /tmp/states-stop")
        return [tuple(x) for x in self.script.output()]


HOLD_OPEN_AND_WATCH_SIZE = r"""
import json, os, time
fd = os.open("/run/xen/vbd/xvdd", os.O_RDWR)
old = os.fstat(fd).st_size
with open("/tmp/resize-opened", "w") as f:
    f.write(str(old))
deadline = time.monotonic() + 60
while os.fstat(fd).st_size == old and time.monotonic() < deadline:
    time.sleep(0.05)
new, seen_at = os.fstat(fd).st_size, time.time()
past_old_end = os.pread(fd, 4096, old)
data = bytes(range(256)) * 16
os.pwrite(fd, data, new - 4096)
os.fsync(fd)
back = os.pread(fd, 4096, new - 4096)
os.close(fd)
print(json.dumps({"old": old, "new": new, "seen_at": seen_at, "roundtrip": back == data,
                  "past_old_end_zero": past_old_end == bytes(4096)}))
"""


def test_block_resize_grows_an_open_disk_and_both_ends_stay_connected(testbed, domu1):
    image = f"{IMAGES}/grow.img"
    sh(testbed, "dom0", f"rm -f {image} && truncate -s 16M {image}")
    sh(testbed, "dom0", f"xl block-attach domu1 'format=raw, vdev=xvdd, access=rw, target={image}'")
    try:
        wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/xvdd"]).exit_code == 0, "xvdd")
        run(testbed, "domu1", "rm -f /tmp/resize-opened")
        before = device_transitions(testbed, domu1, XVDD)
        assert ("backend", "InitWait", "Connected") in before and ("frontend", "Initialised", "Connected") in before

        watch = StateWatch(testbed, domu1, XVDD)
        guest = GuestScript(testbed, "domu1", HOLD_OPEN_AND_WATCH_SIZE)
        guest.start()
        wait_until(lambda: run(testbed, "domu1", "cat /tmp/resize-opened").stdout.strip(), "the guest to open xvdd")
        refused = run(testbed, "dom0", "xl block-resize domu1 xvdd 8M")
        assert refused.exit_code != 0 and "shrinking" in refused.stderr, refused.stderr
        sh(testbed, "dom0", "xl block-resize domu1 xvdd 48M")
        resized_at = time.time()
        seen = guest.output()

        assert seen["old"] == 16 << 20 and seen["new"] == 48 << 20, seen
        assert seen["seen_at"] - resized_at < 2.0, "the guest saw the new size late"
        assert seen["past_old_end_zero"] and seen["roundtrip"], seen
        backend = f"/local/domain/0/backend/vbd/{domu1}/{XVDD}"
        assert sh(testbed, "dom0", f"xenstore-read {backend}/sectors").strip() == str((48 << 20) // 512)
        end = sh(testbed, "dom0", f"dd if={image} bs=4096 skip={(48 << 20) // 4096 - 1} count=1 status=none"
                                  " | sha256sum").split()[0]
        expected = sh(testbed, "dom0", "python3 -c \"import sys; sys.stdout.buffer.write(bytes(range(256)) * 16)\""
                                       " | sha256sum").split()[0]
        assert end == expected  # the guest's write past the old end is in the grown image
        sh(testbed, "dom0", "xl block-resize domu1 xvdd +16M")  # relative growth, twice in one connection
        wait_until(lambda: sh(testbed, "domu1", "stat -c %s /run/xen/vbd/xvdd").strip() == str(64 << 20),
                   "the guest to see 64 MiB", timeout=5)

        written = watch.stop()
        assert device_transitions(testbed, domu1, XVDD) == before, "a state changed during the resize"
        assert states(testbed, domu1, XVDD) == ("4", "4")
        assert {value for _, value in written} == {"4"}, written  # never anything but Connected
        # two firings at registration, then blkback's Connected rewritten with each new `sectors`
        assert [end for end, _ in written].count("backend") >= 3, written
    finally:
        run(testbed, "dom0", "xl block-detach domu1 xvdd")
    assert loops_backing(testbed, image) == []


WATCH_THE_DRIVE = r"""
import errno, json, os, time
fd = os.open("/run/xen/vbd/hdc", os.O_RDONLY)
seen = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        now = os.pread(fd, 4, 0).decode()
    except OSError as exc:
        now = errno.errorcode.get(exc.errno, str(exc.errno))
    now = f"{now}/{os.fstat(fd).st_size}"
    if not seen or seen[-1] != now:
        seen.append(now)
        with open("/tmp/cd-seen", "w") as f:
            f.write(" ".join(seen))
    if now.startswith("2222"):
        break
    time.sleep(0.05)
os.close(fd)
print(json.dumps(seen))
"""


def test_cdrom_media_change_while_connected(testbed, domu1):
    disc1, disc2 = f"{IMAGES}/disc1.iso", f"{IMAGES}/disc2.iso"
    sh(testbed, "dom0", f"head -c 1048576 /dev/zero | tr '\\0' '1' > {disc1} && "
                        f"head -c 2097152 /dev/zero | tr '\\0' '2' > {disc2}")
    sh(testbed, "dom0", f"xl block-attach domu1 'vdev=hdc, devtype=cdrom, access=ro, target={disc1}'")
    try:
        wait_until(lambda: testbed.exec("domu1", ["test", "-e", "/run/xen/vbd/hdc"]).exit_code == 0, "hdc")
        assert sh(testbed, "domu1", "head -c 4 /run/xen/vbd/hdc") == "1111"
        backend = f"/local/domain/0/backend/vbd/{domu1}/{HDC}"
        assert sh(testbed, "dom0", f"xenstore-read {backend}/device-type").strip() == "cdrom"
        refused = run(testbed, "dom0", "xl cd-eject domu1 xvda")
        assert refused.exit_code != 0 and "not a cdrom" in refused.stderr, refused.stderr
        run(testbed, "domu1", "rm -f /tmp/cd-seen")
        before = device_transitions(testbed, domu1, HDC)

        watch = StateWatch(testbed, domu1, HDC)
        guest = GuestScript(testbed, "domu1", WATCH_THE_DRIVE)
        guest.start()
        wait_until(lambda: run(testbed, "domu1", "cat /tmp/cd-seen").stdout.startswith("1111"),
                   "the guest to read the first disc")
        sh(testbed, "dom0", "xl cd-eject domu1 hdc")
        assert sh(testbed, "dom0", f"xenstore-read {backend}/params").strip() == ""
        wait_until(lambda: "ENOMEDIUM" in run(testbed, "domu1", "cat /tmp/cd-seen").stdout,
                   "the guest to find the drive empty", timeout=10)
        empty = run(testbed, "domu1", "head -c 4 /run/xen/vbd/hdc")
        assert empty.exit_code != 0 and "No medium" in empty.stderr, (empty.stdout, empty.stderr)
        assert loops_backing(testbed, disc1) == [], "the ejected disc's loop device was left behind"

        sh(testbed, "dom0", f"xl cd-insert domu1 hdc {disc2}")
        seen = guest.output()
        # A read racing the eject may fail with EIO once (the backend took the
        # medium away under it, as a real drive's media removal does); then
        # the drive reads as empty, then the new disc.
        settled = [entry for i, entry in enumerate(seen)
                   if not (entry.startswith("EIO/") and i + 1 < len(seen) and seen[i + 1] == "ENOMEDIUM/0")]
        assert settled == ["1111/1048576", "ENOMEDIUM/0", "2222/2097152"], seen
        assert sh(testbed, "domu1", "tail -c 4 /run/xen/vbd/hdc") == "2222"
        assert len(loops_backing(testbed, disc2)) == 1 and loops_backing(testbed, disc1) == []

        written = watch.stop()
        assert device_transitions(testbed, domu1, HDC) == before, "a state changed during the media change"
        assert states(testbed, domu1, HDC) == ("4", "4")
        assert {value for _, value in written} == {"4"}, written
        assert [end for end, _ in written].count("backend") >= 3, written  # eject, insert: Connected again
    finally:
        run(testbed, "dom0", "xl block-detach domu1 hdc")
    assert loops_backing(testbed, disc1) == [] and loops_backing(testbed, disc2) == []
