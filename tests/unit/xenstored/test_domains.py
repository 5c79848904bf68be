"""Domain management messages, privilege, release cleanup, quotas."""

import pytest

from xenbed.hypervisor.xenstored import Quota
from xenbed.protocols.xs_wire import Op

from .conftest import OK, World


@pytest.mark.parametrize("op,payload", [
    (Op.INTRODUCE, b"5\0" b"1\0" b"2\0"),
    (Op.RELEASE, b"1\0"),
    (Op.RESUME, b"1\0"),
    (Op.IS_DOMAIN_INTRODUCED, b"1\0"),
    (Op.SET_TARGET, b"1\0" b"2\0"),
    (Op.CONTROL, b"check\0"),
])
def test_privileged_ops_are_eacces_for_domus(world, op, payload):
    world.run([("d1", 0, op, payload, "EACCES")])  # dom0 only


def test_introduce_release_is_introduced(world):
    world.run([
        ("d0", 0, Op.IS_DOMAIN_INTRODUCED, b"5\0", b"F\0"),
        ("d0", 0, Op.INTRODUCE, b"5\0" b"-17\0" b"3\0", OK),  # gfn is signed decimal
        ("d0", 0, Op.IS_DOMAIN_INTRODUCED, b"5\0", b"T\0"),
        ("d0", 0, Op.INTRODUCE, b"5\0" b"1\0" b"3\0", OK),  # re-introduce is OK (resets the connection)
        ("d0", 0, Op.IS_DOMAIN_INTRODUCED, b"0\0", b"T\0"),  # dom0 always is
        ("d0", 0, Op.INTRODUCE, b"x\0" b"1\0" b"3\0", "EINVAL"),  # non-numeric domid
        ("d0", 0, Op.INTRODUCE, b"6\0" b"1\0" b"0\0", "EINVAL"),  # port must be > 0
        ("d0", 0, Op.INTRODUCE, b"0\0" b"1\0" b"3\0", "EINVAL"),  # dom0 is not introduced
        ("d0", 0, Op.INTRODUCE, b"6\0" b"1\0", "EINVAL"),  # three arguments
        ("d0", 0, Op.RESUME, b"5\0", OK),
        ("d0", 0, Op.RELEASE, b"5\0", OK),
        ("d0", 0, Op.IS_DOMAIN_INTRODUCED, b"5\0", b"F\0"),
        ("d0", 0, Op.RELEASE, b"5\0", "ENOENT"),  # not introduced any more
        ("d0", 0, Op.RELEASE, b"0\0", "EINVAL"),  # dom0 cannot be released
        ("d0", 0, Op.RESUME, b"5\0", "ENOENT"),
        ("d0", 0, Op.GET_DOMAIN_PATH, b"abc\0", "EINVAL"),  # non-numeric domid
    ])
    assert world.store.is_introduced(1) and not world.store.is_introduced(5)


def test_release_removes_nodes_and_acl_entries(world):
    world.run([
        ("d1", 0, Op.WRITE, b"data\0x", OK),
        ("d0", 0, Op.WRITE, b"/vm/1\0", OK),
        ("d0", 0, Op.SET_PERMS, b"/vm/1\0n0\0b1\0", OK),
        ("d0", 0, Op.WRITE, b"/owned-by-1\0", OK),
        ("d0", 0, Op.SET_PERMS, b"/owned-by-1\0b1\0", OK),
        ("d1", 0, Op.WATCH, b"data\0w\0", OK),
        ("d0", 0, Op.WATCH, b"/local/domain/1\0gone\0", OK),
    ])
    world.events()
    world.store.release_domain(1)
    ev = world.events()
    assert "d1" not in ev  # the released domain's watches went first
    assert ("/local/domain/1", "gone") in ev["d0"]  # others see the removal
    assert world.conns["d1"].released
    world.run([
        ("d0", 0, Op.READ, b"/local/domain/1/data\0", "ENOENT"),  # its domain path is gone
        ("d0", 0, Op.READ, b"/owned-by-1\0", "ENOENT"),  # nodes it owned are gone (C default)
        ("d0", 0, Op.GET_PERMS, b"/vm/1\0", b"n0\0"),  # its ACL entries are stripped
    ])
    # A new domain reusing domid 1 inherits nothing.
    world.store.introduce_domain(1)
    world.connect("new1", 1)
    world.run([
        ("new1", 0, Op.READ, b"/vm/1\0", "EACCES"),
        ("new1", 0, Op.UNWATCH, b"data\0w\0", "ENOENT"),
    ])


def test_release_keep_orphans_hands_nodes_to_dom0():
    w = World(keep_orphans=True)
    w.run([
        ("d0", 0, Op.WRITE, b"/owned-by-1\0", OK),
        ("d0", 0, Op.SET_PERMS, b"/owned-by-1\0b1\0r2\0", OK),
    ])
    w.store.release_domain(1)
    w.run([("d0", 0, Op.GET_PERMS, b"/owned-by-1\0", b"b0\0r2\0")])  # dom0 owns it now


def test_node_quota_and_dom0_exempt():
    w = World(Quota(nodes=3))
    w.run([
        ("d1", 0, Op.WRITE, b"a\0", OK),  # d1 owns /local/domain/1 and a
        ("d1", 0, Op.WRITE, b"b\0", OK),  # 3 nodes
        ("d1", 0, Op.WRITE, b"c\0", "ENOSPC"),  # a 4th is over the quota
        ("d1", 0, Op.RM, b"b\0", OK),
        ("d1", 0, Op.MKDIR, b"c\0", OK),  # room again
        ("d1", 0, Op.WRITE, b"c/d/e\0", "ENOSPC"),  # all-or-nothing: no parent left behind
        ("d1", 0, Op.READ, b"c/d\0", "ENOENT"),
    ])
    for i in range(5):
        w.run([("d0", 0, Op.WRITE, f"/z/{i}\0".encode(), OK)])  # dom0 is exempt


def test_node_size_quota():
    w = World(Quota(node_size=100))
    # 16 header + 8 per perm entry (n1 r0: 2) + value.
    w.run([
        ("d1", 0, Op.WRITE, b"v\0" + b"x" * 68, OK),
        ("d1", 0, Op.WRITE, b"v\0" + b"x" * 69, "ENOSPC"),
        ("d0", 0, Op.WRITE, b"/local/domain/1/v\0" + b"x" * 1000, OK),  # dom0 is exempt
    ])


def test_path_length_quota():
    w = World(Quota(path_max=10))
    w.run([
        ("d1", 0, Op.WRITE, b"0123456789\0", OK),  # counted after /local/domain/<id>/
        ("d1", 0, Op.WRITE, b"0123456789a\0", "EINVAL"),  # as xenstored: EINVAL
        ("d0", 0, Op.WRITE, b"/local/domain/1/0123456789a\0", OK),  # dom0 is exempt
    ])
    w.run([("d0", 0, Op.READ, b"/" + b"a" * 3072 + b"\0", "EINVAL")])  # XENSTORE_ABS_PATH_MAX for all


def test_quota_parsing():
    q = Quota.parse(["--quota-nodes", "500", "--quota-watches=7", "--quota", "transactions=3"])
    assert (q.nodes, q.watches, q.transactions) == (500, 7, 3)
    assert Quota.defaults() == Quota(1000, 128, 10, 2048, 20, 2048, 5, 1024, 1024)
    with pytest.raises(Exception):
        Quota.parse(["--quota-bogus", "1"])


def test_control(world):
    world.run([
        ("d0", 0, Op.CONTROL, b"check\0", OK),
        ("d0", 0, Op.CONTROL, b"quota\0set\0nodes\0" b"2\0", OK),  # quota set <name> <val>
        ("d1", 0, Op.WRITE, b"a\0", OK),
        ("d1", 0, Op.WRITE, b"b\0", "ENOSPC"),  # the new quota is live
        ("d0", 0, Op.CONTROL, b"quota\0" b"99\0", "ENOENT"),  # unknown domain
        ("d0", 0, Op.CONTROL, b"nope\0", "EINVAL"),  # unknown command
        ("d0", 0, Op.CONTROL, b"", "EINVAL"),
    ])
    assert b"nodes" in world.do("d0", Op.CONTROL, b"quota\0").payload
    assert b"check" in world.do("d0", Op.CONTROL, b"help\0").payload
    assert b"nodes" in world.do("d0", Op.CONTROL, b"quota\0" b"1\0").payload


def test_may_read_flow_control(world):
    assert world.store.may_read(world.conns["d1"], 19)  # outstanding quota is 20
    assert not world.store.may_read(world.conns["d1"], 20)
    assert world.store.may_read(world.conns["d0"], 10_000)  # dom0 exempt


def _deepest(prefix: str, limit: int) -> str:
    """The deepest chain of one-letter nodes below `prefix` that `limit` bytes allow."""
    return prefix + "/a" * ((limit - len(prefix)) // 2)


def test_deep_chains_are_walked_without_recursion(monkeypatch):
    import sys

    w = World(Quota(nodes=0))  # only the path limits bound the depth here
    guest = _deepest("/local/domain/1", len("/local/domain/1/") + 2048 - 1)
    host = _deepest("/deep", 3072)
    w.run([
        ("d1", 0, Op.WRITE, guest.encode() + b"\0", OK),  # ~1,024 levels: the path-max quota allows it
        ("d1", 0, Op.WRITE, guest.encode() + b"/a\0", "EINVAL"),  # one more level breaks path-max
        ("d0", 0, Op.WRITE, host.encode() + b"\0", OK),  # ~1,535 levels: XENSTORE_ABS_PATH_MAX allows it
        ("d0", 0, Op.WRITE, host.encode() + b"/a\0", "EINVAL"),  # one more breaks XENSTORE_ABS_PATH_MAX
        ("d0", 0, Op.WATCH, b"/deep\0top\0", OK),
        ("d0", 0, Op.WATCH, host.rsplit("/", 1)[0].encode() + b"\0mid\0", OK),
        ("d0", 0, Op.WATCH, host.encode() + b"\0leaf\0", OK),
    ])
    w.events()
    monkeypatch.setattr(sys, "getrecursionlimit", sys.getrecursionlimit)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(150)  # far below the depth: any recursive walk would fail
    try:
        w.run([("d0", 0, Op.RM, b"/deep/a\0", OK)])  # RM walks the chain iteratively
        w.store.release_domain(1)  # so does release (XSA-418 class)
    finally:
        sys.setrecursionlimit(old)
    assert not any(p.startswith(("/deep/", "/local/domain/1")) for p in w.store.tree.nodes)
    events = [(t, p) for p, t in w.events()["d0"] if p.startswith("/deep")]
    # children fire before their parents, as delnode_sub(); inner nodes only to exact watches
    assert events == [("leaf", host), ("mid", host.rsplit("/", 1)[0]), ("top", "/deep/a")]
