"""Block devices: blkfront (front.py, fuse_disk.py) in guests, blkback in dom0."""
