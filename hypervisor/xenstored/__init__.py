"""xenstored's pure core: the XenStore database and protocol semantics with
no I/O at all (the asyncio shell around it lives elsewhere).

Theory of operation
-------------------
The shell authenticates a peer, calls ``XenStore.connect(domid)`` and then,
for every packet `xs_wire.PacketReader` yields, sends the one reply
``XenStore.handle(conn, packet)`` returns, followed by whatever
``take_outgoing()`` hands back (watch events, per connection, in order).
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
* Watch/transaction quota: exactly the quota, ENOSPC (latest C; older C
  allowed one more and answered E2BIG for watches).
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
  is created inside the transaction, not again at commit.
* Quota "outstanding" is flow control (``may_read``), never an error.
"""

from .dispatch import Connection, XenStore
from .errors import XenStoreError
from .quota import Quota

__all__ = ["XenStore", "Connection", "XenStoreError", "Quota"]
