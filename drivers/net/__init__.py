"""Network split driver: netfront (front.py, in a guest, driving a tap named
eth<N> through tapdev.py) and netback (back.py, in dom0 or a driver domain).
Both speak Xen's io/netif.h rings (protocols/netif.py) over the XenBus."""
