"""netfront: the network frontend of a guest (Linux's drivers/net/xen-netfront.c).

`python3 -m xenbed.drivers.net.front` runs in every guest, started by its
kernel: it probes the guest's `device/vif/<devid>` directories through the
XenBus (`FrontendBus`) and connects each vif to its backend over a pair of
netif rings (tx and rx).  The guest side of each vif is a tap interface
(tap.py): `eth0`, `eth1`, ... in probe (devid) order, carrying the MAC
the toolstack wrote in the frontend's `mac` node.  A frame the guest's stack
sends out of eth0 goes on the tx ring; a frame the backend puts on the rx
ring is written into eth0.  The guest container has no other network.

Connection (seed 000, "netfront can skip immediately to Connected")
-------------------------------------------------------------------
probe (Initialising): read `mac`, create the tap (down, carrier off), and
wait.  Backend InitWait (Linux: talk_to_netback from netback_changed):
read the backend's features (`feature-rx-copy` must be 1, else dev_fatal;
`feature-split-event-channels`, `feature-sg`), allocate the tx and rx ring
pages, SHARED_RING_INIT them, grant them, allocate one event channel (or a
tx/rx pair when the backend offers split channels), and write in ONE
transaction `tx-ring-ref`, `rx-ring-ref`, `event-channel` (or
`event-channel-tx`/`event-channel-rx`), `request-rx-copy` 1,
`feature-rx-notify` 1, `feature-sg` 1 and, when eth0 is a vnet-header
tap, `feature-gso-tcpv4`/`feature-gso-tcpv6`/`feature-ipv6-csum-offload` 1
(else `feature-no-csum-offload` 1); set eth0's offloads (TUNSETOFFLOAD:
checksum always, TSO where the backend has feature-sg and its
feature-gso-tcp*, as Linux's xennet_fix_features); post rx buffers;
switch straight to Connected.  Backend Connected: MTU from the
backend's `mtu` (default 1500), tap up, carrier on, gratuitous ARP for each
IPv4 address on the tap (netdev_notify_peers), transmit enabled.

MTU, and changing it live
-------------------------
netif.h ("MTU") puts the toolstack's MTU for the frontend in the
frontend's own area, `device/vif/<devid>/mtu`; libxl (Xen >= 4.14) writes
it there and in the backend dir, where vif-bridge applies it to the vif.
Linux netfront ignores it (its MTU is whatever the guest sets); Windows PV
drivers and MirageOS read it at connect.  We read it when the backend is
Connected (`vif_mtu`: our node, else the backend's, else 1500) AND watch
our node while connected: a change is applied to the tap at once, with no
XenBus transition (seed 000, "Device reconfiguration ... device-specific
watches ... each driver stays in the Connected state").  Why the frontend
node and a watch, rather than a state change: the MTU is a property of the
link that needs no new rings (the ring carries frames of any size up to
64 KiB), so nothing has to be renegotiated; the frontend node is where the
protocol says the frontend looks; and a watch is how Xen reconfigures a
connected device (netback's `rate` is the precedent).  netback watches the
backend's `mtu` likewise and applies it to the vif, so both ends of the
"cable" agree; `xl network-set` (a xenbed extension) writes both nodes in
one transaction.  Lowering the MTU does not drop frames already queued.

Recovery after a backend restart
--------------------------------
A backend that goes straight to Closed while we are Connected (no Closing
first, which is how the toolstack asks for an unplug) lost the connection:
netback or all of dom0 was restarted and recovered the device
(drivers/net/back.py, recover).  `_backend_lost` keeps the tap -- eth0
keeps its ifindex, MAC and addresses -- drops what was in flight (this is
Ethernet), frees the old rings, grants and ports, and goes Closed ->
Initialising (Linux's xenbus_reset_frontend); the backend's InitWait then
starts new rings as at boot, and its Connected brings the carrier back
with a gratuitous ARP.  `leaked_grants` in the status file counts grants
that could not be ended because the other end still mapped them (0 when
the dead backend's mappings went with it, as they must).

Closedown: backend Closing (or Closed): Closing, carrier off, no new
transmits, the tx requests in flight drained (their responses awaited, at
most `drain_timeout`), Closed; grants are ended when the backend is Closed
too (it has unmapped by then).  The tap stays; `remove` (the toolstack
deleted the device dir) deletes it.  Migration (`resume`): the old rings
are forgotten (tx requests in flight are counted as dropped, as Linux's
xennet_release_tx_bufs does), carrier off, and the connection is made
afresh when the new backend reaches InitWait; the tap stays open throughout.

The data path is front_engine.py (`NetfrontEngine`), the Ethernet helpers
ether.py; what all frontends share is drivers/xenbus/frontend.py.

Counters (tx/rx packets, bytes, errors, drops) and the connection's details
are in `/run/xen/vif/<devid>.json`, rewritten every second and on every
state change.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from xenbed.drivers.xenbus import XenbusDevice, XenbusFatal, XenbusState
from xenbed.drivers.xenbus.frontend import FrontendDevice, GrantedPage, RingResources, XenbusFrontend, quietly
from xenbed.drivers.xenbus.nodes import feature_flag, read_int
from xenbed.protocols.netif import RX_RING_ENTRY_SIZE, TX_RING_ENTRY_SIZE, XEN_NETIF_NR_SLOTS_MIN
from xenbed.protocols.ring import FrontRing, MalformedMessage, RingError, SharedRing
from xenbed.protocols.vnet import BadOffload, Offload

from .ether import format_mac, gratuitous_arp, parse_mac
from .front_engine import NetfrontEngine, tx_offload

if TYPE_CHECKING:
    from xenbed.drivers.xenbus.daemon import GuestXen

log = logging.getLogger("xenbed.netfront")

DEFAULT_STATUS_DIR = "/run/xen/vif"
DEFAULT_MTU = 1500


@dataclass(frozen=True)
class BackendFeatures:
    """What the backend advertises by InitWait (xenstore keys in comments)."""

    rx_copy: bool = False  # feature-rx-copy
    split_event_channels: bool = False  # feature-split-event-channels
    sg: bool = False  # feature-sg
    rx_flip: bool = False  # feature-rx-flip (obsolete; never used)
    max_queues: int = 1  # multi-queue-max-queues (we use one queue)
    gso_tcpv4: bool = False  # feature-gso-tcpv4
    gso_tcpv6: bool = False  # feature-gso-tcpv6
    ipv6_csum: bool = False  # feature-ipv6-csum-offload

    @classmethod
    def parse(cls, read: Callable[[str], str | None]) -> BackendFeatures:
        flags = {key: feature_flag(read(f"feature-{key.replace('_', '-')}"))
                 for key in ("rx_copy", "split_event_channels", "sg", "rx_flip", "gso_tcpv4", "gso_tcpv6")}
        return cls(**flags, ipv6_csum=feature_flag(read("feature-ipv6-csum-offload")),
                   max_queues=max(1, read_int(read("multi-queue-max-queues"), 1)))

    def tap_offload(self) -> dict[str, bool]:
        """eth0's TUNSETOFFLOAD: what the guest's stack may hand us unfinished."""
        return {"csum": True, "tso4": self.sg and self.gso_tcpv4,
                "tso6": self.sg and self.gso_tcpv6 and self.ipv6_csum}


def backend_mtu(read: Callable[[str], str | None], default: int = DEFAULT_MTU) -> int:
    """The backend's `mtu` node when present and sane (68..65535), else `default`."""
    mtu = read_int(read("mtu"), 0)
    return mtu if 68 <= mtu <= 65535 else default


def vif_mtu(read_own: Callable[[str], str | None], read_backend: Callable[[str], str | None],
            default: int = DEFAULT_MTU) -> int:
    """The MTU the toolstack gives this vif: our own `mtu` node (netif.h,
    "MTU": the frontend area), else the backend's (a toolstack that writes
    only that one), else `default` (1500)."""
    return backend_mtu(read_own, backend_mtu(read_backend, default))


def frontend_keys(tx_ref: int, rx_ref: int, ports: Sequence[int], sg: bool = True,
                  offloads: bool = False) -> dict[str, str]:
    """The nodes netfront writes in its one transaction (talk_to_netback)."""
    keys = {"tx-ring-ref": str(tx_ref), "rx-ring-ref": str(rx_ref)}
    if len(ports) == 1:
        keys["event-channel"] = str(ports[0])
    elif len(ports) == 2:
        keys["event-channel-tx"], keys["event-channel-rx"] = str(ports[0]), str(ports[1])
    else:
        raise ValueError(f"one or two event channels, not {len(ports)}")
    keys["request-rx-copy"] = "1"
    keys["feature-rx-notify"] = "1"
    if sg:
        keys["feature-sg"] = "1"
    if offloads:
        keys.update({"feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1", "feature-ipv6-csum-offload": "1"})
    else:
        keys["feature-no-csum-offload"] = "1"
    return keys


def lowest_free_index(used: Iterable[int]) -> int:
    used = set(used)
    n = 0
    while n in used:
        n += 1
    return n



class VifRings(RingResources):
    """One connection's rings: the tx and rx ring pages, their grants, the
    port(s) ([shared] or [tx, rx]), one granted page per ring slot."""

    def __init__(self) -> None:
        super().__init__()
        self.tx_ring: FrontRing | None = None
        self.rx_ring: FrontRing | None = None
        self.tx_ref: int | None = None
        self.rx_ref: int | None = None
        self.features: BackendFeatures | None = None

    @property
    def split(self) -> bool:
        return len(self.ports) == 2


class Vif(FrontendDevice):
    """netfront_info: one virtual interface of this guest; `name` is its
    tap's (eth0, ...)."""

    conn: VifRings | None

    def __init__(self, dev: XenbusDevice, devid: int, mac: bytes, ifname: str, index: int) -> None:
        super().__init__(dev, ifname, NetfrontEngine(ifname, self._deliver))
        self.devid = devid
        self.mac = mac
        self.index = index
        self.tap = None
        self.mtu = DEFAULT_MTU
        self.carrier = False
        self.stop = threading.Event()
        self.reader: threading.Thread | None = None
        self.connects = 0
        self.resets = 0  # connections lost to a backend restart
        self.mtu_changes = 0  # applied while connected (the `mtu` watch)
        self.mtu_watch: tuple[str, str] | None = None
        self.rewatch_mtu = False  # set by a live migration's relocation, done by resume
        self.garps = 0

    def _deliver(self, frame: bytes, offload: Offload | None = None) -> bool:
        tap = self.tap
        if tap is None:
            return False
        if offload is None:
            return tap.write(frame)
        try:
            if offload.csum_blank or offload.gso:
                frame = bytearray(frame)  # its checksum field gets the pseudo-header sum
            return tap.write(offload.to_vnet(frame).encode(), frame)
        except BadOffload:
            return False

    def status(self) -> dict:
        conn = self.conn
        return {
            "devid": self.devid,
            "ifname": self.name,
            "mac": format_mac(self.mac),
            "mtu": self.mtu,
            "nodename": self.dev.nodename,
            "backend": self.dev.otherend,
            "backend_id": self.dev.otherend_id,
            "state": XenbusState(self.dev.state).name,
            "engine": self.engine.state,
            "carrier": self.carrier,
            "connects": self.connects,
            "resets": self.resets,
            "mtu_changes": self.mtu_changes,
            "leaked_grants": self.leaked_grants,
            "gratuitous_arps": self.garps,
            "split_event_channels": bool(conn and conn.split),
            "tx_ring_ref": conn.tx_ref if conn else None,
            "rx_ring_ref": conn.rx_ref if conn else None,
            "event_channels": list(conn.ports) if conn else [],
            "tx_inflight": self.engine.inflight(),
            **asdict(self.engine.counters),
            "time": time.time(),
        }


def _open_tap(name: str):
    from . import tap

    return tap.open_tap(name, nonblocking=False, vnet_hdr=True)


class NetFront(XenbusFrontend):
    """The vif frontend driver.  `tap_factory(name)` opens the tap (tests
    pass a fake); `status_dir` gets one JSON file per vif (None: none)."""

    devicetype = "vif"
    report_key = "interfaces"

    def __init__(self, xen: GuestXen, *, tap_factory: Callable[[str], object] = _open_tap,
                 status_dir: str | None = DEFAULT_STATUS_DIR, drain_timeout: float = 5.0,
                 split_event_channels: bool = True) -> None:
        super().__init__(xen)
        self.tap_factory = tap_factory
        self.status_dir = status_dir
        self.drain_timeout = drain_timeout
        self.want_split = split_event_channels

    # -- XenbusDriver ------------------------------------------------------------------
    def probe(self, dev) -> None:
        """Read the MAC, create the tap (down, carrier off); the rings wait for
        the backend's InitWait."""
        try:
            devid = int(dev.nodename.rsplit("/", 1)[1])
            mac = parse_mac(dev.read("mac"))
        except ValueError as exc:
            dev.dev_fatal(errno.EINVAL, f"reading mac: {exc}")
            raise XenbusFatal(str(exc)) from exc
        with self._lock:
            index = lowest_free_index(v.index for v in self.devices.values())
            vif = Vif(dev, devid, mac, f"eth{index}", index)
            self.devices[dev.nodename] = vif
        try:
            vif.tap = self.tap_factory(vif.name)
            vif.name = getattr(vif.tap, "name", vif.name)
            vif.tap.set_carrier(False)
            vif.tap.set_mac(format_mac(mac))
        except Exception as exc:
            self._discard(dev)
            if vif.tap is not None:
                vif.tap.close()
            dev.dev_fatal(exc, f"creating tap {vif.name}")
            raise XenbusFatal(str(exc)) from exc
        dev.priv = vif
        self._watch_mtu(vif)
        vif.reader = threading.Thread(target=self._tap_reader, args=(vif,), name=f"netfront-{vif.name}",
                                      daemon=True)
        vif.reader.start()
        log.info("%s (%s): mac %s, waiting for the backend", vif.name, dev.nodename, format_mac(mac))
        self._write_status(vif)

    def otherend_changed(self, dev, state) -> None:
        vif: Vif | None = dev.priv
        if vif is None:
            return
        S = XenbusState
        log.info("%s (%s): backend %s, we are %s", vif.name, dev.nodename, S(state).name, S(dev.state).name)
        with vif.lock:
            if self.backend_lost(dev, state):
                self._backend_lost(vif)
            elif state == S.InitWait:
                if dev.state == S.Initialising and vif.conn is None:
                    self._talk_to_backend(vif)
            elif state == S.Connected:
                if dev.state == S.Connected and vif.conn is not None:
                    self._backend_connected(vif)
            elif state == S.Closing:
                self._closing(vif)
            elif state == S.Closed and dev.state in (S.Closing, S.Closed):
                if dev.state == S.Closing:
                    self._closing(vif)
                self._free_connection(vif)  # the backend has unmapped everything by now
            # Closed while Initialising: we reset already and wait for its InitWait;
            # Initialising, Initialised, Unknown, Reconfiguring/ed: nothing to do
        self._write_status(vif)

    def remove(self, dev) -> None:
        vif: Vif | None = dev.priv
        if vif is None:
            return
        self._discard(dev)
        self._unwatch_mtu(vif)
        with vif.lock:
            self._carrier(vif, False)
            vif.stop.set()
            vif.engine.begin_close()
            vif.engine.drain(min(self.drain_timeout, 2.0))
            vif.engine.close()
            self._free_connection(vif)
            if vif.tap is not None:
                vif.tap.close()  # the interface disappears with the device
        if vif.reader is not None:
            vif.reader.join(2.0)
        self._remove_status(vif)
        dev.priv = None
        log.info("%s (%s): removed", vif.name, dev.nodename)

    def relocated(self, dev, old_nodename: str) -> None:
        super().relocated(dev, old_nodename)
        vif: Vif | None = dev.priv
        if vif is None:
            return
        # The MTU watch names the old path; it is set again by resume(), once
        # the new backend is known (a watch fires at once and reads it).
        vif.rewatch_mtu = vif.mtu_watch is not None
        self._unwatch_mtu(vif)

    def resume(self, dev) -> None:
        """After migration: forget the old rings (the tap stays), and connect
        afresh when the new backend is in InitWait."""
        vif: Vif | None = dev.priv
        if vif is None:
            return
        with vif.lock:
            self._drop_rings(vif)
        if vif.rewatch_mtu:
            vif.rewatch_mtu = False
            self._watch_mtu(vif)
        self._write_status(vif)

    # -- suspend (docs/suspend-resume.md) -----------------------------------------------
    def thaw(self, cancelled: bool) -> dict:
        """eth0 stays, with its carrier, while suspended; not cancelled: the
        new backend's InitWait makes new rings and its Connected brings the
        carrier back."""
        report = super().thaw(cancelled)
        self.write_all_status()
        return report

    def _drop_rings(self, vif: Vif) -> None:
        """Keep the tap -- eth0 keeps its ifindex, MAC and addresses -- with
        the carrier off, so the guest's stack queues or drops what it sends
        (Ethernet may drop; frames in flight on the old tx ring are counted
        as dropped, as Linux's xennet_release_tx_bufs does); the old rings'
        grants ended, pages freed, ports closed.  After a lost backend its
        next Connected brings the carrier back and a gratuitous ARP tells
        the bridge and the peers where we are (netdev_notify_peers)."""
        self._carrier(vif, False)
        lost = vif.engine.detach()
        if lost:
            log.info("%s: %d frame(s) in flight on the old ring dropped", vif.name, lost)
        self._free_connection(vif)
        vif.engine.reopen()

    def _backend_lost(self, vif: Vif) -> None:
        vif.resets += 1
        super()._backend_lost(vif)

    def _stop_io(self, vif: Vif, timeout: float) -> None:
        self._carrier(vif, False)
        vif.engine.begin_close()
        vif.engine.drain(min(timeout, 2.0))
        vif.engine.close()
        vif.stop.set()

    def close_all(self, timeout: float = 5.0) -> None:
        super().close_all(timeout)
        self.write_all_status()

    # -- connection ----------------------------------------------------------------------
    def _talk_to_backend(self, vif: Vif) -> None:
        """talk_to_netback: rings, grants, port(s), the nodes in ONE
        transaction, rx buffers posted, Connected."""
        dev, xen = vif.dev, self.xen
        features = BackendFeatures.parse(dev.otherend_read)
        if not features.rx_copy:
            dev.dev_fatal(errno.EOPNOTSUPP, "backend does not support copying receive path (feature-rx-copy)")
            raise XenbusFatal(f"{dev.nodename}: backend has no feature-rx-copy")
        conn = VifRings()
        conn.features = features
        with self._setting_up(dev, conn, "setting up rings"):
            tx_page, rx_page = xen.mem.alloc(2)
            conn.pages += [tx_page, rx_page]
            SharedRing.init(tx_page.mmap)
            SharedRing.init(rx_page.mmap)
            conn.tx_ring = FrontRing(tx_page.mmap, TX_RING_ENTRY_SIZE)
            conn.rx_ring = FrontRing(rx_page.mmap, RX_RING_ENTRY_SIZE)
            conn.rings += [conn.tx_ring, conn.rx_ring]
            conn.tx_ref, conn.rx_ref = self._grant_rings(dev, [tx_page, rx_page])
            conn.grefs += [conn.tx_ref, conn.rx_ref]
            ntx, nrx = conn.tx_ring.size, conn.rx_ring.size
            pool = xen.mem.alloc(ntx + nrx)
            conn.pages += pool
            tx_pool, rx_pool = [], []
            for i, page in enumerate(pool):
                readonly = i < ntx  # the backend only reads what we send
                gref = xen.gnttab.grant(dev.otherend_id, page, readonly)
                conn.grefs.append(gref)
                view = memoryview(page.mmap)
                conn.views.append(view)
                (tx_pool if readonly else rx_pool).append(GrantedPage(gref, view))
            nports = 2 if features.split_event_channels and self.want_split else 1
            conn.ports = [xen.evtchn.alloc_unbound(dev.otherend_id) for _ in range(nports)]

        evtchn = self.xen.evtchn
        if conn.split:
            tx_port, rx_port = conn.ports
            evtchn.on_event(tx_port, lambda p, vif=vif, conn=conn: self._on_event(vif, conn, p, tx=True, rx=False))
            evtchn.on_event(rx_port, lambda p, vif=vif, conn=conn: self._on_event(vif, conn, p, tx=False, rx=True))
            kick_tx, kick_rx = (lambda: evtchn.notify(tx_port)), (lambda: evtchn.notify(rx_port))
        else:
            port = conn.ports[0]
            evtchn.on_event(port, lambda p, vif=vif, conn=conn: self._on_event(vif, conn, p, tx=True, rx=True))
            kick_tx = kick_rx = (lambda: evtchn.notify(port))
        vif.conn = conn
        try:
            offloads = bool(getattr(vif.tap, "vnet_hdr", False))
            self._publish(dev, frontend_keys(conn.tx_ref, conn.rx_ref, conn.ports, sg=True, offloads=offloads),
                          "writing tx-ring-ref/rx-ring-ref/event-channel")
        except XenbusFatal:
            vif.conn = None
            conn.release(xen)
            raise
        vif.engine.reopen()
        vif.engine.max_tx_slots = XEN_NETIF_NR_SLOTS_MIN if features.sg else 1
        vif.engine.offloads = offloads
        if offloads and not vif.tap.set_offload(**features.tap_offload()):
            log.warning("%s: TUNSETOFFLOAD refused: no offloads", vif.name)
        vif.engine.attach(conn.tx_ring, conn.rx_ring, tx_pool, rx_pool, kick_tx, kick_rx)
        log.info("%s: rings granted (tx %d, rx %d), %s %s, %d rx buffers posted", vif.name, conn.tx_ref,
                 conn.rx_ref, "event channels" if conn.split else "event channel",
                 "/".join(map(str, conn.ports)), conn.rx_ring.size)
        dev.switch_state(XenbusState.Connected)  # netfront skips Initialised (seed 000)

    def _on_event(self, vif: Vif, conn: VifRings, port: int, *, tx: bool, rx: bool) -> None:
        if vif.conn is not conn:
            return
        try:
            self.xen.evtchn.clear(port)
            if tx:
                vif.engine.handle_tx_responses()
            if rx:
                vif.engine.handle_rx_responses()
        except (RingError, MalformedMessage) as exc:
            log.error("%s: backend broke the ring: %s", vif.name, exc)
            self._carrier(vif, False)
            vif.engine.begin_close()
            vif.dev.dev_fatal(errno.EIO, f"bad ring from backend: {exc}")
        except Exception as exc:  # link closed while tearing down, etc.
            log.debug("%s: event on port %d: %s", vif.name, port, exc)

    def _backend_connected(self, vif: Vif) -> None:
        """The backend mapped our rings: MTU, tap up, carrier on, transmit,
        gratuitous ARP (netdev_notify_peers)."""
        dev = vif.dev
        vif.mtu = vif_mtu(dev.read, dev.otherend_read)
        tap = vif.tap
        try:
            tap.set_mtu(vif.mtu)
            tap.set_up(True)
        except Exception as exc:
            log.warning("%s: bringing the tap up: %s", vif.name, exc)
        vif.engine.start()
        self._carrier(vif, True)
        vif.engine.kick()  # buffers posted before the backend mapped the ring
        vif.connects += 1
        log.info("%s: connected to %s (mtu %d)", vif.name, dev.otherend, vif.mtu)
        self.notify_peers(vif)

    # -- live reconfiguration: the MTU ----------------------------------------------------
    def _watch_mtu(self, vif: Vif) -> None:
        """Watch our own `mtu` node (netif.h's place for it): the toolstack
        changes it while we stay Connected (see the module docstring)."""
        dev = vif.dev
        path, token = f"{dev.nodename}/mtu", f"netfront:mtu:{dev.nodename}"
        try:
            dev.store.watch(path, token, lambda _p, _t, vif=vif: self._mtu_changed(vif))
        except Exception as exc:  # no live MTU changes then; the MTU is still read at connect
            log.warning("%s: cannot watch %s: %s", vif.name, path, exc)
            return
        vif.mtu_watch = (path, token)

    def _unwatch_mtu(self, vif: Vif) -> None:
        watch, vif.mtu_watch = vif.mtu_watch, None
        if watch is not None:
            quietly(vif.dev.store.unwatch, *watch)

    def _mtu_changed(self, vif: Vif) -> None:
        """Apply a new MTU to the tap while connected (before that, the
        backend's Connected reads it).  No state change: the rings carry
        frames of any size, nothing is renegotiated."""
        dev = vif.dev
        with vif.lock:
            if dev.state != XenbusState.Connected or not vif.carrier or vif.tap is None:
                return
            mtu = vif_mtu(dev.read, dev.otherend_read)
            if mtu == vif.mtu:
                return
            try:
                vif.tap.set_mtu(mtu)
            except Exception as exc:
                log.warning("%s: setting mtu %d: %s", vif.name, mtu, exc)
                return
            log.info("%s: mtu %d -> %d (reconfigured while connected)", vif.name, vif.mtu, mtu)
            vif.mtu = mtu
            vif.mtu_changes += 1
        self._write_status(vif)

    def notify_peers(self, vif: Vif) -> int:
        """A gratuitous ARP for each IPv4 address of the tap, put on the tx
        ring by netfront itself.  Returns how many were sent."""
        try:
            addrs = vif.tap.ipv4_addresses()
        except Exception as exc:
            log.debug("%s: reading addresses: %s", vif.name, exc)
            addrs = []
        sent = 0
        for ip in addrs:
            if vif.engine.transmit(gratuitous_arp(vif.mac, ip), timeout=1.0) is not None:
                sent += 1
        if sent:
            vif.garps += sent
            log.info("%s: gratuitous ARP for %s", vif.name, ", ".join(addrs))
        return sent

    def _carrier(self, vif: Vif, on: bool) -> None:
        vif.carrier = on
        if vif.tap is not None:
            try:
                vif.tap.set_carrier(on)
            except Exception as exc:
                log.debug("%s: carrier %s: %s", vif.name, on, exc)

    def _closing(self, vif: Vif) -> None:
        """Seed 000 closedown: Closing, stop transmitting, flush what is in
        flight, Closed.  The tap stays."""
        dev = vif.dev
        if dev.state == XenbusState.Closed:
            return
        dev.switch_state(XenbusState.Closing)
        self._carrier(vif, False)
        vif.engine.begin_close()
        if not vif.engine.drain(self.drain_timeout):
            log.warning("%s: %d frame(s) still in flight after %.0fs: dropped", vif.name,
                        vif.engine.inflight(), self.drain_timeout)
        vif.engine.close()
        dev.switch_state(XenbusState.Closed)

    # -- the tap reader ------------------------------------------------------------------
    def _tap_reader(self, vif: Vif) -> None:
        """Frames the guest sends go on the tx ring.  While there is no
        running connection nothing is read: the tap's own queue holds (or
        drops) what the stack sends, with the carrier off it sends nothing."""
        engine = vif.engine
        while not vif.stop.is_set():
            if not engine.wait_running(0.5):
                continue
            tap = vif.tap
            if tap is None:
                return
            frame = tap.read(0.5)
            if frame is None:
                if getattr(tap, "closed", False):
                    return
                continue
            try:
                if engine.offloads:
                    offload, frame = tx_offload(frame, bool(vif.conn and vif.conn.features.ipv6_csum))
                    if frame is None:
                        engine.counters.tx_dropped += 1
                        continue
                    engine.transmit(frame, offload=offload)
                else:
                    engine.transmit(frame)
            except (RingError, MalformedMessage) as exc:
                log.error("%s: backend broke the tx ring: %s", vif.name, exc)
                engine.begin_close()
                vif.dev.dev_fatal(errno.EIO, f"bad tx ring from backend: {exc}")
            except Exception as exc:
                log.warning("%s: transmit: %s", vif.name, exc)


    # -- status ------------------------------------------------------------------------------
    def _status_path(self, vif: Vif) -> str | None:
        return None if not self.status_dir else os.path.join(self.status_dir, f"{vif.devid}.json")

    def _write_status(self, vif: Vif) -> None:
        path = self._status_path(vif)
        if path is None:
            return
        try:
            os.makedirs(self.status_dir, exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(vif.status(), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except Exception as exc:
            log.debug("%s: writing %s: %s", vif.name, path, exc)

    def _remove_status(self, vif: Vif) -> None:
        path = self._status_path(vif)
        if path is not None:
            quietly(os.unlink, path)

    def write_all_status(self) -> None:
        for vif in self._all():
            self._write_status(vif)



# ---------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.net.front",
                                     description="xenbed netfront: each vif as a tap eth<N>")
    parser.add_argument("--status-dir", default=os.environ.get("XENBED_VIF_STATUS_DIR", DEFAULT_STATUS_DIR),
                        help="one <devid>.json of counters per vif ('' for none)")
    parser.add_argument("--no-split", action="store_true",
                        help="one event channel even when the backend offers split tx/rx channels")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"),
                        help="JSONL file to record our XenBus state changes in")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="netfront: %(levelname)s %(name)s: %(message)s")

    from xenbed.drivers.xenbus.daemon import run_frontend

    return run_frontend("netfront", lambda xen: NetFront(xen, status_dir=args.status_dir or None,
                                                         split_event_channels=not args.no_split),
                        transitions=args.transitions, tick=lambda driver: driver.write_all_status())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
