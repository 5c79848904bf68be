"""blkfront: the block frontend of a guest (Linux's drivers/block/xen-blkfront.c).

`python3 -m xenbed.drivers.blk.front` runs in every guest, started by its
kernel: it probes the guest's `device/vbd/<devid>` directories through the
XenBus (`FrontendBus`), connects each disk to its backend over a blkif ring
and exposes it as a regular file `/run/xen/vbd/<vdev>` (e.g. xvda) through
FUSE (fuse_disk.py), on which `dd`, `mkfs.ext4` and `fsck` work.

Connection (seed 000, Device Initialisation)
--------------------------------------------
backend in InitWait (at probe, or when it gets there: talk_to_blkback):
read its `max-ring-page-order`; allocate the ring -- 2**order pages, order
= min(that, ours), mapped side by side -- SHARED_RING_INIT it, grant each
page to `backend-id`, allocate an unbound event channel for the backend,
write `ring-ref` (order 0) or `ring-page-order` + `ring-ref0..N`,
`event-channel`, `protocol` (x86_64-abi) and `feature-persistent` in one
transaction, switch to Initialised.  When the
backend reaches Connected: read `sectors`, `sector-size`, `info`,
`feature-flush-cache` / `feature-barrier`, `feature-discard`,
`feature-persistent`, `feature-max-indirect-segments`; grant the data-page
pool; expose the disk; switch to Connected.  A later Connected (or a change
of `sectors` seen by the watch on it) with a different `sectors` is an online
resize: the FUSE file's size follows while it is open.  On a cdrom
(VDISK_CDROM in `info`) the same watch carries a media change: `sectors` 0
is an empty drive, whose reads fail with ENOMEDIUM (as Linux's sr driver
answers), and a new medium is read through the same open file.

Closedown (seed 000, both diagrams)
-----------------------------------
Backend Closing (or Closed without Closing): new I/O fails with EIO, the
requests in flight are flushed through (their responses awaited), the FUSE
file is removed, we switch to Closed.  On our own fatal error we switch to
Closing (dev_fatal) and follow the backend from there.  `remove` (the
toolstack deleted the device dir) frees the ring, the grants, the port.

The I/O engine is front_engine.py (`BlkfrontEngine`), the disk FUSE shows
is disk.py (`BlkDisk`); what all frontends share is drivers/xenbus/frontend.py.

Threads: XenBus callbacks run on the store's xenwatch thread, responses are
taken on the event-channel dispatcher thread, FUSE callers wait in their own
threads (fuse_disk.py bridges trio to them).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
from typing import TYPE_CHECKING

from xenbed.drivers.xenbus import XenbusDevice, XenbusFatal, XenbusState
from xenbed.drivers.xenbus.frontend import FrontendDevice, GrantedPage, RingResources, XenbusFrontend, quietly
from xenbed.drivers.xenbus.nodes import read_int
from xenbed.protocols import blkif
from xenbed.protocols.blkif import BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER, RING_ENTRY_SIZE
from xenbed.protocols.ring import XEN_PAGE_SIZE, FrontRing, MalformedResponse, RingError, SharedRing
from xenbed.protocols.vdev import number_to_vdev

from .disk import BlkDisk, DiskInfo
from .front_engine import (
    MAX_RING_PAGE_ORDER, BlkfrontEngine, indirect_segments_to_use, pool_layout, ring_nodes, ring_page_order_to_use,
)

if TYPE_CHECKING:
    from xenbed.drivers.xenbus.daemon import GuestXen

log = logging.getLogger("xenbed.blkfront")

DEFAULT_MOUNTPOINT = "/run/xen/vbd"


class VbdRing(RingResources):
    """One connection's ring: its page, grant and port, and the data pool
    (data pages, then indirect pages) granted once (persistent)."""

    def __init__(self) -> None:
        super().__init__()
        self.ring: FrontRing | None = None
        self.ring_ref: int | None = None
        self.port: int | None = None
        self.pool: list[GrantedPage] = []  # data pages, then indirect pages
        self.ndata = 0  # how many of the pool pages are data pages
        self.indirect_segments = 0  # per INDIRECT request on this ring; 0: none


class Vbd(FrontendDevice):
    """blkfront_info: one virtual block device of this guest."""

    conn: VbdRing | None

    def __init__(self, dev: XenbusDevice, name: str, devnum: int) -> None:
        super().__init__(dev, name, BlkfrontEngine(handle=devnum & 0xFFFF))
        self.devnum = devnum
        self.disk: BlkDisk | None = None
        self.info: DiskInfo | None = None
        self.exposed = False
        self.sectors_token = ""


class BlkFront(XenbusFrontend):
    """The vbd frontend driver.  `fs` is the FUSE filesystem that shows the
    disks (None: disks are only kept in `self.devices`, e.g. without FUSE)."""

    devicetype = "vbd"
    report_key = "disks"

    def __init__(self, xen: GuestXen, fs=None, *, drain_timeout: float = 30.0,
                 max_ring_page_order: int = MAX_RING_PAGE_ORDER) -> None:
        super().__init__(xen)
        self.fs = fs
        self.drain_timeout = drain_timeout
        self.max_ring_page_order = max_ring_page_order  # 0: a one-page ring, whatever the backend offers

    # -- XenbusDriver ----------------------------------------------------------------
    def probe(self, dev) -> None:
        devnum_text = dev.read("virtual-device")
        try:
            devnum = int(devnum_text) if devnum_text is not None else int(dev.nodename.rsplit("/", 1)[1])
            name = number_to_vdev(devnum)
        except ValueError as exc:
            dev.dev_fatal(errno.EINVAL, f"reading virtual-device: {exc}")
            raise XenbusFatal(str(exc)) from exc
        vbd = Vbd(dev, name, devnum)
        dev.priv = vbd
        self._add(vbd)
        self._talk_when_backend_waits(vbd)

    def otherend_changed(self, dev, state) -> None:
        vbd: Vbd | None = dev.priv
        if vbd is None:
            return
        S = XenbusState
        log.info("%s (%s): backend %s, we are %s", vbd.name, dev.nodename, S(state).name, S(dev.state).name)
        if self.backend_lost(dev, state):
            self._backend_lost(vbd)
        elif state == S.InitWait:
            if dev.state == S.Initialising and vbd.conn is None:
                self._talk_to_backend(vbd)
        elif state == S.Connected:
            if dev.state == S.Connected:
                self._check_resize(vbd)
            elif dev.state in (S.Initialised, S.Initialising) and vbd.conn is not None:
                self._connect(vbd)
        elif state == S.Closing or (state == S.Closed and dev.state == S.Closing):
            self._closing(vbd)
        # Closed while Initialising: we reset already and wait for its InitWait;
        # Initialising, Initialised, Unknown, Reconfiguring/ed: nothing to do

    def remove(self, dev) -> None:
        vbd: Vbd | None = dev.priv
        if vbd is None:
            return
        self._discard(dev)
        self._unwatch_sectors(vbd)
        self._unexpose(vbd)
        vbd.engine.begin_close()
        vbd.engine.drain(min(self.drain_timeout, 5.0))
        vbd.engine.close()
        self._free_connection(vbd)
        dev.priv = None

    def resume(self, dev) -> None:
        """After migration: the new backend gets a new ring; requests in
        flight wait in the shadow and are put again when it is Connected.
        The FUSE file stays."""
        vbd: Vbd | None = dev.priv
        if vbd is None:
            return
        self._drop_rings(vbd)
        self._talk_when_backend_waits(vbd)

    def _drop_rings(self, vbd: Vbd) -> None:
        """Keep the disk: what was in flight stays in the shadow, callers of
        the FUSE file block until the next ring (blkif_recover)."""
        self._unwatch_sectors(vbd)  # its path names the old backend
        kept = vbd.engine.detach()
        if kept:
            log.info("%s: %d request(s) in flight kept for the next ring", vbd.name, len(kept))
        self._free_connection(vbd)

    def _stop_io(self, vbd: Vbd, timeout: float) -> None:
        self._unexpose(vbd)
        vbd.engine.begin_close()
        vbd.engine.drain(timeout)
        vbd.engine.close()

    # -- connection ----------------------------------------------------------------
    def _talk_to_backend(self, vbd: Vbd) -> None:
        """talk_to_blkback: the ring (of 2**order pages, as the backend's
        `max-ring-page-order` allows), its grants, the port, then the
        nodes in ONE transaction and Initialised (seed 000)."""
        dev, xen = vbd.dev, self.xen
        conn = VbdRing()
        order = ring_page_order_to_use(dev.otherend_read("max-ring-page-order"), self.max_ring_page_order)
        with self._setting_up(dev, conn, "setting up ring"):
            nbytes = XEN_PAGE_SIZE << order
            if order == 0:
                conn.pages = xen.mem.alloc(1)
                buf = conn.pages[0].mmap
            else:
                conn.pages, contiguous = xen.mem.alloc_contiguous(1 << order)
                conn.rings.append(contiguous)  # released after the ring on it
                buf = contiguous.buf
            SharedRing.init(buf)
            conn.ring = FrontRing(buf, RING_ENTRY_SIZE, ring_bytes=nbytes)
            conn.rings.insert(0, conn.ring)
            conn.grefs = self._grant_rings(dev, conn.pages)
            conn.ring_ref = conn.grefs[0]
            conn.port = xen.evtchn.alloc_unbound(dev.otherend_id)
            conn.ports.append(conn.port)
        vbd.conn = conn
        self._publish(dev, {**ring_nodes(conn.grefs, order), "event-channel": str(conn.port),
                            "protocol": blkif.PROTOCOL, "feature-persistent": "1"},
                      "writing ring-ref/event-channel")
        xen.evtchn.on_event(conn.port, lambda port, vbd=vbd, conn=conn: self._on_event(vbd, conn, port))
        dev.switch_state(XenbusState.Initialised)

    def _talk_when_backend_waits(self, vbd: Vbd) -> None:
        """Linux talks to blkback when it reaches InitWait (its keys are
        written by then); a backend there already is not seen changing."""
        backend = XenbusState.parse(vbd.dev.otherend_read("state"))
        if backend in (XenbusState.InitWait, XenbusState.Initialised, XenbusState.Connected):
            self._talk_to_backend(vbd)

    def _on_event(self, vbd: Vbd, conn: VbdRing, port: int) -> None:
        if vbd.conn is not conn or conn.ring is None:
            return
        try:
            self.xen.evtchn.clear(port)
            vbd.engine.handle_responses()
        except (RingError, MalformedResponse) as exc:
            log.error("%s: backend broke the ring: %s", vbd.name, exc)
            vbd.engine.close()
            vbd.dev.dev_fatal(errno.EIO, f"bad ring from backend: {exc}")
        except Exception as exc:  # link closed while tearing down, etc.
            log.debug("%s: event on port %d: %s", vbd.name, port, exc)

    def _grant_pool(self, vbd: Vbd, info: DiskInfo) -> None:
        """The data (and indirect) pages, granted once for this ring."""
        dev, conn = vbd.dev, vbd.conn
        conn.indirect_segments = indirect_segments_to_use(info.max_indirect_segments)
        ndata, nindirect = pool_layout(conn.ring.size, conn.indirect_segments)
        conn.ndata = ndata
        try:
            pages = self.xen.mem.alloc(ndata + nindirect)
            conn.pages += pages
            for page in pages:
                gref = self.xen.gnttab.grant(dev.otherend_id, page)
                conn.grefs.append(gref)
                view = memoryview(page.mmap)
                conn.views.append(view)
                conn.pool.append(GrantedPage(gref, view))
        except Exception as exc:
            dev.dev_fatal(exc, "granting the data pages")
            raise XenbusFatal(str(exc)) from exc

    def _connect(self, vbd: Vbd) -> None:
        """Backend Connected: read the details, grant the pool, expose, Connected."""
        dev, conn = vbd.dev, vbd.conn
        try:
            info = DiskInfo.parse(dev.otherend_read)
        except Exception as exc:
            dev.dev_fatal(errno.EINVAL, f"reading backend details: {exc}")
            raise XenbusFatal(str(exc)) from exc
        with vbd.lock:
            if not conn.pool:
                self._grant_pool(vbd, info)
            engine = vbd.engine
            engine.flush_op = BLKIF_OP_FLUSH_DISKCACHE if info.flush else (BLKIF_OP_WRITE_BARRIER if info.barrier else None)
            engine.discard_ok = info.discard
            pool, indirect_pool = conn.pool[:conn.ndata], conn.pool[conn.ndata:]
            resized = vbd.info is not None and vbd.info.sectors != info.sectors
            vbd.info = info
            if vbd.disk is None:
                vbd.disk = BlkDisk(vbd.name, engine, info)
            else:
                vbd.disk.info = info
            engine.attach(conn.ring, pool, lambda port=conn.port: self.xen.evtchn.notify(port),
                          indirect_pool=indirect_pool, indirect_segments=conn.indirect_segments)
        # a response may have come before the handler could see the ring
        engine.handle_responses()
        self._expose(vbd)
        self._watch_sectors(vbd)
        if resized:
            log.info("%s: size now %d sectors", vbd.name, info.sectors)
        log.info("%s: connected, %d sectors of %d bytes%s%s%s%s", vbd.name, info.sectors, info.sector_size,
                 ", read-only" if info.readonly else "", ", flush" if engine.flush_op is not None else "",
                 ", discard" if info.discard else "",
                 f", indirect {engine.indirect_segments} segments" if engine.indirect_segments else "")
        dev.switch_state(XenbusState.Connected)

    def _watch_sectors(self, vbd: Vbd) -> None:
        """The bus delivers a state only when it changes, so a backend that
        rewrites Connected after changing `sectors` (Linux's xen_vbd_resize)
        is seen through a watch on `sectors` itself."""
        if vbd.sectors_token:
            return
        token = f"blkfront-sectors:{vbd.dev.nodename}:{id(vbd)}"
        path = f"{vbd.dev.otherend}/sectors"

        def fired(_path: str, _token: str, vbd=vbd) -> None:
            # frozen: the domain is suspended, its backend may be going away
            if vbd.sectors_token == _token and vbd.dev.state == XenbusState.Connected and not vbd.engine.frozen:
                try:
                    self._check_resize(vbd)
                except Exception as exc:
                    log.warning("%s: checking for a resize: %s", vbd.name, exc)

        vbd.sectors_token = token
        try:
            vbd.dev.store.watch(path, token, fired)
        except Exception as exc:
            vbd.sectors_token = ""
            log.warning("%s: cannot watch %s (no online resize): %s", vbd.name, path, exc)

    def _unwatch_sectors(self, vbd: Vbd) -> None:
        token, vbd.sectors_token = vbd.sectors_token, ""
        if token:
            quietly(vbd.dev.store.unwatch, f"{vbd.dev.otherend}/sectors", token)

    def _check_resize(self, vbd: Vbd) -> None:
        """A repeated Connected: the backend may have changed `sectors`."""
        sectors = read_int(vbd.dev.otherend_read("sectors"), -1)
        if vbd.info is None or sectors < 0 or sectors == vbd.info.sectors:
            return
        log.info("%s: %s %d -> %d sectors", vbd.name, "media change" if vbd.info.cdrom else "online resize",
                 vbd.info.sectors, sectors)
        vbd.info = DiskInfo(**{**vbd.info.__dict__, "sectors": sectors})
        if vbd.disk is not None:
            vbd.disk.info = vbd.info
        if self.fs is not None and vbd.exposed:
            self.fs.resized(vbd.name)

    def _closing(self, vbd: Vbd) -> None:
        """Seed 000 closedown: fail new I/O, flush what is in flight, remove
        the file, Closed."""
        dev = vbd.dev
        if dev.state == XenbusState.Closed:
            return
        self._unwatch_sectors(vbd)
        dev.switch_state(XenbusState.Closing)  # seed 000: Closing, flush, Closed
        vbd.engine.begin_close()
        if not vbd.engine.drain(self.drain_timeout):
            log.warning("%s: %d request(s) still in flight after %.0fs: failing them",
                        vbd.name, vbd.engine.inflight(), self.drain_timeout)
        vbd.engine.close()
        self._unexpose(vbd)
        dev.switch_state(XenbusState.Closed)

    def _expose(self, vbd: Vbd) -> None:
        if vbd.exposed:
            return
        vbd.exposed = True
        if self.fs is not None:
            self.fs.add_disk(vbd.name, vbd.disk)

    def _unexpose(self, vbd: Vbd) -> None:
        if not vbd.exposed:
            return
        vbd.exposed = False
        if vbd.disk is not None:
            vbd.disk.removed = True
        if self.fs is not None:
            self.fs.remove_disk(vbd.name)



# ---------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenbed.drivers.blk.front",
                                     description="xenbed blkfront: each vbd as a FUSE file")
    parser.add_argument("--mountpoint", default=os.environ.get("XENBED_VBD_DIR", DEFAULT_MOUNTPOINT))
    parser.add_argument("--no-fuse", action="store_true", help="connect the disks but do not mount FUSE")
    parser.add_argument("--transitions", default=os.environ.get("XENBED_TRANSITIONS"),
                        help="JSONL file to record our XenBus state changes in")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="blkfront: %(levelname)s %(name)s: %(message)s")

    from xenbed.drivers.xenbus.daemon import run_frontend

    fs = None
    if not args.no_fuse:
        from .fuse_disk import VbdFilesystem
        fs = VbdFilesystem(args.mountpoint)
        fs.start()
    log.info("blkfront: disks under %s", "(no FUSE)" if fs is None else args.mountpoint)
    # Linux's xen_blkif_max_ring_order defaults to 0 (one page, `ring-ref`):
    # so does the daemon; the bench and a user who wants more set this.
    order = int(os.environ.get("XENBED_BLKFRONT_MAX_RING_PAGE_ORDER", "0"))
    return run_frontend("blkfront", lambda xen: BlkFront(xen, fs, max_ring_page_order=order), transitions=args.transitions, interval=0.5,
                        before_close=fs.stop if fs is not None else None)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
