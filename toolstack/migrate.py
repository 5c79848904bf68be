"""Live migration's I/O: sockets, store and hypervisor calls (the pure plan and stream are migration.py).

`xl migrate` (source) and the receiving side `xl migrate-receive`
(destination) talk over one TCP connection.

Real xl pipes the stream through ssh to `xl migrate-receive` on the other
host; here every dom0 runs the receiver as a daemon (a control-domain
module, port MIGRATION_PORT) and the source connects to `dom0-b:8002`
across the hosts' shared uplink.  Stream and pre-copy rounds:
toolstack/migration.py.  The whole sequence (docs/migration.md):

    source (dom0-a)                              destination (dom0-b)
    HELLO name, memory, config       ------->    DOMAIN_CREATE (new domid, its credential), store nodes, introduce
                                     <-------    ACCEPT domid
    rounds: PAGES/GONE/ROUND (guest runs) --->   MEM_POPULATE + page files (dom0's mount of guest memory)
    DEVICES (after round 0)          ------->    device dirs for this host's backends, InitWait, hotplug
    ROUND barrier                    <------>    (the backends are ready)
    suspend the guest (control/shutdown)
    final round, COMMIT              ------->
                                     <-------    READY domid, credential, hypervisor socket (as guests mount it)
    DOMAIN_RESUME relocate -> the guest's kernel and modules move their links to the destination;
    the guest's kernel link on the source closes (its domain there dies)
    DONE                             ------->    waits for every device Connected at both ends
                                     <-------    DONE connected_at
    xl destroy of the source domain (its backends, loop devices, vifs go)

Authentication (toolstack/migration.py, "Authentication"): the receiver
answers only a peer that proves, by HMAC challenge-response, that it holds
this testbed's migration secret (`migration_secret`: the environment of the
dom0s, or a file on the storage only dom0s mount), and every later frame is
tagged with a key derived from it.  Before that it creates nothing, reveals
nothing, and gives up after AUTH_TIMEOUT; it never takes a domain named as
the control domain or as one that exists.  Guests cannot reach the port at
all: each vif's nftables chain drops its TCP to MIGRATION_PORT
(drivers/net/hotplug.py).

Failure before the guest is told to move (destination refuses or dies, the
network breaks): the source sends ABORT if it can, resumes the guest
CANCELLED -- it goes on on its old rings and backends, intact -- and the
destination destroys what it made when it sees ABORT or the connection end.
If the guest cannot move (its kernel fails to reach the destination) it
resumes on the source by itself (drivers/kernel/shutdown.py); the source
sees it still connected and calls the migration off the same way.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from xenbed.drivers.xen.store import XenStoreError
from xenbed.protocols import hypercall as hc
from xenbed.toolstack import devices, domain_store, suspend
from xenbed.toolstack.migration import (AUTH_VERSION, MIN_SECRET, NONCE_SIZE, PAGE_SIZE, PAGES_PER_FRAME, AuthError,
                                        FrameReader, Kind, PrecopyPlanner, Refused, Session, StreamError,
                                        check_hello, check_proof, decode_json, decode_pages, encode, json_payload,
                                        nonce_of,
                                        page_digest, pages_payload, proof)

MIGRATION_PORT = 8002
MEMORY_ROOT = "/var/lib/xenbed/memory"  # dom0's mount of its host's guest memory
CONNECT_TIMEOUT = 10.0
PEER_TIMEOUT = 60.0  # for a reply across the stream
MOVE_TIMEOUT = 40.0  # for the guest to leave the source after DOMAIN_RESUME relocate
CONNECTED_TIMEOUT = 60.0
AUTH_TIMEOUT = 5.0  # for the whole handshake: an idle or slow peer does not hold the receiver
# The migration secret: XENBED_MIGRATION_SECRET in the dom0s' environment,
# else the file XENBED_MIGRATION_SECRET_FILE names, else SHARED_SECRET_FILE on
# the storage every dom0 of the testbed mounts and no guest does (the first
# dom0 that needs it makes it, random).
SECRET_ENV = "XENBED_MIGRATION_SECRET"
SECRET_FILE_ENV = "XENBED_MIGRATION_SECRET_FILE"
SHARED_SECRET_FILE = "/var/lib/xen/images/.xenbed/migration-secret"


class MigrationError(Exception):
    """The migration did not happen; the message says where it stopped and
    where the guest runs now."""


@dataclass
class MigrationReport:
    domain: str
    source_domid: int
    destination_domid: int = -1
    rounds: list[int] = field(default_factory=list)  # pages sent per round, the last one after the suspend
    pages_sent: int = 0
    total_ms: float = 0.0
    downtime_ms: float = 0.0  # guest suspended -> every device Connected at the destination
    precopy_ms: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def migration_secret(environ=None, shared_file: str = SHARED_SECRET_FILE) -> bytes:
    """This testbed's migration secret, as only its dom0s have it."""
    environ = os.environ if environ is None else environ
    secret = environ.get(SECRET_ENV, "").encode()
    if not secret:
        path = environ.get(SECRET_FILE_ENV) or shared_file
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except FileNotFoundError:
            if environ.get(SECRET_FILE_ENV):
                raise MigrationError(f"{SECRET_FILE_ENV}={path} does not exist") from None
            secret = _make_shared_secret(path)
    if len(secret) < MIN_SECRET:
        raise MigrationError(f"the migration secret is shorter than {MIN_SECRET} bytes: migrations refused")
    return secret


def _make_shared_secret(path: str) -> bytes:
    """Write a random secret at `path` unless another dom0 did first
    (link(2) is atomic: no one ever reads a half-written file)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read().strip()


# -- the stream over a socket -------------------------------------------------------------------
class Stream:
    """Frames over a socket; after `authenticate_*` every frame is sealed
    and checked with the session's key."""

    def __init__(self, sock: socket.socket, timeout: float = PEER_TIMEOUT) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.reader = FrameReader()
        self.pending: list[tuple[Kind, bytes]] = []
        self.session: Session | None = None
        self.deadline: float | None = None  # for the handshake as a whole (monotonic)

    def send_frame(self, kind: Kind, payload: bytes) -> None:
        self.sock.sendall(self.session.seal(kind, payload) if self.session else encode(kind, payload))

    def send_json(self, kind: Kind, body: dict) -> None:
        self.send_frame(kind, json_payload(body))

    def receive(self) -> tuple[Kind, bytes]:
        while not self.pending:
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise StreamError("the peer is too slow to authenticate")
            data = self.sock.recv(1 << 20)
            if not data:
                raise StreamError("the peer closed the migration stream")
            self.pending += self.reader.feed(data)
        kind, body = self.pending.pop(0)
        return kind, (self.session.open(kind, body) if self.session else body)

    def authenticate_source(self, secret: bytes) -> None:
        """The source's side of the handshake (migration.py)."""
        ours = secrets.token_bytes(NONCE_SIZE)
        self.send_json(Kind.AUTH, {"version": AUTH_VERSION, "nonce": ours.hex()})
        answer = self.expect(Kind.AUTH)
        theirs = nonce_of(answer)
        check_proof(secret, "destination", ours, theirs, answer.get("proof"))
        self.send_json(Kind.AUTH, {"proof": proof(secret, "source", ours, theirs).hex()})
        self.session = Session(secret, "source", ours, theirs)

    def authenticate_destination(self, secret: bytes) -> None:
        """The destination's side: raises AuthError (after telling the peer
        REFUSE) unless the peer proves it holds `secret`."""
        self.deadline = time.monotonic() + AUTH_TIMEOUT
        try:
            hello = self.expect(Kind.AUTH)
            if hello.get("version") != AUTH_VERSION:
                raise AuthError(f"migration stream version {hello.get('version')!r}, not {AUTH_VERSION}")
            theirs, ours = nonce_of(hello), secrets.token_bytes(NONCE_SIZE)
            self.send_json(Kind.AUTH, {"nonce": ours.hex(), "proof": proof(secret, "destination", theirs, ours).hex()})
            check_proof(secret, "source", theirs, ours, self.expect(Kind.AUTH).get("proof"))
        except (AuthError, StreamError, MigrationError, OSError) as exc:
            try:
                self.send_json(Kind.REFUSE, {"reason": "not authenticated"})
            except OSError:
                pass
            raise AuthError(str(exc)) from None
        finally:
            self.deadline = None
        self.session = Session(secret, "destination", theirs, ours)

    def expect(self, *kinds: Kind) -> dict:
        kind, payload = self.receive()
        if kind == Kind.ABORT or kind == Kind.REFUSE:
            raise MigrationError(f"the destination gave up: {decode_json(payload).get('reason', '?')}")
        if kind not in kinds:
            raise StreamError(f"expected {'/'.join(k.name for k in kinds)}, got {kind.name}")
        return decode_json(payload)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _domain(link, domid: int) -> dict | None:
    for d in link.call(hc.Call.DOMAIN_LIST)["domains"]:
        if d["domid"] == domid:
            return d
    return None


# -- source ---------------------------------------------------------------------------------------
def read_pages(domid: int, gfns, root: str = MEMORY_ROOT) -> dict[int, bytes]:
    """The guest's pages through dom0's mount (a privileged foreign mapping);
    a page freed meanwhile is simply not there."""
    folder = os.path.join(root, f"dom{domid}")
    pages = {}
    for gfn in gfns:
        try:
            with open(os.path.join(folder, str(gfn)), "rb") as f:
                data = f.read(PAGE_SIZE)
        except FileNotFoundError:
            continue
        pages[gfn] = data.ljust(PAGE_SIZE, b"\0")
    return pages


def _send_round(stream: Stream, planner: PrecopyPlanner, domid: int, link, number: int, final: bool,
                root: str) -> int:
    gfns = link.call(hc.Call.MEM_LIST, {"domid": domid})["gfns"]
    pages = read_pages(domid, gfns, root)
    current = {g: page_digest(d) for g, d in pages.items()}
    send, gone = planner.dirty(current)
    for i in range(0, len(send), PAGES_PER_FRAME):
        stream.send_frame(Kind.PAGES, pages_payload((g, pages[g]) for g in send[i:i + PAGES_PER_FRAME]))
    if gone:
        stream.send_json(Kind.GONE, {"gfns": gone})
    stream.send_json(Kind.ROUND, {"round": number, "pages": len(send), "final": final})
    planner.record({g: current[g] for g in send}, gone)
    return len(send)


def _dirty_count(planner: PrecopyPlanner, domid: int, link, root: str) -> int:
    gfns = link.call(hc.Call.MEM_LIST, {"domid": domid})["gfns"]
    pages = read_pages(domid, gfns, root)
    send, gone = planner.dirty({g: page_digest(d) for g, d in pages.items()})
    return len(send) + len(gone)


def migrate(xl, name: str, destination: str, *, port: int = MIGRATION_PORT, say=print,
            memory_root: str = MEMORY_ROOT, planner: PrecopyPlanner | None = None,
            disk_backend: str | None = None) -> MigrationReport:
    """Move domain `name` to the host whose dom0 answers at `destination`;
    its disks are served there by dom0, or by the driver domain named
    `disk_backend` (a domain of the destination host)."""
    info = xl.resolve(name)
    domid = info["domid"]
    if domid == 0:
        raise MigrationError("dom0 does not migrate")
    if info["state"] != "running":
        raise MigrationError(f"{name} is {info['state']}: only a running domain migrates")
    report = MigrationReport(domain=info["name"], source_domid=domid)
    planner = planner or PrecopyPlanner()
    started = time.monotonic()
    host, _, port_text = destination.partition(":")
    try:
        sock = socket.create_connection((host, int(port_text or port)), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise MigrationError(f"cannot reach the migration receiver at {destination}: {exc}; "
                             f"{name} keeps running here") from None
    stream = Stream(sock)
    suspended = moved = False
    try:
        stream.authenticate_source(migration_secret())
        stream.send_json(Kind.HELLO, {"name": info["name"], "memory_mb": info["memory_mb"],
                                      "source": os.environ.get("XENBED_HOST", ""), "disk_backend": disk_backend})
        report.destination_domid = int(stream.expect(Kind.ACCEPT)["domid"])
        say(f"migrating {name} (dom{domid}) to {destination} as dom{report.destination_domid}")
        number = 0
        saved = [suspend.save_device(xl.store, d) for d in suspend.devices_of(xl.store, domid)]
        while True:  # live rounds, the guest running
            sent = _send_round(stream, planner, domid, xl.link, number, False, memory_root)
            say(f"  round {number}: {sent} pages")
            if number == 0:
                # The destination makes the backends (InitWait, hotplug) while
                # the guest still runs here: that work stays out of the downtime.
                stream.send_json(Kind.DEVICES, {"devices": [
                    {"kind": s.device.kind, "devid": s.device.devid, "frontend": s.frontend, "backend": s.backend}
                    for s in saved]})
            number += 1
            if not planner.another_live_round(_dirty_count(planner, domid, xl.link, memory_root)):
                break
        stream.send_json(Kind.ROUND, {"round": -1, "pages": 0, "final": False, "barrier": True})
        stream.expect(Kind.ROUND)  # the destination's backends are ready: now stop the guest
        report.precopy_ms = (time.monotonic() - started) * 1000
        suspend.suspend(xl.store, xl.link, domid)
        suspended_at = time.time()  # wall clock: the destination stamps Connected with it (one machine)
        suspended = True
        sent = _send_round(stream, planner, domid, xl.link, number, True, memory_root)
        say(f"  round {number} (guest suspended): {sent} pages")
        stream.send_json(Kind.COMMIT, {})
        ready = stream.expect(Kind.READY)
        relocate = {"hypervisor": ready["hypervisor"], "credential": ready["credential"]}
        xl.link.call(hc.Call.DOMAIN_RESUME, {"domid": domid, "cancelled": False, "relocate": relocate})
        moved = _wait_until_gone(xl.link, domid, MOVE_TIMEOUT)
        if not moved:
            raise MigrationError(f"{name} did not move to {destination} (it resumed here, on its old devices)")
        stream.send_json(Kind.DONE, {})
        stream.sock.settimeout(CONNECTED_TIMEOUT * 2 + 10)  # the destination waits for every device, each end
        done = stream.expect(Kind.DONE)
        report.downtime_ms = (float(done["connected_at"]) - suspended_at) * 1000
        if done.get("error"):
            say(f"warning: {name} runs at {destination}, but: {done['error']}")
    except (OSError, StreamError, MigrationError, suspend.SuspendError, XenStoreError) as exc:
        _call_off(xl, stream, domid, suspended and not moved, str(exc))
        if moved:  # the guest left: what it left here goes all the same
            xl._destroy(domid)
        if isinstance(exc, MigrationError) and not suspended:
            raise
        raise MigrationError(f"migration of {name} to {destination} failed: {exc}; "
                             f"{name} {'is gone from here' if moved else 'keeps running here'}") from None
    finally:
        stream.close()
    # The guest runs at the destination: what is left here goes, as xl destroy does.
    xl._destroy(domid)
    report.rounds, report.pages_sent = list(planner.rounds), sum(planner.rounds)
    report.total_ms = (time.monotonic() - started) * 1000
    say(f"migrated {name}: {len(report.rounds)} rounds, {report.pages_sent} pages, "
        f"downtime {report.downtime_ms:.0f} ms, total {report.total_ms:.0f} ms")
    return report


def _wait_until_gone(link, domid: int, timeout: float) -> bool:
    """The guest's kernel left this host (its link closed: the domain is
    dying here) -- or it came back running here, having failed to move."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = _domain(link, domid)
        if d is None or d["state"] == "dying" or not d.get("connected", True):
            return True
        time.sleep(0.05)
    return False


def _call_off(xl, stream: Stream, domid: int, resume_here: bool, reason: str) -> None:
    try:
        stream.send_json(Kind.ABORT, {"reason": reason})
    except OSError:
        pass
    if resume_here:
        try:
            d = _domain(xl.link, domid)
            if d is not None and d["state"] == "suspended":
                xl.link.call(hc.Call.DOMAIN_RESUME, {"domid": domid, "cancelled": True})
        except Exception as exc:
            print(f"xl migrate: resuming dom{domid} here failed too: {exc}", file=sys.stderr)


# -- destination --------------------------------------------------------------------------------
def guest_hypervisor_path(host: str | None = None) -> str:
    """Where a guest container mounts this host's hypervisor socket
    (compose/two-hosts.yml mounts each host's xenbus volume at
    /run/xenbed/<host>)."""
    host = host or os.environ.get("XENBED_HOST", "")
    if not host:
        raise MigrationError("this dom0 does not know its host name (XENBED_HOST): guests could not find it")
    return f"/run/xenbed/{host}/hypervisor.sock"


def receive(xl, stream: Stream, *, memory_root: str = MEMORY_ROOT, say=print) -> dict:
    """One incoming migration on an authenticated stream, to its end (DONE)
    or until it is called off; whatever was made for a migration that did
    not finish is destroyed."""
    if stream.session is None:
        raise MigrationError("refusing a migration over an unauthenticated stream")
    hello = stream.expect(Kind.HELLO)
    try:
        name, memory_mb = check_hello(hello, (d["name"] for d in xl.domains()))
    except Refused as exc:
        stream.send_json(Kind.REFUSE, {"reason": str(exc)})
        raise MigrationError(f"refused: {exc}") from None
    created = xl.link.call(hc.Call.DOMAIN_CREATE, {"name": name, "memory_mb": memory_mb, "privilege": "none"})
    domid = int(created["domid"])
    finished = False
    try:
        domain_store.write_domain(xl.store, domid, name, memory_mb)
        xl.store.introduce(domid, 0, 1)
        stream.send_json(Kind.ACCEPT, {"domid": domid})
        say(f"receiving {name} as dom{domid}")
        made: list[devices.Device] = []
        while True:
            kind, payload = stream.receive()
            if kind == Kind.PAGES:
                pages = decode_pages(payload)
                folder = xl.link.call(hc.Call.MEM_POPULATE, {"domid": domid, "gfns": [g for g, _ in pages]})["path"]
                for gfn, data in pages:
                    with open(os.path.join(memory_root, os.path.basename(folder), str(gfn)), "r+b") as f:
                        f.write(data)
            elif kind == Kind.GONE:
                xl.link.call(hc.Call.MEM_POPULATE, {"domid": domid, "gfns": [], "remove": decode_json(payload)["gfns"]})
            elif kind == Kind.ROUND:
                body = decode_json(payload)
                if body.get("barrier"):  # answered once everything before it is done
                    stream.send_json(Kind.ROUND, {"barrier": True})
                    continue
                say(f"  round {body['round']}: {body['pages']} pages{' (final)' if body.get('final') else ''}")
            elif kind == Kind.DEVICES:
                made = _make_devices(xl, domid, decode_json(payload)["devices"], hello.get("disk_backend"))
            elif kind == Kind.COMMIT:
                _injected_stall("commit", say)
                stream.send_json(Kind.READY, {"domid": domid, "credential": created["credential"],
                                              "hypervisor": guest_hypervisor_path()})
            elif kind == Kind.DONE:
                finished = True  # the guest lives here now: whatever happens next, it is not destroyed
                problem = ""
                try:
                    for device in made:
                        for end, path in (("backend", device.backend_path), ("frontend", device.frontend_path)):
                            devices.wait_for_state(xl.store, path, {devices.XENBUS_CONNECTED}, CONNECTED_TIMEOUT,
                                                   f"the {end} of {device.kind} {device.devid}")
                except devices.DeviceError as exc:
                    problem = str(exc)
                stream.send_json(Kind.DONE, {"connected_at": time.time(), "error": problem})
                say(f"{name} runs here as dom{domid}" + (f", but {problem}" if problem else ""))
                return {"name": name, "domid": domid, "error": problem}
            elif kind == Kind.ABORT:
                raise MigrationError(f"the source called the migration of {name} off: "
                                     f"{decode_json(payload).get('reason', '?')}")
            else:
                raise StreamError(f"unexpected {kind.name} frame")
    finally:
        if not finished:
            say(f"migration of {name} did not finish: destroying dom{domid} here")
            try:
                xl._destroy(domid)
            except Exception as exc:
                print(f"xl migrate-receive: destroying dom{domid}: {exc}", file=sys.stderr)


# Fault injection for tests (tests/integration/test_migration.py): a line
# "stall-at <step>" in this file makes the receiver stop there for a minute,
# so that a test can kill this dom0 at a known point of a migration.
FAULTS_FILE = "/run/xen/migrate-faults"


def _injected_stall(step: str, say) -> None:
    try:
        with open(FAULTS_FILE) as f:
            wanted = f"stall-at {step}" in f.read().split("\n")
    except FileNotFoundError:
        return
    if wanted:
        say(f"fault injection: stalling at {step} ({FAULTS_FILE})")
        time.sleep(60)


def _make_devices(xl, domid: int, described: list[dict], disk_backend: str | None = None) -> list[devices.Device]:
    """The guest's devices on this host's backends, written and brought to
    InitWait with their hotplug steps, as a restore does: dom0's, or for
    disks the driver domain `disk_backend` names (its own hotplug step runs
    there, as `xl devd` does; we wait for its outcome)."""
    from xenbed.drivers.blk.hotplug import MIGRATION_SHARING_KEY
    from xenbed.toolstack import blk, net

    made = []
    disk_domid = devices.backend_domid(xl.store, disk_backend)
    for d in described:
        kind = d["kind"]
        frontend = {k: v for k, v in d["frontend"].items() if k not in ("backend", "backend-id")}
        backend = {k: v for k, v in d["backend"].items() if k not in ("frontend", "frontend-id", "online")}
        backend_domid = disk_domid if kind == "vbd" else devices.TOOLSTACK_DOMID
        if kind == "vbd":
            backend[MIGRATION_SHARING_KEY] = "1"  # the source's loop still holds the shared image
        device = devices.Device(kind, domid, backend_domid, int(d["devid"]), frontend, backend)
        devices.write_device(xl.store, device)
        if kind == "vbd":
            hotplug_add = lambda path, device=device: blk._hotplug_add(xl.store, device)  # noqa: E731
        else:
            hotplug_add = lambda path: net.run_hotplug("add", path)  # noqa: E731
        module = blk if kind == "vbd" else net
        devices.bring_up(xl.store, device, f"{kind} {device.devid}", hotplug_add, module.remove,
                         initwait_timeout=module.INITWAIT_TIMEOUT, wait_connected=0)
        made.append(device)
    return made


def serve(port: int = MIGRATION_PORT, say=print, stop: threading.Event | None = None) -> None:
    """dom0's migration receiver: one migration at a time."""
    from xenbed.toolstack.libxl import Toolstack

    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
    listener.settimeout(1.0)
    say(f"migration receiver listening on port {port}")
    while stop is None or not stop.is_set():
        try:
            sock, peer = listener.accept()
        except TimeoutError:
            continue
        stream = Stream(sock, timeout=AUTH_TIMEOUT)
        try:
            stream.authenticate_destination(migration_secret())
        except (AuthError, StreamError, MigrationError, OSError) as exc:
            say(f"refused a migration stream from {peer[0]}: {exc}")
            stream.close()
            continue
        stream.sock.settimeout(PEER_TIMEOUT)
        xl = Toolstack()
        try:
            receive(xl, stream, say=say)
        except (MigrationError, StreamError, OSError, XenStoreError, devices.DeviceError) as exc:
            say(f"migration from {peer[0]} failed: {exc}")
            try:
                stream.send_json(Kind.ABORT, {"reason": str(exc)})
            except OSError:
                pass
        finally:
            stream.close()
            xl.close()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog="python3 -m xenbed.toolstack.migrate",
                                     description="dom0's live-migration receiver (`xl migrate` connects to it)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("XENBED_MIGRATION_PORT", MIGRATION_PORT)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    stop = threading.Event()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve(args.port, say=lambda line: print(f"migrate-receive: {line}", flush=True), stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
