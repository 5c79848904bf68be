"""Permission semantics: owner default, owner full access, chown, limits,
inheritance, SET_TARGET."""

from xenbed.hypervisor.xenstored.perms import Identity, Perm, acl, perm_for
from xenbed.protocols.xs_wire import Op

from .conftest import OK


def test_perm_for_table():
    a = acl("r1", "w2", "n3")
    assert perm_for(Identity(1), a) == Perm.ALL  # the owner gets everything
    assert perm_for(Identity(2), a) == Perm.WRITE  # a listed domain gets its letter
    assert perm_for(Identity(3), a) == Perm.NONE
    assert perm_for(Identity(4), a) == Perm.READ  # everyone else: the owner's letter
    assert perm_for(Identity(4, privileged=True), a) == Perm.ALL  # dom0 can do everything
    assert perm_for(Identity(5, target=1), a) == Perm.ALL  # target controller owns the target's nodes
    assert perm_for(Identity(5, target=2), a) == Perm.WRITE  # ...and gets the target's entries


def test_owner_default_and_access(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/p\0secret", OK),
        ("d0", 0, Op.SET_PERMS, b"/p\0r0\0", OK),  # owner 0, default read for all
        ("d1", 0, Op.READ, b"/p\0", b"secret"),  # default letter applies to unlisted domains
        ("d1", 0, Op.WRITE, b"/p\0x", "EACCES"),  # r does not allow writing
        ("d0", 0, Op.SET_PERMS, b"/p\0n0\0w1\0", OK),
        ("d1", 0, Op.WRITE, b"/p\0mine", OK),  # listed w entry allows writing
        ("d1", 0, Op.READ, b"/p\0", "EACCES"),  # ...but not reading
        ("d2", 0, Op.READ, b"/p\0", "EACCES"),  # n default for the rest
        ("d0", 0, Op.SET_PERMS, b"/p\0n1\0", OK),  # dom0 may chown
        ("d1", 0, Op.READ, b"/p\0", b"mine"),  # the owner always reads and writes
        ("d1", 0, Op.SET_PERMS, b"/p\0n1\0r2\0", OK),  # the owner may change the entries
        ("d2", 0, Op.READ, b"/p\0", b"mine"),
        ("d2", 0, Op.SET_PERMS, b"/p\0n2\0", "EACCES"),  # a non-owner may not set perms
        ("d1", 0, Op.SET_PERMS, b"/p\0n2\0", "EPERM"),  # only dom0 changes the owner
        ("d1", 0, Op.SET_PERMS, b"/p\0n1\0r2\0r3\0r4\0r5\0", OK),  # 5 entries are fine for a domU
        ("d1", 0, Op.SET_PERMS, b"/p\0n1\0r2\0r3\0r4\0r5\0r6\0", "ENOSPC"),  # 6 are not
        ("d0", 0, Op.SET_PERMS, b"/p\0n1\0r2\0r3\0r4\0r5\0r6\0", OK),  # dom0 is exempt
        ("d0", 0, Op.SET_PERMS, b"/p\0x1\0", "EINVAL"),  # bad letter
        ("d0", 0, Op.SET_PERMS, b"/p\0r\0", "EINVAL"),  # missing domid
        ("d0", 0, Op.SET_PERMS, b"/p\0", "EINVAL"),  # no entries at all
        ("d0", 0, Op.SET_PERMS, b"/p\0r70000\0", "EINVAL"),  # domid out of range
    ])


def test_missing_node_errors_leak_nothing(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/hidden/x\0", OK),
        ("d1", 0, Op.READ, b"/hidden/nope\0", "EACCES"),  # unreadable parent: EACCES, not ENOENT
        ("d1", 0, Op.READ, b"nope\0", "ENOENT"),  # readable parent: ENOENT
        ("d1", 0, Op.WRITE, b"/hidden/y\0", "EACCES"),  # creating needs write on the nearest ancestor
    ])


def test_inheritance_and_creator_owns(world):
    world.run([
        ("d1", 0, Op.SET_PERMS, b"/local/domain/1\0n1\0r2\0", OK),
        ("d1", 0, Op.WRITE, b"a/b\0v", OK),
        ("d1", 0, Op.GET_PERMS, b"a/b\0", b"n1\0r2\0"),  # children inherit the parent's perms
        ("d0", 0, Op.WRITE, b"/local/domain/1/byzero\0", OK),
        ("d0", 0, Op.GET_PERMS, b"/local/domain/1/byzero\0", b"n1\0r2\0"),  # dom0 keeps the inherited owner
        ("d0", 0, Op.SET_PERMS, b"/local/domain/1/shared\0n0\0b1\0", "ENOENT"),
        ("d0", 0, Op.MKDIR, b"/local/domain/1/shared\0", OK),
        ("d0", 0, Op.SET_PERMS, b"/local/domain/1/shared\0n0\0b1\0", OK),
        ("d1", 0, Op.WRITE, b"shared/c\0v", OK),
        ("d1", 0, Op.GET_PERMS, b"shared/c\0", b"n1\0b1\0"),  # an unprivileged creator becomes owner
    ])


def test_set_target_gives_targets_rights(world):
    world.connect("d3", 3)
    world.store.introduce_domain(3)
    world.run([
        ("d1", 0, Op.WRITE, b"priv\0x", OK),
        ("d3", 0, Op.READ, b"/local/domain/1/priv\0", "EACCES"),  # before: no access
        ("d3", 0, Op.SET_TARGET, b"3\0" b"1\0", "EACCES"),  # only dom0 sets targets
        ("d0", 0, Op.SET_TARGET, b"3\0" b"1\0", OK),
        ("d3", 0, Op.READ, b"/local/domain/1/priv\0", b"x"),  # the controller acts as the target
        ("d3", 0, Op.WRITE, b"/local/domain/1/priv\0y", OK),
        ("d0", 0, Op.SET_TARGET, b"3\0" b"9\0", "ENOENT"),  # both domains must be introduced
        ("d0", 0, Op.SET_TARGET, b"3\0", "EINVAL"),  # two arguments
    ])


def test_special_node_perms(world):
    world.run([
        ("d1", 0, Op.GET_PERMS, b"@introduceDomain\0", "EACCES"),  # n0 by default
        ("d0", 0, Op.SET_PERMS, b"@introduceDomain\0n0\0r1\0", OK),  # may be opened with SET_PERMS
        ("d1", 0, Op.GET_PERMS, b"@introduceDomain\0", b"n0\0r1\0"),
    ])
