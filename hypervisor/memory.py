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

The hot paths keep what they opened: `page_fd` a descriptor per (domain,
gfn, writable) to hand out for grant maps (the receiver gets its own
duplicate), `view` an mmap per page for grant copies.  Both are forgotten
when the page goes (free, populate's removals, the domain's removal), so a
reused gfn is always the new file; each cache is bounded (oldest out first).
"""

from __future__ import annotations

import mmap
import os
import shutil

PAGE_SIZE = 4096
FD_CACHE = 1024  # > twice the largest map batch: a batch never evicts its own descriptors
VIEW_CACHE = 4096


# Page files belong to a uid no container runs as, mode 0600: a process can
# reach a page only through a descriptor the hypervisor passed it.  A guest
# runs without CAP_DAC_OVERRIDE / CAP_FOWNER (compose files), so it cannot
# reopen a read-only grant's descriptor writable through /proc/self/fd, nor
# take a lease on it (F_SETLEASE needs ownership) to stall our open(2).
PAGE_OWNER_UID = int(os.environ.get("XENBED_PAGE_OWNER_UID", "4444"))
_page_owner_refused = False


def _give_to_page_owner(fd: int) -> None:
    global _page_owner_refused
    if _page_owner_refused:
        return
    try:
        os.fchown(fd, PAGE_OWNER_UID, PAGE_OWNER_UID)
    except PermissionError:  # not root (a unit test as a user): pages stay ours
        _page_owner_refused = True


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
        self._fds: dict[tuple[int, int, bool], int] = {}  # (domid, gfn, writable) -> our descriptor
        self._views: dict[tuple[int, int], mmap.mmap] = {}  # (domid, gfn) -> read-write mapping
        os.makedirs(root, exist_ok=True)

    def _dir(self, domid: int) -> str:
        return os.path.join(self.root, f"dom{domid}")

    def _path(self, domid: int, gfn: int) -> str:
        return os.path.join(self._dir(domid), str(gfn))

    def add_domain(self, domid: int, memory_mb: int) -> None:
        path = self._dir(domid)
        # A stale directory (a previous hypervisor run, a reused domid) must
        # not leak its pages into a new domain.
        self._forget_domain(domid)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        self._max_pages[domid] = memory_mb * (1 << 20) // PAGE_SIZE
        self._pages[domid] = set()

    def remove_domain(self, domid: int) -> None:
        self._forget_domain(domid)
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
                    _give_to_page_owner(fd)
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
                _give_to_page_owner(fd)
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
                self._forget(domid, gfn)
                try:
                    os.unlink(self._path(domid, gfn))
                except FileNotFoundError:
                    pass

    def read(self, domid: int, gfn: int, offset: int, length: int) -> bytes:
        return self.view(domid, gfn)[offset:offset + length]

    def write(self, domid: int, gfn: int, offset: int, data: bytes) -> None:
        self.view(domid, gfn)[offset:offset + len(data)] = data

    def copy_many(self, ops, answers, okay: int, failed: int) -> list[int]:
        """The grant table's copy answers carried out: for each op (a struct
        gnttab_copy's ints) whose answer is (okay, src domid, src gfn, dst
        domid, dst gfn), its bytes move; one status per op, `failed` where a
        page could not be reached."""
        # The source is read with pread into the destination's mapping: the
        # kernel moves the bytes, and a page its owner truncated under us
        # gives a short read or EFAULT -- a failed op -- where a copy between
        # two mappings in this process would take a SIGBUS and kill the
        # hypervisor (docs/security.md, "Guest memory").
        views, view, fds, page_fd = self._views, self.view, self._fds, self.page_fd
        preadv = os.preadv
        statuses = []
        for op, answer in zip(ops, answers):
            status = answer[0]
            if status == okay:
                try:
                    source = fds.get((answer[1], answer[2], False)) or page_fd(answer[1], answer[2], False)
                    dest = views.get((answer[3], answer[4])) or view(answer[3], answer[4])
                    soff, doff, length = op[2], op[5], op[6]
                    with memoryview(dest) as whole:
                        if preadv(source, [whole[doff:doff + length]], soff) != length:
                            status = failed  # the source page shrank under us
                except (MemoryError_, OSError, ValueError):
                    status = failed
            statuses.append(status)
        return statuses

    # -- what the hot paths keep open ---------------------------------------------
    def page_fd(self, domid: int, gfn: int, writable: bool) -> int:
        """The page's descriptor, kept open here: send it, never close it."""
        key = (domid, gfn, writable)
        fd = self._fds.get(key)
        if fd is None:
            fd = self.open_page(domid, gfn, writable)
            if len(self._fds) >= FD_CACHE:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[key] = fd
        return fd

    def view(self, domid: int, gfn: int) -> mmap.mmap:
        """A read-write mapping of the page, kept here."""
        key = (domid, gfn)
        view = self._views.get(key)
        if view is None:
            fd = self.open_page(domid, gfn, writable=True)
            try:
                view = mmap.mmap(fd, PAGE_SIZE)
            finally:
                os.close(fd)
            if len(self._views) >= VIEW_CACHE:
                self._views.pop(next(iter(self._views))).close()
            self._views[key] = view
        return view

    def _forget(self, domid: int, gfn: int) -> None:
        for writable in (True, False):
            fd = self._fds.pop((domid, gfn, writable), None)
            if fd is not None:
                os.close(fd)
        view = self._views.pop((domid, gfn), None)
        if view is not None:
            view.close()

    def _forget_domain(self, domid: int) -> None:
        for gfn in {k[1] for k in self._fds if k[0] == domid} | {k[1] for k in self._views if k[0] == domid}:
            self._forget(domid, gfn)
