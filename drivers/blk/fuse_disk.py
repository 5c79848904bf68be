"""The guest's disks as regular files: a pyfuse3 filesystem at /run/xen/vbd.

One file per connected vbd, named by its vdev (xvda, xvdb, hda...): size =
sectors x 512, read/write map to ring requests (front.BlkDisk), fsync to a
cache flush, and a write to a read-only disk is EROFS.  Files are opened with
direct_io, and entry/attribute timeouts are 0, so `dd`, `mkfs.ext4` and
`fsck` see every byte on the ring and the size follows an online resize.

Discard: pyfuse3 3.2 has no fallocate, so a hole punch reaches the ring
through an extended attribute instead:

    setfattr -n user.xenbed.discard -v "<offset> <length>" /run/xen/vbd/xvda

pyfuse3 is trio-based: its main loop runs in a dedicated thread (`start`,
`stop`), and each request is handed to a worker thread
(trio.to_thread.run_sync) because the ring engine blocks.  `add_disk` /
`remove_disk` may be called from any thread.  A file stays open across a
reconnection (migration): its I/O simply waits for the new ring.  After the
disk is removed (closedown), an open file answers EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import threading
import time

import pyfuse3
import trio

log = logging.getLogger("xenbed.blkfront.fuse")

DISCARD_XATTR = b"user.xenbed.discard"
FSNAME = "xenbed-vbd"


class VbdFilesystem(pyfuse3.Operations):
    """`disk` objects need: size, readonly, removed, read(off, len) -> bytes,
    write(off, data) -> int, flush(), discard(off, len) (front.BlkDisk)."""

    enable_writeback_cache = False

    def __init__(self, mountpoint: str) -> None:
        super().__init__()
        self.mountpoint = mountpoint
        self._lock = threading.Lock()
        self._by_name: dict[str, int] = {}  # name -> inode
        self._by_inode: dict[int, tuple[str, object]] = {}  # inode -> (name, disk)
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, object] = {}  # fh -> disk
        self._next_fh = 1
        self._thread: threading.Thread | None = None
        self._token = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._limiter = None
        self.started = time.time()

    # -- disks (any thread) ------------------------------------------------------
    def add_disk(self, name: str, disk) -> None:
        with self._lock:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._by_inode.pop(old, None)
            inode = self._next_inode
            self._next_inode += 1
            self._by_name[name] = inode
            self._by_inode[inode] = (name, disk)
        log.info("%s/%s: %d bytes%s", self.mountpoint, name, disk.size, " (read-only)" if disk.readonly else "")

    def remove_disk(self, name: str) -> None:
        with self._lock:
            inode = self._by_name.pop(name, None)
            if inode is not None:
                self._by_inode.pop(inode, None)
        if inode is not None:
            log.info("%s/%s removed", self.mountpoint, name)

    def resized(self, name: str) -> None:
        """The disk's size (or, on a cdrom, its medium) changed.  Attributes
        time out at once anyway, so the next stat -- through a descriptor
        opened before, too -- asks us again; the kernel's cached attributes
        and pages are dropped as well (FUSE_NOTIFY_INVAL_INODE), so nothing it
        kept about the old size survives.  Safe from a non-FUSE thread: there
        is no writeback cache to flush (pyfuse3's invalidate_inode notes)."""
        with self._lock:
            inode = self._by_name.get(name)
        log.info("%s/%s resized", self.mountpoint, name)
        if inode is None or self._thread is None:
            return
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except OSError as exc:  # ENOENT: the kernel never looked it up, nothing is cached
            log.debug("%s/%s: invalidate_inode: %s", self.mountpoint, name, exc)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    # -- mounting ------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        _clear_stale_mount(self.mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)
        options = set(pyfuse3.default_options)
        options.add(f"fsname={FSNAME}")
        options.add("default_permissions")
        options.discard("allow_other")
        pyfuse3.init(self, self.mountpoint, options)
        self._thread = threading.Thread(target=self._run, name="fuse-vbd", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the FUSE main loop did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            self._error = exc
            log.exception("FUSE main loop failed")
        finally:
            self._ready.set()
            try:
                pyfuse3.close(unmount=True)
            except Exception as exc:
                log.warning("unmounting %s: %s", self.mountpoint, exc)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._limiter = trio.CapacityLimiter(64)
        self._ready.set()
        await pyfuse3.main(min_tasks=4, max_tasks=64)

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount (SIGTERM path): open files get ENOTCONN from then on."""
        if self._thread is None:
            return
        if self._thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            except (trio.RunFinishedError, RuntimeError) as exc:
                log.debug("terminate: %s", exc)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("FUSE loop did not stop; lazy-unmounting %s", self.mountpoint)
            subprocess.run(["umount", "-l", self.mountpoint], check=False)
        self._thread = None

    # -- helpers ---------------------------------------------------------------------
    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        now = time.time_ns()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
        else:
            with self._lock:
                item = self._by_inode.get(inode)
            if item is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            disk = item[1]
            entry.st_mode = stat.S_IFREG | (0o400 if disk.readonly else 0o600)
            entry.st_nlink = 1
            entry.st_size = disk.size
            entry.st_blocks = -(-disk.size // 512)
        entry.st_ino = inode
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_blksize = 4096
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = now
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        entry.generation = 0
        return entry

    def _disk(self, fh: int):
        disk = self._handles.get(fh)
        if disk is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if getattr(disk, "removed", False):
            raise pyfuse3.FUSEError(errno.EIO)
        return disk

    async def _blocking(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code != errno.EROFS:
                log.warning("%s%r: %s", getattr(fn, "__name__", fn), args[:1], exc)
            raise pyfuse3.FUSEError(code) from None

    # -- pyfuse3.Operations ----------------------------------------------------------
    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        with self._lock:
            inode = self._by_name.get(os.fsdecode(name))
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        # A block device ignores O_TRUNC and size changes (dd without
        # conv=notrunc truncates first); times and modes are not kept.
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        with self._lock:
            entries = sorted((inode, name) for name, inode in self._by_name.items())
        for inode, name in entries:
            if inode <= start_id:
                continue
            try:
                attrs = self._attrs(inode)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, inode):
                break

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        with self._lock:
            item = self._by_inode.get(inode)
        if item is None:
            raise pyfuse3.FUSEError(errno.ENOENT if inode != pyfuse3.ROOT_INODE else errno.EISDIR)
        disk = item[1]
        if disk.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = disk
        info = pyfuse3.FileInfo(fh=fh)
        info.direct_io = True
        info.keep_cache = False
        return info

    async def read(self, fh, off, size):
        disk = self._disk(fh)
        return await self._blocking(disk.read, off, size)

    async def write(self, fh, off, buf):
        disk = self._disk(fh)
        return await self._blocking(disk.write, off, buf)

    async def flush(self, fh):
        pass  # close(2) does not flush a block device's cache; fsync does

    async def fsync(self, fh, datasync):
        disk = self._disk(fh)
        await self._blocking(disk.flush)

    async def release(self, fh):
        with self._lock:
            self._handles.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        with self._lock:
            disks = [d for _, d in self._by_inode.values()]
        total = sum(d.size for d in disks)
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(disks) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def setxattr(self, inode, name, value, ctx):
        if name != DISCARD_XATTR:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        with self._lock:
            item = self._by_inode.get(inode)
        if item is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            offset, length = (int(x) for x in value.split())
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if offset < 0 or length < 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._blocking(item[1].discard, offset, length)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []


def _clear_stale_mount(path: str) -> None:
    """A FUSE mount left by a killed blkfront answers ENOTCONN: unmount it."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            log.warning("%s: stale FUSE mount from an earlier run, unmounting", path)
            subprocess.run(["umount", "-l", path], check=False)
    else:
        if os.path.ismount(path):
            with open("/proc/self/mounts") as f:
                if any(line.split()[1] == path and line.split()[0] == FSNAME for line in f):
                    log.warning("%s: FUSE mount from an earlier run, unmounting", path)
                    subprocess.run(["umount", "-l", path], check=False)
