"""Per-domain limits, with C xenstored's defaults (hard_quotas[] in
xenstored_domain.c).  Privileged callers are exempt from all of them; a
value of 0 disables a limit (as SET_QUOTA documents).

=================  =======  ==============================================
name               default  enforced where / error
=================  =======  ==============================================
nodes              1000     nodes owned by a domain; creating more: ENOSPC,
                            inside a transaction and again at its commit
                            (the net count it adds to the domain's)
watches            128      watches per domain; beyond: E2BIG (as 4.17,
                            which checks before adding: 129 fit)
transactions       10       open transactions per domain; one more: ENOSPC
node-size          2048     16-byte header + 8/perm entry + value +
                            children names, as calc_node_acc_size(): ENOSPC
outstanding        20       requests whose replies the shell has not sent
                            yet: the shell stops reading (no error)
path-max           2048     see paths.py: EINVAL (as xenstored)
node-permissions   5        entries in one SET_PERMS: ENOSPC
transaction-nodes  1024     nodes one transaction may touch: ENOSPC
event-queue        1024     queued watch events per connection; more are
                            dropped and counted (xenbed's own limit)
event-bytes        262144   bytes of queued watch events per connection;
                            more are dropped and counted (C: the memory
                            quota, 2.5 MiB per domain, drops events too)
=================  =======  ==============================================

`Quota.parse(["--quota-nodes", "500", "--quota", "watches=64"])` reads
command-line style options; `Quota.set("nodes", 500)` is what CONTROL
"quota set" uses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import XenStoreError

NODE_HEADER_SIZE = 16  # struct node_hdr
PERM_ENTRY_SIZE = 8  # struct xs_permissions


@dataclass(frozen=True, slots=True)
class Quota:
    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    node_size: int = 2048
    outstanding: int = 20
    path_max: int = 2048
    node_permissions: int = 5
    transaction_nodes: int = 1024
    event_queue: int = 1024
    event_bytes: int = 256 * 1024

    @classmethod
    def defaults(cls) -> Quota:
        return cls()

    @staticmethod
    def names() -> list[str]:
        return [f.name.replace("_", "-") for f in fields(Quota)]

    def get(self, name: str) -> int:
        return getattr(self, _attr(name))

    def set(self, name: str, value: int) -> Quota:
        if value < 0:
            raise XenStoreError("EINVAL", "negative quota")
        return replace(self, **{_attr(name): value})

    @classmethod
    def parse(cls, argv: list[str], base: Quota | None = None) -> Quota:
        """``--quota-<name> N``, ``--quota-<name>=N`` or ``--quota name=N``."""
        q = base or cls()
        it = iter(argv)
        for arg in it:
            if arg.startswith("--quota-"):
                name, eq, value = arg[len("--quota-") :].partition("=")
                if not eq:
                    value = next(it, "")
            elif arg == "--quota" or arg.startswith("--quota="):
                spec = arg.partition("=")[2] if "=" in arg else next(it, "")
                name, _, value = spec.partition("=")
            else:
                raise XenStoreError("EINVAL", f"unknown option {arg!r}")
            q = q.set(name, _number(value))
        return q

    def exceeded(self, name: str, value: int) -> bool:
        """True if `value` is above the limit (0 = unlimited)."""
        limit = self.get(name)
        return bool(limit) and value > limit


def _attr(name: str) -> str:
    attr = name.replace("-", "_")
    if attr == "perm_nb" or attr == "permissions":
        attr = "node_permissions"
    if attr not in {f.name for f in fields(Quota)}:
        raise XenStoreError("EINVAL", f"unknown quota {name!r}")
    return attr


def _number(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise XenStoreError("EINVAL", f"not a number: {text!r}")
    return int(text)


def node_size(n_perms: int, value: bytes, children: tuple[str, ...]) -> int:
    return (
        NODE_HEADER_SIZE
        + PERM_ENTRY_SIZE * n_perms
        + len(value)
        + sum(len(c) + 1 for c in children)
    )
