"""Event channels: Xen's per-domain port tables, pure, no I/O.

Theory of operation.  Every domain has a table of ports (default 1024, as
xl's default `max_event_channels` = 1023 usable + port 0).  Port 0 is
reserved at domain creation and never allocated (Xen: ECS_RESERVED in
evtchn_init).  A port is in one of Xen's states:

    free (closed) --alloc_unbound(dom, remote)--> unbound(offered to remote)
    free --bind_interdomain(dom, rdom, rport)--> interdomain(rdom, rport)
         and the remote unbound port becomes interdomain(dom, lport)
    interdomain --close--> free; the peer goes back to unbound, offered to
         the closer's domain (so the closer may bind it again)
    unbound --close--> free

Each port also has a pending bit and a mask bit (the 2-level ABI's
shared_info bits, which here live in the hypervisor).  `send` on an
interdomain port sets the *remote* port pending; an upcall (`Notify`) is
due only when the bit was clear and the port is not masked, so
notifications coalesce while pending.  `unmask` delivers a pending event
that arrived while masked.  Send on an unbound port is dropped silently
(Xen: "silently drop the notification").  A newly bound port starts
pending on the binder's side (Xen: "we may have lost notifications on the
remote unbound port ... conservatively always setting a notification on
the local port"), so `bind_interdomain` returns a `Bound` carrying the
port and the upcall due to the binder.

This core only decides; the asyncio shell delivers each returned `Notify`
to the domain's socket.  The shell should send the hypercall reply before
the upcall it got with it.

Order of checks follows event_channel.c (ESRCH, then a free local port:
EINVAL when dying / ENOSPC, then the remote port: EINVAL), except that
alloc_unbound checks EPERM before looking for a free port, so an
unprivileged caller cannot probe another domain's port usage.

Not modelled: VIRQs, PIRQs, IPIs, vcpu binding, FIFO ABI priorities, and
the per-vcpu selector bits that would coalesce upcalls across ports.

Errors.  `EvtchnError(code, message)` is what a guest gets back for a call
Xen refuses, with Xen's errno names.  `EvtchnUsageError` is a bug in our own
shell (e.g. a calling domain this table was never told about) and is never
meant to reach a guest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

DOMID_SELF = 0x7FF0  # xen.h
DEFAULT_MAX_PORTS = 1024  # ports 0..1023; 0 reserved -> 1023 usable, xl's default

# evtchn_status_t.status (event_channel.h)
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2


class EvtchnError(Exception):
    """A call Xen refuses; `code` is the errno name returned to the guest."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EvtchnUsageError(Exception):
    """Our own shell called the core wrongly (a programming error)."""


class PortState(str, enum.Enum):
    FREE = "closed"  # ECS_FREE
    RESERVED = "reserved"  # ECS_RESERVED: port 0
    UNBOUND = "unbound"  # ECS_UNBOUND
    INTERDOMAIN = "interdomain"  # ECS_INTERDOMAIN


@dataclass(frozen=True)
class Notify:
    """An upcall the shell must deliver: port `port` of domain `domid` fired."""

    domid: int
    port: int


@dataclass(frozen=True)
class Bound:
    """Result of bind_interdomain: the new local port, and the upcall due to
    the binder because a newly bound port starts pending (None if masked)."""

    port: int
    notify: Notify | None


@dataclass
class _Port:
    state: PortState = PortState.FREE
    remote_dom: int | None = None  # unbound: who may bind; interdomain: peer
    remote_port: int | None = None  # interdomain only
    pending: bool = False
    masked: bool = False
    # An event coalesced into one already delivered.  The guest's clear
    # travels over a socket, so it can arrive after a later send; that send
    # must not be lost in the earlier upcall (see clear_pending).
    merged: bool = False


class _Domain:
    def __init__(self, domid: int, max_ports: int) -> None:
        self.domid = domid
        self.max_ports = max_ports
        self.dying = False
        self.ports: dict[int, _Port] = {0: _Port(PortState.RESERVED)}
        self._hint = 1  # no free port below this

    def port(self, port: int) -> _Port:
        """The port, or EINVAL when it is out of range (Xen's port_is_valid)."""
        if not isinstance(port, int) or isinstance(port, bool):
            raise EvtchnUsageError(f"port must be an int, got {port!r}")
        if not 0 <= port < self.max_ports:
            raise EvtchnError("EINVAL", f"port {port} of domain {self.domid} is out of range")
        return self.ports.get(port) or _Port()

    def free_port(self) -> int:
        """Lowest free port (get_free_port)."""
        if self.dying:
            raise EvtchnError("EINVAL", f"domain {self.domid} is dying")
        for port in range(self._hint, self.max_ports):
            if port not in self.ports:
                self._hint = port
                return port
        self._hint = self.max_ports
        raise EvtchnError("ENOSPC", f"domain {self.domid} has no free port (limit {self.max_ports})")

    def put(self, port: int, chn: _Port) -> None:
        if chn.state is PortState.FREE:
            self.ports.pop(port, None)
            self._hint = min(self._hint, port)
        else:
            self.ports[port] = chn


def _default_privileged(caller: int, target: int) -> bool:
    return caller == 0


class EventChannels:
    """All domains' event-channel ports.

    `is_privileged(caller, target)` says whether `caller` may act on
    `target`'s ports (Xen's XSM_TARGET check: alloc_unbound and status with
    dom != DOMID_SELF); by default only dom0 may.
    """

    def __init__(self, *, max_ports: int = DEFAULT_MAX_PORTS,
                 is_privileged: Callable[[int, int], bool] = _default_privileged) -> None:
        self._max_ports = max_ports
        self._is_privileged = is_privileged
        self._domains: dict[int, _Domain] = {}

    # -- domain lifecycle (called by the shell) ------------------------------
    def add_domain(self, domid: int, *, max_ports: int | None = None) -> None:
        if domid in self._domains:
            raise EvtchnUsageError(f"domain {domid} already has a port table")
        limit = self._max_ports if max_ports is None else max_ports
        if limit < 2:
            raise EvtchnUsageError("a port table needs at least 2 ports (port 0 is reserved)")
        self._domains[domid] = _Domain(domid, limit)

    def domain_dying(self, domid: int) -> list[tuple[int, int]]:
        """Close every port of `domid` (Xen's evtchn_destroy).  Returns the
        (peer domid, peer port) pairs that went back to unbound.  Xen sends
        them no event; the peers find out through XenStore."""
        dom = self._caller(domid)
        dom.dying = True
        unbound: list[tuple[int, int]] = []
        for port in sorted(dom.ports):
            chn = dom.ports[port]
            if chn.state is PortState.INTERDOMAIN and chn.remote_dom != domid:
                unbound.append((chn.remote_dom, chn.remote_port))
            if chn.state in (PortState.UNBOUND, PortState.INTERDOMAIN):
                self._close(dom, port)
        return unbound

    def domain_destroyed(self, domid: int) -> None:
        """Forget the domain.  domain_dying must have run first."""
        dom = self._caller(domid)
        if not dom.dying:
            raise EvtchnUsageError(f"domain {domid} destroyed without domain_dying first")
        del self._domains[domid]

    # -- hypercalls ----------------------------------------------------------
    def alloc_unbound(self, dom: int, remote_dom: int, *, caller: int | None = None) -> int:
        """EVTCHNOP_alloc_unbound: a fresh port in `dom` that `remote_dom`
        may bind.  `caller` (default `dom`) must be `dom` or privileged over
        it.  DOMID_SELF in either domid means the caller."""
        caller = dom if caller is None else caller
        self._caller(caller)
        if dom == DOMID_SELF:
            dom = caller
        if remote_dom == DOMID_SELF:
            remote_dom = caller  # Xen: current->domain, not dom
        if not isinstance(remote_dom, int) or not 0 <= remote_dom <= 0xFFFF:
            raise EvtchnError("EINVAL", f"bad remote domid {remote_dom!r}")
        target = self._lookup(dom)
        self._require(caller, dom, "allocate a port")
        port = target.free_port()
        target.put(port, _Port(PortState.UNBOUND, remote_dom=remote_dom))
        return port

    def bind_interdomain(self, dom: int, remote_dom: int, remote_port: int) -> Bound:
        """EVTCHNOP_bind_interdomain, called by `dom`: connect a fresh local
        port to `remote_dom`'s unbound port `remote_port`, which must be
        offered to `dom` (else EINVAL).  The local port starts pending."""
        local = self._caller(dom)
        if remote_dom == DOMID_SELF:
            remote_dom = dom
        remote = self._lookup(remote_dom)
        lport = local.free_port()
        rchn = remote.port(remote_port)
        if rchn.state is not PortState.UNBOUND or rchn.remote_dom != dom:
            raise EvtchnError("EINVAL", f"port {remote_port} of domain {remote_dom} is not unbound "
                              f"and offered to domain {dom} ({self._describe(rchn)})")
        remote.put(remote_port, _Port(PortState.INTERDOMAIN, dom, lport, rchn.pending, rchn.masked))
        lchn = _Port(PortState.INTERDOMAIN, remote_dom, remote_port)
        local.put(lport, lchn)
        return Bound(lport, self._set_pending(local, lport))

    def send(self, dom: int, port: int) -> Notify | None:
        """EVTCHNOP_send from `dom`: the upcall due to the peer, if any."""
        to = self.route(dom, port)
        if to is None:
            return None  # unbound: Xen silently drops the notification
        return self._set_pending(self._domains[to[0]], to[1])

    def route(self, dom: int, port: int) -> tuple[int, int] | None:
        """Where a send from `dom` on `port` goes, deciding nothing: (remote
        domid, remote port) of an interdomain port, None for an unbound one
        (the send is dropped); EINVAL otherwise.  For ports whose pending bit
        lives outside this table (an eventfd the shell handed out: see
        docs/hypervisor-socket.md, "Event channels at memory speed")."""
        chn = self._caller(dom).port(port)
        if chn.state is PortState.INTERDOMAIN:
            return chn.remote_dom, chn.remote_port
        if chn.state is PortState.UNBOUND:
            return None
        raise EvtchnError("EINVAL", f"send on port {port} of domain {dom}: {self._describe(chn)}")

    def close(self, dom: int, port: int) -> None:
        """EVTCHNOP_close: free the port; an interdomain peer becomes unbound,
        offered back to `dom`."""
        d = self._caller(dom)
        chn = d.port(port)
        if chn.state not in (PortState.UNBOUND, PortState.INTERDOMAIN):
            raise EvtchnError("EINVAL", f"close of port {port} of domain {dom}: {self._describe(chn)}")
        self._close(d, port)

    def unmask(self, dom: int, port: int) -> Notify | None:
        """EVTCHNOP_unmask: clear the mask bit; if the port was masked and is
        pending, the upcall held back is due now (2-level ABI)."""
        d = self._caller(dom)
        chn = d.port(port)
        was_masked, chn.masked = chn.masked, False
        if was_masked and chn.pending and chn.state is not PortState.FREE:
            return Notify(dom, port)
        return None

    def mask(self, dom: int, port: int) -> None:
        """Set the mask bit (a guest write to shared_info in Xen).  Bits are
        kept for open ports only: a port is allocated unmasked."""
        d = self._caller(dom)
        chn = d.port(port)
        if port in d.ports:
            chn.masked = True

    def clear_pending(self, dom: int, port: int) -> Notify | None:
        """The guest consumed the event (clears its pending bit).

        In Xen the guest clears the bit in shared memory *before* it looks at
        the ring, so a send after that point raises a new upcall.  Here the
        clear is a message and may be overtaken by a peer's send that was
        coalesced into the event being cleared; then the port stays pending
        and the guest gets another upcall, so no wake-up is ever lost."""
        d = self._caller(dom)
        chn = d.port(port)
        if chn.merged and chn.pending:
            chn.merged = False
            return None if chn.masked else Notify(d.domid, port)
        chn.pending = False
        chn.merged = False
        return None

    def status(self, dom: int, port: int, *, caller: int | None = None) -> dict:
        """EVTCHNOP_status, as a dict: status name, remote end, bits."""
        caller = dom if caller is None else caller
        self._caller(caller)
        if dom == DOMID_SELF:
            dom = caller
        target = self._lookup(dom)
        chn = target.port(port)
        self._require(caller, dom, "read port status")
        info: dict = {"port": port, "vcpu": 0, "pending": chn.pending, "masked": chn.masked}
        if chn.state is PortState.UNBOUND:
            info.update(status="unbound", remote_dom=chn.remote_dom)
        elif chn.state is PortState.INTERDOMAIN:
            info.update(status="interdomain", remote_dom=chn.remote_dom, remote_port=chn.remote_port)
        else:
            info.update(status="closed")
        return info

    # -- introspection -------------------------------------------------------
    def ports_of(self, dom: int) -> list[int]:
        """Open (unbound or interdomain) ports of `dom`."""
        d = self._caller(dom)
        return sorted(p for p, c in d.ports.items() if c.state in (PortState.UNBOUND, PortState.INTERDOMAIN))

    def domains(self) -> list[int]:
        return sorted(self._domains)

    def open_ports(self) -> list[tuple[int, int, dict]]:
        """Every open port in every domain: (domid, port, status dict)."""
        return [(d, p, self.status(d, p, caller=d)) for d in sorted(self._domains) for p in self.ports_of(d)]

    def leaks(self) -> list[tuple[int, int, dict]]:
        """Open ports whose other end is gone: unbound and offered to a
        domain that is dying or no longer exists.  After a device's both ends
        are torn down this must be empty."""
        alive = {d for d, dom in self._domains.items() if not dom.dying}
        return [(d, p, s) for d, p, s in self.open_ports()
                if s["status"] == "unbound" and s["remote_dom"] not in alive]

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables are inconsistent."""
        for domid, d in self._domains.items():
            assert d.ports.get(0) is not None and d.ports[0].state is PortState.RESERVED, domid
            for port, chn in d.ports.items():
                assert 0 <= port < d.max_ports, (domid, port)
                assert chn.state is not PortState.FREE, (domid, port)
                if d.dying:
                    assert chn.state is PortState.RESERVED, (domid, port, chn)
                if chn.state is PortState.INTERDOMAIN:
                    peer = self._domains[chn.remote_dom].ports.get(chn.remote_port)
                    assert peer is not None and peer.state is PortState.INTERDOMAIN, (domid, port)
                    assert (peer.remote_dom, peer.remote_port) == (domid, port), (domid, port, peer)

    # -- internals -----------------------------------------------------------
    def _caller(self, domid: int) -> _Domain:
        try:
            return self._domains[domid]
        except (KeyError, TypeError):
            raise EvtchnUsageError(f"domain {domid!r} has no port table (add_domain not called?)") from None

    def _lookup(self, domid: int) -> _Domain:
        dom = self._domains.get(domid) if isinstance(domid, int) else None
        if dom is None:
            raise EvtchnError("ESRCH", f"no domain {domid}")
        return dom

    def _require(self, caller: int, target: int, what: str) -> None:
        if caller != target and not self._is_privileged(caller, target):
            raise EvtchnError("EPERM", f"domain {caller} may not {what} for domain {target}")

    @staticmethod
    def _describe(chn: _Port) -> str:
        if chn.state is PortState.UNBOUND:
            return f"unbound, offered to domain {chn.remote_dom}"
        if chn.state is PortState.INTERDOMAIN:
            return f"bound to domain {chn.remote_dom} port {chn.remote_port}"
        return chn.state.value

    @staticmethod
    def _set_pending(d: _Domain, port: int) -> Notify | None:
        chn = d.ports[port]
        if chn.pending:
            chn.merged = True
            return None  # coalesced
        chn.pending = True
        return None if chn.masked else Notify(d.domid, port)

    def _close(self, d: _Domain, port: int) -> None:
        chn = d.ports[port]
        if chn.state is PortState.INTERDOMAIN:
            peer_dom = self._domains[chn.remote_dom]
            peer = peer_dom.ports[chn.remote_port]
            peer.state, peer.remote_dom, peer.remote_port = PortState.UNBOUND, d.domid, None
        d.put(port, _Port())  # free_evtchn: pending cleared, state free
