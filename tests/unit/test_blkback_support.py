"""In-process stand-ins for the guest API, for blkback unit tests (no tests here): grants
over memfd pages (a read-only grant maps PROT_READ, so the kernel enforces
it as the hypervisor's descriptors do) and event channels as counters."""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

from xenbed.protocols import blkif
from xenbed.protocols.ring import XEN_PAGE_SIZE, FrontRing, SharedRing


class FakeGrantError(PermissionError):
    pass


@dataclass(eq=False)
class FakeMapping:
    handle: int
    mmap: mmap.mmap
    domid: int
    gref: int
    readonly: bool


class FakeGrants:
    """The granting domain's pages and the backend's view of them."""

    def __init__(self, domid: int = 1):
        self.domid = domid
        self.pages: dict[int, tuple[int, bool]] = {}  # gref -> (memfd, readonly)
        self.local: dict[int, mmap.mmap] = {}  # the granter's own mapping of each page
        self.next_gref = 8
        self.next_handle = 1
        self.live: dict[int, FakeMapping] = {}
        self.map_calls = 0
        self.batch_calls = 0  # map_batch and unmap_batch calls
        self.lock = threading.Lock()

    def grant_page(self, readonly: bool = False) -> tuple[int, mmap.mmap]:
        fd = os.memfd_create("page")
        os.ftruncate(fd, XEN_PAGE_SIZE)
        gref = self.next_gref
        self.next_gref += 1
        self.pages[gref] = (fd, readonly)
        self.local[gref] = mmap.mmap(fd, XEN_PAGE_SIZE)
        return gref, self.local[gref]

    def _open(self, domid: int, gref: int, readonly: bool) -> int:
        if domid != self.domid or gref not in self.pages:
            raise FakeGrantError(f"GNTST_bad_gntref: {domid}/{gref}")
        fd, granted_ro = self.pages[gref]
        if granted_ro and not readonly:
            raise FakeGrantError(f"GNTST_permission_denied: gref {gref} is read-only")
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY if readonly else os.O_RDWR)

    def map(self, domid: int, gref: int, readonly: bool = False) -> FakeMapping:
        with self.lock:
            self.map_calls += 1
            fd = self._open(domid, gref, readonly)
            try:
                prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
                m = mmap.mmap(fd, XEN_PAGE_SIZE, mmap.MAP_SHARED, prot)
            finally:
                os.close(fd)
            mapping = FakeMapping(self.next_handle, m, domid, gref, readonly)
            self.live[mapping.handle] = mapping
            self.next_handle += 1
            return mapping

    def map_fd(self, domid: int, gref: int, readonly: bool = False):
        with self.lock:
            self.map_calls += 1
            fd = self._open(domid, gref, readonly)
            handle = self.next_handle
            self.next_handle += 1
            self.live[handle] = None
            return handle, gref, fd

    def map_batch(self, ops) -> list:
        self.batch_calls += 1
        out = []
        for domid, gref, readonly in ops:
            try:
                out.append(self.map(domid, gref, readonly))
            except FakeGrantError as exc:
                out.append(exc)
        return out

    def unmap(self, mapping: FakeMapping) -> None:
        mapping.mmap.close()
        self.unmap_handle(mapping.handle)

    def unmap_batch(self, mappings) -> list[str]:
        self.batch_calls += 1
        for mapping in mappings:
            self.unmap(mapping)
        return ["GNTST_okay"] * len(mappings)

    def unmap_handle(self, handle: int) -> None:
        with self.lock:
            del self.live[handle]


class FakeEvtchn:
    def __init__(self):
        self.cond = threading.Condition()
        self.pending: dict[int, bool] = {}
        self.notified: dict[int, int] = {}
        self.closed: list[int] = []
        self.bound: dict[int, tuple[int, int]] = {}
        self.next_port = 20

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        with self.cond:
            port = self.next_port
            self.next_port += 1
            self.bound[port] = (remote_dom, remote_port)
            self.pending[port] = True  # a new port starts pending
            return port

    def kick(self, port: int) -> None:
        """The frontend's notify."""
        with self.cond:
            self.pending[port] = True
            self.cond.notify_all()

    def wait(self, port: int, timeout: float | None = None) -> bool:
        with self.cond:
            got = self.cond.wait_for(lambda: self.pending.get(port), timeout)
            self.pending[port] = False
            return bool(got)

    def notify(self, port: int) -> None:
        with self.cond:
            self.notified[port] = self.notified.get(port, 0) + 1
            self.cond.notify_all()

    def wait_notified(self, port: int, count: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.notified.get(port, 0) >= count, timeout)

    def pending_fd(self, port: int) -> int | None:
        return None  # no eventfds here: the connection waits with wait()

    def remove_callbacks(self, port: int) -> None:
        pass

    def close(self, port: int) -> None:
        with self.cond:
            self.closed.append(port)
            self.bound.pop(port, None)


class FakeFront:
    """A blkfront's ring over granted pages."""

    def __init__(self, grants: FakeGrants, order: int = 0):
        refs, pages = [], []
        for _ in range(1 << order):
            gref, page = grants.grant_page()
            refs.append(gref)
            pages.append(page)
        self.grants = grants
        self.refs = refs
        self.pages = pages
        if order == 0:
            SharedRing.init(pages[0])
            self.ring = FrontRing(pages[0], blkif.RING_ENTRY_SIZE)
        else:
            self._contig = _Contig([grants.pages[r][0] for r in refs])
            SharedRing.init(self._contig.buf)
            self.ring = FrontRing(self._contig.buf, blkif.RING_ENTRY_SIZE)

    def push(self, *requests) -> None:
        for req in requests:
            self.ring.put_request(req.encode())
        self.ring.push_requests()

    def responses(self) -> list[blkif.BlkifResponse]:
        out = []
        while self.ring.unconsumed_responses():
            out.append(blkif.BlkifResponse.decode(self.ring.take_response()))
        return out


class _Contig:
    def __init__(self, fds):
        from xenbed.drivers.blk.connection import ContiguousPages
        dups = [os.dup(fd) for fd in fds]
        try:
            self.pages = ContiguousPages(dups)
        finally:
            for fd in dups:
                os.close(fd)
        self.buf = self.pages.buf


class InProcessXenstored:
    """The pure xenstored core behind a Unix socket, one thread per client,
    so the real XenStoreClient (and its watches) talk to it."""

    def __init__(self, path: str):
        import socket

        from xenbed.hypervisor.xenstored import XenStore

        self.store = XenStore()
        self.lock = threading.Lock()
        self.socks: dict[int, socket.socket] = {}  # id(conn) -> socket
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock) -> None:
        from xenbed.protocols.xs_wire import PacketReader

        with self.lock:
            conn = self.store.connect(0)
            self.socks[id(conn)] = sock
        reader = PacketReader()
        try:
            while data := sock.recv(65536):
                reader.feed(data)
                while (packet := reader.next_packet()) is not None:
                    with self.lock:
                        reply = self.store.handle(conn, packet)
                        sock.sendall(reply.encode())
                        for target, packets in self.store.take_outgoing():
                            out = self.socks.get(id(target))
                            if out is not None:
                                try:
                                    out.sendall(b"".join(p.encode() for p in packets))
                                except OSError:
                                    pass
        except OSError:
            pass
        finally:
            with self.lock:
                self.store.disconnect(conn)
                self.socks.pop(id(conn), None)
            sock.close()

    def close(self) -> None:
        self.running = False
        self.listener.close()
        with self.lock:
            for sock in self.socks.values():
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
