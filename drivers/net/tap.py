"""Tap devices and `ip link`: one module for netback's vifs and netfront's eth0.

    tap = open_tap("vif1.0")                 # TUNSETIFF IFF_TAP|IFF_NO_PI
    set_link(tap.name, mac="fe:ff:ff:ff:ff:ff", mtu=1500, up=True)
    os.write(tap.fd, frame); os.read(tap.fd, 65536)   # one Ethernet frame per call
    tap.close()                              # the interface disappears

netfront's eth0 uses the methods (Linux's xen-netfront registers a
net_device; we have /dev/net/tun):

    tap = open_tap("eth0", nonblocking=False)
    tap.set_mac("00:16:3e:12:34:56"); tap.set_mtu(1500); tap.set_up(True)
    frame = tap.read(timeout=0.5)            # one frame the guest sent, or None
    tap.write(frame)                         # one frame the guest receives

A tap is opened with IFF_TAP | IFF_NO_PI: no packet-information header.
With `vnet_hdr=True` (IFF_VNET_HDR) every read and write starts with a
10-byte virtio_net_hdr (protocols/vnet.py) and `set_offload(csum, tso4,
tso6)` (TUNSETOFFLOAD) lets the kernel hand us checksum-partial and GSO
frames of up to 64 KiB; without it, bare Ethernet frames (no offloads).
It is not persistent: it lives as long as this process keeps the descriptor
open, so a driver that dies leaves no interface behind, and one that stays
alive keeps the same interface (and the guest's addresses on it) across
reconnections.  Only the standard library: MAC, MTU and up/down go through
`ip link` (iproute2 is in every image) and, in a Tap's methods where `ip`
is missing, through the classic SIOCSIF* ioctls.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading

TUN_PATH = "/dev/net/tun"

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETCARRIER = 0x400454E2  # _IOW('T', 226, int), Linux >= 4.17
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
# linux/sockios.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFMTU = 0x8922
SIOCGIFMTU = 0x8921
SIOCSIFHWADDR = 0x8924
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
ARPHRD_ETHER = 1
IFNAMSIZ = 16

MAX_FRAME = 65535 + 14 + 4  # the largest frame a read can return (with a VLAN tag)
MAX_READ = MAX_FRAME + 10  # ... and its virtio_net_hdr
MAX_QUEUES = max(1, min(os.cpu_count() or 1, 8))  # a multi-queue tap's queues (Linux netback: one per CPU)


class LinkError(OSError):
    """An `ip` command or a tap ioctl failed (the message says which)."""


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    return struct.pack(f"{IFNAMSIZ}s", raw) + payload.ljust(24, b"\0")


def open_tap(name: str, *, nonblocking: bool = True, vnet_hdr: bool = False, multi_queue: bool = False) -> Tap:
    """Create (or attach to a free persistent) tap `name`; the kernel may
    complete a name with %d.  Raises LinkError (EBUSY: someone else holds it).
    `multi_queue` (IFF_MULTI_QUEUE): `Tap.open_queues` adds descriptors, and
    the kernel spreads the flows it hands us over them."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    tun_flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
    fd, ifname = _attach(name, flags, tun_flags)
    tap = Tap(ifname or name, fd, vnet_hdr)
    tap.queue_flags = (flags, tun_flags) if multi_queue else None
    return tap


def _attach(name: str, flags: int, tun_flags: int) -> tuple[int, str]:
    ifr = _ifreq(name, struct.pack("H", tun_flags))
    try:
        fd = os.open(TUN_PATH, flags)
    except OSError as exc:
        raise LinkError(exc.errno, f"cannot open {TUN_PATH}: {exc.strerror}") from exc
    try:
        out = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise LinkError(exc.errno, f"TUNSETIFF {name}: {exc.strerror}") from exc
    return fd, out[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def set_offload(fd: int, *, csum: bool = False, tso4: bool = False, tso6: bool = False) -> bool:
    """TUNSETOFFLOAD on a vnet-header tap: what the kernel may hand us
    unfinished (TSO needs csum).  False when the kernel refused."""
    flags = (TUN_F_CSUM if csum else 0) | (TUN_F_TSO4 if csum and tso4 else 0) | (TUN_F_TSO6 if csum and tso6 else 0)
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        return True
    except OSError:
        return False


class Tap:
    """One tap interface, open for as long as this object is; `vnet_hdr`:
    every frame read or written starts with a virtio_net_hdr."""

    def __init__(self, name: str, fd: int, vnet_hdr: bool = False) -> None:
        self.name = name
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.queue_flags: tuple[int, int] | None = None  # (open flags, TUNSETIFF flags) of a multi-queue tap
        self._wlock = threading.Lock()

    # -- frames ----------------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next frame the guest's stack sent out of the interface, or None
        after `timeout` (or when the tap is closed)."""
        if self.closed:
            return None
        try:  # poll, not select: descriptors past 1024 are common in a driver
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        except (OSError, ValueError):
            return None
        if not ready or self.closed:
            return None
        try:
            return os.read(self.fd, MAX_READ)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR, errno.EBADF, errno.EIO):
                return None  # EIO: the interface is down
            raise

    def write(self, frame: bytes | memoryview, *more: bytes | memoryview) -> bool:
        """Hand one frame (in pieces: its vnet header first) to the guest's
        stack.  False when the kernel would not take it (interface down: EIO,
        or a bad frame)."""
        if self.closed:
            return False
        try:
            with self._wlock:
                os.writev(self.fd, (frame, *more)) if more else os.write(self.fd, frame)
            return True
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.EAGAIN, errno.ENOBUFS, errno.EBADF):
                return False
            raise

    # -- configuration -------------------------------------------------------------------
    def set_mac(self, mac: str | bytes) -> None:
        text = mac if isinstance(mac, str) else ":".join(f"{b:02x}" for b in mac)
        if not self._ip("link", "set", "dev", self.name, "address", text):
            raw = bytes(int(x, 16) for x in text.split(":"))
            self._ioctl(SIOCSIFHWADDR, struct.pack("H", ARPHRD_ETHER) + raw)

    def set_mtu(self, mtu: int) -> None:
        if not self._ip("link", "set", "dev", self.name, "mtu", str(int(mtu))):
            self._ioctl(SIOCSIFMTU, struct.pack("i", int(mtu)))

    def set_up(self, up: bool = True) -> None:
        if not self._ip("link", "set", "dev", self.name, "up" if up else "down"):
            flags = struct.unpack_from("H", self._ioctl(SIOCGIFFLAGS), IFNAMSIZ)[0]
            flags = flags | IFF_UP if up else flags & ~IFF_UP
            self._ioctl(SIOCSIFFLAGS, struct.pack("H", flags))

    @property
    def max_queues(self) -> int:
        return MAX_QUEUES if self.queue_flags else 1

    def open_queues(self, count: int) -> list[int]:
        """`count` - 1 more queue descriptors of this multi-queue tap (the
        caller closes them; the first queue is `fd`)."""
        fds: list[int] = []
        try:
            for _ in range(count - 1):
                fds.append(_attach(self.name, *self.queue_flags)[0])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def set_offload(self, *, csum: bool = False, tso4: bool = False, tso6: bool = False) -> bool:
        return self.vnet_hdr and set_offload(self.fd, csum=csum, tso4=tso4, tso6=tso6)

    def set_carrier(self, on: bool) -> bool:
        """TUNSETCARRIER: with the carrier off the stack sends nothing (as a
        netfront without a backend: netif_carrier_off).  False where the
        kernel has no such ioctl."""
        try:
            fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", 1 if on else 0))
            return True
        except OSError:
            return False

    @property
    def mac(self) -> str:
        raw = self._ioctl(SIOCGIFHWADDR)[IFNAMSIZ + 2:IFNAMSIZ + 8]
        return ":".join(f"{b:02x}" for b in raw)

    @property
    def mtu(self) -> int:
        return struct.unpack_from("i", self._ioctl(SIOCGIFMTU), IFNAMSIZ)[0]

    @property
    def is_up(self) -> bool:
        return bool(struct.unpack_from("H", self._ioctl(SIOCGIFFLAGS), IFNAMSIZ)[0] & IFF_UP)

    def ipv4_addresses(self) -> list[str]:
        """The IPv4 addresses on the interface (for gratuitous ARP)."""
        return ipv4_addresses(self.name)

    def close(self) -> None:
        """Close the descriptor: the tap disappears."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self.fd < 0

    # -- plumbing ----------------------------------------------------------------------
    def _ioctl(self, request: int, payload: bytes = b"") -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                return fcntl.ioctl(s.fileno(), request, _ifreq(self.name, payload))
            except OSError as exc:
                raise LinkError(exc.errno, f"ioctl {request:#x} on {self.name}: {exc.strerror}") from exc

    @staticmethod
    def _ip(*args: str) -> bool:
        """Run `ip ARGS`; False when there is no `ip` (use the ioctl then)."""
        if shutil.which("ip") is None:
            return False
        ip(*args)
        return True


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS...`; stdout, or LinkError (EINVAL) with ip's message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise LinkError(errno.EINVAL, f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
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


def ipv4_addresses(ifname: str) -> list[str]:
    """IPv4 addresses of `ifname` (`ip -j -4 addr`; SIOCGIFADDR for the
    primary one where `ip` is missing)."""
    ip = shutil.which("ip")
    if ip is not None:
        done = subprocess.run([ip, "-j", "-4", "addr", "show", "dev", ifname], capture_output=True, text=True,
                              timeout=10)
        if done.returncode != 0:
            return []
        return parse_ip_addr_json(done.stdout)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            out = fcntl.ioctl(s.fileno(), SIOCGIFADDR, _ifreq(ifname))
        except OSError:
            return []
    return [socket.inet_ntoa(out[IFNAMSIZ + 4:IFNAMSIZ + 8])]


def parse_ip_addr_json(text: str) -> list[str]:
    """The "inet" addresses in `ip -j addr show` output."""
    try:
        links = json.loads(text or "[]")
    except ValueError:
        return []
    out = []
    for link in links if isinstance(links, list) else []:
        for info in link.get("addr_info", ()) if isinstance(link, dict) else ():
            if info.get("family") == "inet" and info.get("local"):
                try:
                    out.append(str(ipaddress.IPv4Address(info["local"])))
                except ValueError:
                    pass
    return out
