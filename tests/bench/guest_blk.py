"""Runs inside a bench domain that has NO blkfront daemon (its container
boots with XENBED_MODULES empty), sent by harness/bench.py as `python3 -c`:
this program IS the domain's blkfront -- blkfront's own driver (`BlkFront`,
without FUSE) on a FrontendBus -- and drives I/O straight through the
driver's ring engine (`BlkfrontEngine`), so the figures measure the ring, the grants,
the event channels and blkback, not FUSE.

    guest_blk.py <devid> <size_mb> <rand_seconds> <depth> [<timeout>]

Handshake with tests/bench/dom0_blk.py, through XenStore in our own
directory (`data/blkbench/`, which dom0 may write):

  * we write `ready` once the bus watches device/vbd: dom0 then attaches and
    detaches the disk `devid` several times (the driver connects and removes
    it each time, as the daemon would) and leaves it attached;
  * dom0 writes `go`: we then run, on the connected disk `devid`:
      - sequential write, then sequential read, of `size_mb` MiB in 1 MiB
        I/Os, one at a time (each split by blkfront into 44 KiB ring requests
        that are in flight together), the read checked against what was
        written;
      - 4 KiB random reads at queue depth `depth` for `rand_seconds`.

We close the device as a shutting-down guest does (Closing, Closed) and print
one JSON object.
"""

import json
import os
import random
import sys
import threading
import time

from xenbed.drivers.blk.front import BlkFront
from xenbed.drivers.blk.front_engine import Shadow
from xenbed.drivers.xenbus.daemon import GuestXen
from xenbed.drivers.xen.hypercall import HypervisorLink
from xenbed.drivers.xen.store import XenStoreClient
from xenbed.drivers.xenbus import FrontendBus, TransitionRecorder, XenbusHooks, XenbusState
from xenbed.protocols.blkif import BLKIF_OP_READ, SECTOR_SIZE

MIB = 1 << 20


def wait_key(store, path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = store.try_read(path)
        if value is not None:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"nobody wrote {path} within {timeout:.0f}s")


def connected_vbd(driver, devid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for vbd in list(driver.devices.values()):
            if vbd.devnum == devid and vbd.disk is not None and vbd.dev.state == XenbusState.Connected:
                return vbd
        time.sleep(0.01)
    raise TimeoutError(f"vbd {devid} did not connect within {timeout:.0f}s (have {list(driver.devices)})")


def sequential(engine, size_mb):
    """Write then read `size_mb` MiB, 1 MiB at a time; returns seconds for each."""
    block = bytearray(os.urandom(MIB))
    stamp = lambda i: b"%08d" % i  # each MiB differs: a misplaced read is caught
    t0 = time.perf_counter()
    for i in range(size_mb):
        block[:8] = stamp(i)
        engine.write_sectors(i * MIB // SECTOR_SIZE, block)
    engine.flush()
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bad = 0
    for i in range(size_mb):
        got = engine.read_sectors(i * MIB // SECTOR_SIZE, MIB // SECTOR_SIZE)
        block[:8] = stamp(i)
        bad += got != block
    read_s = time.perf_counter() - t0
    if bad:
        raise AssertionError(f"{bad} MiB read back differ from what was written")
    return write_s, read_s


def random_reads(engine, size_mb, seconds, depth):
    """4 KiB reads at random 4 KiB-aligned offsets, `depth` always in flight."""
    rng = random.Random(4)
    blocks = size_mb * MIB // 4096
    buffers = [memoryview(bytearray(4096)) for _ in range(depth)]
    inflight = []  # (shadow, buffer index), oldest first
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for i in range(depth):
        inflight.append((engine.submit(Shadow(BLKIF_OP_READ, rng.randrange(blocks) * 8, 8, read_into=buffers[i])), i))
    while inflight:
        shadow, i = inflight.pop(0)
        engine.wait([shadow], timeout=30)
        done += 1
        if time.perf_counter() < deadline:
            inflight.append((engine.submit(Shadow(BLKIF_OP_READ, rng.randrange(blocks) * 8, 8,
                                                  read_into=buffers[i])), i))
    return done, time.perf_counter() - t0


def main():
    devid, size_mb, rand_seconds, depth = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 120.0
    link = HypervisorLink.open(role="device")
    xen = GuestXen(link)
    store = XenStoreClient()
    driver = BlkFront(xen, None, drain_timeout=5.0)
    hooks = XenbusHooks(grant_access=lambda domid, frame, ro: xen.gnttab.grant(domid, frame, ro),
                        alloc_unbound=xen.evtchn.alloc_unbound, free_evtchn=xen.evtchn.close)
    transitions = os.environ.get("XENBED_TRANSITIONS")
    bus = FrontendBus(store, link.domid, [driver], hooks=hooks,
                      recorder=TransitionRecorder(transitions) if transitions else None)
    bus.start()
    data = f"/local/domain/{link.domid}/data/blkbench"
    try:
        store.write(f"{data}/ready", "1")
        wait_key(store, f"{data}/go", timeout)
        vbd = connected_vbd(driver, devid, 30)
        engine = vbd.engine
        if vbd.info.size < size_mb * MIB:
            raise ValueError(f"disk has {vbd.info.size} bytes, fewer than {size_mb} MiB")
        engine.read_sectors(0, 8)  # warm-up: first request on the ring
        write_s, read_s = sequential(engine, size_mb)
        ops, rand_s = random_reads(engine, size_mb, rand_seconds, depth)
        result = {"seq_write_s": write_s, "seq_read_s": read_s, "bytes": size_mb * MIB,
                  "rand_ops": ops, "rand_s": rand_s, "depth": depth, "ring_size": engine.ring.size,
                  "requests": engine.requests, "responses": engine.responses}
        closer = threading.Thread(target=driver.close_all, kwargs={"timeout": 2.0}, daemon=True)
        closer.start()
        closer.join(5)
    finally:
        bus.close()
        store.close()
        link.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
