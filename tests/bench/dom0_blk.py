"""Runs in dom0 (sent by harness/bench.py as `python3 -c`) while
tests/bench/guest_blk.py runs in the bench domain.

    dom0_blk.py <domid> <vdev> <cycles> <size_mb> <rand_seconds> <depth>

1. Makes /var/lib/xen/images/bench.img (64 MiB of random bytes, so it is in
   dom0's page cache for both paths alike).
2. Waits for the guest's `data/blkbench/ready`.
3. `cycles` times: `xl block-attach` the image as `vdev`, timed from just
   before the command until both `state` nodes read Connected (4) -- seen
   through XenStore watches on both, not xl's own polling -- then
   `xl block-detach` (timed until the command returns).  A last attach stays.
4. The same I/O as the guest, directly on that attachment's loop device
   (`physical-device`, 7:<minor hex>) with O_DIRECT, through fio: 1 MiB
   sequential write then read over `size_mb` MiB one at a time (psync; for
   1.5 s each, over that extent again and again: a pass takes milliseconds), and
   4 KiB random reads at queue depth `depth` (libaio) for `rand_seconds`.
5. Writes the guest's `data/blkbench/go` and prints one JSON object.
"""

import json
import os
import subprocess
import sys
import threading
import time

from xenbed.drivers.xen.store import XenStoreClient

IMAGE = "/var/lib/xen/images/bench.img"
IMAGE_MB = 64
CONNECTED = "4"


def vdev_number(vdev):
    from xenbed.protocols.vdev import vdev_to_number
    return vdev_to_number(vdev)


def make_image():
    with open(IMAGE, "wb") as f:
        for _ in range(IMAGE_MB):
            f.write(os.urandom(1 << 20))


def wait_key(store, path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.try_read(path) is not None:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")


def attach_once(store, domid, vdev, devid, cycle, timeout=30.0):
    """Milliseconds from `xl block-attach` to both ends Connected, and the command's own time."""
    paths = (f"/local/domain/0/backend/vbd/{domid}/{devid}/state",
             f"/local/domain/{domid}/device/vbd/{devid}/state")
    both = threading.Event()
    seen = {}

    def fired(path, token):
        if both.is_set():
            return
        for p in paths:
            seen[p] = store.try_read(p)
        if all(seen[p] == CONNECTED for p in paths):
            seen["t"] = time.perf_counter()
            both.set()

    tokens = [(p, f"blkbench-{cycle}-{i}") for i, p in enumerate(paths)]
    for path, token in tokens:
        store.watch(path, token, fired)
    try:
        spec = f"format=raw, vdev={vdev}, access=rw, target={IMAGE}"
        t0 = time.perf_counter()
        xl = subprocess.run(["xl", "block-attach", str(domid), spec], capture_output=True, text=True, timeout=timeout)
        cmd_s = time.perf_counter() - t0
        if xl.returncode != 0:
            raise RuntimeError(f"xl block-attach failed: {xl.stderr.strip() or xl.stdout.strip()}")
        if not both.wait(timeout):
            raise TimeoutError(f"both ends not Connected after {timeout:.0f}s: {seen}")
        return (seen["t"] - t0) * 1000, cmd_s * 1000
    finally:
        for path, token in tokens:
            store.unwatch(path, token)


def detach_once(domid, vdev):
    t0 = time.perf_counter()
    xl = subprocess.run(["xl", "block-detach", str(domid), vdev], capture_output=True, text=True, timeout=60)
    if xl.returncode != 0:
        raise RuntimeError(f"xl block-detach failed: {xl.stderr.strip() or xl.stdout.strip()}")
    return (time.perf_counter() - t0) * 1000


def fio(name, device, *args):
    cmd = ["fio", f"--name={name}", f"--filename={device}", "--direct=1", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["io_bytes"], side["runtime"] / 1000.0, side["total_ios"]


def loop_bench(device, size_mb, rand_seconds, depth, seq_seconds=1.5):
    # time-based, over the same `size_mb` MiB again and again: one pass takes
    # milliseconds here, and fio counts its runtime in whole milliseconds
    seq = ("--bs=1M", f"--size={size_mb}M", "--ioengine=psync", "--time_based", f"--runtime={seq_seconds}")
    wbytes, wsec, _ = fio("seqwrite", device, "--rw=write", *seq)
    rbytes, rsec, _ = fio("seqread", device, "--rw=read", *seq)
    try:
        _, qsec, ops = fio("randread", device, "--rw=randread", "--bs=4k", f"--size={size_mb}M",
                           "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={rand_seconds}",
                           "--time_based", "--randrepeat=0")
        engine = "libaio"
    except RuntimeError:  # no libaio here: threads give the same queue depth
        _, qsec, ops = fio("randread", device, "--rw=randread", "--bs=4k", f"--size={size_mb}M",
                           "--ioengine=psync", f"--numjobs={depth}", "--group_reporting",
                           f"--runtime={rand_seconds}", "--time_based")
        engine = "psync x threads"
    return {"seq_write_mb_s": wbytes / wsec / 1e6, "seq_read_mb_s": rbytes / rsec / 1e6,
            "rand4k_read_iops": ops / qsec, "rand_engine": engine}


def main():
    domid, vdev, cycles = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    size_mb, rand_seconds, depth = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    devid = vdev_number(vdev)
    make_image()
    store = XenStoreClient()
    data = f"/local/domain/{domid}/data/blkbench"
    try:
        wait_key(store, f"{data}/ready", 60)
        connect_ms, attach_cmd_ms, detach_ms = [], [], []
        for cycle in range(cycles + 1):
            both, cmd = attach_once(store, domid, vdev, devid, cycle)
            connect_ms.append(both)
            attach_cmd_ms.append(cmd)
            if cycle < cycles:
                detach_ms.append(detach_once(domid, vdev))
        physical = store.read(f"/local/domain/0/backend/vbd/{domid}/{devid}/physical-device")
        major, minor = (int(x, 16) for x in physical.split(":"))
        device = f"/dev/loop{minor}"
        if not os.path.exists(device):
            os.mknod(device, 0o660 | 0o060000, os.makedev(major, minor))
        loop = loop_bench(device, size_mb, rand_seconds, depth)
        store.write(f"{data}/go", "1")
    finally:
        store.close()
    print(json.dumps({"connect_ms": connect_ms, "attach_cmd_ms": attach_cmd_ms, "detach_ms": detach_ms,
                      "device": device, "loop": loop}))


if __name__ == "__main__":
    main()
