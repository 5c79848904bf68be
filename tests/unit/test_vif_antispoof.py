"""The vif hotplug step's anti-spoofing rules (drivers/net/hotplug.py): the
nft scripts are pure; add/remove run them keyed by the vif's name."""

from __future__ import annotations

import pytest

from xenbed.drivers.net import hotplug
from xenbed.drivers.xenbus.hotplug_status import HotplugError


def rules(script: str, chain: str) -> list[str]:
    prefix = f"add rule bridge xenbed {chain} "
    return [line[len(prefix):] for line in script.splitlines() if line.startswith(prefix)]


def test_without_ip_only_the_mac_is_enforced_and_the_migration_port_closed():
    script = hotplug.antispoof_add("vif3.0", "00:16:3E:AA:00:01", [])
    assert rules(script, "xv_vif3.0") == [
        "ether saddr != 00:16:3e:aa:00:01 drop",
        "ether type arp arp saddr ether != 00:16:3e:aa:00:01 drop",
        "meta l4proto tcp th dport 8002 drop",
    ]
    assert script.rstrip().endswith('add element bridge xenbed vifs { "vif3.0" : jump xv_vif3.0 }')
    # the hooks dispatch by input port, and are rewritten (not appended to) each time
    assert "flush chain bridge xenbed forward" in script and "add rule bridge xenbed input iifname vmap @vifs" in script


def test_with_ip_ipv4_and_arp_only_from_those_addresses():
    addresses = hotplug.parse_addresses("172.30.0.129 10.1.0.0/24 10.2.0.7/32")
    assert addresses == ["172.30.0.129", "10.1.0.0/24", "10.2.0.7"]
    got = rules(hotplug.antispoof_add("vif3.0", "00:16:3e:aa:00:01", addresses), "xv_vif3.0")
    assert got[3:] == [
        "ether type ip ip saddr { 172.30.0.129, 10.1.0.0/24, 10.2.0.7 } accept",
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",  # DHCP, as vif-common
        "ether type ip drop",
        "ether type arp arp saddr ip { 0.0.0.0, 172.30.0.129, 10.1.0.0/24, 10.2.0.7 } accept",
        "ether type arp drop",
        "ether type { 8021q, 8021ad } drop",
    ]


def test_the_migration_port_is_dropped_before_any_address_is_accepted():
    got = rules(hotplug.antispoof_add("vif3.0", "00:16:3e:aa:00:01", ["172.30.0.129"]), "xv_vif3.0")
    assert got.index("meta l4proto tcp th dport 8002 drop") < got.index(
        "ether type ip ip saddr { 172.30.0.129 } accept")


def test_remove_deletes_the_vifs_element_and_chain_even_if_they_are_gone():
    script = hotplug.antispoof_remove("vif3.0")
    lines = script.splitlines()
    # made first (so that deleting never fails), then deleted, in one transaction
    assert lines[-5:] == ["add chain bridge xenbed xv_vif3.0",
                          'add element bridge xenbed vifs { "vif3.0" : jump xv_vif3.0 }',
                          'delete element bridge xenbed vifs { "vif3.0" }',
                          "flush chain bridge xenbed xv_vif3.0", "delete chain bridge xenbed xv_vif3.0"]


def test_chain_names_are_one_per_vif_name():
    assert hotplug.chain_of("vif1.0") == "xv_vif1.0"
    assert hotplug.chain_of("9net") == "xv_x396e6574"  # nft takes no bare word starting with a digit
    assert hotplug.chain_of("vif1_0") != hotplug.chain_of("vif1.0")


@pytest.mark.parametrize("bad", ["fe80::1", "300.1.1.1", "host"])
def test_ip_must_be_ipv4(bad):
    with pytest.raises(HotplugError):
        hotplug.parse_addresses(bad)


@pytest.mark.parametrize("mac", ["00:16:3e:00:00", "00:16:3e:00:00:01 drop; flush ruleset", ""])
def test_a_malformed_mac_is_refused_not_written_into_nft(mac):
    with pytest.raises(HotplugError):
        hotplug.antispoof_add("vif3.0", mac, [])


def test_a_quote_in_the_name_is_refused():
    with pytest.raises(HotplugError):
        hotplug.antispoof_remove('vif"; flush ruleset')


class Store:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def try_read(self, path):
        return self.values.get(path)

    def run_transaction(self, fn):
        return fn(None)


def test_add_installs_the_chain_before_the_vif_goes_up_and_remove_takes_it(monkeypatch):
    calls = []
    monkeypatch.setattr(hotplug, "_nft", lambda script: calls.append(("nft", script)))
    monkeypatch.setattr(hotplug.taplib, "link_exists", lambda name: True)
    monkeypatch.setattr(hotplug.taplib, "link_master", lambda name: None)
    monkeypatch.setattr(hotplug.taplib, "set_link", lambda name, **kw: calls.append(("link", kw)))
    monkeypatch.setattr(hotplug, "_mtu_of", lambda name: 1500)
    monkeypatch.setattr(hotplug, "write_connected", lambda store, backend, tx: calls.append(("connected",)))
    monkeypatch.setattr(hotplug, "clear_keys", lambda store, backend, keys: None)
    b = "/local/domain/0/backend/vif/3/0"
    store = Store({f"{b}/frontend-id": "3", f"{b}/handle": "0", f"{b}/mac": "00:16:3e:aa:00:01",
                   f"{b}/ip": "172.30.0.129"})
    assert hotplug.add(store, b) == "vif3.0"
    assert calls[0][0] == "nft" and "ip saddr { 172.30.0.129 } accept" in calls[0][1]
    assert ("link", {"up": True}) in calls and calls[-1] == ("connected",)
    calls.clear()
    hotplug.remove(store, b)
    assert any(c[0] == "nft" and 'delete element bridge xenbed vifs { "vif3.0" }' in c[1] for c in calls)


def test_add_without_a_mac_fails_closed(monkeypatch):
    errors = []
    monkeypatch.setattr(hotplug.taplib, "link_exists", lambda name: True)
    monkeypatch.setattr(hotplug, "write_error", lambda store, backend, message: errors.append(message))
    b = "/local/domain/0/backend/vif/3/0"
    with pytest.raises(HotplugError):
        hotplug.add(Store({f"{b}/frontend-id": "3", f"{b}/handle": "0"}), b)
    assert "mac" in errors[0]
