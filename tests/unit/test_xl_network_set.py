"""`xl network-set` (a xenbed extension): parsing its settings, and the one
transaction it writes, against the real xenstored core in-process."""

from __future__ import annotations

import pytest

from xenbed.toolstack import net
from xenbed.toolstack.net import UNLIMITED, LiveSettings, parse_live_settings, set_live

from .xenbus_store import StoreHub


def test_settings_in_xl_syntax():
    assert parse_live_settings(["mtu=1400", "rate=10Mb/s"]) == LiveSettings(1400, (62500, 50000))
    assert parse_live_settings(["mtu=9000,rate=1MB/s@20ms"]) == LiveSettings(9000, (20000, 20000))
    assert parse_live_settings(["rate=unlimited"]) == LiveSettings(None, UNLIMITED)
    assert parse_live_settings(["rate="]) == LiveSettings(None, UNLIMITED)


@pytest.mark.parametrize("words, message", [
    ([], "nothing to set"),
    (["mtu=67"], "68..65535"),
    (["mtu=15OO"], "68..65535"),
    (["rate=10mb/s"], "uppercase"),
    (["bridge=xenbr1"], "only mtu and rate"),
    (["mtu=1400", "mtu=1500"], "twice"),
    (["1400"], "key=value"),
])
def test_bad_settings_are_refused_naming_the_item(words, message):
    with pytest.raises(ValueError, match=message):
        parse_live_settings(words)


@pytest.fixture
def store():
    hub = StoreHub()
    xs = hub.connect(0)
    fe, be = "/local/domain/3/device/vif/0", "/local/domain/0/backend/vif/3/0"
    for path, keys in ((fe, {"backend": be, "backend-id": "0", "state": "4", "mac": "00:16:3e:00:00:07",
                             "mtu": "1500"}),
                       (be, {"frontend": fe, "frontend-id": "3", "state": "4", "mtu": "1500"})):
        for k, v in keys.items():
            xs.write(f"{path}/{k}", v)
    return xs


def test_set_live_writes_both_mtus_and_the_rate_in_one_transaction_and_no_state(store):
    store.requests.clear()
    set_live(store, 3, "00:16:3E:00:00:07", parse_live_settings(["mtu=1400", "rate=10Mb/s"]))
    fe, be = "/local/domain/3/device/vif/0", "/local/domain/0/backend/vif/3/0"
    assert store.read(f"{fe}/mtu") == store.read(f"{be}/mtu") == "1400"
    assert store.read(f"{be}/rate") == "62500,50000"
    assert store.read(f"{fe}/state") == store.read(f"{be}/state") == "4"
    writes = [p for p in store.requests if p.op.name == "WRITE"]
    assert len(writes) == 3 and len({p.tx_id for p in writes}) == 1 and writes[0].tx_id != 0
    set_live(store, 3, "0", parse_live_settings(["rate=unlimited"]))
    assert store.try_read(f"{be}/rate") is None and store.read(f"{be}/mtu") == "1400"


def test_set_live_on_a_missing_vif_fails(store):
    with pytest.raises(net.DeviceError):
        set_live(store, 3, "5", LiveSettings(mtu=1400))
