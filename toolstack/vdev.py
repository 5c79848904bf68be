"""The toolstack's vdev names and numbers: protocols/vdev.py (one copy for the
toolstack, blkfront and the harness)."""

from xenbed.protocols.vdev import (  # noqa: F401
    EXTENDED,
    HD_MAJOR_0,
    HD_MAJOR_2,
    SD_MAJOR,
    XVD_MAJOR,
    Vdev,
    VdevError,
    disk_letters,
    number_to_vdev,
    parse_vdev,
    vdev_to_number,
)
