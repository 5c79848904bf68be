"""The guest kernel's answer to `control/shutdown` (Linux drivers/xen/manage.c).

The toolstack asks a guest to shut down, reboot or suspend by writing the
command to `<domain>/control/shutdown`.  The kernel watches that node; on an
event it reads the node in a transaction, and for a command it knows writes
"" back in the same transaction (the acknowledgement libxl waits for), then
acts on it outside the watch callback.  An unknown command is neither
acknowledged nor acted on (shutdown_handler: "Ignoring shutdown request").

Commands
--------
suspend   `Suspender.suspend`: freeze every module (control.py), the
          suspend hypercall SCHEDOP_SHUTDOWN(suspend) -- which returns only
          when the toolstack resumes the domain, saying whether the suspend
          was cancelled -- then thaw the modules with that outcome.  A
          module that does not freeze aborts the suspend: the others are
          thawed as cancelled and the hypercall is not made, so the domain
          keeps running and the toolstack's wait times out.
poweroff, halt, reboot
          acknowledged and logged, NOT implemented: xenbed has no `xl
          shutdown`/`xl reboot` yet, which would wait for the domain's
          shutdown and destroy or recreate it; the guest keeps running.

Each suspend appends one JSON line to /run/xen/suspend.jsonl (when it was
asked, frozen, resumed, thawed; cancelled or not; what each module said),
for tests and the bench.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("xenbed.kernel.shutdown")

SUSPEND_LOG = "/run/xen/suspend.jsonl"
WATCH_TOKEN = "kernel:control/shutdown"
KNOWN = ("poweroff", "halt", "reboot", "suspend")
FREEZE_TIMEOUT = 10.0  # per module; Linux's freezer gives processes 20 s in all


def take_request(store, node: str) -> str | None:
    """Read `node` (control/shutdown) in a transaction and acknowledge a
    known command by writing "" in the same transaction, as shutdown_handler
    does.  Returns the command ("" or None when there is none; an unknown
    command is returned unacknowledged)."""

    def body(tx: int) -> str | None:
        command = store.try_read(node, tx)
        if command and command in KNOWN:
            store.write(node, "", tx)
        return command

    return store.run_transaction(body)


class Suspender:
    """The suspend sequence of do_suspend, with the modules as the devices."""

    def __init__(self, link, modules, *, log_path: str | None = SUSPEND_LOG,
                 freeze_timeout: float = FREEZE_TIMEOUT, relocate: Callable[[dict], object] | None = None) -> None:
        self.link = link
        self.modules = modules
        self.log_path = log_path
        self.freeze_timeout = freeze_timeout
        self.relocate = relocate  # live migration: move the kernel's own links (see __main__)

    def suspend(self) -> dict:
        from xenbed.drivers.kernel.control import ControlError
        from xenbed.drivers.xen.hypercall import HypercallError, LinkClosed
        from xenbed.protocols import hypercall as hc

        record: dict = {"requested_at": time.time()}
        try:
            record["frozen"] = self.modules.freeze_all(self.freeze_timeout)
        except ControlError as exc:
            log.error("suspend aborted, the domain keeps running: %s", exc)
            record.update(outcome="aborted", error=str(exc), thawed_at=time.time())
            self._record(record)
            return record
        record["frozen_at"] = time.time()
        log.info("modules frozen (%s): suspending", ", ".join(record["frozen"]) or "none")
        try:
            # Blocks until the toolstack resumes us: the reply is the resume.
            reply = self.link.call(hc.Call.SCHEDOP_SHUTDOWN, {"reason": "suspend"}, timeout=None)
            cancelled = bool(reply.get("cancelled", False))
        except HypercallError as exc:
            # Refused: as when Linux's HYPERVISOR_suspend fails, resume in place.
            log.error("the suspend hypercall was refused (%s): resuming in place", exc)
            record["error"] = str(exc)
            cancelled = True
        except LinkClosed:
            log.error("lost the hypervisor while suspended")
            record.update(outcome="lost")
            self._record(record)
            return record
        record["resumed_at"] = time.time()
        record["cancelled"] = cancelled
        target = None if cancelled else reply.get("relocate") if isinstance(reply, dict) else None
        finish_move = None
        if target and self.relocate is not None:
            # Live migration: this domain runs on another host now.  The
            # kernel moves first (so that new store connections go to the
            # new xenstored), then each module with the same target.
            record["relocated_to"] = target.get("hypervisor")
            try:
                finish_move = self.relocate(target)
                record["relocated_at"] = time.time()
            except Exception as exc:
                # Still on the old host with everything as it was: go on
                # there, on the old rings (the source toolstack sees the
                # domain still connected and calls the migration off).
                log.exception("could not move to %s: resuming here, cancelled", target.get("hypervisor"))
                record["error"] = f"relocation failed: {exc}"
                cancelled, target = True, None
                record["cancelled"] = True
        log.info("resumed (%s): thawing the modules", "cancelled" if cancelled else "devices reconnect")
        extra = {"relocate": target} if target else {}
        record["modules"] = self.modules.thaw_all(cancelled, self.freeze_timeout, **extra)
        if finish_move is not None:
            finish_move()  # every module has moved: now leave the old host
        record["thawed_at"] = time.time()
        record["outcome"] = "cancelled" if cancelled else "resumed"
        self._record(record)
        return record

    def _record(self, record: dict) -> None:
        if not self.log_path:
            return
        try:
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("writing %s: %s", self.log_path, exc)


class ShutdownWatcher:
    """Watches `<domain_path>/control/shutdown`; commands are acted on one at
    a time on a thread of their own (a suspend blocks for as long as the
    domain stays suspended, and must not hold the store's watch thread)."""

    def __init__(self, store, domain_path: str, actions: dict[str, Callable[[], object]]) -> None:
        self.store = store
        self.node = f"{domain_path.rstrip('/')}/control/shutdown"
        self.actions = actions
        self._queue: queue.Queue[str] = queue.Queue()
        self._busy = threading.Lock()

    def start(self) -> ShutdownWatcher:
        threading.Thread(target=self._worker, name="shutdown", daemon=True).start()
        self.store.watch(self.node, WATCH_TOKEN, self._changed)
        log.info("watching %s", self.node)
        return self

    def move(self, reconnect: Callable[[], object], domain_path: str) -> None:
        """Live migration: the store connection moves (`reconnect`) and the
        watch follows the domain's new path."""
        old = self.node
        try:
            self.store.unwatch(old, WATCH_TOKEN)
        except Exception as exc:  # the old store may be gone already
            log.debug("unwatching %s: %s", old, exc)
        reconnect()
        self.node = f"{domain_path.rstrip('/')}/control/shutdown"
        self.store.watch(self.node, WATCH_TOKEN, self._changed)
        log.info("watching %s", self.node)

    def _changed(self, path: str, token: str) -> None:
        if self._busy.locked():
            return  # a suspend in progress: the node is looked at again after it
        try:
            command = take_request(self.store, self.node)
        except Exception as exc:
            log.warning("reading %s: %s", self.node, exc)
            return
        if not command:
            return
        if command not in KNOWN:
            log.info("ignoring shutdown request %r", command)
            return
        self._queue.put(command)

    def _worker(self) -> None:
        while True:
            command = self._queue.get()
            with self._busy:
                action = self.actions.get(command)
                if action is None:
                    log.warning("shutdown request %r acknowledged, but xenbed's kernel does not implement it: "
                                "the domain keeps running", command)
                    continue
                try:
                    action()
                except Exception:
                    log.exception("shutdown request %r failed", command)
            # a request written while we were busy
            self._changed(self.node, WATCH_TOKEN)
