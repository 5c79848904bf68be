"""A guest created at run time, then killed: what Xen promises its peers.

When a domain's container dies its kernel link drops and the domain is dying:
its event channels close (the peer's port goes back to unbound), its grants can
no longer be mapped, @releaseDomain fires and xenstored drops its nodes; `xl
destroy` then removes it and nothing is left.
"""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from xenbed.harness.fixtures import hypervisor_audit

pytestmark = pytest.mark.integration


def put_file(testbed, service: str, path: str, text: str) -> None:
    testbed.exec(service, ["sh", "-c", f"cat > {path} <<'XENBED_EOF'\n{textwrap.dedent(text)}\nXENBED_EOF"], check=True)


def read_json_when_there(testbed, service: str, path: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = testbed.exec(service, ["cat", path])
        if last.exit_code == 0 and last.stdout.strip():
            return json.loads(last.stdout)
        time.sleep(0.2)
    raise AssertionError(f"{service}:{path} never appeared; last read: {last}")


VICTIM = """
    import json, os, threading
    from xenbed.drivers.xen.hypercall import HypervisorLink
    from xenbed.protocols import hypercall as hc
    peer = int(os.environ["PEER"])
    link = HypervisorLink.open(role="device")
    gfn = link.call(hc.Call.MEM_ALLOC, {"count": 1})["gfns"][0]
    gref = link.call(hc.Call.GNTTAB_GRANT, {"domid": peer, "gfn": gfn})["gref"]
    port = link.call(hc.Call.EVTCHN_ALLOC_UNBOUND, {"remote_dom": peer})["port"]
    with open("/tmp/victim.json.part", "w") as f:
        json.dump({"gref": gref, "port": port, "domid": link.domid}, f)
    os.rename("/tmp/victim.json.part", "/tmp/victim.json")
    threading.Event().wait()
"""

HOLDER = """
    import json, os, threading
    from xenbed.drivers.xen.hypercall import HypervisorLink
    from xenbed.protocols import hypercall as hc
    victim, port = int(os.environ["VICTIM"]), int(os.environ["PORT"])
    link = HypervisorLink.open(role="device")
    local = link.call(hc.Call.EVTCHN_BIND_INTERDOMAIN, {"remote_dom": victim, "remote_port": port})["port"]
    with open("/tmp/holder.json.part", "w") as f:
        json.dump({"port": local}, f)
    os.rename("/tmp/holder.json.part", "/tmp/holder.json")
    threading.Event().wait()
"""

PROBE = """
    import json, os
    from xenbed.drivers.xen.hypercall import HypervisorLink, HypercallError
    from xenbed.protocols import hypercall as hc
    link = HypervisorLink.open(role="device")
    status = link.call(hc.Call.EVTCHN_STATUS, {"port": int(os.environ["LOCAL"])})
    try:
        link.call(hc.Call.GNTTAB_MAP, {"domid": int(os.environ["VICTIM"]), "gref": int(os.environ["GREF"])})
        mapped = "allowed"
    except HypercallError as exc:
        mapped = exc.code
    print(json.dumps({"status": status, "map": mapped}))
"""


def test_a_killed_guest_closes_its_ports_at_the_peer_and_its_grants(testbed, xen):
    domu1 = int(testbed.exec("dom0", ["xl", "domid", "domu1"], check=True).stdout)
    victim = xen.create_domain("victim", memory_mb=16)
    try:
        assert testbed.exec("victim", ["xenstore-read", "name"]).stdout.strip() == "victim"
        # dom0 watches @releaseDomain in the background: it must fire
        testbed.exec("dom0", ["sh", "-c", "rm -f /tmp/release.out; (timeout 30 xenstore-watch -n 2 @releaseDomain"
                                          " > /tmp/release.out 2>&1 &)"], check=True)
        put_file(testbed, "victim", "/tmp/victim.py", VICTIM)
        testbed.exec("victim", ["sh", "-c", f"PEER={domu1} nohup python3 /tmp/victim.py > /tmp/victim.log 2>&1 &"],
                     check=True)
        offered = read_json_when_there(testbed, "victim", "/tmp/victim.json")
        assert offered["domid"] == victim
        put_file(testbed, "domu1", "/tmp/holder.py", HOLDER)
        testbed.exec("domu1", ["sh", "-c", "rm -f /tmp/holder.json; "
                               f"VICTIM={victim} PORT={offered['port']} nohup python3 /tmp/holder.py "
                               "> /tmp/holder.log 2>&1 & echo $! > /tmp/holder.pid"], check=True)
        local = read_json_when_there(testbed, "domu1", "/tmp/holder.json")["port"]
        put_file(testbed, "domu1", "/tmp/probe.py", PROBE)
        probe = ["sh", "-c", f"LOCAL={local} VICTIM={victim} GREF={offered['gref']} python3 /tmp/probe.py"]
        before = json.loads(testbed.exec("domu1", probe, check=True).stdout.strip().splitlines()[-1])
        assert before["status"]["status"] == "interdomain"

        testbed.kill("victim")

        deadline = time.monotonic() + 10
        while True:
            after = json.loads(testbed.exec("domu1", probe, check=True).stdout.strip().splitlines()[-1])
            if after["status"]["status"] == "unbound" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after["status"]["status"] == "unbound", after
        assert after["map"] == "GNTST_general_error", after  # a dying domain's grants cannot be mapped
        assert testbed.exec("dom0", ["xenstore-exists", f"/local/domain/{victim}"]).exit_code != 0
        released = testbed.exec("dom0", ["cat", "/tmp/release.out"]).stdout.split()
        assert "@releaseDomain" in released[1:], released  # the first line is the watch's initial event
        listing = testbed.exec("dom0", ["xl", "list"], check=True).stdout
        assert any(line.split()[:2] == ["victim", str(victim)] and "-----d" in line for line in listing.splitlines())
        # the leak audit sees what the dead domain left until it is destroyed
        audit = hypervisor_audit(testbed)
        assert victim in audit["dying_domains"], audit
    finally:
        testbed.exec("domu1", ["sh", "-c", "kill $(cat /tmp/holder.pid) 2>/dev/null; true"])
        xen.destroy_domain("victim")
    assert "victim" not in testbed.exec("dom0", ["xl", "list"], check=True).stdout
    audit = hypervisor_audit(testbed)
    assert not any(audit.values()), audit
    with pytest.raises(LookupError):
        testbed.container("victim")
