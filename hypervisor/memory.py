"""Guest memory: each domain's pages are 4 KiB files on the hypervisor's tmpfs.

    /var/lib/xenbed/memory/dom<domid>/<gfn>

Only the hypervisor-service (and privileged dom0) mount this volume.  A domain
gets a page only as a file descriptor passed over its socket: its own pages
read-write, another domain's page after the grant table allowed it, opened
read-only when the grant is read-only -- so a writable mapping of a
read-only grant fails in the kernel (mmap says EACCES), not in our code.

Pages are allocated on demand (a guest that never touches memory costs
nothing); gfns are numbered from 0 and bounded by the domain's memory size.
A page file removed while mapped stays valid for whoever mapped it, as a
backend's mapping outlives a dying guest in Xen.
"""

from __future__ import annotations

import os
import shutil

PAGE_SIZE = 4096


class MemoryError_(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GuestMemory:
    def __init__(self, root: str) -> None:
        self.root = root
        self._max_pages: dict[int, int] = {}
        self._pages: dict[int, set[int]] = {}
        os.makedirs(root, exist_ok=True)

    def _dir(self, domid: int) -> str:
        return os.path.join(self.root, f"dom{domid}")

    def _path(self, domid: int, gfn: int) -> str:
        return os.path.join(self._dir(domid), str(gfn))

    def add_domain(self, domid: int, memory_mb: int) -> None:
        path = self._dir(domid)
        # A stale directory (a previous hypervisor run, a reused domid) must
        # not leak its pages into a new domain.
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        self._max_pages[domid] = memory_mb * (1 << 20) // PAGE_SIZE
        self._pages[domid] = set()

    def remove_domain(self, domid: int) -> None:
        shutil.rmtree(self._dir(domid), ignore_errors=True)
        self._max_pages.pop(domid, None)
        self._pages.pop(domid, None)

    def max_pages(self, domid: int) -> int:
        return self._max_pages[domid]

    def pages(self, domid: int) -> set[int]:
        return set(self._pages.get(domid, ()))

    def has_page(self, domid: int, gfn: int) -> bool:
        return gfn in self._pages.get(domid, ())

    def alloc(self, domid: int, count: int) -> list[tuple[int, int]]:
        """`count` fresh zeroed pages: [(gfn, read-write fd)]; the caller
        sends the fds and closes them."""
        pages = self._pages[domid]
        if count < 1:
            raise MemoryError_("EINVAL", f"cannot allocate {count} pages")
        if len(pages) + count > self._max_pages[domid]:
            raise MemoryError_("ENOMEM", f"dom{domid} has {len(pages)} of {self._max_pages[domid]} pages in use")
        out = []
        gfn = 0
        try:
            while len(out) < count:
                if gfn not in pages:
                    fd = os.open(self._path(domid, gfn), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    os.ftruncate(fd, PAGE_SIZE)
                    pages.add(gfn)
                    out.append((gfn, fd))
                gfn += 1
        except OSError:
            for g, fd in out:
                os.close(fd)
                self.free(domid, [g])
            raise
        return out

    def populate(self, domid: int, gfns, remove=()) -> None:
        """Make exactly these gfns exist (zeroed if new), as a restore does
        before it writes the saved contents; `remove`: gfns the guest freed
        since they were sent (a later pre-copy round)."""
        self.free(domid, [g for g in remove if isinstance(g, int)])
        pages = self._pages[domid]
        wanted = [g for g in dict.fromkeys(gfns) if g not in pages]
        if any(not isinstance(g, int) or not 0 <= g < self._max_pages[domid] for g in wanted):
            raise MemoryError_("EINVAL", f"gfns outside dom{domid}'s {self._max_pages[domid]} pages")
        if len(pages) + len(wanted) > self._max_pages[domid]:
            raise MemoryError_("ENOMEM", f"dom{domid} cannot hold {len(pages) + len(wanted)} pages")
        for gfn in wanted:
            fd = os.open(self._path(domid, gfn), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, PAGE_SIZE)
            finally:
                os.close(fd)
            pages.add(gfn)

    def folder(self, domid: int) -> str:
        return self._dir(domid)

    def open_page(self, domid: int, gfn: int, writable: bool) -> int:
        if not self.has_page(domid, gfn):
            raise MemoryError_("ENOENT", f"dom{domid} has no page {gfn}")
        return os.open(self._path(domid, gfn), os.O_RDWR if writable else os.O_RDONLY)

    def free(self, domid: int, gfns) -> None:
        pages = self._pages.get(domid, set())
        for gfn in gfns:
            if gfn in pages:
                pages.discard(gfn)
                try:
                    os.unlink(self._path(domid, gfn))
                except FileNotFoundError:
                    pass

    def read(self, domid: int, gfn: int, offset: int, length: int) -> bytes:
        fd = self.open_page(domid, gfn, writable=False)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def write(self, domid: int, gfn: int, offset: int, data: bytes) -> None:
        fd = self.open_page(domid, gfn, writable=True)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
