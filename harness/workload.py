"""Run the block workload in a guest and check that nothing was lost (issue #6).

    from xenbed.harness.workload import BlockWorkload, check_nothing_lost

    workload = BlockWorkload(testbed, "domu1", "xvda")   # 2 workers on slots 4096..4351 (4 KiB each)
    workload.start()                    # runs in the guest until stopped; returns once it writes
    testbed.kill("dom0"); ...           # any faults: the workload's writes block until blkfront reconnects
    workload.stop()                     # SIGTERM, wait for its end record (ops still blocked: unknown)
    result = check_nothing_lost(testbed, workload)   # the slots, read through dom0's loop device
    assert result.ok, result.render()   # or: workload.assert_nothing_lost()

In pytest, the `block_workload` fixture is such a workload, already started
on domu1's xvda; options go in a marker, and at teardown it is stopped and
its history (plus the checker's report, if the test checked) is saved beside
the test's trace as `<test>.workload.jsonl` / `<test>.nothing-lost.txt`:

    @pytest.mark.block_workload(workers=4, rate=200)
    def test_dom0_dies(testbed, block_workload):
        testbed.kill("dom0"); testbed.start("dom0")
        block_workload.assert_nothing_lost()

How it works.  `start` runs `python3 -m xenbed.drivers.workload.blk` in the
guest container in the background (nohup, pid file, stderr to a log file)
against the FUSE file blkfront exposes, `/run/xen/vbd/<vdev>`; its history
is `/run/xen/workload/<name>.jsonl` in the guest (drivers/workload/blk.py has
the op semantics, protocols/workload.py the formats).  `check_nothing_lost`
stops the workload if it still runs, fetches the history, then finds the disk
from dom0's side as the toolstack does -- the frontend's `backend` key, the
backend's `dev`, `physical-device` and `physical-device-path` -- and reads
the run's slots from that loop device inside dom0 with O_DIRECT (so what it
sees is what the loop device holds, not a cache on the way), streamed back
compressed; harness/checker.py judges the history against those bytes.
"""

from __future__ import annotations

import base64
import secrets
import shlex
import time
import zlib
from dataclasses import dataclass

from . import checker
from .execs import ExecError
from .xen import Xen
from xenbed.protocols import workload as fmt

WORKLOAD_DIR = "/run/xen/workload"
VBD_DIR = "/run/xen/vbd"


class WorkloadError(RuntimeError):
    """The workload could not start, or did not stop; the message carries its log."""


class BlockWorkload:
    def __init__(self, testbed, domain: str = "domu1", vdev: str = "xvda", *, name: str | None = None,
                 workers: int = 2, first_slot: int = 4096, slot_count: int = 256,
                 block_size: int = fmt.DEFAULT_BLOCK_SIZE, rate: float = 0.0, read_fraction: float = 0.3,
                 stop_grace: float = 5.0, progress: float = 5.0) -> None:
        self.testbed = testbed
        self.domain = domain
        self.vdev = vdev
        self.name = name or f"blk-{vdev}-{secrets.token_hex(3)}"
        # paths in the guest
        self.disk_path = f"{VBD_DIR}/{vdev}"
        self.history_path, self.log_path = (f"{WORKLOAD_DIR}/{self.name}.{ext}" for ext in ("jsonl", "log"))
        self.options = {"workers": workers, "first-slot": first_slot, "slot-count": slot_count,
                        "block-size": block_size, "rate": rate, "read-fraction": read_fraction,
                        "stop-grace": stop_grace, "progress": progress}
        self.stop_grace = stop_grace
        self.pid: int | None = None
        self.last_history: list[dict] | None = None
        self.last_result: checker.CheckResult | None = None

    def command(self) -> list[str]:
        argv = ["python3", "-m", "xenbed.drivers.workload.blk", "--file", self.disk_path,
                "--history", self.history_path]
        for option, value in self.options.items():
            argv += [f"--{option}", str(value)]
        return argv

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30) -> "BlockWorkload":
        """Start it in the guest (once the disk is there); return when its history has begun."""
        if self.pid is not None:
            raise WorkloadError(f"workload {self.name} was already started")
        deadline = time.monotonic() + timeout
        while self._sh(f"test -e {self.disk_path}").exit_code != 0:
            if time.monotonic() > deadline:
                raise WorkloadError(f"{self.domain} has no {self.disk_path} after {timeout:g}s")
            time.sleep(0.2)
        launched = self._sh(f"mkdir -p {WORKLOAD_DIR} && nohup {shlex.join(self.command())} "
                            f"</dev/null >/dev/null 2>{self.log_path} & echo $!", check=True)
        self.pid = int(launched.stdout.split()[-1])
        while True:
            if self._sh(f"head -c 1 {self.history_path} 2>/dev/null | grep -q .").exit_code == 0:
                return self
            if not self.running():
                raise WorkloadError(f"workload {self.name} in {self.domain} exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise WorkloadError(f"workload {self.name} wrote no history within {timeout:g}s:\n{self.log()}")
            time.sleep(0.1)

    def running(self) -> bool:
        """The guest process is alive (not gone, not a zombie nobody reaped)."""
        if self.pid is None:
            return False
        state = self._sh(f"awk '{{print $3}}' /proc/{self.pid}/stat 2>/dev/null").stdout.strip()
        return state not in ("", "Z", "X")

    def stop(self, timeout: float | None = None) -> list[dict]:
        """SIGTERM, then wait until it has exited; returns the history.  Ops
        blocked longer than `stop_grace` are recorded as unknown by the
        workload itself, so this returns within about stop_grace seconds."""
        if self.pid is None:
            raise WorkloadError(f"workload {self.name} was never started")
        timeout = self.stop_grace + 30 if timeout is None else timeout
        self._sh(f"kill -TERM {self.pid} 2>/dev/null || true")
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise WorkloadError(f"workload {self.name} still runs {timeout:g}s after SIGTERM:\n{self.log()}")
            time.sleep(0.2)
        return self.history()

    # ------------------------------------------------------------------ results

    def history(self) -> list[dict]:
        """The history as the guest has it now (a line cut short by a kill is dropped)."""
        text = self._sh(f"cat {self.history_path}", check=True).stdout
        self.last_history = fmt.parse_history(text.splitlines())
        return self.last_history

    def log(self) -> str:
        """Its stderr: progress lines and the final summary."""
        return self._sh(f"cat {self.log_path} 2>/dev/null || true").stdout

    def check(self) -> checker.CheckResult:
        return check_nothing_lost(self.testbed, self)

    def assert_nothing_lost(self) -> checker.CheckResult:
        """check(), failing with the checker's report when something was lost."""
        result = self.check()
        if not result.ok:
            raise AssertionError(f"workload {self.name} on {self.domain}:{self.vdev}\n{result.render()}")
        return result

    def _sh(self, script: str, check: bool = False):
        return self.testbed.exec(self.domain, ["sh", "-c", script], check=check)


# ---------------------------------------------------------------------- dom0's side of the disk

@dataclass(frozen=True)
class Dom0Disk:
    """Where a guest's vbd lives in dom0: store dirs and the loop device."""

    domain: str
    vdev: str
    frontend: str
    backend: str
    physical_device: str  # "7:a", as hotplug wrote it ("" if missing)
    device: str  # physical-device-path, e.g. /dev/loop10 ("" if missing)


_FIND_BACKEND = r"""
domid=$(xl domid "$1") || exit 1
for id in $(xenstore-list "/local/domain/$domid/device/vbd"); do
    front="/local/domain/$domid/device/vbd/$id"
    back=$(xenstore-read "$front/backend") || continue
    if [ "$(xenstore-read "$back/dev" 2>/dev/null)" = "$2" ]; then
        echo "$front"; echo "$back"
        xenstore-read "$back/physical-device" 2>/dev/null || echo
        xenstore-read "$back/physical-device-path" 2>/dev/null || echo
        exit 0
    fi
done
echo "$1 (domid $domid) has no vbd with dev=$2" >&2
exit 1
"""

# Runs in dom0: O_DIRECT reads need a page-aligned buffer (mmap gives one).
# The node is made when dom0 lacks it (a recreated dom0 after a restart).
_READ_DIRECT = r"""
import base64, mmap, os, stat, sys, zlib
path, physical, offset, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if physical:
    major, minor = (int(x, 16) for x in physical.split(":"))
    path = path or (f"/dev/loop{minor}" if major == 7 else "")
    if path and not os.path.exists(path):
        os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(major, minor))
    if path and os.stat(path).st_rdev != os.makedev(major, minor):
        sys.exit(f"{path} is not device {physical}")
if not path:
    sys.exit("no physical-device-path nor physical-device: hotplug has not run")
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, length)
done = 0
while done < length:
    n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
    if n <= 0:
        sys.exit(f"{path}: end of device at byte {offset + done}, wanted {offset + length}")
    done += n
sys.stdout.write(base64.b64encode(zlib.compress(buf[:length], 1)).decode())
"""


def find_dom0_disk(testbed, domain: str, vdev: str) -> Dom0Disk:
    """The backend of `domain`'s `vdev`, from dom0's view of the store."""
    out = testbed.exec(Xen(testbed).domain(domain).dom0, ["sh", "-c", _FIND_BACKEND, "sh", domain, vdev],
                       check=True).stdout
    lines = (out.splitlines() + ["", "", "", ""])[:4]
    return Dom0Disk(domain, vdev, *(line.strip() for line in lines))


def read_through_dom0(testbed, disk: Dom0Disk, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the loop device behind `disk`, read in dom0 with O_DIRECT."""
    result = testbed.exec(Xen(testbed).domain(disk.domain).dom0, ["python3", "-c", _READ_DIRECT, disk.device,
                                                              disk.physical_device, str(offset), str(length)],
                          check=True)
    data = zlib.decompress(base64.b64decode(result.stdout.strip()))
    if len(data) != length:
        raise ExecError("dom0", "read_through_dom0", result, f"returned {len(data)} bytes, not {length}")
    return data


def check_nothing_lost(testbed, workload: BlockWorkload, history: list[dict] | None = None) -> checker.CheckResult:
    """Stop the workload if it runs, read its slots through dom0's loop
    device, and judge its history (or `history`) against them."""
    if history is None:
        history = workload.stop() if workload.running() else workload.history()
    run = next((r for r in history if r.get("type") == fmt.RUN), None)
    if run is None:
        raise WorkloadError(f"workload {workload.name} has no run record in its history:\n{workload.log()}")
    block_size = run["block_size"]
    disk = find_dom0_disk(testbed, workload.domain, workload.vdev)
    region = read_through_dom0(testbed, disk, run["first_slot"] * block_size, run["slot_count"] * block_size)
    result = checker.check(history, region)
    result.run = {**result.run, "dom0_device": disk.device, "backend": disk.backend}
    workload.last_history, workload.last_result = history, result
    return result
