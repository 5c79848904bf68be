"""Grant table v1 core: step tables, one rule per step, plus a property test.

Domains in every table: 0 (dom0), 1 (the granting guest, 16 pages of
memory), 2 (a backend), 3 (a bystander).  Each step is
(label, call, expected status); a step's result is kept under its label so
later steps can name its handle or gref.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenbed.hypervisor.gnttab import (
    DEFAULT_MAX_GRANT_FRAMES, ENTRIES_PER_FRAME, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_bad_copy_arg,
    GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle, GNTST_bad_page, GNTST_eagain, GNTST_general_error,
    GNTST_no_device_space, GNTST_no_space, GNTST_okay, GNTST_permission_denied, GTF_permit_access,
    GTF_readonly, GTF_reading, GTF_sub_page, GTF_writing, DOMID_SELF, Gnttab, GnttabUsageError, OwnFrame,
    Span, ViaGrant, gntst_message,
)

OK = GNTST_okay


def fresh(**kw) -> Gnttab:
    g = Gnttab(**kw)
    for d in (0, 2, 3):
        g.add_domain(d)
    g.add_domain(1, nr_pages=16)
    return g


def status(result) -> int:
    return result if isinstance(result, int) else result.status


def run(g: Gnttab, steps) -> dict:
    seen: dict = {}
    for label, call, expected in steps:
        result = call(g, seen)
        seen[label] = result
        assert status(result) == expected, f"step {label!r}: got {status(result)} ({gntst_message(status(result))}), " \
                                           f"want {expected} ({gntst_message(expected)})"
        g.check_invariants()
    return seen


def flags(g, dom, gref):
    return g.table(dom).entry(gref).flags


# -- mapping ---------------------------------------------------------------------
MAP_RULES = [
    # the guest grants page 5 to dom2, read-write; allocator starts after the 8 reserved refs
    ("grant", lambda g, s: g.table(1).grant_access(2, 5), OK),
    ("ref8", lambda g, s: 0 if s["grant"].gref == 8 else -99, OK),
    # a grant not offered to you cannot be mapped (Xen: "Bad flags or dom" -> general error)
    ("not-yours", lambda g, s: g.map(3, 1, 8, False), GNTST_general_error),
    # the grantee maps it; nothing else in the table changes
    ("map-rw", lambda g, s: g.map(2, 1, 8, False), OK),
    # reading and writing are set while a writable mapping exists
    ("bits-rw", lambda g, s: 0 if flags(g, 1, 8) & (GTF_reading | GTF_writing) == GTF_reading | GTF_writing else -99, OK),
    # a second, read-only mapping of the same grant is fine
    ("map-ro", lambda g, s: g.map(2, 1, 8, True), OK),
    # revoke while mapped is refused and names the mapper
    ("revoke-busy", lambda g, s: g.end_access(1, 8), GNTST_eagain),
    ("revoke-names", lambda g, s: 0 if s["revoke-busy"].mappers == (2,) else -99, OK),
    # rewriting a mapped entry is refused too (the mapping's frame must not change under it)
    ("rewrite-busy", lambda g, s: g.table(1).set_entry(8, GTF_permit_access, 3, 6), GNTST_eagain),
    # dropping the writable mapping clears GTF_writing, keeps GTF_reading
    ("unmap-rw", lambda g, s: g.unmap(2, s["map-rw"].handle), OK),
    ("bits-ro", lambda g, s: 0 if flags(g, 1, 8) & (GTF_reading | GTF_writing) == GTF_reading else -99, OK),
    # unmapping the same handle twice is a bad handle
    ("unmap-again", lambda g, s: g.unmap(2, s["map-rw"].handle), GNTST_bad_handle),
    # another domain cannot unmap dom2's handle: handles are per mapper
    ("unmap-others", lambda g, s: g.unmap(3, s["map-ro"].handle), GNTST_bad_handle),
    # the last unmap clears GTF_reading, then revoke succeeds
    ("unmap-ro", lambda g, s: g.unmap(2, s["map-ro"].handle), OK),
    ("bits-none", lambda g, s: flags(g, 1, 8) & (GTF_reading | GTF_writing), 0),
    ("revoke", lambda g, s: g.end_access(1, 8), OK),
    # a revoked grant cannot be mapped any more
    ("map-revoked", lambda g, s: g.map(2, 1, 8, True), GNTST_general_error),
]


READONLY_RULES = [
    ("grant-ro", lambda g, s: g.table(1).grant_access(2, 5, readonly=True), OK),
    # a read-only grant mapped writable is refused ("write-pin a r/o grant entry")
    ("map-rw", lambda g, s: g.map(2, 1, 8, False), GNTST_general_error),
    # ... and the failed attempt left no bits behind
    ("no-bits", lambda g, s: flags(g, 1, 8) & (GTF_reading | GTF_writing), 0),
    # mapped read-only it works and only GTF_reading is set
    ("map-ro", lambda g, s: g.map(2, 1, 8, True), OK),
    ("reading", lambda g, s: flags(g, 1, 8) & (GTF_reading | GTF_writing), GTF_reading),
]


BAD_ARGUMENT_RULES = [
    ("grant", lambda g, s: g.table(1).grant_access(2, 5), OK),
    # an unknown granting domain
    ("no-domain", lambda g, s: g.map(2, 42, 8, False), GNTST_bad_domain),
    # DOMID_SELF is not a granter for map (Xen looks the domain up by id)
    ("self", lambda g, s: g.map(2, DOMID_SELF, 8, False), GNTST_bad_domain),
    # a ref beyond the table's current size
    ("beyond", lambda g, s: g.map(2, 1, ENTRIES_PER_FRAME, False), GNTST_bad_gntref),
    ("negative", lambda g, s: g.map(2, 1, -1, False), GNTST_bad_gntref),
    # an entry never written is GTF_invalid
    ("unwritten", lambda g, s: g.map(2, 1, 9, False), GNTST_general_error),
    # a sub-page grant may be copied from but not mapped
    ("subpage", lambda g, s: g.table(1).set_entry(10, GTF_permit_access | GTF_sub_page, 2, 5), OK),
    ("map-subpage", lambda g, s: g.map(2, 1, 10, True), GNTST_general_error),
    # a granted frame outside the granter's memory is a bad page
    ("outside", lambda g, s: g.table(1).set_entry(11, GTF_permit_access, 2, 16), OK),
    ("map-outside", lambda g, s: g.map(2, 1, 11, True), GNTST_bad_page),
    # set_entry beyond max_grant_frames is a bad gref; within it the table grows
    ("set-beyond", lambda g, s: g.table(1).set_entry(DEFAULT_MAX_GRANT_FRAMES * ENTRIES_PER_FRAME,
                                                     GTF_permit_access, 2, 5), GNTST_bad_gntref),
    ("set-grow", lambda g, s: g.table(1).set_entry(3 * ENTRIES_PER_FRAME, GTF_permit_access, 2, 5), OK),
    ("size", lambda g, s: 0 if g.query_size(1) == (4, DEFAULT_MAX_GRANT_FRAMES) else -99, OK),
    ("map-grown", lambda g, s: g.map(2, 1, 3 * ENTRIES_PER_FRAME, False), OK),
    # a guest's out-of-range field values are refused, not raised
    ("bad-domid", lambda g, s: g.table(1).set_entry(12, GTF_permit_access, 0x10000, 5), GNTST_general_error),
    # revoke of an out-of-range ref
    ("revoke-beyond", lambda g, s: g.end_access(1, 1 << 20), GNTST_bad_gntref),
    # revoking a free entry is harmless
    ("revoke-free", lambda g, s: g.end_access(1, 13), OK),
]


LIMIT_RULES = [
    ("grant-a", lambda g, s: g.table(1).grant_access(2, 1), OK),
    ("grant-b", lambda g, s: g.table(1).grant_access(2, 2), OK),
    ("map-1", lambda g, s: g.map(2, 1, 8, True), OK),
    ("map-2", lambda g, s: g.map(2, 1, 9, True), OK),
    # the third active mapping of a mapper with max_maptrack=2 finds no maptrack slot
    ("map-3", lambda g, s: g.map(2, 1, 8, True), GNTST_no_device_space),
    # the limit is per mapper: another domain still maps
    ("other", lambda g, s: g.table(1).grant_access(3, 3), OK),
    ("other-map", lambda g, s: g.map(3, 1, 10, True), OK),
    # an unmap frees a slot
    ("unmap", lambda g, s: g.unmap(2, s["map-1"].handle), OK),
    ("map-4", lambda g, s: g.map(2, 1, 8, True), OK),
    # handles are reused only after the fresh ones ran out (FIFO), so this is map-1's handle again
    ("reused", lambda g, s: s["map-4"].handle - s["map-1"].handle, 0),
]


@pytest.mark.parametrize("steps", [MAP_RULES, READONLY_RULES, BAD_ARGUMENT_RULES],
                         ids=["map", "readonly", "bad-arguments"])
def test_rules(steps):
    run(fresh(), steps)


def test_maptrack_limit():
    run(fresh(max_maptrack=2), LIMIT_RULES)


def test_grant_table_full_and_reserved_entries():
    g = Gnttab(max_grant_frames=1)
    g.add_domain(1)
    t = g.table(1)
    grefs = [t.grant_access(2, f).gref for f in range(ENTRIES_PER_FRAME - 8)]
    # the allocator never hands out the 8 reserved entries, and fills the rest in order
    assert grefs == list(range(8, ENTRIES_PER_FRAME))
    # a full table answers GNTST_no_space
    assert t.grant_access(2, 0).status == GNTST_no_space
    # a freed ref is handed out again, lowest first
    assert t.end_access(20).ok and t.end_access(9).ok
    assert t.grant_access(2, 0).gref == 9 and t.grant_access(2, 0).gref == 20
    # the toolstack may still write a reserved entry (console, xenstore)
    assert t.set_entry(1, GTF_permit_access, 0, 7) == OK
    g.add_domain(0)
    assert g.map(0, 1, 1, False).ok


def test_pin_count_limit_per_kind():
    g = fresh(max_maptrack=1000)
    assert g.table(1).grant_access(2, 5).ok
    # Xen refuses any pin once one per-kind count reaches 128 (act->pin & 0x80808080)
    handles = [g.map(2, 1, 8, True).handle for _ in range(128)]
    assert g.map(2, 1, 8, True).status == GNTST_general_error
    assert g.map(2, 1, 8, False).status == GNTST_general_error
    # one unmap makes room again
    assert g.unmap(2, handles[0]) == OK
    assert g.map(2, 1, 8, False).ok
    g.check_invariants()


def test_guest_cannot_set_xen_owned_bits():
    g = fresh()
    t = g.table(1)
    # GTF_reading / GTF_writing written by the guest are ignored
    assert t.set_entry(8, GTF_permit_access | GTF_reading | GTF_writing | GTF_readonly, 2, 5) == OK
    assert t.entry(8).flags == GTF_permit_access | GTF_readonly
    g.check_invariants()


def test_self_map_is_allowed_when_granted_to_self():
    g = fresh()
    assert g.table(1).grant_access(1, 5).ok
    r = g.map(1, 1, 8, False)
    assert r.ok and r.frame == 5
    assert g.end_access(1, 8).mappers == (1,)


# -- copy ------------------------------------------------------------------------
COPY_RULES = [
    ("grant-rw", lambda g, s: g.table(1).grant_access(2, 5), OK),  # gref 8
    ("grant-ro", lambda g, s: g.table(1).grant_access(2, 6, readonly=True), OK),  # gref 9
    # dom2 copies from its own frame 3 into dom1's writable grant: the shell gets both spans
    ("to-grant", lambda g, s: g.copy(2, OwnFrame(3, 0), ViaGrant(1, 8, 100), 200), OK),
    ("spans", lambda g, s: 0 if (s["to-grant"].source, s["to-grant"].dest, s["to-grant"].length)
     == (Span(2, 3, 0), Span(1, 5, 100), 200) else -99, OK),
    # copying from a read-only grant is fine
    ("from-ro", lambda g, s: g.copy(2, ViaGrant(1, 9, 0), OwnFrame(3, 0), 4096), OK),
    # copying into a read-only grant is refused (dest needs write access)
    ("to-ro", lambda g, s: g.copy(2, OwnFrame(3, 0), ViaGrant(1, 9, 0), 1), GNTST_general_error),
    # a grant not offered to the caller
    ("not-yours", lambda g, s: g.copy(3, ViaGrant(1, 8, 0), OwnFrame(0, 0), 1), GNTST_general_error),
    # offset + length beyond the page
    ("cross-src", lambda g, s: g.copy(2, ViaGrant(1, 8, 4000), OwnFrame(3, 0), 97), GNTST_bad_copy_arg),
    ("cross-dst", lambda g, s: g.copy(2, OwnFrame(3, 0), ViaGrant(1, 8, 1), 4096), GNTST_bad_copy_arg),
    ("edge", lambda g, s: g.copy(2, OwnFrame(3, 4095), ViaGrant(1, 8, 0), 1), OK),
    ("negative", lambda g, s: g.copy(2, OwnFrame(3, 0), ViaGrant(1, 8, 0), -1), GNTST_bad_copy_arg),
    # grant checks come before the bounds check, as in Xen
    ("bad-ref-first", lambda g, s: g.copy(2, ViaGrant(1, 4000, 4000), OwnFrame(3, 0), 4000), GNTST_bad_gntref),
    # unknown domain
    ("no-domain", lambda g, s: g.copy(2, ViaGrant(42, 8, 0), OwnFrame(3, 0), 1), GNTST_bad_domain),
    # own frame outside own memory
    ("own-outside", lambda g, s: g.copy(1, OwnFrame(16, 0), OwnFrame(0, 0), 1), GNTST_bad_page),
    # the raw op: a frame end must be DOMID_SELF, else permission denied
    ("raw-foreign-frame", lambda g, s: g.copy_op(2, GNTCOPY_dest_gref, 1, 5, 0, 1, 8, 0, 1),
     GNTST_permission_denied),
    ("raw-ok", lambda g, s: g.copy_op(2, GNTCOPY_dest_gref, DOMID_SELF, 3, 0, 1, 8, 0, 1), OK),
    ("raw-both-grefs", lambda g, s: g.copy_op(2, GNTCOPY_source_gref | GNTCOPY_dest_gref,
                                              1, 9, 0, 1, 8, 0, 64), OK),
    # copy leaves no pins behind: revoke succeeds at once
    ("revoke", lambda g, s: g.end_access(1, 8), OK),
]


def test_copy_rules():
    run(fresh(), COPY_RULES)


def test_copy_of_a_grant_mapped_by_the_caller_uses_the_mapped_frame():
    g = fresh()
    assert g.table(1).grant_access(2, 5).ok
    assert g.map(2, 1, 8, True).ok
    r = g.copy(2, OwnFrame(0, 0), ViaGrant(1, 8, 0), 8)
    assert r.ok and r.dest == Span(1, 5, 0)
    g.check_invariants()


# -- death -----------------------------------------------------------------------
DYING_RULES = [
    ("grant-to-2", lambda g, s: g.table(1).grant_access(2, 5), OK),  # 8
    ("grant-to-3", lambda g, s: g.table(1).grant_access(3, 6), OK),  # 9
    ("2-maps-1", lambda g, s: g.map(2, 1, 8, False), OK),
    ("3-grants-1", lambda g, s: g.table(3).grant_access(1, 2), OK),  # dom3's gref 8, to dom1
    ("1-maps-3", lambda g, s: g.map(1, 3, 8, False), OK),
    # dom1 dies: the mapping it held of dom3's page is released...
    ("dying", lambda g, s: 0 if [m.granter for m in g.domain_dying(1)] == [3] else -99, OK),
    # ... so dom3 can revoke
    ("3-revokes", lambda g, s: g.end_access(3, 8), OK),
    # the dying domain's grants can no longer be mapped (Xen fails to pin its frame)
    ("map-dying", lambda g, s: g.map(3, 1, 9, True), GNTST_general_error),
    # nor copied (acquire_grant_for_copy: bad domain)
    ("copy-dying", lambda g, s: g.copy(3, ViaGrant(1, 9, 0), OwnFrame(0, 0), 1), GNTST_bad_domain),
    # the dying domain maps nothing new
    ("dying-maps", lambda g, s: g.map(1, 3, 8, True), GNTST_general_error),
    # dom2's existing mapping of the dying domain's page stays valid (and is reported as a leak)
    ("still-mapped", lambda g, s: 0 if [m.mapper for m in g.leaks()] == [2] else -99, OK),
    # destroyed while dom2 still maps: kept as a zombie, reported holder
    ("destroyed", lambda g, s: 0 if g.domain_destroyed(1) == (2,) else -99, OK),
    ("zombie", lambda g, s: 0 if g.zombies() == [1] else -99, OK),
    # a zombie is not a domain any more
    ("map-zombie", lambda g, s: g.map(3, 1, 9, True), GNTST_bad_domain),
    # the last unmap forgets it
    ("unmap", lambda g, s: g.unmap(2, s["2-maps-1"].handle), OK),
    ("gone", lambda g, s: 0 if (g.zombies(), g.leaks(), g.active_mappings()) == ([], [], []) else -99, OK),
]


def test_dying_domain_rules():
    run(fresh(), DYING_RULES)


def test_destroy_with_nothing_mapped_forgets_at_once():
    g = fresh()
    g.domain_dying(3)
    assert g.domain_destroyed(3) == ()
    assert g.map(2, 3, 8, True).status == GNTST_bad_domain


def test_programming_errors_raise():
    g = fresh()
    # an unknown calling domain is the shell's bug, not a guest's
    with pytest.raises(GnttabUsageError):
        g.map(42, 1, 8, True)
    with pytest.raises(GnttabUsageError):
        g.add_domain(1)
    with pytest.raises(GnttabUsageError):
        g.map(2, 1, "8", True)
    with pytest.raises(GnttabUsageError):
        g.domain_destroyed(2)  # not dying first
    with pytest.raises(GnttabUsageError):
        g.copy(2, (1, 8, 0), OwnFrame(0, 0), 1)


# -- property: any sequence of guest operations -------------------------------------
DOMS = (0, 1, 2)
DOM = st.sampled_from(DOMS)
GREF = st.one_of(st.integers(8, 10), st.sampled_from([-1, 0, 7, 511, 512]))  # mostly refs the allocator uses
FRAME = st.one_of(st.integers(0, 3), st.just(18))  # 18 is outside the domains' memory
OFFSET = st.one_of(st.sampled_from([0, 4032]), st.integers(-1, 4097))
GRANT = st.tuples(st.just("grant"), DOM, DOM, FRAME, st.booleans())
ops = st.one_of(
    GRANT, GRANT,
    st.tuples(st.just("set"), DOM, GREF, st.sampled_from([0, 1, 5, 0x1D, 0x101, 2, 3]), DOM, FRAME),
    st.tuples(st.just("end"), DOM, GREF),
    st.tuples(st.just("map"), DOM, st.one_of(DOM, st.just(9)), GREF, st.booleans()),
    st.tuples(st.just("unmap"), DOM, st.integers(-1, 5)),
    st.tuples(st.just("copy"), DOM, DOM, GREF, OFFSET, OFFSET, st.booleans()),
    st.tuples(st.just("die"), DOM),
    # guided: act on what exists, so that successes are common too
    st.tuples(st.just("map-granted"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("map-granted"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("unmap-active"), st.integers(0, 7)),
    st.tuples(st.just("copy-granted"), st.integers(0, 7), OFFSET, OFFSET, st.booleans()),
)
STATUSES = set(range(-13, 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=10, max_size=40))
def test_random_operations_keep_invariants(sequence):
    g = Gnttab(max_grant_frames=1, max_maptrack=5)
    for d in DOMS:
        g.add_domain(d, nr_pages=18)
    dying: set[int] = set()
    for op in sequence:
        if op[0] in ("map-granted", "copy-granted"):
            grants = [(d, r, g.table(d).entry(r)) for d in DOMS for r in g.table(d).granted_refs()]
            if not grants:
                continue
            granter, gref, entry = grants[op[1] % len(grants)]
            grantee = entry.domid if entry.domid in DOMS else 0
            op = ("map", grantee, granter, gref, op[2]) if op[0] == "map-granted" else \
                ("copy", grantee, granter, gref) + op[2:]
        elif op[0] == "unmap-active":
            active = g.active_mappings()
            if not active:
                continue
            m = active[op[1] % len(active)]
            op = ("unmap", m.mapper, m.handle)
        kind, dom = op[0], op[1]
        if dom in dying and kind != "map":
            continue  # a dead domain issues no calls; map is checked to refuse
        if kind == "grant":
            result = g.table(dom).grant_access(op[2], op[3], op[4])
        elif kind == "set":
            result = g.table(dom).set_entry(op[2], op[3], op[4], op[5])
        elif kind == "end":
            result = g.end_access(dom, op[2])
        elif kind == "map":
            result = g.map(dom, op[2], op[3], op[4])
            if dom in dying:
                assert result.status == GNTST_general_error
        elif kind == "unmap":
            result = g.unmap(dom, op[2])
        elif kind == "copy":
            result = g.copy(dom, ViaGrant(op[2], op[3], op[4]), OwnFrame(1, op[5]), 64) if op[6] else \
                g.copy(dom, OwnFrame(1, op[4]), ViaGrant(op[2], op[3], op[5]), 64)
        else:
            g.domain_dying(dom)
            dying.add(dom)
            result = OK
        assert status(result) in STATUSES
        g.check_invariants()
    # every mapping can be undone, after which everything revokes
    for m in g.active_mappings():
        assert g.unmap(m.mapper, m.handle) == OK
    for d in DOMS:
        for gref in g.table(d).granted_refs():
            assert g.end_access(d, gref).ok
        assert g.table(d).granted_refs() == [] and not any(g.table(d).in_use(r) for r in range(20))


def test_failed_grant_access_does_not_lose_the_ref():
    g = fresh()
    t = g.table(1)
    # a guest's out-of-range domid is refused and the ref it would have used is handed out next
    assert t.grant_access(0x10000, 5).status == GNTST_general_error
    assert t.grant_access(2, 5).gref == 8
    # the standalone table names the mapper of a busy entry too
    assert g.map(2, 1, 8, True).ok
    assert t.end_access(8).mappers == (2,)
