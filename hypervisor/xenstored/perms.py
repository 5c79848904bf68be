"""Xen permission semantics (xenstore.txt "Permissions", xenstored's
perm_for_conn()).

An ACL is a non-empty tuple of `Entry(letter, domid)`; letters are n (none),
r (read), w (write), b (both).  The first entry names the owner, and its
letter is what every domain not listed later gets.  Rules:

* privileged callers (dom0, or a connection the shell marks privileged) and
  the owner get read, write and "owner" (the right to SET_PERMS);
* a domain that is the SET_TARGET controller of domain T is treated as T as
  well: it owns T's nodes and gets T's entries;
* otherwise the first later entry naming the caller (or its target) decides,
  else the owner's letter does.

On the wire an ACL is NUL-separated strings like ``b0``, ``r5``.  Domids are
parsed as decimal 0..65535 (xenstored's strtol also accepts hex; we do not).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import XenStoreError

DOMID_MAX = 0xFFFF


class Perm(enum.IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    OWNER = 4
    ALL = READ | WRITE | OWNER


_LETTER = {"n": Perm.NONE, "r": Perm.READ, "w": Perm.WRITE, "b": Perm.READ | Perm.WRITE}


@dataclass(frozen=True, slots=True)
class Entry:
    letter: str
    domid: int

    @property
    def perm(self) -> Perm:
        return _LETTER[self.letter]

    def __str__(self) -> str:
        return f"{self.letter}{self.domid}"


ACL = tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: from authentication, never from the client."""

    domid: int
    privileged: bool = False
    target: int | None = None


def parse_entry(text: str) -> Entry:
    if len(text) < 2 or text[0] not in _LETTER or not text[1:].isdigit() or not text[1:].isascii():
        raise XenStoreError("EINVAL", f"bad permission {text!r}")
    domid = int(text[1:])
    if domid > DOMID_MAX:
        raise XenStoreError("EINVAL", f"domid out of range in {text!r}")
    return Entry(text[0], domid)


def parse_acl(strings: list[str]) -> ACL:
    if not strings:
        raise XenStoreError("EINVAL", "empty permission list")
    return tuple(parse_entry(s) for s in strings)


def acl(*texts: str) -> ACL:
    """Convenience: acl("n0", "r5")."""
    return parse_acl(list(texts))


def format_acl(entries: ACL) -> list[str]:
    return [str(e) for e in entries]


def owner(entries: ACL) -> int:
    return entries[0].domid


def perm_for(who: Identity, entries: ACL) -> Perm:
    """What `who` may do on a node with these entries."""
    first = entries[0]
    if who.privileged or first.domid == who.domid or (
        who.target is not None and first.domid == who.target
    ):
        return Perm.ALL
    for e in entries[1:]:
        if e.domid == who.domid or (who.target is not None and e.domid == who.target):
            return e.perm
    return first.perm


def can(who: Identity, entries: ACL, need: Perm) -> bool:
    # int.__and__ skips IntFlag's operator (which builds a new enum member):
    # this runs for every request.
    return int.__and__(perm_for(who, entries), need) == need


def strip_domid(entries: ACL, domid: int) -> ACL:
    """Drop non-owner entries naming `domid` (a released domain)."""
    kept = (entries[0],) + tuple(e for e in entries[1:] if e.domid != domid)
    return kept
