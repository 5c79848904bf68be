"""PV network devices: netback (dom0 / driver domain), its vif hotplug step,
dom0's bridge, and the tap helper both ends share."""
