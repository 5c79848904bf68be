"""`python3 -m xenbed.toolstack.init_dom0`: dom0's own store nodes, as
Xen's xen-init-dom0 writes them at boot (idempotent: a restarted dom0 runs it
again)."""

from __future__ import annotations

import sys

from xenbed.drivers.xen.store import XenStoreClient


def main() -> int:
    with XenStoreClient() as store:
        def body(tx: int) -> None:
            store.write("/local/domain/0/name", "Domain-0", tx)
            store.write("/local/domain/0/domid", "0", tx)
            store.mkdir("/local/domain/0/device", tx)
            store.mkdir("/local/domain/0/backend", tx)
        store.run_transaction(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
