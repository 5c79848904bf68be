"""blkback's persistent grants, bounded per ring with Linux's purge
(xen-blkback/blkback.c: get_persistent_gnt, add_persistent_gnt,
purge_persistent_gnt).

A frontend that negotiated `feature-persistent` grants its data pages once
and reuses them; the backend keeps each one mapped after its request, so a
request costs no map/unmap hypercall.  Kept without a bound, a frontend
could fill dom0's maptrack; so, as Linux:

* at most `max_grants` (xen_blkif_max_pgrants, 1056) stay mapped per ring;
  a grant met once the table is full is mapped for its request only, and
  the table is marked overflowed (vbd.overflow_max_grants);
* every `LRU_INTERVAL` the ring thread purges: when the table is full and
  overflowed, the excess plus `LRU_PERCENT_CLEAN` % of the limit, least
  recently used first; in any case every grant unused for
  `pgrant_timeout` seconds (xen_blkif_pgrant_timeout).  Purging happens
  between batches on the ring thread, so no purged grant is in use.

Pure bookkeeping over something with GrantTable's `map`/`unmap` and a clock
(tests/unit/test_blkback_pgrants.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

log = logging.getLogger("xenbed.blkback")

MAX_PERSISTENT_GRANTS = 1056  # xen_blkif_max_pgrants (per ring)
LRU_INTERVAL = 0.1  # seconds between purges (LRU_INTERVAL, 100 ms)
LRU_PERCENT_CLEAN = 5  # % of the limit purged beyond the excess
PGRANT_TIMEOUT = 60.0  # xen_blkif_pgrant_timeout: unused this long, unmapped anyway


class _Grant:
    __slots__ = ("mapping", "view", "last_used")

    def __init__(self, mapping, view, last_used: float) -> None:
        self.mapping, self.view, self.last_used = mapping, view, last_used


class PersistentGrants:
    """One ring's persistently mapped grants.  `page(gref, readonly)` gives a
    writable-or-readonly memoryview of the whole granted page and remembers
    a mapping made only for this request; `done()` undoes those (call it
    after each request); `purge()` runs Linux's LRU purge when due."""

    def __init__(self, grants, domid: int, *, persistent: bool, max_grants: int = MAX_PERSISTENT_GRANTS,
                 clock=time.monotonic, name: str = "blkif") -> None:
        self.grants, self.domid, self.persistent = grants, domid, persistent
        self.max_grants, self.clock, self.name = max_grants, clock, name
        self.table: OrderedDict[int, _Grant] = OrderedDict()  # least recently used first
        self.overflow = False  # vbd.overflow_max_grants
        self.next_purge = 0.0
        self.transient: list = []  # mappings of the request in hand
        self.purged = 0
        self.pgrant_timeout = PGRANT_TIMEOUT

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, gref: int) -> bool:
        return gref in self.table

    def page(self, gref: int, readonly: bool) -> memoryview:
        return self.pages([gref], readonly)[0]

    def pages(self, grefs, readonly: bool) -> list[memoryview]:
        """A view of each gref's page, in order: persistent ones from the table
        (one clock read for all), the rest mapped in one batch (_map_missing)."""
        table = self.table
        if self.persistent:
            try:
                entries = [table[g] for g in grefs]
            except KeyError:
                pass
            else:  # all persistent already: the common case
                now = self.clock()
                move = table.move_to_end
                for g, entry in zip(grefs, entries):
                    move(g)
                    entry.last_used = now
                return [entry.view for entry in entries]
        return self._map_missing(grefs, readonly)

    def _map_missing(self, grefs, readonly: bool) -> list[memoryview]:
        """The pages of one request that are not mapped yet go in one
        GNTTABOP_map_grant_ref batch (two when some must be transient):
        persistent while the table has room (granted and mapped read-write
        by the frontend), else for this request only."""
        table, now = self.table, self.clock()
        views: dict[int, memoryview] = {}
        keep, transient = [], []
        room = self.max_grants - len(table) if self.persistent else 0
        for gref in dict.fromkeys(grefs):
            entry = table.get(gref) if self.persistent else None
            if entry is not None:
                table.move_to_end(gref)
                entry.last_used = now
                views[gref] = entry.view
            elif room > 0:
                keep.append(gref)
                room -= 1
            else:
                self.overflow = self.overflow or self.persistent
                transient.append(gref)
        if keep:
            for gref, result in zip(keep, self.grants.map_batch([(self.domid, g, False) for g in keep])):
                if isinstance(result, Exception):
                    if not readonly:
                        self._transient_results(transient, readonly, views)
                        raise result
                    transient.append(gref)  # a read-only grant after all (an indirect page, say)
                    continue
                view = views[gref] = memoryview(result.mmap)
                table[gref] = _Grant(result, view, now)
        self._transient_results(transient, readonly, views)
        return [views[g] for g in grefs]

    def _transient_results(self, grefs: list[int], readonly: bool, views: dict) -> None:
        if not grefs:
            return
        failed = None
        for gref, result in zip(grefs, self.grants.map_batch([(self.domid, g, readonly) for g in grefs])):
            if isinstance(result, Exception):
                failed = failed or result
                continue
            view = views[gref] = memoryview(result.mmap)
            self.transient.append((result, view))  # done() unmaps them, failed request or not
        if failed is not None:
            raise failed

    def done(self) -> None:
        """The request in hand is answered: unmap what was mapped for it only."""
        transient, self.transient = self.transient, []
        for _mapping, view in transient:
            view.release()
        if transient:
            self.grants.unmap_batch([mapping for mapping, _ in transient])

    def purge_due(self) -> bool:
        return self.persistent and self.clock() >= self.next_purge

    def purge(self) -> int:
        """purge_persistent_gnt, when LRU_INTERVAL has passed since the last
        one: returns how many grants were unmapped."""
        now = self.clock()
        if not self.persistent or now < self.next_purge:
            return 0
        self.next_purge = now + LRU_INTERVAL
        count = len(self.table)
        if count < self.max_grants or (count == self.max_grants and not self.overflow):
            clean = 0
        else:
            clean = min(count, count - self.max_grants + self.max_grants // 100 * LRU_PERCENT_CLEAN)
        victims = []
        for gref, entry in self.table.items():  # least recently used first
            if clean:
                clean -= 1
            elif now - entry.last_used < self.pgrant_timeout:
                break  # everything after is more recent still
            victims.append(gref)
        for gref in victims:
            self._unmap(self.table.pop(gref))
        self.overflow = False
        self.purged += len(victims)
        if victims:
            log.debug("%s: purged %d persistent grant(s), %d kept", self.name, len(victims), len(self.table))
        return len(victims)

    def _unmap(self, entry: _Grant) -> None:
        entry.view.release()
        try:
            self.grants.unmap(entry.mapping)
        except Exception as exc:
            log.warning("%s: unmapping persistent gref %s: %s", self.name, getattr(entry.mapping, "gref", "?"), exc)

    def release(self) -> None:
        """Unmap everything (at disconnect)."""
        self.done()
        table, self.table = self.table, OrderedDict()
        for entry in table.values():
            self._unmap(entry)
