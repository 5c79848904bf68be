"""`xenbed bench`: the speed figures, each beside the physical limit measured
in the same run, written to out/bench.json and printed as a table.

Every figure is `{"value": number, "unit": str}` under the report's
`figures` key, named `<area>.<what>`; ratios compare xenbed against the limit
(for a round trip, xenbed / limit: lower is better, 1.0 is the limit).

The hypervisor's trace (hypervisor/trace.py) is off while the figures are
measured (SIGUSR2 to the hypervisor; restored afterwards to what the
container's XENBED_TRACE says); the xenstore suite measures again with it
on, so its cost is a figure too: `xenstore.read_rtt_us_traced`,
`xenstore.ops_per_s_traced` and `xenstore.trace_cost_us` (traced minus
untraced read round trip, p50; each from the better of two runs taken
alternately off and on).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from .testbed import Testbed
from .xen import Xen

BENCH_DIR = Path(__file__).resolve().parent.parent / "tests" / "bench"

# Goals from the issues, shown beside each figure (None: no goal, a report).
GOALS = {
    "xenstore.read_rtt_ratio": ("<=", 2.0),
    "xenstore.ops_per_s": (">=", 50_000),
    "evtchn.notify_rtt_ratio": ("<=", 1.5),
    "evtchn.notify_rtt_p99_ratio": ("<=", 5),
    "evtchn.notify_rtt_under_flood_ratio": ("<=", 2),
    "gnttab.map_unmap_per_s": (">=", 10_000),
    "gnttab.map_unmap_batched_per_s": (">=", 50_000),
    "gnttab.copy_mb_per_s": (">=", 1_000),
    "blk.seq_read_ratio": (">=", 0.5),
    "blk.seq_write_ratio": (">=", 0.5),
    "blk.rand4k_read_ratio": (">=", 0.25),
    "blk.fuse_seq_read_ratio": (">=", 0.25),
    "net.tcp_ratio": (">=", 0.10),
    "migration.downtime_ms": ("<=", 200),
}


def _guest_script(name: str) -> str:
    return (BENCH_DIR / name).read_text()


HYPERVISOR = "hypervisor"


def set_tracing(testbed: Testbed, on: bool) -> None:
    """Turn the hypervisor's trace on or off while it runs (SIGUSR1/SIGUSR2:
    hypervisor/__main__.py); the signal is handled by its loop at once."""
    testbed.container(HYPERVISOR).kill(signal="SIGUSR1" if on else "SIGUSR2")
    time.sleep(0.2)


def tracing_configured(testbed: Testbed) -> bool:
    """Whether the run's hypervisor traces by its configuration (XENBED_TRACE, default on)."""
    env = dict(item.split("=", 1) for item in testbed.container(HYPERVISOR).attrs["Config"].get("Env") or []
               if "=" in item)
    return env.get("XENBED_TRACE", "1").strip().lower() not in ("0", "off", "no", "false", "")


def bench_xenstore(testbed: Testbed, guest: str = "domu1", samples: int = 3000, clients: int = 8,
                   seconds: float = 3.0) -> dict[str, dict]:
    def measure() -> dict:
        result = testbed.exec(guest, ["python3", "-c", _guest_script("guest_xenstore.py"),
                                      str(samples), str(clients), str(seconds)], check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    # off, on, off, on: whatever else the machine does (2 cores) weighs on
    # both alike; each figure is from the better of its two runs
    runs: dict[bool, list[dict]] = {False: [], True: []}
    try:
        for on in (False, True, False, True):
            set_tracing(testbed, on)
            runs[on].append(measure())
    finally:
        set_tracing(testbed, False)
    raw, traced = (min(runs[on], key=lambda r: r["read_rtt_us"]) for on in (False, True))
    return {
        "xenstore.read_rtt_us": {"value": round(raw["read_rtt_us"], 1), "unit": "us"},
        "xenstore.read_rtt_us_p99": {"value": round(raw["read_rtt_us_p99"], 1), "unit": "us"},
        "xenstore.echo_rtt_us": {"value": round(raw["echo_rtt_us"], 1), "unit": "us"},
        "xenstore.read_rtt_ratio": {"value": round(raw["read_rtt_us"] / raw["echo_rtt_us"], 2), "unit": "x"},
        "xenstore.ops_per_s": {"value": round(raw["ops"] / raw["ops_seconds"]), "unit": "ops/s"},
        # the same with the hypervisor's trace on: what tracing every operation costs
        "xenstore.read_rtt_us_traced": {"value": round(traced["read_rtt_us"], 1), "unit": "us"},
        "xenstore.read_rtt_us_p99_traced": {"value": round(traced["read_rtt_us_p99"], 1), "unit": "us"},
        "xenstore.ops_per_s_traced": {"value": round(traced["ops"] / traced["ops_seconds"]), "unit": "ops/s"},
        "xenstore.trace_cost_us": {"value": round(traced["read_rtt_us"] - raw["read_rtt_us"], 1), "unit": "us"},
    }


def bench_evtchn(testbed: Testbed, samples: int = 2000, seconds: float = 2.0) -> dict[str, dict]:
    """Event channels and grants between domu1 (initiator) and domu2
    (responder), both running tests/bench/guest_evtchn.py at once."""
    front, back = _evtchn_pair(testbed, samples, seconds)
    if not back["copy_ok"]:
        raise AssertionError("grant copy delivered the wrong bytes")
    return {
        "evtchn.notify_rtt_us": {"value": round(front["notify_rtt_us"], 1), "unit": "us"},
        "evtchn.notify_rtt_us_p99": {"value": round(front["notify_rtt_us_p99"], 1), "unit": "us"},
        "evtchn.echo_rtt_us": {"value": round(front["echo_rtt_us"], 1), "unit": "us"},
        "evtchn.notify_rtt_ratio": {"value": round(front["notify_rtt_us"] / front["echo_rtt_us"], 2), "unit": "x"},
        # p99 against the echo's p99, both from the same interleaved rounds
        "evtchn.notify_rtt_p99_ratio": {"value": round(front["notify_rtt_us_p99"] / front["echo_rtt_us_p99"], 2),
                                        "unit": "x"},
        "evtchn.notify_rtt_sync_clear_us": {"value": round(front["notify_rtt_sync_clear_us"], 1), "unit": "us"},
        "gnttab.map_unmap_per_s": {"value": round(back["map_unmap"] / back["map_seconds"]), "unit": "pairs/s"},
        "gnttab.map_unmap_batched_per_s": {"value": round(back["map_unmap_batched"] / back["map_batched_seconds"]),
                                           "unit": f"pairs/s@{back['map_batch']}/call"},
        "gnttab.copy_mb_per_s": {"value": round(back["copy_bytes"] / back["copy_seconds"] / 1e6, 1),
                                 "unit": f"MB/s@{back['copy_batch']}x4KiB/call"},
    }


def _evtchn_pair(testbed: Testbed, samples: int, seconds: float) -> tuple[dict, dict]:
    """tests/bench/guest_evtchn.py in domu1 (initiator) and domu2 (responder)
    at once: (initiator's figures, responder's).  `seconds` 0 skips the
    responder's grant phase: round trips only."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    d1, d2 = (int(testbed.exec("dom0", ["xl", "domid", name], check=True).stdout.strip()) for name in ("domu1", "domu2"))
    tag = "bench-" + uuid.uuid4().hex[:8]
    script = _guest_script("guest_evtchn.py")
    with ThreadPoolExecutor(2) as pool:
        responder = pool.submit(testbed.exec, "domu2", ["python3", "-c", script, "responder", str(d1), tag,
                                                         str(samples), str(seconds)], check=True, timeout=600)
        initiator = pool.submit(testbed.exec, "domu1", ["python3", "-c", script, "initiator", str(d2), tag,
                                                         str(samples)], check=True, timeout=600)
        return (json.loads(initiator.result().stdout.strip().splitlines()[-1]),
                json.loads(responder.result().stdout.strip().splitlines()[-1]))


def bench_evtchn_flood(testbed: Testbed, samples: int = 2000, most_seconds: float = 120.0) -> dict[str, dict]:
    """The domu1 <-> domu2 round trip alone, then while dom0 floods event
    channels of its own (tests/bench/guest_evtchn_flood.py): a flooding
    domain may burn its own CPU time, not slow another pair's events."""
    import threading
    import uuid

    quiet, _ = _evtchn_pair(testbed, samples, 0)
    stop_file = f"/tmp/xenbed-flood-stop-{uuid.uuid4().hex[:8]}"
    result: dict = {}

    def flood() -> None:
        out = testbed.exec("dom0", ["python3", "-c", _guest_script("guest_evtchn_flood.py"), stop_file,
                                    str(most_seconds)], check=True, timeout=most_seconds + 60)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    time.sleep(1.0)  # the flood is running
    try:
        loud, _ = _evtchn_pair(testbed, samples, 0)
    finally:
        testbed.exec("dom0", ["touch", stop_file])
        flooder.join(most_seconds + 90)
        testbed.exec("dom0", ["rm", "-f", stop_file])
    if not result.get("sends"):
        raise AssertionError("the flooding domain sent nothing: the figure would mean nothing")
    return {
        "evtchn.notify_rtt_us_quiet": {"value": round(quiet["notify_rtt_us"], 1), "unit": "us"},
        "evtchn.notify_rtt_us_under_flood": {"value": round(loud["notify_rtt_us"], 1), "unit": "us"},
        "evtchn.notify_rtt_under_flood_ratio": {"value": round(loud["notify_rtt_us"] / quiet["notify_rtt_us"], 2),
                                                "unit": "x"},
        "evtchn.flood_sends_per_s": {"value": round(result["sends"] / result["seconds"]), "unit": "sends/s"},
    }


def _p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def bench_blk(testbed: Testbed, cycles: int = 8, size_mb: int = 48, rand_seconds: float = 3.0,
              depth: int = 16, vdev: str = "xvdd") -> dict[str, dict]:
    """Block I/O through blkfront's ring against the loop device under it.

    A bench domain boots from domu1's image without the blkfront daemon
    (XENBED_MODULES empty); tests/bench/guest_blk.py in it runs blkfront's
    own driver and I/O engine (no FUSE) while tests/bench/dom0_blk.py in dom0
    attaches and detaches a disk to time the connection, then runs the same
    I/O with fio straight on the loop device that blkback serves.  The FUSE
    figure is dd on domu1's /run/xen/vbd/xvda (its daemon, the usual path),
    against the loop device's sequential read; then fio's 4 KiB random read
    and write (libaio, O_DIRECT, queue depth `depth`) on that FUSE file.
    """
    from concurrent.futures import ThreadPoolExecutor

    fuse_bytes, fuse_s = _fuse_seq_read(testbed, size_mb)
    fuse_fio = _fuse_fio(testbed, size_mb, rand_seconds, depth)
    name = "blkbench"
    domid = Xen(testbed).create_domain(name, memory_mb=64, environment={"XENBED_MODULES": ""})
    pool = ThreadPoolExecutor(1)
    try:
        guest = pool.submit(testbed.exec, name, ["python3", "-c", _guest_script("guest_blk.py"), str(vdev_devid(vdev)),
                                                 str(size_mb), str(rand_seconds), str(depth)], check=True, timeout=300)
        dom0 = testbed.exec("dom0", ["python3", "-c", _guest_script("dom0_blk.py"), str(domid), vdev,
                                     str(cycles), str(size_mb), str(rand_seconds), str(depth)], check=True, timeout=300)
        back = json.loads(dom0.stdout.strip().splitlines()[-1])
        front = json.loads(guest.result(timeout=300).stdout.strip().splitlines()[-1])
        _check_transitions(testbed, name, domid)
    finally:
        # on failure the guest may still wait for `go`: removing its domain ends it
        Xen(testbed).destroy_domain(name)
        testbed.exec("dom0", ["rm", "-f", "/var/lib/xen/images/bench.img"])
        pool.shutdown(wait=False)
    loop = back["loop"]
    mb = 1e6
    seq_read = front["bytes"] / front["seq_read_s"] / mb
    seq_write = front["bytes"] / front["seq_write_s"] / mb
    iops = front["rand_ops"] / front["rand_s"]
    return {
        "blk.connect_ms_p50": {"value": round(_p50(back["connect_ms"]), 1), "unit": "ms"},
        "blk.detach_ms_p50": {"value": round(_p50(back["detach_ms"]), 1), "unit": "ms"},
        "blk.seq_read_mb_s": {"value": round(seq_read, 1), "unit": "MB/s"},
        "blk.loop_seq_read_mb_s": {"value": round(loop["seq_read_mb_s"], 1), "unit": "MB/s"},
        "blk.seq_read_ratio": {"value": round(seq_read / loop["seq_read_mb_s"], 2), "unit": "x"},
        "blk.seq_write_mb_s": {"value": round(seq_write, 1), "unit": "MB/s"},
        "blk.loop_seq_write_mb_s": {"value": round(loop["seq_write_mb_s"], 1), "unit": "MB/s"},
        "blk.seq_write_ratio": {"value": round(seq_write / loop["seq_write_mb_s"], 2), "unit": "x"},
        "blk.rand4k_read_iops": {"value": round(iops), "unit": f"IOPS@qd{depth}"},
        "blk.loop_rand4k_read_iops": {"value": round(loop["rand4k_read_iops"]), "unit": f"IOPS@qd{depth}"},
        "blk.rand4k_read_ratio": {"value": round(iops / loop["rand4k_read_iops"], 3), "unit": "x"},
        "blk.fuse_seq_read_mb_s": {"value": round(fuse_bytes / fuse_s / mb, 1), "unit": "MB/s"},
        "blk.fuse_seq_read_ratio": {"value": round(fuse_bytes / fuse_s / mb / loop["seq_read_mb_s"], 3), "unit": "x"},
        **fuse_fio,
    }


def _check_transitions(testbed: Testbed, guest: str, domid: int,
                       path: str = "/run/xen/transitions.jsonl") -> None:
    """Every attach/detach of the bench went as the seeds allow, at both ends."""
    from xenbed.protocols.xenbus_state import Transition, violations

    seen = []
    for service in ("dom0", guest):
        text = testbed.exec(service, ["sh", "-c", f"cat {path} 2>/dev/null || true"]).stdout
        seen += [t for t in map(Transition.from_json, filter(str.strip, text.splitlines()))
                 if f"/backend/vbd/{domid}/" in t.path or t.path.startswith(f"/local/domain/{domid}/")]
    if not seen:
        raise AssertionError("no XenBus transitions recorded for the bench disk")
    bad = violations(seen)
    if bad:
        raise AssertionError(f"the bench disk broke the seed's state table: {bad[:5]}")


def vdev_devid(vdev: str) -> int:
    from xenbed.protocols.vdev import vdev_to_number
    return vdev_to_number(vdev)


def _fuse_seq_read(testbed: Testbed, size_mb: int, guest: str = "domu1") -> tuple[int, float]:
    """dd of `size_mb` MiB, 1 MiB blocks, from the guest's FUSE disk file
    (direct_io: no page cache in between); (bytes, seconds)."""
    from .waits import wait_for

    wait_for(lambda: testbed.exec(guest, ["test", "-e", "/run/xen/vbd/xvda"]).exit_code == 0,
             what=f"/run/xen/vbd/xvda in {guest}", timeout=30, interval=0.2)
    result = testbed.exec(guest, ["dd", "if=/run/xen/vbd/xvda", "of=/dev/null", "bs=1M", f"count={size_mb}"],
                          environment={"LC_ALL": "C"}, check=True)
    # "50331648 bytes (50 MB, 48 MiB) copied, 0.41 s, 122 MB/s"
    line = [ln for ln in (result.stderr or result.stdout).splitlines() if " copied, " in ln][-1]
    return int(line.split()[0]), float(line.split(" copied, ")[1].split()[0])


def _fuse_fio(testbed: Testbed, size_mb: int, seconds: float, depth: int,
              guest: str = "domu1") -> dict[str, dict]:
    """fio's 4 KiB random read, then write, on the guest's FUSE disk file
    (libaio, O_DIRECT, `depth` in flight, over its first `size_mb` MiB):
    IOPS and completion-latency p99."""
    figures = {}
    for rw in ("randread", "randwrite"):
        cmd = ["fio", f"--name=fuse{rw}", "--filename=/run/xen/vbd/xvda", "--direct=1", f"--rw={rw}", "--bs=4k",
               f"--size={size_mb}M", "--ioengine=libaio", f"--iodepth={depth}", "--time_based",
               f"--runtime={seconds}", "--randrepeat=0", "--output-format=json"]
        out = testbed.exec(guest, cmd, check=True).stdout
        side = json.loads(out[out.index("{"):])["jobs"][0]["read" if rw == "randread" else "write"]
        p99_us = side["clat_ns"]["percentile"]["99.000000"] / 1000.0
        kind = "read" if rw == "randread" else "write"
        figures[f"blk.fuse_fio_rand4k_{kind}_iops"] = {"value": round(side["iops"]), "unit": f"IOPS@qd{depth}"}
        figures[f"blk.fuse_fio_rand4k_{kind}_p99_us"] = {"value": round(p99_us), "unit": "us"}
    return figures


def bench_net(testbed: Testbed, seconds: int = 5, pings: int = 50) -> dict[str, dict]:
    """iperf3 and ping from domu1 (every frame through netfront, the rings and
    netback) against the same from dom0 over the same veth (the limit), in
    the same run; the peer runs `iperf3 -s`.  Also the reverse direction
    (peer -> domu1 against peer -> dom0, `iperf3 -R`) and guest to guest
    (domu1 -> domu2, both vifs on dom0's bridge; domu2 runs its own server)."""
    def out(service: str, script: str) -> str:
        return testbed.exec(service, ["sh", "-c", script], check=True).stdout

    def address(service: str, dev: str = "") -> str:
        return out(service, f"ip -4 -o addr show {dev} scope global").split()[3].split("/")[0]

    peer = address("peer")

    def peer_csum_errors() -> int:  # TCP and UDP InCsumErrors in the peer's /proc/net/snmp (nstat's source)
        lines = [line.split() for line in out("peer", "cat /proc/net/snmp").splitlines()]
        total = 0
        for names, values in zip(lines, lines[1:]):
            if names[0] in ("Tcp:", "Udp:") and values[0] == names[0] and "InCsumErrors" in names:
                total += int(values[names.index("InCsumErrors")])
        return total

    csum_errors_before = peer_csum_errors()

    def tcp_mbit_s(service: str, server: str = peer, reverse: bool = False) -> float:
        flags = " -R" if reverse else ""
        report = json.loads(out(service, f"timeout {seconds + 30} iperf3 -J -t {seconds}{flags} -c {server}"))
        return report["end"]["sum_received"]["bits_per_second"] / 1e6

    def ping_p50_us(service: str) -> float:
        lines = out(service, f"ping -c {pings} -i 0.02 -W 2 {peer}").splitlines()
        rtts = sorted(float(line.split("time=")[1].split()[0]) for line in lines if "time=" in line)
        return rtts[len(rtts) // 2] * 1000.0

    guest_tcp, veth_tcp = tcp_mbit_s("domu1"), tcp_mbit_s("dom0")
    guest_rx, veth_rx = tcp_mbit_s("domu1", reverse=True), tcp_mbit_s("dom0", reverse=True)
    out("domu2", "iperf3 -s -D -1 >/dev/null 2>&1; sleep 0.5")
    g2g = tcp_mbit_s("domu1", address("domu2", "dev eth0"))
    guest_ping, veth_ping = ping_p50_us("domu1"), ping_p50_us("dom0")
    csum_errors = peer_csum_errors() - csum_errors_before
    return {
        "net.tcp_mbit_s": {"value": round(guest_tcp, 1), "unit": "Mbit/s"},
        "net.veth_tcp_mbit_s": {"value": round(veth_tcp, 1), "unit": "Mbit/s"},
        "net.tcp_ratio": {"value": round(guest_tcp / veth_tcp, 4), "unit": "x"},
        "net.tcp_rx_mbit_s": {"value": round(guest_rx, 1), "unit": "Mbit/s"},
        "net.veth_tcp_rx_mbit_s": {"value": round(veth_rx, 1), "unit": "Mbit/s"},
        "net.tcp_rx_ratio": {"value": round(guest_rx / veth_rx, 4), "unit": "x"},
        "net.guest_to_guest_tcp_mbit_s": {"value": round(g2g, 1), "unit": "Mbit/s"},
        "net.ping_rtt_us_p50": {"value": round(guest_ping), "unit": "us"},
        "net.veth_ping_rtt_us_p50": {"value": round(veth_ping), "unit": "us"},
        "net.ping_rtt_ratio": {"value": round(guest_ping / veth_ping, 2), "unit": "x"},
        "net.peer_csum_errors": {"value": csum_errors, "unit": "segments"},
    }


def bench_suspend(testbed: Testbed, guest: str = "domu1", rounds: int = 3) -> dict[str, dict]:
    """Suspend and resume `guest` in place (toolstack/suspend.py), `rounds`
    times on new backends and `rounds` times cancelled.  resume_ms: from
    the suspend request to the guest running again with every device
    Connected at both ends (the p50 of the rounds); the limit beside it is
    the suspend alone (guest acknowledges, freezes, makes the hypercall)."""
    result = testbed.exec("dom0", ["python3", "-c", _guest_script("dom0_suspend.py"), guest, str(rounds)],
                          check=True)
    raw = json.loads(result.stdout.strip().splitlines()[-1])

    def p50(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    phases = {name: p50([p[name] for p in raw["phases"]]) * 1000 for name in raw["phases"][0]}
    return {
        "suspend.resume_ms": {"value": round(p50(raw["resume_ms"]), 1), "unit": "ms"},
        **{f"suspend.resume_{name}_ms": {"value": round(ms, 1), "unit": "ms"} for name, ms in phases.items()},
        "suspend.resume_ms_max": {"value": round(max(raw["resume_ms"]), 1), "unit": "ms"},
        "suspend.suspend_ms": {"value": round(p50(raw["suspend_ms"]), 1), "unit": "ms"},
        "suspend.cancelled_ms": {"value": round(p50(raw["cancelled_ms"]), 1), "unit": "ms"},
        "suspend.devices": {"value": raw["devices"], "unit": "devices"},
    }


TWO_HOSTS = "compose/two-hosts.yml"


def bench_migration(testbed: Testbed, trips: int = 2) -> dict[str, dict]:
    """Live migration of domu1 (64 MiB, a disk and a NIC) host-a -> host-b
    -> host-a, `trips` times, with the block workload writing and verifying
    all along; needs two hosts, so it brings up compose/two-hosts.yml of its
    own (tracing off).  downtime_ms: guest suspended -> every device
    Connected at the destination (p50 of the moves); total_ms: `xl migrate`
    from start to the source's clean-up; rounds/pages_sent: per move."""
    import secrets

    from .runenv import run_environment
    from .workload import BlockWorkload, check_nothing_lost

    client = testbed.client
    bed = Testbed.from_compose(TWO_HOSTS, f"xenbed-bench-mig-{secrets.token_hex(3)}", client=client,
                               env={**run_environment(client, TWO_HOSTS), "XENBED_TRACE": "0"})
    moves = []
    try:
        bed.up(progress=lambda line: None)
        workload = BlockWorkload(bed, "domu1", "xvda", workers=2).start()
        where = "dom0-a"
        for _ in range(trips * 2):
            there = "dom0-b" if where == "dom0-a" else "dom0-a"
            out = bed.exec(where, ["sh", "-c", f"xl migrate domu1 {there} --json 2>/dev/null"], check=True).stdout
            moves.append(json.loads(out.strip().splitlines()[-1]))
            where = there
        result = check_nothing_lost(bed, workload)
        if not result.ok:
            raise RuntimeError(f"migration bench lost writes:\n{result.render()}")
    finally:
        bed.down()

    def p50(values):
        return sorted(values)[len(values) // 2]

    return {
        "migration.downtime_ms": {"value": round(p50([m["downtime_ms"] for m in moves]), 1), "unit": "ms"},
        "migration.downtime_ms_max": {"value": round(max(m["downtime_ms"] for m in moves), 1), "unit": "ms"},
        "migration.total_ms": {"value": round(p50([m["total_ms"] for m in moves]), 1), "unit": "ms"},
        "migration.precopy_ms": {"value": round(p50([m["precopy_ms"] for m in moves]), 1), "unit": "ms"},
        "migration.rounds": {"value": p50([len(m["rounds"]) for m in moves]), "unit": "rounds"},
        "migration.pages_sent": {"value": p50([m["pages_sent"] for m in moves]), "unit": "pages"},
        "migration.final_round_pages": {"value": p50([m["rounds"][-1] for m in moves]), "unit": "pages"},
        "migration.moves": {"value": len(moves), "unit": "moves"},
        "migration.writes_acknowledged": {"value": result.stats.get("writes_ok", 0), "unit": "writes"},
    }


SUITES = {"xenstore": bench_xenstore, "evtchn": bench_evtchn, "evtchn_flood": bench_evtchn_flood,
          "blk": bench_blk, "net": bench_net,
          "suspend": bench_suspend, "migration": bench_migration}


def run(testbed: Testbed, suites: list[str] | None = None, progress=print) -> dict:
    figures: dict[str, dict] = {}
    set_tracing(testbed, False)  # every figure without the trace; xenstore's measures it on too
    try:
        for name in suites or list(SUITES):
            progress(f"bench: {name} ...")
            started = time.monotonic()
            figures.update(SUITES[name](testbed))
            progress(f"bench: {name} done in {time.monotonic() - started:.1f}s")
    finally:
        set_tracing(testbed, tracing_configured(testbed))
    return {
        "figures": figures,
        "machine": {"cpus": _cpus(), "platform": platform.platform()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpus() -> int:
    import os
    return os.cpu_count() or 0


def render(report: dict) -> str:
    rows = [("figure", "value", "unit", "goal", "")]
    for name, figure in report["figures"].items():
        goal = GOALS.get(name)
        verdict = ""
        goal_text = ""
        if goal:
            op, target = goal
            goal_text = f"{op} {target:,}"
            met = figure["value"] <= target if op == "<=" else figure["value"] >= target
            verdict = "met" if met else "MISSED"
        value = figure["value"]
        rows.append((name, f"{value:,}" if isinstance(value, (int, float)) else str(value), figure["unit"], goal_text, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j != 1 else cell.rjust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write(report: dict, path: str | Path = "out/bench.json") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
