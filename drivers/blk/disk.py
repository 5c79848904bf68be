"""The disk a guest sees (blkfront's gendisk): what the backend advertises
(`DiskInfo`), and the byte-addressed file FUSE serves (`BlkDisk`) on top of
the ring engine (front_engine.py)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass

from xenbed.drivers.xenbus.nodes import feature_flag, read_int
from xenbed.protocols.blkif import SECTOR_SIZE, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE
from xenbed.protocols.ring import XEN_PAGE_SIZE

from .front_engine import BlkfrontEngine


def align_span(offset: int, length: int, block: int = SECTOR_SIZE) -> tuple[int, int]:
    """[start, end) of the whole `block`s that cover offset..offset+length."""
    if offset < 0 or length < 0 or block <= 0:
        raise ValueError(f"bad span: offset {offset}, length {length}, block {block}")
    start = offset - offset % block
    end = -(-(offset + length) // block) * block
    return start, end


class RangeLock:
    """Byte ranges held exclusively: a read-modify-write of a partial block
    must not interleave with another write to the same block."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    def _overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._held)

    def acquire(self, start: int, end: int, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._overlaps(start, end), timeout):
                return False
            self._held.append((start, end))
            return True

    def release(self, start: int, end: int) -> None:
        with self._cond:
            self._held.remove((start, end))
            self._cond.notify_all()

    def held(self) -> list[tuple[int, int]]:
        with self._cond:
            return list(self._held)

    class _Held:
        def __init__(self, lock: RangeLock, start: int, end: int) -> None:
            self.lock, self.start, self.end = lock, start, end

        def __enter__(self) -> None:
            self.lock.acquire(self.start, self.end)

        def __exit__(self, *exc) -> None:
            self.lock.release(self.start, self.end)

    def locked(self, start: int, end: int) -> RangeLock._Held:
        return RangeLock._Held(self, start, end)


@dataclass(frozen=True)
class DiskInfo:
    """What the backend advertises when Connected (xenstore keys in comments)."""

    sectors: int  # sectors: disk size in 512-byte units
    sector_size: int = SECTOR_SIZE  # sector-size: logical block size
    info: int = 0  # info: VDISK_* bits
    flush: bool = False  # feature-flush-cache
    barrier: bool = False  # feature-barrier
    discard: bool = False  # feature-discard
    discard_granularity: int = SECTOR_SIZE
    discard_alignment: int = 0
    discard_secure: bool = False
    persistent: bool = False  # feature-persistent
    max_indirect_segments: int = 0  # feature-max-indirect-segments

    @property
    def readonly(self) -> bool:
        return bool(self.info & (VDISK_READONLY | VDISK_CDROM))

    @property
    def cdrom(self) -> bool:
        return bool(self.info & VDISK_CDROM)

    @property
    def removable(self) -> bool:
        return bool(self.info & VDISK_REMOVABLE)

    @property
    def size(self) -> int:
        return self.sectors * SECTOR_SIZE

    @classmethod
    def parse(cls, read: Callable[[str], str | None]) -> DiskInfo:
        """From the backend's nodes; `read(key)` -> value or None."""
        sectors = read_int(read("sectors"), -1)
        if sectors < 0:
            raise ValueError("backend has no valid 'sectors'")
        sector_size = read_int(read("sector-size"), SECTOR_SIZE) or SECTOR_SIZE
        if sector_size % SECTOR_SIZE or sector_size > XEN_PAGE_SIZE or sector_size & (sector_size - 1):
            raise ValueError(f"unsupported sector-size {sector_size}")
        return cls(
            sectors=sectors,
            sector_size=sector_size,
            info=read_int(read("info")),
            flush=feature_flag(read("feature-flush-cache")),
            barrier=feature_flag(read("feature-barrier")),
            discard=feature_flag(read("feature-discard")),
            discard_granularity=read_int(read("discard-granularity"), SECTOR_SIZE) or SECTOR_SIZE,
            discard_alignment=read_int(read("discard-alignment")),
            discard_secure=feature_flag(read("discard-secure")),
            persistent=feature_flag(read("feature-persistent")),
            max_indirect_segments=read_int(read("feature-max-indirect-segments")),
        )


class BlkDisk:
    """The byte-addressed disk FUSE sees: any offset and length, mapped to
    whole sectors (read-modify-write at the logical block size for a write
    that does not cover whole blocks).  Stays the same object across
    reconnections: the FUSE file keeps it open."""

    def __init__(self, name: str, engine: BlkfrontEngine, info: DiskInfo) -> None:
        self.name = name
        self.engine = engine
        self.info = info
        self._ranges = RangeLock()
        self.removed = False

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def readonly(self) -> bool:
        return self.info.readonly

    @property
    def block(self) -> int:
        return max(SECTOR_SIZE, self.info.sector_size)

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        size = self.size
        if size == 0 and self.info.cdrom:
            raise OSError(errno.ENOMEDIUM, f"{self.name}: no medium in the drive")
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        start, end = align_span(offset, length, self.block)
        end = min(end, size)
        data = self.engine.read_sectors(start // SECTOR_SIZE, (end - start) // SECTOR_SIZE)
        if offset == start and len(data) == length:
            return data  # aligned: no copy (FUSE replies from any buffer)
        return memoryview(data)[offset - start:offset - start + length]

    def write(self, offset: int, data: bytes | memoryview) -> int:
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        size = self.size
        if offset + len(data) > size:
            raise OSError(errno.ENOSPC, f"write past the end of {self.name} ({size} bytes)")
        if not data:
            return 0
        block = self.block
        start, end = align_span(offset, len(data), block)
        with self._ranges.locked(start, end):
            if start == offset and end == offset + len(data):
                self.engine.write_sectors(start // SECTOR_SIZE, data)
            else:  # read-modify-write of the partial head/tail blocks
                buf = bytearray(end - start)
                if offset != start:
                    buf[:block] = self.engine.read_sectors(start // SECTOR_SIZE, block // SECTOR_SIZE)
                tail = end - block
                if (offset + len(data)) != end and (tail > start or offset == start):
                    buf[tail - start:] = self.engine.read_sectors(tail // SECTOR_SIZE, block // SECTOR_SIZE)
                buf[offset - start:offset - start + len(data)] = data
                self.engine.write_sectors(start // SECTOR_SIZE, buf)
        return len(data)

    def flush(self) -> None:
        if not self.readonly:
            self.engine.flush()

    def discard(self, offset: int, length: int) -> None:
        """Hole-punch: discard the whole blocks inside offset..offset+length;
        partial blocks at either end are zeroed instead (as a hole reads)."""
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        length = max(0, min(length, self.size - offset))
        block = self.block
        first = -(-offset // block) * block
        last = (offset + length) // block * block
        if first < last:
            self.engine.discard_sectors(first // SECTOR_SIZE, (last - first) // SECTOR_SIZE)
            if offset < first:
                self.write(offset, bytes(first - offset))
            if last < offset + length:
                self.write(last, bytes(offset + length - last))
        elif length:
            self.write(offset, bytes(length))
