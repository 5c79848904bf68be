"""Transactions: isolation, conflicts, watches only on commit, errors."""

from xenbed.hypervisor.xenstored import Quota
from xenbed.protocols.xs_wire import Op

from .conftest import OK, Tx, World


def test_isolation_and_commit(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/x\0old", OK),
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t")),
        ("d0", "t", Op.WRITE, b"/x\0new", OK),
        ("d0", "t", Op.READ, b"/x\0", b"new"),  # a transaction sees its own writes
        ("d0", 0, Op.READ, b"/x\0", b"old"),  # others do not, until commit
        ("d0", "t", Op.WRITE, b"/y/z\0", OK),
        ("d0", "t", Op.TRANSACTION_END, b"T\0", OK),
        ("d0", 0, Op.READ, b"/x\0", b"new"),  # committed
        ("d0", 0, Op.READ, b"/y/z\0", b""),
        ("d0", "t", Op.READ, b"/x\0", "ENOENT"),  # the id is gone after END
    ])


def test_snapshot_hides_later_changes(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/s\0one", OK),
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t")),
        ("d0", 0, Op.WRITE, b"/s\0two", OK),
        ("d0", "t", Op.READ, b"/s\0", b"one"),  # the tree as of the transaction's start
        ("d0", "t", Op.TRANSACTION_END, b"T\0", "EAGAIN"),  # it read /s, which changed since
    ])


def test_conflicts(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/c/a\0", OK),
        ("d0", 0, Op.WRITE, b"/c/b\0", OK),
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t1")),
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t2")),
        ("d0", "t1", Op.WRITE, b"/c/a\0" b"1", OK),
        ("d0", "t2", Op.WRITE, b"/c/b\0" b"2", OK),
        ("d0", "t1", Op.TRANSACTION_END, b"T\0", OK),
        ("d0", "t2", Op.TRANSACTION_END, b"T\0", OK),  # disjoint nodes: no conflict
        ("d0", 0, Op.READ, b"/c/a\0", b"1"),
        ("d0", 0, Op.READ, b"/c/b\0", b"2"),
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t3")),
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t4")),
        ("d0", "t3", Op.WRITE, b"/c/a\0" b"3", OK),
        ("d0", "t4", Op.WRITE, b"/c/a\0" b"4", OK),
        ("d0", "t3", Op.TRANSACTION_END, b"T\0", OK),
        ("d0", "t4", Op.TRANSACTION_END, b"T\0", "EAGAIN"),  # same node written by another commit
        ("d0", 0, Op.READ, b"/c/a\0", b"3"),  # the failed commit left nothing behind
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t5")),
        ("d0", "t5", Op.DIRECTORY, b"/c\0", b"a\0b\0"),
        ("d0", 0, Op.WRITE, b"/c/new\0", OK),
        ("d0", "t5", Op.TRANSACTION_END, b"T\0", "EAGAIN"),  # a listed directory changed
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t6")),
        ("d0", "t6", Op.READ, b"/c/ghost\0", "ENOENT"),
        ("d0", 0, Op.WRITE, b"/c/ghost\0", OK),
        ("d0", "t6", Op.TRANSACTION_END, b"T\0", "EAGAIN"),  # observed nonexistence changed
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("t7")),
        ("d0", "t7", Op.WRITE, b"/c/a\0" b"7", OK),
        ("d0", 0, Op.WRITE, b"/c/a\0" b"x", OK),
        ("d0", "t7", Op.TRANSACTION_END, b"F\0", OK),  # abort never conflicts
    ])


def test_watches_fire_only_on_commit(world):
    world.run([
        ("d1", 0, Op.WATCH, b"/local/domain/2\0w\0", OK),
        ("d2", 0, Op.SET_PERMS, b"/local/domain/2\0n2\0r1\0", OK),
    ])
    world.events()
    world.run([
        ("d2", 0, Op.TRANSACTION_START, b"\0", Tx("t")),
        ("d2", "t", Op.WRITE, b"state\0" b"4", OK),
    ])
    assert world.events() == {}  # nothing while the transaction is open
    world.run([("d2", "t", Op.TRANSACTION_END, b"T\0", OK)])
    assert world.events() == {"d1": [("/local/domain/2/state", "w")]}  # fired at commit
    world.run([
        ("d2", 0, Op.TRANSACTION_START, b"\0", Tx("a")),
        ("d2", "a", Op.WRITE, b"state\0" b"5", OK),
        ("d2", "a", Op.TRANSACTION_END, b"F\0", OK),
    ])
    assert world.events() == {}  # abort fires nothing
    world.run([
        ("d2", 0, Op.TRANSACTION_START, b"\0", Tx("c")),
        ("d2", "c", Op.WRITE, b"state\0" b"6", OK),
        ("d1", 0, Op.WRITE, b"/local/domain/2/state\0", "EACCES"),
        ("d0", 0, Op.WRITE, b"/local/domain/2/state\0" b"9", OK),
    ])
    world.events()
    world.run([("d2", "c", Op.TRANSACTION_END, b"T\0", "EAGAIN")])
    assert world.events() == {}  # a failed commit fires nothing


def test_transaction_errors(world):
    world.run([
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("t")),
        ("d1", "t", Op.TRANSACTION_START, b"\0", "EBUSY"),  # no nesting
        ("d1", 999, Op.READ, b"x\0", "ENOENT"),  # unknown tx_id
        ("d2", "t", Op.READ, b"x\0", "ENOENT"),  # ids are per connection
        ("d1", 0, Op.TRANSACTION_END, b"T\0", "ENOENT"),  # END outside a transaction
        ("d1", "t", Op.TRANSACTION_END, b"X\0", "EINVAL"),  # END takes T or F
        ("d1", "t", Op.TRANSACTION_END, b"F\0", OK),
    ])
    ids = set()
    for _ in range(5):
        r = world.do("d1", Op.TRANSACTION_START, b"\0")
        ids.add(int(r.payload.rstrip(b"\0")))
    assert 0 not in ids and len(ids) == 5  # fresh, non-zero ids
    assert r.payload.endswith(b"\0")  # the id is a NUL-terminated decimal string


def test_transaction_quota_and_dom0_exempt():
    w = World(Quota(transactions=2))
    w.run([
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("a")),
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("b")),
        ("d1", 0, Op.TRANSACTION_START, b"\0", "ENOSPC"),  # one more than the quota
        ("d1", "a", Op.TRANSACTION_END, b"F\0", OK),
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("c")),  # room again
    ])
    for _ in range(5):
        w.run([("d0", 0, Op.TRANSACTION_START, b"\0", Tx("z"))])  # dom0 is exempt


def test_transaction_nodes_quota():
    w = World(Quota(transaction_nodes=4))
    w.run([("d1", 0, Op.TRANSACTION_START, b"\0", Tx("t"))])
    for i in range(3):
        w.run([("d1", "t", Op.WRITE, f"n{i}\0".encode(), OK)])
    w.run([("d1", "t", Op.WRITE, b"n9\0", "ENOSPC")])  # touched too many nodes


def test_node_quota_checked_again_at_commit():
    from xenbed.hypervisor.xenstored import Quota

    w = World(Quota(nodes=5))
    w.run([
        ("d1", 0, Op.MKDIR, b"x\0", OK),
        ("d1", 0, Op.MKDIR, b"y\0", OK),  # dom1 owns 3 of 5
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("a")),
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("b")),
        ("d1", "a", Op.WRITE, b"x/1\0", OK),
        ("d1", "a", Op.WRITE, b"x/2\0", OK),  # 5 of 5 in a's snapshot
        ("d1", "b", Op.WRITE, b"y/1\0", OK),
        ("d1", "b", Op.WRITE, b"y/2\0", OK),  # 5 of 5 in b's snapshot
        ("d1", "a", Op.TRANSACTION_END, b"T\0", OK),  # a fits: the domain owns 5
        ("d1", "b", Op.TRANSACTION_END, b"T\0", "ENOSPC"),  # b's net +2 on the live 5 breaks the quota
        ("d1", 0, Op.READ, b"y/1\0", "ENOENT"),  # the refused commit left nothing behind
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("c")),
        ("d1", "c", Op.RM, b"x/1\0", OK),
        ("d1", "c", Op.WRITE, b"y/1\0", OK),
        ("d1", "c", Op.TRANSACTION_END, b"T\0", OK),  # net 0: a commit that adds nothing more fits
        ("d0", 0, Op.TRANSACTION_START, b"\0", Tx("d")),
        ("d0", "d", Op.WRITE, b"/local/domain/1/y/2\0", OK),
        ("d0", "d", Op.SET_PERMS, b"/local/domain/1/y/2\0n1\0", OK),
        ("d0", "d", Op.TRANSACTION_END, b"T\0", OK),  # a privileged committer is exempt
    ])
