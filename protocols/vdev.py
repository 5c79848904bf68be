"""Virtual block device names <-> the numbers written to XenStore (pure).

One copy for both ends: the toolstack turns a disk spec's vdev into the
device id it writes; blkfront names its FUSE file from `virtual-device`
(`number_to_vdev`); the harness predicts either.

A disk's vdev ("xvda", "hdc", "sdb3", "d1p2", or a bare number) becomes the
device id of the vbd: the `<devid>` in `device/vbd/<devid>` and the
`virtual-device` key.  The encoding is xen-vbd-interface(7)
(docs/man/xen-vbd-interface.7.pandoc, formerly misc/vbd-interface.txt):

     1 << 28 | disk << 8 | partition     xvd, disks or partitions 16 onwards
   202 << 8 | disk << 4 | partition      xvd, disks and partitions up to 15
     8 << 8 | disk << 4 | partition      sd, disks and partitions up to 15
     3 << 8 | disk << 6 | partition      hd, disks 0..1, partitions 0..63
    22 << 8 | (disk-2) << 6 | partition  hd, disks 2..3, partitions 0..63

and the name grammar is libxl's (`libxl__device_disk_dev_number`):

- ``xvd<letters>[<partition>]``: letters are a bijective base-26 number
  (a=0 .. z=25, aa=26, .. tq=536), disk < 2**20, partition 1..255;
- ``d<disk>p<partition>``: the same disk and partition, given as numbers;
- ``hd<letter>[<partition>]``: hda..hdd only, partition 1..63;
- ``sd<letter>[<partition>]``: sda..sdp only, partition 1..15;
- a bare number (decimal, 0x hex or 0-prefixed octal, as strtoul base 0)
  that is written as is; it must fit in a C int.

A partition number is never written with a leading zero and "0" is not a
partition: "xvda" is the whole disk.  Linux's old numbers for IDE disks past
hdd and SCSI disks past sdp (majors 33, 34, 65..71, ...) are deprecated by
the interface document and refused by libxl, so they are refused here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "VdevError",
    "Vdev",
    "parse_vdev",
    "vdev_to_number",
    "number_to_vdev",
    "canonical_vdev_number",
    "disk_letters",
    "XVD_MAJOR",
    "SD_MAJOR",
    "HD_MAJOR_0",
    "HD_MAJOR_2",
    "EXTENDED",
]

XVD_MAJOR = 202
SD_MAJOR = 8
HD_MAJOR_0 = 3      # hda, hdb
HD_MAJOR_2 = 22     # hdc, hdd
EXTENDED = 1 << 28  # xvd disks or partitions past 15

INT_MAX = (1 << 31) - 1

# kind: (max disk index, max partition, what it is called)
_LIMITS = {
    "xvd": ((1 << 20) - 1, 255, "Xen virtual disk"),
    "hd": (3, 63, "IDE disk"),
    "sd": (15, 15, "SCSI disk"),
}


class VdevError(ValueError):
    """A vdev name or number xl would refuse; the message says why."""


@dataclass(frozen=True)
class Vdev:
    """A parsed vdev.

    ``kind`` is "xvd", "hd", "sd" or "number" (a bare number from the config
    file, whose disk and partition are not decoded: they are None).
    ``name`` is the text as given; ``number`` the XenStore device id.
    """

    name: str
    kind: str
    disk: int | None
    partition: int | None
    number: int


def disk_letters(index: int) -> str:
    """Disk index -> letters: 0 -> "a", 25 -> "z", 26 -> "aa", 536 -> "tq"."""
    if index < 0:
        raise VdevError(f"disk index {index} is negative")
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


def _letters_index(letters: str) -> int:
    index = -1
    for ch in letters:
        index = (index + 1) * 26 + (ord(ch) - ord("a"))
    return index


_NAME = re.compile(r"(xvd|hd|sd)([^0-9]*)([0-9]*)(.*)", re.DOTALL)
_DP = re.compile(r"d([0-9]+)p([0-9]+)")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def _encode(kind: str, disk: int, partition: int) -> int:
    if kind == "xvd":
        if disk <= 15 and partition <= 15:
            return (XVD_MAJOR << 8) | (disk << 4) | partition
        return EXTENDED | (disk << 8) | partition
    if kind == "hd":
        major = HD_MAJOR_0 if disk < 2 else HD_MAJOR_2
        return (major << 8) | ((disk & 1) << 6) | partition
    return (SD_MAJOR << 8) | (disk << 4) | partition


def _parse_lettered(name: str, kind: str, letters: str, digits: str, junk: str) -> Vdev:
    max_disk, max_part, what = _LIMITS[kind]
    if not letters:
        raise VdevError(f"vdev {name!r}: no disk letter after {kind!r} (e.g. {kind}a)")
    if not re.fullmatch(r"[a-z]+", letters):
        bad = next(ch for ch in letters if not "a" <= ch <= "z")
        hint = " (disk letters are lowercase)" if bad.isalpha() else ""
        raise VdevError(f"vdev {name!r}: {bad!r} is not a disk letter a-z{hint}")
    if junk:
        raise VdevError(f"vdev {name!r}: unexpected {junk!r} after the partition number")
    disk = _letters_index(letters)
    if disk > max_disk:
        last = disk_letters(max_disk)
        extra = ""
        if kind == "hd":
            extra = " (IDE has 4 disks: hda..hdd; use xvd for more)"
        elif kind == "sd":
            extra = (" (sda..sdp; Linux's SCSI numbers past sdp are deprecated by"
                     " xen-vbd-interface(7); use xvd for more disks)")
        raise VdevError(f"vdev {name!r}: {what} {disk} is out of range, the last is"
                        f" {kind}{last} (disk {max_disk}){extra}")
    if not digits:
        partition = 0
    else:
        if digits == "0":
            raise VdevError(f"vdev {name!r}: partition 0 is the whole disk, write"
                            f" {kind}{letters}")
        if digits[0] == "0":
            raise VdevError(f"vdev {name!r}: partition number {digits!r} has a leading zero")
        partition = int(digits)
        if partition > max_part:
            raise VdevError(f"vdev {name!r}: partition {partition} is out of range for"
                            f" {kind} devices (at most {max_part})")
    return Vdev(name, kind, disk, partition, _encode(kind, disk, partition))


def parse_vdev(name: str) -> Vdev:
    """Parse a vdev as libxl does; raise VdevError saying what is wrong."""
    if not isinstance(name, str):
        raise VdevError(f"vdev must be a string, not {type(name).__name__}")
    if name == "":
        raise VdevError("vdev is empty")
    if name != name.strip():
        raise VdevError(f"vdev {name!r}: contains whitespace")

    m = _DP.fullmatch(name)
    if m:
        d, p = m.group(1), m.group(2)
        if (len(d) > 1 and d[0] == "0") or (len(p) > 1 and p[0] == "0"):
            raise VdevError(f"vdev {name!r}: numbers in d<disk>p<partition> take no leading zeros")
        disk, partition = int(d), int(p)
        if disk >= 1 << 20:
            raise VdevError(f"vdev {name!r}: disk {disk} is out of range (at most {(1 << 20) - 1})")
        if partition > 255:
            raise VdevError(f"vdev {name!r}: partition {partition} is out of range (at most 255)")
        return Vdev(name, "xvd", disk, partition, _encode("xvd", disk, partition))
    if re.fullmatch(r"d[0-9]+", name):
        raise VdevError(f"vdev {name!r}: write d<disk>p<partition> (e.g. {name}p0) or an xvd name")

    if _NUMBER.fullmatch(name):
        number = int(name, 0) if not re.fullmatch(r"0[0-7]+", name) else int(name, 8)
        if number > INT_MAX:
            raise VdevError(f"vdev {name!r}: number {number} does not fit in a C int")
        return Vdev(name, "number", None, None, number)

    m = _NAME.fullmatch(name)
    if m:
        return _parse_lettered(name, m.group(1), m.group(2), m.group(3), m.group(4))

    if re.fullmatch(r"[0-9]+.*|0[xX].*", name):
        raise VdevError(f"vdev {name!r}: not a number (decimal, 0x hex or 0 octal)")
    lower = name.lower()
    for kind in ("xvd", "hd", "sd"):
        if lower.startswith(kind):
            raise VdevError(f"vdev {name!r}: device names are lowercase ({kind}...)")
    raise VdevError(f"vdev {name!r}: not a virtual disk name (xvd*, hd*, sd*, d<N>p<M>)"
                    f" nor a device number, see xen-vbd-interface(7)")


def vdev_to_number(name: str) -> int:
    """The XenStore device id for a vdev: "xvda" -> 51712, "hdc" -> 5632."""
    return parse_vdev(name).number


def number_to_vdev(number: int) -> str:
    """The canonical name for a device id, for display.

    Numbers in one of the formats of xen-vbd-interface(7), written the way
    libxl would write them, get their name ("xvda", "xvdq", "hdc1",
    "sdb3"); any other non-negative int is returned in decimal, which
    `vdev_to_number` reads back unchanged.  So
    ``vdev_to_number(number_to_vdev(n)) == n`` for every valid n.
    """
    if isinstance(number, bool) or not isinstance(number, int):
        raise VdevError(f"device number must be an int, not {type(number).__name__}")
    if number < 0 or number > INT_MAX:
        raise VdevError(f"device number {number} is out of range (0..{INT_MAX})")
    major, minor = number >> 8, number & 0xFF
    if EXTENDED <= number < 2 << 28:
        disk, partition = (number >> 8) & 0xFFFFF, number & 0xFF
        if disk > 15 or partition > 15:   # else 202<<8 would have been used
            return "xvd" + disk_letters(disk) + (str(partition) if partition else "")
    elif major == XVD_MAJOR:
        return "xvd" + disk_letters(minor >> 4) + (str(minor & 15) if minor & 15 else "")
    elif major == SD_MAJOR:
        return "sd" + disk_letters(minor >> 4) + (str(minor & 15) if minor & 15 else "")
    elif major in (HD_MAJOR_0, HD_MAJOR_2) and minor < 128:
        disk = (minor >> 6) + (0 if major == HD_MAJOR_0 else 2)
        return "hd" + disk_letters(disk) + (str(minor & 63) if minor & 63 else "")
    return str(number)


def canonical_vdev_number(name: str) -> int:
    """The number of a name as `number_to_vdev` writes it (its exact
    inverse): "xvda", "hdc1", "12345".  The other spellings libxl accepts
    for the same disk ("d0p0", "0xca00", octal "0145000") are refused."""
    number = vdev_to_number(name)
    if number_to_vdev(number) != name:
        raise VdevError(f"vdev {name!r} is not written as {number_to_vdev(number)!r}")
    return number
