"""Loop devices through the kernel's ioctls (`linux/loop.h`), no losetup.

dom0's "physical" disks are loop devices over image files.  Loop devices
are global to the host kernel -- every container on the engine sees the
same /dev/loop0..N -- so two rules matter:

* Attach with AUTOCLEAR once someone holds the device open: the kernel
  then detaches the loop when its last opener closes it, so a killed dom0
  (whose blkback held the device) leaks nothing.  The hotplug step attaches
  without it (nobody holds the device yet; autoclear would fire at once on
  the first open/close pair); blkback opens the device and then calls
  `set_autoclear`.
* A file attached read-write somewhere must not be attached again
  (`FileBusy`): two writers over one image corrupt it, as Linux's block
  hotplug script refuses with "already in use".

    dev = attach("/var/lib/xenbed/disk.img", readonly=False)
    fd = os.open(dev.path, os.O_RDWR)
    set_autoclear(dev)          # from now on the last close detaches it
    ...
    os.close(fd)                # loop gone

Containers: /dev/loop-control is passed in, but nodes for loop devices
created after the container started are missing: `ensure_node` makes them
with mknod (needs CAP_MKNOD and the cgroup rule 'b 7:* rmw').

Pure parts (struct packing, "%x:%x" physical-device) are unit-tested in
tests/unit/test_loop.py; the rest needs root and /dev/loop-control.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import stat
import struct
import time
from dataclasses import dataclass

__all__ = [
    "LOOP_MAJOR", "LoopError", "FileBusy", "LoopDevice", "LoopInfo64",
    "attach", "detach", "detach_if_backing", "set_autoclear", "get_status", "find_by_backing_file",
    "ensure_node", "physical_device", "parse_physical_device", "device_size", "set_capacity",
]

LOOP_MAJOR = 7
LOOP_CONTROL = "/dev/loop-control"

# linux/loop.h ioctl numbers
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07  # re-read the backing file's size (an online resize)
LOOP_CTL_GET_FREE = 0x4C82

# lo_flags
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# linux/fs.h
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)

# struct loop_info64 {
#   __u64 lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit;
#   __u32 lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags;
#   __u8  lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32];
#   __u64 lo_init[2];
# }   -- 232 bytes, no padding
_LOOP_INFO64 = struct.Struct(f"=5Q4I{LO_NAME_SIZE}s{LO_NAME_SIZE}s{LO_KEY_SIZE}s2Q")
LOOP_INFO64_SIZE = _LOOP_INFO64.size  # 232


class LoopError(OSError):
    """A loop ioctl failed (errno preserved)."""


class FileBusy(LoopError):
    """The backing file is already attached read-write to another loop device
    (or we want it read-write and it is attached at all)."""

    def __init__(self, path: str, devices: list[str]):
        super().__init__(errno.EBUSY, f"{path} is already attached to {', '.join(devices)}")
        self.path = path
        self.devices = devices


@dataclass(frozen=True)
class LoopInfo64:
    """The fields of struct loop_info64 that matter here."""

    device: int = 0  # st_dev of the backing file (r/o)
    inode: int = 0  # st_ino of the backing file (r/o)
    rdevice: int = 0
    offset: int = 0
    sizelimit: int = 0
    number: int = 0  # N of /dev/loopN (r/o)
    flags: int = 0
    file_name: str = ""

    def pack(self) -> bytes:
        name = self.file_name.encode("utf-8", "surrogateescape")[: LO_NAME_SIZE - 1]
        return _LOOP_INFO64.pack(self.device, self.inode, self.rdevice, self.offset, self.sizelimit,
                                 self.number, 0, 0, self.flags, name, b"", b"", 0, 0)

    @classmethod
    def unpack(cls, data: bytes) -> LoopInfo64:
        (device, inode, rdevice, offset, sizelimit, number, _enc_type, _key_size, flags,
         name, _crypt, _key, _i0, _i1) = _LOOP_INFO64.unpack(data[:LOOP_INFO64_SIZE])
        return cls(device, inode, rdevice, offset, sizelimit, number, flags,
                   name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))

    @property
    def readonly(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)


@dataclass(frozen=True)
class LoopDevice:
    path: str  # /dev/loopN
    major: int
    minor: int
    backing_file: str = ""
    readonly: bool = False

    @property
    def number(self) -> int:
        return self.minor

    @property
    def physical_device(self) -> str:
        return physical_device(self.major, self.minor)


def physical_device(major: int, minor: int) -> str:
    """The `physical-device` node as Linux's block script writes it: "%x:%x"
    (loop10 is "7:a")."""
    return f"{major:x}:{minor:x}"


def parse_physical_device(text: str) -> tuple[int, int]:
    """(major, minor) of a "%x:%x" physical-device value; ValueError if malformed."""
    major_s, sep, minor_s = text.strip().partition(":")
    if not sep or not major_s or not minor_s:
        raise ValueError(f"physical-device {text!r} is not major:minor in hex")
    return int(major_s, 16), int(minor_s, 16)


def _ioctl(fd: int, request: int, arg=0, what: str = ""):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise LoopError(exc.errno, f"{what or hex(request)}: {os.strerror(exc.errno)}") from None


def ensure_node(number: int) -> str:
    """/dev/loopN, created with mknod if this container lacks the node."""
    path = f"/dev/loop{number}"
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == LOOP_MAJOR and os.minor(st.st_rdev) == number:
            return path
        raise LoopError(errno.EEXIST, f"{path} exists but is not block device 7:{number}")
    except FileNotFoundError:
        pass
    try:
        os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, number))
    except FileExistsError:  # another attacher made it meanwhile
        pass
    return path


def _get_free() -> int:
    fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        return _ioctl(fd, LOOP_CTL_GET_FREE, 0, "LOOP_CTL_GET_FREE")
    finally:
        os.close(fd)


def get_status(dev: LoopDevice | str | int) -> LoopInfo64:
    """LOOP_GET_STATUS64 of a loop device (path, number or LoopDevice).
    LoopError(ENXIO) when it is not attached."""
    path = _path_of(dev)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _status_fd(fd)
    finally:
        os.close(fd)


def _status_fd(fd: int) -> LoopInfo64:
    buf = bytearray(LOOP_INFO64_SIZE)
    _ioctl(fd, LOOP_GET_STATUS64, buf, "LOOP_GET_STATUS64")
    return LoopInfo64.unpack(bytes(buf))


def _path_of(dev: LoopDevice | str | int) -> str:
    if isinstance(dev, LoopDevice):
        return dev.path
    if isinstance(dev, int):
        return ensure_node(dev)
    return dev


def _attached_numbers() -> list[int]:
    """Numbers of loop devices the kernel has (sysfs is not namespaced for
    block devices, so this lists the host's loops, nodes or not)."""
    numbers = []
    for entry in glob.glob("/sys/block/loop*"):
        suffix = os.path.basename(entry)[4:]
        if suffix.isdigit():
            numbers.append(int(suffix))
    return sorted(numbers)


def find_by_backing_file(path: str) -> list[tuple[LoopDevice, LoopInfo64]]:
    """Every loop device whose backing file is `path`, matched by (st_dev,
    st_ino) from LOOP_GET_STATUS64 -- sysfs's backing_file is a path as the
    attacher's mount namespace saw it, which need not be ours."""
    st = os.stat(path)
    found = []
    for number in _attached_numbers():
        # Only attached devices have /sys/block/loopN/loop; skip the rest cheaply.
        if not os.path.isdir(f"/sys/block/loop{number}/loop"):
            continue
        try:
            info = get_status(number)
        except (LoopError, OSError):
            continue  # detached meanwhile, or a node we may not open
        if info.device == st.st_dev and info.inode == st.st_ino:
            found.append((LoopDevice(f"/dev/loop{number}", LOOP_MAJOR, number, path, info.readonly), info))
    return found


def attach(path: str, readonly: bool = False, *, autoclear: bool = False, attempts: int = 16) -> LoopDevice:
    """Attach `path` to a free loop device.

    Refuses (FileBusy) when `path` is attached read-write anywhere, or at all
    when we want it read-write.  `autoclear=True` sets AUTOCLEAR at once: the
    device then vanishes at its first last-close -- only right when the
    caller already holds it open, so the hotplug step leaves it False.
    """
    path = os.path.abspath(path)
    existing = find_by_backing_file(path)
    clashes = [dev.path for dev, info in existing if not readonly or not info.readonly]
    if clashes:
        raise FileBusy(path, clashes)
    backing = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        for _ in range(attempts):
            number = _get_free()
            node = ensure_node(number)
            loop_fd = os.open(node, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
            try:
                try:
                    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:  # another attacher won this number: next one
                        time.sleep(0.01)
                        continue
                    raise LoopError(exc.errno, f"LOOP_SET_FD {node} <- {path}: {os.strerror(exc.errno)}") from None
                flags = (LO_FLAGS_READ_ONLY if readonly else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
                try:
                    _ioctl(loop_fd, LOOP_SET_STATUS64, LoopInfo64(flags=flags, file_name=path).pack(),
                           "LOOP_SET_STATUS64")
                except BaseException:
                    fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
                    raise
                return LoopDevice(node, LOOP_MAJOR, number, path, readonly)
            finally:
                os.close(loop_fd)
        raise LoopError(errno.EBUSY, f"no free loop device for {path} after {attempts} attempts")
    finally:
        os.close(backing)


def _set_flags(fd: int, set_flags: int, clear_flags: int = 0) -> LoopInfo64:
    info = _status_fd(fd)
    flags = (info.flags | set_flags) & ~clear_flags
    new = LoopInfo64(offset=info.offset, sizelimit=info.sizelimit, flags=flags, file_name=info.file_name)
    _ioctl(fd, LOOP_SET_STATUS64, new.pack(), "LOOP_SET_STATUS64")
    return _status_fd(fd)


def set_autoclear(dev: LoopDevice | str | int, fd: int | None = None) -> None:
    """Turn AUTOCLEAR on: the kernel detaches the device at its last close.
    Pass the caller's open descriptor when it has one (it must stay open, or
    this very call's close would be that last close)."""
    if fd is not None:
        info = _set_flags(fd, LO_FLAGS_AUTOCLEAR)
    else:
        own = os.open(_path_of(dev), os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = _set_flags(own, LO_FLAGS_AUTOCLEAR)
        finally:
            os.close(own)
    if not info.autoclear:
        raise LoopError(errno.EINVAL, f"{_path_of(dev)}: the kernel did not keep LO_FLAGS_AUTOCLEAR")


def detach(dev: LoopDevice | str | int) -> bool:
    """LOOP_CLR_FD.  True if detached (or scheduled: with the device still
    open elsewhere the kernel detaches it at the last close), False if it was
    not attached."""
    return _clear_fd(_path_of(dev), None)


def detach_if_backing(dev: LoopDevice | str | int, st_dev: int, st_ino: int) -> bool:
    """Detach the device only if its backing file is still (st_dev, st_ino).
    Status and detach go through one open descriptor, so the device cannot
    be auto-cleared and reused by someone else between the check and the
    LOOP_CLR_FD.  False if it is not attached or backs something else."""
    return _clear_fd(_path_of(dev), (st_dev, st_ino))


def _clear_fd(path: str, backing: tuple[int, int] | None) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if backing is not None:
            try:
                info = _status_fd(fd)
            except LoopError as exc:
                if exc.errno == errno.ENXIO:
                    return False
                raise
            if (info.device, info.inode) != backing:
                return False
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise LoopError(exc.errno, f"LOOP_CLR_FD {path}: {os.strerror(exc.errno)}") from None
        return True
    finally:
        os.close(fd)


def set_capacity(dev: LoopDevice | str | int, st_dev: int, st_ino: int) -> int:
    """LOOP_SET_CAPACITY: the loop device takes its backing file's current
    size (after the file grew), and its openers -- blkback -- see the new
    BLKGETSIZE64 at once.  Only if the device still backs (st_dev, st_ino):
    status, check and ioctl go through one descriptor, as in
    `detach_if_backing`.  Returns the device's size in bytes afterwards."""
    path = _path_of(dev)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = _status_fd(fd)
        if (info.device, info.inode) != (st_dev, st_ino):
            raise LoopError(errno.ESTALE, f"{path} no longer backs the file it was attached to")
        _ioctl(fd, LOOP_SET_CAPACITY, 0, "LOOP_SET_CAPACITY")
        return device_size(fd)
    finally:
        os.close(fd)


def device_size(fd: int) -> int:
    """Bytes in the block device (BLKGETSIZE64); for a regular file, its size."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf)
    return struct.unpack("=Q", buf)[0]
