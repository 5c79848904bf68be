"""Run a command in a container and get both outputs apart, with an optional time limit."""

from __future__ import annotations

import os
import shlex
import signal
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class ExecError(AssertionError):
    """`check=True` and the command failed (or timed out); the message holds both outputs."""

    def __init__(self, where: str, cmd, result: ExecResult, reason: str | None = None):
        self.result = result
        command = cmd if isinstance(cmd, str) else shlex.join(cmd)
        super().__init__(
            f"{where}: `{command}` {reason or f'exited with {result.exit_code}'}\n"
            f"--- stdout ---\n{result.stdout.rstrip()}\n--- stderr ---\n{result.stderr.rstrip()}"
        )


class ExecTimeout(ExecError):
    pass


def run_exec(client, container, cmd: list[str] | str, *, user=None, environment=None,
             timeout: float | None = None) -> ExecResult:
    """Exec `cmd` (a string runs through `sh -c`) and collect stdout and stderr.

    The SDK has no exec timeout, so the output is read on a thread; on timeout
    the exec's process is killed when it runs on this host (same kernel), and
    ExecTimeout carries whatever output had arrived.
    """
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    api = client.api
    exec_id = api.exec_create(container.id, argv, stdout=True, stderr=True, user=user or "",
                              environment=environment)["Id"]
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def pump() -> None:
        for out, err in api.exec_start(exec_id, stream=True, demux=True):
            if out:
                chunks["stdout"].append(out)
            if err:
                chunks["stderr"].append(err)

    reader = threading.Thread(target=pump, daemon=True, name=f"exec-{container.name}")
    reader.start()
    reader.join(timeout)

    def collected(exit_code: int) -> ExecResult:
        return ExecResult(exit_code, b"".join(chunks["stdout"]).decode(errors="replace"),
                          b"".join(chunks["stderr"]).decode(errors="replace"))

    if reader.is_alive():
        _kill_exec(api, exec_id, container.id)
        raise ExecTimeout(container.name, cmd, collected(-1), f"did not finish within {timeout:g}s")
    exit_code = api.exec_inspect(exec_id).get("ExitCode")
    return collected(-1 if exit_code is None else exit_code)


def _kill_exec(api, exec_id: str, container_id: str) -> None:
    pid = api.exec_inspect(exec_id).get("Pid")
    try:
        # only a process that is really in this container's cgroup: the engine may be remote
        with open(f"/proc/{pid}/cgroup") as cgroup:
            ours = container_id in cgroup.read()
    except (OSError, TypeError):
        ours = False
    if pid and ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
