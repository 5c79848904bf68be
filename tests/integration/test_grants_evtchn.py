"""Grants and event channels between two guests, through the guest API
(`xenbed.drivers.xen`) running inside the domain containers.

domu1 plays a frontend and domu2 a backend: they share a ring page granted by
domu1, signal each other over an interdomain event channel, and exchange 1000
requests and responses.  Then every refusal the hypervisor owes a guest is
asserted, and a driver process that dies is shown to leave nothing behind.

Two scripts that must run at the same time run in two threads of the test,
each in its own `testbed.exec`; they meet through XenStore, as split drivers
do: the granter publishes under its own `data/<tag>/` with read permission
for the peer, the peer polls for the key.  `<tag>` is fresh per test so that
reruns on one testbed never read stale keys.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration

PRELUDE = """
import json, mmap, os, struct, sys, time
from xenbed.drivers.xen import (EventChannels, GrantError, GrantTable, GuestMemory, HypercallError,
                                HypervisorLink, XenStoreClient, XenStoreError)
from xenbed.protocols.ring import BackRing, FrontRing, SharedRing

link = HypervisorLink.open()
mem, gnttab, evtchn = GuestMemory(link), GrantTable(link), EventChannels(link)
store = XenStoreClient()
me = link.domid

def out(obj):
    print(json.dumps(obj), flush=True)

def publish(tag, key, value, reader):
    # data/<tag>/<key> in our own directory, readable by domain `reader`
    path = f"/local/domain/{me}/data/{tag}/{key}"
    store.write(path, str(value))
    store.set_perms(path, [f"n{me}", f"r{reader}"])

def await_key(domid, tag, key, timeout=60.0):
    path = f"/local/domain/{domid}/data/{tag}/{key}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            return store.read(path)
        except XenStoreError as exc:
            if exc.errno_name not in ("ENOENT", "EACCES") or time.monotonic() > deadline:
                raise
        time.sleep(0.02)

def refused(fn):
    # the GNTST / errno name of a refusal, or "allowed"
    try:
        fn()
        return "allowed"
    except GrantError as exc:
        return exc.status
    except HypercallError as exc:
        return exc.code
    except PermissionError:
        return "PermissionError"
"""


def domid(testbed, service: str) -> int:
    result = testbed.exec("dom0", ["xl", "domid", service])
    assert result.exit_code == 0, result.stdout + result.stderr
    return int(result.stdout.strip())


def guest_run(testbed, service: str, script: str, *args, timeout: float = 180) -> dict:
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(script)
    result = testbed.exec(service, ["python3", "-c", code, *map(str, args)], timeout=timeout)
    assert result.exit_code == 0, f"{service} script failed:\n{result.stdout}{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_together(testbed, *runs: tuple) -> list[dict]:
    """Run (service, script, *args) tuples at the same time; their outputs in order."""
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(guest_run, testbed, *run) for run in runs]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def doms(testbed):
    return {"dom0": 0, "domu1": domid(testbed, "domu1"), "domu2": domid(testbed, "domu2")}


def tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


# ---------------------------------------------------------------------------
# 1000 requests over a granted ring with event channels
# ---------------------------------------------------------------------------
REQUESTS = 1000

FRONTEND = """
    import random
    peer, tag, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    [page] = mem.alloc(1)
    SharedRing.init(page.mmap)
    front = FrontRing(page.mmap, 16)
    gref = gnttab.grant(peer, page)
    port = evtchn.alloc_unbound(peer)
    publish(tag, "ring-ref", gref, peer)
    publish(tag, "event-channel", port, peer)
    deadline = time.monotonic() + 60
    while evtchn.status(port)["status"] != "interdomain":
        assert time.monotonic() < deadline, "the backend never bound the event channel"
        time.sleep(0.01)
    rng = random.Random(7)
    sent = received = notified = suppressed = waits = 0
    wrong = []
    while received < total:
        if sent < total and not front.full():
            burst = min(front.free_requests(), total - sent, rng.randint(1, 24))
            for _ in range(burst):
                front.put_request(struct.pack("<QQ", sent, sent * 7 + 3))
                sent += 1
            if front.push_requests_and_check_notify():
                evtchn.notify(port)
                notified += 1
            else:
                suppressed += 1
        progressed = False
        while front.unconsumed_responses():
            rid, value = struct.unpack("<QQ", front.take_response())
            if rid != received or value != (rid * 7 + 3) * 2 + 1:
                wrong.append([received, rid, value])
            received += 1
            progressed = True
        if progressed or received >= total or (sent < total and not front.full()):
            continue
        if front.final_check_for_responses():
            continue
        waits += 1
        assert evtchn.wait(port, 30), f"no event from the backend: sent {sent}, received {received}"
    # the backend unmaps and closes once it answered everything; then we revoke
    while evtchn.status(port)["status"] == "interdomain":
        time.sleep(0.01)
    deadline = time.monotonic() + 30
    while True:
        try:
            gnttab.end(gref)
            break
        except GrantError as exc:
            assert exc.status == "GNTST_eagain" and time.monotonic() < deadline, exc
            time.sleep(0.01)
    front.release()
    mem.free([page])
    out({"received": received, "wrong": wrong[:5], "notified": notified, "suppressed": suppressed,
         "waits": waits, "deliveries": evtchn.deliveries(port), "gref": gref, "port": port, "ended": True})
"""

BACKEND = """
    peer, tag, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    gref = int(await_key(peer, tag, "ring-ref"))
    rport = int(await_key(peer, tag, "event-channel"))
    mapping = gnttab.map(peer, gref)
    back = BackRing(mapping.mmap, 16)
    port = evtchn.bind_interdomain(peer, rport)
    answered = notified = suppressed = waits = 0
    while answered < total:
        while back.unconsumed_requests():
            rid, value = struct.unpack("<QQ", back.take_request())
            back.put_response(struct.pack("<QQ", rid, value * 2 + 1))
            answered += 1
        if back.push_responses_and_check_notify():
            evtchn.notify(port)
            notified += 1
        else:
            suppressed += 1
        if answered >= total or back.final_check_for_requests():
            continue
        waits += 1
        assert evtchn.wait(port, 30), f"no event from the frontend after {answered} requests"
    deliveries = evtchn.deliveries(port)
    back.release()
    gnttab.unmap(mapping)
    evtchn.close(port)
    out({"answered": answered, "notified": notified, "suppressed": suppressed, "waits": waits,
         "deliveries": deliveries})
"""


def test_a_thousand_requests_cross_a_granted_ring_with_event_channels(testbed, doms):
    t = tag()
    front, back = run_together(
        testbed,
        ("domu1", FRONTEND, doms["domu2"], t, REQUESTS),
        ("domu2", BACKEND, doms["domu1"], t, REQUESTS),
    )
    assert front["received"] == REQUESTS and front["wrong"] == []
    assert back["answered"] == REQUESTS
    assert front.get("ended"), "the frontend could not revoke its grant after the backend unmapped"
    # Events flowed both ways (each upcall may stand for several sends) ...
    assert front["deliveries"] >= 1 and back["deliveries"] >= 1
    assert front["notified"] >= 1 and back["notified"] >= 1
    # ... and a side that waited was woken every time.
    assert back["deliveries"] >= back["waits"] and front["deliveries"] >= front["waits"]
    print(f"\nring: front notified {front['notified']}x / suppressed {front['suppressed']}x, "
          f"{front['deliveries']} upcalls; back notified {back['notified']}x / suppressed "
          f"{back['suppressed']}x, {back['deliveries']} upcalls")


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------
GRANTER = """
    peer, tag = int(sys.argv[1]), sys.argv[2]
    pages = mem.alloc(3)
    pages[1].mmap[:6] = b"secret"
    pages[2].mmap[:8] = b"readonly"
    to_dom0 = gnttab.grant(0, pages[0])                    # offered to dom0, not to peer
    shared = gnttab.grant(peer, pages[1])                  # read-write for peer
    ro = gnttab.grant(peer, pages[2], readonly=True)       # read-only for peer
    port_for_dom0 = evtchn.alloc_unbound(0)                # offered to dom0, not to peer
    for key, value in (("to-dom0", to_dom0), ("shared", shared), ("ro", ro), ("port", port_for_dom0)):
        publish(tag, key, value, peer)
    await_key(peer, tag, "mapped")
    while_mapped = refused(lambda: gnttab.end(shared))
    publish(tag, "end-tried", while_mapped, peer)
    await_key(peer, tag, "unmapped")
    after_unmap = refused(lambda: gnttab.end(shared))
    for gref in (to_dom0, ro):
        gnttab.end(gref)
    evtchn.close(port_for_dom0)
    mem.free(pages)
    out({"end while mapped": while_mapped, "end after unmap": after_unmap})
"""

MAPPER = """
    peer, tag = int(sys.argv[1]), sys.argv[2]
    res = {}
    to_dom0 = int(await_key(peer, tag, "to-dom0"))
    shared = int(await_key(peer, tag, "shared"))
    ro = int(await_key(peer, tag, "ro"))
    port_for_dom0 = int(await_key(peer, tag, "port"))
    res["map a grant offered to dom0"] = refused(lambda: gnttab.map(peer, to_dom0))
    res["map a read-only grant writable"] = refused(lambda: gnttab.map(peer, ro))
    handle, gfn, fd = gnttab.map_fd(peer, ro, readonly=True)
    res["PROT_WRITE on the read-only page"] = refused(
        lambda: mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    view = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    res["read through the read-only mapping"] = bytes(view[:8]).decode()
    view.close(); os.close(fd); gnttab.unmap_handle(handle)
    ro_map = gnttab.map(peer, ro, readonly=True)
    res["write to a readonly Mapping"] = "allowed"
    try:
        ro_map.mmap[0:1] = b"X"
    except TypeError:
        res["write to a readonly Mapping"] = "TypeError"
    gnttab.unmap(ro_map)
    res["bind a port offered to dom0"] = refused(lambda: evtchn.bind_interdomain(peer, port_for_dom0))
    mine = evtchn.alloc_unbound(peer)
    evtchn.close(mine)
    res["send on a closed port"] = refused(lambda: evtchn.notify(mine, checked=True))
    res["status of a closed port"] = evtchn.status(mine)["status"]
    m = gnttab.map(peer, shared)
    res["read through the shared mapping"] = bytes(m.mmap[:6]).decode()
    publish(tag, "mapped", 1, peer)
    res["granter's end while mapped"] = await_key(peer, tag, "end-tried")
    gnttab.unmap(m)
    res["unmap twice"] = refused(lambda: gnttab.unmap_handle(m.handle))
    publish(tag, "unmapped", 1, peer)
    out(res)
"""


def test_refusals_of_grants_and_ports(testbed, doms):
    t = tag()
    granter, mapper = run_together(
        testbed,
        ("domu1", GRANTER, doms["domu2"], t),
        ("domu2", MAPPER, doms["domu1"], t),
    )
    assert mapper == {
        "map a grant offered to dom0": "GNTST_general_error",
        "map a read-only grant writable": "GNTST_general_error",
        "PROT_WRITE on the read-only page": "PermissionError",
        "read through the read-only mapping": "readonly",
        "write to a readonly Mapping": "TypeError",
        "bind a port offered to dom0": "EINVAL",
        "send on a closed port": "EINVAL",
        "status of a closed port": "closed",
        "read through the shared mapping": "secret",
        "granter's end while mapped": "GNTST_eagain",
        "unmap twice": "GNTST_bad_handle",
    }
    assert granter["end while mapped"] == "GNTST_eagain"
    assert granter["end after unmap"] == "allowed"


def test_grant_copy_and_query_size(testbed, doms):
    t = tag()
    granter_script = """
        peer, tag = int(sys.argv[1]), sys.argv[2]
        [src, dst] = mem.alloc(2)
        src.mmap[:] = bytes(range(256)) * 16
        rd = gnttab.grant(peer, src, readonly=True)
        wr = gnttab.grant(peer, dst)
        publish(tag, "rd", rd, peer); publish(tag, "wr", wr, peer)
        await_key(peer, tag, "copied")
        out({"dst": bytes(dst.mmap[100:104]).hex(), "size": gnttab.query_size()})
        gnttab.end(rd); gnttab.end(wr); mem.free([src, dst])
    """
    copier_script = """
        from xenbed.drivers.xen import CopyOp, GrantRef, LocalFrame
        peer, tag = int(sys.argv[1]), sys.argv[2]
        rd, wr = int(await_key(peer, tag, "rd")), int(await_key(peer, tag, "wr"))
        [mine] = mem.alloc(1)
        statuses = gnttab.copy([
            CopyOp(GrantRef(peer, rd, 0), LocalFrame(mine.gfn, 0), 4096),         # theirs -> mine
            CopyOp(LocalFrame(mine.gfn, 16), GrantRef(peer, wr, 100), 4),          # mine -> theirs
            CopyOp(LocalFrame(mine.gfn, 0), GrantRef(peer, rd, 0), 4),             # into a read-only grant
            CopyOp(LocalFrame(mine.gfn, 4000), GrantRef(peer, wr, 0), 200),        # crosses the page end
        ], check=False)
        publish(tag, "copied", 1, peer)
        out({"statuses": statuses, "mine": bytes(mine.mmap[:4096]) == bytes(range(256)) * 16})
    """
    granter, copier = run_together(
        testbed,
        ("domu1", granter_script, doms["domu2"], t),
        ("domu2", copier_script, doms["domu1"], t),
    )
    assert copier["mine"]
    assert copier["statuses"][:2] == ["GNTST_okay", "GNTST_okay"]
    assert copier["statuses"][2] != "GNTST_okay"  # a read-only grant cannot be copied into
    assert copier["statuses"][3] == "GNTST_bad_copy_arg"
    assert granter["dst"] == bytes(range(16, 20)).hex()
    assert granter["size"]["nr_frames"] >= 1 and granter["size"]["max_frames"] >= granter["size"]["nr_frames"]


# ---------------------------------------------------------------------------
# A driver that dies leaves nothing behind
# ---------------------------------------------------------------------------
# The victim is a device link in domu2 that bound domu1's port and granted a
# page to domu1.  Ways to kill it: each returns once it is dead.  A killed
# container (the whole domain dying) belongs here too, as another entry, once
# the harness can start a throwaway domain's container.
VICTIM = """
    peer, tag = int(sys.argv[1]), sys.argv[2]
    with open(f"/tmp/{tag}.pid", "w") as f:
        f.write(str(os.getpid()))
    rport = int(await_key(peer, tag, "port"))
    port = evtchn.bind_interdomain(peer, rport)
    [page] = mem.alloc(1)
    page.mmap[:6] = b"victim"
    gref = gnttab.grant(peer, page)
    publish(tag, "victim-gref", gref, peer)
    publish(tag, "victim-port", port, peer)
    out({"port": port, "gref": gref})
    time.sleep(3600)
"""

# domu1's side lives through the kill: its port belongs to its link, and
# would close with it.  The test tells it the victim is dead through a key
# that dom0 writes into domu1's directory.
SURVIVOR = """
    peer, tag = int(sys.argv[1]), sys.argv[2]
    port = evtchn.alloc_unbound(peer)
    publish(tag, "port", port, peer)
    gref = int(await_key(peer, tag, "victim-gref"))
    await_key(peer, tag, "victim-port")
    deadline = time.monotonic() + 30
    while evtchn.status(port)["status"] != "interdomain":
        assert time.monotonic() < deadline, "the victim never bound"
        time.sleep(0.01)
    m = gnttab.map(peer, gref)
    before = {"status": evtchn.status(port)["status"], "page": bytes(m.mmap[:6]).decode()}
    gnttab.unmap(m)  # a mapped grant would (rightly) outlive its granter's link
    store.write(f"data/{tag}/ready", "1")
    await_key(me, tag, "killed", timeout=120)
    deadline = time.monotonic() + 10
    while True:  # the hypervisor notices the link drop asynchronously
        st = evtchn.status(port)
        if st["status"] != "interdomain" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    after = {"status": st["status"], "remote_dom": st.get("remote_dom"),
             "map": refused(lambda: gnttab.map(peer, gref))}
    evtchn.close(port)
    out({"before": before, "after": after})
"""


def kill_device_process(testbed, service: str, t: str) -> None:
    testbed.kill_process(service, f" {t}$")  # SIGKILL to the victim, the one process whose last argument is t
    result = testbed.exec(service, ["rm", f"/tmp/{t}.pid", f"/tmp/{t}.out"])
    assert result.exit_code == 0, result.stdout + result.stderr


KILLERS = {"device process": kill_device_process}


def dom0_await(testbed, path: str, timeout: float = 60) -> None:
    import time
    deadline = time.monotonic() + timeout
    while testbed.exec("dom0", ["xenstore-read", path]).exit_code != 0:
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("killer", list(KILLERS))
def test_a_dead_driver_leaves_no_port_or_grant_behind(testbed, doms, killer):
    t = tag()
    d1, d2 = doms["domu1"], doms["domu2"]
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(VICTIM)
    # In the background: the exec returns while the victim lives on.
    started = testbed.exec("domu2", ["sh", "-c", 'python3 -c "$0" "$1" "$2" >/tmp/$2.out 2>&1 &', code, str(d1), t])
    assert started.exit_code == 0, started.stdout + started.stderr
    with ThreadPoolExecutor(1) as pool:
        survivor = pool.submit(guest_run, testbed, "domu1", SURVIVOR, d2, t)
        try:
            dom0_await(testbed, f"/local/domain/{d1}/data/{t}/ready")
        except AssertionError:
            if survivor.done():
                survivor.result()  # its failure says more
            raise
        KILLERS[killer](testbed, "domu2", t)
        assert testbed.exec("dom0", ["xenstore-write", f"/local/domain/{d1}/data/{t}/killed", "1"]).exit_code == 0
        out = survivor.result()
    assert out["before"] == {"status": "interdomain", "page": "victim"}
    # Our port is offered to the dead driver's domain again; its grant is gone.
    assert out["after"] == {"status": "unbound", "remote_dom": d2, "map": "GNTST_general_error"}
