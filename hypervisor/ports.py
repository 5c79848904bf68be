"""Event channels at memory speed: the descriptors behind fd-mode ports and
links (docs/hypervisor-socket.md, "Event channels at memory speed").

Xen keeps each port's pending bit in the guest's shared_info page and a send
sets the peer's bit and raises an upcall without a round trip through
anything but the hypervisor.  Here the pending bit of a port whose owner
took the fast path is an eventfd, created by the hypervisor when the port
becomes interdomain-bound:

* the owner gets it (to wait on, and to clear by reading it), and the peer
  gets it too (to send by writing 1), each only through its own link, so a
  port is usable only by the two ends of its channel;
* an eventfd's counter is exactly a pending bit with coalescing: any number
  of writes before a read are one event;
* when the channel closes, the hypervisor closes its own copies and tells
  the survivor (UP_EVTCHN_UNBOUND) to drop both descriptors it holds, so a
  closer that kept a duplicate can no longer wake it; a later bind hands out
  fresh ones.

This module only owns descriptors; sharing.py decides when, with the pure
tables of evtchn.py.  Each fd-mode link also gets a doorbell (an eventfd the
hypervisor rings after every upcall frame it sends, so the domain needs no
thread blocked on the socket) and a send log (protocols/sendlog.py) sealed
against resizing, so a guest cannot truncate it under the hypervisor's
mapping or grow it on the shared tmpfs.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select

from xenbed.protocols import sendlog

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring(fd: int) -> None:
    """Set an eventfd's counter (a pending bit, a doorbell); never blocks."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:  # the counter is at its maximum: it is set, which is all we want
        pass


def is_set(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def drain(fd: int) -> bool:
    """Read (clear) an eventfd; whether it was set."""
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class FastLink:
    """A link's doorbell and send log."""

    def __init__(self, capacity: int = sendlog.DEFAULT_CAPACITY, trace: bool = True) -> None:
        self.doorbell = new_eventfd()
        self.log_fd = os.memfd_create("xenbed-sendlog", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        size = sendlog.size_for(capacity)
        os.ftruncate(self.log_fd, size)
        fcntl.fcntl(self.log_fd, fcntl.F_ADD_SEALS, _SEALS)
        self.log = mmap.mmap(self.log_fd, size)
        sendlog.init(self.log, capacity, trace)
        self.reader = sendlog.Reader(self.log, capacity)

    def descriptors(self) -> list[int]:
        """What HELLO hands over, in order: the doorbell, the send log."""
        return [self.doorbell, self.log_fd]

    def close(self) -> None:
        _close(self.doorbell)
        _close(self.log_fd)
        self.doorbell = self.log_fd = None
        self.log.close()


class PortFds:
    """The pending eventfd of every fd-mode port: (domid, port) -> fd."""

    def __init__(self) -> None:
        self._fds: dict[tuple[int, int], int] = {}

    def open(self, domid: int, port: int, pending: bool = False) -> int:
        """A fresh pending bit for the port (the old one, if any, is closed)."""
        self.close(domid, port)
        fd = self._fds[(domid, port)] = new_eventfd()
        if pending:
            ring(fd)
        return fd

    def get(self, domid: int, port: int) -> int | None:
        return self._fds.get((domid, port))

    def close(self, domid: int, port: int) -> None:
        """Forget the port's descriptor."""
        _close(self._fds.pop((domid, port), None))

    def close_domain(self, domid: int) -> None:
        for key in [k for k in self._fds if k[0] == domid]:
            self.close(*key)

    def __len__(self) -> int:
        return len(self._fds)
