"""blkback's persistent grants: bounded per ring, purged as Linux's
purge_persistent_gnt does (drivers/blk/pgrants.py)."""

from __future__ import annotations

from xenbed.drivers.blk import pgrants
from xenbed.drivers.blk.pgrants import PersistentGrants

from .test_blkback_support import FakeGrants


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def table(max_grants=100, persistent=True):
    grants, clock = FakeGrants(), Clock()
    return grants, clock, PersistentGrants(grants, grants.domid, persistent=persistent, max_grants=max_grants,
                                           clock=clock)


def test_persistent_grants_stay_mapped_and_are_reused():
    grants, clock, pg = table()
    g, page = grants.grant_page()
    page[:4] = b"abcd"
    assert bytes(pg.page(g, False)[:4]) == b"abcd"
    pg.done()
    assert bytes(pg.pages([g], False)[0][:4]) == b"abcd"
    pg.done()
    assert grants.map_calls == 1 and len(pg) == 1 and len(grants.live) == 1


def test_without_feature_persistent_every_mapping_is_undone():
    grants, clock, pg = table(persistent=False)
    refs = [grants.grant_page()[0] for _ in range(3)]
    assert len(pg.pages(refs, True)) == 3
    assert len(grants.live) == 3
    pg.done()
    assert not grants.live and len(pg) == 0


def test_beyond_the_limit_grants_are_mapped_for_one_request_and_flag_overflow():
    grants, clock, pg = table(max_grants=4)
    refs = [grants.grant_page()[0] for _ in range(6)]
    pg.pages(refs, False)
    assert len(pg) == 4 and pg.overflow and len(grants.live) == 6
    pg.done()
    assert len(grants.live) == 4  # the two extra ones unmapped after their request


def test_purge_waits_for_the_interval():
    grants, clock, pg = table(max_grants=100)
    refs = [grants.grant_page()[0] for _ in range(110)]
    pg.pages(refs, False)
    pg.done()
    assert pg.purge() > 0
    pg.pages(refs, False)
    pg.done()
    clock.now += pgrants.LRU_INTERVAL / 2
    assert not pg.purge_due() and pg.purge() == 0
    clock.now += pgrants.LRU_INTERVAL
    assert pg.purge_due() and pg.purge() > 0


def test_purge_of_a_full_overflowed_table_drops_the_least_recently_used():
    grants, clock, pg = table(max_grants=200)
    refs = [grants.grant_page()[0] for _ in range(210)]
    for i, g in enumerate(refs):  # used in order: refs[0] least recently
        clock.now += 0.001
        pg.page(g, False)
    pg.done()
    assert len(pg) == 200 and pg.overflow
    purged = pg.purge()
    # the excess (0: the table holds exactly the limit) plus 5 % of the limit, LRU first
    assert purged == 200 // 100 * pgrants.LRU_PERCENT_CLEAN == 10
    assert all(g not in pg for g in refs[:10]) and all(g in pg for g in refs[10:200])
    assert not pg.overflow
    assert len(grants.live) == 190  # unmapped for real: the maptrack stays bounded


def test_purge_of_a_table_that_never_overflowed_keeps_recent_grants():
    grants, clock, pg = table(max_grants=10)
    refs = [grants.grant_page()[0] for _ in range(10)]
    pg.pages(refs, False)
    pg.done()
    assert pg.purge() == 0 and len(pg) == 10


def test_purge_drops_grants_unused_for_the_timeout():
    grants, clock, pg = table(max_grants=10)
    old = [grants.grant_page()[0] for _ in range(3)]
    new = [grants.grant_page()[0] for _ in range(2)]
    pg.pages(old, False)
    clock.now += pgrants.PGRANT_TIMEOUT
    pg.pages(new, False)
    clock.now += 1
    assert pg.purge() == 3
    assert all(g in pg for g in new) and all(g not in pg for g in old)


def test_release_unmaps_everything():
    grants, clock, pg = table(max_grants=2)
    refs = [grants.grant_page()[0] for _ in range(3)]
    pg.pages(refs, False)
    pg.release()
    assert not grants.live and len(pg) == 0
