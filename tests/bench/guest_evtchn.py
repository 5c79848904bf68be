"""Runs inside two domain containers at once (sent by harness/bench.py as
`python3 -c`): event-channel ping-pong between them, grant map/unmap and
grant copy rates.

    guest_evtchn.py initiator <peer domid> <tag> <samples>            (domu1)
    guest_evtchn.py responder <peer domid> <tag> <samples> <seconds>  (domu2)

The initiator offers a port and grants a page to the responder, through
XenStore (`data/<tag>/` in its own directory, readable by the peer).  Then:

  * notify round trip: initiator notify -> responder's upcall -> its notify
    -> initiator's upcall, in strict lock-step.  The guests clear the pending
    bit with a oneway EVTCHN_CLEAR (safe in lock-step: the clear is handled
    before the notify that follows it on the same link; see
    drivers/xen/evtchn.py) -- and, as a second figure, with the clear that
    waits for its reply, which drivers with a ring use;
  * the raw Unix-socket echo round trip to the hypervisor-service's echo
    socket from the same guest, interleaved round by round with the above so
    that the 2-core machine's other load weighs on both alike;
  * on the responder, afterwards: map + unmap pairs per second of the
    initiator's grant, one by one and 32 per call (GNTTAB_MAP_BATCH +
    GNTTAB_UNMAP_BATCH), and grant copy throughput (GNTTAB_COPY_BATCH,
    64 x 4 KiB per call, as Xen's netback batches) from the grant into the
    responder's own pages.

Each side prints one JSON object.
"""

import json
import os
import socket
import sys
import time

from xenbed.drivers.xen import (CopyOp, EventChannels, GrantRef, GrantTable, GuestMemory, HypervisorLink,
                                LocalFrame, XenStoreClient, XenStoreError)

ECHO = "/run/xenbed/echo.sock"
ROUNDS = 10
WARMUP = 50
COPY_BATCH = 64  # copy ops per call
MAP_BATCH = 32  # map (and unmap) entries per call


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def echo_samples(count, message=b"x" * 24):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(ECHO)
    samples = []
    for i in range(count + WARMUP):
        t0 = time.perf_counter_ns()
        sock.sendall(message)
        recv_exact(sock, len(message))
        if i >= WARMUP:
            samples.append(time.perf_counter_ns() - t0)
    sock.close()
    return samples


def stats(samples):
    samples = sorted(samples)
    return samples[len(samples) // 2] / 1000.0, samples[int(len(samples) * 0.99)] / 1000.0


def schedule(samples):
    """Per round: (pings with oneway clear, pings with waited-for clear)."""
    per_round = max(1, samples // ROUNDS)
    return [(per_round + (WARMUP if r == 0 else 0), per_round // 2 + (WARMUP if r == 0 else 0))
            for r in range(ROUNDS)]


class Guest:
    def __init__(self):
        self.link = HypervisorLink.open(reader="inline")  # no reader thread: no hand-off per event
        self.me = self.link.domid
        self.evtchn = EventChannels(self.link)
        self.gnttab = GrantTable(self.link)
        self.mem = GuestMemory(self.link)
        self.store = XenStoreClient()

    def publish(self, tag, key, value, reader):
        path = f"/local/domain/{self.me}/data/{tag}/{key}"
        self.store.write(path, str(value))
        self.store.set_perms(path, [f"n{self.me}", f"r{reader}"])

    def await_key(self, domid, tag, key, timeout=60.0):
        path = f"/local/domain/{domid}/data/{tag}/{key}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.store.read(path)
            except XenStoreError as exc:
                if exc.errno_name not in ("ENOENT", "EACCES") or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def cleanup(self, tag):
        try:
            self.store.rm(f"/local/domain/{self.me}/data/{tag}")
        except XenStoreError:
            pass


def initiator(peer, tag, samples):
    g = Guest()
    port = g.evtchn.alloc_unbound(peer)
    [page] = g.mem.alloc(1)
    page.mmap[:] = bytes(range(256)) * 16
    gref = g.gnttab.grant(peer, page, readonly=True)
    g.publish(tag, "port", port, peer)
    g.publish(tag, "gref", gref, peer)
    g.await_key(peer, tag, "ready")
    oneway, waited, echo = [], [], []
    for fast, slow in schedule(samples):
        for mode, count, into in (("oneway", fast, oneway), (True, slow, waited)):
            for _ in range(count):
                t0 = time.perf_counter_ns()
                g.evtchn.notify(port)
                if not g.evtchn.wait(port, 10, clear=mode):
                    raise SystemExit(f"no answer from the responder after {len(into)} pings")
                into.append(time.perf_counter_ns() - t0)
        echo += echo_samples(fast)
    # the responder measures grants now; its last notify says it is done
    if not g.evtchn.wait(port, 300):
        raise SystemExit("the responder never finished")
    g.evtchn.close(port)
    g.gnttab.end(gref)
    g.mem.free([page])
    g.cleanup(tag)
    oneway, waited = oneway[WARMUP:], waited[WARMUP:]  # round 0 began with the warm-up
    rtt, rtt99 = stats(oneway)
    sync, sync99 = stats(waited)
    e, e99 = stats(echo)
    print(json.dumps({"notify_rtt_us": rtt, "notify_rtt_us_p99": rtt99,
                      "notify_rtt_sync_clear_us": sync, "notify_rtt_sync_clear_us_p99": sync99,
                      "echo_rtt_us": e, "echo_rtt_us_p99": e99, "samples": len(oneway)}))


def responder(peer, tag, samples, seconds):
    g = Guest()
    rport = int(g.await_key(peer, tag, "port"))
    gref = int(g.await_key(peer, tag, "gref"))
    port = g.evtchn.bind_interdomain(peer, rport)
    # a newly bound port starts pending: take that event before the game starts
    g.evtchn.wait(port, 10)
    g.publish(tag, "ready", 1, peer)
    for fast, slow in schedule(samples):
        for mode, count in (("oneway", fast), (True, slow)):
            for _ in range(count):
                if not g.evtchn.wait(port, 30, clear=mode):
                    raise SystemExit("the initiator stopped pinging")
                g.evtchn.notify(port)

    maps = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(50):
            g.gnttab.unmap(g.gnttab.map(peer, gref, readonly=True))
        maps += 50
    map_s = time.perf_counter() - t0

    batch = [(peer, gref, True)] * MAP_BATCH
    batched = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(10):
            g.gnttab.unmap_batch(g.gnttab.map_batch(batch))
        batched += 10 * MAP_BATCH
    batched_s = time.perf_counter() - t0

    mine = g.mem.alloc(COPY_BATCH)
    ops = [CopyOp(GrantRef(peer, gref, 0), LocalFrame(p.gfn, 0), 4096) for p in mine]
    copied = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        g.gnttab.copy(ops)
        copied += 4096 * len(ops)
    copy_s = time.perf_counter() - t0
    ok = all(bytes(p.mmap[:256]) == bytes(range(256)) for p in mine)
    g.mem.free(mine)

    g.evtchn.notify(port)
    g.evtchn.close(port)
    g.cleanup(tag)
    print(json.dumps({"map_unmap": maps, "map_seconds": map_s, "map_unmap_batched": batched,
                      "map_batched_seconds": batched_s, "map_batch": MAP_BATCH, "copy_bytes": copied,
                      "copy_seconds": copy_s, "copy_batch": COPY_BATCH, "copy_ok": ok}))


def main():
    role, peer, tag, samples = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if role == "initiator":
        initiator(peer, tag, samples)
    else:
        responder(peer, tag, samples, float(sys.argv[5]) if len(sys.argv) > 5 else 2.0)


if __name__ == "__main__":
    main()
