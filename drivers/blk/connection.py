"""One connected vbd in blkback: the mapped ring, the bound event channel,
the open disk and the thread serving them (Linux's struct xen_blkif and its
ring kthread, xen-blkback/common.h and blkback.c's xen_blkif_schedule).

`Disk` is the backing device, open from the hotplug step's
`physical-device` until the device is removed (Linux's xen_vbd);
`ContiguousPages` (drivers/xen/memory.py) maps a multi-page ring side by side.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass, replace

from xenbed.protocols import blkif
from xenbed.protocols.blkif import SECTOR_SIZE
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, RingOverflow

from xenbed.drivers.xenbus.backend import run_ring_thread
from xenbed.drivers.xenbus.nodes import BadNode, read_flag, read_uint

from xenbed.drivers.xen.memory import ContiguousPages

from . import loop
from .blkback import MAX_QUEUES, MAX_RING_PAGE_ORDER, BlkifServer, DiskGeometry

log = logging.getLogger("xenbed.blkback")


# ---------------------------------------------------------------------------------------------
# What the frontend asks for (connect_ring in Linux's xen-blkback/xenbus.c)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueConfig:
    """One queue's ring: its grant refs and the frontend's event channel."""

    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True)
class FrontendConfig:
    ring_refs: tuple[int, ...]  # queue 0's (the only one without multi-queue)
    ring_page_order: int
    event_channel: int
    protocol: str
    persistent: bool
    queues: tuple[QueueConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.queues:
            object.__setattr__(self, "queues", (QueueConfig(self.ring_refs, self.event_channel),))


def parse_frontend_config(read, max_ring_page_order: int = MAX_RING_PAGE_ORDER,
                          max_queues: int = MAX_QUEUES) -> FrontendConfig:
    """Read and validate the frontend's connection keys (connect_ring and
    read_per_ring_refs).  `read(key)` returns the value of `<frontend>/<key>`
    or None.  `multi-queue-num-queues` N > 1 (at most `max_queues`): each
    queue's `ring-ref*` and `event-channel` under `queue-<i>/`;
    `ring-page-order` applies to every queue.  Missing or malformed keys
    raise BadNode (-> dev_fatal)."""
    protocol = read("protocol")
    if protocol is None or protocol == "":
        protocol = blkif.PROTOCOL  # native
    if protocol != blkif.XEN_IO_PROTO_ABI_X86_64:
        raise BadNode(errno.ENOSYS, f"unknown fe protocol {protocol!r}")
    queues_text = read("multi-queue-num-queues")
    nqueues = 1 if queues_text is None else read_uint(queues_text, "multi-queue-num-queues")
    if not 1 <= nqueues <= max_queues:
        raise BadNode(errno.ENOSYS, f"guest requested {nqueues} queues, exceeding the maximum of {max_queues}")
    order_text = read("ring-page-order")
    order = 0 if order_text is None else read_uint(order_text, "ring-page-order")
    if order > max_ring_page_order:
        raise BadNode(errno.EINVAL, f"ring-page-order {order} exceeds max-ring-page-order {max_ring_page_order}")

    def per_ring(prefix: str) -> QueueConfig:
        if order_text is None:
            refs = (read_uint(read(f"{prefix}ring-ref"), f"{prefix}ring-ref"),)
        else:
            refs = tuple(read_uint(read(f"{prefix}ring-ref{i}"), f"{prefix}ring-ref{i}") for i in range(1 << order))
        return QueueConfig(refs, read_uint(read(f"{prefix}event-channel"), f"{prefix}event-channel"))

    queues = tuple(per_ring("" if nqueues == 1 else f"queue-{q}/") for q in range(nqueues))
    persistent = read_flag(read("feature-persistent"), "feature-persistent")
    return FrontendConfig(queues[0].ring_refs, order, queues[0].event_channel, protocol, persistent, queues)


# ---------------------------------------------------------------------------------------------
# The data path


# ---------------------------------------------------------------------------------------------
# One connected device: ring + event channel + disk
# ---------------------------------------------------------------------------------------------

class Disk:
    """The backing device, open from the hotplug step's `physical-device`
    until the device is removed (xen_vbd_create .. xen_vbd_free).  A loop
    device gets AUTOCLEAR once open: our close -- or our death -- frees it."""

    def __init__(self, path: str, major: int, minor: int, readonly: bool, discard: bool, direct: bool = True):
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            # O_DIRECT: an acknowledged write has left our page cache for the loop driver (so it is in the
            # image file's cache, visible to anyone reading the file); granted pages are 4 KiB aligned and
            # segments 512-byte aligned, as direct I/O needs.
            fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
            self.direct = direct
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            fd = os.open(path, flags)
            self.direct = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
                raise OSError(errno.ENODEV, f"{path} is not block device {major:x}:{minor:x}")
            if major == loop.LOOP_MAJOR:
                loop.set_autoclear(path, fd)
            size = loop.device_size(fd)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.fd = fd
        self.physical_device = (major, minor)
        self.geometry = DiskGeometry(size // SECTOR_SIZE, readonly, discard and not readonly)

    @classmethod
    def no_media(cls) -> Disk:
        """An empty cdrom drive: 0 sectors, so every request fails validation
        before it could touch a descriptor."""
        disk = cls.__new__(cls)
        disk.path, disk.fd, disk.physical_device, disk.direct = "(no medium)", None, None, False
        disk.geometry = DiskGeometry(0, readonly=True, discard=False)
        return disk

    @classmethod
    def from_fd_for_tests(cls, fd: int, sectors: int, readonly: bool = False, discard: bool = True) -> Disk:
        disk = cls.__new__(cls)
        disk.path, disk.fd, disk.physical_device, disk.direct = f"fd:{fd}", fd, (0, 0), False
        disk.geometry = DiskGeometry(sectors, readonly, discard and not readonly)
        return disk

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RingQueue:
    """One queue of a connected vbd: its mapped ring, bound port, server and
    the worker thread serving them (Linux's xen_blkif_ring and its kthread)."""

    def __init__(self, conn: BlkbackConnection, index: int, queue: QueueConfig) -> None:
        self.conn, self.index = conn, index
        self.name = conn.name if len(conn.config.queues) == 1 else f"{conn.name}/queue-{index}"
        self.ring_mappings: list = []
        self.ring_pages: ContiguousPages | None = None
        self.port: int | None = None
        self.server: BlkifServer | None = None
        self.thread: threading.Thread | None = None
        # Held while requests are served, so a media change never swaps the
        # descriptor under a request.
        self.io_lock = threading.Lock()
        self._open(queue)

    def _open(self, queue: QueueConfig) -> None:
        conn, cfg = self.conn, self.conn.config
        grants = conn.grants
        if cfg.ring_page_order == 0:
            mapping = grants.map(conn.domid, queue.ring_refs[0], False)
            self.ring_mappings.append(mapping)
            buf = mapping.mmap
        else:
            fds = []
            try:
                for ref in queue.ring_refs:
                    handle, _gfn, fd = grants.map_fd(conn.domid, ref, False)
                    self.ring_mappings.append(handle)
                    fds.append(fd)
                self.ring_pages = ContiguousPages(fds)
            finally:
                for fd in fds:
                    os.close(fd)
            buf = self.ring_pages.buf
        ring = BackRing(buf, blkif.RING_ENTRY_SIZE, ring_bytes=XEN_PAGE_SIZE << cfg.ring_page_order)
        self.server = BlkifServer(ring, grants, conn.domid, conn.disk.fd, conn.disk.geometry,
                                  persistent=cfg.persistent, name=self.name)
        self.port = conn.evtchn.bind_interdomain(conn.domid, queue.event_channel)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"blkif-{self.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn = self.conn
        run_ring_thread(self.name, conn.stop, conn.on_fatal, self._serve_ring, (RingOverflow,))

    def _serve_ring(self) -> None:
        conn, evtchn, stop = self.conn, self.conn.evtchn, self.conn.stop
        while not stop.is_set():
            woken = evtchn.wait(self.port, timeout=0.25)  # clears the pending bit before we look
            if self.index == 0:
                conn._check_capacity()  # xen_vbd_resize's check, on every wake (an idle one too)
            if not woken:
                if self.server.pgrants.purge_due():  # an idle ring's grants time out too
                    with self.io_lock:
                        self.server.pgrants.purge()
                continue
            if stop.is_set():
                break
            with self.io_lock:
                notify = self.server.process(stop)
            if notify:
                evtchn.notify(self.port)

    def join(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)
            if self.thread.is_alive():
                log.error("%s: ring thread did not stop", self.name)

    def close(self) -> None:
        conn = self.conn
        if self.server is not None:
            try:
                self.server.ring.push_responses()
            except Exception:
                pass
            self.server.release()
            self.server.ring.release()
        if self.port is not None:
            try:
                conn.evtchn.remove_callbacks(self.port)
                conn.evtchn.close(self.port)
            except Exception as exc:
                log.warning("%s: closing port %d: %s", self.name, self.port, exc)
            self.port = None
        if self.ring_pages is not None:
            self.ring_pages.close()
        for mapping in self.ring_mappings:
            try:
                if isinstance(mapping, int):
                    conn.grants.unmap_handle(mapping)
                else:
                    conn.grants.unmap(mapping)
            except Exception as exc:
                log.warning("%s: unmapping the ring: %s", self.name, exc)
        self.ring_mappings = []


class BlkbackConnection:
    """The live half of a connected vbd: one `RingQueue` per queue the
    frontend asked for (ring, port, worker thread) over the open disk."""

    def __init__(self, name: str, grants, evtchn, domid: int, config: FrontendConfig, disk: Disk, on_fatal):
        self.name = name
        self.grants, self.evtchn = grants, evtchn
        self.domid, self.config = domid, config
        self.on_fatal = on_fatal
        self.stop = threading.Event()
        self.queues: list[RingQueue] = []
        self.disk = disk
        self.geometry = disk.geometry
        # `publish_lock` orders writers of `sectors`.
        self.publish_lock = threading.Lock()
        self.on_resize = None  # called on the ring thread with the new sector count
        try:
            for index, queue in enumerate(config.queues):
                self.queues.append(RingQueue(self, index, queue))
        except BaseException:
            self.close()
            raise

    # queue 0, for callers that know one ring
    @property
    def server(self) -> BlkifServer | None:
        return self.queues[0].server if self.queues else None

    @property
    def port(self) -> int | None:
        return self.queues[0].port if self.queues else None

    @property
    def thread(self) -> threading.Thread | None:
        return self.queues[0].thread if self.queues else None

    def start(self) -> None:
        for queue in self.queues:
            queue.start()

    def _set_disk(self, fd, geometry: DiskGeometry) -> None:
        """Every queue's locks held: the next request of each sees it."""
        self.geometry = geometry
        for queue in self.queues:
            queue.server.fd, queue.server.geometry = fd, geometry

    def _check_capacity(self) -> None:
        """Serve the disk's current size if it changed (a grown loop device),
        then tell `on_resize`.  One ioctl per wake: cheap beside a request."""
        disk = self.disk
        if disk.fd is None or self.stop.is_set():
            return
        try:
            sectors = loop.device_size(disk.fd) // SECTOR_SIZE
        except OSError:
            return
        with self._all_io_locks():
            if self.disk is not disk or sectors == self.geometry.sectors:
                return  # a media change came in between, or nothing changed
            old = self.geometry.sectors
            disk.geometry = replace(self.geometry, sectors=sectors)
            self._set_disk(disk.fd, disk.geometry)
        log.info("%s: %s changed size: %d -> %d sectors", self.name, disk.path, old, sectors)
        if self.on_resize is not None:
            self.on_resize(sectors)

    def _all_io_locks(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for queue in self.queues:
            stack.enter_context(queue.io_lock)
        return stack

    def swap_disk(self, disk: Disk) -> Disk:
        """Serve `disk` from the next request on (a media change); returns the
        old one, which no request uses any more (the caller closes it)."""
        with self._all_io_locks():
            old, self.disk = self.disk, disk
            self._set_disk(disk.fd, disk.geometry)
        return old

    def close(self) -> None:
        """Stop taking requests, let the ones in hand finish, then unmap
        everything, unbind and close the disk (autoclear frees the loop)."""
        self.stop.set()
        for queue in self.queues:
            queue.join()
        for queue in self.queues:
            queue.close()
