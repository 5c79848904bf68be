"""netback's pure parts: tx validation (Linux's xenvif_count_requests and
friends), rx slot filling, credit, checksum completion, frontend keys,
dom0's bridge commands, the toolstack's vif keys and network-list."""

from __future__ import annotations

import struct

import pytest

from xenbed.drivers.net import bridge
from xenbed.drivers.net.back import parse_rate
from xenbed.drivers.net.interface import parse_frontend_config
from xenbed.drivers.net.netback import CONTROL, DROP, FATAL, OK, Credit, Fragment, parse_tx_packet
from xenbed.protocols.inet import fill_checksum, tcp_payload_length
from xenbed.drivers.net.rx import rx_layout, rx_slots_needed
from xenbed.drivers.xenbus.nodes import BadNode
from xenbed.protocols.netif import (
    NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETRXF_more_data, NETTXF_extra_info, NETTXF_more_data,
    XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_GSO_TYPE_TCPV4, ExtraGso, NetifExtraInfo,
    NetifTxRequest,
)
from xenbed.toolstack import net
from xenbed.toolstack.vif_spec import parse_vif_spec

M, X = NETTXF_more_data, NETTXF_extra_info


def req(size, offset=0, flags=0, id_=0, gref=100):
    return NetifTxRequest(gref, offset, flags, id_, size).encode()


def chain(total, sizes, offset=0):
    """A packet of `total` bytes: the first slot says total, then `sizes`."""
    slots = [req(total, offset, M if sizes else 0, 0)]
    for i, s in enumerate(sizes):
        slots.append(req(s, 0, M if i < len(sizes) - 1 else 0, i + 1, 101 + i))
    return slots


def parse(slots, available=None):
    it = iter(slots)
    taken = []

    def take():
        taken.append(1)
        return next(it)

    pkt = parse_tx_packet(take, len(slots) if available is None else available)
    return pkt, len(taken)


CASES = [
    # (name, slots, verdict, slots consumed)
    ("single slot", [req(60)], OK, 1),
    ("exactly one page", [req(4096)], OK, 1),
    ("header only (14)", [req(14)], OK, 1),
    ("runt (13)", [req(13)], DROP, 1),
    ("empty", [req(0)], DROP, 1),
    ("first slot crosses its page", [req(200, offset=4000)], FATAL, 1),
    ("two slots", chain(5000, [904]), OK, 2),
    ("first slot keeps what the rest leaves", chain(3000, [1000, 1000]), OK, 3),
    ("first slot under 14 after the rest", chain(1010, [1000]), DROP, 2),
    ("slot larger than what remains", chain(1000, [2000]), DROP, 2),
    ("later slot crosses its page", [req(5000, 0, M), req(1000, 3500, 0, 1)], FATAL, 2),
    ("18 slots after the first (Linux's limit)", chain(18 * 100 + 60, [100] * 18), OK, 19),
    ("19 slots after the first: dropped", chain(19 * 100 + 60, [100] * 19), DROP, 20),
    ("20 slots after the first: dropped", chain(20 * 100 + 60, [100] * 20), DROP, 21),
    ("21 slots after the first: malicious", chain(21 * 100 + 60, [100] * 21), FATAL, 21),
    ("chain past the published requests", chain(300, [100, 100])[:2], FATAL, 2),
    ("extra info missing", [req(60, flags=X)], FATAL, 1),
]


@pytest.mark.parametrize("name,slots,verdict,consumed", CASES, ids=[c[0] for c in CASES])
def test_tx_validation_table(name, slots, verdict, consumed):
    pkt, taken = parse(slots)
    assert pkt.verdict == verdict, pkt.reason
    assert taken == consumed
    if verdict in (OK, DROP):
        assert len(pkt.responses) == consumed  # every slot answered
        assert all(s == (NETIF_RSP_OKAY if verdict == OK else NETIF_RSP_ERROR) for _, s in pkt.responses)
    if verdict == OK:
        assert sum(f.length for f in pkt.fragments) == pkt.size


def test_fragments_of_a_good_chain():
    pkt, _ = parse(chain(3000, [1000, 500]))
    assert pkt.fragments == [Fragment(100, 0, 1500), Fragment(101, 0, 1000), Fragment(102, 0, 500)]
    assert [r[0] for r in pkt.responses] == [0, 1, 2]


def gso_extra(size=1448, type_=XEN_NETIF_GSO_TYPE_TCPV4, flags=0):
    return NetifExtraInfo.for_gso(ExtraGso(size, type_), flags).encode()


def test_extra_info_slots_are_answered_null():
    slots = [req(5000, 0, X | M, 7), gso_extra(), req(904, 0, 0, 8, 101)]
    pkt, taken = parse(slots)
    assert pkt.verdict == OK and taken == 3
    assert [s for _, s in pkt.responses] == [NETIF_RSP_OKAY, NETIF_RSP_NULL, NETIF_RSP_OKAY]
    assert XEN_NETIF_EXTRA_TYPE_GSO in pkt.extras


@pytest.mark.parametrize("extra,reason", [
    (NetifExtraInfo(0, 0).encode(), "Invalid extra type: 0"),
    (NetifExtraInfo(5, 0).encode(), "Invalid extra type: 5"),
    (gso_extra(size=0), "GSO size must not be zero"),
    (gso_extra(type_=9), "Bad GSO type 9"),
])
def test_bad_extra_info_is_fatal(extra, reason):
    pkt, _ = parse([req(60, 0, X), extra])
    assert pkt.verdict == FATAL and pkt.reason == reason


def test_chained_extras_and_missing_second():
    first = gso_extra(flags=XEN_NETIF_EXTRA_FLAG_MORE)
    assert parse([req(60, 0, X), first])[0].verdict == FATAL  # MORE, but nothing published after it
    hash_extra = NetifExtraInfo(4, 0).encode()
    pkt, taken = parse([req(60, 0, X), first, hash_extra])
    assert pkt.verdict == OK and taken == 3 and len(pkt.extras) == 2


def test_multicast_control_is_answered_without_data():
    mcast = NetifExtraInfo.for_mcast(True, bytes.fromhex("01005e000001")).encode()
    pkt, taken = parse([req(0, 0, X, 3), mcast, req(60)])
    assert pkt.verdict == CONTROL and taken == 2  # the next slot is the next packet
    assert pkt.responses == [[3, NETIF_RSP_OKAY], [0, NETIF_RSP_NULL]]


# -- RX ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,layout", [
    (60, [(0, 60, 0)]),
    (4096, [(0, 4096, 0)]),
    (4097, [(0, 4096, NETRXF_more_data), (4096, 1, 0)]),
    (9000, [(0, 4096, NETRXF_more_data), (4096, 4096, NETRXF_more_data), (8192, 808, 0)]),
])
def test_rx_layout(length, layout):
    assert rx_layout(length) == layout
    assert rx_slots_needed(length) == len(layout)
    assert sum(n for _, n, _ in layout) == length


def test_rx_slots_for_a_64k_frame():
    assert rx_slots_needed(65535 + 14) == 17


# -- credit -------------------------------------------------------------------------------

def test_rate_from_the_toolstack_spec():
    spec = parse_vif_spec("rate=10Mb/s")
    assert parse_rate(spec.rate_store_value()) == (62500, 50000)
    assert parse_rate(None) is None and parse_rate("junk") is None and parse_rate("0,50000") is None


def test_credit_limits_bytes_per_interval():
    c = Credit((3000, 50000), now=0.0)
    sent = 0
    t = 0.0
    while t < 1.0:
        wait = c.wait_for(1500, t)
        if wait:
            t += wait
            continue
        c.consume(1500)
        sent += 1500
    # 3000 bytes per 50 ms for 1 s: 20 windows (+ the first)
    assert 60000 <= sent <= 63000


def test_credit_lets_a_packet_bigger_than_the_interval_through():
    c = Credit((1000, 10000), now=0.0)  # 1500 > 1000 per 10 ms: it goes once two windows add up
    assert c.wait_for(1500, 0.0) == pytest.approx(0.01)
    assert c.wait_for(1500, 0.01) == 0.0
    c.consume(1500)
    assert c.wait_for(1500, 0.01) == pytest.approx(0.01)
    assert c.wait_for(1500, 0.02) == pytest.approx(0.01)  # 1000 credit: short of 1500
    assert c.wait_for(1500, 0.03) == 0.0


def test_unlimited_credit():
    c = Credit(None, 0.0)
    assert c.wait_for(65535, 0.0) == 0.0


# -- checksums -----------------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp4_frame(payload=b"hello, xen", csum=0x1234):
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), csum) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return bytearray(b"\xff" * 6 + b"\x00\x16\x3e\x00\x00\x01" + b"\x08\x00" + ip + udp)


def test_fill_checksum_udp4():
    frame = udp4_frame()
    assert fill_checksum(frame)
    ip, udp = frame[14:34], frame[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert _csum(bytes(pseudo) + bytes(udp)) == 0xFFFF  # a correct checksum sums to all ones


def test_fill_checksum_tcp6_and_refusals():
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 5 << 4, 0x18, 100, 0xBEEF, 0) + b"data!"
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, b"\xfe\x80" + bytes(13) + b"\x01",
                      b"\xfe\x80" + bytes(13) + b"\x02")
    frame = bytearray(bytes(12) + b"\x86\xdd" + ip6 + tcp)
    assert fill_checksum(frame)
    seg = frame[54:]
    pseudo = frame[22:54] + struct.pack("!IxxxB", len(seg), 6)
    assert _csum(bytes(pseudo) + bytes(seg)) == 0xFFFF
    assert tcp_payload_length(frame) == 5
    assert not fill_checksum(bytearray(bytes(12) + b"\x08\x06" + bytes(28)))  # ARP


# -- frontend keys ----------------------------------------------------------------------------

def keys(**kw):
    base = {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "request-rx-copy": "1",
            "feature-rx-notify": "1", "feature-sg": "1"}
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    return lambda key: base.get(key)


def test_frontend_config_single_and_split():
    c = parse_frontend_config(keys())
    assert (c.tx_ring_ref, c.rx_ring_ref, c.evtchn_tx, c.evtchn_rx, c.split) == (8, 9, 5, 5, False)
    assert c.rx_notify and c.sg and c.csum
    c = parse_frontend_config(keys(event_channel_tx="6", event_channel_rx="7"))
    assert (c.evtchn_tx, c.evtchn_rx, c.split) == (6, 7, True)


@pytest.mark.parametrize("override,err", [
    ({"request_rx_copy": "0"}, "EOPNOTSUPP"),
    ({"request_rx_copy": None}, "EOPNOTSUPP"),
    ({"tx_ring_ref": None}, "ENOENT"),
    ({"rx_ring_ref": "x"}, "EINVAL"),
    ({"event_channel_tx": "6"}, "ENOENT"),  # split needs both
    ({"multi_queue_num_queues": "2"}, "ENOSYS"),
])
def test_frontend_config_refusals(override, err):
    import errno
    with pytest.raises(BadNode) as info:
        parse_frontend_config(keys(**override))
    assert info.value.err == getattr(errno, err)


# -- bridge ---------------------------------------------------------------------------------

ETH0 = {"ifname": "eth0", "address": "02:42:ac:1e:00:02", "mtu": 1500,
        "addr_info": [{"family": "inet", "local": "172.30.0.2", "prefixlen": 24, "broadcast": "172.30.0.255",
                       "scope": "global"},
                      {"family": "inet6", "local": "fe80::42:acff:fe1e:2", "prefixlen": 64, "scope": "link"}]}
LO = {"ifname": "lo", "address": "00:00:00:00:00:00",
      "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]}
ROUTES = [{"dst": "default", "gateway": "172.30.0.1", "dev": "eth0"},
          {"dst": "172.30.0.0/24", "dev": "eth0", "prefsrc": "172.30.0.2"}]


def test_bridge_plan_at_first_boot():
    assert bridge.choose_uplink("xenbr0", [LO, ETH0], ROUTES) == "eth0"
    cmds = [" ".join(c) for c in bridge.plan("xenbr0", "eth0", [LO, ETH0], ROUTES)]
    assert cmds == [
        "ip link add name xenbr0 type bridge forward_delay 0 stp_state 0",
        "ip link set dev xenbr0 address 02:42:ac:1e:00:02",
        "ip link set dev xenbr0 up",
        "ip link set dev eth0 master xenbr0",
        "ip addr add 172.30.0.2/24 brd 172.30.0.255 dev xenbr0",
        "ip addr del 172.30.0.2/24 dev eth0",
        "ip route replace default via 172.30.0.1 dev xenbr0",
        "ip link set dev eth0 up",
    ]


def test_bridge_plan_is_idempotent():
    eth0 = dict(ETH0, master="xenbr0", addr_info=ETH0["addr_info"][1:])
    br = {"ifname": "xenbr0", "address": ETH0["address"], "addr_info": ETH0["addr_info"][:1]}
    vif = {"ifname": "vif1.0", "master": "xenbr0", "addr_info": []}
    routes = [{"dst": "default", "gateway": "172.30.0.1", "dev": "xenbr0"}]
    links = [LO, eth0, br, vif]
    assert bridge.choose_uplink("xenbr0", links, routes) == "eth0"
    assert [" ".join(c) for c in bridge.plan("xenbr0", "eth0", links, routes)] == [
        "ip link set dev xenbr0 up", "ip link set dev eth0 up"]


def test_bridge_without_uplink():
    assert bridge.choose_uplink("xenbr0", [LO], []) is None
    assert [" ".join(c) for c in bridge.plan("xenbr0", None, [LO], [])] == [
        "ip link add name xenbr0 type bridge forward_delay 0 stp_state 0", "ip link set dev xenbr0 up"]
    with pytest.raises(ValueError):
        bridge.plan("xenbr0", "eth9", [LO], [])


# -- toolstack -------------------------------------------------------------------------------

def test_vif_device_keys_are_libxls():
    spec = parse_vif_spec("mac=00:16:3e:00:00:01,bridge=xenbr0,rate=10Mb/s,ip=172.30.0.130,mtu=1400")
    d = net.vif_device(spec, 1, 0, 0)
    assert d.frontend_path == "/local/domain/1/device/vif/0"
    assert d.backend_path == "/local/domain/0/backend/vif/1/0"
    assert d.frontend_keys == {"handle": "0", "mac": "00:16:3e:00:00:01", "mtu": "1400"}
    assert d.backend_keys == {"script": "/etc/xen/scripts/vif-bridge", "mac": "00:16:3e:00:00:01",
                              "bridge": "xenbr0", "handle": "0", "type": "vif", "mtu": "1400",
                              "rate": "62500,50000", "ip": "172.30.0.130"}
    d = net.vif_device(parse_vif_spec("mac=00:16:3e:00:00:02,vifname=guestnic"), 2, 0, 3)
    assert d.backend_keys["vifname"] == "guestnic" and "rate" not in d.backend_keys
    assert d.backend_keys["mtu"] == "1500"


def test_network_list_format():
    rows = [{"devid": 0, "backend_id": 0, "mac": "00:16:3e:00:00:01", "handle": 0, "state": 4, "evtch": 12,
             "tx_ring_ref": 8, "rx_ring_ref": 9, "backend": "/local/domain/0/backend/vif/1/0"}]
    assert net.format_list(rows).splitlines() == [
        "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path",
        "0   0  00:16:3e:00:00:01     0     4     12     8/9           /local/domain/0/backend/vif/1/0",
    ]
