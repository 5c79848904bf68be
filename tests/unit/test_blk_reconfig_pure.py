"""Pure parts of block reconfiguration: `xl block-resize`'s size syntax and
blkfront's answer for an empty cdrom drive."""

from __future__ import annotations

import errno

import pytest

from xenbed.drivers.blk.disk import BlkDisk, DiskInfo
from xenbed.protocols.blkif import VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE
from xenbed.toolstack.blk import parse_size

MiB = 1 << 20


@pytest.mark.parametrize("text, size", [
    ("1073741824", 1 << 30),
    ("128M", 128 * MiB), ("128m", 128 * MiB), ("128MiB", 128 * MiB), ("128MB", 128 * MiB), ("128 M", 128 * MiB),
    ("1G", 1 << 30), ("2GiB", 2 << 30), ("1T", 1 << 40),
    ("512k", 512 << 10), ("512K", 512 << 10), ("4096B", 4096), ("1024b", 1024),
])
def test_sizes_take_binary_units(text, size):
    assert parse_size(text) == size


def test_a_plus_grows_the_current_size():
    assert parse_size("+64M", current=64 * MiB) == 128 * MiB
    assert parse_size("+512", current=1024) == 1536


@pytest.mark.parametrize("text", ["", "M", "12X", "1.5G", "-1G", "0", "0M", "100", "+1", "1 G B", "G1"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_size_that_is_not_whole_sectors_says_so():
    with pytest.raises(ValueError, match="512-byte sectors"):
        parse_size("1000")


def test_an_empty_cdrom_drive_answers_enomedium_and_an_empty_disk_eof():
    cdrom = BlkDisk("hdc", engine=None, info=DiskInfo(0, info=VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY))
    with pytest.raises(OSError) as raised:
        cdrom.read(0, 4096)
    assert raised.value.errno == errno.ENOMEDIUM
    with pytest.raises(OSError) as raised:
        cdrom.write(0, b"x")
    assert raised.value.errno == errno.EROFS
    disk = BlkDisk("xvdb", engine=None, info=DiskInfo(0))
    assert disk.read(0, 4096) == b""  # a zero-length disk is merely empty
