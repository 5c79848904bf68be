import pytest

from xenbed.drivers.kernel.netconfig import parse


def test_parse_static_addresses():
    assert parse("eth0=172.30.0.129/24 eth1=10.0.0.2/8") == {"eth0": "172.30.0.129/24", "eth1": "10.0.0.2/8"}
    assert parse("") == {}


@pytest.mark.parametrize("bad", ["eth0", "eth0=10.0.0.1", "=10.0.0.1/8"])
def test_bad_items_are_refused(bad):
    with pytest.raises(ValueError):
        parse(bad)
