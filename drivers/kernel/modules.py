"""The domain's driver "modules": backend or frontend daemons the kernel runs.

A Linux dom0 has blkback and netback in its kernel, a guest has blkfront and
netfront; here each driver is a process the domain's kernel starts once its
store is ready and stops when the domain halts.  Which ones: by privilege
(backends where the domain may host them, frontends in plain guests), or
exactly the list in XENBED_MODULES (comma-separated module names, empty for
none) -- so a driver author can switch a built-in driver off and run their own.
A module that crashes is started again, as a driver re-probes its devices.

Each module gets a control channel from the kernel (control.py): the
kernel freezes every module that takes part before its suspend hypercall
and thaws them after it (`freeze_all`, `thaw_all`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from xenbed.drivers.kernel.control import ENV_FD, ControlError, ModuleChannel

log = logging.getLogger("xenbed.kernel.modules")

BACKENDS = ("xenbed.drivers.blk.back", "xenbed.drivers.net.back")
FRONTENDS = ("xenbed.drivers.blk.front", "xenbed.drivers.net.front")
# dom0's toolstack daemons: the live-migration receiver (`xl migrate` on
# another host connects to it; toolstack/migrate.py).
CONTROL_ONLY = ("xenbed.toolstack.migrate",)
RESTART_DELAY = 1.0
HELLO_GRACE = 5.0  # how long a module just started may take to say hello before a suspend goes on without it


def default_modules(privilege: str) -> list[str]:
    configured = os.environ.get("XENBED_MODULES")
    if configured is not None:
        return [m.strip() for m in configured.split(",") if m.strip()]
    wanted = BACKENDS if privilege in ("control", "backend") else FRONTENDS
    if privilege == "control":
        wanted = wanted + CONTROL_ONLY
    # Only the modules this image ships (a role image copies the rooms it runs).
    return [m for m in wanted if _available(m)]


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there at all
        return False


class ModuleSupervisor:
    def __init__(self, modules: list[str]) -> None:
        self.modules = modules
        self.processes: dict[str, subprocess.Popen] = {}
        self.channels: dict[str, ModuleChannel] = {}
        self.started_at: dict[str, float] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for module in self.modules:
            self._spawn(module)
        self._thread = threading.Thread(target=self._watch, name="modules", daemon=True)
        self._thread.start()

    def _spawn(self, module: str) -> None:
        log.info("starting module %s", module)
        old = self.channels.pop(module, None)
        if old is not None:
            old.close()
        channel = ModuleChannel(module)
        env = {**os.environ, ENV_FD: str(channel.child_fd)}
        try:
            self.processes[module] = subprocess.Popen([sys.executable, "-m", module], env=env,
                                                      pass_fds=(channel.child_fd,))
        finally:
            channel.child_started()
        self.channels[module] = channel
        self.started_at[module] = time.monotonic()

    # -- suspend / resume ------------------------------------------------------------------
    def _taking_part(self, op: str) -> list[ModuleChannel]:
        """The modules to ask: those that said they take `op`.  One started
        moments ago may not have said hello yet: wait a little for it."""
        out = []
        for module, channel in list(self.channels.items()):
            if not channel.greeted.is_set():
                grace = HELLO_GRACE - (time.monotonic() - self.started_at.get(module, 0.0))
                if grace > 0:
                    channel.greeted.wait(grace)
            if channel.takes(op) and not channel.closed.is_set():
                out.append(channel)
            elif not channel.greeted.is_set():
                log.info("module %s has no control channel in use: it keeps running through %s", module, op)
        return out

    def freeze_all(self, timeout: float) -> list[str]:
        """Freeze every module that takes part, one after the other (a module
        answers once it issues nothing new).  If one fails, those frozen
        already are thawed with cancelled=True and ControlError says why:
        the suspend is aborted and the domain keeps running, as Linux's
        do_suspend does when dpm_suspend_start fails."""
        frozen: list[ModuleChannel] = []
        try:
            for channel in self._taking_part("freeze"):
                frozen.append(channel)  # thawed on failure too: it may have frozen after its timeout
                channel.call("freeze", timeout)
        except ControlError:
            for channel in reversed(frozen):
                try:
                    channel.call("thaw", timeout, cancelled=True)
                except ControlError as exc:
                    log.error("thawing %s after a failed freeze: %s", channel.module, exc)
            raise
        return [c.module for c in frozen]

    def thaw_all(self, cancelled: bool, timeout: float, **arguments) -> dict[str, str]:
        """Thaw every module that takes part, all at once (each reconnects its
        own devices; one after the other the guest would wait for the sum);
        `arguments` go with the request (see control.py).  Returns module ->
        "ok" or the error: one module's failure does not keep the others
        frozen."""
        results: dict[str, str] = {}

        def thaw(channel: ModuleChannel) -> None:
            try:
                channel.call("thaw", timeout, cancelled=cancelled, **arguments)
                results[channel.module] = "ok"
            except ControlError as exc:
                log.error("%s", exc)
                results[channel.module] = str(exc)

        threads = [threading.Thread(target=thaw, args=(c,), name=f"thaw-{c.module}")
                   for c in self._taking_part("thaw")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for module, process in list(self.processes.items()):
                code = process.poll()
                if code is not None and not self._stopping.is_set():
                    log.warning("module %s exited with status %s; starting it again", module, code)
                    time.sleep(RESTART_DELAY)
                    if not self._stopping.is_set():
                        self._spawn(module)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for module, process in self.processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("module %s ignored SIGTERM; killing it", module)
                process.kill()
                process.wait()
        for channel in self.channels.values():
            channel.close()
