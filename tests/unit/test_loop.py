"""Loop devices: struct loop_info64 packing (pure), physical-device format,
and a real attach/autoclear/detach round trip (needs root and
/dev/loop-control, as the host and dom0 have)."""

from __future__ import annotations

import os
import struct
import time

import pytest

from xenbed.drivers.blk import loop


def test_loop_info64_layout_matches_linux_loop_h():
    assert loop.LOOP_INFO64_SIZE == 232
    info = loop.LoopInfo64(device=1, inode=2, rdevice=3, offset=4, sizelimit=5, number=6,
                           flags=loop.LO_FLAGS_AUTOCLEAR | loop.LO_FLAGS_READ_ONLY, file_name="/img")
    raw = info.pack()
    assert len(raw) == 232
    assert struct.unpack_from("=5Q", raw, 0) == (1, 2, 3, 4, 5)
    assert struct.unpack_from("=I", raw, 40)[0] == 6  # lo_number
    assert struct.unpack_from("=I", raw, 52)[0] == 5  # lo_flags after encrypt_type and key_size
    assert raw[56:60] == b"/img" and raw[60] == 0  # lo_file_name[64]
    assert raw[120:232] == bytes(112)  # crypt name, key, lo_init: zero
    assert loop.LoopInfo64.unpack(raw) == info


def test_file_name_is_truncated_and_nul_terminated():
    raw = loop.LoopInfo64(file_name="/" + "x" * 100).pack()
    assert raw[56 + 63] == 0 and loop.LoopInfo64.unpack(raw).file_name == "/" + "x" * 62


def test_physical_device_is_hex_major_minor():
    assert loop.physical_device(7, 10) == "7:a"
    assert loop.physical_device(259, 0) == "103:0"
    assert loop.parse_physical_device("7:a") == (7, 10)
    for bad in ("7", "7:", ":a", "x:y", ""):
        with pytest.raises(ValueError):
            loop.parse_physical_device(bad)


def _have_loop_control() -> bool:
    return os.geteuid() == 0 and os.path.exists(loop.LOOP_CONTROL)


def test_real_loop_attach_write_autoclear(tmp_path):
    # Real kernel loop devices: the host runs tests as root with /dev/loop-control.
    assert _have_loop_control(), "this test needs root and /dev/loop-control (the xenbed host has both)"
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    dev = loop.attach(str(image), readonly=False)
    try:
        assert dev.major == loop.LOOP_MAJOR and dev.path == f"/dev/loop{dev.minor}"
        info = loop.get_status(dev)
        st = os.stat(image)
        assert (info.device, info.inode) == (st.st_dev, st.st_ino) and not info.readonly
        assert [d.path for d, _ in loop.find_by_backing_file(str(image))] == [dev.path]
        with pytest.raises(loop.FileBusy):
            loop.attach(str(image), readonly=True)  # attached read-write: no second attachment

        fd = os.open(dev.path, os.O_RDWR)
        try:
            loop.set_autoclear(dev, fd)
            assert loop.get_status(dev).autoclear
            assert loop.device_size(fd) == 4 << 20
            os.pwrite(fd, b"through the loop", 3 * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)  # the last close: autoclear detaches
        deadline = time.monotonic() + 5
        while loop.find_by_backing_file(str(image)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.find_by_backing_file(str(image)) == []
        with open(image, "rb") as f:
            f.seek(3 * 4096)
            assert f.read(16) == b"through the loop"
    finally:
        loop.detach(dev)


def test_real_loop_read_only_attachments_share_and_detach(tmp_path):
    assert _have_loop_control(), "this test needs root and /dev/loop-control (the xenbed host has both)"
    image = tmp_path / "ro.img"
    with open(image, "wb") as f:
        f.write(b"R" * (1 << 20))
    a = loop.attach(str(image), readonly=True)
    b = None
    try:
        b = loop.attach(str(image), readonly=True)  # read-only twice is fine
        assert loop.get_status(a).readonly and loop.get_status(b).readonly
        with pytest.raises(loop.FileBusy):
            loop.attach(str(image), readonly=False)
        fd = os.open(a.path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4, 0) == b"RRRR"
        finally:
            os.close(fd)
        st = os.stat(image)
        assert loop.detach_if_backing(a, st.st_dev, st.st_ino + 1) is False  # not ours: left alone
        assert loop.detach_if_backing(a, st.st_dev, st.st_ino) is True
    finally:
        loop.detach(a)
        if b is not None:
            loop.detach(b)
    assert loop.find_by_backing_file(str(image)) == []
