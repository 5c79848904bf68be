"""`python3 -m xenbed.drivers.kernel`: the "guest kernel" of a domain container.

It is PID 1 of every domain container (dom0 included) and does what a guest
kernel's Xen platform code does:

1. connects to the hypervisor-service and authenticates with the container's
   credential (XENBED_CREDENTIAL), retrying until the domain exists;
2. once the domain is introduced to xenstored, serves XENSTORED_PATH inside
   the container, like Linux's /dev/xen/xenbus: each process that connects
   there has its socket handed to xenstored (SCM_RIGHTS), so the real
   `xenstore-*` tools talk to xenstored directly, as this domain;
3. starts the domain's driver modules (backends in dom0, frontends in guests:
   see modules.py), then in dom0, with --autostart DIR, runs the toolstack's
   boot steps (dom0's own store nodes, then `xl create` for each config in DIR
   not already running);
4. in a guest, watches `control/shutdown` (shutdown.py): "suspend" freezes
   the modules over their control channels (control.py), makes the suspend
   hypercall and thaws them with its outcome (docs/suspend-resume.md).
   XENBED_CONTROL_SHUTDOWN=ignore leaves the node unwatched: a guest that
   never answers, as one without PV drivers;
5. writes /run/xen/ready, and stays until SIGTERM or until its domain is
   destroyed.  If this process dies the domain dies with it (dom0 excepted).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

from xenbed.drivers.kernel import netconfig
from xenbed.drivers.kernel.modules import ModuleSupervisor, default_modules
from xenbed.drivers.kernel.shutdown import ShutdownWatcher, Suspender
from xenbed.drivers.xen.hypercall import HypercallError, HypervisorLink, LinkClosed, connect_with_retry
from xenbed.protocols import hypercall as hc

log = logging.getLogger("xenbed.kernel")

READY_FILE = "/run/xen/ready"


class XenbusDevice:
    """The local XENSTORED_PATH socket: accept, hand the socket to xenstored."""

    def __init__(self, link: HypervisorLink, path: str) -> None:
        self.link = link
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o666)
        self.listener.listen(64)

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                self.link.call(hc.Call.XS_ADOPT, fds=[client.fileno()])
            except (HypercallError, LinkClosed, TimeoutError) as exc:
                log.warning("could not hand a store connection to xenstored: %s", exc)
            finally:
                # xenstored holds its own duplicate now; ours must go, or the
                # client would never see EOF when xenstored closes.
                client.close()


def run_autostart(directory: str) -> None:
    """dom0's boot: its own store nodes, then the configured guests."""
    python = sys.executable
    subprocess.run([python, "-m", "xenbed.toolstack.init_dom0"], check=True)
    if not os.path.isdir(directory):
        return
    # An executable `pre-start` there runs first (e.g. to create disk
    # images), as xendomains users put such steps before their guests start.
    hook = os.path.join(directory, "pre-start")
    if os.path.isfile(hook):
        subprocess.run(["sh", hook], check=True)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".cfg"):
            continue
        path = os.path.join(directory, name)
        result = subprocess.run([python, "-m", "xenbed.toolstack.xl", "create", "--if-absent", path])
        if result.returncode != 0:
            raise SystemExit(f"autostart: xl create {path} failed with status {result.returncode}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xenbed-kernel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autostart", metavar="DIR", help="dom0: run the toolstack's boot steps and xl create DIR/*.cfg")
    parser.add_argument("--xenstored-path", default=os.environ.get("XENSTORED_PATH", "/run/xenstored/socket"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    try:
        os.unlink(READY_FILE)
    except FileNotFoundError:
        pass
    credential = os.environ.get("XENBED_CREDENTIAL")
    if not credential:
        log.error("XENBED_CREDENTIAL is not set: this container cannot prove which domain it is")
        return 2

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store_ready = threading.Event()

    def destroyed(frame):
        log.info("the domain was destroyed: halting")
        stop.set()

    # After a live migration the domain left behind on the old host is
    # destroyed by its toolstack: that host's "destroyed" must not halt us.
    generation = {"now": 0}

    def destroyed_unless_moved(gen: int):
        return lambda frame: destroyed(frame) if generation["now"] == gen else None

    upcalls = {hc.Call.UP_XENSTORE_READY: lambda frame: store_ready.set(),
               hc.Call.UP_DESTROYED: destroyed_unless_moved(0)}
    link = connect_with_retry(credential, "kernel", report=log.info, upcalls=upcalls, stop=stop)
    if link is None:
        return 0
    log.info("this is dom%d (%s), privilege %s", link.domid, link.name, link.privilege)

    while not store_ready.wait(0.5):
        if stop.is_set() or link.closed.is_set():
            return 0 if stop.is_set() else 1
    device = XenbusDevice(link, args.xenstored_path)
    threading.Thread(target=device.serve_forever, name="xenbus-device", daemon=True).start()

    # Drivers first: dom0's backends must be there before autostart's
    # `xl create` waits for them to reach InitWait.
    modules = ModuleSupervisor(default_modules(link.privilege))
    modules.start()
    netconfig.start(stop)

    if args.autostart:
        run_autostart(args.autostart)

    store = None
    current = {"link": link}  # a live migration replaces it (relocate below)
    if link.domid != 0 and os.environ.get("XENBED_CONTROL_SHUTDOWN", "watch") != "ignore":
        from xenbed.drivers.xen.store import XenStoreClient

        store = XenStoreClient(args.xenstored_path)
        watcher = None

        def relocate(target: dict) -> None:
            """Live migration: this domain now lives on the host whose
            hypervisor socket is target["hypervisor"] (as mounted here), with
            credential target["credential"].  The new kernel link first; the
            store device adopts through it from then on; later spawns and
            `xenstore-*` tools inherit the new environment; the kernel's own
            store connection and shutdown watch move to the new domain; the
            old link goes last (the source host then sees this domain die)."""
            generation["now"] += 1
            new_ready = threading.Event()
            new_upcalls = {hc.Call.UP_XENSTORE_READY: lambda frame: new_ready.set(),
                           hc.Call.UP_DESTROYED: destroyed_unless_moved(generation["now"])}
            old = current["link"]
            old_node = watcher.node.rsplit("/control/shutdown", 1)[0]
            new = None
            try:
                new = HypervisorLink.open(target["credential"], "kernel", target["hypervisor"], upcalls=new_upcalls)
                if not new_ready.wait(30):
                    raise RuntimeError(f"dom{new.domid} on {target['hypervisor']} was never introduced to its store")
                device.link = new  # store connections made from now on are the new xenstored's
                watcher.move(lambda: store.reconnect(), f"/local/domain/{new.domid}")
            except BaseException:
                # Still here, as before: this host's store, this host's "destroyed".
                generation["now"] -= 1
                device.link = old
                if new is not None:
                    new.close()
                    try:
                        watcher.move(lambda: store.reconnect(), old_node)
                    except Exception as exc:
                        log.error("could not watch %s/control/shutdown again: %s", old_node, exc)
                raise
            current["link"] = suspender.link = new
            os.environ["XENBED_HYPERVISOR_SOCKET"] = target["hypervisor"]
            os.environ["XENBED_CREDENTIAL"] = target["credential"]
            log.info("moved: now dom%d (%s) via %s", new.domid, new.name, target["hypervisor"])
            # The old link goes only after the modules have moved too: closing
            # it kills the domain on the old host, and with it the modules'
            # links and store connections there.
            return old.close

        suspender = Suspender(link, modules, relocate=relocate)
        watcher = ShutdownWatcher(store, f"/local/domain/{link.domid}", {"suspend": suspender.suspend}).start()

    os.makedirs(os.path.dirname(READY_FILE), exist_ok=True)
    with open(READY_FILE, "w") as ready:
        ready.write(f"{link.domid}\n")
    log.info("ready: xenstore at %s", args.xenstored_path)

    try:
        while not stop.wait(0.5):
            link = current["link"]
            if link.closed.is_set():
                log.error("lost the hypervisor: %s", link.close_reason)
                return 1
    finally:
        modules.stop()
        if store is not None:
            store.close()
    current["link"].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
