"""Per-mapper maptracks with Xen 4.17's limit (hypervisor/gnttab.py): a
mapping counts against the domain that maps, never against the granter,
and a full maptrack refuses only its owner, with GNTST_no_device_space."""

from __future__ import annotations

from xenbed.hypervisor.gnttab import (DEFAULT_MAX_MAPTRACK, DEFAULT_MAX_MAPTRACK_FRAMES, MAPTRACK_PER_FRAME,
                                      GNTST_no_device_space, GNTST_okay, Gnttab)

DOM0, GUEST1, GUEST2 = 0, 1, 2


def gnttab(**kw) -> Gnttab:
    g = Gnttab(**kw)
    g.add_domain(DOM0)
    g.add_domain(GUEST1, nr_pages=4096)
    g.add_domain(GUEST2, nr_pages=4096)
    return g


def grant(g: Gnttab, granter: int, grantee: int, n: int) -> list[int]:
    table = g.table(granter)
    return [table.grant_access(grantee, i % 4096, readonly=False).gref for i in range(n)]


def test_the_limit_is_xens_1024_frames_of_512_mappings_per_mapper():
    assert (DEFAULT_MAX_MAPTRACK_FRAMES, MAPTRACK_PER_FRAME) == (1024, 512)
    g = gnttab()
    assert g.maptrack_usage(DOM0) == (0, 0, DEFAULT_MAX_MAPTRACK) == (0, 0, 524_288)


def test_the_reported_attack_1100_persistent_grants_of_one_guest_leave_dom0_serving_the_other():
    g = gnttab()
    for gref in grant(g, GUEST1, DOM0, 1100):  # blkback mapping a hostile guest's persistent grants
        assert g.map(DOM0, GUEST1, gref, False).status == GNTST_okay
    assert g.maptrack_usage(DOM0)[:2] == (1100, 3)  # three maptrack frames in use
    assert g.maptrack_usage(GUEST1)[0] == 0  # the granter's maptrack is untouched
    [other] = grant(g, GUEST2, DOM0, 1)
    assert g.map(DOM0, GUEST2, other, False).status == GNTST_okay
    g.check_invariants()


def test_a_full_maptrack_refuses_its_owner_only_with_no_device_space():
    g = gnttab(max_maptrack_frames=1)
    mine = grant(g, GUEST1, GUEST1, MAPTRACK_PER_FRAME + 1)  # a guest mapping its own grants
    for gref in mine[:-1]:
        assert g.map(GUEST1, GUEST1, gref, True).status == GNTST_okay
    assert g.map(GUEST1, GUEST1, mine[-1], True).status == GNTST_no_device_space
    # dom0 maps the same guest's grants and the other guest's all the same
    [to_dom0] = grant(g, GUEST1, DOM0, 1)
    [other] = grant(g, GUEST2, DOM0, 1)
    assert g.map(DOM0, GUEST1, to_dom0, False).status == GNTST_okay
    assert g.map(DOM0, GUEST2, other, False).status == GNTST_okay
    g.check_invariants()


def test_unmapping_gives_room_back_and_the_handle_is_reused_last():
    g = gnttab(max_maptrack=2)
    a, b, c = grant(g, GUEST1, DOM0, 3)
    first = g.map(DOM0, GUEST1, a, False)
    second = g.map(DOM0, GUEST1, b, False)
    assert g.map(DOM0, GUEST1, c, False).status == GNTST_no_device_space
    assert g.unmap(DOM0, first.handle) == GNTST_okay
    third = g.map(DOM0, GUEST1, c, False)
    assert third.status == GNTST_okay and third.handle == first.handle != second.handle
    g.check_invariants()


def test_a_dying_guest_gives_back_what_it_mapped():
    g = gnttab(max_maptrack_frames=1)
    for gref in grant(g, GUEST2, GUEST1, 10):
        assert g.map(GUEST1, GUEST2, gref, False).status == GNTST_okay
    assert len(g.domain_dying(GUEST1)) == 10
    assert g.maptrack_usage(GUEST2)[0] == 0 and g.table(GUEST2).granted_refs()
    assert not any(g.table(GUEST2).in_use(r) for r in g.table(GUEST2).granted_refs())
