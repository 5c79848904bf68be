"""The calls by which domains share memory and signal each other: guest
memory, grant table v1 and event channels, over the hypervisor socket.

The decisions are made by the pure cores (`gnttab`, `evtchn`); this module
turns calls into core operations, core results into replies, and moves the
bytes and descriptors the cores only talk about (page files, SCM_RIGHTS).

Ownership follows Linux's device files: ports, grants and mappings belong to
the link (an open "device") that made them.  When a link closes, its mappings
are unmapped, its ports closed (their peers go back to unbound) and its grants
ended where nobody maps them any more -- so a killed driver process leaks
nothing.  Upcalls for a port go to the link that owns it.

Every grant and event-channel operation that changes who shares what with
whom is told to `self.tracer` (trace.py) after it happened: grant, map,
unmap, end, copy, set_entry; alloc_unbound, bind, send (upcall, coalesced or
dropped), unmask, close, also those done for a closing link (`why`).
Refusals are recorded by the server, which sees them all in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from xenbed.hypervisor import gnttab as gt
from xenbed.hypervisor.domains import DomainError
from xenbed.hypervisor.evtchn import DOMID_SELF, EventChannels, EvtchnError, Notify
from xenbed.hypervisor.memory import GuestMemory, MemoryError_
from xenbed.hypervisor.ports import FastLink, PortFds, drain, is_set, ring
from xenbed.hypervisor.trace import Tracer
from xenbed.protocols import gntbatch as gb
from xenbed.protocols import hypercall as hc
from xenbed.protocols import sendlog
from xenbed.protocols.gntst import GNTST_NAMES

log = logging.getLogger("xenbed.hypervisor.sharing")

MAX_PAGES_PER_CALL = 64


class GrantRefused(DomainError):
    """A grant-table call answered with a GNTST status other than okay."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(GNTST_NAMES.get(status, f"GNTST_{status}"), f"{what}: {gt.gntst_message(status)}")
        self.status = status


@dataclass
class Reply:
    """A call's result that carries descriptors too.  `owned`: the server
    closes them once sent; not for descriptors GuestMemory keeps open."""

    body: dict | bytes
    fds: list[int] = field(default_factory=list)
    owned: bool = True


@dataclass
class LinkResources:
    """What one link made, to be undone when it closes."""

    ports: set[int] = field(default_factory=set)
    grants: set[int] = field(default_factory=set)
    mappings: set[int] = field(default_factory=set)
    # fd mode (HELLO with "evtchn": "fd"): doorbell and send log (ports.py)
    fast: FastLink | None = None


def _port(body) -> int:
    port = body["port"]
    if not isinstance(port, int) or isinstance(port, bool):
        raise ValueError(f"port must be an integer, not {port!r}")
    return port


class Sharing:
    def __init__(self, memory_root: str) -> None:
        self.memory = GuestMemory(memory_root)
        self.gnttab = gt.Gnttab()
        self.evtchn = EventChannels(is_privileged=self._is_privileged)
        self.port_owner: dict[tuple[int, int], object] = {}
        self.port_fds = PortFds()  # pending bits of fd-mode ports (ports.py)
        self._privileged: set[int] = set()
        self.deliver = None  # set by the server: deliver(link, frame)
        self.tracer = Tracer.disabled()  # set by the server
        # Suspended domains do not run, so they get no upcalls: a send to
        # them sets the port pending as always and the upcall is held here
        # (domid -> ports) until the domain resumes (Xen: the pending bit
        # stays set and the guest sees it when it runs again).
        self.held_upcalls: dict[int, set[int]] = {}

    # -- domain lifecycle --------------------------------------------------------
    def add_domain(self, domid: int, memory_mb: int, privileged: bool) -> None:
        self.memory.add_domain(domid, memory_mb)
        self.gnttab.add_domain(domid, nr_pages=self.memory.max_pages(domid))
        self.evtchn.add_domain(domid)
        if privileged:
            self._privileged.add(domid)

    def _is_privileged(self, caller: int, target: int) -> bool:
        return caller in self._privileged

    def domain_dying(self, domid: int) -> None:
        """Its ports close (peers see unbound), its grants can no longer be
        mapped; pages others map stay valid until they unmap."""
        self.gnttab.domain_dying(domid)
        for peer, peer_port in self.evtchn.domain_dying(domid):
            self._unbound(peer, peer_port)
        self.port_fds.close_domain(domid)
        for key in [k for k in self.port_owner if k[0] == domid]:
            del self.port_owner[key]

    def domain_destroyed(self, domid: int) -> None:
        holders = self.gnttab.domain_destroyed(domid)
        if holders:
            log.info("dom%d destroyed while domains %s still map its pages", domid, list(holders))
        self.evtchn.domain_destroyed(domid)
        self.memory.remove_domain(domid)  # mapped pages live on in their mappers' fds
        self._privileged.discard(domid)

    def release_link(self, domid: int, resources: LinkResources) -> None:
        tracer = self.tracer
        why = "link closed"
        for handle in sorted(resources.mappings):
            mapping = self.gnttab.mapping(domid, handle) if tracer.enabled else None
            status = self.gnttab.unmap(domid, handle)
            if mapping is not None:
                tracer.grant("unmap", domid, granter=mapping.granter, ref=mapping.gref, handle=handle,
                             status=status, why=why)
        if resources.fast is not None:
            self._drain_sendlog(domid, resources.fast)
        for port in sorted(resources.ports):
            try:
                self._close_port(domid, port)
            except EvtchnError:
                pass  # already closed with its domain
            else:
                tracer.evtchn("close", domid, port=port, why=why)
            self.port_owner.pop((domid, port), None)
        for gref in sorted(resources.grants):
            try:
                ended = self.gnttab.end_access(domid, gref)
            except gt.GnttabUsageError:
                continue  # the domain is gone already
            tracer.grant("end", domid, ref=gref, status=ended.status, why=why)
            if not ended.ok:
                log.info("dom%d grant %d still mapped by %s after its link closed", domid, gref, ended.mappers)
        resources.ports.clear()
        resources.grants.clear()
        resources.mappings.clear()
        if resources.fast is not None:
            resources.fast.close()
            resources.fast = None

    def suspend_domain(self, domid: int) -> None:
        self.held_upcalls.setdefault(domid, set())

    def resume_domain(self, domid: int, deliver: bool = True) -> None:
        """The domain runs again: the upcalls held meanwhile, for the ports
        still open and pending (a port closed since is gone with its event)."""
        held = self.held_upcalls.pop(domid, set())
        if not deliver:
            return
        for port in sorted(held):
            try:
                st = self.evtchn.status(domid, port, caller=domid)
            except EvtchnError:
                continue
            fd = self.port_fds.get(domid, port)
            if fd is not None:
                ring(fd)  # what was held was a hypervisor-made event; the owner polls the bit
            elif st.get("pending") and not st.get("masked"):
                self._notify(Notify(domid, port))

    def _notify(self, notify: Notify | None) -> None:
        if notify is None:
            return
        held = self.held_upcalls.get(notify.domid)
        if held is not None:
            held.add(notify.port)
            return
        fd = self.port_fds.get(notify.domid, notify.port)
        if fd is not None:
            ring(fd)
            return
        owner = self.port_owner.get((notify.domid, notify.port))
        if owner is not None and self.deliver is not None:
            self.deliver(owner, hc.upcall(hc.Call.UP_EVTCHN, {"port": notify.port}))

    # -- memory --------------------------------------------------------------------
    def mem_alloc(self, link, frame):
        count = frame.body.get("count", 1)
        if not isinstance(count, int) or not 1 <= count <= MAX_PAGES_PER_CALL:
            raise DomainError("EINVAL", f"count must be 1..{MAX_PAGES_PER_CALL}, not {count!r}")
        try:
            pages = self.memory.alloc(link.domain.domid, count)
        except MemoryError_ as exc:
            raise DomainError(exc.code, exc.message) from None
        return Reply({"gfns": [g for g, _ in pages]}, [fd for _, fd in pages])

    def mem_list(self, link, frame):
        domid = self._foreign_memory(link, frame, "list the pages of")
        return {"gfns": sorted(self.memory.pages(domid)), "max_pages": self.memory.max_pages(domid)}

    def mem_populate(self, link, frame):
        domid = self._foreign_memory(link, frame, "populate")
        gfns, remove = frame.body.get("gfns"), frame.body.get("remove", [])
        if not isinstance(gfns, list) or not isinstance(remove, list):
            raise DomainError("EINVAL", "gfns and remove must be lists")
        try:
            self.memory.populate(domid, gfns, remove)
        except MemoryError_ as exc:
            raise DomainError(exc.code, exc.message) from None
        return {"path": self.memory.folder(domid)}

    def _foreign_memory(self, link, frame, what: str) -> int:
        if not link.domain.is_control:
            raise DomainError("EPERM", f"only the control domain may {what} another domain's memory")
        domid = frame.body.get("domid")
        if not isinstance(domid, int) or domid not in self.memory._pages:
            raise DomainError("ESRCH", f"no domain {domid!r} with memory")
        return domid

    def mem_map(self, link, frame):
        try:
            fd = self.memory.open_page(link.domain.domid, int(frame.body["gfn"]), writable=True)
        except MemoryError_ as exc:
            raise DomainError(exc.code, exc.message) from None
        return Reply({}, [fd])

    def mem_free(self, link, frame):
        domid = link.domain.domid
        gfns = [int(g) for g in frame.body["gfns"]]
        table = self.gnttab.table(domid)
        granted = {table.entry(r).frame for r in table.granted_refs()}
        busy = sorted(set(gfns) & granted)
        if busy:
            raise DomainError("EBUSY", f"pages {busy} are still granted")
        self.memory.free(domid, gfns)
        return {}

    # -- grant table ---------------------------------------------------------------
    def grant(self, link, frame):
        domid = link.domain.domid
        gfn = int(frame.body["gfn"])
        if not self.memory.has_page(domid, gfn):
            raise GrantRefused(gt.GNTST_bad_page, f"dom{domid} has no page {gfn}")
        granted = self.gnttab.table(domid).grant_access(int(frame.body["domid"]), gfn,
                                                         bool(frame.body.get("readonly", False)))
        if not granted.ok:
            raise GrantRefused(granted.status, "grant")
        link.resources.grants.add(granted.gref)
        self.tracer.grant("grant", domid, to=int(frame.body["domid"]), ref=granted.gref, gfn=gfn,
                          readonly=bool(frame.body.get("readonly", False)), status=granted.status)
        return {"gref": granted.gref}

    def set_entry(self, link, frame):
        b = frame.body
        status = self.gnttab.table(link.domain.domid).set_entry(int(b["gref"]), int(b["flags"]), int(b["domid"]),
                                                                int(b["frame"]))
        if status != gt.GNTST_okay:
            raise GrantRefused(status, "set entry")
        link.resources.grants.add(int(b["gref"]))
        self.tracer.grant("set_entry", link.domain.domid, ref=int(b["gref"]), to=int(b["domid"]),
                          flags=int(b["flags"]), gfn=int(b["frame"]), status=status)
        return {}

    def end(self, link, frame):
        gref = int(frame.body["gref"])
        ended = self.gnttab.end_access(link.domain.domid, gref)
        if not ended.ok:
            raise GrantRefused(ended.status, f"end access to gref {gref} (mapped by {list(ended.mappers)})")
        link.resources.grants.discard(gref)
        self.tracer.grant("end", link.domain.domid, ref=gref, status=ended.status)
        return {}

    def map(self, link, frame):
        granter, gref = int(frame.body["domid"]), int(frame.body["gref"])
        readonly = bool(frame.body.get("readonly", False))
        status, handle, gfn, fd = self._map_one(link, granter, gref, readonly)
        if status != gt.GNTST_okay:
            raise GrantRefused(status, f"map dom{granter} gref {gref}")
        return Reply({"handle": handle, "gfn": gfn}, [fd], owned=False)

    def map_batch(self, link, frame):
        """GNTTAB_MAP_BATCH: each entry mapped on its own (one failing does
        not fail the others); one descriptor per mapped entry, in order."""
        results, fds = [], []
        ops = gb.decode_map(frame.body)
        for granter, flags, gref in ops:
            status, handle, gfn, fd = self._map_one(link, granter, gref, bool(flags & gb.GNTMAP_readonly),
                                                    batch=len(ops))
            results.append((status, handle, gfn))
            if fd is not None:
                fds.append(fd)
        return Reply(gb.encode_map_results(results), fds, owned=False)

    def _map_one(self, link, granter: int, gref: int, readonly: bool, **trace) -> tuple[int, int, int, int | None]:
        """(status, handle, gfn, descriptor) -- the descriptor is GuestMemory's
        (read-only for a read-only map), to be sent and not closed."""
        mapper = link.domain.domid
        result = self.gnttab.map(mapper, granter, gref, readonly)
        status, fd = result.status, None
        if result.ok:
            try:
                fd = self.memory.page_fd(granter, result.frame, writable=not readonly)
            except (MemoryError_, OSError):
                self.gnttab.unmap(mapper, result.handle)
                status = gt.GNTST_bad_page
        if fd is None:
            if trace and self.tracer.enabled:  # a single call's refusal is traced by the server
                self.tracer.grant("map", mapper, granter=granter, ref=gref, readonly=readonly, status=status,
                                  **trace)
            return status, 0, 0, None
        link.resources.mappings.add(result.handle)
        if self.tracer.enabled:
                self.tracer.grant("map", mapper, granter=granter, ref=gref, readonly=readonly, handle=result.handle,
                                  status=status, **trace)
        return status, result.handle, result.frame, fd

    def unmap(self, link, frame):
        handle = int(frame.body["handle"])
        status = self._unmap_one(link, handle)
        if status != gt.GNTST_okay:
            raise GrantRefused(status, f"unmap handle {handle}")
        return {}

    def unmap_batch(self, link, frame):
        handles = gb.decode_unmap(frame.body)
        return gb.encode_statuses([self._unmap_one(link, handle, batch=len(handles)) for handle in handles])

    def _unmap_one(self, link, handle: int, **trace) -> int:
        domid = link.domain.domid
        mapping = self.gnttab.mapping(domid, handle) if self.tracer.enabled else None
        status = self.gnttab.unmap(domid, handle)
        if status == gt.GNTST_okay:
            link.resources.mappings.discard(handle)
        if mapping is not None:
            self.tracer.grant("unmap", domid, granter=mapping.granter, ref=mapping.gref, handle=handle,
                              status=status, **trace)
        elif trace and self.tracer.enabled:
            self.tracer.grant("unmap", domid, handle=handle, status=status, **trace)
        return status

    def copy(self, link, frame):
        ops = frame.body["ops"]
        if not isinstance(ops, list) or len(ops) > gb.MAX_BATCH:
            raise DomainError("EINVAL", f"GNTTAB_COPY takes at most {gb.MAX_BATCH} ops per call")
        return {"statuses": self._copy(link, [self._raw_copy_op(op) for op in ops])}

    def copy_batch(self, link, frame):
        return gb.encode_statuses(self._copy(link, gb.decode_copy(frame.body)))

    def _copy(self, link, ops) -> list[int]:
        """ops: struct gnttab_copy as ints (gntbatch.COPY_OP's order); the
        grant table checks each, then its bytes move, before the next call."""
        caller = link.domain.domid
        statuses = self.memory.copy_many(ops, self.gnttab.copy_batch(caller, ops), gt.GNTST_okay, gt.GNTST_bad_page)
        if self.tracer.enabled:
            failed = [s for s in statuses if s != gt.GNTST_okay]
            self.tracer.grant("copy", caller, count=len(statuses), failed=len(failed),
                              status=failed[0] if failed else gt.GNTST_okay,
                              refs=sorted({(op[1], op[0]) for op in ops if op[7] & gb.GNTCOPY_source_gref}
                                          | {(op[4], op[3]) for op in ops if op[7] & gb.GNTCOPY_dest_gref})[:8])
        return statuses

    @staticmethod
    def _raw_copy_op(op: dict) -> tuple:
        """A JSON copy op as a struct gnttab_copy's ints: an end with "gref"
        is a grant of its "domid", else the caller's own "gfn" (DOMID_SELF)."""
        raw, flags = [], 0
        for end, flag in ((op["src"], gb.GNTCOPY_source_gref), (op["dst"], gb.GNTCOPY_dest_gref)):
            if "gref" in end:
                raw += (int(end["gref"]), int(end["domid"]), int(end["offset"]))
                flags |= flag
            else:
                raw += (int(end["gfn"]), gb.DOMID_SELF, int(end["offset"]))
        return (*raw, int(op["len"]), flags)

    def query_size(self, link, frame):
        nr, most = self.gnttab.query_size(link.domain.domid)
        return {"nr_frames": nr, "max_frames": most}

    # -- event channels ------------------------------------------------------------
    def _evtchn(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvtchnError as exc:
            raise DomainError(exc.code, str(exc)) from None

    def alloc_unbound(self, link, frame):
        domid = link.domain.domid
        port = self._evtchn(self.evtchn.alloc_unbound, domid, int(frame.body["remote_dom"]))
        link.resources.ports.add(port)
        self.port_owner[(domid, port)] = link
        self.tracer.evtchn("alloc_unbound", domid, remote_domid=int(frame.body["remote_dom"]), port=port)
        return {"port": port}

    def bind_interdomain(self, link, frame):
        domid = link.domain.domid
        remote_dom, remote_port = int(frame.body["remote_dom"]), int(frame.body["remote_port"])
        bound = self._evtchn(self.evtchn.bind_interdomain, domid, remote_dom, remote_port)
        link.resources.ports.add(bound.port)
        self.port_owner[(domid, bound.port)] = link
        self.tracer.evtchn("bind_interdomain", domid, remote_domid=remote_dom, remote_port=remote_port,
                           port=bound.port, upcall=bound.notify is not None)
        # A newly bound port starts pending: in fd mode its bit is set before
        # the reply, else the upcall follows the reply.  The unbound end's
        # owner learns its peer (and, in fd mode, gets its descriptors).
        peer = self.evtchn.route(domid, bound.port)
        fds = [self.port_fds.open(domid, bound.port, pending=True)] if link.resources.fast is not None else []
        self._bound(*peer, domid, bound.port)
        if not fds:
            link.after_reply.append(lambda: self._notify(bound.notify))
            return {"port": bound.port}
        peer_fd = self.port_fds.get(*peer)
        if peer_fd is not None:
            fds.append(peer_fd)
        # the port_fds table keeps them: the reply only lends them (owned=False)
        return Reply({"port": bound.port, "fds": ["in", "out"][:len(fds)]}, fds, owned=False)

    def _bound(self, domid: int, port: int, remote_dom: int, remote_port: int) -> None:
        """`domid`'s unbound `port` was just bound by `remote_dom`: in fd
        mode its owner gets a fresh pending bit (and the binder's, to send
        with) through UP_EVTCHN_BOUND."""
        owner = self.port_owner.get((domid, port))
        if owner is None or owner.resources.fast is None or self.deliver is None:
            return
        pending = bool(self.evtchn.status(domid, port, caller=domid).get("pending"))
        fds = [self.port_fds.open(domid, port, pending=pending)]
        binder_fd = self.port_fds.get(remote_dom, remote_port)
        if binder_fd is not None:
            fds.append(binder_fd)
        frame = hc.upcall(hc.Call.UP_EVTCHN_BOUND, {"port": port, "remote_dom": remote_dom,
                                                    "remote_port": remote_port, "fds": ["in", "out"][:len(fds)],
                                                    "nfds": len(fds)})
        frame.flags |= hc.CARRIES_FDS
        frame.fds = fds
        self.deliver(owner, frame)

    def _unbound(self, domid: int, port: int) -> None:
        """`domid`'s `port` went back to unbound (its peer closed or died):
        its pending bit's descriptor, which the old peer holds too, is
        closed, and its owner told to drop its copies (UP_EVTCHN_UNBOUND),
        so the old peer can no longer wake it.  A bit that was set stays set
        in the table (status still says pending)."""
        if self.port_fds.get(domid, port) is None:
            return
        self.port_fds.close(domid, port)
        owner = self.port_owner.get((domid, port))
        if owner is not None and self.deliver is not None:
            self.deliver(owner, hc.upcall(hc.Call.UP_EVTCHN_UNBOUND, {"port": port}))

    def _close_port(self, domid: int, port: int) -> None:
        peer = self.evtchn.route(domid, port)
        self.evtchn.close(domid, port)
        self.port_fds.close(domid, port)
        if peer is not None:
            self._unbound(*peer)

    def send(self, link, frame):
        domid, port = link.domain.domid, _port(frame.body)
        peer = self._evtchn(self.evtchn.route, domid, port)
        peer_fd = self.port_fds.get(*peer) if peer is not None else None
        if peer_fd is not None:
            ring(peer_fd)
            if self.tracer.enabled:
                self.tracer.evtchn("send", domid, port=port, remote_domid=peer[0], remote_port=peer[1],
                                   result="eventfd")
            return {}
        notify = self._evtchn(self.evtchn.send, domid, port)
        if self.tracer.enabled:
            self._trace_send(domid, port, notify)
        self._notify(notify)
        return {}

    def _trace_send(self, domid: int, port: int, notify: Notify | None) -> None:
        peer = self.evtchn.status(domid, port, caller=domid)
        if notify is not None:
            result = "upcall"
        elif peer.get("status") == "interdomain":
            result = "coalesced"  # the peer's port was pending already, or masked
        else:
            result = "dropped"  # unbound: Xen drops it silently
        self.tracer.evtchn("send", domid, port=port, remote_domid=peer.get("remote_dom"),
                           remote_port=peer.get("remote_port"), result=result)

    def drain_sendlogs(self, links) -> None:
        """Every fd-mode link's sends since the last drain, into the trace
        (called by the server every tenth of a second)."""
        for link in links:
            fast = link.resources.fast
            if fast is not None and link.domain is not None:
                self._drain_sendlog(link.domain.domid, fast)

    def _drain_sendlog(self, domid: int, fast: FastLink) -> None:
        sendlog.set_enabled(fast.log, self.tracer.enabled)
        records, dropped = fast.reader.drain()
        if not self.tracer.enabled:
            return
        for time_ns, port, _flags in records:
            try:
                peer = self.evtchn.route(domid, port)
            except EvtchnError:
                peer = None  # closed since (or a port the domain never had: its word only)
            self.tracer.evtchn("send", domid, port=port, ts=time_ns / 1e9, reported=True,
                               remote_domid=peer[0] if peer else None, remote_port=peer[1] if peer else None,
                               result="eventfd")
        if dropped:
            self.tracer.evtchn("send_log_full", domid, dropped=dropped)

    def clear(self, link, frame):
        domid, port = link.domain.domid, _port(frame.body)
        notify = self._evtchn(self.evtchn.clear_pending, domid, port)
        fd = self.port_fds.get(domid, port)
        if fd is not None:
            drain(fd)
            return {}
        link.after_reply.append(lambda: self._notify(notify))
        return {}

    def unmask(self, link, frame):
        notify = self._evtchn(self.evtchn.unmask, link.domain.domid, _port(frame.body))
        if self.port_fds.get(link.domain.domid, _port(frame.body)) is not None:
            notify = None  # its bit is an eventfd the owner polls: unmasking is the owner's business
        link.after_reply.append(lambda: self._notify(notify))
        self.tracer.evtchn("unmask", link.domain.domid, port=_port(frame.body), upcall=notify is not None)
        return {}

    def mask(self, link, frame):
        self._evtchn(self.evtchn.mask, link.domain.domid, _port(frame.body))
        return {}

    def close(self, link, frame):
        domid, port = link.domain.domid, _port(frame.body)
        self._evtchn(self._close_port, domid, port)
        link.resources.ports.discard(port)
        self.port_owner.pop((domid, port), None)
        self.tracer.evtchn("close", domid, port=port)
        return {}

    def status(self, link, frame):
        caller = link.domain.domid
        target = int(frame.body.get("domid", caller))
        port = _port(frame.body)
        info = self._evtchn(self.evtchn.status, target, port, caller=caller)
        fd = self.port_fds.get(caller if target == DOMID_SELF else target, port)
        if fd is not None:
            info["pending"] = is_set(fd)
        return info

    # -- fd mode ---------------------------------------------------------------------
    def open_fast_path(self, link) -> tuple[dict, list[int]]:
        """HELLO asked for fd mode: the link's doorbell and send log."""
        link.resources.fast = FastLink(trace=self.tracer.enabled)
        return {"evtchn": "fd", "sendlog": True}, link.resources.fast.descriptors()

    HANDLERS = {
        hc.Call.MEM_ALLOC: mem_alloc,
        hc.Call.MEM_MAP: mem_map,
        hc.Call.MEM_FREE: mem_free,
        hc.Call.MEM_LIST: mem_list,
        hc.Call.MEM_POPULATE: mem_populate,
        hc.Call.GNTTAB_GRANT: grant,
        hc.Call.GNTTAB_SET_ENTRY: set_entry,
        hc.Call.GNTTAB_END: end,
        hc.Call.GNTTAB_MAP: map,
        hc.Call.GNTTAB_UNMAP: unmap,
        hc.Call.GNTTAB_COPY: copy,
        hc.Call.GNTTAB_MAP_BATCH: map_batch,
        hc.Call.GNTTAB_UNMAP_BATCH: unmap_batch,
        hc.Call.GNTTAB_COPY_BATCH: copy_batch,
        hc.Call.GNTTAB_QUERY_SIZE: query_size,
        hc.Call.EVTCHN_ALLOC_UNBOUND: alloc_unbound,
        hc.Call.EVTCHN_BIND_INTERDOMAIN: bind_interdomain,
        hc.Call.EVTCHN_SEND: send,
        hc.Call.EVTCHN_CLEAR: clear,
        hc.Call.EVTCHN_UNMASK: unmask,
        hc.Call.EVTCHN_MASK: mask,
        hc.Call.EVTCHN_CLOSE: close,
        hc.Call.EVTCHN_STATUS: status,
    }

