"""Grant tables from inside a domain: offer pages, map and copy others' pages.

As in a Linux guest (gnttab_grant_foreign_access, gnttab_map_refs,
gnttab_batch_copy):

* the granter calls `grant(domid, page)` -> gref, and `end(gref)` when done;
  `end` is refused with GNTST_eagain while the grantee still has it mapped
  (Xen's "still in use"), so a driver ends after the peer unmapped;
* the grantee calls `map(domid, gref)` -> Mapping and `unmap(mapping)`.  The
  page arrives as a descriptor (read-only when the grant or the map is
  read-only), so the kernel enforces the permission: a writable mapping of
  a read-only grant cannot even be created (PermissionError);
* `copy(ops)` moves bytes between grant refs and one's own frames without
  mapping (GNTTABOP_copy), each op getting its own status.
* `map_batch([(domid, gref, readonly), ...])` and `unmap_batch(mappings)`
  map or unmap many in one call (gnttab_map_refs), each entry with its own
  status: a refused entry is a GrantError in the list, the others map.

map, unmap and copy travel in BINARY frames (protocols/gntbatch.py: Xen's
arrays of gnttab_map_grant_ref / unmap / copy); batches larger than the
hypervisor takes in one call are split.

Refusals raise `GrantError` named by Xen's GNTST_* status (`.status` holds
the name, e.g. "GNTST_eagain"; `.code` the number); errno-style refusals
that are not about a grant (EINVAL arguments, ESRCH) stay HypercallError.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from xenbed.protocols import gntbatch as gb
from xenbed.protocols import hypercall as hc

from .hypercall import HypercallError, HypervisorLink
from .memory import Page, map_page_fd

from xenbed.protocols.gntst import *  # noqa: F401,F403  (GNTST_* as Xen's header names them)
from xenbed.protocols.gntst import GNTST_NAMES, GNTST_VALUES, gntst_name  # noqa: F401


class GrantError(Exception):
    """The hypervisor refused a grant operation with a GNTST_* status."""

    def __init__(self, status: str, op: str = "", message: str = "") -> None:
        self.status = gntst_name(status)
        self.code = GNTST_VALUES.get(self.status)
        self.op = op
        self.message = message
        super().__init__(f"{op}: {self.status}: {message}" if op else f"{self.status}: {message}")


def _gnttab_call(link: HypervisorLink, op: hc.Call, body: dict, with_fds: bool = False):
    """A grant call; GNTST refusals become GrantError.  The hypervisor reports
    them as an error reply whose `error` is the GNTST name (or number), or as
    a reply whose body carries a non-zero `status`; both are accepted."""
    try:
        if with_fds:
            reply, fds = link.call_with_fds(op, body)
        else:
            reply, fds = link.call(op, body), []
    except HypercallError as exc:
        status = _status_of(exc.code)
        if status is None:
            raise
        raise GrantError(status, exc.op, exc.message) from None
    status = _status_of(reply.get("status", GNTST_okay)) if isinstance(reply, dict) else None
    if status is not None and status != "GNTST_okay":
        hc.close_fds(fds)
        raise GrantError(status, op.name, str(reply.get("message", "")))
    return (reply, fds) if with_fds else reply


def _status_of(value) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return gntst_name(value)
    if isinstance(value, str):
        if value.startswith("GNTST_"):
            return value
        try:
            return gntst_name(int(value))
        except ValueError:
            return None
    return None


@dataclass(eq=False)
class Mapping:
    """Another domain's granted page, mapped here.  `mmap` is PROT_READ only
    for a read-only mapping."""

    handle: int
    mmap: mmap.mmap
    domid: int
    gref: int
    readonly: bool
    gfn: int | None = None


@dataclass(frozen=True)
class GrantRef:
    """A copy end in someone's grant: (granter domid, gref, byte offset)."""

    domid: int
    gref: int
    offset: int = 0

    def wire(self) -> dict:
        return {"domid": self.domid, "gref": self.gref, "offset": self.offset}

    def raw(self) -> tuple[int, int, int, bool]:
        """(ref, domid, offset, is a gref): a gnttab_copy_ptr."""
        return self.gref, self.domid, self.offset, True


@dataclass(frozen=True)
class LocalFrame:
    """A copy end in one's own memory: (gfn, byte offset)."""

    gfn: int
    offset: int = 0

    def wire(self) -> dict:
        return {"gfn": self.gfn, "offset": self.offset}

    def raw(self) -> tuple[int, int, int, bool]:
        return self.gfn, gb.DOMID_SELF, self.offset, False


@dataclass(frozen=True)
class CopyOp:
    """Copy `length` bytes from `src` to `dst` (neither may cross its page)."""

    src: GrantRef | LocalFrame
    dst: GrantRef | LocalFrame
    length: int

    def wire(self) -> dict:
        return {"src": self.src.wire(), "dst": self.dst.wire(), "len": self.length}

    @cached_property
    def raw(self) -> tuple:
        """A struct gnttab_copy as gntbatch.encode_copy takes it (kept: ops are reused)."""
        sref, sdom, soff, sgref = self.src.raw()
        dref, ddom, doff, dgref = self.dst.raw()
        flags = (gb.GNTCOPY_source_gref if sgref else 0) | (gb.GNTCOPY_dest_gref if dgref else 0)
        return sref, sdom, soff, dref, ddom, doff, self.length, flags


class GrantTable:
    def __init__(self, link: HypervisorLink) -> None:
        self.link = link

    # -- granter -----------------------------------------------------------------
    def grant(self, domid: int, page: Page | int, readonly: bool = False) -> int:
        """Let `domid` map or copy our page (a Page or a gfn): the gref to tell it."""
        gfn = page.gfn if isinstance(page, Page) else int(page)
        reply = _gnttab_call(self.link, hc.Call.GNTTAB_GRANT,
                             {"domid": int(domid), "gfn": gfn, "readonly": bool(readonly)})
        return int(reply["gref"])

    def end(self, gref: int) -> None:
        """Revoke a grant.  GrantError("GNTST_eagain") while it is mapped."""
        _gnttab_call(self.link, hc.Call.GNTTAB_END, {"gref": int(gref)})

    # -- grantee -----------------------------------------------------------------
    def map_fd(self, domid: int, gref: int, readonly: bool = False) -> tuple[int, int | None, int]:
        """Map a grant and keep the raw page descriptor: (handle, gfn, fd).
        The caller owns fd (a read-only descriptor when readonly) and must
        still unmap the handle (`unmap_handle`)."""
        reply, fds = _gnttab_call(self.link, hc.Call.GNTTAB_MAP,
                                  {"domid": int(domid), "gref": int(gref), "readonly": bool(readonly)},
                                  with_fds=True)
        handle = int(reply["handle"])
        if len(fds) != 1:
            hc.close_fds(fds)
            self.unmap_handle(handle)
            raise RuntimeError(f"GNTTAB_MAP answered {len(fds)} descriptors, not one")
        gfn = reply.get("gfn")
        return handle, None if gfn is None else int(gfn), fds[0]

    def map(self, domid: int, gref: int, readonly: bool = False) -> Mapping:
        """Map `domid`'s grant `gref` -> Mapping(handle, mmap)."""
        [mapping] = self.map_batch([(domid, gref, readonly)])
        if isinstance(mapping, GrantError):
            raise mapping
        return mapping

    def map_batch(self, ops) -> list[Mapping | GrantError]:
        """Map many grants, [(domid, gref, readonly)], in one call per
        gntbatch.MAX_MAP_BATCH: a Mapping per entry, or the GrantError that
        entry was refused with (the others are mapped all the same)."""
        ops = [(int(d), int(g), bool(ro)) for d, g, ro in ops]
        out: list[Mapping | GrantError] = []
        for start in range(0, len(ops), gb.MAX_MAP_BATCH):
            out += self._map_chunk(ops[start:start + gb.MAX_MAP_BATCH])
        return out

    def _map_chunk(self, ops) -> list[Mapping | GrantError]:
        body, fds = _gnttab_call(self.link, hc.Call.GNTTAB_MAP_BATCH, gb.encode_map(ops), with_fds=True)
        results = gb.decode_map_results(body)
        mapped = [r[1] for r in results if r[0] == GNTST_okay]
        if len(results) != len(ops) or len(mapped) != len(fds):
            hc.close_fds(fds)
            self._unmap_handles(mapped, check=False)
            raise RuntimeError(f"GNTTAB_MAP_BATCH answered {len(results)} entries and {len(fds)} descriptors "
                               f"for {len(ops)} ops ({len(mapped)} mapped)")
        out: list[Mapping | GrantError] = []
        pending = iter(fds)
        for (domid, gref, readonly), (status, handle, gfn) in zip(ops, results):
            if status != GNTST_okay:
                out.append(GrantError(gntst_name(status), "GNTTAB_MAP_BATCH", f"map dom{domid} gref {gref}"))
                continue
            try:
                view = map_page_fd(next(pending), readonly)
            except OSError as exc:  # the descriptor is closed; the handle is still ours to unmap
                self._unmap_handles([handle], check=False)
                out.append(GrantError("GNTST_general_error", "GNTTAB_MAP_BATCH", f"mmap of gref {gref}: {exc}"))
                continue
            out.append(Mapping(handle, view, domid, gref, readonly, gfn))
        return out

    def unmap(self, mapping: Mapping) -> None:
        """Drop our mapping, then tell the hypervisor (so the granter may end
        the grant).  Views into the mmap (a ring) must be released first."""
        self.unmap_batch([mapping])

    def unmap_batch(self, mappings, check: bool = True) -> list[str]:
        """Unmap many in one call per gntbatch.MAX_BATCH: our views are
        closed first (BufferError while a ring still holds one), then the
        handles go.  One status name per mapping; with `check`, the first
        failure raises GrantError (the others were unmapped)."""
        for mapping in mappings:
            if not mapping.mmap.closed:
                mapping.mmap.close()
        return self._unmap_handles([m.handle for m in mappings], check)

    def unmap_handle(self, handle: int) -> None:
        self._unmap_handles([int(handle)])

    def _unmap_handles(self, handles: list[int], check: bool = True) -> list[str]:
        return self._batched(hc.Call.GNTTAB_UNMAP_BATCH, gb.encode_unmap, handles, check,
                             lambda i: f"unmap handle {handles[i]}")

    # -- copy --------------------------------------------------------------------
    def copy(self, ops: list[CopyOp], check: bool = True) -> list[str]:
        """GNTTABOP_copy: one status name per op ("GNTST_okay", ...).  With
        `check`, the first failed op raises GrantError (the others ran)."""
        return self._batched(hc.Call.GNTTAB_COPY_BATCH, gb.encode_copy, [op.raw for op in ops], check,
                             lambda i: f"op {i} of {len(ops)}: {ops[i]}")

    def _batched(self, op: hc.Call, encode, entries: list, check: bool, describe) -> list[str]:
        """A status-array op over `entries`, one call per gntbatch.MAX_BATCH."""
        statuses: list[str] = []
        for start in range(0, len(entries), gb.MAX_BATCH):
            chunk = entries[start:start + gb.MAX_BATCH]
            answer = gb.decode_statuses(_gnttab_call(self.link, op, encode(chunk)))
            if len(answer) != len(chunk):
                raise RuntimeError(f"{op.name} answered {len(answer)} statuses for {len(chunk)} entries")
            statuses += [gntst_name(s) for s in answer]
        if check:
            for i, status in enumerate(statuses):
                if status != "GNTST_okay":
                    raise GrantError(status, op.name, describe(i))
        return statuses

    def query_size(self) -> dict:
        """{"nr_frames", "max_frames"} of our own grant table."""
        return _gnttab_call(self.link, hc.Call.GNTTAB_QUERY_SIZE, {})
