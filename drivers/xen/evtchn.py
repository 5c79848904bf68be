"""Event channels from inside a domain: the guest's half of Xen's
EVTCHNOP_* and of the upcall that delivers an event.

Ports belong to the link that allocated or bound them (like an open
/dev/xen/evtchn): events for them arrive as UP_EVTCHN upcalls on that link's
reader thread.  One `EventChannels` per link.

    evtchn = EventChannels(link)
    port = evtchn.alloc_unbound(backend_domid)   # frontend: offer a port
    port = evtchn.bind_interdomain(front, fport)  # backend: take the offer
    evtchn.notify(port)                           # kick the other end
    if evtchn.wait(port, timeout=1.0): ...        # an event came (and is cleared)

Pending and clearing
--------------------
Xen keeps a pending bit per port.  A send sets the peer's bit and raises an
upcall only when the bit was clear and the port unmasked, so sends coalesce
while an event is pending: one upcall may stand for many sends.  Here the
bit lives in the hypervisor and stays set after the upcall until the guest
clears it (`clear(port)`, EVTCHN_CLEAR, like clearing evtchn_pending in
shared_info).  A port that is never cleared gets no further upcalls.

The pattern every Xen driver follows, and the one that loses no event:

    while running:
        evtchn.wait(port)               # 1. an upcall came; wait() clears the
                                        #    pending bit first (clear=True)
        while True:
            while ring.unconsumed_...:  # 2. process everything on the ring
                handle(ring.take_...())
            if not ring.final_check_for_...():  # 3. re-arm the event index and
                break                          #    re-check: a message pushed
                                               #    meanwhile is handled now

Clearing *before* processing is what makes it safe: a send that lands after
the clear raises a new upcall, and one that landed before it is covered by
the processing that follows.  Clearing after processing would swallow a
send that arrived in between.

For that the clear must have *taken effect* before the ring is read, as
clearing a bit in shared_info has in Xen.  So `clear(port)` is a call that
waits for the hypervisor's reply (one round trip).  A oneway clear
(`clear(port, oneway=True)`, one write, no reply) is not enough in general:
the hypervisor may still see the peer's send before our clear, coalesce it
into the event we already took, and by then we may have read the ring
before the peer pushed -- a lost wakeup (the 1000-request ring test hits it
within a few hundred requests).  The oneway clear is safe only when the peer
cannot send before it has seen something we send after the clear on the
same link (strict ping-pong: frames on one link are handled in order), which
is what tests/bench/guest_evtchn.py measures.

A newly bound port starts pending (Xen: events sent to the unbound port may
have been lost), so the binder gets one event at once; drivers treat it like
any other (check the ring, find nothing or something).

fd mode: sends that never reach the hypervisor
-----------------------------------------------
On a link in fd mode (the default `HypervisorLink.open()`), a port that is
bound has its pending bit in an eventfd (hypervisor/ports.py): the
hypervisor hands the owner its port's eventfd and the peer port's one, at
bind (the binder, in its reply) or in UP_EVTCHN_BOUND (the other end).
Then `notify` is one write(2) on the peer's eventfd, `wait` polls our own
and `clear` reads it -- the kernel moves the event, no frame crosses the
hypervisor's loop, and the clear takes effect at once, so the oneway-clear
race above cannot happen.  Each direct send is appended to the link's send
log, which the hypervisor drains into the trace.  UP_EVTCHN_UNBOUND (the
peer closed) makes us drop both descriptors: the old peer, who may keep a
copy, can no longer wake us.  Until a port has its descriptors (unbound, or
the upcall not handled yet) everything goes through the hypervisor as
before, which writes the eventfd for us if it exists already.

Masking stays in the hypervisor's table (status) and here: a masked port's
eventfd is not waited on; unmasking a port whose bit is set delivers it.

Delivery to code
----------------
* `wait(port, timeout)` -> True when at least one upcall arrived since the
  last wait (several coalesced upcalls count once); `deliveries(port)` counts
  every upcall ever delivered for the port.
* With a link opened with `reader="inline"` (no reader thread), the thread
  in `wait` reads the socket itself and handles the upcall directly: no
  thread hand-off, the lowest latency (see drivers/xen/hypercall.py).
  Callbacks then run only while some thread waits or calls `link.pump()`.
* `on_event(port, callback)`: `callback(port)` on a dispatcher thread, in
  order, so it may call anything (status, unmask, grant maps).  With
  `inline=True` it runs on the link's reader thread instead -- lower latency,
  but it must not make blocking calls on the link (`notify` and
  `clear(oneway=True)` are oneway and fine; plain `clear` is not).
"""

from __future__ import annotations

import os
import queue
import select
import threading
import time
from collections.abc import Callable

from xenbed.protocols import hypercall as hc

from .hypercall import HypercallError, HypervisorLink, LinkClosed

DOMID_SELF = 0x7FF0

# evtchn_status_t.status (event_channel.h)
EVTCHNSTAT_NAMES = {0: "closed", 1: "unbound", 2: "interdomain", 3: "pirq", 4: "virq", 5: "ipi"}


class EvtchnError(HypercallError):
    """The hypervisor refused an event-channel call (`code`: EINVAL, ESRCH, ...)."""


EventCallback = Callable[[int], None]


class _PortState:
    __slots__ = ("cond", "unseen", "delivered", "callbacks", "in_fd", "out_fd", "masked")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.unseen = 0  # upcalls since the last wait() consumed them
        self.delivered = 0  # upcalls ever
        self.callbacks: list[tuple[EventCallback, bool]] = []
        self.in_fd: int | None = None  # fd mode: our pending bit
        self.out_fd: int | None = None  # fd mode: the peer port's pending bit (we send by setting it)
        self.masked = False


# A waiter re-reads its port's state this often, so that descriptors arriving
# or going while it waits (bind, unbind) are noticed without a wake-up channel.
_RECHECK_SECONDS = 0.05


def _take(fd: int) -> bool:
    """Clear an eventfd pending bit; whether it was set."""
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False


def _is_set(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class EventChannels:
    def __init__(self, link: HypervisorLink) -> None:
        self.link = link
        self._lock = threading.Lock()
        self._ports: dict[int, _PortState] = {}
        self._dispatch_queue: queue.SimpleQueue | None = None
        self._epoll: select.epoll | None = None  # fd mode: callbacks' ports
        self._epoll_ports: dict[int, int] = {}  # fd -> port
        link.on_upcall(hc.Call.UP_EVTCHN, self._on_upcall)
        link.on_upcall(hc.Call.UP_EVTCHN_BOUND, self._on_bound)
        link.on_upcall(hc.Call.UP_EVTCHN_UNBOUND, self._on_unbound)
        link.on_close(self._on_link_closed)

    # -- calls ---------------------------------------------------------------------
    def _call(self, op: hc.Call, body: dict) -> dict:
        try:
            return self.link.call(op, body)
        except HypercallError as exc:
            raise EvtchnError(exc.op, exc.code, exc.message) from None

    def alloc_unbound(self, remote_dom: int) -> int:
        """A fresh port offered to `remote_dom` (EVTCHNOP_alloc_unbound)."""
        port = int(self._call(hc.Call.EVTCHN_ALLOC_UNBOUND, {"remote_dom": int(remote_dom)})["port"])
        with self._lock:  # a port number may be reused: forget what an old one saw
            self._forget(port)
        return port

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        """Bind to `remote_dom`'s unbound port offered to us; our new local port
        starts pending, so one event arrives at once."""
        try:
            body, fds = self.link.call_with_fds(hc.Call.EVTCHN_BIND_INTERDOMAIN,
                                                {"remote_dom": int(remote_dom), "remote_port": int(remote_port)})
        except HypercallError as exc:
            raise EvtchnError(exc.op, exc.code, exc.message) from None
        port = int(body["port"])
        # Not reset: in thread mode the new port's first upcall may already
        # have been counted (the reader handles it right after the reply).
        if fds:
            self._install(port, body.get("fds", []), fds)
        return port

    def notify(self, port: int, *, checked: bool = False) -> None:
        """Send an event to the other end (EVTCHNOP_send).  In fd mode one
        write on the peer's eventfd; otherwise a oneway frame, so a refused
        send (closed port: EINVAL) is silent.  `checked=True` asks the
        hypervisor and raises its refusal."""
        if checked:
            self._call(hc.Call.EVTCHN_SEND, {"port": int(port)})
            return
        state = self._ports.get(port)
        fd = state.out_fd if state is not None else None
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except BlockingIOError:
                pass  # the counter is at its maximum: the peer's bit is set, as wanted
            except OSError:
                fd = None  # dropped under us (the peer unbound): let the hypervisor decide
            else:
                log = self.link.sendlog
                if log is not None and log.enabled():
                    with self.link.sendlog_lock:
                        log.append(port, time.time_ns())
                return
        self.link.send_oneway(hc.Call.EVTCHN_SEND, {"port": int(port)})

    def clear(self, port: int, *, oneway: bool = False) -> None:
        """Clear the port's pending bit: the next send raises a new upcall.
        Waits until the hypervisor has done it (see "Pending and clearing");
        `oneway=True` only sends the frame.  In fd mode: read our eventfd."""
        state = self._ports.get(port)
        if state is not None and state.in_fd is not None:
            with self._lock:
                if state.in_fd is not None:
                    _take(state.in_fd)
                    return
        if oneway:
            self.link.send_oneway(hc.Call.EVTCHN_CLEAR, {"port": int(port)})
        else:
            self._call(hc.Call.EVTCHN_CLEAR, {"port": int(port)})

    def mask(self, port: int) -> None:
        """Hold upcalls back; sends still set the pending bit."""
        self._set_masked(int(port), True)

    def unmask(self, port: int) -> None:
        """Let upcalls through again; one pending while masked is delivered now."""
        self._set_masked(int(port), False)

    def _set_masked(self, port: int, masked: bool) -> None:
        self._call(hc.Call.EVTCHN_MASK if masked else hc.Call.EVTCHN_UNMASK, {"port": port})
        with self._lock:  # here too: an fd-mode port's bit is polled by us, not the hypervisor
            state = self._state(port)
            state.masked = masked
            self._watch(port, state)
            state.cond.notify_all()

    def close(self, port: int) -> None:
        """Close our port (EVTCHNOP_close); an interdomain peer's port goes back
        to unbound, offered to us again."""
        self._call(hc.Call.EVTCHN_CLOSE, {"port": int(port)})
        with self._lock:
            state = self._forget(port)
            if state is not None:
                state.cond.notify_all()

    def status(self, port: int, domid: int | None = None) -> dict:
        """EVTCHNOP_status of our port (or, if privileged, `domid`'s):
        {"status": "closed"|"unbound"|"interdomain", "remote_dom",
        "remote_port", "pending", "masked"}; `status` is always a name."""
        body = {"port": int(port)}
        if domid is not None:
            body["domid"] = int(domid)
        reply = dict(self._call(hc.Call.EVTCHN_STATUS, body))
        status = reply.get("status")
        if isinstance(status, int) and not isinstance(status, bool):
            reply["status"] = EVTCHNSTAT_NAMES.get(status, str(status))
        elif isinstance(status, str) and status.startswith("EVTCHNSTAT_"):
            reply["status"] = status[len("EVTCHNSTAT_"):]
        return reply

    # -- delivery ------------------------------------------------------------------
    def wait(self, port: int, timeout: float | None = None, *, clear: bool | str = True) -> bool:
        """Block until an event for `port` arrived since the last wait (True)
        or `timeout` passed (False).  With `clear` (the default) the pending
        bit is cleared before returning, i.e. before the caller processes the
        ring -- step 1 of the pattern in the module docstring; `clear="oneway"`
        sends the clear without waiting for it (see the docstring for when
        that is safe); `clear=False` leaves the bit set.  Raises LinkClosed if
        the link goes away."""
        port = int(port)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got, fd = self._take_seen(port, clear)
            if got:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self.link.closed.is_set():
                raise LinkClosed(f"link closed while waiting on port {port}: {self.link.close_reason}")
            step = _RECHECK_SECONDS if remaining is None else min(remaining, _RECHECK_SECONDS)
            if fd is not None:
                _is_set(fd, step)  # the kernel wakes us when the peer sets the bit
            else:
                self._await_upcall(port, step)

    def _take_seen(self, port: int, clear: bool | str) -> tuple[bool, int | None]:
        """(an event was there, and is consumed; the eventfd to poll next)."""
        with self._lock:
            state = self._state(port)
            fd = state.in_fd
            if fd is not None:  # fd mode: the bit is the eventfd (plus one kept from an unbind)
                if state.masked:
                    return False, None
                kept, state.unseen = state.unseen, 0
                hit = _take(fd) if clear else _is_set(fd, 0)
                if hit:
                    state.delivered += 1
                return bool(hit or kept), fd
            if not state.unseen:
                return False, None
            state.unseen = 0
        if clear:  # upcall mode: the bit is in the hypervisor
            self.clear(port, oneway=clear == "oneway")
        return True, None

    def _await_upcall(self, port: int, timeout: float) -> None:
        with self._lock:
            state = self._state(port)
            if not state.unseen and not self.link.inline:
                state.cond.wait_for(lambda: state.unseen or self.link.closed.is_set(), timeout)
                return
        if self.link.inline and not state.unseen:
            # no reader thread: read the link ourselves until the upcall comes
            self.link._await(lambda: state.unseen > 0 or self.link.closed.is_set(), None, timeout)

    def pending_fd(self, port: int) -> int | None:
        """fd mode: a descriptor of our own (a dup: close it) that is readable
        while `port` is pending, for a driver that waits in its own select
        loop instead of a thread per port; reading it (eventfd_read) clears
        the bit, as `clear` does.  None when the port has no eventfd (upcall
        mode, or not bound yet): use `wait`."""
        with self._lock:
            state = self._ports.get(int(port))
            if state is None or state.in_fd is None or state.masked:
                return None
            return os.dup(state.in_fd)

    def poll(self, port: int) -> bool:
        """Like wait(port, 0, clear=False): has an event arrived since the
        last wait?  Consumes it."""
        return self.wait(port, 0, clear=False)

    def deliveries(self, port: int) -> int:
        """How many events this port has had delivered (each may stand for many sends)."""
        with self._lock:
            return self._state(int(port)).delivered

    def on_event(self, port: int, callback: EventCallback, *, inline: bool = False) -> None:
        """Call `callback(port)` for each event on `port` (see module docstring
        for threads).  The callback clears the port itself (or not); in fd
        mode the bit is cleared before the callback runs, as Linux's upcall
        handler clears it before the port's handler."""
        with self._lock:
            state = self._state(int(port))
            state.callbacks.append((callback, inline))
            if not inline and self._dispatch_queue is None:
                self._dispatch_queue = queue.SimpleQueue()
                threading.Thread(target=self._dispatch_loop, args=(self._dispatch_queue,),
                                 name="evtchn-dispatch", daemon=True).start()
            self._watch(int(port), state)

    def remove_callbacks(self, port: int) -> None:
        with self._lock:
            state = self._ports.get(int(port))
            if state is not None:
                state.callbacks.clear()
                self._watch(int(port), state)

    # -- plumbing ------------------------------------------------------------------
    def _state(self, port: int) -> _PortState:
        state = self._ports.get(port)
        if state is None:
            state = self._ports[port] = _PortState(self._lock)
        return state

    def _forget(self, port: int) -> _PortState | None:  # lock held
        state = self._ports.pop(port, None)
        if state is not None:
            self._drop_fds(port, state)
        return state

    def _drop_fds(self, port: int, state: _PortState) -> None:  # lock held
        fds = [fd for fd in (state.in_fd, state.out_fd) if fd is not None]
        if state.in_fd is not None and self._epoll is not None and self._epoll_ports.pop(state.in_fd, None) is not None:
            self._epoll.unregister(state.in_fd)
        state.in_fd = state.out_fd = None
        hc.close_fds(fds)

    def _install(self, port: int, roles: list, fds: list[int]) -> None:
        """The descriptors the hypervisor handed over for `port` (fd mode)."""
        given = dict(zip(roles, fds))
        with self._lock:
            state = self._state(port)
            self._drop_fds(port, state)
            state.in_fd, state.out_fd = given.get("in"), given.get("out")
            self._watch(port, state)
            state.cond.notify_all()
        hc.close_fds([fd for role, fd in zip(roles, fds) if role not in ("in", "out")] + fds[len(roles):])

    def _watch(self, port: int, state: _PortState) -> None:  # lock held
        """Keep the dispatcher's epoll in step: a port with callbacks, a
        pending-bit descriptor and no mask is watched."""
        fd = state.in_fd
        if fd is None:
            return
        wanted = bool(state.callbacks) and not state.masked
        watched = fd in self._epoll_ports
        if wanted and not watched:
            if self._epoll is None:
                self._epoll = select.epoll()
                threading.Thread(target=self._epoll_loop, args=(self._epoll,), name="evtchn-epoll",
                                 daemon=True).start()
            self._epoll_ports[fd] = port
            self._epoll.register(fd, select.EPOLLIN)
        elif watched and not wanted:
            del self._epoll_ports[fd]
            self._epoll.unregister(fd)

    def _epoll_loop(self, epoll: select.epoll) -> None:
        """fd mode's upcall handler: clear each set bit, then run the port's
        callbacks on the dispatcher thread."""
        while not self.link.closed.is_set():
            try:
                ready = epoll.poll(1.0)
            except (OSError, ValueError):
                return  # closed
            for fd, _events in ready:
                with self._lock:
                    port = self._epoll_ports.get(fd)
                    state = self._ports.get(port) if port is not None else None
                    if state is None or state.in_fd != fd or not _take(fd):
                        continue
                    state.delivered += 1
                    callbacks = list(state.callbacks)
                self._run_callbacks(port, callbacks)

    def _on_bound(self, frame: hc.Frame) -> None:  # upcall: our unbound port was bound
        port = frame.body.get("port")
        if isinstance(port, int) and frame.fds:
            self._install(port, list(frame.body.get("fds", [])), list(frame.fds))
        else:
            hc.close_fds(frame.fds)

    def _on_unbound(self, frame: hc.Frame) -> None:  # upcall: the peer closed
        port = frame.body.get("port")
        with self._lock:
            state = self._ports.get(port) if isinstance(port, int) else None
            if state is None:
                return
            if state.in_fd is not None and _take(state.in_fd):
                state.unseen += 1  # a bit set before the close stays set (Xen keeps it)
            self._drop_fds(port, state)
            state.cond.notify_all()

    def _on_upcall(self, frame: hc.Frame) -> None:  # reader thread
        port = frame.body.get("port")
        if not isinstance(port, int):
            return
        with self._lock:
            state = self._state(port)
            state.unseen += 1
            state.delivered += 1
            state.cond.notify_all()
            callbacks = list(state.callbacks)
        self._run_callbacks(port, callbacks)

    def _run_callbacks(self, port: int, callbacks) -> None:
        """Inline callbacks here and now; the others on the dispatcher thread, in order."""
        for callback, inline in callbacks:
            if inline:
                callback(port)
            else:
                self._dispatch_queue.put((callback, port))

    def _dispatch_loop(self, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            callback, port = item
            try:
                callback(port)
            except Exception:  # like an upcall handler: a bug must not stop delivery
                import logging
                logging.getLogger("xenbed.evtchn").exception("event callback for port %d failed", port)

    def _on_link_closed(self) -> None:
        with self._lock:
            for port, state in self._ports.items():
                self._drop_fds(port, state)
                state.cond.notify_all()
            if self._epoll is not None:
                self._epoll.close()
        if self._dispatch_queue is not None:
            self._dispatch_queue.put(None)
