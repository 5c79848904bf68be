"""netfront's pure pieces: MAC parsing, splitting a frame into tx requests,
rx chain reassembly, the gratuitous ARP frame, the frontend's keys and the
backend's features (no Docker, no Xen)."""

from __future__ import annotations

import pytest

from xenbed.drivers.net.ether import format_mac, gratuitous_arp, parse_mac
from xenbed.drivers.net.front import BackendFeatures, backend_mtu, frontend_keys, lowest_free_index
from xenbed.drivers.net.front_engine import RxReassembler, build_tx_requests, tx_slot_sizes, tx_slots_needed
from xenbed.drivers.net.tap import parse_ip_addr_json
from xenbed.protocols.netif import (
    NETIF_RSP_ERROR,
    NETRXF_csum_blank,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_data_validated,
    NETTXF_more_data,
    XEN_NETIF_EXTRA_FLAG_MORE,
    ExtraGso,
    NetifExtraInfo,
    NetifRxResponse,
    NetifTxRequest,
)


# -- MAC addresses ------------------------------------------------------------------
@pytest.mark.parametrize("text, raw", [
    ("00:16:3e:0a:0b:0c", bytes([0, 0x16, 0x3E, 0x0A, 0x0B, 0x0C])),
    ("00:16:3E:74:3D:76", bytes([0, 0x16, 0x3E, 0x74, 0x3D, 0x76])),
    ("0:16:3e:a:b:c", bytes([0, 0x16, 0x3E, 0x0A, 0x0B, 0x0C])),  # xl accepts 1-digit groups
    ("02-00-00-00-00-01", bytes([2, 0, 0, 0, 0, 1])),
    (" 00:16:3e:00:00:01\n", bytes([0, 0x16, 0x3E, 0, 0, 1])),
    (b"00:16:3e:00:00:02", bytes([0, 0x16, 0x3E, 0, 0, 2])),
])
def test_parse_mac(text, raw):
    assert parse_mac(text) == raw


@pytest.mark.parametrize("text", [
    None, "", "00:16:3e:0a:0b", "00:16:3e:0a:0b:0c:0d", "00:16:3e:0a:0b:0g", "000:16:3e:0a:0b:0c",
    "00:16:3e:0a::0c", "0x:16:3e:0a:0b:0c", "+1:16:3e:0a:0b:0c", "00163e0a0b0c",
    "01:00:5e:00:00:01",  # multicast
    "ff:ff:ff:ff:ff:ff",  # broadcast
])
def test_parse_mac_rejects(text):
    with pytest.raises(ValueError):
        parse_mac(text)


def test_format_mac_round_trip():
    assert format_mac(parse_mac("00:16:3E:A:B:C")) == "00:16:3e:0a:0b:0c"
    with pytest.raises(ValueError):
        format_mac(b"\0" * 5)


# -- tx: slots and requests ----------------------------------------------------------
@pytest.mark.parametrize("length, sizes", [
    (14, [14]), (60, [60]), (1514, [1514]), (4096, [4096]), (4097, [4096, 1]),
    (9014, [4096, 4096, 822]), (65535, [4096] * 15 + [4095]), (8192, [4096, 4096]),
])
def test_tx_slot_sizes(length, sizes):
    assert tx_slot_sizes(length) == sizes
    assert sum(sizes) == length
    assert tx_slots_needed(length) == len(sizes)


def test_one_slot_frame():
    [req] = build_tx_requests(1514, [(7, 300)])
    assert req == NetifTxRequest(gref=300, offset=0, flags=0, id=7, size=1514)


def test_multi_slot_frame_first_size_is_the_total():
    reqs = build_tx_requests(9014, [(0, 100), (1, 101), (2, 102)])
    assert [r.size for r in reqs] == [9014, 4096, 822]
    assert [r.flags & NETTXF_more_data for r in reqs] == [NETTXF_more_data, NETTXF_more_data, 0]
    assert [(r.id, r.gref, r.offset) for r in reqs] == [(0, 100, 0), (1, 101, 0), (2, 102, 0)]
    # what a backend computes for the first slot: total minus the rest (netback's txreq.size -= ...)
    assert reqs[0].size - sum(r.size for r in reqs[1:]) == 4096


def test_first_request_flags_only_on_the_first():
    reqs = build_tx_requests(5000, [(0, 1), (1, 2)], flags=NETTXF_data_validated)
    assert reqs[0].flags == NETTXF_data_validated | NETTXF_more_data
    assert reqs[1].flags == 0


def test_build_tx_requests_checks_slots_and_size():
    with pytest.raises(ValueError):
        build_tx_requests(5000, [(0, 1)])
    with pytest.raises(ValueError):
        build_tx_requests(100, [(0, 1), (1, 2)])
    with pytest.raises(ValueError):
        build_tx_requests(65536, [(i, i) for i in range(16)])


def test_tx_requests_encode_as_netif_h():
    [req] = build_tx_requests(60, [(5, 0x01020304)])
    assert req.encode() == bytes.fromhex("04030201" "0000" "0000" "0500" "3c00")


# -- gratuitous ARP --------------------------------------------------------------------
def test_gratuitous_arp_bytes():
    reference = bytes.fromhex(
        "ffffffffffff"  # destination: broadcast
        "00163e010203"  # source: our MAC
        "0806"  # EtherType ARP
        "0001"  # hardware type Ethernet
        "0800"  # protocol type IPv4
        "06" "04"  # address lengths
        "0001"  # ARP request (what Linux's netdev_notify_peers sends)
        "00163e010203" "c0000207"  # sender: our MAC, 192.0.2.7
        "000000000000" "c0000207"  # target: zero MAC, 192.0.2.7 again
    )
    assert gratuitous_arp("00:16:3e:01:02:03", "192.0.2.7") == reference
    assert gratuitous_arp(bytes.fromhex("00163e010203"), "192.0.2.7") == reference
    assert len(reference) == 42


def test_gratuitous_arp_rejects_bad_input():
    with pytest.raises(ValueError):
        gratuitous_arp("00:16:3e:01:02:03", "300.1.1.1")
    with pytest.raises(ValueError):
        gratuitous_arp("00:16:3e:01:02", "10.0.0.1")


# -- rx: reassembly ------------------------------------------------------------------------
class Buffers:
    """Rx buffers by id, as the engine's pool."""

    def __init__(self, n=8):
        self.pages = [bytearray(4096) for _ in range(n)]

    def put(self, rid, offset, data):
        self.pages[rid][offset:offset + len(data)] = data

    def fetch(self, rid, offset, size):
        return bytes(self.pages[rid][offset:offset + size])


def rsp(rid, offset, flags, status):
    return NetifRxResponse(rid, offset, flags, status).encode()


def test_rx_single_slot_frame():
    bufs, asm = Buffers(), RxReassembler()
    frame = bytes(range(60))
    bufs.put(3, 10, frame)
    out = asm.feed(rsp(3, 10, 0, 60), bufs.fetch)
    assert out.ok and out.data == frame and out.slots == 1
    assert not asm.in_chain


def test_rx_more_data_chain_concatenates():
    bufs, asm = Buffers(), RxReassembler()
    a, b, c = b"A" * 4096, b"B" * 4096, b"C" * 900
    bufs.put(0, 0, a)
    bufs.put(1, 0, b)
    bufs.put(2, 0, c)
    assert asm.feed(rsp(0, 0, NETRXF_more_data, 4096), bufs.fetch) is None
    assert asm.feed(rsp(1, 0, NETRXF_more_data, 4096), bufs.fetch) is None
    assert asm.in_chain
    out = asm.feed(rsp(2, 0, 0, 900), bufs.fetch)
    assert out.ok and out.data == a + b + c and out.slots == 3


def test_rx_extra_info_slots_are_skipped():
    bufs, asm = Buffers(), RxReassembler()
    bufs.put(0, 0, b"x" * 1000)
    bufs.put(2, 0, b"y" * 100)
    gso = NetifExtraInfo.for_gso(ExtraGso(1448, 1), flags=XEN_NETIF_EXTRA_FLAG_MORE).encode()
    mcast = NetifExtraInfo.for_mcast(True, bytes.fromhex("01005e000001")).encode()
    assert asm.feed(rsp(0, 0, NETRXF_extra_info | NETRXF_more_data, 1000), bufs.fetch) is None
    assert asm.feed(gso, bufs.fetch) is None  # MORE: another extra follows
    assert asm.feed(mcast, bufs.fetch) is None  # last extra, but the frame has more data
    out = asm.feed(rsp(2, 0, 0, 100), bufs.fetch)
    assert out.ok and out.data == b"x" * 1000 + b"y" * 100 and out.slots == 4


def test_rx_extra_info_on_a_one_slot_frame():
    bufs, asm = Buffers(), RxReassembler()
    bufs.put(0, 0, b"z" * 70)
    assert asm.feed(rsp(0, 0, NETRXF_extra_info, 70), bufs.fetch) is None
    out = asm.feed(NetifExtraInfo.for_gso(ExtraGso(1448, 1)).encode(), bufs.fetch)
    assert out.ok and out.data == b"z" * 70 and out.slots == 2


def test_rx_error_status_drops_the_whole_chain_but_consumes_it():
    bufs, asm = Buffers(), RxReassembler()
    assert asm.feed(rsp(0, 0, NETRXF_more_data, 4096), bufs.fetch) is None
    assert asm.feed(rsp(1, 0, NETRXF_more_data, NETIF_RSP_ERROR), bufs.fetch) is None
    out = asm.feed(rsp(2, 0, 0, 10), bufs.fetch)
    assert not out.ok and out.data == b"" and out.slots == 3 and "status -1" in out.reason
    # the next frame is fine again
    bufs.put(3, 0, b"k" * 64)
    assert asm.feed(rsp(3, 0, 0, 64), bufs.fetch).ok


def test_rx_overrun_and_runt_and_too_many_slots():
    bufs = Buffers()
    out = RxReassembler().feed(rsp(0, 4000, 0, 200), bufs.fetch)
    assert not out.ok and "overrun" in out.reason
    out = RxReassembler().feed(rsp(0, 0, 0, 10), bufs.fetch)
    assert not out.ok and "runt" in out.reason
    asm = RxReassembler(max_slots=3)
    for _ in range(3):
        assert asm.feed(rsp(0, 0, NETRXF_more_data, 100), bufs.fetch) is None
    out = asm.feed(rsp(0, 0, 0, 100), bufs.fetch)
    assert not out.ok and "slots" in out.reason and out.slots == 4


def test_rx_bad_extra_type_is_an_error():
    bufs, asm = Buffers(), RxReassembler()
    asm.feed(rsp(0, 0, NETRXF_extra_info, 64), bufs.fetch)
    out = asm.feed(NetifExtraInfo(0, 0).encode(), bufs.fetch)
    assert not out.ok and "extra" in out.reason


def test_rx_csum_blank_is_reported():
    bufs, asm = Buffers(), RxReassembler()
    out = asm.feed(rsp(0, 0, NETRXF_csum_blank, 64), bufs.fetch)
    assert out.ok and out.csum_blank


# -- xenstore keys -----------------------------------------------------------------------
def test_frontend_keys_shared_channel():
    assert frontend_keys(8, 9, [5]) == {
        "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "request-rx-copy": "1",
        "feature-rx-notify": "1", "feature-sg": "1", "feature-no-csum-offload": "1"}


def test_frontend_keys_split_channels():
    keys = frontend_keys(8, 9, [5, 6], sg=False)
    assert keys["event-channel-tx"] == "5" and keys["event-channel-rx"] == "6"
    assert "event-channel" not in keys and "feature-sg" not in keys
    with pytest.raises(ValueError):
        frontend_keys(8, 9, [])


def test_backend_features():
    nodes = {"feature-rx-copy": "1", "feature-split-event-channels": "1", "feature-sg": "1",
             "multi-queue-max-queues": "4"}
    f = BackendFeatures.parse(nodes.get)
    assert f.rx_copy and f.split_event_channels and f.sg and f.max_queues == 4
    f = BackendFeatures.parse({"feature-rx-copy": "0", "feature-sg": "yes"}.get)
    assert not f.rx_copy and not f.sg and not f.split_event_channels and f.max_queues == 1


@pytest.mark.parametrize("nodes, mtu", [({}, 1500), ({"mtu": "9000"}, 9000), ({"mtu": "junk"}, 1500),
                                        ({"mtu": "20"}, 1500), ({"mtu": "1400\n"}, 1400)])
def test_backend_mtu(nodes, mtu):
    assert backend_mtu(nodes.get) == mtu


def test_lowest_free_index():
    assert lowest_free_index([]) == 0
    assert lowest_free_index([0, 1, 3]) == 2
    assert lowest_free_index([1]) == 0


def test_ip_addr_json():
    text = ('[{"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"172.30.0.130",'
            '"prefixlen":24},{"family":"inet","local":"10.0.0.1","prefixlen":8}]}]')
    assert parse_ip_addr_json(text) == ["172.30.0.130", "10.0.0.1"]
    assert parse_ip_addr_json("") == [] and parse_ip_addr_json("garbage") == []


# -- checksum completion (a backend that sets NETRXF_csum_blank anyway) -------------------
def _udp4_frame(payload=b"hello, world!", csum=None):
    import socket
    import struct
    udp = struct.pack("!HHHH", 5555, 6666, 8 + len(payload), 0 if csum is None else csum) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("192.0.2.8"), socket.inet_aton("192.0.2.7"))
    return bytes(6) + bytes(6) + b"\x08\x00" + ip + udp


def test_inet_checksum_rfc1071_example():
    from xenbed.protocols.inet import inet_checksum
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d)
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert inet_checksum(b"\x01") == ~0x0100 & 0xFFFF


def test_complete_checksum_udp4_verifies():
    from xenbed.protocols.inet import complete_checksum, inet_checksum
    out = complete_checksum(_udp4_frame())
    ip, udp = out[14:34], out[34:]
    pseudo = ip[12:20] + bytes([0, 17]) + len(udp).to_bytes(2, "big")
    assert inet_checksum(pseudo, udp) == 0  # a correct checksum sums to zero
    assert out[:40] == _udp4_frame()[:40] and out[42:] == _udp4_frame()[42:]


def test_complete_checksum_tcp6_verifies():
    import struct
    from xenbed.protocols.inet import complete_checksum, inet_checksum
    tcp = struct.pack("!HHIIBBHHH", 80, 443, 1, 0, 5 << 4, 0x02, 65535, 0x1234, 0) + b"payload"
    src, dst = bytes.fromhex("20010db8" + "00" * 11 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "02")
    ip6 = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst
    out = complete_checksum(bytes(12) + b"\x86\xdd" + ip6 + tcp)
    seg = out[54:]
    assert inet_checksum(src, dst, struct.pack("!I", len(seg)), bytes([0, 0, 0, 6]), seg) == 0


def test_complete_checksum_leaves_other_frames():
    from xenbed.drivers.net.ether import gratuitous_arp
    from xenbed.protocols.inet import complete_checksum
    arp = gratuitous_arp("00:16:3e:00:00:01", "192.0.2.1")
    assert complete_checksum(arp) == arp
    assert complete_checksum(b"short") == b"short"
