"""xenstored's pure core: the XenStore database and protocol semantics with
no I/O at all (the asyncio shell around it lives elsewhere).

Theory of operation
-------------------
The shell authenticates a peer, calls ``XenStore.connect(domid)`` and then,
for every packet `xs_wire.PacketReader` yields, sends the one reply
``XenStore.handle(conn, packet)`` returns, followed by whatever
``take_outgoing(room)`` hands back (watch events, per connection, in order,
as far as each connection's socket has room; the rest stay queued within
the "event-queue" and "event-bytes" limits, beyond which they are dropped
and counted).  The shell serves connections in turns (a few requests each,
then the next connection) and reads nothing more from a connection while
what it holds for it is over its output limit, so one connection can
neither starve the others nor make xenstored hold unbounded output.
The hypervisor calls ``introduce_domain``/``release_domain`` when domains
come and go.

Shaped like ocaml-xenstore: `paths` (names), `perms` (who may do what),
`quota` (limits), `store` (the tree of immutable nodes; every operation
takes the caller's Identity), `transactions` (copy-on-write snapshots,
per-node conflict check at commit), `watches` (matching, per-connection
capped queue) and `dispatch` (one table from message type to handler; one
place turning `XenStoreError` into an XS_ERROR reply).

Where Xen's behaviour was unclear or xenbed chose deliberately
--------------------------------------------------------------
* Checked against C xenstored (tools/xenstore, 4.17-4.19 era); oxenstored
  differs in places, we follow C.
* Startup tree: C creates /, /tool, /tool/xenstored and the special nodes;
  /local and /local/domain come from the toolstack.  xenbed has no init
  step, so we also create /local/domain (owner dom0, "n0") unless
  ``XenStore(with_local=False)``.
* Empty relative path is EINVAL (it canonicalizes to ".../<domid>/").
* Watch quota: as 4.17's do_watch(), the count *before* adding is compared
  (so quota+1 watches fit) and the error is E2BIG.  Transaction quota:
  exactly the quota, ENOSPC.
* Watch tokens: no limit of their own; an event longer than
  XENSTORE_PAYLOAD_MAX is dropped and counted, as send_event() does.
* Release: the domain's watches and transactions go, its nodes are removed
  (C default; ``keep_orphans=True`` hands them to dom0 like ``-K``),
  /local/domain/<domid> is removed (the toolstack's job in Xen), its domid is
  stripped from every ACL eagerly (C marks such entries ignored lazily), and
  @releaseDomain fires if it had been introduced.
* SET_PERMS does not check that the named domains exist (xenbed's store
  does not know which domains exist before INTRODUCE).
* Numbers (domids, DIRECTORY_PART offsets, ports) are strict decimal;
  C's atoi() accepts garbage as 0, we answer EINVAL.
* Transactions never hit C's "transaction failed -> ENOMEM at commit"
  path: our operations are atomic.  The node quota is checked when a node
  is created inside the transaction and again at commit, where the
  transaction's net node count is added to the live count (C's
  transaction_fix_domains(), ENOSPC); C refuses a commit reaching exactly
  the quota (``>=``), we refuse one going over it, as for every other
  node creation.
* Queued output: C accounts watch events in the per-domain memory quota
  (2.5 MiB) and deletes events pending longer than 20 s; xenbed bounds the
  queue per connection by count and bytes and has no age limit.
* Depth: like C, no separate depth limit; XENSTORE_ABS_PATH_MAX (3072) and
  the path-max quota (2048 below the domain path) bound it, and no tree
  walk recurses.
* Quota "outstanding" is flow control (``may_read``), never an error.
"""

from .dispatch import Connection, XenStore
from .errors import XenStoreError
from .quota import Quota

__all__ = ["XenStore", "Connection", "XenStoreError", "Quota"]
