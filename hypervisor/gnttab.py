"""Grant tables (v1): who may map or copy which page of whom.  Pure, no I/O.

Theory of operation.  Each domain owns a `GrantTable` of `grant_entry_v1`
entries (flags, domid, frame), 512 per 4 KiB frame, growing on demand from
one frame up to `max_grant_frames` (Xen's default 64, so 32768 entries).
Entries 0..7 are reserved for the toolstack (GNTTAB_NR_RESERVED_ENTRIES:
console, xenstore); the allocator `grant_access` never hands them out, but
`set_entry` may write any entry, as a guest writing its own table may.

The guest owns the bits Xen calls [GST] (type, GTF_readonly, cache bits,
GTF_sub_page) and the domid and frame; Xen owns GTF_reading / GTF_writing,
which here are computed from the active entry's pin counts: reading while
any mapping exists, writing while any writable one does.  In Xen a guest
revokes with a cmpxchg that fails while those bits are set; here
`end_access` and `set_entry` on a pinned entry are refused with
GNTST_eagain and report the mapper, so an entry cannot change under a
mapping (which is also what makes the active entry's frame equal the
shared entry's).

`Gnttab` owns all tables and the maptracks.  A maptrack belongs to the
mapper, as in Xen: every mapping a domain holds -- whoever granted it --
takes one entry of *its own* maptrack, named by a small integer handle, and
a domain whose maptrack is full is refused further maps with
GNTST_no_device_space ("Failed to obtain maptrack handle") while every
other domain maps on.  The limit is Xen 4.17's: max_maptrack_frames=1024
frames of MAPTRACK_PER_FRAME=512 entries (struct grant_mapping is 8 bytes),
so 524,288 mappings per mapper; frames are counted as used
(`maptrack_frames`), as Xen grows a maptrack a page at a time.  So a guest
that makes dom0's backends map its grants spends dom0's maptrack only as
far as the backends let it (blkback keeps at most 1,056 persistent grants
per ring and purges the rest, drivers/blk/blkback.py), far below the
limit: one guest cannot take what dom0 needs to serve the others.  `map` checks what Xen's map_grant_ref
checks, in Xen's order, and answers with Xen's GNTST_* status; `copy`
validates a gnttab_copy and tells the shell which two (domain, frame,
offset) spans to copy between: the shell moves the bytes, and must do so
before it dispatches any other call.

Peer misbehaviour (a guest asking for what it may not have) is always a
GNTST_* status in the result.  `GnttabUsageError` is for our own shell's
mistakes (an unknown calling domain, a non-int argument) and never reaches
a guest.

Domain death.  `domain_dying(d)`: d's grants can no longer be mapped
(GNTST_general_error, as Xen's map fails to pin a dying domain's frame) nor
copied (GNTST_bad_domain, as acquire_grant_for_copy says), mappings held by
others of d's pages stay valid until they unmap, and mappings d held of
others' pages are released (Xen's gnttab_release_mappings) so their
granters can revoke.  `domain_destroyed(d)` forgets d, or keeps it as a
zombie until the last mapping of its pages goes (then GNTST_bad_domain).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

PAGE_SIZE = 4096
ENTRIES_PER_FRAME = PAGE_SIZE // 8  # sizeof(grant_entry_v1_t) == 8
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
INITIAL_NR_GRANT_FRAMES = 1
DEFAULT_MAX_GRANT_FRAMES = 64  # Xen's opt_max_grant_frames
MAPTRACK_PER_FRAME = PAGE_SIZE // 8  # sizeof(struct grant_mapping) == 8: Xen's MAPTRACK_PER_PAGE
DEFAULT_MAX_MAPTRACK_FRAMES = 1024  # Xen 4.17's opt_max_maptrack_frames (gnttab_max_maptrack_frames)
DEFAULT_MAX_MAPTRACK = DEFAULT_MAX_MAPTRACK_FRAMES * MAPTRACK_PER_FRAME  # active mappings per mapper
PIN_LIMIT = 0x80  # Xen refuses a pin once a per-kind count has bit 7 set
DOMID_SELF = 0x7FF0

# grant_entry_v1.flags (grant_table.h)
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_sub_page = 1 << 8
GTF_transfer_committed = 1 << 2
GTF_transfer_completed = 1 << 3
GTF_XEN_OWNED = GTF_reading | GTF_writing  # for permit_access entries

# gnttab_map_grant_ref.flags
GNTMAP_device_map = 1 << 0
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2
GNTMAP_application_map = 1 << 3
GNTMAP_contains_pte = 1 << 4

# gnttab_copy.flags
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

from xenbed.protocols.gntst import *  # noqa: F401,F403  (GNTST_* as Xen's header names them)
from xenbed.protocols.gntst import GNTST_MESSAGES, GNTST_okay, gntst_message  # noqa: F401


class GnttabUsageError(Exception):
    """Our own shell called the core wrongly (a programming error)."""


# -- values ------------------------------------------------------------------
@dataclass(frozen=True)
class GrantEntry:
    """One grant_entry_v1 as the granting guest would read it."""

    flags: int = GTF_invalid
    domid: int = 0
    frame: int = 0

    @property
    def type(self) -> int:
        return self.flags & GTF_type_mask

    @property
    def readonly(self) -> bool:
        return bool(self.flags & GTF_readonly)


@dataclass(frozen=True, slots=True)  # up to DEFAULT_MAX_MAPTRACK of them per domain
class Mapping:
    """An active mapping, as the maptrack records it."""

    mapper: int
    handle: int
    granter: int
    gref: int
    readonly: bool
    frame: int


@dataclass(frozen=True)
class _Answer:
    """What a grant operation answers: a GNTST_* status, and more when it is GNTST_okay."""

    status: int

    @property
    def ok(self) -> bool:
        return self.status == GNTST_okay


@dataclass(frozen=True)
class MapResult(_Answer):
    handle: int | None = None
    frame: int | None = None


@dataclass(frozen=True)
class Granted(_Answer):
    """Result of grant_access: the new gref when status is GNTST_okay."""

    gref: int | None = None


@dataclass(frozen=True)
class EndAccess(_Answer):
    """Result of end_access: GNTST_eagain with the mapper(s) while mapped."""

    mappers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ViaGrant:
    """A copy end named by grant reference (GNTCOPY_*_gref set)."""

    domid: int
    gref: int
    offset: int


@dataclass(frozen=True)
class OwnFrame:
    """A copy end in the caller's own memory (GNTCOPY_*_gref clear)."""

    frame: int
    offset: int


@dataclass(frozen=True)
class Span:
    """Where the shell reads or writes: `domid`'s page `frame` at `offset`."""

    domid: int
    frame: int
    offset: int


@dataclass(frozen=True)
class CopyResult(_Answer):
    source: Span | None = None
    dest: Span | None = None
    length: int = 0


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GnttabUsageError(f"{name} must be an int, got {value!r}")


# -- one domain's table --------------------------------------------------------
@dataclass
class _Active:
    """Xen's active_grant_entry: pins and the shadow of the entry at first pin."""

    domid: int
    frame: int
    readers: int = 0  # read-only mappings
    writers: int = 0  # writable mappings

    @property
    def pinned(self) -> bool:
        return bool(self.readers or self.writers)


class GrantTable:
    """One domain's grant table: the entries it writes and their pins."""

    def __init__(self, domid: int, *, max_frames: int = DEFAULT_MAX_GRANT_FRAMES) -> None:
        if max_frames < INITIAL_NR_GRANT_FRAMES:
            raise GnttabUsageError(f"max_frames must be >= {INITIAL_NR_GRANT_FRAMES}")
        self.domid = domid
        self.max_frames = max_frames
        self.nr_frames = INITIAL_NR_GRANT_FRAMES
        self._entries: dict[int, tuple[int, int, int]] = {}  # gref -> guest-owned (flags, domid, frame)
        self._active: dict[int, _Active] = {}
        self._free: list[int] = []  # heap of refs that became free, checked lazily
        self._next_fresh = GNTTAB_NR_RESERVED_ENTRIES  # refs >= this were never handed out

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * ENTRIES_PER_FRAME

    @property
    def max_entries(self) -> int:
        return self.max_frames * ENTRIES_PER_FRAME

    # -- what the guest sees and writes ----------------------------------------
    def entry(self, gref: int) -> GrantEntry:
        """The entry as the guest reads it, GTF_reading/GTF_writing included."""
        _check_int("gref", gref)
        if not 0 <= gref < self.max_entries:
            raise GnttabUsageError(f"gref {gref} outside domain {self.domid}'s table")
        flags, domid, frame = self._entries.get(gref, (GTF_invalid, 0, 0))
        act = self._active.get(gref)
        if act is not None:
            flags |= GTF_reading | (GTF_writing if act.writers else 0)
        return GrantEntry(flags, domid, frame)

    def set_entry(self, gref: int, flags: int, domid: int, frame: int) -> int:
        """The guest writes entry `gref` (its own table).  GTF_reading and
        GTF_writing are Xen's and ignored.  Refused with GNTST_eagain while
        the entry is mapped; GNTST_bad_gntref beyond max_grant_frames."""
        for name, value in (("gref", gref), ("flags", flags), ("domid", domid), ("frame", frame)):
            _check_int(name, value)
        if not 0 <= gref < self.max_entries:
            return GNTST_bad_gntref
        if not (0 <= flags <= 0xFFFF and 0 <= domid <= 0xFFFF and 0 <= frame <= 0xFFFFFFFF):
            return GNTST_general_error
        if gref in self._active:
            return GNTST_eagain
        flags &= ~GTF_XEN_OWNED & 0xFFFF
        self._grow_to(gref)
        if flags & GTF_type_mask == GTF_invalid:
            if self._entries.pop(gref, None) is not None:
                self._release(gref)
        else:
            self._entries[gref] = (flags, domid, frame)
        return GNTST_okay

    def grant_access(self, domid: int, frame: int, readonly: bool = False) -> Granted:
        """Allocate a free ref >= 8 and grant `domid` access to `frame`
        (Linux's gnttab_grant_foreign_access).  GNTST_no_space when full."""
        _check_int("domid", domid)
        _check_int("frame", frame)
        gref = self._allocate()
        if gref is None:
            return Granted(GNTST_no_space)
        status = self.set_entry(gref, GTF_permit_access | (GTF_readonly if readonly else 0), domid, frame)
        if status != GNTST_okay:
            self._release(gref)  # hand it out again
            return Granted(status)
        return Granted(status, gref)

    def end_access(self, gref: int) -> EndAccess:
        """Revoke: the entry becomes GTF_invalid unless it is mapped, in which
        case GNTST_eagain names the mapper and nothing changes.  (A v1 entry
        names one grantee, so at most one domain maps it.)"""
        _check_int("gref", gref)
        if not 0 <= gref < self.max_entries:
            return EndAccess(GNTST_bad_gntref)
        if gref in self._active:
            return EndAccess(GNTST_eagain, (self._active[gref].domid,))
        if self._entries.pop(gref, None) is not None:
            self._release(gref)
        return EndAccess(GNTST_okay)

    def in_use(self, gref: int) -> bool:
        return gref in self._active

    def granted_refs(self) -> list[int]:
        """Refs whose entry is not GTF_invalid."""
        return sorted(self._entries)

    # -- internals ---------------------------------------------------------------
    def _grow_to(self, gref: int) -> None:
        self.nr_frames = max(self.nr_frames, gref // ENTRIES_PER_FRAME + 1)

    def _allocate(self) -> int | None:
        while self._free:
            gref = heapq.heappop(self._free)
            if gref not in self._entries and gref not in self._active:
                return gref
        while self._next_fresh < self.max_entries:
            gref = self._next_fresh
            self._next_fresh += 1
            if gref not in self._entries and gref not in self._active:
                return gref
        return None

    def _release(self, gref: int) -> None:
        if GNTTAB_NR_RESERVED_ENTRIES <= gref < self._next_fresh:
            heapq.heappush(self._free, gref)

    def _check(self, gref: int, mapper: int, readonly: bool, *, for_map: bool) -> tuple[int, int]:
        """Xen's checks before a pin (_set_status): (status, frame).  A copy
        (`for_map` false) may use a GTF_sub_page entry, a map may not."""
        if not 0 <= gref < self.nr_entries:
            return GNTST_bad_gntref, 0
        act = self._active.get(gref)
        if act is not None:
            if act.domid != mapper or act.readers >= PIN_LIMIT or act.writers >= PIN_LIMIT:
                return GNTST_general_error, 0
        flags, domid, frame = self._entries.get(gref, (GTF_invalid, 0, 0))
        mask = GTF_type_mask | GTF_sub_page if for_map else GTF_type_mask
        if act is None and ((flags & mask) != GTF_permit_access or domid != mapper):
            return GNTST_general_error, 0  # "Bad flags or dom"
        if not readonly and flags & GTF_readonly:
            return GNTST_general_error, 0  # "Attempt to write-pin a r/o grant entry"
        return GNTST_okay, frame if act is None else act.frame

    def _pin(self, gref: int, mapper: int, readonly: bool) -> int:
        """Take a pin that _check allowed; the frame mapped."""
        act = self._active.get(gref)
        if act is None:
            act = self._active[gref] = _Active(mapper, self._entries[gref][2])
        if readonly:
            act.readers += 1
        else:
            act.writers += 1
        return act.frame

    def _unpin(self, gref: int, readonly: bool) -> None:
        act = self._active[gref]
        if readonly:
            act.readers -= 1
        else:
            act.writers -= 1
        if not act.pinned:
            del self._active[gref]


# -- all domains -------------------------------------------------------------
class _Dom:
    def __init__(self, table: GrantTable, max_maptrack: int, nr_pages: int | None) -> None:
        self.table = table
        self.max_maptrack = max_maptrack
        self.nr_pages = nr_pages
        self.dying = False
        self.zombie = False  # destroyed, kept while others still map its pages
        self.maptrack: dict[int, Mapping] = {}
        self._fresh = 0
        self._freed: deque[int] = deque()

    def has_room(self) -> bool:
        return len(self.maptrack) < self.max_maptrack

    @property
    def maptrack_frames(self) -> int:
        """Maptrack frames in use, as Xen grows it: one per MAPTRACK_PER_FRAME handles ever handed out."""
        return -(-self._fresh // MAPTRACK_PER_FRAME)

    def new_handle(self) -> int:
        if self._fresh < self.max_maptrack:
            self._fresh += 1
            return self._fresh - 1
        return self._freed.popleft()  # FIFO reuse, as Xen's maptrack free list

    def free_handle(self, handle: int) -> None:
        del self.maptrack[handle]
        self._freed.append(handle)

    def page_ok(self, frame: int) -> bool:
        return 0 <= frame and (self.nr_pages is None or frame < self.nr_pages)


class Gnttab:
    """All grant tables and every mapper's maptrack."""

    def __init__(self, *, max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
                 max_maptrack: int | None = None, max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES) -> None:
        """`max_maptrack_frames` is Xen's per-domain limit (frames of
        MAPTRACK_PER_FRAME entries); `max_maptrack`, in entries, overrides it
        (unit tests use small ones)."""
        self._max_grant_frames = max_grant_frames
        self._max_maptrack = max_maptrack or max_maptrack_frames * MAPTRACK_PER_FRAME
        self._doms: dict[int, _Dom] = {}

    # -- domain lifecycle (called by the shell) ------------------------------
    def add_domain(self, domid: int, *, max_grant_frames: int | None = None,
                   max_maptrack: int | None = None, nr_pages: int | None = None) -> GrantTable:
        """Give `domid` a table.  `nr_pages`, when known, lets map and copy
        refuse frames outside its memory with GNTST_bad_page."""
        _check_int("domid", domid)
        if domid in self._doms:
            raise GnttabUsageError(f"domain {domid} already has a grant table")
        table = GrantTable(domid, max_frames=max_grant_frames or self._max_grant_frames)
        self._doms[domid] = _Dom(table, max_maptrack or self._max_maptrack, nr_pages)
        return table

    def table(self, domid: int) -> GrantTable:
        return self._caller(domid).table

    def domain_dying(self, domid: int) -> list[Mapping]:
        """Mark `domid` dying and release the mappings it held of others'
        pages (returned, so the shell can drop the file descriptors)."""
        dom = self._caller(domid)
        dom.dying = True
        released = sorted(dom.maptrack.values(), key=lambda m: m.handle)
        for m in released:
            self._unmap(dom, m)
        return released

    def domain_destroyed(self, domid: int) -> tuple[int, ...]:
        """Forget `domid` once nothing maps its pages.  Returns the domains
        still mapping them (then it stays a zombie until they unmap)."""
        dom = self._caller(domid)
        if not dom.dying:
            raise GnttabUsageError(f"domain {domid} destroyed without domain_dying first")
        dom.zombie = True
        holders = self._mappers_of(domid)
        if not holders:
            del self._doms[domid]
        return holders

    # -- hypercalls ----------------------------------------------------------
    def map(self, mapper: int, granter: int, gref: int, readonly: bool) -> MapResult:
        """GNTTABOP_map_grant_ref (host map) by `mapper` of `granter`'s `gref`."""
        me = self._caller(mapper)
        _check_int("granter", granter)
        _check_int("gref", gref)
        if me.dying:
            return MapResult(GNTST_general_error)
        them = self._doms.get(granter)
        if them is None or them.zombie:
            return MapResult(GNTST_bad_domain)
        if not me.has_room():
            return MapResult(GNTST_no_device_space)  # "Failed to obtain maptrack handle"
        table = them.table
        status, frame = table._check(gref, mapper, bool(readonly), for_map=True)
        if status == GNTST_okay and them.dying:
            status = GNTST_general_error  # Xen: "Could not pin grant frame" of a dying owner
        if status == GNTST_okay and not them.page_ok(frame):
            status = GNTST_bad_page
        if status != GNTST_okay:
            return MapResult(status)
        frame = table._pin(gref, mapper, bool(readonly))
        handle = me.new_handle()
        me.maptrack[handle] = Mapping(mapper, handle, granter, gref, bool(readonly), frame)
        return MapResult(GNTST_okay, handle, frame)

    def unmap(self, mapper: int, handle: int) -> int:
        """GNTTABOP_unmap_grant_ref: GNTST_bad_handle unless `handle` is one
        of `mapper`'s active mappings."""
        me = self._caller(mapper)
        _check_int("handle", handle)
        m = me.maptrack.get(handle)
        if m is None:
            return GNTST_bad_handle
        self._unmap(me, m)
        return GNTST_okay

    def end_access(self, granter: int, gref: int) -> EndAccess:
        """The granter revokes `gref`; refused (GNTST_eagain) while mapped,
        naming the domain that maps it."""
        return self._caller(granter).table.end_access(gref)

    def copy(self, caller: int, source: ViaGrant | OwnFrame, dest: ViaGrant | OwnFrame,
             length: int) -> CopyResult:
        """GNTTABOP_copy, validated in Xen's order (domains, source, dest,
        then bounds).  On GNTST_okay the shell copies `length` bytes from
        result.source to result.dest."""
        me = self._caller(caller)
        raw: list[int] = []
        for end in (source, dest):
            if isinstance(end, ViaGrant):
                for name in ("domid", "gref", "offset"):
                    _check_int(name, getattr(end, name))
                raw += (end.gref, end.domid, end.offset)
            elif isinstance(end, OwnFrame):
                _check_int("frame", end.frame)
                _check_int("offset", end.offset)
                raw += (end.frame, DOMID_SELF, end.offset)
            else:
                raise GnttabUsageError(f"copy end must be ViaGrant or OwnFrame, got {end!r}")
        _check_int("length", length)
        flags = ((GNTCOPY_source_gref if isinstance(source, ViaGrant) else 0)
                 | (GNTCOPY_dest_gref if isinstance(dest, ViaGrant) else 0))
        return self._copy_result(self._copy_one(me, caller, *raw, length, flags), raw[2], raw[5], length)

    def copy_op(self, caller: int, flags: int, source_domid: int, source_ref: int, source_offset: int,
                dest_domid: int, dest_ref: int, dest_offset: int, length: int) -> CopyResult:
        """A struct gnttab_copy as a guest sends it: each end is a gref of
        `*_domid` when its GNTCOPY_*_gref flag is set, else a frame that must
        be the caller's own (`*_domid` == DOMID_SELF, else permission denied)."""
        me = self._caller(caller)
        for name, value in (("flags", flags), ("source_domid", source_domid), ("source_ref", source_ref),
                            ("source_offset", source_offset), ("dest_domid", dest_domid), ("dest_ref", dest_ref),
                            ("dest_offset", dest_offset), ("length", length)):
            _check_int(name, value)
        return self._copy_result(self._copy_one(me, caller, source_ref, source_domid, source_offset,
                                                dest_ref, dest_domid, dest_offset, length, flags),
                                 source_offset, dest_offset, length)

    def copy_batch(self, caller: int, ops) -> list[tuple]:
        """GNTTABOP_copy with an array, as protocols/gntbatch.py decodes it:
        ops are (src ref, src domid, src offset, dst ref, dst domid, dst
        offset, len, flags) ints.  One answer per op, without building
        values: (status,) or, for GNTST_okay, (status, src domid, src frame,
        dst domid, dst frame): the shell copies before the next op."""
        me = self._caller(caller)
        one = self._copy_one
        return [one(me, caller, *op) for op in ops]

    def _copy_one(self, me: _Dom, caller: int, sref: int, sdom: int, soff: int, dref: int, ddom: int,
                  doff: int, length: int, flags: int) -> tuple:
        src_gref, dst_gref = flags & GNTCOPY_source_gref, flags & GNTCOPY_dest_gref
        if (not src_gref and sdom != DOMID_SELF) or (not dst_gref and ddom != DOMID_SELF):
            return (GNTST_permission_denied,)  # "Only DOMID_SELF may reference via frame"
        if me.dying:
            return (GNTST_general_error,)
        doms = self._doms
        them_s = them_d = None
        if src_gref:
            them_s = doms.get(caller if sdom == DOMID_SELF else sdom)
            if them_s is None or them_s.zombie:
                return (GNTST_bad_domain,)
        if dst_gref:
            them_d = doms.get(caller if ddom == DOMID_SELF else ddom)
            if them_d is None or them_d.zombie:
                return (GNTST_bad_domain,)
        status, sdom, sframe = self._copy_end(me, caller, them_s, sref, True)
        if status != GNTST_okay:
            return (status,)
        status, ddom, dframe = self._copy_end(me, caller, them_d, dref, False)
        if status != GNTST_okay:
            return (status,)
        if not (0 <= length and 0 <= soff and soff + length <= PAGE_SIZE
                and 0 <= doff and doff + length <= PAGE_SIZE):
            return (GNTST_bad_copy_arg,)  # "copy beyond page area"
        return (GNTST_okay, sdom, sframe, ddom, dframe)

    @staticmethod
    def _copy_end(me: _Dom, caller: int, them: _Dom | None, ref: int, readonly: bool) -> tuple[int, int, int]:
        """(status, domid, frame) of a copy end: one's own frame `ref` when
        `them` is None, else `them`'s grant `ref` (acquire_grant_for_copy)."""
        if them is None:
            return (GNTST_okay if me.page_ok(ref) else GNTST_bad_page), caller, ref
        status, frame = them.table._check(ref, caller, readonly, for_map=False)
        if status == GNTST_okay and them.dying:
            status = GNTST_bad_domain  # acquire_grant_for_copy on a dying owner
        if status == GNTST_okay and not them.page_ok(frame):
            status = GNTST_bad_page
        return status, them.table.domid, frame

    @staticmethod
    def _copy_result(answer: tuple, soff: int, doff: int, length: int) -> CopyResult:
        if answer[0] != GNTST_okay:
            return CopyResult(answer[0])
        _, sdom, sframe, ddom, dframe = answer
        return CopyResult(GNTST_okay, Span(sdom, sframe, soff), Span(ddom, dframe, doff), length)

    def query_size(self, domid: int) -> tuple[int, int]:
        """GNTTABOP_query_size: (nr_frames, max_frames)."""
        table = self._caller(domid).table
        return table.nr_frames, table.max_frames

    # -- introspection -------------------------------------------------------
    def mapping(self, mapper: int, handle: int) -> Mapping | None:
        return self._caller(mapper).maptrack.get(handle)

    def active_mappings(self, domid: int | None = None) -> list[Mapping]:
        """Every active mapping, or those held by `domid`."""
        doms = [self._caller(domid)] if domid is not None else list(self._doms.values())
        return sorted((m for d in doms for m in d.maptrack.values()),
                      key=lambda m: (m.mapper, m.handle))

    def maptrack_usage(self, domid: int) -> tuple[int, int, int]:
        """(mappings held, maptrack frames used, limit in mappings) of `domid` as a mapper."""
        dom = self._caller(domid)
        return len(dom.maptrack), dom.maptrack_frames, dom.max_maptrack

    def zombies(self) -> list[int]:
        """Destroyed domains kept alive only by others' mappings."""
        return sorted(d for d, dom in self._doms.items() if dom.zombie)

    def leaks(self) -> list[Mapping]:
        """Mappings of pages whose granter is dying or destroyed: each keeps a
        dead domain's memory alive.  Empty once every backend has unmapped."""
        dead = {d for d, dom in self._doms.items() if dom.dying}
        return [m for m in self.active_mappings() if m.granter in dead]

    def check_invariants(self) -> None:
        """Raise AssertionError if pins, flags and maptracks disagree."""
        counts: dict[tuple[int, int], list[int]] = {}
        for domid, dom in self._doms.items():
            assert len(dom.maptrack) <= dom.max_maptrack, domid
            if dom.dying:
                assert not dom.maptrack, f"dying domain {domid} still maps pages"
            for handle, m in dom.maptrack.items():
                assert (m.mapper, m.handle) == (domid, handle), m
                granter = self._doms[m.granter]
                c = counts.setdefault((m.granter, m.gref), [0, 0])
                c[0 if m.readonly else 1] += 1
                act = granter.table._active[m.gref]
                assert act.domid == domid and act.frame == m.frame, (m, act)
        for domid, dom in self._doms.items():
            table = dom.table
            assert table.nr_frames <= table.max_frames
            if dom.zombie:
                assert self._mappers_of(domid), f"zombie {domid} with no mappings"
            for gref, act in table._active.items():
                readers, writers = counts.get((domid, gref), (0, 0))
                assert (act.readers, act.writers) == (readers, writers), (domid, gref, act)
                assert act.pinned
            for gref in set(table._active) | set(table._entries):
                assert gref < table.nr_entries, (domid, gref)
                e = table.entry(gref)
                pins = counts.get((domid, gref), (0, 0))
                assert bool(e.flags & GTF_reading) == (sum(pins) > 0), (domid, gref, e)
                assert bool(e.flags & GTF_writing) == (pins[1] > 0), (domid, gref, e)

    # -- internals -----------------------------------------------------------
    def _caller(self, domid: int) -> _Dom:
        dom = self._doms.get(domid) if isinstance(domid, int) else None
        if dom is None or dom.zombie:
            raise GnttabUsageError(f"domain {domid!r} has no grant table (add_domain not called, or destroyed)")
        return dom

    def _mappers_of(self, granter: int) -> tuple[int, ...]:
        return tuple(sorted({m.mapper for dom in self._doms.values() for m in dom.maptrack.values()
                             if m.granter == granter}))

    def _unmap(self, me: _Dom, m: Mapping) -> None:
        me.free_handle(m.handle)
        them = self._doms[m.granter]
        them.table._unpin(m.gref, m.readonly)
        if them.zombie and not self._mappers_of(m.granter):
            del self._doms[m.granter]
