"""What the guest's connections share: the hypervisor link, the store client
and the kernel's module channels each wait for replies by number and close a
Unix socket the same way."""

from __future__ import annotations

import socket
import threading


class Waiter:
    """One caller waiting for its reply: the reader thread `answer`s, or only
    sets `event` when the connection goes (then `reply` stays None)."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply = None

    def answer(self, reply) -> None:
        self.reply = reply
        self.event.set()


def close_socket(sock: socket.socket) -> None:
    """Shut `sock` down, so a thread blocked reading it wakes, then close it;
    a peer that went first is no error."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
