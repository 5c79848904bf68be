"""The kernel <-> module control channel: how a guest's kernel freezes and
thaws its driver modules around a suspend (docs/suspend-resume.md).

A Linux guest suspends with its drivers in the same address space: it
calls every device's `freeze` (dpm_suspend_start), makes the suspend
hypercall, and calls `thaw` / `restore` (dpm_resume_end) with what the
hypercall returned.  Here each driver is a process the kernel started
(modules.py), so the kernel tells them over a channel of their own.

Transport
---------
One `socketpair(AF_UNIX, SOCK_SEQPACKET)` per module process, made by the
kernel when it starts the module; the module's end is inherited (pass_fds)
and named by the environment variable XENBED_KERNEL_CONTROL_FD.  Why a
socketpair rather than signals or a path under /run/xen: it carries
replies and arguments (signals carry neither), nobody else can open it
(no name in the filesystem, no permissions to get right), message
boundaries are kept (SEQPACKET), and either end sees the other's death as
EOF -- a module that crashes mid-freeze is a failed freeze, not a hang.
A restarted module gets a new pair.

Messages
--------
Each packet is one UTF-8 JSON object.

    module -> kernel, once at start:   {"op": "hello", "protocol": 1, "module": NAME, "ops": [...]}
    kernel -> module, a request:       {"seq": N, "op": OP, ...arguments}
    module -> kernel, its answer:      {"seq": N, "ok": true, ...results}
                                       {"seq": N, "ok": false, "error": TEXT}

Requests (protocol 1):

    freeze                          stop issuing new work, keep what is in
                                    flight (the shadow); answer when quiet
    thaw  {"cancelled": true}       the suspend was cancelled: go on as before
                                    on the same rings (xenbus "cancel")
    thaw  {"cancelled": false}      resumed after a save/restore: reconnect
                                    every device to the backends the
                                    toolstack made afresh (xenbus "resume")

Extending it: a request may carry more fields, and a module ignores
fields it does not know.  Live migration will add to `thaw` with
cancelled false: `"hypervisor": PATH` and `"credential": CRED` -- the
socket and identity of the domain on the new host, which the module must
reopen its hypervisor link and store connection with before reconnecting
its devices.  A module lists the ops it takes in its hello; the kernel
sends a module only ops it listed, so a new op never reaches an old
module by surprise.  A module that never says hello (a driver of one's
own that does not use this channel) is not asked at all: it keeps running
through the suspend, as a Linux driver without PM callbacks does.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable

from xenbed.drivers.xen.conn import close_socket

log = logging.getLogger("xenbed.kernel.control")

PROTOCOL = 1
ENV_FD = "XENBED_KERNEL_CONTROL_FD"
MAX_MESSAGE = 64 * 1024
OPS = ("freeze", "thaw")


class ControlError(Exception):
    """A malformed message, a refused request, or a module that went away."""


# -- the codec (pure) ---------------------------------------------------------------------
def encode(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict:
    """One packet -> its object; ControlError if it is not one JSON object
    with the fields its kind needs."""
    try:
        message = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(f"not a JSON control message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError(f"a control message is a JSON object, not {type(message).__name__}")
    if message.get("op") == "hello":
        if not isinstance(message.get("protocol"), int) or not isinstance(message.get("ops"), list):
            raise ControlError(f"hello without protocol/ops: {message}")
        return message
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0:
        raise ControlError(f"control message without a positive seq: {message}")
    if "op" not in message and not isinstance(message.get("ok"), bool):
        raise ControlError(f"neither a request (op) nor an answer (ok): {message}")
    return message


def hello(module: str, ops=OPS) -> dict:
    return {"op": "hello", "protocol": PROTOCOL, "module": module, "ops": list(ops)}


def request(seq: int, op: str, **arguments) -> dict:
    if op not in OPS:
        raise ValueError(f"unknown control op {op!r}")
    return {"seq": seq, "op": op, **arguments}


def answer(seq: int, ok: bool = True, error: str = "", **results) -> dict:
    return {"seq": seq, "ok": ok, **({"error": error} if not ok else {}), **results}


# -- the kernel's end ---------------------------------------------------------------------
class ModuleChannel:
    """The kernel's end of one module's channel.  `pair()` makes the
    socketpair; the child's fd goes to the module through pass_fds and the
    environment.  A reader thread takes the hello and the answers."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.child_fd = child.detach()
        os.set_inheritable(self.child_fd, True)
        self.ops: set[str] = set()
        self.greeted = threading.Event()
        self.closed = threading.Event()
        self._seq = 0
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name=f"control-{module}", daemon=True).start()

    def child_started(self) -> None:
        """The module has its end now: ours of it must go, so that its death
        is our EOF."""
        os.close(self.child_fd)
        self.child_fd = -1

    def close(self) -> None:
        if self.child_fd >= 0:
            os.close(self.child_fd)
            self.child_fd = -1
        close_socket(self.sock)

    def takes(self, op: str) -> bool:
        return op in self.ops

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = decode(data)
            except ControlError as exc:
                log.warning("module %s: %s", self.module, exc)
                continue
            if message.get("op") == "hello":
                self.ops = {op for op in message["ops"] if isinstance(op, str)}
                log.info("module %s takes part in suspend/resume (protocol %s, ops %s)",
                         self.module, message["protocol"], ", ".join(sorted(self.ops)))
                self.greeted.set()
                continue
            with self._cond:
                self._answers[message["seq"]] = message
                self._cond.notify_all()
        with self._cond:
            self.closed.set()
            self._cond.notify_all()

    def call(self, op: str, timeout: float, **arguments) -> dict:
        """Send a request and wait for its answer; ControlError if it is
        refused, the module goes away, or `timeout` passes."""
        with self._cond:
            self._seq += 1
            seq = self._seq
        try:
            self.sock.send(encode(request(seq, op, **arguments)))
        except OSError as exc:
            raise ControlError(f"module {self.module} cannot be told to {op}: {exc}") from None
        with self._cond:
            if not self._cond.wait_for(lambda: seq in self._answers or self.closed.is_set(), timeout):
                raise ControlError(f"module {self.module} did not answer {op} within {timeout:.0f}s")
            message = self._answers.pop(seq, None)
        if message is None:
            raise ControlError(f"module {self.module} went away during {op}")
        if not message.get("ok"):
            raise ControlError(f"module {self.module} refused {op}: {message.get('error', '?')}")
        return message


# -- a module's end -----------------------------------------------------------------------
class KernelControl:
    """A module's end: says hello, then runs `handlers[op](message)` for
    each request in its own thread, one at a time, and answers with what
    the handler returns (a dict of results, or None) or with its error."""

    def __init__(self, sock: socket.socket, module: str, handlers: dict[str, Callable[[dict], dict | None]]) -> None:
        self.sock = sock
        self.module = module
        self.handlers = handlers
        self.sock.send(encode(hello(module, [op for op in OPS if op in handlers])))
        self.thread = threading.Thread(target=self._serve, name="kernel-control", daemon=True)
        self.thread.start()

    @classmethod
    def from_environment(cls, module: str, handlers) -> KernelControl | None:
        """The channel the kernel gave this process, or None when it was not
        started by a kernel that has one (run by hand, in a unit test)."""
        fd_text = os.environ.pop(ENV_FD, "")
        if not fd_text.isdigit():
            return None
        try:
            sock = socket.socket(fileno=int(fd_text))
        except OSError as exc:
            log.warning("%s=%s is not a socket: %s", ENV_FD, fd_text, exc)
            return None
        return cls(sock, module, handlers)

    def _serve(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            try:
                message = decode(data)
            except ControlError as exc:
                log.warning("from the kernel: %s", exc)
                continue
            seq, op = message["seq"], message.get("op")
            handler = self.handlers.get(op)
            if handler is None:
                reply = answer(seq, False, f"{self.module} does not take {op!r}")
            else:
                try:
                    reply = answer(seq, True, **(handler(message) or {}))
                except Exception as exc:
                    log.exception("%s: %s failed", self.module, op)
                    reply = answer(seq, False, f"{type(exc).__name__}: {exc}")
            try:
                self.sock.send(encode(reply))
            except OSError:
                return

    def close(self) -> None:
        close_socket(self.sock)
