"""Issue #16, attack 3: grant mappings that fill a maptrack.

Reported: a guest that redid its vbd handshake with 1,100 persistent grants
made dom0 hold 1,100 mappings of its pages, and dom0's maptrack (then 1,024
entries) was full: every guest's next request failed.  Maptracks now have
Xen 4.17's size, per mapper (hypervisor/gnttab.py: 1,024 frames of 512), so

* dom0 holding 1,100 mappings of domu2's grants, as blkback holding its
  persistent grants, still maps domu1's: domu1's disk works;
* a guest can fill only its own maptrack, and then gets Xen's
  GNTST_no_device_space, while dom0, the hypervisor and domu1 go on.
"""

from __future__ import annotations

import pytest

from xenbed.harness.waits import wait_for

from .attack import python_in, sh

pytestmark = pytest.mark.integration

PERSISTENT = 1100
ATTACKER, VICTIM = "domu2", "domu1"  # the victim has a disk (compose/domains)

# Grants PERSISTENT pages to dom0 and holds them until /tmp/maptrack-stop.
GRANT_TO_DOM0 = f"""
import json, os, time
from xenbed.drivers.xen import GrantTable, GuestMemory, HypervisorLink
link = HypervisorLink.open(reader="inline")
pages = GuestMemory(link).alloc({PERSISTENT})
grefs = [GrantTable(link).grant(0, page) for page in pages]
with open("/tmp/maptrack-grefs.tmp", "w") as f:
    json.dump({{"domid": link.domid, "grefs": grefs}}, f)
os.rename("/tmp/maptrack-grefs.tmp", "/tmp/maptrack-grefs")
while not os.path.exists("/tmp/maptrack-stop"):
    time.sleep(0.2)
"""

# Maps GREFS of DOMID (raw batches: a backend keeps no mmap per page here),
# reports, holds them until /tmp/maptrack-stop.
MAP_IN_DOM0 = """
import json, os, time
from xenbed.drivers.xen import HypervisorLink
from xenbed.drivers.xen.gnttab import _gnttab_call
from xenbed.protocols import gntbatch as gb, hypercall as hc
from xenbed.protocols.gntst import gntst_name
link = HypervisorLink.open(reader="inline")
statuses = []
for i in range(0, len(GREFS), gb.MAX_MAP_BATCH):
    body, fds = _gnttab_call(link, hc.Call.GNTTAB_MAP_BATCH,
                             gb.encode_map([(DOMID, g, False) for g in GREFS[i:i + gb.MAX_MAP_BATCH]]), with_fds=True)
    hc.close_fds(fds)
    statuses += [gntst_name(r[0]) for r in gb.decode_map_results(body)]
with open("/tmp/maptrack-mapped", "w") as f:
    json.dump({"okay": statuses.count("GNTST_okay"), "other": sorted(set(statuses) - {"GNTST_okay"})}, f)
while not os.path.exists("/tmp/maptrack-stop"):
    time.sleep(0.2)
"""

# The attacker grants pages to itself and maps each 127 times read-only and 127
# times writable (Xen refuses a pin once a count reaches 128) until a map is refused; reports the count.
FILL_OWN_MAPTRACK = """
import json, time
from xenbed.drivers.xen import GrantTable, GuestMemory, HypervisorLink
from xenbed.drivers.xen.gnttab import _gnttab_call
from xenbed.protocols import gntbatch as gb, hypercall as hc
from xenbed.protocols.gntst import gntst_name
link = HypervisorLink.open(reader="inline")
me, grants, mem = link.domid, GrantTable(link), GuestMemory(link)
mapped, refused, started = 0, None, time.monotonic()
while refused is None:
    page = mem.alloc(1)[0]
    gref = grants.grant(me, page)
    ops = [(me, gref, ro) for ro in (True, False) for _ in range(127)]
    for i in range(0, len(ops), gb.MAX_MAP_BATCH):
        body, fds = _gnttab_call(link, hc.Call.GNTTAB_MAP_BATCH, gb.encode_map(ops[i:i + gb.MAX_MAP_BATCH]),
                                 with_fds=True)
        hc.close_fds(fds)
        for status, _, _ in gb.decode_map_results(body):
            if status == 0:
                mapped += 1
            elif refused is None:
                refused = gntst_name(status)
print(json.dumps({"mapped": mapped, "refused": refused, "seconds": round(time.monotonic() - started, 1)}))
"""


def victims_disk_works(testbed, tag: str) -> bool:
    """domu1 writes 1 MiB through blkfront (and puts back what was there);
    dom0's blkback, which maps domu1's grants, must have put it in the image."""
    disk, at = "/run/xen/vbd/xvda", "bs=1M seek=3 conv=fsync,notrunc status=none"
    sh(testbed, VICTIM, f"dd if={disk} of=/tmp/{tag}.old bs=1M skip=3 count=1 status=none && "
                        f"head -c 1048576 /dev/urandom > /tmp/{tag} && dd if=/tmp/{tag} of={disk} {at}")
    try:
        written = sh(testbed, VICTIM, f"sha256sum < /tmp/{tag}").split()[0]
        image = sh(testbed, "dom0", f"xenstore-read /local/domain/0/backend/vbd/$(xl domid {VICTIM})/51712/params")
        return written == sh(testbed, "dom0", f"dd if={image.strip()} bs=1M skip=3 count=1 status=none | sha256sum").split()[0]
    finally:
        sh(testbed, VICTIM, f"dd if=/tmp/{tag}.old of={disk} {at}; rm -f /tmp/{tag} /tmp/{tag}.old")


def in_background(testbed, service: str, script: str) -> None:
    testbed.exec(service, ["sh", "-c", 'python3 -c "$SCRIPT" > /tmp/maptrack-log 2>&1 &'], environment={"SCRIPT": script})


def everyone_answers(testbed) -> None:
    assert VICTIM in sh(testbed, "dom0", "xl list")  # dom0's toolstack and the hypervisor
    assert sh(testbed, VICTIM, "xenstore-read domid").strip().isdigit()  # xenstored, for the other guest


def test_dom0_holding_1100_mappings_of_one_guests_grants_still_serves_the_other(testbed):
    for service in (ATTACKER, "dom0"):
        sh(testbed, service, "rm -f /tmp/maptrack-*")
    try:
        in_background(testbed, ATTACKER, GRANT_TO_DOM0)
        grefs = wait_for(lambda: sh(testbed, ATTACKER, "cat /tmp/maptrack-grefs 2>/dev/null", check=False).strip(),
                         what="the attacker's grants", timeout=60)
        script = f"import json\nd = json.loads({grefs!r})\nDOMID, GREFS = d['domid'], d['grefs']\n" + MAP_IN_DOM0
        in_background(testbed, "dom0", script)
        mapped = wait_for(lambda: sh(testbed, "dom0", "cat /tmp/maptrack-mapped 2>/dev/null", check=False).strip(),
                          what="dom0's mappings", timeout=60)
        assert mapped == '{"okay": 1100, "other": []}', sh(testbed, "dom0", "cat /tmp/maptrack-log")
        assert victims_disk_works(testbed, "while-dom0-holds-1100")
        everyone_answers(testbed)
    finally:
        for service in (ATTACKER, "dom0"):
            sh(testbed, service, "touch /tmp/maptrack-stop", check=False)


def test_a_guest_fills_only_its_own_maptrack_and_gets_no_device_space(testbed):
    out = python_in(testbed, ATTACKER, FILL_OWN_MAPTRACK, timeout=600)
    assert out["refused"] == "GNTST_no_device_space", out
    assert out["mapped"] == 1024 * 512, out  # Xen 4.17: max_maptrack_frames=1024 of 512
    assert victims_disk_works(testbed, "after-a-guest-filled-its-maptrack")
    everyone_answers(testbed)
