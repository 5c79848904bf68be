"""The guest side of the hypervisor socket: calls out, upcalls in.

`HypervisorLink` is what a guest kernel or a device process inside a domain
uses in place of hypercall instructions.  Calls block the calling thread until
their reply arrives; a reader thread matches replies to calls by seq and runs
upcall handlers (so a handler must not block for long, as with an interrupt).
"""

from __future__ import annotations

import array
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from xenbed.protocols import hypercall as hc

log = logging.getLogger("xenbed.hypercall")

DEFAULT_SOCKET = "/run/xenbed/hypervisor.sock"
MAX_FDS_PER_MESSAGE = 8


class HypercallError(Exception):
    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message


class LinkClosed(ConnectionError):
    pass


class _Pending:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frame: hc.Frame | None = None


class HypervisorLink:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get("XENBED_HYPERVISOR_SOCKET", DEFAULT_SOCKET)
        self.sock: socket.socket | None = None
        self.domid: int | None = None
        self.name: str | None = None
        self.privilege: str | None = None
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._handlers: dict[int, Callable[[hc.Frame], None]] = {}
        self._reader: threading.Thread | None = None
        self.closed = threading.Event()
        self.close_reason = ""

    # -- connection ------------------------------------------------------------
    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.sock = sock
        self.closed.clear()
        self._reader = threading.Thread(target=self._read_loop, name="hypercall-reader", daemon=True)
        self._reader.start()

    def hello(self, credential: str, role: str = "device") -> dict:
        body = self.call(hc.Call.HELLO, {"credential": credential, "role": role})
        self.domid, self.name, self.privilege = body["domid"], body["name"], body["privilege"]
        return body

    @classmethod
    def open(cls, credential: str | None = None, role: str = "device", path: str | None = None,
             upcalls: dict | None = None) -> HypervisorLink:
        """Connect and authenticate with this container's credential.  Upcall
        handlers are installed before HELLO: the hypervisor may upcall at once."""
        credential = credential or os.environ.get("XENBED_CREDENTIAL")
        if not credential:
            raise RuntimeError("no credential: XENBED_CREDENTIAL is not set in this container")
        link = cls(path)
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
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        self.closed.set()

    def on_upcall(self, op: hc.Call, handler: Callable[[hc.Frame], None]) -> None:
        self._handlers[int(op)] = handler

    # -- calls -----------------------------------------------------------------
    def call(self, op: hc.Call, body: dict | None = None, fds: list[int] | None = None, timeout: float = 30.0) -> dict:
        if self.sock is None or self.closed.is_set():
            raise LinkClosed(f"link to {self.path} is closed: {self.close_reason}")
        seq = next(self._seq)
        frame = hc.call(op, seq, body, fds)
        pending = _Pending()
        with self._lock:
            self._pending[seq] = pending
        data = frame.encode()
        try:
            with self._send_lock:
                if fds:
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.sendall(data)
            if not pending.event.wait(timeout):
                raise TimeoutError(f"{hc.Call(op).name} got no reply from the hypervisor within {timeout}s")
        finally:
            with self._lock:
                self._pending.pop(seq, None)
        reply = pending.frame
        if reply is None:
            raise LinkClosed(f"link closed while waiting for {hc.Call(op).name}: {self.close_reason}")
        if reply.flags & hc.Flag.ERROR:
            raise HypercallError(hc.Call(op).name, reply.body.get("error", "EIO"), reply.body.get("message", ""))
        return reply.body

    # -- reader ----------------------------------------------------------------
    def _read_loop(self) -> None:
        reader = hc.FrameReader()
        try:
            while True:
                fds = array.array("i")
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize))
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                if not data:
                    self.close_reason = "the hypervisor closed the link"
                    break
                reader.feed(data, list(fds))
                while (frame := reader.next_frame()) is not None:
                    self._dispatch(frame)
        except OSError as exc:
            self.close_reason = f"receive failed: {exc}"
        except hc.FrameProtocolError as exc:
            self.close_reason = f"hypervisor broke the protocol: {exc}"
        finally:
            self.closed.set()
            with self._lock:
                for pending in self._pending.values():
                    pending.event.set()

    def _dispatch(self, frame: hc.Frame) -> None:
        if frame.flags & hc.Flag.UPCALL:
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
        if pending is None:
            for fd in frame.fds:
                os.close(fd)
            return
        pending.frame = frame
        pending.event.set()


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
