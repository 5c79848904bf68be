"""The PV block device: blkback (dom0, `back`), its hotplug step
(`hotplug`), loop devices (`loop`), and blkfront (domU, `front`)."""
