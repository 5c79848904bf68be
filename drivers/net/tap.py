"""Tap devices and `ip link`, kept small and generic (netback and netfront share it).

    tap = open_tap("vif1.0")               # the fd is the device: closing it removes the tap
    set_link(tap.name, mac="fe:ff:ff:ff:ff:ff", mtu=1500, up=True)
    os.write(tap.fd, frame); os.read(tap.fd, 65536)   # one Ethernet frame per call
    tap.close()

A tap is opened with IFF_TAP | IFF_NO_PI: reads and writes are bare Ethernet
frames, no packet-information header, no virtio-net header (no offloads).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class LinkError(OSError):
    """An `ip` command failed (its stderr is the message)."""


@dataclass(eq=False)
class Tap:
    fd: int
    name: str

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd


def open_tap(name: str, *, nonblocking: bool = True) -> Tap:
    """Create (or attach to a free persistent) tap `name`; the kernel may
    complete a name with %d.  Raises OSError (EBUSY: someone else holds it)."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    fd = os.open(TUN_PATH, flags)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return Tap(fd, ifr[:16].split(b"\0", 1)[0].decode())


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS...`; stdout, or LinkError with ip's message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LinkError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def set_link(name: str, *, mac: str | None = None, mtu: int | None = None, master: str | None = None,
             nomaster: bool = False, up: bool | None = None) -> None:
    """`ip link set dev NAME ...` for the given attributes (one command)."""
    args = ["link", "set", "dev", name]
    if mac is not None:
        args += ["address", mac]
    if mtu is not None:
        args += ["mtu", str(int(mtu))]
    if master is not None:
        args += ["master", master]
    if nomaster:
        args += ["nomaster"]
    if up is not None:
        args += ["up" if up else "down"]
    if len(args) > 4:
        ip(*args)


def link_master(name: str) -> str | None:
    """The bridge `name` is enslaved to, or None."""
    path = f"/sys/class/net/{name}/master"
    return os.path.basename(os.readlink(path)) if os.path.islink(path) else None
