"""The hypervisor-service's event loop: a thin asyncio shell over pure cores.

Two kinds of sockets are served:

* `hypervisor.sock` -- each domain's kernel (and device processes of that
  domain) connect here and authenticate with HELLO.  From then on every call
  on that connection is made *as that domain*; nothing the client says can
  change which domid it is.
* xenstored connections -- a domain hands over (SCM_RIGHTS, call XS_ADOPT) a
  connected socket whose other end is a process inside the domain, e.g. the
  real `xenstore-*` tools through the kernel's XENSTORED_PATH socket.  The
  adopted socket is served as a xenstored connection of the adopting domain,
  so its domid comes from how the domain authenticated, never from the client.

`echo.sock` answers every byte with itself: the raw Unix-socket round trip
the benchmarks compare xenstored against, served by the same loop.

Tracing (trace.py): every store request with its answer, every watch event
sent, and every refused grant or event-channel call are told to
`self.tracer` here; the accepted grant and event-channel calls in
sharing.py.  The tracer only queues them; it writes in batches from this
loop's timers through its own writer thread.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from xenbed.hypervisor.domains import Domain, DomainError, DomainState, DomainTable, Privilege
from xenbed.hypervisor.ports import ring
from xenbed.hypervisor.sharing import LinkResources, Reply, Sharing
from xenbed.hypervisor.trace import FileSink, Tracer
from xenbed.hypervisor.xenstored import XenStore
from xenbed.protocols import hypercall as hc
from xenbed.protocols import xs_wire

log = logging.getLogger("xenbed.hypervisor")

MAX_FDS_PER_MESSAGE = 64
# A handler's answer meaning "the reply comes later" (SCHEDOP_SHUTDOWN
# suspend: answered by the DOMAIN_RESUME that ends the suspension).
DEFERRED = object()
XS_WRITE_HIGH_WATER = 256 * 1024  # output held for one store client, beyond which it is not served
XS_REQUESTS_PER_TURN = 8  # store requests one connection gets handled before the others' turn
SENDLOG_DRAIN_SECONDS = 0.1  # how stale a trace's direct event-channel sends may be

# What one link may make the hypervisor hold or do (docs/security.md, "The
# hypervisor socket").  A guest opens as many links as it likes, so each is
# cheap until it authenticated, and no link gets more than its turn.
HELLO_TIMEOUT_SECONDS = 5.0  # an unauthenticated link is dropped after this
MAX_UNAUTHENTICATED_LINKS = 64  # beyond: the oldest unauthenticated link goes
UNAUTHENTICATED_BUFFER = 4096  # bytes held for a link before HELLO (a HELLO is ~100)
MAX_BUFFERED = 2 * hc.BODY_MAX  # bytes held for one link: reading pauses above
MAX_LINKS_PER_DOMAIN = 64  # a guest's links (the control domain's are not counted)
MAX_XS_CONNECTIONS_PER_DOMAIN = 32  # store connections a guest may adopt
FRAMES_PER_TURN = 16  # then the loop serves the others before this link again
FD_TAKING_CALLS = frozenset({hc.Call.XS_ADOPT})  # calls that take their descriptors off the frame


def recv_with_fds(sock: socket.socket, size: int = 65536) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


@dataclass(eq=False)
class DomainLink:
    """One connection on hypervisor.sock."""

    sock: socket.socket
    reader: hc.FrameReader = field(default_factory=hc.FrameReader)
    domain: Domain | None = None
    role: str = ""
    resources: LinkResources = field(default_factory=LinkResources)
    # Work to do once the current call's reply is on its way (upcalls that
    # must not overtake the reply, e.g. a newly bound port's first event).
    after_reply: list = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)
    turn_scheduled: bool = False  # _serve_link will run again for this link's backlog
    reading_paused: bool = False

    def describe(self) -> str:
        if self.domain is None:
            return "unauthenticated link"
        return f"dom{self.domain.domid} ({self.domain.name}) {self.role} link"


class XenStoreConnection(asyncio.Protocol):
    """One xenstored client: bytes in, packets through the store, bytes out.

    Served in turns, so that no connection starves the others (issue #16:
    a socket that echoed its replies back made every store read 1,000
    times slower): a turn handles at most XS_REQUESTS_PER_TURN requests
    (fewer when the "outstanding" quota says so) and writes their replies;
    requests left over wait for another turn, queued behind every other
    connection's (call_soon), and meanwhile nothing more is read from this
    socket.  What xenstored holds for one connection is bounded
    (XSA-326): while more than XS_WRITE_HIGH_WATER bytes wait to be sent
    to it, no request of it is handled and none read, and watch events are
    handed to it only as far as that limit leaves room (`room`); the rest
    wait in the store's capped queue, which drops and counts what does not
    fit.  A turn starts again when the client reads (resume_writing)."""

    def __init__(self, server: HypervisorServer, domid: int, privileged: bool) -> None:
        self.server = server
        self.domid = domid
        self.conn = server.store.connect(domid, privileged=privileged)
        self.reader = xs_wire.PacketReader()
        self.transport: asyncio.Transport | None = None
        self.output_full = False  # the client is not reading: hold everything back
        self.turn_scheduled = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=XS_WRITE_HIGH_WATER)
        self.server.xs_connections[self.conn] = self

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if not self.turn_scheduled:
            self._turn()

    def _turn(self) -> None:
        self.turn_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing() or self.output_full:
            return
        replies = []
        introduced = []
        handle, conn, may_read = self.server.store.handle, self.conn, self.server.store.may_read
        tracer = self.server.tracer
        backlog = False
        try:
            while True:
                if len(replies) >= XS_REQUESTS_PER_TURN or not may_read(conn, len(replies)):
                    backlog = True  # perhaps: the next turn finds out
                    break
                packet = self.reader.next_packet()
                if packet is None:
                    break
                reply = handle(conn, packet)
                if tracer.enabled:
                    tracer.xenstore(self.domid, conn.id, packet, reply)
                replies.append(reply.encode())
                if packet.op == xs_wire.Op.INTRODUCE and reply.op != xs_wire.Op.ERROR:
                    introduced.append(int(packet.strings()[0]))
        except xs_wire.WireProtocolError as exc:
            # The stream can no longer be framed: close this connection only.
            log.warning("dom%d xenstore connection closed: %s", self.domid, exc)
            if replies:
                transport.write(b"".join(replies))
            transport.close()
            return
        if replies:
            transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
        self.server.flush_watch_events()
        for domid in introduced:
            self.server.on_domain_introduced(domid)
        self._pace(backlog)

    def _pace(self, backlog: bool) -> None:
        """Read more only when everything read is handled and the client
        reads its output; requests left over get the next turn in line."""
        transport = self.transport
        if transport.is_closing():
            return
        if backlog or self.output_full:
            transport.pause_reading()
        else:
            transport.resume_reading()
        if backlog and not self.output_full and not self.turn_scheduled:
            self.turn_scheduled = True
            self.server.loop.call_soon(self._turn)

    def room(self) -> int | None:
        """How many bytes of watch events this client may be handed now
        (None: it is gone, take and drop them)."""
        if self.transport is None or self.transport.is_closing():
            return None
        return max(0, XS_WRITE_HIGH_WATER - self.transport.get_write_buffer_size())

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests,
        # so that what we hold for it stays bounded.
        self.output_full = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.output_full = False
        self.server.flush_watch_events()  # what waited in the store's queue
        if not self.turn_scheduled:
            self._turn()

    def connection_lost(self, exc) -> None:
        self.server.xs_connections.pop(self.conn, None)
        self.server.store.disconnect(self.conn)

    def send_packets(self, packets) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(p.encode() for p in packets))


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class HypervisorServer:
    def __init__(self, run_dir: str, domains: DomainTable, store: XenStore, sharing: Sharing,
                 tracer: Tracer | None = None, trace_sink: FileSink | None = None) -> None:
        self.run_dir = run_dir
        self.domains = domains
        self.store = store
        self.sharing = sharing
        sharing.deliver = self._send
        # The trace: a disabled tracer when there is no file to write it to.
        self.tracer = tracer if tracer is not None and trace_sink is not None else Tracer.disabled()
        self.trace_sink = trace_sink
        sharing.tracer = self.tracer
        self.links: set[DomainLink] = set()
        self.xs_connections: dict = {}  # store Connection -> its XenStoreConnection
        self._listeners: list[socket.socket] = []
        self._echo_server: asyncio.AbstractServer | None = None
        self._audit_conn = None  # a privileged store connection of the hypervisor's own
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = asyncio.Event()
        # domid -> (kernel link, its SCHEDOP_SHUTDOWN suspend call): the
        # guest blocked in its suspend hypercall until DOMAIN_RESUME.
        self.suspend_callers: dict[int, tuple[DomainLink, hc.Frame]] = {}

    @property
    def socket_path(self) -> str:
        return os.path.join(self.run_dir, "hypervisor.sock")

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.trace_sink is not None:
            self.tracer.attach(self.loop.call_later, self.trace_sink)
        os.makedirs(self.run_dir, exist_ok=True)
        # dom0 exists from boot and is introduced to its store from the start,
        # as Xen's xenstored knows dom0 without an XS_INTRODUCE.
        self.store.introduce_domain(0)
        dom0 = self.domains.get(0)
        self.sharing.add_domain(0, dom0.memory_mb, privileged=True)
        listener = self._listen(self.socket_path)
        self.loop.add_reader(listener, self._accept_link, listener)
        echo_path = os.path.join(self.run_dir, "echo.sock")
        _unlink(echo_path)
        self._echo_server = await self.loop.create_unix_server(EchoProtocol, echo_path)
        self.loop.call_later(SENDLOG_DRAIN_SECONDS, self._drain_sendlogs)
        log.info("hypervisor-service listening on %s", self.socket_path)

    def _listen(self, path: str) -> socket.socket:
        _unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(128)
        sock.setblocking(False)
        self._listeners.append(sock)
        return sock

    async def close(self) -> None:
        for sock in self._listeners:
            self.loop.remove_reader(sock)
            sock.close()
        for link in list(self.links):
            self._drop_link(link, "hypervisor shutting down")
        for conn in list(self.xs_connections.values()):
            conn.transport.close()
        if self._echo_server is not None:
            self._echo_server.close()
        _unlink(self.socket_path)
        if self.trace_sink is not None:
            self.tracer.flush()
            self.trace_sink.close()

    # -- hypervisor.sock -------------------------------------------------------
    def _accept_link(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        link = DomainLink(sock)
        waiting = [l for l in self.links if l.domain is None]
        if len(waiting) >= MAX_UNAUTHENTICATED_LINKS:
            self._drop_link(min(waiting, key=lambda l: l.opened), "too many links waiting for HELLO")
        self.links.add(link)
        self.loop.add_reader(sock, self._on_link_readable, link)
        self.loop.call_later(HELLO_TIMEOUT_SECONDS, self._hello_deadline, link)

    def _hello_deadline(self, link: DomainLink) -> None:
        if link in self.links and link.domain is None:
            self._drop_link(link, f"no HELLO within {HELLO_TIMEOUT_SECONDS:g}s")

    def _on_link_readable(self, link: DomainLink) -> None:
        try:
            data, fds = recv_with_fds(link.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop_link(link, f"receive failed: {exc}")
            return
        if not data:
            hc.close_fds(fds)
            self._drop_link(link, "closed by the domain")
            return
        if link.domain is None:
            hc.close_fds(fds)  # PING and HELLO carry none: nothing to keep for a stranger
            fds = []
            if link.reader.buffered + len(data) > UNAUTHENTICATED_BUFFER:
                self._drop_link(link, f"more than {UNAUTHENTICATED_BUFFER} bytes before HELLO")
                return
        link.reader.feed(data, fds)
        self._serve_link(link)

    def _serve_link(self, link: DomainLink) -> None:
        """Handle up to FRAMES_PER_TURN whole frames, then let the loop serve
        every other link before coming back (a guest's flood of calls costs
        others one turn, not its whole backlog).  Reading pauses while the
        backlog is large."""
        link.turn_scheduled = False
        if link not in self.links:
            return
        try:
            for _ in range(FRAMES_PER_TURN):
                frame = link.reader.next_frame()
                if frame is None:
                    break
                self._handle_frame(link, frame)
                if link not in self.links:
                    return
            else:
                if link.reader.buffered >= hc.FRAME_HEADER.size:
                    link.turn_scheduled = True
                    self.loop.call_soon(self._serve_link, link)
        except hc.FrameProtocolError as exc:
            self._drop_link(link, f"protocol violation: {exc}")
            return
        if link.reader.buffered < hc.FRAME_HEADER.size and link.reader.queued_fds:
            # Descriptors arrive with the first byte of the frame that carries
            # them: with no partial frame left, these belong to no frame.
            stray = link.reader.take_stray_fds()
            hc.close_fds(stray)
            log.info("%s: closed %d descriptors no frame claimed", link.describe(), len(stray))
        paused = link.reader.buffered > MAX_BUFFERED or link.turn_scheduled
        if paused != link.reading_paused:
            link.reading_paused = paused
            if paused:
                self.loop.remove_reader(link.sock)
            else:
                self.loop.add_reader(link.sock, self._on_link_readable, link)

    def _handle_frame(self, link: DomainLink, frame: hc.Frame) -> None:
        if frame.flags & (hc.REPLY | hc.UPCALL):
            hc.close_fds(frame.fds)
            self._send(link, hc.error(frame, "EINVAL", "domains send calls, not replies or upcalls"))
            return
        handler = self._handlers.get(frame.op)
        # seq 0 asks for no reply (the event-channel fast path); a refusal is
        # then only logged, as the caller is not waiting for one.
        wants_reply = frame.seq != 0
        try:
            if handler is None:
                raise DomainError("ENOSYS", f"unknown call {frame.op}")
            if link.domain is None and frame.op not in (hc.Call.PING, hc.Call.HELLO):
                raise DomainError("EACCES", f"{frame.op_name} before HELLO")
            if bool(frame.flags & hc.BINARY) != (frame.op in hc.BINARY_CALLS):
                kind = "a BINARY" if frame.op in hc.BINARY_CALLS else "a JSON"
                raise DomainError("EINVAL", f"{frame.op_name} takes {kind} body")
            result = handler(self, link, frame)
        except DomainError as exc:
            self._refuse(link, frame, wants_reply, exc.code, exc.message)
            return
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse(link, frame, wants_reply, "EINVAL", f"bad arguments to {frame.op_name}: {exc!r}")
            return
        if frame.fds and frame.op not in FD_TAKING_CALLS:
            hc.close_fds(frame.fds)  # a call that takes no descriptors: none may stay behind
        if result is DEFERRED:
            return
        if wants_reply:
            if isinstance(result, Reply):
                self._send(link, hc.reply(frame, result.body, result.fds))
            else:
                self._send(link, hc.reply(frame, result))
        if isinstance(result, Reply) and result.owned:
            hc.close_fds(result.fds)  # the domain holds its own duplicates now
        while link.after_reply:
            link.after_reply.pop(0)()

    def _refuse(self, link: DomainLink, frame: hc.Frame, wants_reply: bool, code: str, message: str) -> None:
        hc.close_fds(frame.fds)
        link.after_reply.clear()
        if self.tracer.enabled and link.domain is not None:
            body = frame.body if isinstance(frame.body, dict) else {"bytes": len(frame.body)}
            self.tracer.refused(frame.op, link.domain.domid, body, code)
        if wants_reply:
            self._send(link, hc.error(frame, code, message))
        else:
            log.info("%s: one-way %s refused: %s %s", link.describe(), frame.op_name, code, message)

    def _send(self, link: DomainLink, frame: hc.Frame) -> None:
        data = frame.encode()
        try:
            if frame.fds:
                link.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", frame.fds))])
            else:
                link.sock.sendall(data)
        except (BlockingIOError, OSError) as exc:
            # A domain that does not read its socket loses its link rather
            # than the hypervisor blocking on it.
            self._drop_link(link, f"send failed: {exc}")
            return
        if frame.flags & hc.UPCALL and link.resources.fast is not None:
            ring(link.resources.fast.doorbell)  # nobody need sit on the socket for upcalls

    def _drain_sendlogs(self) -> None:
        """Sends made directly on eventfds, into the trace (sharing.py)."""
        try:
            self.sharing.drain_sendlogs(list(self.links))
        finally:
            if not self.stopping.is_set():
                self.loop.call_later(SENDLOG_DRAIN_SECONDS, self._drain_sendlogs)

    def _drop_link(self, link: DomainLink, why: str) -> None:
        if link not in self.links:
            return
        self.links.discard(link)
        if not link.reading_paused:
            self.loop.remove_reader(link.sock)
        hc.close_fds(link.reader.take_stray_fds())
        link.sock.close()
        domain = link.domain
        (log.debug if domain is None else log.info)("%s dropped: %s", link.describe(), why)
        if domain is None:
            return
        self.sharing.release_link(domain.domid, link.resources)
        if link.role != "kernel":
            return
        domain.kernel_connected = False
        if domain.is_control:
            # dom0's kernel may come back (a restarted dom0 container); the
            # host lives on, as do the domains it created.
            return
        self.domain_died(domain)

    def domain_died(self, domain: Domain) -> None:
        """The domain's kernel is gone: tear down its links, its store
        connections and nodes, its ports and its grants (once only)."""
        if domain.state is DomainState.DYING:
            return
        self.suspend_callers.pop(domain.domid, None)
        self.sharing.resume_domain(domain.domid, deliver=False)
        self.domains.mark_dying(domain.domid)
        for link in [l for l in self.links if l.domain is domain]:
            self._drop_link(link, f"domain {domain.domid} is dying")
        for conn in [c for c in self.xs_connections.values() if c.domid == domain.domid]:
            conn.transport.close()
        self.sharing.domain_dying(domain.domid)
        self.store.release_domain(domain.domid)
        self.flush_watch_events()

    # -- xenstored -------------------------------------------------------------
    def flush_watch_events(self) -> None:
        connections = self.xs_connections
        for conn, packets in self.store.take_outgoing(lambda c: connections[c].room() if c in connections else None):
            target = connections.get(conn)
            if target is not None:
                target.send_packets(packets)
                self.tracer.watch_events(conn.domid, conn.id, packets)

    def adopt_xenstore_socket(self, domain: Domain, fd: int) -> None:
        if not domain.is_control and sum(1 for c in self.xs_connections.values()
                                         if c.domid == domain.domid) >= MAX_XS_CONNECTIONS_PER_DOMAIN:
            hc.close_fds([fd])
            raise DomainError("EMFILE", f"domain {domain.domid} has {MAX_XS_CONNECTIONS_PER_DOMAIN} store "
                                        "connections already")
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket at all (a pipe, a file)
            hc.close_fds([fd])
            raise DomainError("EINVAL", "XS_ADOPT needs a connected AF_UNIX stream socket") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise DomainError("EINVAL", "XS_ADOPT needs a connected AF_UNIX stream socket")
        sock.setblocking(False)
        self.loop.create_task(
            self.loop.connect_accepted_socket(
                lambda: XenStoreConnection(self, domain.domid, domain.is_control), sock
            )
        )

    # -- calls -----------------------------------------------------------------
    def _call_ping(self, link, frame):
        return {"pong": True}

    def _call_hello(self, link: DomainLink, frame: hc.Frame):
        if link.domain is not None:
            raise DomainError("EISCONN", "this link is already authenticated")
        role = frame.body.get("role", "kernel")
        if role not in ("kernel", "device"):
            raise DomainError("EINVAL", f"role must be kernel or device, not {role!r}")
        domain = self.domains.authenticate(str(frame.body["credential"]))
        if role == "kernel" and domain.kernel_connected:
            raise DomainError("EBUSY", f"domain {domain.domid} ({domain.name}) already has a running kernel")
        if role == "device" and not domain.kernel_connected:
            raise DomainError("ENODEV", f"domain {domain.domid} has no running kernel")
        if not domain.is_control and sum(1 for l in self.links if l.domain is domain) >= MAX_LINKS_PER_DOMAIN:
            raise DomainError("EMFILE", f"domain {domain.domid} has {MAX_LINKS_PER_DOMAIN} links open already")
        link.domain, link.role = domain, role
        if role == "kernel":
            domain.kernel_connected = True
            if self.store.is_introduced(domain.domid):
                self.loop.call_soon(self._send, link, hc.upcall(hc.Call.UP_XENSTORE_READY))
        log.info("dom%d (%s) %s connected", domain.domid, domain.name, role)
        answer = {"domid": domain.domid, "name": domain.name, "privilege": domain.privilege.value}
        if frame.body.get("evtchn") == "fd":
            extra, fds = self.sharing.open_fast_path(link)
            return Reply({**answer, **extra}, fds, owned=False)  # the link's FastLink keeps them
        return answer

    def _call_whoami(self, link, frame):
        return link.domain.summary()

    def _call_xs_adopt(self, link: DomainLink, frame: hc.Frame):
        if len(frame.fds) != 1:
            raise DomainError("EINVAL", "XS_ADOPT carries exactly one descriptor")  # _refuse closes them
        if not self.store.is_introduced(link.domain.domid):
            raise DomainError("EAGAIN", f"domain {link.domain.domid} is not introduced to xenstored yet")
        self.adopt_xenstore_socket(link.domain, frame.fds.pop())  # it owns the descriptor now, kept or closed
        return {}

    def _call_domain_create(self, link, frame):
        privilege = Privilege(frame.body.get("privilege", "none"))
        domain = self.domains.create(link.domain, str(frame.body["name"]), int(frame.body.get("memory_mb", 64)), privilege)
        self.sharing.add_domain(domain.domid, domain.memory_mb, privileged=False)
        log.info("created dom%d (%s) for dom%d", domain.domid, domain.name, link.domain.domid)
        return {"domid": domain.domid, "credential": domain.credential}

    def _call_domain_destroy(self, link, frame):
        domid = int(frame.body["domid"])
        self.domains.require_control(link.domain, "destroying a domain")
        domain = self.domains.get(domid)
        for other in [l for l in self.links if l.domain is domain and l.role == "kernel"]:
            self._send(other, hc.upcall(hc.Call.UP_DESTROYED, {"domid": domid}))
        self.domain_died(domain)
        self.domains.destroy(link.domain, domid)
        self.sharing.domain_destroyed(domid)
        return {}

    def _call_domain_list(self, link, frame):
        self.domains.require_control(link.domain, "listing domains")
        return {"domains": [d.summary() for d in self.domains.list()]}

    def _call_domain_pause(self, link, frame):
        return self.domains.set_paused(link.domain, int(frame.body["domid"]), True).summary()

    def _call_domain_unpause(self, link, frame):
        return self.domains.set_paused(link.domain, int(frame.body["domid"]), False).summary()

    # -- suspend / resume (docs/suspend-resume.md) ------------------------------
    def _call_schedop_shutdown(self, link: DomainLink, frame: hc.Frame):
        """The guest's own SCHEDOP_shutdown.  For "suspend" the caller's
        kernel blocks in it: the domain is suspended (memory, grants and
        ports stay; upcalls are held, the ports stay pending), @releaseDomain
        fires so the toolstack sees the shutdown, and the reply is sent by
        DOMAIN_RESUME with its `cancelled` flag.  Other reasons are recorded
        (the domain's summary says them) and answered at once."""
        if link.role != "kernel":
            raise DomainError("EPERM", "only the domain's kernel shuts it down (a device link cannot)")
        reason = str(frame.body.get("reason", ""))
        if reason == "suspend" and frame.seq == 0:
            raise DomainError("EINVAL", "a suspend call needs a reply (seq != 0): it returns at resume")
        domain = self.domains.shutdown_self(link.domain, reason)
        log.info("dom%d (%s) shut down: %s", domain.domid, domain.name, reason)
        if reason == "suspend":
            self.sharing.suspend_domain(domain.domid)
            self.suspend_callers[domain.domid] = (link, frame)
        self.store.domain_shutdown(domain.domid)
        self.flush_watch_events()
        return DEFERRED if reason == "suspend" else {}

    def _call_domain_suspend(self, link, frame):
        domain = self.domains.set_suspended(link.domain, int(frame.body["domid"]), True)
        self.sharing.suspend_domain(domain.domid)
        self.store.domain_shutdown(domain.domid)
        self.flush_watch_events()
        return domain.summary()

    def _call_domain_resume(self, link, frame):
        """Run a suspended domain again.  The guest's suspend call returns
        now, saying whether the suspend was cancelled (its devices go on on
        their old rings) or not (they reconnect to the backends the
        toolstack made afresh); then the upcalls held while it was
        suspended are delivered."""
        cancelled = bool(frame.body.get("cancelled", False))
        relocate = frame.body.get("relocate")
        if relocate is not None and (cancelled or not isinstance(relocate, dict)
                                     or not all(isinstance(relocate.get(k), str) and relocate.get(k)
                                                for k in ("hypervisor", "credential"))):
            raise DomainError("EINVAL", "relocate needs {hypervisor, credential} and a resume that is not cancelled")
        domain = self.domains.set_suspended(link.domain, int(frame.body["domid"]), False)
        caller = self.suspend_callers.pop(domain.domid, None)
        answered = caller is not None and caller[0] in self.links
        if answered:
            # Live migration: the guest resumes on another host.  It learns
            # where (that host's hypervisor socket as the guest mounts it,
            # and the credential of its domain there) in its suspend call's
            # answer, as a Xen guest simply finds itself on new hardware.
            answer = {"cancelled": cancelled, **({"relocate": relocate} if relocate else {})}
            self._send(caller[0], hc.reply(caller[1], answer))
        self.sharing.resume_domain(domain.domid)
        log.info("dom%d (%s) resumed (%s)%s", domain.domid, domain.name, "cancelled" if cancelled else "new devices",
                 "" if answered else ": no suspend call was waiting")
        return {**domain.summary(), "guest_answered": answered}

    def _call_audit(self, link, frame):
        """What dead or destroyed domains left behind: mappings of their pages,
        ports still offered to them, their store nodes and backend folders,
        domains left dying (never destroyed)."""
        self.domains.require_control(link.domain, "auditing")
        live = {d.domid for d in self.domains.list() if d.state is not DomainState.DYING}
        dying = sorted(d.domid for d in self.domains.list() if d.state is DomainState.DYING)
        gnttab, evtchn = self.sharing.gnttab, self.sharing.evtchn
        return {
            "dying_domains": dying,
            "grant_mappings_of_dead": [
                {"mapper": m.mapper, "granter": m.granter, "gref": m.gref, "handle": m.handle}
                for m in gnttab.leaks()],
            "zombie_domains": gnttab.zombies(),
            "ports_offered_to_dead": [{"domid": d, "port": p, **st} for d, p, st in evtchn.leaks()],
            "store_nodes_of_dead": self._store_nodes_of_dead(live),
        }

    def _store_nodes_of_dead(self, live: set[int]) -> list[str]:
        if self._audit_conn is None:
            self._audit_conn = self.store.connect(0, privileged=True)

        def children(path: str) -> list[str]:
            reply = self.store.handle(self._audit_conn, xs_wire.Packet(xs_wire.Op.DIRECTORY, 0, 0,
                                                                        xs_wire.join_strings(path)))
            return [] if reply.is_error() else reply.strings()

        found = []
        for domid in children("/local/domain"):
            if domid.isdigit() and int(domid) not in live:
                found.append(f"/local/domain/{domid}")
        for backend in children("/local/domain"):
            for kind in children(f"/local/domain/{backend}/backend"):
                for frontend in children(f"/local/domain/{backend}/backend/{kind}"):
                    if frontend.isdigit() and int(frontend) not in live:
                        found.append(f"/local/domain/{backend}/backend/{kind}/{frontend}")
        return found

    _handlers = {
        hc.Call.PING: _call_ping,
        hc.Call.HELLO: _call_hello,
        hc.Call.WHOAMI: _call_whoami,
        hc.Call.SCHEDOP_SHUTDOWN: _call_schedop_shutdown,
        hc.Call.XS_ADOPT: _call_xs_adopt,
        hc.Call.DOMAIN_CREATE: _call_domain_create,
        hc.Call.DOMAIN_DESTROY: _call_domain_destroy,
        hc.Call.DOMAIN_LIST: _call_domain_list,
        hc.Call.DOMAIN_PAUSE: _call_domain_pause,
        hc.Call.DOMAIN_UNPAUSE: _call_domain_unpause,
        hc.Call.DOMAIN_SUSPEND: _call_domain_suspend,
        hc.Call.DOMAIN_RESUME: _call_domain_resume,
        hc.Call.AUDIT: _call_audit,
        **{op: (lambda fn: lambda self, link, frame: fn(self.sharing, link, frame))(fn)
           for op, fn in Sharing.HANDLERS.items()},
    }

    def on_domain_introduced(self, domid: int) -> None:
        """xenstored saw XS_INTRODUCE: the domain's kernel may open store connections."""
        for link in self.links:
            if link.domain is not None and link.domain.domid == domid and link.role == "kernel":
                self._send(link, hc.upcall(hc.Call.UP_XENSTORE_READY))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
