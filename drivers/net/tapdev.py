"""netfront's tap: the guest's `eth0` is a tap device whose other side is
netfront (Linux's xen-netfront registers a net_device; we have /dev/net/tun).

    tap = TapDevice.open("eth0")          # TUNSETIFF IFF_TAP|IFF_NO_PI
    tap.set_mac("00:16:3e:12:34:56"); tap.set_mtu(1500); tap.set_up(True)
    frame = tap.read(timeout=0.5)         # one Ethernet frame the guest sent, or None
    tap.write(frame)                      # one frame the guest receives
    tap.close()                           # the interface disappears

Only the standard library: the fd is opened with TUNSETIFF; MAC, MTU and
up/down are set with `ip link` (iproute2 is in every image) and, where `ip`
is missing, with the classic SIOCSIF* ioctls.  The tap is not persistent:
it lives as long as this process keeps the descriptor open, so a netfront
that dies leaves no interface behind, and one that stays alive keeps the
same interface (and the guest's addresses on it) across reconnections.

This is netfront's own helper; dom0's netback has its own (drivers/net/tap.py).
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
TUNSETPERSIST = 0x400454CB
TUNSETCARRIER = 0x400454E2  # _IOW('T', 226, int), Linux >= 4.17
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
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


class TapError(OSError):
    pass


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    return struct.pack(f"{IFNAMSIZ}s", raw) + payload.ljust(24, b"\0")


class TapDevice:
    """One tap interface, open for as long as this object is."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self._closed = False
        self._wlock = threading.Lock()

    @classmethod
    def open(cls, name: str, *, persist: bool = False) -> TapDevice:
        """Create (or attach to) tap `name`: TUNSETIFF IFF_TAP|IFF_NO_PI."""
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(exc.errno, f"cannot open {TUN_PATH}: {exc.strerror}") from exc
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TAP | IFF_NO_PI).ljust(40, b"\0")
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
            real = out[:IFNAMSIZ].rstrip(b"\0").decode()
            if persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError as exc:
            os.close(fd)
            raise TapError(exc.errno, f"TUNSETIFF {name}: {exc.strerror}") from exc
        return cls(real or name, fd)

    # -- frames ----------------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next frame the guest's stack sent out of the interface, or None
        after `timeout` (or when the tap is closed)."""
        if self._closed:
            return None
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        except (OSError, ValueError):
            return None
        if not ready or self._closed:
            return None
        try:
            return os.read(self.fd, MAX_FRAME)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR, errno.EBADF, errno.EIO):
                return None  # EIO: the interface is down
            raise

    def write(self, frame: bytes | memoryview) -> bool:
        """Hand one frame to the guest's stack.  False when the kernel would
        not take it (interface down: EIO, or a bad frame)."""
        if self._closed:
            return False
        try:
            with self._wlock:
                os.write(self.fd, frame)
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
        """Close the descriptor: a non-persistent tap disappears."""
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    # -- plumbing ----------------------------------------------------------------------
    def _ioctl(self, request: int, payload: bytes = b"") -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                return fcntl.ioctl(s.fileno(), request, _ifreq(self.name, payload))
            except OSError as exc:
                raise TapError(exc.errno, f"ioctl {request:#x} on {self.name}: {exc.strerror}") from exc

    @staticmethod
    def _ip(*args: str) -> bool:
        """Run `ip ARGS`; False when there is no `ip` (use the ioctl then)."""
        ip = shutil.which("ip")
        if ip is None:
            return False
        done = subprocess.run([ip, *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise TapError(errno.EINVAL, f"ip {' '.join(args)}: {done.stderr.strip()}")
        return True


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
