"""One connected vbd in blkback: the mapped ring, the bound event channel,
the open disk and the thread serving them (Linux's struct xen_blkif and its
ring kthread, xen-blkback/common.h and blkback.c's xen_blkif_schedule).

`Disk` is the backing device, open from the hotplug step's
`physical-device` until the device is removed (Linux's xen_vbd);
`ContiguousPages` maps a multi-page ring side by side (vmap).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass, replace

from xenbed.protocols import blkif
from xenbed.protocols.blkif import SECTOR_SIZE
from xenbed.protocols.ring import XEN_PAGE_SIZE, BackRing, RingOverflow

from xenbed.drivers.xenbus.backend import run_ring_thread
from xenbed.drivers.xenbus.nodes import BadNode, read_flag, read_uint

from . import loop
from .blkback import MAX_RING_PAGE_ORDER, BlkifServer, DiskGeometry

log = logging.getLogger("xenbed.blkback")


# ---------------------------------------------------------------------------------------------
# What the frontend asks for (connect_ring in Linux's xen-blkback/xenbus.c)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrontendConfig:
    ring_refs: tuple[int, ...]
    ring_page_order: int
    event_channel: int
    protocol: str
    persistent: bool


def parse_frontend_config(read, max_ring_page_order: int = MAX_RING_PAGE_ORDER) -> FrontendConfig:
    """Read and validate the frontend's connection keys.  `read(key)` returns
    the value of `<frontend>/<key>` or None (xenbus_gather / read_per_ring_refs).
    Missing or malformed keys raise BadNode (-> dev_fatal)."""
    protocol = read("protocol")
    if protocol is None or protocol == "":
        protocol = blkif.PROTOCOL  # native
    if protocol != blkif.XEN_IO_PROTO_ABI_X86_64:
        raise BadNode(errno.ENOSYS, f"unknown fe protocol {protocol!r}")
    queues = read("multi-queue-num-queues")
    if queues is not None and read_uint(queues, "multi-queue-num-queues") != 1:
        raise BadNode(errno.ENOSYS, f"{queues} queues requested; multi-queue-max-queues is not offered")
    order_text = read("ring-page-order")
    if order_text is None:
        order = 0
        refs = (read_uint(read("ring-ref"), "ring-ref"),)
    else:
        order = read_uint(order_text, "ring-page-order")
        if order > max_ring_page_order:
            raise BadNode(errno.EINVAL, f"ring-page-order {order} exceeds max-ring-page-order "
                                        f"{max_ring_page_order}")
        refs = tuple(read_uint(read(f"ring-ref{i}"), f"ring-ref{i}") for i in range(1 << order))
    port = read_uint(read("event-channel"), "event-channel")
    persistent = read_flag(read("feature-persistent"), "feature-persistent")
    return FrontendConfig(refs, order, port, protocol, persistent)


# ---------------------------------------------------------------------------------------------
# Mapping a multi-page ring contiguously
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_memview_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_memview_from_memory.restype = ctypes.py_object
_memview_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PyBUF_WRITE = 0x200
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


class ContiguousPages:
    """Several page descriptors mapped side by side (vmap of a multi-page
    ring): `buf` is a writable memoryview over all of them."""

    def __init__(self, fds: list[int]):
        self.size = len(fds) * XEN_PAGE_SIZE
        addr = _libc.mmap(None, self.size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "reserving ring address space")
        self.addr = addr
        try:
            for i, fd in enumerate(fds):
                at = _libc.mmap(addr + i * XEN_PAGE_SIZE, XEN_PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
                if at != addr + i * XEN_PAGE_SIZE:
                    raise OSError(ctypes.get_errno(), f"mapping ring page {i}")
        except BaseException:
            _libc.munmap(addr, self.size)
            raise
        self.buf = _memview_from_memory(addr, self.size, _PyBUF_WRITE)

    def close(self) -> None:
        if self.addr is not None:
            self.buf.release()
            _libc.munmap(self.addr, self.size)
            self.addr = None


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


class BlkbackConnection:
    """The live half of a connected vbd: the mapped ring, the bound port, the
    open loop device and the thread serving them."""

    def __init__(self, name: str, grants, evtchn, domid: int, config: FrontendConfig, disk: Disk, on_fatal):
        self.name = name
        self.grants, self.evtchn = grants, evtchn
        self.domid, self.config = domid, config
        self.on_fatal = on_fatal
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.ring_mappings: list = []
        self.ring_pages: ContiguousPages | None = None
        self.port: int | None = None
        self.server: BlkifServer | None = None
        self.disk = disk
        # Held while requests are served, so a media change never swaps the
        # descriptor under a request; `publish_lock` orders writers of `sectors`.
        self.io_lock = threading.Lock()
        self.publish_lock = threading.Lock()
        self.on_resize = None  # called on the ring thread with the new sector count
        try:
            self._open(disk)
        except BaseException:
            self.close()
            raise

    def _open(self, disk: Disk) -> None:
        cfg = self.config
        if cfg.ring_page_order == 0:
            mapping = self.grants.map(self.domid, cfg.ring_refs[0], False)
            self.ring_mappings.append(mapping)
            buf = mapping.mmap
        else:
            fds = []
            try:
                for ref in cfg.ring_refs:
                    handle, _gfn, fd = self.grants.map_fd(self.domid, ref, False)
                    self.ring_mappings.append(handle)
                    fds.append(fd)
                self.ring_pages = ContiguousPages(fds)
            finally:
                for fd in fds:
                    os.close(fd)
            buf = self.ring_pages.buf
        ring = BackRing(buf, blkif.RING_ENTRY_SIZE, ring_bytes=XEN_PAGE_SIZE << cfg.ring_page_order)
        self.server = BlkifServer(ring, self.grants, self.domid, disk.fd, disk.geometry,
                                  persistent=cfg.persistent, name=self.name)
        self.port = self.evtchn.bind_interdomain(self.domid, cfg.event_channel)

    @property
    def geometry(self) -> DiskGeometry:
        return self.server.geometry

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"blkif-{self.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        run_ring_thread(self.name, self.stop, self.on_fatal, self._serve_ring, (RingOverflow,))

    def _serve_ring(self) -> None:
        while not self.stop.is_set():
            woken = self.evtchn.wait(self.port, timeout=0.25)  # clears the pending bit before we look
            self._check_capacity()  # xen_vbd_resize's check, on every wake (an idle one too)
            if not woken:
                continue
            if self.stop.is_set():
                break
            with self.io_lock:
                notify = self.server.process(self.stop)
            if notify:
                self.evtchn.notify(self.port)

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
        with self.io_lock:
            if self.disk is not disk or sectors == self.server.geometry.sectors:
                return  # a media change came in between, or nothing changed
            old = self.server.geometry.sectors
            self.server.geometry = disk.geometry = replace(self.server.geometry, sectors=sectors)
        log.info("%s: %s changed size: %d -> %d sectors", self.name, disk.path, old, sectors)
        if self.on_resize is not None:
            self.on_resize(sectors)

    def swap_disk(self, disk: Disk) -> Disk:
        """Serve `disk` from the next request on (a media change); returns the
        old one, which no request uses any more (the caller closes it)."""
        with self.io_lock:
            old, self.disk = self.disk, disk
            self.server.fd = disk.fd
            self.server.geometry = disk.geometry
        return old

    def close(self) -> None:
        """Stop taking requests, let the one in hand finish, then unmap
        everything, unbind and close the disk (autoclear frees the loop)."""
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)
            if self.thread.is_alive():
                log.error("%s: ring thread did not stop", self.name)
        if self.server is not None:
            try:
                self.server.ring.push_responses()
            except Exception:
                pass
            self.server.release()
            self.server.ring.release()
        if self.port is not None:
            try:
                self.evtchn.remove_callbacks(self.port)
                self.evtchn.close(self.port)
            except Exception as exc:
                log.warning("%s: closing port %d: %s", self.name, self.port, exc)
            self.port = None
        if self.ring_pages is not None:
            self.ring_pages.close()
        for mapping in self.ring_mappings:
            try:
                if isinstance(mapping, int):
                    self.grants.unmap_handle(mapping)
                else:
                    self.grants.unmap(mapping)
            except Exception as exc:
                log.warning("%s: unmapping the ring: %s", self.name, exc)
        self.ring_mappings = []


