"""The tree: a flat map from absolute path to an immutable `Node`.

Nodes are frozen, so a transaction's snapshot is a shallow copy of the map
and a change is "replace the node object"; "has this node changed since?" is
an identity test.  Every operation takes the caller's `Identity` and the
`Quota`, validates everything first and only then applies its changes, so a
failed operation leaves the tree untouched.  Operations return `Event`s for
watches; the caller (dispatch) decides when to fire them (at once, or at
commit).

Rules, as C xenstored (xenstored_core.c):
* READ/DIRECTORY/GET_PERMS need read, WRITE/MKDIR/RM need write on the
  node, SET_PERMS needs write+owner.  A missing node answers ENOENT only if
  the nearest existing ancestor grants the needed right, else EACCES, so
  errors leak nothing about unreadable subtrees (errno_from_parents()).
* WRITE and MKDIR create missing parents with empty values; new nodes copy
  the ACL of their parent, and when the caller is unprivileged the caller
  becomes the owner (construct_node()).
* RM removes the subtree; a missing node whose parent exists is OK; removing
  '/' is EINVAL.
* Every change gives the node a new generation number (DIRECTORY_PART).
* No walk recurses (XSA-418 class): a chain of nodes as deep as the path
  limits allow (XENSTORE_ABS_PATH_MAX: about 1,500 levels) is removed,
  released and listed with explicit stacks, never Python's call stack.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from . import paths
from .errors import XenStoreError
from .perms import ACL, Entry, Identity, Perm, can, owner, perm_for
from .quota import Quota, node_size

ROOT_ACL: ACL = (Entry("n", 0),)


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes = b""
    acl: ACL = ROOT_ACL
    children: tuple[str, ...] = ()
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """A change to fire watches for.  `exact` events match only watches on
    that very path (children of a removed subtree); others match the path
    and its ancestors.  `acls` are the ACLs a watcher may read through
    (old perms, the node's, its parent's), captured when the change
    happened (watch_permitted())."""

    path: str
    exact: bool = False
    acls: tuple[ACL, ...] = ()


class Tree:
    """The store's nodes, or a transaction's private copy of them."""

    def __init__(self, nodes: dict[str, Node], next_gen: Callable[[], int]) -> None:
        self.nodes = nodes
        self.next_gen = next_gen
        self.owned: Counter[int] = Counter(owner(n.acl) for p, n in nodes.items() if not p.startswith("@"))
        # Recording for transactions: paths looked at, paths changed.
        self.accessed: set[str] | None = None
        self.dirty: set[str] = set()
        self.access_limit = 0

    @classmethod
    def initial(cls, next_gen: Callable[[], int], *, with_local: bool = True) -> Tree:
        """What C xenstored creates at start (setup_structure()), plus
        /local/domain which the toolstack would create (see __init__)."""
        nodes = {
            "/": Node(children=("tool",)),
            "/tool": Node(children=("xenstored",)),
            "/tool/xenstored": Node(),
            paths.RELEASE_DOMAIN: Node(),
            paths.INTRODUCE_DOMAIN: Node(),
        }
        if with_local:
            nodes["/"] = Node(children=("tool", "local"))
            nodes["/local"] = Node(children=("domain",))
            nodes["/local/domain"] = Node()
        return cls(nodes, next_gen)

    def snapshot(self, access_limit: int = 0) -> Tree:
        t = Tree.__new__(Tree)
        t.nodes = dict(self.nodes)
        t.next_gen = self.next_gen
        t.owned = Counter(self.owned)
        t.accessed = set()
        t.dirty = set()
        t.access_limit = access_limit
        return t

    # -- low level -----------------------------------------------------
    def get(self, path: str) -> Node | None:
        if self.accessed is not None and path not in self.accessed:
            if self.access_limit and len(self.accessed) >= self.access_limit:
                raise XenStoreError("ENOSPC", "transaction touches too many nodes")
            self.accessed.add(path)
        return self.nodes.get(path)

    def _apply(self, changes: dict[str, Node | None]) -> None:
        for path, new in changes.items():
            old = self.nodes.get(path)
            special = path.startswith("@")
            if old is not None and not special:
                self.owned[owner(old.acl)] -= 1
            if new is None:
                self.nodes.pop(path, None)
            else:
                new = replace(new, generation=self.next_gen())
                self.nodes[path] = new
                if not special:
                    self.owned[owner(new.acl)] += 1
            if self.accessed is not None:
                self.accessed.add(path)
                self.dirty.add(path)
        for d in [d for d, n in self.owned.items() if n <= 0]:
            del self.owned[d]

    def _nearest(self, path: str) -> Node:
        for anc in paths.ancestors(path):
            node = self.get(anc)
            if node is not None:
                return node
        raise XenStoreError("EIO", "no root node")  # cannot happen

    def lookup(self, path: str, who: Identity, need: Perm) -> Node:
        """The node, or EACCES / ENOENT as xenstored words it."""
        node = self.get(path)
        if node is not None:
            if not can(who, node.acl, need):
                raise XenStoreError("EACCES", path)
            return node
        if path.startswith("@"):
            raise XenStoreError("ENOENT", path)
        if perm_for(who, self._nearest(path).acl) & need:
            raise XenStoreError("ENOENT", path)
        raise XenStoreError("EACCES", path)

    def _check_size(self, who: Identity, quota: Quota, node: Node) -> None:
        if who.privileged:
            return
        if quota.exceeded("node-size", node_size(len(node.acl), node.value, node.children)):
            raise XenStoreError("ENOSPC", "node too big")

    def _acls_at(self, path: str, node: Node) -> tuple[ACL, ...]:
        if path.startswith("@") or path == "/":
            return (node.acl,)
        par = self.nodes.get(paths.parent(path))
        return (node.acl,) if par is None else (node.acl, par.acl)

    # -- operations ----------------------------------------------------
    def read(self, path: str, who: Identity) -> bytes:
        return self.lookup(path, who, Perm.READ).value

    def directory(self, path: str, who: Identity) -> tuple[str, ...]:
        return self.lookup(path, who, Perm.READ).children

    def get_perms(self, path: str, who: Identity) -> ACL:
        return self.lookup(path, who, Perm.READ).acl

    def write(self, path: str, value: bytes, who: Identity, quota: Quota) -> list[Event]:
        try:
            node = self.lookup(path, who, Perm.WRITE)
        except XenStoreError as e:
            if e.name != "ENOENT":
                raise
            return self._create(path, value, who, quota)
        new = replace(node, value=value)
        self._check_size(who, quota, new)
        self._apply({path: new})
        return [Event(path, False, self._acls_at(path, self.nodes[path]))]

    def mkdir(self, path: str, who: Identity, quota: Quota) -> list[Event]:
        try:
            self.lookup(path, who, Perm.WRITE)
            return []
        except XenStoreError as e:
            if e.name != "ENOENT":
                raise
        return self._create(path, b"", who, quota)

    def _create(self, path: str, value: bytes, who: Identity, quota: Quota) -> list[Event]:
        missing = [path]
        for anc in paths.ancestors(path):
            if self.get(anc) is not None:
                break
            missing.append(anc)
        top_parent = paths.parent(missing[-1])
        changes: dict[str, Node | None] = {}
        parent_node = self.nodes[top_parent]
        new_nodes = []
        for p in reversed(missing):  # top-down
            node_acl = parent_node.acl
            if not who.privileged:
                node_acl = (Entry(node_acl[0].letter, who.domid),) + node_acl[1:]
            child = Node(value=value if p == path else b"", acl=node_acl)
            new_nodes.append((p, child))
            parent_node = child
        # Quotas, all checked before anything changes.
        if not who.privileged and quota.exceeded("nodes", self.owned[who.domid] + len(missing)):
            raise XenStoreError("ENOSPC", "node quota")
        par = self.nodes[top_parent]
        par = replace(par, children=par.children + (paths.basename(missing[-1]),))
        self._check_size(who, quota, par)
        changes[top_parent] = par
        for i, (p, child) in enumerate(new_nodes):
            if i + 1 < len(new_nodes):
                child = replace(child, children=(paths.basename(new_nodes[i + 1][0]),))
            self._check_size(who, quota, child)
            changes[p] = child
        self._apply(changes)
        return [Event(path, False, self._acls_at(path, self.nodes[path]))]

    def rm(self, path: str, who: Identity) -> list[Event]:
        if path == "/":
            # xenstored looks the node up first: a caller who may not write
            # '/' gets EACCES, everyone else EINVAL.
            self.lookup(path, who, Perm.WRITE)
            raise XenStoreError("EINVAL", "cannot remove /")
        try:
            self.lookup(path, who, Perm.WRITE)
        except XenStoreError as e:
            if e.name == "ENOENT" and self.get(paths.parent(path)) is not None:
                return []
            raise
        return self.remove_subtree(path)

    def remove_subtree(self, path: str) -> list[Event]:
        """Remove without permission checks (also used by domain release)."""
        events: list[Event] = []
        changes: dict[str, Node | None] = {}
        # Children before their parent, each subtree in order, as the
        # recursive delnode_sub() would: a stack of (path, node, visited).
        stack: list[tuple[str, Node, bool]] = []
        top = self.get(path)
        if top is not None:
            stack.append((path, top, False))
        while stack:
            p, node, visited = stack.pop()
            if visited:
                # Fired while the node and its parent still exist (delnode_sub).
                events.append(Event(p, p != path, self._acls_at(p, node)))
                changes[p] = None
                continue
            stack.append((p, node, True))
            for c in reversed(node.children):
                child_path = paths.join(p, c)
                child = self.get(child_path)
                if child is not None:
                    stack.append((child_path, child, False))
        par_path = paths.parent(path)
        par = self.nodes[par_path]
        name = paths.basename(path)
        changes[par_path] = replace(par, children=tuple(c for c in par.children if c != name))
        self._apply(changes)
        return events

    def set_perms(self, path: str, new_acl: ACL, who: Identity, quota: Quota) -> list[Event]:
        if not who.privileged and quota.exceeded("node-permissions", len(new_acl)):
            raise XenStoreError("ENOSPC", "too many permission entries")
        node = self.lookup(path, who, Perm.WRITE | Perm.OWNER)
        if not who.privileged and owner(new_acl) != owner(node.acl):
            raise XenStoreError("EPERM", "only a privileged domain may change the owner")
        new = replace(node, acl=new_acl)
        if not path.startswith("@"):
            self._check_size(who, quota, new)
            new_owner = owner(new_acl)
            if (
                not who.privileged
                and new_owner != owner(node.acl)
                and quota.exceeded("nodes", self.owned[new_owner] + 1)
            ):
                raise XenStoreError("ENOSPC", "node quota")
        self._apply({path: new})
        return [Event(path, False, (node.acl,) + self._acls_at(path, self.nodes[path]))]

    # -- domain release --------------------------------------------------
    def paths_owned_by(self, domid: int) -> list[str]:
        return [p for p, n in self.nodes.items() if owner(n.acl) == domid]

    def rewrite_acls(self, fn: Callable[[str, ACL], ACL]) -> None:
        changes = {}
        for p, n in self.nodes.items():
            new = fn(p, n.acl)
            if new != n.acl:
                changes[p] = replace(n, acl=new)
        self._apply(changes)

    def node_count(self) -> int:
        return len(self.nodes)


def directory_part(node: Node, offset: int) -> bytes:
    """DIRECTORY_PART reply exactly as send_directory_part(): the generation
    as a string and NUL, then the children blob from byte `offset`, as much
    as fits in XENSTORE_PAYLOAD_MAX; when the list ends in this reply an
    extra NUL follows (so the end shows as an empty string).  An offset at
    or past the end gives just the generation and an empty string."""
    from xenbed.protocols.xs_wire import PAYLOAD_MAX

    blob = b"".join(c.encode("latin-1") + b"\0" for c in node.children)
    gen = str(node.generation).encode() + b"\0"
    if offset >= len(blob):
        return gen + b"\0"
    maxlen = PAYLOAD_MAX - len(gen) - 1
    pos = offset
    length = 0
    while True:
        end = blob.find(b"\0", pos)
        name_len = end - pos
        if length + name_len >= maxlen:
            break
        length += name_len + 1
        pos = end + 1
        if offset + length == len(blob):
            break
    data = gen + blob[offset : offset + length]
    if offset + length == len(blob):
        data += b"\0"
    return data


def iter_subtree(nodes: dict[str, Node], path: str) -> Iterable[str]:
    """`path` and every node below it, parents first (no recursion)."""
    stack = [path]
    while stack:
        p = stack.pop()
        node = nodes.get(p)
        if node is None:
            continue
        yield p
        stack.extend(paths.join(p, c) for c in reversed(node.children))
