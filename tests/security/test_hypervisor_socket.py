"""Hostile guests against the hypervisor socket and guest memory (issue
#16), each attack replayed from inside a guest as the issue found it working
(domu2 attacks here: domu1 is the guest with a disk in the default topology).

After each one the hypervisor, dom0 and domu1 must still answer, the limit
must answer with the error Xen (or the kernel) gives, and a block workload
running in domu1 meanwhile must lose nothing.
"""

from __future__ import annotations

import textwrap

import pytest

from .attack import everyone_still_answers, python_in

pytestmark = [pytest.mark.integration, pytest.mark.block_workload(domain="domu1", workers=1)]

GUEST_PRELUDE = """
import errno, fcntl, json, mmap, os, socket, struct, sys, time
from xenbed.drivers.xen import (GrantError, GrantTable, GuestMemory, HypercallError, HypervisorLink,
                                CopyOp, LocalFrame)
from xenbed.protocols import hypercall as hc
SOCK = os.environ.get("XENBED_HYPERVISOR_SOCKET", "/run/xenbed/hypervisor.sock")

def out(obj):
    print(json.dumps(obj), flush=True)

def error_of(fn):
    try:
        fn()
        return "allowed"
    except GrantError as exc:
        return exc.status
    except HypercallError as exc:
        return exc.code
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
"""


def in_guest(testbed, service: str, script: str, timeout: float = 120) -> dict:
    return python_in(testbed, service, textwrap.dedent(GUEST_PRELUDE) + textwrap.dedent(script), timeout=timeout)


def hypervisor_fds(testbed) -> int:
    return int(testbed.exec("hypervisor", ["sh", "-c", "ls /proc/1/fd | wc -l"], check=True).stdout.strip())


def everyone_answers(testbed) -> None:
    """The hypervisor, dom0 and the other guest still answer, and a PING is quick."""
    everyone_still_answers(testbed)
    assert "domu1" in testbed.exec("dom0", ["xl", "list"], check=True).stdout
    ping = in_guest(testbed, "domu1", """
        link = HypervisorLink.open()
        t = time.perf_counter(); link.call(hc.Call.PING, {}); out({"ms": (time.perf_counter() - t) * 1e3})
    """)
    assert ping["ms"] < 1000


@pytest.fixture
def other_guest_writes(block_workload):
    """domu1 writes and verifies its disk throughout the test: nothing lost."""
    yield block_workload
    block_workload.assert_nothing_lost()


def test_descriptors_a_guest_sends_where_no_call_takes_them_are_not_kept(testbed, other_guest_writes):
    before = hypervisor_fds(testbed)
    out = in_guest(testbed, "domu2", """
        link = HypervisorLink.open()
        r, w = os.pipe()
        got = {}
        # 40 descriptors with PING (which takes none), 40 with a frame that
        # does not say it carries them, 40 pipes given to XS_ADOPT
        for i in range(40):
            link.call(hc.Call.PING, {}, fds=[r])
        for i in range(40):
            data = hc.Frame(hc.Call.PING, 0, 1000 + i, {}).encode()
            link.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
        got["adopt a pipe"] = error_of(lambda: [link.call(hc.Call.XS_ADOPT, {}, fds=[r]) for _ in range(40)])
        time.sleep(0.5)
        got["ping after"] = link.call(hc.Call.PING, {})["pong"]
        out(got)
    """)
    assert out == {"adopt a pipe": "EINVAL", "ping after": True}
    assert hypervisor_fds(testbed) <= before + 4, "the hypervisor kept descriptors the guest sent"
    everyone_answers(testbed)


def test_links_that_never_say_hello_cost_little_and_go(testbed, other_guest_writes):
    before = hypervisor_fds(testbed)
    out = in_guest(testbed, "domu2", """
        socks = []
        for i in range(200):
            s = socket.socket(socket.AF_UNIX); s.connect(SOCK)
            try:
                s.sendall(b"\\xff" * 3000)  # a header announcing a huge frame, never finished
            except OSError:
                pass
            socks.append(s)
        time.sleep(1)
        link = HypervisorLink.open()
        pong = link.call(hc.Call.PING, {})["pong"]
        time.sleep(6)  # past the HELLO deadline: every stranger is dropped
        dropped = 0
        for s in socks:
            s.settimeout(2)
            try:
                dropped += s.recv(16) == b""
            except OSError:
                dropped += 1
        out({"pong": pong, "dropped": dropped})
    """)
    assert out["pong"] is True
    assert out["dropped"] == 200
    assert hypervisor_fds(testbed) <= before + 4
    everyone_answers(testbed)


def test_a_flood_of_calls_does_not_hold_another_links_ping(testbed, other_guest_writes):
    out = in_guest(testbed, "domu2", """
        import threading
        flooder = HypervisorLink.open()
        copy = {"ops": [{"src": {"gfn": 0, "offset": 0}, "dst": {"gfn": 0, "offset": 0}, "len": 8}] * 300}
        too_big = error_of(lambda: flooder.call(hc.Call.GNTTAB_COPY, copy))
        frames = b"".join(hc.Frame(hc.Call.PING, 0, 0, {}).encode() for _ in range(20000))
        threading.Thread(target=lambda: flooder.sock.sendall(frames), daemon=True).start()
        other = HypervisorLink.open()
        worst = 0.0
        for _ in range(50):
            t = time.perf_counter(); other.call(hc.Call.PING, {}); worst = max(worst, time.perf_counter() - t)
        out({"too big": too_big, "worst_ms": worst * 1e3})
    """)
    assert out["too big"] == "EINVAL"
    assert out["worst_ms"] < 100, f"a PING waited {out['worst_ms']:.0f} ms behind another link's flood"
    everyone_answers(testbed)


def test_a_read_only_grant_cannot_be_reopened_writable_leased_or_survive_truncation(testbed, other_guest_writes):
    out = in_guest(testbed, "domu2", """
        link = HypervisorLink.open()
        mem, gnttab = GuestMemory(link), GrantTable(link)
        [page, mine] = mem.alloc(2)
        page.mmap[:6] = b"secret"
        gref = gnttab.grant(link.domid, page, readonly=True)
        handle, gfn, fd = gnttab.map_fd(link.domid, gref, readonly=True)
        got = {"reopen writable": error_of(lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR)),
               "lease": error_of(lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK))}
        os.close(fd); gnttab.unmap_handle(handle); gnttab.end(gref)
        # The granter shrinks its own page file under the hypervisor's mapping,
        # then asks it to copy from that page: the op fails, nobody dies.
        _, fds = link.call_with_fds(hc.Call.MEM_MAP, {"gfn": page.gfn})
        os.ftruncate(fds[0], 0)
        got["copy from a shrunk page"] = gnttab.copy([CopyOp(LocalFrame(page.gfn, 0), LocalFrame(mine.gfn, 0), 4096)],
                                                    check=False)[0]
        os.ftruncate(fds[0], 4096)
        got["copy after it is whole again"] = gnttab.copy(
            [CopyOp(LocalFrame(page.gfn, 0), LocalFrame(mine.gfn, 0), 4096)], check=False)[0]
        out(got)
    """)
    assert out["reopen writable"] == "EACCES"
    assert out["lease"] in ("EACCES", "EPERM")
    assert out["copy from a shrunk page"] != "GNTST_okay"
    assert out["copy after it is whole again"] == "GNTST_okay"
    everyone_answers(testbed)


def test_the_hypervisor_socket_cannot_be_replaced_by_a_guest(testbed, other_guest_writes):
    out = in_guest(testbed, "domu2", """
        got = {"rename": error_of(lambda: os.rename(SOCK, SOCK + ".old")),
               "create": error_of(lambda: socket.socket(socket.AF_UNIX).bind(SOCK + ".evil"))}
        link = HypervisorLink.open()
        got["still reached"] = link.call(hc.Call.PING, {})["pong"]
        out(got)
    """)
    assert out == {"rename": "EROFS", "create": "EROFS", "still reached": True}
    everyone_answers(testbed)
