"""XenStore across the containers of the default testbed, with Debian's real
`xenstore-*` tools and with the project's own client.

Every domain reaches xenstored through its kernel's XENSTORED_PATH socket,
which hands the connection to the hypervisor-service as that domain: these
tests check that the domid a tool acts as comes from that, and that Xen's
permission rules hold between dom0, domu1 and domu2.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = pytest.mark.integration


def sh(testbed, service: str, script: str):
    return testbed.exec(service, ["sh", "-c", script])


def ok(testbed, service: str, script: str) -> str:
    result = sh(testbed, service, script)
    assert result.exit_code == 0, f"{service}: {script!r} failed ({result.exit_code}): {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def domids(testbed) -> dict[str, int]:
    return {name: int(ok(testbed, "dom0", f"xl domid {name}").strip()) for name in ("domu1", "domu2")}


def test_relative_paths_resolve_to_the_guests_own_directory(testbed, domids):
    for name, domid in domids.items():
        assert ok(testbed, name, "xenstore-read domid").strip() == str(domid)
        assert ok(testbed, name, "xenstore-read name").strip() == name


def test_a_guest_lists_its_own_subtree(testbed, domids):
    domid = domids["domu1"]
    listing = ok(testbed, "domu1", f"xenstore-ls /local/domain/{domid}")
    for key in ("name = \"domu1\"", f"domid = \"{domid}\"", "control = \"\"", "data = \"\""):
        assert key in listing, listing


def test_a_guest_may_not_list_the_root_as_in_xen(testbed):
    # Xen's xenstored refuses DIRECTORY on / to guests (XSA-353): the root is
    # owned by dom0 with no access for others.  `xenstore-ls` with no argument
    # lists /, so in a guest it answers permission denied, as on real Xen.
    result = sh(testbed, "domu1", "xenstore-ls")
    assert result.exit_code != 0
    assert "Permission denied" in result.stderr


def test_dom0_sees_the_whole_tree(testbed, domids):
    top = ok(testbed, "dom0", "xenstore-list /").split()
    assert {"local", "tool"} <= set(top)
    domains = ok(testbed, "dom0", "xenstore-list /local/domain").split()
    assert {"0", str(domids["domu1"]), str(domids["domu2"])} <= set(domains)
    full = ok(testbed, "dom0", "xenstore-ls -f /")
    assert "/local/domain/0/name = \"Domain-0\"" in full
    assert f"/local/domain/{domids['domu2']}/name = \"domu2\"" in full


def test_a_guest_cannot_write_dom0s_nodes_but_dom0_can(testbed):
    denied = sh(testbed, "domu1", "xenstore-write /local/domain/0/x 1")
    assert denied.exit_code != 0
    assert sh(testbed, "dom0", "xenstore-exists /local/domain/0/x").exit_code != 0, "the refused write landed"
    ok(testbed, "dom0", "xenstore-write /local/domain/0/x 1 && xenstore-read /local/domain/0/x")
    ok(testbed, "dom0", "xenstore-rm /local/domain/0/x")


def test_guests_are_isolated_from_each_other(testbed, domids):
    d1, d2 = domids["domu1"], domids["domu2"]
    ok(testbed, "domu1", "xenstore-write data/secret s3cret")
    assert ok(testbed, "dom0", f"xenstore-read /local/domain/{d1}/data/secret").strip() == "s3cret"
    for script in (f"xenstore-read /local/domain/{d1}/data/secret",
                   f"xenstore-write /local/domain/{d1}/data/secret stolen",
                   f"xenstore-rm /local/domain/{d1}/data/secret",
                   f"xenstore-list /local/domain/{d1}"):
        result = sh(testbed, "domu2", script)
        assert result.exit_code != 0, f"domu2 could {script!r}: {result.stdout}"
    assert ok(testbed, "dom0", f"xenstore-read /local/domain/{d1}/data/secret").strip() == "s3cret"
    # and the other way round
    assert sh(testbed, "domu1", f"xenstore-read /local/domain/{d2}/name").exit_code != 0


def test_chmod_grants_another_guest_read_access(testbed, domids):
    d1, d2 = domids["domu1"], domids["domu2"]
    ok(testbed, "domu1", "xenstore-write data/shared hello")
    path = f"/local/domain/{d1}/data/shared"
    assert sh(testbed, "domu2", f"xenstore-read {path}").exit_code != 0
    ok(testbed, "domu1", f"xenstore-chmod data/shared n{d1} r{d2}")
    assert ok(testbed, "domu2", f"xenstore-read {path}").strip() == "hello"
    assert sh(testbed, "domu2", f"xenstore-write {path} no").exit_code != 0, "read permission allowed a write"
    # only dom0 may give a node away (EPERM for a guest)
    assert sh(testbed, "domu1", f"xenstore-chmod data/shared n{d2}").exit_code != 0
    ok(testbed, "dom0", f"xenstore-chmod {path} n{d2}")
    assert ok(testbed, "domu2", f"xenstore-read {path}").strip() == "hello"


def test_list_exists_rm_in_a_guest(testbed):
    ok(testbed, "domu1", "xenstore-write data/tree/a 1 data/tree/b 2 data/tree/b/c 3")
    assert sorted(ok(testbed, "domu1", "xenstore-list data/tree").split()) == ["a", "b"]
    ok(testbed, "domu1", "xenstore-exists data/tree/b/c")
    ok(testbed, "domu1", "xenstore-rm data/tree/b")
    assert sh(testbed, "domu1", "xenstore-exists data/tree/b/c").exit_code != 0
    assert ok(testbed, "domu1", "xenstore-list data/tree").split() == ["a"]


def test_xenstore_watch_sees_a_write_from_another_domain(testbed, domids):
    d1 = domids["domu1"]
    # -n 2: the event every new watch gets at once, then dom0's write.
    ok(testbed, "domu1", f"xenstore-write data/watched 0; (timeout 20 xenstore-watch -n 2 /local/domain/{d1}/data/watched > /tmp/watch.out 2>&1 &) ; sleep 1")
    ok(testbed, "dom0", f"xenstore-write /local/domain/{d1}/data/watched 1")
    lines = []
    for _ in range(50):
        lines = ok(testbed, "domu1", "cat /tmp/watch.out").split()
        if len(lines) >= 2:
            break
        ok(testbed, "domu1", "sleep 0.2")
    assert lines == [f"/local/domain/{d1}/data/watched"] * 2, lines


CLIENT_SCRIPT = textwrap.dedent("""
    import json, threading
    from xenbed.drivers.xen.store import XenStoreClient, XenStoreError
    events, seen = [], threading.Event()
    with XenStoreClient() as xs, XenStoreClient() as other:
        me = xs.read("domid")
        def on_event(path, token):
            events.append(path)
            if path.endswith("/counter"):
                seen.set()
        xs.watch("data/w", "tok", on_event)
        # a transaction that conflicts once: the other connection writes a
        # node the transaction read, so the first commit must be EAGAIN
        attempts = []
        def body(tx):
            attempts.append(1)
            value = int(xs.try_read("data/w/counter", tx, "0"))
            if len(attempts) == 1:
                other.write("data/w/counter", "41")
            xs.write("data/w/counter", str(value + 1), tx)
        xs.run_transaction(body)
        seen.wait(5)
        try:
            xs.introduce(99, 0, 1)
            introduce = "allowed"
        except XenStoreError as exc:
            introduce = exc.errno_name
        print(json.dumps({"domid": me, "attempts": len(attempts), "counter": xs.read("data/w/counter"),
                          "events": events, "introduce": introduce,
                          "path": xs.get_domain_path(int(me))}))
""")


def test_the_project_client_in_a_guest(testbed, domids):
    d1 = domids["domu1"]
    out = ok(testbed, "domu1", f"python3 - <<'EOF'\n{CLIENT_SCRIPT}\nEOF")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["domid"] == str(d1)
    assert result["attempts"] == 2, "the conflicting transaction was not retried after EAGAIN"
    assert result["counter"] == "42"
    # relative watch: relative event paths; first the initial event
    assert result["events"][0] == "data/w"
    assert "data/w/counter" in result["events"]
    # a guest may not introduce domains, whatever it claims to be
    assert result["introduce"] == "EACCES"
    assert result["path"] == f"/local/domain/{d1}"
