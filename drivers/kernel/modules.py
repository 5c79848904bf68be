"""The domain's driver "modules": backend or frontend daemons the kernel runs.

A Linux dom0 has blkback and netback in its kernel, a guest has blkfront and
netfront; here each driver is a process the domain's kernel starts once its
store is ready and stops when the domain halts.  Which ones: by privilege
(backends where the domain may host them, frontends in plain guests), or
exactly the list in XENBED_MODULES (comma-separated module names, empty for
none) -- so a driver author can switch a built-in driver off and run their own.
A module that crashes is started again, as a driver re-probes its devices.
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

log = logging.getLogger("xenbed.kernel.modules")

BACKENDS = ("xenbed.drivers.blk.back", "xenbed.drivers.net.back")
FRONTENDS = ("xenbed.drivers.blk.front", "xenbed.drivers.net.front")
RESTART_DELAY = 1.0


def default_modules(privilege: str) -> list[str]:
    configured = os.environ.get("XENBED_MODULES")
    if configured is not None:
        return [m.strip() for m in configured.split(",") if m.strip()]
    wanted = BACKENDS if privilege in ("control", "backend") else FRONTENDS
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
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for module in self.modules:
            self._spawn(module)
        self._thread = threading.Thread(target=self._watch, name="modules", daemon=True)
        self._thread.start()

    def _spawn(self, module: str) -> None:
        log.info("starting module %s", module)
        self.processes[module] = subprocess.Popen([sys.executable, "-m", module])

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
