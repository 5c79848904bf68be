"""The migration stream's authentication (toolstack/migration.py, pure) and
the two ends of the handshake over a socketpair (toolstack/migrate.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from xenbed.toolstack import migrate
from xenbed.toolstack.migration import (AuthError, FrameReader, Kind, Refused, Session, check_hello, check_proof,
                                        encode_json, proof)

SECRET = b"s" * 32
NS, ND = b"\1" * 32, b"\2" * 32


def test_each_role_has_its_own_proof_and_only_the_secret_makes_it():
    assert proof(SECRET, "source", NS, ND) != proof(SECRET, "destination", NS, ND)  # no reflection
    check_proof(SECRET, "source", NS, ND, proof(SECRET, "source", NS, ND).hex())
    for claimed in (proof(b"t" * 32, "source", NS, ND).hex(), proof(SECRET, "destination", NS, ND).hex(),
                    proof(SECRET, "source", ND, NS).hex(), "", "zz", None, 7):
        with pytest.raises(AuthError):
            check_proof(SECRET, "source", NS, ND, claimed)


def _pair() -> tuple[Session, Session]:
    return Session(SECRET, "source", NS, ND), Session(SECRET, "destination", NS, ND)


def _open(session: Session, frame: bytes) -> bytes:
    [(kind, body)] = FrameReader().feed(frame)
    return session.open(kind, body)


def test_sealed_frames_open_in_order_at_the_other_end():
    source, destination = _pair()
    for i in range(3):
        assert _open(destination, source.seal(Kind.ROUND, b"r%d" % i)) == b"r%d" % i
        assert _open(source, destination.seal(Kind.READY, b"ok")) == b"ok"


@pytest.mark.parametrize("tamper", ["payload", "kind", "replay", "reflect", "other key", "no tag"])
def test_a_forged_replayed_or_reflected_frame_is_refused(tamper):
    source, destination = _pair()
    first = source.seal(Kind.HELLO, b'{"name": "domu1"}')
    if tamper == "payload":
        frame = first[:-40] + b"X" + first[-39:]
    elif tamper == "kind":
        frame = first[:4] + bytes([Kind.COMMIT]) + first[5:]
    elif tamper == "replay":
        _open(destination, first)
        frame = first
    elif tamper == "reflect":  # a frame sent back to its sender
        frame, destination = first, source
    elif tamper == "other key":
        frame = Session(b"t" * 32, "source", NS, ND).seal(Kind.HELLO, b"{}")
    else:
        frame = encode_json(Kind.HELLO, {})
    with pytest.raises(AuthError):
        _open(destination, frame)


@pytest.mark.parametrize("body, why", [
    ({"name": "dom0", "memory_mb": 64}, "reserved"),            # the control domain's credential
    ({"name": "Domain-0", "memory_mb": 64}, "reserved"),
    ({"name": "dom7", "memory_mb": 64}, "reserved"),
    ({"name": "domu2", "memory_mb": 64}, "runs here already"),  # another guest's credential
    ({"name": "../x", "memory_mb": 64}, "not a domain name"),
    ({"name": ["domu9"], "memory_mb": 64}, "not a domain name"),
    ({"name": "domu9", "memory_mb": 0}, "memory_mb"),
    ({"name": "domu9", "memory_mb": True}, "memory_mb"),
    ({"name": "domu9"}, "memory_mb"),
])
def test_the_destination_takes_no_reserved_existing_or_malformed_domain(body, why):
    with pytest.raises(Refused, match=why):
        check_hello(body, ["Domain-0", "domu2"])


def test_a_new_well_formed_domain_is_taken():
    assert check_hello({"name": "domu1", "memory_mb": 128}, ["Domain-0", "domu2"]) == ("domu1", 128)


def _handshake(source_secret: bytes, destination_secret: bytes):
    a, b = socket.socketpair()
    results: dict = {}

    def destination():
        stream = migrate.Stream(b, timeout=5)
        try:
            stream.authenticate_destination(destination_secret)
            results["destination"] = stream.expect(Kind.HELLO)
        except Exception as exc:  # noqa: BLE001 -- reported to the test
            results["destination"] = exc

    thread = threading.Thread(target=destination)
    thread.start()
    source = migrate.Stream(a, timeout=5)
    try:
        source.authenticate_source(source_secret)
        source.send_json(Kind.HELLO, {"name": "domu1"})
        results["source"] = "ok"
    except Exception as exc:  # noqa: BLE001
        results["source"] = exc
        a.close()  # as `xl migrate` does when it gives up
    thread.join(10)
    a.close()
    b.close()
    return results


def test_dom0s_sharing_the_secret_authenticate_each_other():
    results = _handshake(SECRET, SECRET)
    assert results == {"source": "ok", "destination": {"name": "domu1"}}


def test_a_peer_without_the_secret_is_refused_before_anything_is_read():
    results = _handshake(b"guessed-by-a-guest!!", SECRET)
    assert isinstance(results["destination"], AuthError)
    assert isinstance(results["source"], AuthError)  # the destination's proof did not check out either


def test_a_peer_that_skips_the_handshake_is_refused():
    a, b = socket.socketpair()
    a.sendall(encode_json(Kind.HELLO, {"name": "dom0", "memory_mb": 64}))
    with pytest.raises(AuthError):
        migrate.Stream(b, timeout=5).authenticate_destination(SECRET)
    [(kind, _)] = FrameReader().feed(a.recv(4096))
    assert kind == Kind.REFUSE
    a.close()
    b.close()


def test_the_secret_comes_from_the_environment_or_one_shared_file(tmp_path):
    assert migrate.migration_secret({migrate.SECRET_ENV: "x" * 20}) == b"x" * 20
    with pytest.raises(migrate.MigrationError):
        migrate.migration_secret({migrate.SECRET_ENV: "short"})
    shared = str(tmp_path / "images" / ".xenbed" / "migration-secret")
    first = migrate.migration_secret({}, shared_file=shared)
    assert len(first) >= 32 and migrate.migration_secret({}, shared_file=shared) == first
    assert (tmp_path / "images" / ".xenbed" / "migration-secret").stat().st_mode & 0o077 == 0
    with pytest.raises(migrate.MigrationError):
        migrate.migration_secret({migrate.SECRET_FILE_ENV: str(tmp_path / "missing")})
