"""XenStoreClient over the real xenstored core, in-process, for unit tests.

`StoreHub` owns one `XenStore` (hypervisor/xenstored: the real tree,
permissions, transactions and watches); `hub.connect(domid)` gives an
`InProcessClient`, which *is* a `XenStoreClient` (every operation, the
transaction retry loop and the watch bookkeeping are the real client's);
only `request()` is replaced: the packet goes to `XenStore.handle()`
instead of a socket.  Watch events the core queues (`take_outgoing()`) wait
in one FIFO until the test calls `hub.pump()`, which delivers them to the
clients' callbacks one by one, like the xenwatch thread, until none are
left.  So nothing is mocked: only the transport and the thread are gone.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from xenbed.drivers.xen.store import XenStoreClient, XenStoreError
from xenbed.hypervisor.xenstored import XenStore
from xenbed.protocols.xs_wire import Op, Packet


class InProcessClient(XenStoreClient):
    def __init__(self, hub: StoreHub, domid: int, privileged: bool | None) -> None:
        # Deliberately not calling XenStoreClient.__init__: no socket, no threads.
        self.hub = hub
        self.conn = hub.xs.connect(domid, privileged)
        self.path = f"in-process dom{domid}"
        self.timeout = 0
        self._req_ids = itertools.count(1)
        self._watches = {}
        self._lock = threading.Lock()  # watch()/unwatch() take it, as with the reader thread
        self.requests: list[Packet] = []  # every request, for tests that count writes

    def request(self, op: Op, payload: bytes, tx: int = 0) -> Packet:
        packet = Packet(op, next(self._req_ids) & 0xFFFFFFFF, tx, payload)
        self.requests.append(packet)
        reply = self.hub.xs.handle(self.conn, packet)
        self.hub.collect()
        if reply.is_error():
            path = payload.split(b"\0", 1)[0].decode(errors="replace")
            raise XenStoreError(reply.error_name(), Op(op).name, path)
        return reply

    def deliver(self, path: str, token: str) -> None:
        """What XenStoreClient._watch_loop does with one event."""
        for (_wpath, wtoken), callback in list(self._watches.items()):
            if wtoken == token:
                callback(path, token)

    def close(self) -> None:
        self.hub.xs.disconnect(self.conn)


class StoreHub:
    def __init__(self, xs: XenStore | None = None) -> None:
        self.xs = xs or XenStore()
        self.clients: dict[int, InProcessClient] = {}  # by connection id
        self.events: deque[tuple[InProcessClient, str, str]] = deque()
        self.delivered = 0

    def connect(self, domid: int, privileged: bool | None = None) -> InProcessClient:
        client = InProcessClient(self, domid, privileged)
        self.clients[client.conn.id] = client
        return client

    def collect(self) -> None:
        for conn, packets in self.xs.take_outgoing():
            client = self.clients.get(conn.id)
            if client is None:
                continue
            for p in packets:
                path, token = p.strings()[:2]
                self.events.append((client, path, token))

    def pump(self, limit: int = 10_000) -> int:
        """Deliver queued watch events (and those they cause) until quiet."""
        n = 0
        while self.events:
            if n >= limit:
                raise RuntimeError(f"watch events still flowing after {limit}: a livelock?")
            client, path, token = self.events.popleft()
            client.deliver(path, token)
            n += 1
        self.delivered += n
        return n


class SocketStoreServer:
    """The same core behind real Unix sockets, one per domid, served by
    threads: for tests that use the real `XenStoreClient` with its reader and
    xenwatch threads (a minimal stand-in for the hypervisor's asyncio shell)."""

    def __init__(self, directory: str, xs: XenStore | None = None) -> None:
        import threading

        self.xs = xs or XenStore()
        self.directory = directory
        self._lock = threading.Lock()
        self._socks: dict[int, object] = {}  # conn id -> socket
        self._listeners = []

    def listen(self, domid: int) -> str:
        import os
        import socket
        import threading

        path = os.path.join(self.directory, f"dom{domid}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen()
        self._listeners.append(lsock)
        threading.Thread(target=self._accept, args=(lsock, domid), daemon=True).start()
        return path

    def _accept(self, lsock, domid: int) -> None:
        import threading

        while True:
            try:
                sock, _ = lsock.accept()
            except OSError:
                return
            with self._lock:
                conn = self.xs.connect(domid)
                self._socks[conn.id] = sock
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock, conn) -> None:
        from xenbed.protocols.xs_wire import PacketReader

        reader = PacketReader()
        try:
            while data := sock.recv(65536):
                reader.feed(data)
                for packet in reader:
                    with self._lock:
                        sock.sendall(self.xs.handle(conn, packet).encode())
                        for c, packets in self.xs.take_outgoing():
                            out = self._socks.get(c.id)
                            if out is not None:
                                out.sendall(b"".join(p.encode() for p in packets))
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks.pop(conn.id, None)
                self.xs.disconnect(conn)

    def close(self) -> None:
        for lsock in self._listeners:
            lsock.close()
        with self._lock:
            for sock in self._socks.values():
                sock.close()
