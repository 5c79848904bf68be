"""Transactions: a private copy-on-write snapshot per transaction.

TRANSACTION_START copies the node map (nodes are immutable, so the copy is
shallow).  Operations inside the transaction run on the copy, which records
every path it looked at (including ancestors consulted for permissions and
paths found missing) and every path it changed.  Commit fails with EAGAIN
if any recorded path's node in the live tree is no longer the very object
the snapshot started from, i.e. someone else changed, created or removed it
(xenstored >= 4.9 behaves the same: conflicts are per accessed node, not
global).  Otherwise the changed paths are copied into the live tree, get
fresh generation numbers, and the queued events fire.  Abort drops
everything; events never fire for an aborted or failed transaction.

Node quota at commit (C's transaction_fix_domains()): every transaction
counts nodes against its own snapshot, so ten of them could each stay under
the quota and together break it.  At commit the transaction's net node count
per owner is added to the owner's count in the live tree, and if that goes
over the "nodes" quota for a domain the transaction added nodes to, the
commit fails with ENOSPC and changes nothing (privileged committers are
exempt, as they are everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collections import Counter

from .errors import XenStoreError
from .perms import owner
from .quota import Quota
from .store import Event, Node, Tree

TX_ID_MAX = 0xFFFFFFFF


@dataclass
class Transaction:
    id: int
    base: dict[str, Node]
    tree: Tree
    events: list[Event] = field(default_factory=list)


class TransactionTable:
    """A connection's open transactions."""

    def __init__(self) -> None:
        self.open: dict[int, Transaction] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self.open)

    def start(self, live: Tree, access_limit: int = 0) -> Transaction:
        while self._next == 0 or self._next in self.open:
            self._next = (self._next + 1) & TX_ID_MAX
        tx_id = self._next
        self._next = (self._next + 1) & TX_ID_MAX
        tx = Transaction(tx_id, dict(live.nodes), live.snapshot(access_limit))
        self.open[tx_id] = tx
        return tx

    def lookup(self, tx_id: int) -> Transaction | None:
        """None for tx_id 0; ENOENT for an id this connection does not own."""
        if tx_id == 0:
            return None
        tx = self.open.get(tx_id)
        if tx is None:
            raise XenStoreError("ENOENT", f"no transaction {tx_id}")
        return tx

    def end(self, tx: Transaction) -> None:
        self.open.pop(tx.id, None)

    def clear(self) -> None:
        self.open.clear()


def commit(tx: Transaction, live: Tree, quota: Quota | None = None) -> list[Event]:
    """Apply `tx` to `live` or raise EAGAIN (a conflict) or ENOSPC (the node
    quota, checked when `quota` is given); returns the events to fire."""
    t = tx.tree
    assert t.accessed is not None
    for path in t.accessed:
        if live.nodes.get(path) is not tx.base.get(path):
            raise XenStoreError("EAGAIN", f"{path} changed since the transaction started")
    changes = {p: t.nodes.get(p) for p in t.dirty}
    if quota is not None:
        for domid, added in net_nodes(live, changes).items():
            if added > 0 and quota.exceeded("nodes", live.owned[domid] + added):
                raise XenStoreError("ENOSPC", f"node quota of domain {domid} at commit")
    live._apply(changes)
    return tx.events


def net_nodes(live: Tree, changes: dict[str, Node | None]) -> Counter[int]:
    """Per owner, how many nodes applying `changes` to `live` adds (< 0: removes)."""
    delta: Counter[int] = Counter()
    for path, new in changes.items():
        if path.startswith("@"):
            continue
        old = live.nodes.get(path)
        if old is not None:
            delta[owner(old.acl)] -= 1
        if new is not None:
            delta[owner(new.acl)] += 1
    return delta
