"""xl vif specs (xl-network-configuration(5)), pure."""

import random
import re
from dataclasses import replace

import pytest

from xenbed.toolstack.vif_spec import (
    DEFAULT_BRIDGE,
    VifSpec,
    VifSpecError,
    generate_mac,
    parse_rate,
    parse_vif_spec,
)


def seeded(seed=1):
    return random.Random(seed)


# ---- the man page's examples --------------------------------------------------

def test_man_page_example_mac_model_bridge():
    v = parse_vif_spec("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0")
    assert v.mac == "00:16:3e:74:3d:76" and not v.mac_generated
    assert v.model == "rtl8139" and v.bridge == "xenbr0"


def test_man_page_example_mac_only():
    v = parse_vif_spec("mac=00:16:3E:74:34:32")
    assert v.mac == "00:16:3e:74:34:32" and v.bridge == DEFAULT_BRIDGE == "xenbr0"


def test_man_page_example_empty_string_is_all_defaults():
    v = parse_vif_spec("", rng=seeded())
    assert v.mac_generated and v.bridge == "xenbr0" and v.type == "vif"
    assert (v.ip, v.mtu, v.rate, v.vifname, v.script, v.backend, v.model, v.devid) == (None,) * 8
    assert v.rate_store_value() is None


def test_man_page_config_list():
    a, b = (parse_vif_spec(s) for s in ("mac=00:16:3E:74:34:32",
                                        "mac=00:16:3e:5f:48:e4,bridge=xenbr1"))
    assert (a.bridge, b.bridge, b.mac) == ("xenbr0", "xenbr1", "00:16:3e:5f:48:e4")


# ---- MAC ------------------------------------------------------------------------

def test_generated_mac_is_in_xen_oui_and_seedable():
    a = parse_vif_spec("", rng=seeded(7)).mac
    b = parse_vif_spec("", rng=seeded(7)).mac
    assert a == b
    assert re.fullmatch(r"00:16:3e:[0-7][0-9a-f]:[0-9a-f]{2}:[0-9a-f]{2}", a)
    macs = {generate_mac(seeded(i)) for i in range(200)}
    assert len(macs) > 190
    for mac in macs:    # libxl: mac[3] = r & 0x7f
        assert mac.startswith("00:16:3e:") and int(mac.split(":")[3], 16) < 0x80


def test_default_rng_works():
    assert parse_vif_spec("").mac.startswith("00:16:3e:")


@pytest.mark.parametrize("given,mac", [
    ("00:16:3E:74:3d:76", "00:16:3e:74:3d:76"),
    ("0:16:3e:4:3:6", "00:16:3e:04:03:06"),     # xl reads 1-digit groups too
    ("aa:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee:ff"),  # locally administered, unicast
    ("02:00:00:00:00:01", "02:00:00:00:00:01"),
])
def test_mac_normalised(given, mac):
    assert parse_vif_spec(f"mac={given}").mac == mac


def test_all_zero_mac_means_generate_as_libxl():
    v = parse_vif_spec("mac=00:00:00:00:00:00", rng=seeded())
    assert v.mac_generated and v.mac.startswith("00:16:3e:")


@pytest.mark.parametrize("mac,message", [
    ("00:16:3e:74:3d", "six ':'-separated groups"),
    ("00:16:3e:74:3d:76:01", "six ':'-separated groups"),
    ("00-16-3e-74-3d-76", "six ':'-separated groups"),
    ("00:16:3e:74:3d:7g", "six ':'-separated groups"),
    ("00:16:3e:74:3d:100", "six ':'-separated groups"),
    ("", "six ':'-separated groups"),
    ("01:00:5e:00:00:01", "multicast"),
    ("ff:ff:ff:ff:ff:ff", "multicast \\(or broadcast\\)"),
])
def test_bad_macs(mac, message):
    with pytest.raises(VifSpecError, match=message) as info:
        parse_vif_spec(f"mac={mac}")
    assert info.value.item == f"mac={mac}"


# ---- rate -----------------------------------------------------------------------

@pytest.mark.parametrize("rate,pair", [
    # the man page: 'rate=10Mb/s' -- up to 10 megabits every second
    ("10Mb/s", (62500, 50000)),
    # 'rate=250KB/s' -- up to 250 kilobytes every second
    ("250KB/s", (12500, 50000)),
    # 'rate=1MB/s@20ms' -- 20,000 bytes in every 20 millisecond period
    ("1MB/s@20ms", (20000, 20000)),
    ("1GB/s@20ms", (20_000_000, 20000)),
    ("100Kb/s", (625, 50000)),
    ("1Gb/s", (6_250_000, 50000)),
    ("8b/s@1s", (1, 1_000_000)),
    ("1000B/s", (50, 50000)),
    ("1MB/s@20000us", (20000, 20000)),
    ("1MB/s@20000u", (20000, 20000)),
    ("1MB/s@20m", (20000, 20000)),
    ("1MB/s@2", (2_000_000, 2_000_000)),       # a bare interval is in seconds
    ("1MB/s@2s", (2_000_000, 2_000_000)),
    ("4294967295B/s", (214748364, 50000)),
    ("4294GB/s@4ms", (4294 * 10**9 * 4000 // 10**6, 4000)),
])
def test_rates_as_libxlu(rate, pair):
    assert parse_rate(rate) == pair
    v = parse_vif_spec(f"rate={rate}")
    assert v.rate == pair
    assert (v.rate_bytes_per_interval, v.rate_interval_usecs) == pair
    assert v.rate_store_value() == f"{pair[0]},{pair[1]}"


def test_rate_store_value_for_the_man_page_example():
    assert parse_vif_spec("rate=10Mb/s").rate_store_value() == "62500,50000"


@pytest.mark.parametrize("rate,message", [
    ("", "no rate specified"),
    ("@20ms", "no rate specified"),
    ("10", "invalid rate"),
    ("10Mb", "invalid rate"),
    ("10 Mb/s", "invalid rate"),
    ("10MiB/s", "invalid rate"),
    ("100kb/s", "multipliers are uppercase"),
    ("10mb/s", "multipliers are uppercase"),
    ("-1MB/s", "invalid rate"),
    ("0MB/s", "more than 0"),
    ("010MB/s", "leading zero"),
    ("4294967296B/s", "rate overflow"),
    ("1b/s", "rate too low"),
    ("1MB/s@", "invalid replenishment interval"),
    ("1MB/s@20ns", "invalid replenishment interval"),
    ("1MB/s@20ms@1", "invalid replenishment interval"),
    ("1MB/s@0ms", "more than 0"),
    ("1MB/s@020ms", "leading zero"),
    ("1MB/s@4295s", "replenishment interval overflow"),
    ("1MB/s@4294967296us", "replenishment interval overflow"),
    ("4294GB/s@4294s", "rate overflow"),     # bytes/s * usecs past 2**64, as libxlu
    ("7b/s", "rate too low"),
])
def test_bad_rates(rate, message):
    with pytest.raises(ValueError, match=message):
        parse_rate(rate)
    with pytest.raises(VifSpecError, match=message) as info:
        parse_vif_spec(f"rate={rate}")
    assert info.value.item == f"rate={rate}"


# ---- other keys -----------------------------------------------------------------------

def test_all_keys():
    v = parse_vif_spec("mac=00:16:3e:00:00:01, bridge=br1, ip=10.0.0.1 fd00::1 10.1.0.0/16,"
                       " mtu=9000, rate=1MB/s@20ms, vifname=vif-web, script=vif-route,"
                       " backend=netdd, model=e1000, type=ioemu, devid=3, gatewaydev=eth0,"
                       " forwarddev=eth1, untrusted")
    assert v == VifSpec(mac="00:16:3e:00:00:01", bridge="br1",
                        ip="10.0.0.1 fd00::1 10.1.0.0/16", mtu=9000, rate=(20000, 20000),
                        vifname="vif-web", script="vif-route", backend="netdd", model="e1000",
                        type="ioemu", devid=3, gatewaydev="eth0", forwarddev="eth1",
                        trusted=False)
    assert v.ips == ("10.0.0.1", "fd00::1", "10.1.0.0/16")


def test_netdev_is_a_deprecated_alias_of_gatewaydev():
    assert parse_vif_spec("netdev=eth0").gatewaydev == "eth0"
    with pytest.raises(VifSpecError, match="gatewaydev respecified"):
        parse_vif_spec("netdev=eth0,gatewaydev=eth1")


def test_ip_is_normalised():
    assert parse_vif_spec("ip=  10.0.0.1   10.0.0.2 ").ip == "10.0.0.1 10.0.0.2"
    assert parse_vif_spec("ip=FD00:0::1").ip == "fd00::1"


def test_empty_items_and_spaces_are_skipped_like_strtok():
    v = parse_vif_spec(",, bridge=br0 ,,mac=00:16:3e:00:00:02,")
    assert v.bridge == "br0" and v.mac == "00:16:3e:00:00:02"


def test_value_may_contain_equals():
    assert parse_vif_spec("script=/etc/xen/scripts/vif-x=y").script == "/etc/xen/scripts/vif-x=y"


def test_empty_backend_means_dom0():
    assert parse_vif_spec("backend=").backend is None


def test_same_value_twice_is_fine():
    assert parse_vif_spec("bridge=br0,bridge=br0").bridge == "br0"


@pytest.mark.parametrize("mtu", [68, 576, 1500, 9000, 65535])
def test_mtu_range(mtu):
    assert parse_vif_spec(f"mtu={mtu}").mtu == mtu


@pytest.mark.parametrize("spec,message,item", [
    ("foo=1", "unknown key 'foo'", "foo=1"),
    ("mac=00:16:3e:00:00:01,colour=red", "unknown key 'colour' \\(known: mac, bridge", "colour=red"),
    ("Mac=00:16:3e:00:00:01", "unknown key 'Mac'", "Mac=00:16:3e:00:00:01"),
    ("model", "expected key=value", "model"),
    ("bridge", "expected key=value", "bridge"),
    ("accel=x", "accel is not supported", "accel=x"),
    ("colo_compare_out=x", "not supported by xenbed \\(COLO\\)", "colo_compare_out=x"),
    ("bridge=a,bridge=b", "bridge respecified \\(was 'bridge=a'\\)", "bridge=b"),
    ("mac=00:16:3e:00:00:01,mac=00:16:3e:00:00:02", "mac respecified",
     "mac=00:16:3e:00:00:02"),
    ("mtu=67", "mtu 67 is out of range \\(68..65535\\)", "mtu=67"),
    ("mtu=65536", "out of range", "mtu=65536"),
    ("mtu=1500B", "not a decimal number", "mtu=1500B"),
    ("mtu=", "not a decimal number", "mtu="),
    ("mtu=-1", "not a decimal number", "mtu=-1"),
    ("devid=x", "not a decimal number", "devid=x"),
    ("devid=2147483648", "out of range", "devid=2147483648"),
    ("type=pv", "type must be vif or ioemu", "type=pv"),
    ("ip=10.0.0.300", "'10.0.0.300' is not an IP address", "ip=10.0.0.300"),
    ("ip=10.0.0.1 host", "'host' is not an IP address", "ip=10.0.0.1 host"),
    ("ip=", "ip is empty", "ip="),
    ("bridge=", "bridge is empty", "bridge="),
    ("bridge=averyveryverylongname", "longer than 15 bytes", "bridge=averyveryverylongname"),
    ("vifname=vif 1", "not a valid interface name", "vifname=vif 1"),
    ("vifname=a/b", "not a valid interface name", "vifname=a/b"),
    ("gatewaydev=..", "not a valid interface name", "gatewaydev=.."),
    ("script=", "script is empty", "script="),
    ("rate=100kb/s", "invalid rate", "rate=100kb/s"),
])
def test_errors_name_the_item(spec, message, item):
    with pytest.raises(VifSpecError, match=message) as info:
        parse_vif_spec(spec)
    assert info.value.item == item and info.value.spec == spec
    assert repr(item) in str(info.value) and repr(spec) in str(info.value)


def test_not_a_string():
    with pytest.raises(VifSpecError, match="must be a string"):
        parse_vif_spec(None)


def test_vif_spec_error_is_a_value_error():
    assert issubclass(VifSpecError, ValueError)


# ---- normalised form ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    "",
    "mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0",
    "rate=10Mb/s", "rate=250KB/s", "rate=1MB/s@20ms", "rate=1GB/s@20ms", "rate=9b/s@1s",
    "rate=333B/s@7ms", "rate=4294967295B/s",
    "ip=10.0.0.1 10.0.0.2,mtu=9000,vifname=vif-x,script=vif-route,backend=dd,devid=3,"
    "gatewaydev=eth0,forwarddev=eth1,type=ioemu,trusted",
])
def test_to_spec_round_trips(spec):
    v = parse_vif_spec(spec, rng=seeded())
    again = parse_vif_spec(v.to_spec())
    assert again == replace(v, mac_generated=False)
    assert again.rate_store_value() == v.rate_store_value()


def test_to_spec_text():
    v = parse_vif_spec("mac=00:16:3E:74:3d:76,rate=10Mb/s")
    assert v.to_spec() == "mac=00:16:3e:74:3d:76,bridge=xenbr0,rate=1250KB/s@50000us"
