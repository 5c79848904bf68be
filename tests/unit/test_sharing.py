"""Guest memory, grants and event channels as the hypervisor serves them,
with real page files in a temporary folder (no Docker, no sockets)."""

import mmap
import os
from dataclasses import dataclass, field

import pytest

from xenbed.hypervisor.domains import DomainError
from xenbed.hypervisor.sharing import LinkResources, Reply, Sharing
from xenbed.protocols import hypercall as hc


@dataclass
class FakeDomain:  # only what the handlers read
    domid: int

    @property
    def is_control(self) -> bool:
        return self.domid == 0


@dataclass(eq=False)
class Link:
    domain: FakeDomain
    resources: LinkResources = field(default_factory=LinkResources)
    after_reply: list = field(default_factory=list)
    upcalls: list = field(default_factory=list)

    def settle(self):
        while self.after_reply:
            self.after_reply.pop(0)()


def call(sharing, link, op, **body):
    result = Sharing.HANDLERS[op](sharing, link, hc.call(op, 1, body))
    link.settle()
    return result


@pytest.fixture
def world(tmp_path):
    sharing = Sharing(str(tmp_path))
    sharing.deliver = lambda link, frame: link.upcalls.append(frame.body)
    sharing.add_domain(0, 4, privileged=True)
    sharing.add_domain(1, 1, privileged=False)
    sharing.add_domain(2, 1, privileged=False)
    links = {d: Link(FakeDomain(d)) for d in (0, 1, 2)}
    yield sharing, links


def test_pages_come_as_descriptors_and_memory_is_bounded(world):
    sharing, links = world
    reply = call(sharing, links[1], hc.Call.MEM_ALLOC, count=2)
    assert isinstance(reply, Reply) and len(reply.fds) == 2
    page = mmap.mmap(reply.fds[0], 4096)
    page[:5] = b"hello"
    assert sharing.memory.read(1, reply.body["gfns"][0], 0, 5) == b"hello"
    for fd in reply.fds:
        os.close(fd)
    with pytest.raises(DomainError) as refused:
        for _ in range(8):
            for fd in call(sharing, links[1], hc.Call.MEM_ALLOC, count=64).fds:
                os.close(fd)
    assert refused.value.code == "ENOMEM"  # 1 MiB = 256 pages


def test_a_readonly_grant_maps_as_a_readonly_descriptor(world):
    sharing, links = world
    alloc = call(sharing, links[1], hc.Call.MEM_ALLOC, count=1)
    gfn = alloc.body["gfns"][0]
    os.close(alloc.fds[0])
    gref = call(sharing, links[1], hc.Call.GNTTAB_GRANT, domid=2, gfn=gfn, readonly=True)["gref"]
    with pytest.raises(DomainError) as refused:
        call(sharing, links[0], hc.Call.GNTTAB_MAP, domid=1, gref=gref, readonly=True)
    assert refused.value.code == "GNTST_general_error"  # offered to dom2, not dom0
    mapped = call(sharing, links[2], hc.Call.GNTTAB_MAP, domid=1, gref=gref, readonly=True)
    with pytest.raises(PermissionError):  # the kernel refuses, not our code
        mmap.mmap(mapped.fds[0], 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(mapped.fds[0])
    with pytest.raises(DomainError) as refused:
        call(sharing, links[1], hc.Call.GNTTAB_END, gref=gref)
    assert refused.value.code == "GNTST_eagain"  # revoking a mapped grant


def test_a_closed_link_leaves_nothing_behind(world):
    sharing, links = world
    alloc = call(sharing, links[1], hc.Call.MEM_ALLOC, count=1)
    os.close(alloc.fds[0])
    gref = call(sharing, links[1], hc.Call.GNTTAB_GRANT, domid=2, gfn=alloc.body["gfns"][0])["gref"]
    port = call(sharing, links[1], hc.Call.EVTCHN_ALLOC_UNBOUND, remote_dom=2)["port"]
    mapped = call(sharing, links[2], hc.Call.GNTTAB_MAP, domid=1, gref=gref)
    os.close(mapped.fds[0])
    local = call(sharing, links[2], hc.Call.EVTCHN_BIND_INTERDOMAIN, remote_dom=1, remote_port=port)["port"]
    assert links[2].upcalls == [{"port": local}]  # a newly bound port starts pending
    sharing.release_link(2, links[2].resources)  # the backend process died
    assert sharing.gnttab.active_mappings() == []
    assert sharing.evtchn.status(1, port)["status"] == "unbound"
    sharing.release_link(1, links[1].resources)
    assert sharing.evtchn.ports_of(1) == [] and sharing.gnttab.table(1).granted_refs() == []


def test_events_go_to_the_owning_link_and_coalesce(world):
    sharing, links = world
    port = call(sharing, links[1], hc.Call.EVTCHN_ALLOC_UNBOUND, remote_dom=2)["port"]
    local = call(sharing, links[2], hc.Call.EVTCHN_BIND_INTERDOMAIN, remote_dom=1, remote_port=port)["port"]
    call(sharing, links[2], hc.Call.EVTCHN_CLEAR, port=local)
    call(sharing, links[1], hc.Call.EVTCHN_SEND, port=port)
    call(sharing, links[1], hc.Call.EVTCHN_SEND, port=port)  # still pending: no second upcall
    assert links[2].upcalls == [{"port": local}, {"port": local}]
    assert links[1].upcalls == []


def test_grant_copy_moves_bytes_between_page_files(world):
    sharing, links = world
    a = call(sharing, links[1], hc.Call.MEM_ALLOC, count=1)
    b = call(sharing, links[0], hc.Call.MEM_ALLOC, count=1)
    for fd in a.fds + b.fds:
        os.close(fd)
    sharing.memory.write(0, b.body["gfns"][0], 100, b"frame!")
    gref = call(sharing, links[1], hc.Call.GNTTAB_GRANT, domid=0, gfn=a.body["gfns"][0])["gref"]
    op = {"src": {"gfn": b.body["gfns"][0], "offset": 100}, "dst": {"domid": 1, "gref": gref, "offset": 10}, "len": 6}
    assert call(sharing, links[0], hc.Call.GNTTAB_COPY, ops=[op])["statuses"] == [0]
    assert sharing.memory.read(1, a.body["gfns"][0], 10, 6) == b"frame!"
    op["len"] = 4096  # past the page
    assert call(sharing, links[0], hc.Call.GNTTAB_COPY, ops=[op])["statuses"] == [-10]  # GNTST_bad_copy_arg


def test_a_dying_domains_grants_cannot_be_mapped(world):
    sharing, links = world
    alloc = call(sharing, links[1], hc.Call.MEM_ALLOC, count=1)
    os.close(alloc.fds[0])
    gref = call(sharing, links[1], hc.Call.GNTTAB_GRANT, domid=2, gfn=alloc.body["gfns"][0])["gref"]
    sharing.domain_dying(1)
    with pytest.raises(DomainError):
        call(sharing, links[2], hc.Call.GNTTAB_MAP, domid=1, gref=gref)


def test_the_toolstack_lists_and_populates_a_guests_pages_for_migration(world):
    sharing, links = world
    reply = call(sharing, links[1], hc.Call.MEM_ALLOC, count=3)
    for fd in reply.fds:
        os.close(fd)
    listed = call(sharing, links[0], hc.Call.MEM_LIST, domid=1)
    assert listed == {"gfns": [0, 1, 2], "max_pages": 256}
    populated = call(sharing, links[0], hc.Call.MEM_POPULATE, domid=2, gfns=[7, 0, 7])
    assert sorted(os.listdir(populated["path"])) == ["0", "7"]
    assert call(sharing, links[0], hc.Call.MEM_LIST, domid=2)["gfns"] == [0, 7]
    with open(os.path.join(populated["path"], "7"), "r+b") as page:  # dom0's mount: the contents
        page.write(b"moved")
    assert sharing.memory.read(2, 7, 0, 5) == b"moved"
    for op, body in ((hc.Call.MEM_LIST, {"domid": 2}), (hc.Call.MEM_POPULATE, {"domid": 2, "gfns": [1]})):
        with pytest.raises(DomainError) as refused:
            call(sharing, links[1], op, **body)
        assert refused.value.code == "EPERM"  # a guest may not look at or grow another's memory
    with pytest.raises(DomainError) as refused:
        call(sharing, links[0], hc.Call.MEM_POPULATE, domid=2, gfns=[256])
    assert refused.value.code == "EINVAL"
