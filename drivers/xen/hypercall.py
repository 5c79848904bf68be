"""The guest side of the hypervisor socket: calls out, upcalls in.

`HypervisorLink` is what a guest kernel or a device process inside a domain
uses in place of hypercall instructions.  Calls block the calling thread until
their reply arrives; a reader thread matches replies to calls by seq and runs
upcall handlers (so a handler must not block for long, as with an interrupt).

Three ways to call:

* `call(op, body)` -> reply body.  Descriptors the reply carries are closed.
* `call_with_fds(op, body)` -> (reply body, descriptors): the caller owns the
  descriptors (MEM_ALLOC's pages, GNTTAB_MAP's page) and must close them.
* `send_oneway(op, body)`: a frame with seq 0, for which the hypervisor sends
  no reply (EVTCHN_SEND, EVTCHN_CLEAR): one write, nothing to wait for.  Frames
  on one link are handled in the order sent, so a oneway frame takes effect
  before any call sent after it.

An upcall handler runs on the reader thread: while it runs no reply can be
delivered, so it must never make a blocking `call` on the same link (it would
wait for a reply only it could deliver); `send_oneway` is fine.

Three ways to read the socket:

* `reader="doorbell"` (the default): no thread sits on the socket.  A caller
  reads its own reply (one reader at a time, under a lock; a reader hands
  any other caller's reply and any upcall it finds to their owners), so a
  call costs one round trip and no thread hand-off.  Upcalls that come
  while nobody reads are announced by the hypervisor on the link's
  doorbell, an eventfd it rings after every upcall frame; a small thread
  waits on the doorbell (and on the socket's hang-up) and pumps them.  The
  HELLO that asks for this also turns on fd-mode event channels
  (drivers/xen/evtchn.py) and hands over the send log (protocols/sendlog.py).
* `reader="thread"`: a reader thread receives every frame and hands replies
  to the calling threads.  Each reply costs a thread hand-off (measured
  ~150 us on a loaded 2-core machine: a PING call takes ~180 us where the
  raw echo takes ~25 us).  Event channels go through UP_EVTCHN upcalls.
* `reader="inline"`: like doorbell (fd-mode event channels included),
  without the doorbell thread: upcalls are handled only while some thread
  waits or pumps, like a driver that polls.
"""

from __future__ import annotations

import array
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from xenbed.protocols import hypercall as hc

from .conn import Waiter, close_socket

log = logging.getLogger("xenbed.hypercall")

DEFAULT_SOCKET = "/run/xenbed/hypervisor.sock"
# Room for descriptors per recvmsg: MEM_ALLOC answers up to 64 pages in one
# frame, and a control buffer too small for a message's descriptors truncates
# them (MSG_CTRUNC), losing pages.  253 is Linux's SCM_MAX_FD.
MAX_FDS_PER_MESSAGE = 253


class HypercallError(Exception):
    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message


class LinkClosed(ConnectionError):
    pass


class HypervisorLink:
    def __init__(self, path: str | None = None, reader: str = "doorbell") -> None:
        if reader not in ("thread", "inline", "doorbell"):
            raise ValueError(f"reader must be 'doorbell', 'thread' or 'inline', not {reader!r}")
        self.inline = reader != "thread"  # callers read their own replies
        self.reader_mode = reader
        self.doorbell: int | None = None  # fd mode: see the module docstring
        self.fd_mode = False  # event channels on eventfds: HELLO said yes to "evtchn": "fd"
        self.sendlog = None  # fd mode: a protocols.sendlog.Writer
        self.sendlog_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._frames = hc.FrameReader()
        self.path = path or os.environ.get("XENBED_HYPERVISOR_SOCKET", DEFAULT_SOCKET)
        self.sock: socket.socket | None = None
        self.domid: int | None = None
        self.name: str | None = None
        self.privilege: str | None = None
        self._seq = itertools.count(1)
        self._pending: dict[int, Waiter] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._handlers: dict[int, Callable[[hc.Frame], None]] = {}
        self._reader: threading.Thread | None = None
        self.closed = threading.Event()
        self.close_reason = ""
        self._close_callbacks: list[Callable[[], None]] = []

    # -- connection ------------------------------------------------------------
    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.sock = sock
        # poll(2), not select(2): a driver holding pages, eventfds and a FUSE
        # device has descriptors past select's 1024.  One poller for the
        # link's life; only the holder of _read_lock uses it.
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.closed.clear()
        if not self.inline:
            self._reader = threading.Thread(target=self._read_loop, name="hypercall-reader", daemon=True)
            self._reader.start()

    def hello(self, credential: str, role: str = "device") -> dict:
        request = {"credential": credential, "role": role}
        if self.inline:  # fd-mode event channels need no reader thread either
            request["evtchn"] = "fd"
        body, fds = self.call_with_fds(hc.Call.HELLO, request)
        self.domid, self.name, self.privilege = body["domid"], body["name"], body["privilege"]
        if body.get("evtchn") == "fd" and len(fds) == 2:
            self.fd_mode = True
            self._start_doorbell(*fds)
        else:
            hc.close_fds(fds)
        return body


    def _start_doorbell(self, doorbell: int, log_fd: int) -> None:
        import mmap

        from xenbed.protocols import sendlog
        try:
            self.sendlog = sendlog.Writer(mmap.mmap(log_fd, 0))
        except (OSError, ValueError) as exc:
            log.warning("the hypervisor's send log is unusable (%s): sends go untraced", exc)
        finally:
            os.close(log_fd)
        if self.reader_mode != "doorbell":
            os.close(doorbell)  # inline: upcalls wait until some thread reads
            return
        self.doorbell = doorbell
        threading.Thread(target=self._doorbell_loop, name="hypercall-doorbell", daemon=True).start()

    def _doorbell_loop(self) -> None:
        """Pump upcalls when the hypervisor rings; notice the link's end
        (POLLRDHUP: the socket hung up, without waking on every reply that
        a caller is about to read itself)."""
        poller = select.poll()
        poller.register(self.doorbell, select.POLLIN)
        poller.register(self.sock, select.POLLRDHUP)
        try:
            while not self.closed.is_set():
                for fd, _events in poller.poll():
                    if fd == self.doorbell:
                        try:
                            os.eventfd_read(self.doorbell)
                        except BlockingIOError:
                            pass
                self._pump_available()
        except (OSError, ValueError):
            pass  # closed under us
        finally:
            self._closed_by(self.close_reason or "link closed")
            try:
                os.close(self.doorbell)
            except OSError:
                pass

    def _readable(self, timeout: float | None) -> bool:  # _read_lock held
        return bool(self._poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def _pump_available(self) -> None:
        """Handle every frame already on the socket, without waiting for more."""
        with self._read_lock:
            while not self.closed.is_set():
                if not self._readable(0) or not self._receive():
                    return

    @classmethod
    def open(cls, credential: str | None = None, role: str = "device", path: str | None = None,
             upcalls: dict | None = None, reader: str = "doorbell") -> HypervisorLink:
        """Connect and authenticate with this container's credential.  Upcall
        handlers are installed before HELLO: the hypervisor may upcall at once.
        `reader`: "doorbell", "thread" or "inline" (see the module docstring)."""
        credential = credential or os.environ.get("XENBED_CREDENTIAL")
        if not credential:
            raise RuntimeError("no credential: XENBED_CREDENTIAL is not set in this container")
        link = cls(path, reader)
        for op, handler in (upcalls or {}).items():
            link.on_upcall(op, handler)
        link.connect()
        try:
            link.hello(credential, role)
        except BaseException:
            link.close()
            raise
        return link

    def close(self) -> None:
        if self.sock is not None:
            close_socket(self.sock)
        self.closed.set()

    def on_upcall(self, op: hc.Call, handler: Callable[[hc.Frame], None]) -> None:
        self._handlers[int(op)] = handler

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` (on the reader thread) once the link is gone, e.g. to
        wake threads waiting for upcalls that will never come."""
        self._close_callbacks.append(callback)

    # -- calls -----------------------------------------------------------------
    def call(self, op: hc.Call, body: dict | None = None, fds: list[int] | None = None, timeout: float = 30.0) -> dict:
        """Call and wait for the reply body; raises HypercallError on an error
        reply.  Descriptors the reply carries are closed (see call_with_fds)."""
        reply = self._call(op, body, fds, timeout)
        hc.close_fds(reply.fds)
        return reply.body

    def call_with_fds(self, op: hc.Call, body: dict | None = None, fds: list[int] | None = None,
                      timeout: float = 30.0) -> tuple[dict, list[int]]:
        """Call and return (reply body, descriptors the reply carried).  The
        caller owns the descriptors and must close them."""
        reply = self._call(op, body, fds, timeout)
        return reply.body, list(reply.fds)

    def send_oneway(self, op: hc.Call, body: dict | None = None) -> None:
        """Send a call with seq 0: the hypervisor answers nothing, not even an
        error (EVTCHN_SEND, EVTCHN_CLEAR).  One write on the socket."""
        sock = self.sock
        if sock is None or self.closed.is_set():
            raise LinkClosed(f"link to {self.path} is closed: {self.close_reason}")
        data = hc.call(op, 0, body).encode()
        with self._send_lock:
            sock.sendall(data)

    def _call(self, op: hc.Call, body: dict | None, fds: list[int] | None, timeout: float) -> hc.Frame:
        if self.sock is None or self.closed.is_set():
            raise LinkClosed(f"link to {self.path} is closed: {self.close_reason}")
        seq = next(self._seq) & 0xFFFFFFFF or next(self._seq)  # 0 means "no reply"
        frame = hc.call(op, seq, body, fds)
        pending = Waiter()
        with self._lock:
            self._pending[seq] = pending
        data = frame.encode()
        try:
            with self._send_lock:
                if fds:
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.sendall(data)
            if not self._await(pending.event.is_set, pending.event, timeout):
                raise TimeoutError(f"{_op_name(op)} got no reply from the hypervisor within {timeout}s")
        except BaseException:
            with self._lock:
                self._pending.pop(seq, None)
            if pending.reply is not None:  # a reply that raced our giving up
                hc.close_fds(pending.reply.fds)
            raise
        with self._lock:
            self._pending.pop(seq, None)
        reply = pending.reply
        if reply is None:
            raise LinkClosed(f"link closed while waiting for {_op_name(op)}: {self.close_reason}")
        if reply.flags & hc.ERROR:
            hc.close_fds(reply.fds)
            raise HypercallError(_op_name(op), reply.body.get("error", "EIO"), reply.body.get("message", ""))
        return reply

    # -- reader ----------------------------------------------------------------
    def _read_loop(self) -> None:
        while self._receive():
            pass

    def _receive(self) -> bool:
        """Read what the socket has (blocking) and dispatch every whole frame.
        False once the link is gone (and everything waiting has been woken)."""
        if self.closed.is_set():
            return False
        try:
            fds = array.array("i")
            data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
            if not data:
                hc.close_fds(fds)
                self._closed_by("the hypervisor closed the link")
                return False
            self._frames.feed(data, list(fds))
            while (frame := self._frames.next_frame()) is not None:
                self._dispatch(frame)
            return True
        except OSError as exc:
            self._closed_by(f"receive failed: {exc}")
        except hc.FrameProtocolError as exc:
            self._closed_by(f"hypervisor broke the protocol: {exc}")
        return False

    def _closed_by(self, reason: str) -> None:
        if self.closed.is_set() and self.close_reason:
            return
        self.close_reason = reason
        self.closed.set()
        hc.close_fds(self._frames.take_stray_fds())
        with self._lock:
            for pending in self._pending.values():
                pending.event.set()
        for callback in self._close_callbacks:
            try:
                callback()
            except Exception:
                log.exception("link close callback failed")

    def _await(self, ready: Callable[[], bool], event: threading.Event | None, timeout: float | None) -> bool:
        """Wait until `ready()`.  Thread mode: on `event`.  Inline mode: read
        the socket ourselves, one thread at a time."""
        if not self.inline:
            return event.wait(timeout) if event is not None else ready()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not self._read_lock.acquire(timeout=-1 if remaining is None else remaining):
                return ready()
            try:
                if ready():
                    return True
                if self.closed.is_set():
                    return False
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if self._readable(remaining):
                    self._receive()
            finally:
                self._read_lock.release()
        return True

    def pump(self, timeout: float | None = 0) -> None:
        """Inline mode: handle what has arrived (upcalls, replies), waiting up
        to `timeout` for something.  Thread mode: nothing to do."""
        if self.inline:
            if self._read_lock.acquire(timeout=-1 if timeout is None else timeout):
                try:
                    if not self.closed.is_set():
                        if self._readable(timeout):
                            self._receive()
                finally:
                    self._read_lock.release()

    def _dispatch(self, frame: hc.Frame) -> None:
        if frame.flags & hc.UPCALL:
            handler = self._handlers.get(frame.op)
            if handler is None:
                log.debug("ignored upcall %s", frame.op_name)
                return
            try:
                handler(frame)
            except Exception:  # an upcall handler's bug must not kill the link
                log.exception("upcall handler for %s failed", frame.op_name)
            return
        with self._lock:
            pending = self._pending.get(frame.seq)
            if pending is not None:
                pending.answer(frame)
        if pending is None:  # nobody waits (timed out): do not leak its descriptors
            hc.close_fds(frame.fds)


def _op_name(op: int) -> str:
    try:
        return hc.Call(op).name
    except ValueError:
        return f"op {op}"


def connect_with_retry(credential: str, role: str, *, path: str | None = None, give_up_after: float | None = None,
                       report: Callable[[str], None] = print, upcalls: dict | None = None,
                       stop: threading.Event | None = None) -> HypervisorLink | None:
    """Keep trying until the hypervisor-service answers and knows our
    credential (the domain may not be created yet: dom0's toolstack does that).
    Returns None if `stop` is set first."""
    started = time.monotonic()
    last_said = 0.0
    while True:
        try:
            return HypervisorLink.open(credential, role, path, upcalls)
        except (OSError, HypercallError) as exc:
            waited = time.monotonic() - started
            if give_up_after is not None and waited > give_up_after:
                raise
            if waited - last_said >= 5 or last_said == 0.0:
                report(f"waiting for the hypervisor to know this domain ({waited:.0f}s): {exc}")
                last_said = waited or 0.001
            if stop is not None and stop.wait(0.2):
                return None
            if stop is None:
                time.sleep(0.2)
