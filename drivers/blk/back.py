"""blkback: the PV block backend, serving a loop device to a guest's blkfront.

How it is started (in dom0, or a driver domain, long-lived):

    python3 -m xenbed.drivers.blk.back [--domid N] [--run-hotplug]

Environment: XENBED_CREDENTIAL / XENBED_HYPERVISOR_SOCKET (the hypervisor
link, role "device"), XENSTORED_PATH (the store).  It logs one line per event
to stdout, each naming the backend path, and exits cleanly on SIGTERM/SIGINT
(every connected device is torn down: rings unmapped, ports closed, loop fds
closed -- autoclear then frees the loops).

What it watches, as Linux's xen-blkback does (seed 000, Device Initialisation
and Closedown).  `Blkback` is a `XenbusDriver` for type "vbd" on a
`BackendBus` (drivers/xenbus), which watches `/local/domain/<self>/backend/vbd`,
probes each new `<frontend-domid>/<devid>` dir in state Initialising, and
watches the frontend's `state`:

* probe: write `max-ring-page-order`, `multi-queue-max-queues` (one per
  CPU, as Linux's xenblk_max_queues) and `feature-max-indirect-segments`,
  Initialising -> InitWait, watch `<backend>/physical-device` (the hotplug
  step writes it; the device is then opened, O_DIRECT, and a loop device's
  autoclear turned on, until the device is removed or unplugged) and
  `<backend>/state` (the toolstack writes `online=0` + Closing to unplug).
* when the frontend is Initialised (or Connected) AND `physical-device` is
  there, in either order: read and validate `ring-ref` (or
  `ring-page-order` + `ring-ref0..N`), `event-channel` -- per queue under
  `queue-<i>/` when `multi-queue-num-queues` > 1 --, `protocol`,
  `feature-persistent`; map each ring, bind each event channel (a worker
  thread per ring), write
  `sectors`, `info`, `sector-size`, `physical-sector-size`,
  `feature-flush-cache`, `feature-discard` (+ granularity/alignment),
  `feature-persistent` in ONE transaction, then Connected.  Bad keys:
  dev_fatal (`<domain>/error/<nodename>/error`, as Linux) and Closing.
* frontend Closing -> drain, unmap, unbind, Closing; frontend Closed ->
  Closed, and with `online=0` the disk is closed (autoclear frees the loop);
  frontend Initialising/Initialised after Closed (reset, migration) ->
  InitWait and connect again; backend dir removed -> remove().
* recover (a restarted blkback, or a restarted dom0, finds the device in
  the store in a state an earlier blkback left): the old loop device went
  with the old process (autoclear), so the stale hotplug keys are removed
  and the hotplug step runs again here (the toolstack that ran it is gone
  too); a device left Connected goes Closed, which blkfront reads as "the
  backend lost the connection": it keeps its disk open, shadows what was in
  flight, resets to Initialising and reconnects on a new ring, replaying the
  shadow.  A device left in InitWait stays there and connects as at boot.

Reconfiguration while Connected (seed 000, Device reconfiguration: device-
specific watches, both ends stay Connected):

* online resize (xen_vbd_resize in Linux's xen-blkback/xenbus.c): the ring
  thread compares the disk's BLKGETSIZE64 with the size it serves each time
  it wakes -- on a request, and on its 0.25 s idle timeout, so an idle disk's
  resize is seen within a second (Linux checks only when the ring kthread
  wakes, i.e. on I/O) -- and when it differs serves the new size, then
  rewrites `sectors` and our unchanged `state` (Connected) in ONE
  transaction.  blkfront sees `sectors` change through its watch on it.
  The state rewrite is a notification, not a transition: it bypasses
  switch_state and is not recorded (the checker would call Connected ->
  Connected "not a transition").  The toolstack grows the image and sets the
  loop's capacity (`xl block-resize`, toolstack/blk.py).
* cdrom media change (`device-type` cdrom; a PV take on xl cd-insert /
  cd-eject, which libxl offers only to QEMU): the hotplug `change` step
  rewrites `physical-device` (or removes it: no medium); our watch on it
  opens the new device (or none), swaps it under the ring thread's I/O
  lock, closes the old one (autoclear frees its loop) and publishes the new
  `sectors` (0 when empty) with Connected as above.  A non-removable disk
  keeps refusing a changed physical-device, as Linux's backend_changed does.

The hotplug step (`xenbed.drivers.blk.hotplug add`) is run by the toolstack
after InitWait, as libxl does; `--run-hotplug` makes the daemon run it itself
on probe and on removal instead (udev-style), for tests without xl.  In a
driver domain (a domain without the control privilege, seed 004) it is
always on: the disks it serves are its own storage, which dom0's toolstack
cannot reach, and there is no toolstack in it -- on Xen, `xl devd` runs in
the driver domain for exactly this.  There the step's removal also runs when
the toolstack unplugs the device (Closed with online=0), before dom0 removes
the directories, as devd runs the script on that state.

The rooms, as Linux's xen-blkback: this file is the XenBus side (xenbus.c)
and the daemon; drivers/blk/blkback.py the data path (blkback.c);
drivers/blk/connection.py one connected device (common.h's xen_blkif);
drivers/xenbus/backend.py what every backend does the same way.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from dataclasses import dataclass

from xenbed.drivers.xenbus import XenbusDevice, XenbusState
from xenbed.drivers.xenbus.backend import BackendDriver, BackendInfo
from xenbed.drivers.xenbus.nodes import BadNode
from xenbed.protocols import blkif
from xenbed.protocols.blkif import SECTOR_SIZE

from . import hotplug, loop
from .blkback import DISCARD_GRANULARITY, MAX_INDIRECT_SEGMENTS, MAX_QUEUES, MAX_RING_PAGE_ORDER
from .connection import BlkbackConnection, Disk, parse_frontend_config

log = logging.getLogger("xenbed.blkback")

S = XenbusState
# Written at probe (and again at recovery), before InitWait.
PROBE_FEATURES = {
    "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
    "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
    "multi-queue-max-queues": str(MAX_QUEUES),
}


@dataclass(eq=False)
class BlkbackInfo(BackendInfo):
    """blkback's private data for one device (Linux's struct backend_info)."""

    disk: Disk | None = None


class Blkback(BackendDriver):
    """The vbd backend driver for a `BackendBus` (Linux's xen-blkback/xenbus.c).

    Callbacks run on the bus's xenwatch thread; each device's ring runs on
    its own thread (BlkbackConnection)."""

    devicetype = "vbd"
    name = "blkback"
    info_class = BlkbackInfo
    # backend_changed: the hotplug step's physical-device (fires at once: it
    # may be there already); our own state: the toolstack writes Closing
    # (with online=0) to unplug.
    own_watches = (("physical-device", "physical_device_changed"), ("state", "own_state_changed"))

    def __init__(self, grants, evtchn, *, run_hotplug: bool = False):
        super().__init__(run_hotplug=run_hotplug)
        self.grants = grants
        self.evtchn = evtchn

    # -- BackendDriver -------------------------------------------------------------------
    def setup(self, dev: XenbusDevice) -> bool:
        self.write_features(dev, PROBE_FEATURES)
        return True

    def recover_device(self, dev: XenbusDevice, stale: XenbusState) -> bool:
        # The loop the old hotplug step attached is freed (autoclear) or, if
        # the old dom0 died before blkback opened it, still ours: remove()
        # detaches it only when it still backs our target.
        hotplug.remove(dev.store, dev.nodename)
        self.write_features(dev, PROBE_FEATURES)
        self.lost_connection(dev, stale)
        self.hotplug("add", dev)
        # The hotplug step attached the loop without autoclear (nobody held
        # it); hold it now, or a blkback killed again before the frontend
        # resets would leave it attached for good.
        self._open_disk(dev, any_state=True)
        return True

    def reconnect(self, dev: XenbusDevice) -> None:
        dev.switch_state(S.InitWait)
        self._open_disk(dev)

    def connect(self, dev: XenbusDevice) -> None:
        be: BlkbackInfo = dev.priv
        if be.connection is not None or dev.state != S.InitWait:
            return
        if be.frontend_state not in (S.Initialised, S.Connected):
            return
        if be.disk is None and not self._open_disk(dev):
            log.info("%s: frontend ready, waiting for the hotplug step", dev.nodename)
            return
        try:
            self._connect(dev)
        except BadNode as exc:
            dev.dev_fatal(exc.err, str(exc))
        except Exception as exc:
            log.exception("%s: connect failed", dev.nodename)
            dev.dev_fatal(exc, f"connecting: {exc}")

    def close_resource(self, dev: XenbusDevice) -> None:
        be: BlkbackInfo = dev.priv
        disk, be.disk = be.disk, None
        if disk is not None:
            disk.close()  # a loop device's autoclear frees it now
            log.info("%s: closed %s", dev.nodename, disk.path)

    def release(self, dev: XenbusDevice) -> None:
        """device_unregister: release the disk (the dirs stay until the
        toolstack removes them).  Running our own hotplug step (a driver
        domain's devd), its removal too: a loop it attached that we never
        opened has no autoclear to free it."""
        self.close_resource(dev)
        if self.run_hotplug and dev.priv.hotplug_ran:
            self.hotplug("remove", dev)
            dev.priv.hotplug_ran = False

    unplugged = release

    def hotplug_step(self, action: str, dev: XenbusDevice) -> None:
        if action == "add":
            hotplug.add(dev.store, dev.nodename)
        else:
            hotplug.remove(dev.store, dev.nodename)

    # -- backend watches ----------------------------------------------------------------
    def physical_device_changed(self, dev: XenbusDevice) -> None:
        be: BlkbackInfo = dev.priv
        try:
            with be.lock:
                if not dev.removed and be.disk is not None and dev.read("device-type") == "cdrom":
                    self._change_media(dev)
                    return
                if not dev.removed and self._open_disk(dev):
                    self.connect(dev)
        except Exception as exc:
            log.exception("%s: handling physical-device", dev.nodename)
            dev.dev_fatal(exc, f"handling physical-device: {exc}")

    # -- disk ------------------------------------------------------------------------------
    def _open_disk(self, dev: XenbusDevice, any_state: bool = False) -> bool:
        """Open the device the hotplug step named, once (xen_vbd_create).
        True when a disk is open.  `any_state`: also while Closed (recover
        holds the new loop at once, so that its autoclear covers a backend
        killed again before the frontend came back)."""
        be: BlkbackInfo = dev.priv
        if be.disk is not None:
            return True
        if dev.state not in (S.Initialising, S.InitWait) and not any_state:
            return False
        physdev = dev.read("physical-device")
        if physdev is None:
            return False
        try:
            major, minor = loop.parse_physical_device(physdev)
            path = dev.read("physical-device-path") or _node_for(major, minor)
            mode = (dev.read("mode") or "w").strip()
            be.disk = Disk(path, major, minor, readonly=mode.startswith("r"),
                           discard=dev.read("discard-enable") != "0")
        except (OSError, ValueError) as exc:
            dev.dev_fatal(exc, f"opening physical-device {physdev}: {exc}")
            return False
        log.info("%s: opened %s (%s, %d sectors%s%s)", dev.nodename, be.disk.path, physdev,
                 be.disk.geometry.sectors, ", read-only" if be.disk.geometry.readonly else "",
                 ", O_DIRECT" if be.disk.direct else "")
        return True

    # -- connect ---------------------------------------------------------------------------
    def _connect(self, dev: XenbusDevice) -> None:
        be: BlkbackInfo = dev.priv
        disk = be.disk
        readonly = disk.geometry.readonly
        cdrom = dev.read("device-type") == "cdrom"
        config = parse_frontend_config(lambda key: dev.otherend_read(key))
        conn = BlkbackConnection(dev.nodename, self.grants, self.evtchn, dev.otherend_id, config, disk,
                                 lambda err, msg: self.fatal_from_ring(dev, err, msg))
        try:
            geometry = conn.geometry
            info = (blkif.VDISK_READONLY if readonly else 0) | (blkif.VDISK_CDROM | blkif.VDISK_REMOVABLE if cdrom else 0)
            details = {
                "sectors": str(geometry.sectors),
                "info": str(info),
                "sector-size": str(SECTOR_SIZE),
                "physical-sector-size": str(SECTOR_SIZE),
                "feature-flush-cache": "1",
                "feature-barrier": "0",
                "feature-discard": "1" if geometry.discard else "0",
                "feature-persistent": "1",
                "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
            }
            if geometry.discard:
                details["discard-granularity"] = str(DISCARD_GRANULARITY)
                details["discard-alignment"] = "0"
                details["discard-secure"] = "0"
            self.write_features(dev, details)
        except BaseException:
            conn.close()
            raise
        be.connection = conn
        conn.on_resize = lambda _sectors, conn=conn: self._publish_sectors(dev, conn)
        conn.start()
        log.info("%s: connected to dom%d: %s (%s sectors, %s, %d queue(s), ring order %d, ports %s, persistent %s)",
                 dev.nodename, dev.otherend_id, disk.path, geometry.sectors, "ro" if readonly else "rw",
                 len(conn.queues), config.ring_page_order, [q.port for q in conn.queues], config.persistent)
        dev.switch_state(S.Connected)

    # -- reconfiguration while Connected ----------------------------------------------------
    def _change_media(self, dev: XenbusDevice) -> None:
        """A cdrom's `physical-device` changed (hotplug `change`): serve the
        new medium, or none, without leaving Connected.  be.lock held."""
        be: BlkbackInfo = dev.priv
        physdev = dev.read("physical-device")
        try:
            wanted = loop.parse_physical_device(physdev) if physdev else None
        except ValueError as exc:
            dev.dev_error(errno.EINVAL, f"media change: {exc}")
            return
        if wanted == be.disk.physical_device:
            return  # our own watch firing at registration, or a rewrite of the same device
        new = Disk.no_media()
        if wanted is not None:
            try:
                path = dev.read("physical-device-path") or _node_for(*wanted)
                new = Disk(path, *wanted, readonly=True, discard=False)
            except OSError as exc:  # the drive stays, empty: a bad medium, not a dead device
                dev.dev_error(exc, f"opening the new medium {physdev}: {exc}")
        conn = be.connection
        old = conn.swap_disk(new) if conn is not None else be.disk
        be.disk = new
        old.close()  # a loop device's autoclear frees it now
        log.info("%s: medium %s -> %s (%d sectors)", dev.nodename, old.path, new.path, new.geometry.sectors)
        if conn is not None:
            self._publish_sectors(dev, conn)

    def _publish_sectors(self, dev: XenbusDevice, conn: BlkbackConnection) -> None:
        """xen_vbd_resize: the size we serve now as `sectors`, and our state
        written again as Connected, in ONE transaction -- only while the node
        still says Connected (never over the toolstack's Closing, never into
        a removed dir).  Not a transition, so not recorded (module doc).
        Runs on the ring thread (resize) or the xenwatch thread (media)."""
        class NotConnected(Exception):
            pass

        with conn.publish_lock:
            if conn.stop.is_set():
                return
            sectors = conn.geometry.sectors  # the latest, read under the lock that orders the writers

            def body(tx: int) -> None:
                if dev.read("state", None, tx) != str(int(S.Connected)):
                    raise NotConnected
                dev.write("sectors", str(sectors), tx)
                dev.write("state", str(int(S.Connected)), tx)

            try:
                dev.store.run_transaction(body)
            except NotConnected:
                log.info("%s: not Connected any more: %d sectors not published", dev.nodename, sectors)
                return
            except Exception as exc:
                log.warning("%s: publishing %d sectors: %s", dev.nodename, sectors, exc)
                return
        log.info("%s: published %d sectors (state Connected rewritten)", dev.nodename, sectors)


def _node_for(major: int, minor: int) -> str:
    if major == loop.LOOP_MAJOR:
        return loop.ensure_node(minor)
    raise OSError(errno.ENODEV, f"no device node known for {major}:{minor}")


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.blk.back", description=__doc__.split("\n")[0])
    parser.add_argument("--domid", type=int, default=None, help="our domid (default: the link's)")
    parser.add_argument("--run-hotplug", action="store_true",
                        help="run the block hotplug step on probe/remove (default: the toolstack runs it)")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"),
                        help="append every state transition to this JSONL file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s blkback %(levelname)s %(message)s")
    from xenbed.drivers.xen.evtchn import EventChannels
    from xenbed.drivers.xen.gnttab import GrantTable
    from xenbed.drivers.xenbus.daemon import run_backend

    # A driver domain runs its own hotplug step (module doc): xl devd's job.
    return run_backend("blkback", lambda link: Blkback(GrantTable(link), EventChannels(link),
                                                      run_hotplug=args.run_hotplug or link.privilege != "control"),
                       transitions=args.transitions, domid=args.domid)


if __name__ == "__main__":
    sys.exit(main())
