"""The README's example test, verbatim in spirit: a driver author's first test."""

import pytest


@pytest.mark.integration
def test_my_guest_sees_its_name(testbed, xen):
    domid = testbed.exec("dom0", ["xl", "domid", "domu1"], check=True).stdout.strip()
    assert testbed.exec("domu1", ["xenstore-read", "domid"]).stdout.strip() == domid
    victim = xen.create_domain("scratch", memory_mb=16)  # xl create + a container for it
    assert testbed.exec("scratch", ["xenstore-read", "name"]).stdout.strip() == "scratch"
    xen.destroy_domain("scratch")
    assert victim > int(domid)
