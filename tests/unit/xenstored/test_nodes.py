"""READ/WRITE/MKDIR/RM/DIRECTORY/DIRECTORY_PART/GET_PERMS on the tree."""

from xenbed.hypervisor.xenstored.store import Node, directory_part
from xenbed.protocols.xs_wire import PAYLOAD_MAX, Op

from .conftest import ANY, OK, World


def test_startup_tree_as_xenstored(world):
    world.run([
        ("d0", 0, Op.DIRECTORY, b"/\0", b"tool\0local\0"),  # C creates /tool; /local from the toolstack
        ("d0", 0, Op.DIRECTORY, b"/tool\0", b"xenstored\0"),  # /tool/xenstored exists at startup
        ("d0", 0, Op.GET_PERMS, b"/\0", b"n0\0"),  # root is owned by dom0, nobody else may read
        ("d1", 0, Op.READ, b"/tool\0", "EACCES"),  # n0 means no access for domUs
        ("d0", 0, Op.GET_PERMS, b"@releaseDomain\0", b"n0\0"),  # special nodes carry perms too
    ])


def test_write_read_and_parents(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/a/b/c\0value", OK),  # WRITE creates missing parents
        ("d0", 0, Op.READ, b"/a/b\0", b""),  # created parents have empty values
        ("d0", 0, Op.READ, b"/a/b/c\0", b"value"),  # READ returns the raw value, no NUL
        ("d0", 0, Op.WRITE, b"/bin\0a\0b\0", OK),  # values may contain NULs
        ("d0", 0, Op.READ, b"/bin\0", b"a\0b\0"),  # ...and come back byte for byte
        ("d0", 0, Op.WRITE, b"/a/b/c\0", OK),  # empty value is fine
        ("d0", 0, Op.READ, b"/a/b/c\0", b""),  # overwritten
        ("d0", 0, Op.READ, b"/nope\0", "ENOENT"),  # missing node
        ("d0", 0, Op.READ, b"/a/\0", "EINVAL"),  # trailing slash
        ("d0", 0, Op.READ, b"/a//b\0", "EINVAL"),  # double slash
        ("d0", 0, Op.READ, b"/a b\0", "EINVAL"),  # invalid character
        ("d0", 0, Op.READ, b"@releaseDomain\0", "EINVAL"),  # special paths only for perms/watches
    ])


def test_mkdir(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/m\0keep", OK),
        ("d0", 0, Op.MKDIR, b"/m\0", OK),  # MKDIR of an existing node is OK...
        ("d0", 0, Op.READ, b"/m\0", b"keep"),  # ...and leaves its value alone
        ("d0", 0, Op.MKDIR, b"/m/x/y\0", OK),  # MKDIR creates parents
        ("d0", 0, Op.DIRECTORY, b"/m/x\0", b"y\0"),
    ])


def test_rm(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/r/a/b\0x", OK),
        ("d0", 0, Op.WRITE, b"/r/a/c\0x", OK),
        ("d0", 0, Op.RM, b"/r/a\0", OK),  # RM is recursive
        ("d0", 0, Op.READ, b"/r/a/b\0", "ENOENT"),
        ("d0", 0, Op.DIRECTORY, b"/r\0", b""),  # and unlinks from the parent
        ("d0", 0, Op.RM, b"/r/a\0", OK),  # missing node, parent exists: OK
        ("d0", 0, Op.RM, b"/r/a/b\0", "ENOENT"),  # missing node and parent: ENOENT
        ("d0", 0, Op.RM, b"/\0", "EINVAL"),  # the root cannot go
    ])


def test_relative_paths(world):
    world.run([
        ("d1", 0, Op.WRITE, b"data/x\0v", OK),  # relative = under /local/domain/<domid>
        ("d0", 0, Op.READ, b"/local/domain/1/data/x\0", b"v"),
        ("d1", 0, Op.DIRECTORY, b"data\0", b"x\0"),
        ("d1", 0, Op.READ, b"\0", "EINVAL"),  # empty relative path: EINVAL as xenstored
        ("d0", 0, Op.WRITE, b"rel\0z", OK),  # dom0's relative base is /local/domain/0
        ("d0", 0, Op.READ, b"/local/domain/0/rel\0", b"z"),
        ("d2", 0, Op.GET_DOMAIN_PATH, b"7\0", b"/local/domain/7\0"),  # anyone may ask
    ])


def test_directory_and_part_over_large_directory(world):
    names = [f"entry-with-a-long-name-{i:04d}" for i in range(400)]
    for n in names:
        world.run([("d0", 0, Op.WRITE, f"/big/{n}\0".encode(), OK)])
    full = b"".join(n.encode() + b"\0" for n in names)
    assert len(full) > PAYLOAD_MAX
    world.run([("d0", 0, Op.DIRECTORY, b"/big\0", "E2BIG")])  # too long for one reply
    got, offset, gens = b"", 0, set()
    while True:
        r = world.do("d0", Op.DIRECTORY_PART, b"/big\0" + str(offset).encode() + b"\0")
        assert not r.is_error() and len(r.payload) <= PAYLOAD_MAX
        gen, _, rest = r.payload.partition(b"\0")  # generation first
        gens.add(gen)
        if rest == b"\0":  # offset past the end: just an empty string
            break
        end = rest.endswith(b"\0\0")  # the last part ends with an extra NUL
        chunk = rest[:-1] if end else rest
        got += chunk
        offset += len(chunk)
        if end:
            break
    assert got == full and len(gens) == 1  # same generation: the list did not change
    r1 = world.do("d0", Op.DIRECTORY_PART, b"/big\0" b"0\0")
    world.run([("d0", 0, Op.WRITE, b"/big/new\0", OK)])
    r2 = world.do("d0", Op.DIRECTORY_PART, b"/big\0" b"0\0")
    assert r1.payload.split(b"\0")[0] != r2.payload.split(b"\0")[0]  # generation moves on change
    world.run([
        ("d0", 0, Op.DIRECTORY_PART, b"/big\0", "EINVAL"),  # offset is required
        ("d0", 0, Op.DIRECTORY_PART, b"/big\0x\0", "EINVAL"),  # and numeric
        ("d1", 0, Op.DIRECTORY_PART, b"/big\0" b"0\0", "EACCES"),  # needs read permission
    ])


def test_directory_part_small_exact_format():
    node = Node(children=("a", "bc"), generation=7)
    assert directory_part(node, 0) == b"7\0a\0bc\0\0"
    assert directory_part(node, 2) == b"7\0bc\0\0"
    assert directory_part(node, 5) == b"7\0\0"
