"""A domain's own memory, page by page, as a guest kernel's allocator sees it.

Guest memory lives as page files on the hypervisor's tmpfs, which a domain
container does not mount: the only way in is a descriptor the hypervisor
passes over the link (SCM_RIGHTS).  `GuestMemory.alloc` asks for pages
(MEM_ALLOC), maps each descriptor shared and read-write, and closes the
descriptor -- the mapping keeps the page.  A `Page`'s gfn is what a grant
names (`GrantTable.grant(domid, page)`), and what GNTTAB_COPY's local ends
name.

    mem = GuestMemory(link)
    [page] = mem.alloc(1)
    page.mmap[0:5] = b"hello"
    mem.free([page])
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

from xenbed.protocols import hypercall as hc

from .hypercall import HypervisorLink

PAGE_SIZE = 4096
ALLOC_MAX = 64  # MEM_ALLOC's limit per call; alloc() splits larger requests


def map_page_fd(fd: int, readonly: bool = False) -> mmap.mmap:
    """A shared 4 KiB mapping of a page descriptor; the descriptor is closed
    (the mapping keeps the page).  A read-only descriptor refuses a writable
    shared mapping in the kernel (PermissionError): so ask for PROT_READ."""
    try:
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)


@dataclass(eq=False)
class Page:
    """One page of this domain's memory: its guest frame number and a shared,
    writable 4096-byte mapping of it."""

    gfn: int
    mmap: mmap.mmap

    def close(self) -> None:
        """Drop the mapping (buffers taken from it -- rings, memoryviews --
        must be released first)."""
        if not self.mmap.closed:
            self.mmap.close()


class GuestMemory:
    def __init__(self, link: HypervisorLink) -> None:
        self.link = link

    def alloc(self, count: int = 1) -> list[Page]:
        """`count` fresh zeroed pages of this domain (MEM_ALLOC, 64 at a time)."""
        if count < 1:
            raise ValueError(f"allocate at least one page, not {count}")
        pages: list[Page] = []
        try:
            while len(pages) < count:
                pages += self._alloc_some(min(ALLOC_MAX, count - len(pages)))
        except BaseException:
            if pages:
                self.free(pages)
            raise
        return pages

    def alloc_contiguous(self, count: int) -> tuple[list[Page], ContiguousPages]:
        """`count` (<= 64) fresh pages, each mapped as `alloc` does, and all
        of them mapped again side by side: a multi-page ring's buffer."""
        if not 1 <= count <= ALLOC_MAX:
            raise ValueError(f"allocate 1..{ALLOC_MAX} contiguous pages, not {count}")
        kept: list[int] = []
        pages = self._alloc_some(count, keep=kept)
        try:
            return pages, ContiguousPages(kept)
        except BaseException:
            self.free(pages)
            raise
        finally:
            hc.close_fds(kept)

    def _alloc_some(self, count: int, keep: list[int] | None = None) -> list[Page]:
        body, fds = self.link.call_with_fds(hc.Call.MEM_ALLOC, {"count": count})
        gfns = [int(g) for g in body.get("gfns", ())]
        if len(gfns) != len(fds) or len(gfns) != count:
            hc.close_fds(fds)
            raise RuntimeError(f"MEM_ALLOC of {count} answered {len(gfns)} gfns and {len(fds)} descriptors")
        pages, fds = [], list(fds)
        try:
            while fds:
                fd = fds.pop(0)
                if keep is not None:
                    keep.append(os.dup(fd))
                pages.append(Page(gfns[len(pages)], map_page_fd(fd)))
        except BaseException:
            hc.close_fds(fds)
            for page in pages:
                page.close()
            raise
        return pages

    def map(self, gfn: int) -> Page:
        """Map one of this domain's own pages again by gfn (MEM_MAP): another
        process of the domain can reach a page the kernel allocated."""
        _, fds = self.link.call_with_fds(hc.Call.MEM_MAP, {"gfn": int(gfn)})
        if len(fds) != 1:
            hc.close_fds(fds)
            raise RuntimeError(f"MEM_MAP answered {len(fds)} descriptors")
        return Page(int(gfn), map_page_fd(fds[0]))

    def free(self, pages: list[Page]) -> None:
        """Unmap the pages here and give them back (MEM_FREE)."""
        for page in pages:
            page.close()
        if pages:
            self.link.call(hc.Call.MEM_FREE, {"gfns": [page.gfn for page in pages]})


# Several pages side by side (vmap): a multi-page ring, at either end.
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
        self.size = len(fds) * PAGE_SIZE
        addr = _libc.mmap(None, self.size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "reserving ring address space")
        self.addr = addr
        try:
            for i, fd in enumerate(fds):
                at = _libc.mmap(addr + i * PAGE_SIZE, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
                if at != addr + i * PAGE_SIZE:
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

    release = close  # so it can sit among a connection's rings
