"""Network devices survive a backend restart (docs: drivers/net/back.py
"recover", drivers/net/front.py "Recovery after a backend restart").

dom0's container is killed (SIGKILL: no clean-up of any kind) while domu1
pings the peer, and started again: its network namespace is new, so xenbr0,
the uplink and every vif are made again; netback finds the vif it served in
the store, left Connected, and says Closed; netfront keeps eth0 (same
ifindex, MAC, address), frees the old rings, grants and ports, and
reconnects on new ones; the ping gets answers again.  The same with only
the netback process killed (the kernel's module supervisor restarts it).
The block device of domu1 recovers in the same dom0 kill (blkback/blkfront
recovery).  Nothing of the old connections may stay: the guest's grants to
dom0 and its open event channels are counted from the hypervisor before and
after.  The plugin checks every XenBus transition against the seed table.
"""

from __future__ import annotations

import json
import time

import pytest

from xenbed.harness.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def testbed(private_testbed):
    """Its own testbed: after a dom0 restart the vif counters start again
    from zero while netfront's go on, which other modules' tests compare."""
    return private_testbed

VBD = 51712  # domu1's xvda
XVDA = "/run/xen/vbd/xvda"

# Run in dom0 (privileged): the guest's resources as the hypervisor sees
# them -- open ports (unbound or interdomain) and grants dom0 may copy from
# (one 1-byte GNTTABOP_copy per gref, batched).  A leaked old ring, pool or
# port shows up as a count higher than before the restart.
GUEST_RESOURCES = r"""
import json, sys
from xenbed.drivers.xen.hypercall import HypervisorLink
from xenbed.drivers.xen.evtchn import EventChannels
from xenbed.drivers.xen.gnttab import CopyOp, GrantRef, GrantTable, LocalFrame
from xenbed.drivers.xen.memory import GuestMemory
domid = int(sys.argv[1])
link = HypervisorLink.open(role="device")
evtchn, gnttab, mem = EventChannels(link), GrantTable(link), GuestMemory(link)
ports = []
for port in range(1, 512):
    try:
        if evtchn.status(port, domid)["status"] in ("unbound", "interdomain"):
            ports.append(port)
    except Exception:
        pass
[page] = mem.alloc(1)
grants = 0
for start in range(0, 8192, 512):
    ops = [CopyOp(GrantRef(domid, gref, 0), LocalFrame(page.gfn, 0), 1) for gref in range(start, start + 512)]
    grants += sum(status == "GNTST_okay" for status in gnttab.copy(ops, check=False))
mem.free([page])
print(json.dumps({"ports": ports, "grants": grants}))
"""


def sh(testbed, service: str, script: str, **kw) -> str:
    return testbed.exec(service, ["sh", "-c", script], check=True, **kw).stdout


def domid_of(testbed, name: str) -> int:
    return int(sh(testbed, "dom0", f"xl domid {name}"))


def guest_resources(testbed, domid: int) -> dict:
    out = testbed.exec("dom0", ["python3", "-c", GUEST_RESOURCES, str(domid)], check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def states(testbed, domid: int, kind: str, devid: int) -> tuple[str | None, str | None]:
    """(frontend, backend) state as the guest reads them."""
    def read(path):
        r = testbed.exec("domu1", ["xenstore-read", path])
        return r.stdout.strip() if r.exit_code == 0 else None
    return (read(f"/local/domain/{domid}/device/{kind}/{devid}/state"),
            read(f"/local/domain/0/backend/{kind}/{domid}/{devid}/state"))


def vif_status(testbed) -> dict:
    return json.loads(sh(testbed, "domu1", "cat /run/xen/vif/0.json"))


def eth0(testbed) -> dict:
    link = json.loads(sh(testbed, "domu1", "ip -j addr show dev eth0"))[0]
    return {"ifindex": link["ifindex"], "mac": link["address"],
            "addresses": sorted(a["local"] for a in link["addr_info"] if a["family"] == "inet")}


def wait_connected(testbed, domid: int, timeout: float = 60) -> None:
    for kind, devid in (("vif", 0), ("vbd", VBD)):
        wait_for(lambda: states(testbed, domid, kind, devid) == ("4", "4"),
                 what=f"domu1's {kind} {devid}: both ends Connected", timeout=timeout, interval=0.3,
                 describe=lambda _: f"(frontend, backend) = {states(testbed, domid, kind, devid)}")


def wait_healthy(testbed, service: str, timeout: float = 90) -> None:
    def healthy():
        container = testbed.container(service)
        container.reload()
        return (container.attrs["State"].get("Health") or {}).get("Status") == "healthy"
    wait_for(healthy, what=f"{service} to be healthy again", timeout=timeout, interval=0.5)


@pytest.fixture(scope="module")
def peer(testbed) -> str:
    return sh(testbed, "peer", "ip -4 -o addr show scope global").split()[3].split("/")[0]


class Ping:
    """A ping from domu1 to `target` running in the background, one line per
    reply with a timestamp (-D), until stopped."""

    LOG = "/tmp/recovery-ping.log"

    def __init__(self, testbed, target: str):
        self.testbed = testbed
        sh(testbed, "domu1", f"rm -f {self.LOG}; (timeout 300 ping -D -i 0.2 -W 1 {target} > {self.LOG} 2>&1 &)")

    def replies(self) -> list[float]:
        out = sh(self.testbed, "domu1", f"cat {self.LOG} 2>/dev/null || true")
        return [float(line[1:line.index("]")]) for line in out.splitlines()
                if line.startswith("[") and "bytes from" in line]

    def stop(self) -> None:
        self.testbed.exec("domu1", ["sh", "-c", "kill $(pidof ping) 2>/dev/null; true"])


def recover_and_check(testbed, peer: str, domid: int, restart) -> dict:
    """Everything both recovery tests assert around `restart()`."""
    wait_connected(testbed, domid)
    before = {"eth0": eth0(testbed), "status": vif_status(testbed), "resources": guest_resources(testbed, domid)}
    ping = Ping(testbed, peer)
    try:
        wait_for(lambda: len(ping.replies()) >= 3, what="the ping to get answers before the restart", timeout=20)
        restart()
        restarted_at = time.time()
        wait_connected(testbed, domid, timeout=90)
        # answers again, to pings sent after the restart
        wait_for(lambda: [t for t in ping.replies() if t > restarted_at], timeout=60, interval=0.5,
                 what="the ping from domu1 to the peer to get answers again after the restart")
    finally:
        ping.stop()
    after = {"eth0": eth0(testbed), "status": vif_status(testbed)}
    assert after["eth0"] == before["eth0"], "eth0 was never closed: same ifindex, MAC and addresses"
    status = after["status"]
    assert status["resets"] == before["status"]["resets"] + 1, status  # the reset path, not a new device
    assert status["connects"] == before["status"]["connects"] + 1
    assert status["gratuitous_arps"] > before["status"]["gratuitous_arps"]
    assert status["leaked_grants"] == 0 and status["state"] == "Connected" and status["carrier"]
    assert " 0% packet loss" in sh(testbed, "domu1", f"ping -c 3 -i 0.2 -W 2 {peer}")
    # nothing of the old connections is left: the guest holds as many grants
    # and ports as before (new rings in place of the old ones, not beside them)
    resources = wait_for(lambda: (r := guest_resources(testbed, domid)) == before["resources"] and r,
                         what="the guest's grants and ports to be what they were before the restart",
                         timeout=20, interval=1, describe=lambda r: f"{r}, before {before['resources']}")
    assert resources["grants"] > 0 and len(resources["ports"]) >= 2
    return status


def test_network_survives_a_killed_and_restarted_dom0(testbed, peer):
    domid = domid_of(testbed, "domu1")
    wait_connected(testbed, domid)
    # a MiB written to the disk before the kill must read back the same after it
    blk_sum = sh(testbed, "domu1", f"head -c 1048576 /dev/urandom > /tmp/blk && md5sum < /tmp/blk && "
                                   f"dd if=/tmp/blk of={XVDA} bs=64k seek=512 conv=notrunc,fsync status=none")

    def kill_dom0_and_start_it():
        testbed.kill("dom0", "SIGKILL")
        testbed.start("dom0")
        wait_healthy(testbed, "dom0")

    recover_and_check(testbed, peer, domid, kill_dom0_and_start_it)
    # dom0's network was made again in its new namespace: the bridge carries
    # the uplink and the recreated vif, both up
    bridge_ports = sh(testbed, "dom0", "ls /sys/class/net/xenbr0/brif").split()
    assert f"vif{domid}.0" in bridge_ports and len(bridge_ports) >= 2, bridge_ports
    assert sh(testbed, "dom0", f"cat /sys/class/net/vif{domid}.0/operstate").strip() in ("up", "unknown")
    backend = f"/local/domain/0/backend/vif/{domid}/0"
    assert sh(testbed, "dom0", f"xenstore-read {backend}/hotplug-status").strip() == "connected"
    # the disk recovered in the same kill, and reads what it read before
    assert states(testbed, domid, "vbd", VBD) == ("4", "4")
    assert sh(testbed, "domu1", f"dd if={XVDA} of=/tmp/blk-after bs=64k skip=512 count=16 status=none && "
                                f"md5sum < /tmp/blk-after") == blk_sum


def test_network_survives_a_killed_netback_process(testbed, peer):
    domid = domid_of(testbed, "domu1")

    def kill_netback():
        pid = sh(testbed, "dom0", "pgrep -f '^[^ ]*python3 -m xenbed.drivers.net.back'").split()
        assert len(pid) == 1, pid
        testbed.kill_process("dom0", "^[^ ]*python3 -m xenbed.drivers.net.back")  # that one pid
        # the kernel's module supervisor starts a new one (modules.py)
        wait_for(lambda: (p := sh(testbed, "dom0", "pgrep -f '^[^ ]*python3 -m xenbed.drivers.net.back' || true")
                          .split()) and p != pid,
                 what="a new netback process", timeout=20)

    recover_and_check(testbed, peer, domid, kill_netback)
