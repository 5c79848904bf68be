"""netback: the PV network backend, serving a guest's netfront through a tap.

How it is started (in dom0, or a driver domain, long-lived):

    python3 -m xenbed.drivers.net.back [--domid N] [--run-hotplug]
                                       [--bridge xenbr0] [--uplink auto|eth0|none|skip]

At start it brings dom0's bridge up (drivers/net/bridge.py: xenbr0 takes
eth0's addresses and default route; idempotent; `--uplink skip` or
XENBED_BRIDGE_SETUP=0 leaves the network alone).  Environment as blkback's.

`Netback` is a `XenbusDriver` for type "vif" on a `BackendBus`, following
Linux's xen-netback/xenbus.c:

* probe: read `handle`; create the tap `vif<domid>.<handle>` (or
  `vifname`, IFF_VNET_HDR | IFF_MULTI_QUEUE) with MAC fe:ff:ff:ff:ff:ff,
  holding its fd;
  write the features (feature-sg, feature-rx-copy,
  feature-split-event-channels, feature-ipv6-csum-offload,
  feature-gso-tcpv4/6 = 1 -- GSO only on a vnet-header tap;
  multi-queue-max-queues = CPUs;
  feature-rx-flip, feature-multicast-control = 0); InitWait; watch
  `hotplug-status`, `rate` and our own `state`.
* frontend Connected (or Initialised): read `tx-ring-ref`, `rx-ring-ref`,
  `event-channel` or `event-channel-tx` + `event-channel-rx`,
  `request-rx-copy` (must be 1: else dev_fatal EOPNOTSUPP, as Linux),
  `feature-rx-notify`, `feature-sg`, `feature-no-csum-offload`,
  `feature-ipv6-csum-offload`, `feature-gso-tcpv4/6`,
  `multi-queue-num-queues` (up to our `multi-queue-max-queues`: the vif is
  a multi-queue tap with one queue per CPU; each queue's rings and ports
  under `queue-<i>/`, served by a queue descriptor and threads of its own);
  set the vif's offloads from them
  (TUNSETOFFLOAD: checksum unless feature-no-csum-offload, TSO only with
  feature-sg), hold its MTU at 1500 for a frontend without feature-sg
  (Linux: no multi-slot frames for it, and `mtu` above 1500 refused);
  map both rings, bind the port(s), start the vif thread; switch to
  Connected only once `hotplug-status` is "connected" (libxl: the backend
  waits for its hotplug script).
* frontend Closing: drain (the request in hand finishes), unmap, unbind,
  Closing; Closed: Closed, and with `online=0` (toolstack unplug) the tap
  is removed; Initialising after Closed: InitWait again (reconnect).
* recover (a restarted netback, or a restarted dom0, finds the device in
  the store in a state an earlier netback left; drivers/xenbus/probe.py):
  the old vif went with the old process (a tap lives as long as its fd)
  and, when dom0's container was restarted, with the old network namespace
  (xenbr0 and the uplink are set up again by `main` before the bus
  starts).  So the stale `hotplug-status` is removed, the vif created again
  and the hotplug step (bridge membership, MTU, up, `hotplug-status`) run
  here -- the toolstack that ran it is gone too.  A device left Connected
  (or Initialised) goes Closed, which netfront reads as "the backend lost
  the connection": it keeps its tap `eth0` (and the guest's addresses on
  it), frees its old rings, grants and ports, resets to Initialising and
  reconnects on new rings once we are in InitWait, then sends a gratuitous
  ARP.  Until the frontend shows that it reset (Closing, Closed,
  Initialising) its stale Initialised/Connected is ignored: those rings
  were the old process's.  A device left in InitWait stays there and
  connects as at boot.
* reconfiguration while Connected (seed 000: device-specific watches, both
  ends stay Connected): `rate` ("bytes,usecs", libxl's) is a TX credit
  scheduler, re-read on every change (Linux xen_net_rate_changed: the new
  credit applies at once, the current window's credit is clipped to it);
  `mtu` is applied to the vif on every change (libxl's vif-bridge applies
  it only at hotplug; live changes are a xenbed extension, written by
  `xl network-set`, which also writes the frontend's `mtu` node that
  netfront watches -- see drivers/net/front.py).  A bridge's MTU is the
  smallest of its ports' unless set explicitly, so lowering a vif's MTU
  lowers xenbr0's too, as on a real Xen host.

The rooms, as Linux's xen-netback: this file is the XenBus side (xenbus.c)
and the daemon; drivers/net/netback.py the TX data path (netback.c),
drivers/net/rx.py the RX one (rx.c), drivers/net/interface.py one connected
vif (interface.c); drivers/xenbus/backend.py what every backend does the
same way.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from xenbed.drivers.xenbus import XenbusDevice, XenbusState
from xenbed.drivers.xenbus.backend import BackendDriver, BackendInfo
from xenbed.drivers.xenbus.nodes import BadNode, read_uint

from . import hotplug, tap
from .interface import NetbackConnection, parse_frontend_config

log = logging.getLogger("xenbed.netback")

S = XenbusState
SINGLE_SLOT_MTU = 1500  # ETH_DATA_LEN: the most a frontend without feature-sg is given
VIF_MAC = "fe:ff:ff:ff:ff:ff"  # Linux netback's vif address, so the bridge never takes the guest's

FEATURES = {
    "feature-sg": "1",
    "feature-gso-tcpv4": "1",
    "feature-gso-tcpv6": "1",
    "feature-ipv6-csum-offload": "1",
    "feature-rx-copy": "1",
    "feature-rx-flip": "0",
    "feature-multicast-control": "0",
    "feature-dynamic-multicast-control": "0",
    "feature-split-event-channels": "1",
}

# A restarted netback may run while the kernel is still unregistering the tap
# the killed one held (its fd closed at exit): EBUSY until that finished.
TAP_RELEASE_WAIT = 5.0


def parse_rate(text: str | None) -> tuple[int, int] | None:
    """The backend's `rate` ("<bytes_per_interval>,<interval_usecs>", as libxl
    writes it) or None (unlimited; also for anything unreadable, as Linux)."""
    if not text:
        return None
    parts = text.strip().split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return None
    b, us = int(parts[0]), int(parts[1])
    return (b, us) if b > 0 and us > 0 else None


def vif_features(vnet_hdr: bool, max_queues: int = 1) -> dict[str, str]:
    """What we advertise: GSO only when the vif hands offloads through (a
    vnet-header tap: the kernel segments what the frontend sends whole);
    as many queues as the tap has (one per CPU on a multi-queue tap)."""
    gso = "1" if vnet_hdr else "0"
    return {**FEATURES, "feature-gso-tcpv4": gso, "feature-gso-tcpv6": gso, "multi-queue-max-queues": str(max_queues)}


def _tap_features(tap) -> dict[str, str]:
    return vif_features(getattr(tap, "vnet_hdr", False), getattr(tap, "max_queues", 1))


def default_open_tap(name: str):
    t = tap.open_tap(name, vnet_hdr=True, multi_queue=True)
    try:
        tap.set_link(t.name, mac=VIF_MAC)
    except OSError as exc:
        log.warning("%s: setting the vif MAC: %s", t.name, exc)
    return t


def default_set_vif_mtu(name: str, mtu: int) -> None:
    tap.set_link(name, mtu=mtu)


def _open_tap_when_free(open_tap: Callable[[str], object], name: str):
    deadline = time.monotonic() + TAP_RELEASE_WAIT
    while True:
        try:
            return open_tap(name)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(eq=False)
class NetbackInfo(BackendInfo):
    """netback's private data for one device (Linux's struct backend_info)."""

    handle: int = 0
    tap: object | None = None  # .fd, .name, .close()
    mtu: int | None = None  # as last applied to the vif by the `mtu` watch


class Netback(BackendDriver):
    """The vif backend driver for a `BackendBus` (Linux's xen-netback/xenbus.c).

    `open_tap(name)` returns the tap (anything with .fd, .name, .close()):
    tests pass a socketpair; `memory` has GuestMemory's alloc/free.
    `hotplug_add(store, backend)` / `hotplug_remove(store, backend, name)`
    are the vif hotplug step (drivers/net/hotplug.py) and `set_vif_mtu(name,
    mtu)` changes the vif's MTU (`ip link`); tests without real links pass
    their own."""

    devicetype = "vif"
    name = "netback"
    info_class = NetbackInfo
    # The hotplug step's `hotplug-status`; our own `state` (the toolstack
    # writes Closing to unplug); `rate` and `mtu` (live reconfiguration).
    own_watches = (("hotplug-status", "hotplug_status_changed"), ("state", "own_state_changed"),
                   ("rate", "rate_changed"), ("mtu", "mtu_changed"))

    def __init__(self, grants, evtchn, memory, *, run_hotplug: bool = False,
                 open_tap: Callable[[str], object] = default_open_tap,
                 hotplug_add: Callable | None = None, hotplug_remove: Callable | None = None,
                 set_vif_mtu: Callable[[str, int], None] = default_set_vif_mtu) -> None:
        super().__init__(run_hotplug=run_hotplug)
        self.grants, self.evtchn, self.memory = grants, evtchn, memory
        self.open_tap = open_tap
        self.hotplug_add = hotplug_add or hotplug.add
        self.hotplug_remove = hotplug_remove or hotplug.remove
        self.set_vif_mtu = set_vif_mtu

    # -- BackendDriver -------------------------------------------------------------------
    def setup(self, dev: XenbusDevice) -> bool:
        name = self._vif_name(dev)
        if name is None:
            return False
        if not self._create_vif(dev, name, self.open_tap, "created"):
            return False
        self.write_features(dev, _tap_features(dev.priv.tap))
        return True

    def recover_device(self, dev: XenbusDevice, stale: XenbusState) -> bool:
        name = self._vif_name(dev)
        if name is None:
            return False
        # `hotplug-status` says "connected" about a vif that is gone: we
        # must not go Connected on it before the step ran again.
        try:
            self.hotplug_remove(dev.store, dev.nodename, name)
        except Exception as exc:
            log.warning("%s: clearing the old hotplug keys: %s", dev.nodename, exc)
        if not self._create_vif(dev, name, lambda n: _open_tap_when_free(self.open_tap, n), "recreated"):
            return False
        self.write_features(dev, _tap_features(dev.priv.tap))
        self.lost_connection(dev, stale)
        self.hotplug("add", dev)
        return True

    def connect(self, dev: XenbusDevice) -> None:
        be: NetbackInfo = dev.priv
        if be.connection is not None or dev.state != S.InitWait:
            return
        if be.tap is None:
            dev.dev_fatal(errno.ENODEV, "no vif to connect")
            return
        try:
            config = parse_frontend_config(dev.otherend_read, getattr(be.tap, "max_queues", 1))
            vnet = getattr(be.tap, "vnet_hdr", False)
            nqueues = len(config.all_queues())
            more = be.tap.open_queues(nqueues) if nqueues > 1 else []
            be.connection = NetbackConnection(dev.nodename, self.grants, self.evtchn, self.memory,
                                              dev.otherend_id, config, [be.tap.fd, *more],
                                              parse_rate(dev.read("rate")),
                                              lambda err, msg: self.fatal_from_ring(dev, err, msg), vnet, more)
        except BadNode as exc:
            dev.dev_fatal(exc.err, str(exc))
            return
        except Exception as exc:
            log.exception("%s: connect failed", dev.nodename)
            dev.dev_fatal(exc, f"mapping shared-frames {dev.otherend}: {exc}")
            return
        if vnet:
            be.tap.set_offload(**config.rx_features().tap_offload())
        if not config.sg:
            self._hold_mtu(dev)
        be.connection.start()
        log.info("%s: rings mapped (tx %d, rx %d, ports %s%s)", dev.nodename, config.tx_ring_ref,
                 config.rx_ring_ref, be.connection.ports, ", split" if config.split else "")
        if dev.read("hotplug-status") == "connected":
            dev.switch_state(S.Connected)
        else:
            log.info("%s: waiting for the hotplug script", dev.nodename)

    def _hold_mtu(self, dev: XenbusDevice) -> None:
        """A frontend without feature-sg takes single-slot frames only: the
        vif's MTU is held at 1500 (Linux: xenvif_connect / change_mtu)."""
        be: NetbackInfo = dev.priv
        if be.mtu is not None and be.mtu <= SINGLE_SLOT_MTU:
            return
        try:
            self.set_vif_mtu(be.tap.name, SINGLE_SLOT_MTU)
            be.mtu = SINGLE_SLOT_MTU
            log.info("%s: frontend without feature-sg: %s mtu held at %d", dev.nodename, be.tap.name,
                     SINGLE_SLOT_MTU)
        except OSError as exc:
            log.warning("%s: holding the MTU of %s: %s", dev.nodename, be.tap.name, exc)

    def close_resource(self, dev: XenbusDevice) -> None:
        be: NetbackInfo = dev.priv
        tap, be.tap = be.tap, None
        if tap is not None:
            tap.close()
            log.info("%s: removed %s", dev.nodename, tap.name)

    def release(self, dev: XenbusDevice) -> None:
        if self.run_hotplug and dev.priv.hotplug_ran:
            self.hotplug("remove", dev)  # needs the vif's name: before the tap goes
        self.close_resource(dev)

    def hotplug_step(self, action: str, dev: XenbusDevice) -> None:
        if action == "add":
            self.hotplug_add(dev.store, dev.nodename)
        else:
            self.hotplug_remove(dev.store, dev.nodename, dev.priv.tap.name if dev.priv.tap else None)

    def _vif_name(self, dev: XenbusDevice) -> str | None:
        be: NetbackInfo = dev.priv
        try:
            be.handle = read_uint(dev.read("handle"), "handle")
        except BadNode as exc:
            dev.dev_fatal(exc.err, str(exc))
            return None
        return hotplug.vif_name(dev.otherend_id, be.handle, dev.read("vifname"))

    def _create_vif(self, dev: XenbusDevice, name: str, open_tap: Callable[[str], object], verb: str) -> bool:
        try:
            dev.priv.tap = open_tap(name)
        except (OSError, ValueError) as exc:
            dev.dev_fatal(exc, f"creating {name}: {exc}")
            return False
        log.info("%s: %s %s", dev.nodename, verb, dev.priv.tap.name)
        return True

    # -- watches -----------------------------------------------------------------------
    def hotplug_status_changed(self, dev: XenbusDevice) -> None:
        be: NetbackInfo = dev.priv
        with be.lock:
            if dev.removed:
                return
            status = dev.read("hotplug-status")
            if status == "connected":
                if be.connection is not None and dev.state == S.InitWait:
                    dev.switch_state(S.Connected)
            elif status == "error":
                log.error("%s: hotplug failed: %s", dev.nodename, dev.read("hotplug-error"))

    def rate_changed(self, dev: XenbusDevice) -> None:
        be: NetbackInfo = dev.priv
        with be.lock:
            if not dev.removed and be.connection is not None:
                rate = parse_rate(dev.read("rate"))
                be.connection.set_rate(rate)
                log.info("%s: rate now %s", dev.nodename, rate or "unlimited")

    def mtu_changed(self, dev: XenbusDevice) -> None:
        """Apply `mtu` to the vif whenever it changes (and once at probe, when
        the hotplug step may not have run yet: applying it twice is harmless).
        An unreadable value is logged and ignored, the vif keeps its MTU."""
        be: NetbackInfo = dev.priv
        with be.lock:
            if dev.removed or be.tap is None:
                return
            text = dev.read("mtu")
            if text is None:
                return
            try:
                mtu = int(text)
                if not 68 <= mtu <= 65535:
                    raise ValueError(f"{mtu} is outside 68..65535")
            except ValueError as exc:
                log.warning("%s: ignoring mtu %r: %s", dev.nodename, text, exc)
                return
            conn = be.connection
            if conn is not None and not conn.config.sg and mtu > SINGLE_SLOT_MTU:
                log.warning("%s: mtu %d refused: the frontend has no feature-sg (max %d)", dev.nodename, mtu,
                            SINGLE_SLOT_MTU)
                mtu = SINGLE_SLOT_MTU
            if be.mtu == mtu:
                return
            try:
                self.set_vif_mtu(be.tap.name, mtu)
            except OSError as exc:
                log.warning("%s: setting the MTU of %s to %d: %s", dev.nodename, be.tap.name, mtu, exc)
                return
            be.mtu = mtu
            log.info("%s: %s mtu now %d", dev.nodename, be.tap.name, mtu)

    # -- daemon --------------------------------------------------------------------------
    def tap_of(self, nodename: str):
        be = self.info(nodename)
        return be.tap if be is not None else None


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.net.back", description=__doc__.split("\n")[0])
    parser.add_argument("--domid", type=int, default=None)
    parser.add_argument("--run-hotplug", action="store_true",
                        help="run the vif hotplug step on probe/remove (default: the toolstack runs it)")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"))
    parser.add_argument("--bridge", default=os.environ.get("XENBED_BRIDGE", "xenbr0"))
    parser.add_argument("--uplink", default=os.environ.get("XENBED_UPLINK", "auto"),
                        help="interface the bridge enslaves: auto (the default route's), a name, none, "
                             "or skip (do not touch the network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s netback %(levelname)s %(message)s")
    from xenbed.drivers.xen.evtchn import EventChannels
    from xenbed.drivers.xen.gnttab import GrantTable
    from xenbed.drivers.xen.memory import GuestMemory
    from xenbed.drivers.xenbus.daemon import run_backend

    if args.uplink != "skip" and os.environ.get("XENBED_BRIDGE_SETUP", "1") != "0":
        from . import bridge
        try:
            bridge.setup(args.bridge, args.uplink)
        except Exception as exc:  # vifs will fail their hotplug step, with this reason in the log
            log.error("setting up bridge %s: %s", args.bridge, exc)

    return run_backend("netback", lambda link: Netback(GrantTable(link), EventChannels(link), GuestMemory(link),
                                                      run_hotplug=args.run_hotplug),
                       transitions=args.transitions, domid=args.domid)


if __name__ == "__main__":
    sys.exit(main())
