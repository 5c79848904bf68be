"""Issue #16, attack 1: dom0's migration receiver (port 8002) answered any
guest, a HELLO naming dom0 made a domain, and COMMIT's answer carried its
credential.  On two hosts (compose/two-hosts.yml):

* a guest reaches neither dom0's port 8002, its own host's nor the other's
  (each vif's nftables chain drops it);
* a machine on the uplink that does not hold the testbed's migration secret
  gets REFUSE before anything is made, whatever it claims;
* even an authenticated dom0 cannot bring in a domain named dom0 or one that
  exists there;
and the hypervisors, dom0s and guests still answer.
"""

from __future__ import annotations

import pytest

from .attack import CONNECT, address_of, python_in, sh

pytestmark = [pytest.mark.integration, pytest.mark.testbed_compose("compose/two-hosts.yml")]


@pytest.fixture(scope="module")
def testbed(private_testbed):
    return private_testbed


def names(testbed, dom0: str) -> list[str]:
    return sorted(line.split()[0] for line in sh(testbed, dom0, "xl list").splitlines()[1:] if line.strip())


# An unauthenticated peer: HELLO naming dom0 straight away, then COMMIT.
HELLO_AS_DOM0 = """
    import json, socket, struct
    def frame(kind, body):
        data = json.dumps(body).encode()
        return struct.pack(">IB", len(data) + 1, kind) + data
    s = socket.create_connection((HOST, 8002), timeout=10)
    s.sendall(frame(1, {"name": "dom0", "memory_mb": 64, "source": "evil"}) + frame(7, {}))
    answer = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    except socket.timeout:
        pass
    kind = answer[4] if len(answer) > 4 else None
    print(json.dumps({"kind": kind, "body": answer[5:].decode(errors="replace"), "bytes": len(answer)}))
"""

# A dom0-side peer holding SECRET (the right one or not), sending HELLO BODY.
AUTHENTICATED_HELLO = """
    import json, socket
    from xenbed.toolstack import migrate
    from xenbed.toolstack.migration import Kind
    stream = migrate.Stream(socket.create_connection((HOST, 8002), timeout=10), timeout=10)
    try:
        stream.authenticate_source(SECRET or migrate.migration_secret())
        stream.send_json(Kind.HELLO, BODY)
        print(json.dumps({"answer": stream.expect(Kind.ACCEPT)}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


def test_guests_cannot_reach_any_migration_receiver(testbed):
    dom0s = {dom0: address_of(testbed, dom0, "xenbr0") for dom0 in ("dom0-a", "dom0-b")}
    out = python_in(testbed, "domu1", CONNECT + f"""
    print(json.dumps({{name: attempt(ip, 8002) for name, ip in {dom0s!r}.items()}}))
    """)
    assert out == {"dom0-a": "timeout", "dom0-b": "timeout"}, out


def test_a_peer_without_the_secret_is_refused_and_nothing_is_made(testbed):
    before = names(testbed, "dom0-b")
    peer = python_in(testbed, "peer", f"HOST = {address_of(testbed, 'dom0-b', 'xenbr0')!r}\n"
                     + HELLO_AS_DOM0.replace("\n    ", "\n"))
    assert peer["kind"] == 3 and "not authenticated" in peer["body"], peer  # REFUSE, and nothing else
    assert "credential" not in peer["body"]
    wrong = python_in(testbed, "dom0-a", "HOST, SECRET, BODY = 'dom0-b', b'w' * 32, {'name': 'domu9', 'memory_mb': 64}\n"
                      + AUTHENTICATED_HELLO.replace("\n    ", "\n"))
    assert wrong["error"] in ("AuthError", "MigrationError"), wrong
    assert names(testbed, "dom0-b") == before


@pytest.mark.parametrize("name", ["dom0", "domu2"])
def test_an_authenticated_dom0_cannot_bring_in_dom0_or_an_existing_domain(testbed, name):
    before = names(testbed, "dom0-b")
    out = python_in(testbed, "dom0-a", f"HOST, SECRET, BODY = 'dom0-b', None, {{'name': {name!r}, 'memory_mb': 64}}\n"
                    + AUTHENTICATED_HELLO.replace("\n    ", "\n"))
    assert out["error"] == "MigrationError" and "the destination gave up" in out["message"], out
    assert names(testbed, "dom0-b") == before
    # everyone still answers: both toolstacks and hypervisors, both guests' xenstored
    assert "domu1" in names(testbed, "dom0-a") and "domu2" in before
    for guest in ("domu1", "domu2"):
        assert sh(testbed, guest, "xenstore-read domid").strip().isdigit()
