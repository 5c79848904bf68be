"""Runs inside a domain container (sent by harness/bench.py as `python3
-c`): a domain that floods its own event channels for `seconds`, while
another pair of domains measures its notify round trip.

    guest_evtchn_flood.py <stop file> <most seconds>

It binds a channel to itself (alloc_unbound(self), bind_interdomain(self,
port)) and sends on it as fast as it can, never clearing: on Xen such a
guest burns its own vcpu and nobody else's.  Prints one JSON object: how
many sends it made.  It stops when the stop file appears (or after the
most seconds).
"""

import json
import os
import sys
import time

from xenbed.drivers.xen import EventChannels, HypervisorLink


def main():
    stop_file, most = sys.argv[1], float(sys.argv[2])
    link = HypervisorLink.open()
    evtchn = EventChannels(link)
    port = evtchn.alloc_unbound(link.domid)
    mine = evtchn.bind_interdomain(link.domid, port)
    sends = 0
    started = time.monotonic()
    while time.monotonic() - started < most and not os.path.exists(stop_file):
        for _ in range(200):
            evtchn.notify(port)
            evtchn.notify(mine)
        sends += 400
    seconds = time.monotonic() - started
    evtchn.close(mine)
    evtchn.close(port)
    print(json.dumps({"sends": sends, "seconds": seconds}))


if __name__ == "__main__":
    main()
