"""Block devices: blkfront (front.py, fuse_disk.py) in guests; blkback
(back.py), its hotplug step (hotplug.py) and loop devices (loop.py) in dom0."""
