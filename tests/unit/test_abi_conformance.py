"""xenbed's rings and codecs against Xen's own headers and ring macros.

Compiles tests/abi/ring_abi.c (and index_watch.c) with gcc against Debian's
libxen-dev, then:

* compares every struct size, field offset/size, ring size (orders 0..3),
  constant and the native protocol string with the Python modules;
* exchanges real ring pages both ways: the Python FrontRing fills a page
  file that C reads with BACK_RING_ATTACH / RING_COPY_REQUEST and answers
  with RING_PUSH_RESPONSES_AND_CHECK_NOTIFY; C fills one with
  FRONT_RING_ATTACH / RING_PUSH_REQUESTS_AND_CHECK_NOTIFY that the Python
  BackRing answers -- across the 2**32 index wrap and on multi-page rings;
* checks that C and Python agree on which producer indexes are overflow;
* watches a ring index from C while Python rewrites it, to prove the peer
  never sees a torn or transient value.

Missing headers are a failure, not a skip: the Makefile installs libxen-dev.
"""

from __future__ import annotations

import json
import mmap
import shutil
import subprocess
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from xenbed.protocols import blkif, netif
from xenbed.protocols import ring as ring_module
from xenbed.protocols.blkif import (
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    Segment,
    decode_request,
)
from xenbed.protocols.netif import (
    ExtraGso,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenbed.protocols.ring import BackRing, FrontRing, RingOverflow, SharedRing, ring_bytes_for_order, ring_size

pytestmark = pytest.mark.abi

U32 = 2**32
ABI_DIR = Path(__file__).resolve().parents[1] / "abi"
XEN_INCLUDE = Path("/usr/include/xen")
REQUIRED_HEADERS = ["io/ring.h", "io/blkif.h", "io/netif.h", "io/protocols.h", "grant_table.h"]
ENTRY_SIZES = {
    "blkif": blkif.RING_ENTRY_SIZE,
    "netif_tx": netif.TX_RING_ENTRY_SIZE,
    "netif_rx": netif.RX_RING_ENTRY_SIZE,
}


# --- building and running the C side -----------------------------------------


class CSide:
    def __init__(self, ring_abi: Path, index_watch: Path):
        self.ring_abi = ring_abi
        self.index_watch = index_watch

    def run(self, *args, expect_rc: int = 0) -> dict:
        done = subprocess.run(
            [str(self.ring_abi), *map(str, args)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == expect_rc, f"ring_abi {args}: rc={done.returncode}\n{done.stdout}{done.stderr}"
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def c_side(tmp_path_factory) -> CSide:
    missing = [h for h in REQUIRED_HEADERS if not (XEN_INCLUDE / h).is_file()]
    if missing:
        pytest.fail(
            f"Xen public headers missing ({', '.join(str(XEN_INCLUDE / h) for h in missing)}): "
            "install libxen-dev (apt-get install -y libxen-dev)"
        )
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: install gcc (apt-get install -y gcc)")
    out = tmp_path_factory.mktemp("abi")
    binaries = []
    for source in ("ring_abi.c", "index_watch.c"):
        binary = out / source.removesuffix(".c")
        build = subprocess.run(
            [gcc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", str(ABI_DIR / source), "-o", str(binary)],
            capture_output=True,
            text=True,
        )
        if build.returncode:
            pytest.fail(f"compiling {source} against libxen-dev failed:\n{build.stderr}")
        binaries.append(binary)
    return CSide(*binaries)


@pytest.fixture(scope="module")
def layout(c_side) -> dict:
    return c_side.run("layout")


class PageFile:
    """A ring page file shared by the Python side (mmap) and the C program."""

    def __init__(self, path: Path, order: int, fill: int = 0):
        self.path = path
        self.order = order
        self.size = ring_bytes_for_order(order)
        path.write_bytes(bytes([fill]) * self.size)
        self._file = open(path, "r+b")
        self.map = mmap.mmap(self._file.fileno(), self.size)
        self._rings = []

    def init_at(self, start: int) -> None:
        """SHARED_RING_INIT, then move every index to `start` as if that many
        requests had gone round already (event indexes armed for the next one)."""
        SharedRing.init(self.map)
        view = memoryview(self.map)[:16].cast("I")
        view[0] = view[2] = start % U32  # req_prod, rsp_prod
        view[1] = view[3] = (start + 1) % U32  # req_event, rsp_event
        view.release()

    def front(self, kind: str, start: int) -> FrontRing:
        ring = FrontRing(self.map, ENTRY_SIZES[kind], start_index=start)
        self._rings.append(ring)
        return ring

    def back(self, kind: str, start: int) -> BackRing:
        ring = BackRing(self.map, ENTRY_SIZES[kind], start_index=start)
        self._rings.append(ring)
        return ring

    def header(self) -> tuple[int, int, int, int]:
        view = memoryview(self.map)[:16].cast("I")
        try:
            return tuple(view)
        finally:
            view.release()

    def close(self) -> None:
        for ring in self._rings:
            ring.release()
        self.map.close()
        self._file.close()


@pytest.fixture
def page_file(tmp_path):
    opened = []

    def make(order: int = 0, fill: int = 0) -> PageFile:
        page = PageFile(tmp_path / f"page-{len(opened)}", order, fill)
        opened.append(page)
        return page

    yield make
    for page in opened:
        page.close()


# --- how the C program prints each message ------------------------------------


def blkif_as_c(request) -> dict:
    if isinstance(request, BlkifRequestDiscard):
        return {
            "operation": blkif.BLKIF_OP_DISCARD,
            "flag": request.flag,
            "handle": request.handle,
            "id": request.id,
            "sector_number": request.sector_number,
            "nr_sectors": request.nr_sectors,
        }
    if isinstance(request, BlkifRequestIndirect):
        grefs = list(request.indirect_grefs) + [0] * (8 - len(request.indirect_grefs))
        return {
            "operation": blkif.BLKIF_OP_INDIRECT,
            "indirect_op": request.indirect_op,
            "nr_segments": request.nr_segments,
            "handle": request.handle,
            "id": request.id,
            "sector_number": request.sector_number,
            "indirect_grefs": grefs,
        }
    return {
        "operation": request.operation,
        "nr_segments": request.nr_segments,
        "handle": request.handle,
        "id": request.id,
        "sector_number": request.sector_number,
        "seg": [asdict(s) for s in request.segments],
    }


def netif_tx_as_c(message) -> dict:
    if isinstance(message, NetifTxRequest):
        return {"kind": "netif_tx_request", **asdict(message)}
    printed = {"kind": "netif_extra_info", "type": message.type, "flags": message.flags, "u": list(message.union_bytes)}
    if message.type == netif.XEN_NETIF_EXTRA_TYPE_GSO:
        gso = message.gso()
        printed.update(gso_size=gso.size, gso_type=gso.type, gso_features=gso.features)
    return printed


def blkif_status_for(operation: int) -> int:
    """The C back end's answer rule (blkif_status_for in ring_abi.c)."""
    if operation in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE, blkif.BLKIF_OP_DISCARD, blkif.BLKIF_OP_INDIRECT):
        return blkif.BLKIF_RSP_OKAY
    if operation in (blkif.BLKIF_OP_WRITE_BARRIER, blkif.BLKIF_OP_FLUSH_DISKCACHE):
        return blkif.BLKIF_RSP_EOPNOTSUPP
    return blkif.BLKIF_RSP_ERROR


def take_tx_slots(back: BackRing) -> list:
    """A netback's reading of the tx ring: extra-info slots follow a request
    flagged NETTXF_extra_info, and further ones while FLAG_MORE is set."""
    messages, extras_follow = [], False
    while back.unconsumed_requests():
        slot = back.take_request()
        if extras_follow:
            extra = NetifExtraInfo.decode(slot)
            extras_follow = extra.more
            messages.append(extra)
        else:
            request = NetifTxRequest.decode(slot)
            extras_follow = bool(request.flags & netif.NETTXF_extra_info)
            messages.append(request)
    return messages


# --- layout -----------------------------------------------------------------


def test_native_protocol_is_x86_64_abi(layout):
    assert layout["protocol"] == blkif.PROTOCOL == blkif.XEN_IO_PROTO_ABI_X86_64


def test_every_struct_size_matches_c(layout):
    assert {**blkif.STRUCT_SIZES, **netif.STRUCT_SIZES} == layout["sizes"]


def test_every_field_offset_and_size_matches_c(layout):
    c_fields = {
        name: (f["offset"], f["size"]) for name, f in layout["fields"].items() if not name.split(".")[0].endswith("_sring")
    }
    assert {**blkif.FIELDS, **netif.FIELDS} == c_fields


def test_shared_ring_header_matches_c(layout):
    fields = {name.split(".", 1)[1]: (f["offset"], f["size"]) for name, f in layout["fields"].items() if name.startswith("blkif_sring.")}
    assert fields["req_prod"] == (ring_module.REQ_PROD_OFFSET, 4)
    assert fields["req_event"] == (ring_module.REQ_EVENT_OFFSET, 4)
    assert fields["rsp_prod"] == (ring_module.RSP_PROD_OFFSET, 4)
    assert fields["rsp_event"] == (ring_module.RSP_EVENT_OFFSET, 4)
    assert fields["pvt"] == (ring_module.PVT_OFFSET, ring_module.PVT_SIZE)
    assert fields["__pad"] == (ring_module.PAD_OFFSET, ring_module.PAD_SIZE)
    for kind in ENTRY_SIZES:
        assert layout["fields"][f"{kind}_sring.ring"] == {"offset": ring_module.RING_HEADER_SIZE, "size": ENTRY_SIZES[kind]}


@pytest.mark.parametrize("kind", ENTRY_SIZES)
def test_ring_sizes_at_orders_0_to_3_match_c(layout, kind):
    python_sizes = [ring_size(ENTRY_SIZES[kind], ring_bytes_for_order(order)) for order in range(4)]
    assert python_sizes == layout["ring_sizes"][kind]
    helper = {"blkif": blkif.blkif_ring_size, "netif_tx": netif.tx_ring_size, "netif_rx": netif.rx_ring_size}[kind]
    assert [helper(order) for order in range(4)] == python_sizes


def test_every_header_constant_has_the_same_value_in_python(layout):
    for name, value in layout["constants"].items():
        module = blkif if name.startswith(("BLKIF_", "VDISK_")) else netif
        assert getattr(module, name) == value, name


def test_shared_ring_init_writes_the_same_bytes_as_c(c_side, page_file):
    page = page_file(fill=0xAA)
    subprocess.run([str(c_side.ring_abi), "init", str(page.path), "0"], check=True)
    python_page = bytearray(b"\xaa" * 4096)
    SharedRing.init(python_page)
    assert page.map[:] == bytes(python_page)


# --- Python front, C back -----------------------------------------------------

BLKIF_REQUESTS = [
    BlkifRequest(blkif.BLKIF_OP_READ, 51712, 0xFFFFFFFFFFFFFFFF, 0, tuple(Segment(0x100 + i, i % 8, 7) for i in range(11))),
    BlkifRequest(blkif.BLKIF_OP_WRITE, 51728, 2, 2**63 + 5, (Segment(0xFFFFFFFF, 0, 0),)),
    BlkifRequestDiscard(handle=51712, id=3, sector_number=2**40, nr_sectors=2**33, flag=blkif.BLKIF_DISCARD_SECURE),
    BlkifRequestIndirect(blkif.BLKIF_OP_WRITE, 1500, 51712, 4, 2**20, (9001, 9002, 9003)),
    BlkifRequest(blkif.BLKIF_OP_FLUSH_DISKCACHE, 51712, 5, 0),
    BlkifRequest(blkif.BLKIF_OP_WRITE_BARRIER, 51712, 6, 0),
    BlkifRequest(0x7F, 0xFFFF, 7, 1),  # unknown operation: answered BLKIF_RSP_ERROR
]


@pytest.mark.parametrize("order, start", [(0, 0), (0, U32 - 3), (1, U32 - 40), (2, 0x7FFFFFFE)])
def test_blkif_python_front_to_xen_back(c_side, page_file, order, start):
    page = page_file(order)
    page.init_at(start)
    front = page.front("blkif", start)
    requests = BLKIF_REQUESTS * 2  # 14: crosses the wrap for start = 2**32 - 3
    for request in requests:
        front.put_request(request.encode())
    assert not front.final_check_for_responses()  # arms rsp_event: C must notify us
    assert front.push_requests_and_check_notify()  # req_event = start + 1

    back = c_side.run("back", "blkif", page.path, order, start)

    assert back["requests"] == [blkif_as_c(r) for r in requests]
    assert back["ring_size"] == blkif.blkif_ring_size(order)
    assert back["notify"] is True
    assert back["more_requests"] is False
    assert back["rsp_prod"] == (start + len(requests)) % U32
    assert back["req_event"] == (start + len(requests) + 1) % U32  # re-armed by RING_FINAL_CHECK_FOR_REQUESTS
    assert front.unconsumed_responses() == len(requests)
    responses = [BlkifResponse.decode(front.take_response()) for _ in requests]
    assert responses == [BlkifResponse(r.id, r.operation, blkif_status_for(r.operation)) for r in requests]
    # The back re-armed req_event: the next push must notify, the one after need not.
    front.put_request(BLKIF_REQUESTS[0].encode())
    assert front.push_requests_and_check_notify()
    front.put_request(BLKIF_REQUESTS[1].encode())
    assert not front.push_requests_and_check_notify()


def test_netif_tx_python_front_to_xen_back_with_extra_info(c_side, page_file):
    start = U32 - 2
    page = page_file()
    page.init_at(start)
    front = page.front("netif_tx", start)
    mac = bytes.fromhex("3333000000fb")
    slots = [
        NetifTxRequest(gref=0x1234, offset=0, flags=netif.NETTXF_extra_info | netif.NETTXF_more_data | netif.NETTXF_csum_blank, id=1, size=9000),
        NetifExtraInfo.for_gso(ExtraGso(1448, netif.XEN_NETIF_GSO_TYPE_TCPV4), flags=netif.XEN_NETIF_EXTRA_FLAG_MORE),
        NetifExtraInfo.for_mcast(True, mac),
        NetifTxRequest(gref=0x1235, offset=2048, flags=0, id=2, size=2048),
        NetifTxRequest(gref=0xFFFFFFFF, offset=4095, flags=netif.NETTXF_data_validated, id=0xFFFF, size=netif.XEN_NETIF_MAX_TX_SIZE),
    ]
    for slot in slots:
        front.put_request(slot.encode())
    front.final_check_for_responses()
    assert front.push_requests_and_check_notify()

    back = c_side.run("back", "netif_tx", page.path, 0, start)

    assert back["requests"] == [netif_tx_as_c(s) for s in slots]
    assert back["notify"] is True
    responses = [NetifTxResponse.decode(front.take_response()) for _ in slots]
    assert [r.status for r in responses] == [0, netif.NETIF_RSP_NULL, netif.NETIF_RSP_NULL, 0, 0]
    assert [r.id for r in responses if r.status != netif.NETIF_RSP_NULL] == [1, 2, 0xFFFF]


def test_netif_rx_python_front_to_xen_back_with_gso_extra_in_a_response_slot(c_side, page_file):
    start = U32 - 1
    page = page_file(order=1)
    page.init_at(start)
    front = page.front("netif_rx", start)
    posted = [NetifRxRequest(id=i, gref=0x5000 + i) for i in range(6)]
    for request in posted:
        front.put_request(request.encode())
    front.final_check_for_responses()
    front.push_requests_and_check_notify()

    back = c_side.run("back", "netif_rx", page.path, 1, start)

    assert back["requests"] == [{"id": r.id, "gref": r.gref} for r in posted]
    first = NetifRxResponse.decode(front.take_response())
    assert first == NetifRxResponse(0, 0, netif.NETRXF_data_validated | netif.NETRXF_extra_info, 60)
    extra = NetifExtraInfo.decode(front.take_response())  # the next slot, because of NETRXF_extra_info
    assert (extra.type, extra.gso()) == (netif.XEN_NETIF_EXTRA_TYPE_GSO, ExtraGso(1448, netif.XEN_NETIF_GSO_TYPE_TCPV4))
    rest = [NetifRxResponse.decode(front.take_response()) for _ in range(4)]
    assert rest == [NetifRxResponse(k, 0, netif.NETRXF_data_validated, 60 + k) for k in range(2, 6)]


# --- C front, Python back -----------------------------------------------------


@pytest.mark.parametrize("order, start", [(0, 0), (0, U32 - 5), (2, U32 - 100)])
def test_blkif_xen_front_to_python_back(c_side, page_file, order, start):
    page = page_file(order)
    page.init_at(start)
    count = 9

    front = c_side.run("front", "blkif", page.path, order, count)

    assert front["notify"] is True  # req_event = start + 1
    back = page.back("blkif", start)
    assert back.unconsumed_requests() == count
    decoded = [decode_request(back.take_request()) for _ in range(count)]
    assert [blkif_as_c(r) for r in decoded] == front["requests"]
    kinds = [type(r) for r in decoded]
    assert kinds[:3] == [BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect]
    for request in decoded:
        back.put_response(BlkifResponse(request.id, request.operation, blkif_status_for(request.operation)).encode())
    assert back.push_responses_and_check_notify()  # rsp_event = start + 1
    assert not back.final_check_for_requests()

    collected = c_side.run("front-responses", "blkif", page.path, order, start)

    assert collected["responses"] == [
        {"id": r.id, "operation": r.operation, "status": blkif_status_for(r.operation)} for r in decoded
    ]
    assert collected["more_responses"] is False
    assert collected["rsp_event"] == (start + count + 1) % U32
    assert page.header()[1] == (start + count + 1) % U32  # our req_event, as the C front saw it


def test_netif_tx_xen_front_to_python_back(c_side, page_file):
    start = U32 - 1
    page = page_file()
    page.init_at(start)

    front = c_side.run("front", "netif_tx", page.path, 0, 5)

    back = page.back("netif_tx", start)
    messages = take_tx_slots(back)
    assert [netif_tx_as_c(m) for m in messages] == front["requests"]
    assert isinstance(messages[1], NetifExtraInfo) and messages[1].gso().type == netif.XEN_NETIF_GSO_TYPE_TCPV6
    for message in messages:
        if isinstance(message, NetifTxRequest):
            back.put_response(NetifTxResponse(message.id, netif.NETIF_RSP_OKAY).encode())
        else:
            back.put_response(NetifTxResponse(0, netif.NETIF_RSP_NULL).encode())
    back.push_responses()

    collected = c_side.run("front-responses", "netif_tx", page.path, 0, start)

    assert collected["responses"] == [
        {"id": 0x100, "status": 0},
        {"id": 0, "status": netif.NETIF_RSP_NULL},
        {"id": 0x102, "status": 0},
        {"id": 0x103, "status": 0},
        {"id": 0x104, "status": 0},
    ]


def test_netif_rx_xen_front_to_python_back(c_side, page_file):
    start = 1000
    page = page_file(order=1)
    page.init_at(start)

    front = c_side.run("front", "netif_rx", page.path, 1, 300)  # more than one page's 256 slots

    back = page.back("netif_rx", start)
    posted = [NetifRxRequest.decode(back.take_request()) for _ in range(back.unconsumed_requests())]
    assert [{"id": r.id, "gref": r.gref} for r in posted] == front["requests"]
    assert len(posted) == 300
    for request in posted:
        back.put_response(NetifRxResponse(request.id, 14, netif.NETRXF_csum_blank, 1514).encode())
    back.push_responses()

    collected = c_side.run("front-responses", "netif_rx", page.path, 1, start)

    assert collected["responses"] == [
        {"id": r.id, "offset": 14, "flags": netif.NETRXF_csum_blank, "status": 1514} for r in posted
    ]


# --- overflow: C and Python refuse the same producer indexes -------------------


@pytest.mark.parametrize("ahead", [0, 31, 32, 33, 1000, U32 // 2, U32 - 1])
@pytest.mark.parametrize("start", [0, U32 - 7])
def test_request_overflow_verdict_agrees_with_ring_h(c_side, page_file, ahead, start):
    page = page_file()
    page.init_at(start)
    view = memoryview(page.map)[:4].cast("I")
    view[0] = (start + ahead) % U32  # the frontend claims `ahead` requests
    view.release()
    python_refuses = False
    try:
        page.back("blkif", start).unconsumed_requests()
    except RingOverflow:
        python_refuses = True

    verdict = c_side.run("back", "blkif", page.path, 0, start, expect_rc=3 if python_refuses else 0)

    assert python_refuses is (ahead > blkif.blkif_ring_size(0))
    if python_refuses:
        assert verdict["error"] == "RING_REQUEST_PROD_OVERFLOW"


def test_response_overflow_verdict_agrees_with_ring_h(c_side, page_file):
    start = 50
    page = page_file()
    page.init_at(start)
    view = memoryview(page.map)[:16].cast("I")
    view[2] = start + 33  # the backend claims 33 responses on a 32-slot ring
    view.release()
    with pytest.raises(RingOverflow):
        page.front("blkif", start).unconsumed_responses()
    assert c_side.run("front-responses", "blkif", page.path, 0, start, expect_rc=3)["error"] == (
        "RING_RESPONSE_PROD_OVERFLOW"
    )


# --- index stores are atomic as seen from another process --------------------


def test_the_peer_never_sees_a_torn_or_transient_index(c_side, page_file):
    page = page_file()
    sring = SharedRing(page.map, blkif.RING_ENTRY_SIZE)
    first, second = 0xAAAAAAAA, 0x55555555  # every byte differs, so any mixture shows
    sring.req_prod = first
    watcher = subprocess.Popen(
        [str(c_side.index_watch), str(page.path), hex(first), hex(second), "0.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout.readline().strip() == "ready"
        stop = threading.Event()
        done = threading.Thread(target=lambda: (watcher.wait(), stop.set()))
        done.start()
        stores = 0
        while not stop.is_set():
            for _ in range(1000):
                sring.req_prod = second
                sring.req_prod = first
            stores += 2000
        done.join()
        seen = json.loads(watcher.stdout.read())
    finally:
        if watcher.poll() is None:
            watcher.kill()
        sring.release()
    assert stores > 10_000 and seen["reads"] > 1_000_000
    assert seen["other_values"] == 0, f"peer saw {seen['first_other']:#x}"
