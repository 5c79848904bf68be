"""Run in dom0 by `xenbed bench --suite suspend`: suspend a guest and resume
it, ROUNDS times on new backends and ROUNDS times cancelled, with
toolstack/suspend.py (what `xl suspend` / `xl resume` run).  Prints one JSON
line: per round, the milliseconds from the suspend request to the guest
running again with every device Connected at both ends (resume_ms), and
the suspend's own share (suspend_ms).  argv: guest name, rounds."""

import json
import sys
import time

from xenbed.toolstack import suspend
from xenbed.toolstack.xl import Toolstack

name, rounds = sys.argv[1], int(sys.argv[2])
xl = Toolstack()
domid = xl.resolve(name)["domid"]
out = {"resume_ms": [], "suspend_ms": [], "cancelled_ms": [], "devices": 0, "phases": []}
for cancel in (False, True):
    for _ in range(rounds):
        started = time.monotonic()
        suspended = suspend.suspend(xl.store, xl.link, domid)
        done = suspend.resume(xl.store, xl.link, domid, cancel=cancel)
        total = (time.monotonic() - started) * 1000
        out["cancelled_ms" if cancel else "resume_ms"].append(total)
        if not cancel:
            out["suspend_ms"].append(suspended * 1000)
            out["devices"] = len(done["devices"])
            out["phases"].append(done["phases"])
        time.sleep(0.5)
xl.close()
print(json.dumps(out))
