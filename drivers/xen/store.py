"""A XenStore client for code running in a domain, over XENSTORED_PATH.

Like Linux's xenbus_xs.c: one connection, requests tagged with req_id so
replies may come back in any order, a reader thread that routes replies to
their callers and watch events to a separate watch thread (the "xenwatch"
thread), so a watch callback may itself use the store.

Watch events are admitted before they are queued for the xenwatch thread,
as Linux does since XSA-349 (another domain can make events fire on a path
we watch as fast as it likes): a watch may name a `will_handle(path, token)`
filter, and events it refuses are discarded at once (the bus's watch on
`<otherend>/state` wants only that exact path, not `state/x` below it); and
each watch has at most `max_pending` events waiting (default
DEFAULT_MAX_PENDING; the bus's other-end watch: 1, as Linux's
frontend_will_handle(), since its handler re-reads the state anyway).  A
refused or excess event is counted in the watch's `discarded` and in the
client's `discarded_events`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from xenbed.protocols import xs_wire
from xenbed.protocols.xs_wire import Op, Packet

from .conn import Waiter, close_socket

DEFAULT_PATH = "/run/xenstored/socket"
log = logging.getLogger("xenbed.store")


class XenStoreError(Exception):
    """The daemon answered XS_ERROR; `errno_name` is e.g. ENOENT, EACCES."""

    def __init__(self, errno_name: str, op: str, path: str = "") -> None:
        super().__init__(f"{op} {path}: {errno_name}".strip())
        self.errno_name = errno_name
        self.op = op
        self.path = path


class StoreClosed(ConnectionError):
    pass


WatchCallback = Callable[[str, str], None]
DEFAULT_MAX_PENDING = 256  # events one watch may have queued for the xenwatch thread


class Watcher:
    """A watch's callback and its admission rule (Linux's struct
    xenbus_watch: will_handle and nr_pending).  Calling it runs the callback."""

    def __init__(self, callback: WatchCallback, will_handle: Callable[[str, str], bool] | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.callback = callback
        self.will_handle = will_handle
        self.max_pending = max_pending
        self.pending = 0  # queued for the xenwatch thread, not yet taken
        self.discarded = 0

    def admit(self, path: str, token: str) -> bool:
        """Whether an event that just arrived is queued (caller holds the client's lock)."""
        if (self.will_handle is not None and not self.will_handle(path, token)) or self.pending >= self.max_pending:
            self.discarded += 1
            return False
        self.pending += 1
        return True

    def __call__(self, path: str, token: str) -> None:
        self.callback(path, token)


class XenStoreClient:
    def __init__(self, path: str | None = None, *, timeout: float = 30.0) -> None:
        self.path = path or os.environ.get("XENSTORED_PATH", DEFAULT_PATH)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self._req_ids = itertools.count(1)
        self._calls: dict[int, Waiter] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._watches: dict[tuple[str, str], Watcher] = {}
        self._events: queue.Queue = queue.Queue()
        self.discarded_events = 0
        self.closed = threading.Event()
        self.close_reason = ""
        threading.Thread(target=self._read_loop, args=(self.sock,), name="xenbus", daemon=True).start()
        self._watch_thread: threading.Thread | None = threading.Thread(
            target=self._watch_loop, name="xenwatch", daemon=True)
        self._watch_thread.start()

    # -- plumbing ----------------------------------------------------------------
    def request(self, op: Op, payload: bytes, tx: int = 0) -> Packet:
        """Send one request and wait for its reply (raises XenStoreError)."""
        if self.closed.is_set():
            raise StoreClosed(f"store connection {self.path} is closed: {self.close_reason}")
        req_id = next(self._req_ids) & 0xFFFFFFFF
        call = Waiter()
        with self._lock:
            self._calls[req_id] = call
        try:
            with self._send_lock:
                self.sock.sendall(Packet(op, req_id, tx, payload).encode())
            if not call.event.wait(self.timeout):
                raise TimeoutError(f"xenstored did not answer {op.name} within {self.timeout}s")
        finally:
            with self._lock:
                self._calls.pop(req_id, None)
        reply = call.reply
        if reply is None:
            raise StoreClosed(f"store connection closed during {op.name}: {self.close_reason}")
        if reply.is_error():
            path = payload.split(b"\0", 1)[0].decode(errors="replace")
            raise XenStoreError(reply.error_name(), op.name, path)
        return reply

    def _read_loop(self, sock: socket.socket) -> None:
        reader = xs_wire.PacketReader()
        try:
            while data := sock.recv(65536):
                reader.feed(data)
                for packet in reader:
                    if packet.op == Op.WATCH_EVENT:
                        self._admit(packet)
                        continue
                    with self._lock:
                        call = self._calls.get(packet.req_id)
                    if call is not None:
                        call.answer(packet)
            reason = "xenstored closed the connection"
        except (OSError, xs_wire.WireProtocolError) as exc:
            reason = str(exc)
        with self._lock:
            if sock is not self.sock:
                return  # a connection `reconnect` replaced on purpose: its callers were failed there
            self.close_reason = reason
            for call in self._calls.values():
                call.event.set()
            self.closed.set()
        self._events.put(None)

    def _admit(self, packet: Packet) -> None:
        """On the reader thread: queue an event for the xenwatch thread if
        its watch wants it and has room (see the module docstring)."""
        parts = packet.strings()
        if len(parts) < 2:
            return
        path, token = parts[0], parts[1]
        # An event names the path that changed; find the watch by token
        # (tokens are unique per watch in this client).
        with self._lock:
            for (_wpath, wtoken), watcher in self._watches.items():
                if wtoken == token:
                    break
            else:
                return  # a watch already dropped
            if not watcher.admit(path, token):
                self.discarded_events += 1
                return
        self._events.put((watcher, path, token))

    def _watch_loop(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                with self._lock:  # closed for good, unless reconnect() came first
                    if self.closed.is_set():
                        self._watch_thread = None
                        return
                continue
            watcher, path, token = item
            with self._lock:
                watcher.pending -= 1  # taken: a newer event queues again (Linux: before the callback)
                live = watcher in self._watches.values()
            if not live:
                continue  # unwatched since
            try:
                watcher(path, token)
            except Exception:  # one watcher's bug must not stop every other watch
                log.exception("watch callback for %s (token %s) failed", path, token)

    def reconnect(self, path: str | None = None) -> list[str]:
        """Linux's xs_resume, for a domain that resumed elsewhere (or whose
        store moved): a new connection (to `path`, default the same socket),
        then every watch registered again -- each fires once, as a new watch
        does, so callers re-read what they watch.  Requests in flight on the
        old connection fail with StoreClosed; call this while quiescent.
        Returns the watches the new store refused (dropped), as text."""
        old = self.sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path or self.path)
        self.path = path or self.path
        with self._lock, self._send_lock:
            self.sock = sock
            stale = list(self._calls.values())  # requests sent on the old connection: they fail
        for call in stale:
            call.event.set()
        for end in (lambda: old.shutdown(socket.SHUT_RDWR), old.close):
            try:
                end()
            except OSError:
                pass
        # The old connection may have been closed by its xenstored already
        # (the domain left that host): this client is open again.
        with self._lock:
            self.closed.clear()
            self.close_reason = ""
            if self._watch_thread is None:
                self._watch_thread = threading.Thread(target=self._watch_loop, name="xenwatch", daemon=True)
                self._watch_thread.start()
        threading.Thread(target=self._read_loop, args=(sock,), name="xenbus", daemon=True).start()
        refused = []
        for path_, token in list(self._watches):
            try:
                self.request(Op.WATCH, xs_wire.join_strings(path_, token))
            except XenStoreError as exc:  # e.g. EACCES: the path is another domain's on the new store
                with self._lock:
                    self._watches.pop((path_, token), None)
                refused.append(f"{path_} ({exc.errno_name})")
        return refused

    def close(self) -> None:
        close_socket(self.sock)

    def __enter__(self) -> XenStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- operations ----------------------------------------------------------------
    def read(self, path: str, tx: int = 0) -> str:
        return self.request(Op.READ, xs_wire.join_strings(path), tx).payload.decode("utf-8", "surrogateescape")

    def read_bytes(self, path: str, tx: int = 0) -> bytes:
        return self.request(Op.READ, xs_wire.join_strings(path), tx).payload

    def try_read(self, path: str, tx: int = 0, default: str | None = None) -> str | None:
        try:
            return self.read(path, tx)
        except XenStoreError as exc:
            if exc.errno_name == "ENOENT":
                return default
            raise

    def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        self.request(Op.WRITE, xs_wire.join_strings(path) + data, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(Op.MKDIR, xs_wire.join_strings(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(Op.RM, xs_wire.join_strings(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return self.request(Op.DIRECTORY, xs_wire.join_strings(path), tx).strings()

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read_bytes(path, tx)
            return True
        except XenStoreError as exc:
            if exc.errno_name == "ENOENT":
                return False
            raise

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return self.request(Op.GET_PERMS, xs_wire.join_strings(path), tx).strings()

    def set_perms(self, path: str, perms: Iterable[str], tx: int = 0) -> None:
        self.request(Op.SET_PERMS, xs_wire.join_strings(path, *perms), tx)

    def get_domain_path(self, domid: int) -> str:
        return self.request(Op.GET_DOMAIN_PATH, xs_wire.join_strings(str(domid))).strings()[0]

    def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        self.request(Op.INTRODUCE, xs_wire.join_strings(str(domid), str(mfn), str(port)))

    def release(self, domid: int) -> None:
        self.request(Op.RELEASE, xs_wire.join_strings(str(domid)))

    def is_domain_introduced(self, domid: int) -> bool:
        return self.request(Op.IS_DOMAIN_INTRODUCED, xs_wire.join_strings(str(domid))).strings()[0] == "T"

    # -- watches -------------------------------------------------------------------
    def watch(self, path: str, token: str, callback: WatchCallback, *,
              will_handle: Callable[[str, str], bool] | None = None,
              max_pending: int = DEFAULT_MAX_PENDING) -> None:
        """Register a watch; `callback(path, token)` runs on the xenwatch
        thread, first once at once (Xen fires every new watch immediately).
        Events `will_handle(path, token)` refuses, and events beyond
        `max_pending` waiting for this watch, are discarded on arrival."""
        with self._lock:  # the reader thread looks watches up under it
            self._watches[(path, token)] = Watcher(callback, will_handle, max_pending)
        try:
            self.request(Op.WATCH, xs_wire.join_strings(path, token))
        except BaseException:
            with self._lock:
                self._watches.pop((path, token), None)
            raise

    def unwatch(self, path: str, token: str) -> None:
        with self._lock:
            self._watches.pop((path, token), None)
        self.request(Op.UNWATCH, xs_wire.join_strings(path, token))

    # -- transactions --------------------------------------------------------------
    def transaction_start(self) -> int:
        return int(self.request(Op.TRANSACTION_START, b"\0").strings()[0])

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(Op.TRANSACTION_END, xs_wire.join_strings("T" if commit else "F"), tx)

    @contextmanager
    def transaction(self):
        """One attempt: commits on success (EAGAIN propagates), aborts on error."""
        tx = self.transaction_start()
        try:
            yield tx
        except BaseException:
            try:
                self.transaction_end(tx, commit=False)
            except (XenStoreError, StoreClosed):
                pass
            raise
        self.transaction_end(tx, commit=True)

    def run_transaction(self, body: Callable[[int], object], attempts: int = 32):
        """Run `body(tx)` in a transaction, again from the start on EAGAIN,
        as every XenStore user must (the store is optimistic)."""
        for _ in range(attempts):
            try:
                with self.transaction() as tx:
                    result = body(tx)
                return result
            except XenStoreError as exc:
                if exc.errno_name != "EAGAIN":
                    raise
        raise XenStoreError("EAGAIN", "TRANSACTION_END", f"gave up after {attempts} conflicting attempts")
