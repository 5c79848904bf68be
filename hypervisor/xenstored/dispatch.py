"""The one entry point: `XenStore.handle(conn, packet) -> reply`.

One table (`_OPS`) maps each message type to its handler and flags, as
xenstored's wire_funcs[]: unknown types, XS_WATCH_EVENT and XS_ERROR sent by
a client, and the removed XS_RESTRICT are ENOSYS; privileged-only types from
an unprivileged connection are EACCES (checked before the transaction id);
every type except WATCH/UNWATCH looks up the header's tx_id (unknown: ENOENT).
Handlers raise `XenStoreError`; `handle` turns that into the XS_ERROR reply,
and anything else (a bug) into EIO after logging it, so no client input can
make `handle` raise.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from xenbed.protocols.xs_wire import PAYLOAD_MAX, Op, Packet

from . import paths
from .errors import XenStoreError
from .perms import ACL, Identity, Perm, format_acl, parse_acl, perm_for, strip_domid
from .perms import Entry
from .quota import Quota
from .store import Event, Tree, directory_part
from .transactions import Transaction, TransactionTable, commit
from .watches import EventQueue, Watch

log = logging.getLogger("xenbed.xenstored")

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
OK = b"OK\0"

_conn_ids = itertools.count(1)


@dataclass(eq=False)
class Connection:
    domid: int
    privileged: bool
    id: int = field(default_factory=lambda: next(_conn_ids))
    watches: list[Watch] = field(default_factory=list)
    transactions: TransactionTable = field(default_factory=TransactionTable)
    events: EventQueue = field(default_factory=lambda: EventQueue(1024, 256 * 1024))
    released: bool = False  # the domain was released: the shell should close us
    _identity: Identity | None = field(default=None, repr=False)

    @property
    def dropped_events(self) -> int:
        return self.events.dropped

    def __repr__(self) -> str:
        return f"<Connection #{self.id} dom{self.domid}{' priv' if self.privileged else ''}>"


# -- payload helpers -------------------------------------------------------
def _decode(b: bytes) -> str:
    return b.decode("latin-1")


def _strings(payload: bytes) -> list[str]:
    """NUL-terminated strings; trailing bytes without a NUL are ignored,
    as xenstored's get_strings() does."""
    parts = payload.split(b"\0")
    return [_decode(p) for p in parts[:-1]]


def _onearg(payload: bytes) -> str:
    """Exactly one string with its NUL at the very end (onearg())."""
    if not payload or b"\0" not in payload or payload.index(b"\0") != len(payload) - 1:
        raise XenStoreError("EINVAL", "expected exactly one argument")
    return _decode(payload[:-1])


def _nargs(payload: bytes, n: int, *, at_least: bool = False) -> list[str]:
    s = _strings(payload)
    if len(s) < n or (not at_least and len(s) != n):
        raise XenStoreError("EINVAL", f"expected {n} arguments")
    return s


def _domid(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 0xFFFF:
        raise XenStoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


def _int(text: str, *, signed: bool = False) -> int:
    t = text[1:] if signed and text.startswith("-") else text
    if not t.isascii() or not t.isdigit() or len(t) > 20:
        raise XenStoreError("EINVAL", f"not a number: {text!r}")
    return int(text)


def _lines(*args: str) -> bytes:
    return b"".join(a.encode("latin-1") + b"\0" for a in args)


@dataclass(frozen=True)
class _Spec:
    fn: Callable
    priv: bool = False
    notid: bool = False


class XenStore:
    def __init__(self, quota: Quota | None = None, clock=time.monotonic, *,
                 keep_orphans: bool = False, with_local: bool = True) -> None:
        self.quota = quota or Quota.defaults()
        self.clock = clock
        self.keep_orphans = keep_orphans
        self._gen = itertools.count(1)
        self.tree = Tree.initial(lambda: next(self._gen), with_local=with_local)
        self.connections: list[Connection] = []
        self.introduced: set[int] = set()
        self.targets: dict[int, int] = {}  # controller domid -> target domid
        # Connections with watch events queued, in the order they got them.
        self._waiting: dict[Connection, None] = {}

    # -- connections -------------------------------------------------------
    def connect(self, domid: int, privileged: bool | None = None) -> Connection:
        if privileged is None:
            privileged = domid == 0
        conn = Connection(domid, privileged, events=EventQueue(self.quota.event_queue, self.quota.event_bytes))
        self.connections.append(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        conn.watches.clear()
        conn.transactions.clear()
        conn.events.take()
        self._waiting.pop(conn, None)
        if conn in self.connections:
            self.connections.remove(conn)

    def identity(self, conn: Connection) -> Identity:
        target = self.targets.get(conn.domid)
        cached = conn._identity
        if cached is None or cached.target != target:
            cached = conn._identity = Identity(conn.domid, conn.privileged, target)
        return cached

    def take_outgoing(self, room: Callable[[Connection], int | None] | None = None,
                      ) -> list[tuple[Connection, list[Packet]]]:
        """Watch events to send, per connection.  `room(conn)` says how many
        bytes the connection's socket may take now (None: any); events that
        do not fit stay queued here, inside the queue's limits."""
        if not self._waiting:  # the common case: a request that fired no watch
            return []
        out = []
        for c in list(self._waiting):
            packets = c.events.take(None if room is None else room(c))
            if packets:
                out.append((c, packets))
            if not len(c.events):
                del self._waiting[c]
        return out

    def _queue_event(self, conn: Connection, path: str, token: str) -> None:
        if conn.events.push(path, token):
            self._waiting[conn] = None

    def may_read(self, conn: Connection, replies_pending: int) -> bool:
        """Flow control for the shell (quota "outstanding"): whether to read
        another request from `conn` while `replies_pending` replies to it are
        not yet sent.  xenstored stops reading; it never answers an error."""
        return conn.privileged or not self.quota.exceeded("outstanding", replies_pending + 1)

    # -- domains -----------------------------------------------------------
    def is_introduced(self, domid: int) -> bool:
        return domid == 0 or domid in self.introduced

    def _domain_conns(self, domid: int) -> list[Connection]:
        return [c for c in self.connections if c.domid == domid and not c.privileged]

    def introduce_domain(self, domid: int) -> None:
        if domid in self.introduced:
            # Re-introduce: xenstored rebinds the event channel and resets
            # the domain's connection (domain_conn_reset()), no new event.
            for c in self._domain_conns(domid):
                c.watches.clear()
                c.transactions.clear()
            return
        self.introduced.add(domid)
        self._fire([Event(paths.INTRODUCE_DOMAIN)])

    def domain_shutdown(self, domid: int) -> None:
        """The domain shut down (suspend included) but stays: as Xen's
        xenstored on VIRQ_DOM_EXC (domain_cleanup sees dominfo.shutdown),
        @releaseDomain fires, so toolstacks re-read domain info; nothing of
        the domain's is removed."""
        if domid in self.introduced:
            self._fire([Event(paths.RELEASE_DOMAIN)])

    def release_domain(self, domid: int) -> None:
        was_introduced = domid in self.introduced
        self.introduced.discard(domid)
        for c in self._domain_conns(domid):
            c.watches.clear()  # so removing its nodes fires nothing to it
            c.transactions.clear()
            c.released = True
        self.targets.pop(domid, None)
        for k in [k for k, v in self.targets.items() if v == domid]:
            del self.targets[k]
        events: list[Event] = []
        dpath = paths.domain_path(domid)
        if dpath in self.tree.nodes:
            events += self.tree.remove_subtree(dpath)
        if domid != 0:
            for p in sorted(self.tree.paths_owned_by(domid), key=len):
                if p not in self.tree.nodes:
                    continue  # went with an owned ancestor
                if self.keep_orphans or p.startswith("@") or p == "/":
                    continue
                events += self.tree.remove_subtree(p)

            def fix(p: str, entries: ACL) -> ACL:
                entries = strip_domid(entries, domid)
                if entries[0].domid == domid:
                    entries = (Entry(entries[0].letter, 0),) + entries[1:]
                return entries

            self.tree.rewrite_acls(fix)
        self._fire(events)
        if was_introduced:
            self._fire([Event(paths.RELEASE_DOMAIN)])

    # -- watches -----------------------------------------------------------
    def _fire(self, events: list[Event]) -> None:
        for conn in self.connections:
            if not conn.watches:
                continue
            who = self.identity(conn)
            for ev in events:
                if ev.path.startswith("@"):
                    node = self.tree.nodes.get(ev.path)
                    if node is None or not perm_for(who, node.acl) & Perm.READ:
                        continue
                elif not any(perm_for(who, a) & Perm.READ for a in ev.acls):
                    continue
                for w in conn.watches:
                    if w.matches(ev.path, ev.exact):
                        self._queue_event(conn, w.event_path(ev.path), w.token)

    def _changed(self, tx: Transaction | None, events: list[Event]) -> None:
        if tx is None:
            self._fire(events)
        else:
            tx.events.extend(events)

    # -- the entry point ---------------------------------------------------
    def handle(self, conn: Connection, packet: Packet) -> Packet:
        try:
            spec = _OPS.get(int(packet.op))
            if spec is None:
                raise XenStoreError("ENOSYS", f"unknown type {packet.op}")
            if spec.priv and not conn.privileged:
                raise XenStoreError("EACCES", "privileged operation")
            tx = None if spec.notid else conn.transactions.lookup(packet.tx_id)
            payload = spec.fn(self, conn, tx, packet)
            if len(payload) > PAYLOAD_MAX:
                raise XenStoreError("E2BIG", "reply too long")
            return packet.reply(payload)
        except XenStoreError as e:
            return Packet(Op.ERROR, packet.req_id, packet.tx_id, e.name.encode() + b"\0")
        except Exception:  # a bug in here, never the client's fault
            log.exception("xenstored: internal error on %r from %r", packet, conn)
            return Packet(Op.ERROR, packet.req_id, packet.tx_id, b"EIO\0")

    # -- helpers for handlers ----------------------------------------------
    def _path(self, conn: Connection, text: str, *, special: bool = False) -> tuple[str, bool]:
        return paths.canonicalize(
            text, conn.domid, privileged=conn.privileged,
            path_max=self.quota.path_max, allow_special=special,
        )

    def _tree(self, tx: Transaction | None) -> Tree:
        return self.tree if tx is None else tx.tree

    def count_watches(self, domid: int) -> int:
        return sum(len(c.watches) for c in self.connections if c.domid == domid)

    def count_transactions(self, domid: int) -> int:
        return sum(len(c.transactions) for c in self.connections if c.domid == domid)


# -- handlers: (store, conn, tx, packet) -> reply payload ---------------------
def _read(s: XenStore, c: Connection, tx, p: Packet) -> bytes:
    path, _ = s._path(c, _onearg(p.payload))
    return s._tree(tx).read(path, s.identity(c))


def _directory(s, c, tx, p) -> bytes:
    path, _ = s._path(c, _onearg(p.payload))
    return _lines(*s._tree(tx).directory(path, s.identity(c)))


def _directory_part(s, c, tx, p) -> bytes:
    text, off = _nargs(p.payload, 2)
    path, _ = s._path(c, text)
    node = s._tree(tx).lookup(path, s.identity(c), Perm.READ)
    return directory_part(node, _int(off))


def _get_perms(s, c, tx, p) -> bytes:
    path, _ = s._path(c, _onearg(p.payload), special=True)
    return _lines(*format_acl(s._tree(tx).get_perms(path, s.identity(c))))


def _write(s, c, tx, p) -> bytes:
    if b"\0" not in p.payload:
        raise XenStoreError("EINVAL", "WRITE needs path\\0value")
    raw_path, value = p.payload.split(b"\0", 1)
    path, _ = s._path(c, _decode(raw_path))
    s._changed(tx, s._tree(tx).write(path, value, s.identity(c), s.quota))
    return OK


def _mkdir(s, c, tx, p) -> bytes:
    path, _ = s._path(c, _onearg(p.payload))
    s._changed(tx, s._tree(tx).mkdir(path, s.identity(c), s.quota))
    return OK


def _rm(s, c, tx, p) -> bytes:
    path, _ = s._path(c, _onearg(p.payload))
    s._changed(tx, s._tree(tx).rm(path, s.identity(c)))
    return OK


def _set_perms(s, c, tx, p) -> bytes:
    args = _nargs(p.payload, 2, at_least=True)
    path, _ = s._path(c, args[0], special=True)
    new_acl = parse_acl(args[1:])
    s._changed(tx, s._tree(tx).set_perms(path, new_acl, s.identity(c), s.quota))
    return OK


def _watch(s, c, tx, p) -> bytes:
    text, token = _nargs(p.payload, 2)
    if text.startswith("@"):
        if len(text) > 2048:  # XENSTORE_REL_PATH_MAX, as check_watch_path()
            raise XenStoreError("EINVAL", "special watch path too long")
        path, relative = text, False
    else:
        path, relative = s._path(c, text)
    if any(w.path == path and w.token == token for w in c.watches):
        raise XenStoreError("EEXIST", "duplicate watch")
    # As 4.17's do_watch(): the count before adding is checked, E2BIG.
    if not c.privileged and s.quota.exceeded("watches", s.count_watches(c.domid)):
        raise XenStoreError("E2BIG", "watch quota")
    w = Watch(path, token, paths.domain_path(c.domid) if relative else None)
    c.watches.append(w)
    # The initial event goes out after the OK reply (the shell sends the
    # reply first), with the path as the client gave it, unfiltered.
    s._queue_event(c, w.event_path(path), token)
    return OK


def _unwatch(s, c, tx, p) -> bytes:
    text, token = _nargs(p.payload, 2)
    path = text if text.startswith("@") else s._path(c, text)[0]
    for w in c.watches:
        if w.path == path and w.token == token:
            c.watches.remove(w)
            return OK
    raise XenStoreError("ENOENT", "no such watch")


def _reset_watches(s, c, tx, p) -> bytes:
    c.watches.clear()
    c.transactions.clear()
    return OK


def _tx_start(s, c, tx, p) -> bytes:
    if tx is not None:
        raise XenStoreError("EBUSY", "nested transaction")
    if not c.privileged and s.quota.exceeded("transactions", s.count_transactions(c.domid) + 1):
        raise XenStoreError("ENOSPC", "transaction quota")
    limit = 0 if c.privileged else s.quota.transaction_nodes
    new = c.transactions.start(s.tree, limit)
    return str(new.id).encode() + b"\0"


def _tx_end(s, c, tx, p) -> bytes:
    if tx is None:
        raise XenStoreError("ENOENT", "not in a transaction")
    arg = _onearg(p.payload)
    if arg not in ("T", "F"):
        raise XenStoreError("EINVAL", "TRANSACTION_END takes T or F")
    c.transactions.end(tx)
    if arg == "T":
        s._fire(commit(tx, s.tree, None if c.privileged else s.quota))
    return OK


def _introduce(s, c, tx, p) -> bytes:
    args = _nargs(p.payload, 3, at_least=True)
    domid = _domid(args[0])
    _int(args[1], signed=True)  # the ring's gfn: validated, not needed
    port = _int(args[2])
    if domid == 0 or domid >= DOMID_FIRST_RESERVED or port <= 0:
        raise XenStoreError("EINVAL", "bad domid or port")
    s.introduce_domain(domid)
    return OK


def _onearg_domain(s, p) -> int:
    domid = _domid(_onearg(p.payload))
    if domid == 0:
        raise XenStoreError("EINVAL", "not for dom0")
    if domid not in s.introduced:
        raise XenStoreError("ENOENT", "domain not introduced")
    return domid


def _release(s, c, tx, p) -> bytes:
    s.release_domain(_onearg_domain(s, p))
    return OK


def _resume(s, c, tx, p) -> bytes:
    _onearg_domain(s, p)
    return OK


def _get_domain_path(s, c, tx, p) -> bytes:
    return paths.domain_path(_domid(_onearg(p.payload))).encode() + b"\0"


def _is_introduced(s, c, tx, p) -> bytes:
    domid = _domid(_onearg(p.payload))
    return b"T\0" if domid == DOMID_SELF or s.is_introduced(domid) else b"F\0"


def _set_target(s, c, tx, p) -> bytes:
    a, b = _nargs(p.payload, 2)
    domid, target = _domid(a), _domid(b)
    for d in (domid, target):
        if not s.is_introduced(d):
            raise XenStoreError("ENOENT", f"domain {d} not introduced")
    s.targets[domid] = target
    return OK


_HELP = "check\nquota [set <name> <val>|<domid>]\nhelp\n"


def _control(s, c, tx, p) -> bytes:
    args = _strings(p.payload)
    if not args:
        raise XenStoreError("EINVAL", "no command")
    cmd, rest = args[0], args[1:]
    if cmd == "check":
        return OK
    if cmd == "help":
        return _HELP.encode() + b"\0"
    if cmd == "quota":
        if not rest:
            text = "".join(f"{n:<17}: {s.quota.get(n):8d}\n" for n in Quota.names())
            return text.encode() + b"\0"
        if rest[0] == "set":
            if len(rest) != 3:
                raise XenStoreError("EINVAL", "quota set <name> <val>")
            s.quota = s.quota.set(rest[1], _int(rest[2]))
            for conn in s.connections:
                conn.events.cap = s.quota.event_queue
                conn.events.cap_bytes = s.quota.event_bytes
            return OK
        if len(rest) == 1:
            domid = _domid(rest[0])
            if not s.is_introduced(domid):
                raise XenStoreError("ENOENT", "no such domain")
            text = (
                f"Domain {domid}:\n"
                f"{'nodes':<17}: {s.tree.owned[domid]:8d}\n"
                f"{'watches':<17}: {s.count_watches(domid):8d}\n"
                f"{'transactions':<17}: {s.count_transactions(domid):8d}\n"
            )
            return text.encode() + b"\0"
        raise XenStoreError("EINVAL", "bad quota arguments")
    raise XenStoreError("EINVAL", f"unknown control command {cmd!r}")


_OPS: dict[int, _Spec] = {
    Op.CONTROL: _Spec(_control, priv=True),
    Op.DIRECTORY: _Spec(_directory),
    Op.READ: _Spec(_read),
    Op.GET_PERMS: _Spec(_get_perms),
    Op.WATCH: _Spec(_watch, notid=True),
    Op.UNWATCH: _Spec(_unwatch, notid=True),
    Op.TRANSACTION_START: _Spec(_tx_start),
    Op.TRANSACTION_END: _Spec(_tx_end),
    Op.INTRODUCE: _Spec(_introduce, priv=True),
    Op.RELEASE: _Spec(_release, priv=True),
    Op.GET_DOMAIN_PATH: _Spec(_get_domain_path),
    Op.WRITE: _Spec(_write),
    Op.MKDIR: _Spec(_mkdir),
    Op.RM: _Spec(_rm),
    Op.SET_PERMS: _Spec(_set_perms),
    Op.IS_DOMAIN_INTRODUCED: _Spec(_is_introduced, priv=True),
    Op.RESUME: _Spec(_resume, priv=True),
    Op.SET_TARGET: _Spec(_set_target, priv=True),
    Op.RESET_WATCHES: _Spec(_reset_watches),
    Op.DIRECTORY_PART: _Spec(_directory_part),
}
