"""PV network devices: netback (dom0 / driver domain) with its vif hotplug
step, dom0's bridge and tap helper; netfront (guests) with its own tap."""
