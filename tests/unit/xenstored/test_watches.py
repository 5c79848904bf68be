"""Watches: initial event, ancestors, removal, relative paths, permission
filtering, duplicates, limits, RESET_WATCHES, special events."""

from xenbed.protocols.xs_wire import Op

from .conftest import OK, World


def test_initial_event_and_ancestor_matching(world):
    world.run([
        ("d0", 0, Op.WATCH, b"/w\0tok\0", OK),  # WATCH replies OK...
    ])
    assert world.events() == {"d0": [("/w", "tok")]}  # ...then an initial event with the path as given
    world.run([("d0", 0, Op.WRITE, b"/w/a/b\0x", OK)])  # a watch on /w fires for /w/a/b
    assert world.events() == {"d0": [("/w/a/b", "tok")]}
    world.run([("d0", 0, Op.WRITE, b"/wx\0x", OK)])  # /wx is not below /w
    assert world.events() == {}
    world.run([("d0", 0, Op.SET_PERMS, b"/w/a\0n0\0", OK)])  # perms changes fire too
    assert world.events() == {"d0": [("/w/a", "tok")]}


def test_rm_fires_for_node_and_watched_children(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/t/a/b/c\0x", OK),
        ("d0", 0, Op.WATCH, b"/t\0top\0", OK),
        ("d0", 0, Op.WATCH, b"/t/a/b/c\0leaf\0", OK),
        ("d0", 0, Op.WATCH, b"/t/a/b/zzz\0gone\0", OK),
    ])
    world.events()
    world.run([("d0", 0, Op.RM, b"/t/a\0", OK)])  # rm fires for the removed node and every node below
    ev = world.events()["d0"]
    assert ("/t/a", "top") in ev  # the ancestor's watch sees the removed top
    assert ("/t/a/b/c", "leaf") in ev  # a watch on a removed child fires with its own path
    assert ("/t/a/b", "top") not in ev  # the ancestor is not flooded with children
    assert not [e for e in ev if e[1] == "gone"]  # a watch on a path that never existed stays silent


def test_relative_watch_gives_relative_paths(world):
    world.run([("d1", 0, Op.WATCH, b"dev\0r\0", OK), ("d1", 0, Op.WATCH, b"/local/domain/1/dev\0a\0", OK)])
    assert world.events() == {"d1": [("dev", "r"), ("/local/domain/1/dev", "a")]}
    world.run([("d1", 0, Op.WRITE, b"dev/vbd/state\0" b"1", OK)])
    assert world.events() == {"d1": [("dev/vbd/state", "r"), ("/local/domain/1/dev/vbd/state", "a")]}


def test_duplicates_and_unwatch(world):
    world.run([
        ("d1", 0, Op.WATCH, b"x\0t\0", OK),
        ("d1", 0, Op.WATCH, b"x\0t\0", "EEXIST"),  # same (path, token) twice
        ("d1", 0, Op.WATCH, b"/local/domain/1/x\0t\0", "EEXIST"),  # same after canonicalization
        ("d1", 0, Op.WATCH, b"x\0t2\0", OK),  # another token is another watch
        ("d1", 0, Op.UNWATCH, b"x\0t\0", OK),
        ("d1", 0, Op.UNWATCH, b"x\0t\0", "ENOENT"),  # unwatch of an unknown watch
        ("d1", 0, Op.WATCH, b"x\0", "EINVAL"),  # path and token are both required
        ("d1", 0, Op.WATCH, b"x//y\0t\0", "EINVAL"),  # watch paths are validated
        ("d1", 123, Op.WATCH, b"y\0t\0", OK),  # WATCH ignores tx_id
    ])


def test_events_filtered_by_read_permission(world):
    world.run([
        ("d0", 0, Op.WRITE, b"/shared/open\0", OK),
        ("d0", 0, Op.SET_PERMS, b"/shared\0n0\0r1\0", OK),
        ("d0", 0, Op.SET_PERMS, b"/shared/open\0n0\0r1\0", OK),
        ("d1", 0, Op.WATCH, b"/shared\0w\0", OK),
        ("d2", 0, Op.WATCH, b"/shared\0w\0", OK),
    ])
    world.events()
    world.run([("d0", 0, Op.WRITE, b"/shared/open\0v", OK)])
    assert world.events() == {"d1": [("/shared/open", "w")]}  # d2 may not read it: no event
    world.run([("d0", 0, Op.WRITE, b"/shared/open/deep\0", OK), ("d0", 0, Op.SET_PERMS, b"/shared/open/deep\0n0\0", OK)])
    world.events()
    world.run([("d0", 0, Op.WRITE, b"/shared/open/deep\0v", OK)])
    assert world.events() == {"d1": [("/shared/open/deep", "w")]}  # readable parent is enough
    world.run([("d0", 0, Op.SET_PERMS, b"/shared/open\0n0\0", OK)])
    assert world.events() == {"d1": [("/shared/open", "w")]}  # losing access is still reported (old perms)
    world.run([("d0", 0, Op.SET_PERMS, b"/shared/open\0n0\0r1\0", OK)])
    world.events()
    world.run([("d0", 0, Op.RM, b"/shared/open\0", OK)])
    assert ("/shared/open", "w") in world.events()["d1"]  # removal: perms before removal count


def test_token_limit_drops_oversized_events(world):
    token = "t" * 4000
    world.run([("d0", 0, Op.WATCH, b"/k\0" + token.encode() + b"\0", OK)])  # accepted: fits a payload
    assert world.events() == {"d0": [("/k", token)]}
    deep = "/k/" + "/".join(["abcdefghij"] * 12)
    world.run([("d0", 0, Op.WRITE, deep.encode() + b"\0", OK)])
    assert world.events() == {}  # event longer than XENSTORE_PAYLOAD_MAX: dropped...
    assert world.conns["d0"].dropped_events == 1  # ...and counted


def test_event_queue_cap_counts_drops():
    from xenbed.hypervisor.xenstored import Quota

    w = World(Quota(event_queue=3))
    w.run([("d0", 0, Op.WATCH, b"/q\0t\0", OK)])
    for i in range(5):
        w.run([("d0", 0, Op.WRITE, f"/q/{i}\0".encode(), OK)])
    assert len(w.events()["d0"]) == 3  # capped queue
    assert w.conns["d0"].dropped_events == 3


def test_reset_watches_drops_watches_and_transactions(world):
    from .conftest import Tx

    world.run([
        ("d1", 0, Op.WATCH, b"a\0t\0", OK),
        ("d1", 0, Op.TRANSACTION_START, b"\0", Tx("t")),
        ("d1", 0, Op.RESET_WATCHES, b"", OK),
        ("d1", 0, Op.UNWATCH, b"a\0t\0", "ENOENT"),  # the watch is gone
        ("d1", "t", Op.READ, b"a\0", "ENOENT"),  # and so is the transaction (unknown tx_id)
    ])


def test_special_watches(world):
    world.run([
        ("d0", 0, Op.WATCH, b"@introduceDomain\0i\0", OK),
        ("d0", 0, Op.WATCH, b"@releaseDomain\0r\0", OK),
        ("d1", 0, Op.WATCH, b"@releaseDomain\0r\0", OK),
    ])
    world.events()
    world.run([("d0", 0, Op.INTRODUCE, b"5\0" b"123\0" b"9\0", OK)])
    assert world.events() == {"d0": [("@introduceDomain", "i")]}  # fires on INTRODUCE
    world.run([("d0", 0, Op.RELEASE, b"5\0", OK)])
    assert world.events() == {"d0": [("@releaseDomain", "r")]}  # d1 may not read @releaseDomain
    world.run([("d0", 0, Op.SET_PERMS, b"@releaseDomain\0n0\0r1\0", OK)])
    world.events()
    world.store.introduce_domain(6)
    world.store.release_domain(6)  # the hypervisor's domain death
    assert world.events() == {
        "d0": [("@introduceDomain", "i"), ("@releaseDomain", "r")],
        "d1": [("@releaseDomain", "r")],  # SET_PERMS opened @releaseDomain to dom1
    }


def test_watch_quota_and_dom0_exempt():
    from xenbed.hypervisor.xenstored import Quota

    w = World(Quota(watches=2))
    w.run([
        ("d1", 0, Op.WATCH, b"a\0" b"1\0", OK),
        ("d1", 0, Op.WATCH, b"a\0" b"2\0", OK),
        ("d1", 0, Op.WATCH, b"a\0" b"3\0", OK),  # 4.17 checks the count before adding: quota+1 fit
        ("d1", 0, Op.WATCH, b"a\0" b"4\0", "E2BIG"),  # then 4.17's watch quota error
        ("d1", 0, Op.UNWATCH, b"a\0" b"1\0", OK),
        ("d1", 0, Op.WATCH, b"a\0" b"4\0", OK),  # room again
    ])
    for i in range(5):
        w.run([("d0", 0, Op.WATCH, f"/a\0{i}\0".encode(), OK)])  # dom0 is exempt


def test_event_bytes_cap_counts_drops():
    from xenbed.hypervisor.xenstored import Quota

    w = World(Quota(event_bytes=3 * (16 + len("/q/0\0t\0"))))
    w.run([("d0", 0, Op.WATCH, b"/q\0t\0", OK)])  # its first event: 16 + 5 bytes
    for i in range(5):
        w.run([("d0", 0, Op.WRITE, f"/q/{i}\0".encode(), OK)])
    got = w.events()["d0"]
    assert got[0] == ("/q", "t") and len(got) == 3  # what fits in the byte limit is kept...
    assert w.conns["d0"].dropped_events == 3  # ...the rest dropped and counted


def test_take_outgoing_holds_what_the_socket_has_no_room_for(world):
    world.run([("d0", 0, Op.WATCH, b"/r\0t\0", OK)])
    for i in range(3):
        world.run([("d0", 0, Op.WRITE, f"/r/{i}\0".encode(), OK)])
    size = 16 + len(b"/r/0\0t\0")
    assert world.store.take_outgoing(lambda c: 0) == []  # no room: nothing taken, nothing lost
    first = world.store.take_outgoing(lambda c: 16 + 5 + size)
    assert [p.payload for p in first[0][1]] == [b"/r\0t\0", b"/r/0\0t\0"]  # oldest first, as far as room goes
    assert world.events() == {"d0": [("/r/1", "t"), ("/r/2", "t")]}  # the rest waited, in order
    assert world.conns["d0"].dropped_events == 0
    world.run([("d0", 0, Op.WRITE, b"/r/1\0", OK)])
    assert world.events() == {"d0": [("/r/1", "t")]}  # taken events are no longer "still queued"
