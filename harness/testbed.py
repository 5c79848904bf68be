"""One run of a compose project on the Docker engine, under its own project name.

`up` creates networks, volumes and containers in dependency order and waits
for each `depends_on` condition and finally for every healthcheck; `down`
removes whatever carries the run's label.  A failed `up` raises with the logs
of the container it was waiting for and leaves cleanup to `down`, so the
caller's `finally` (or `xenbed down`) is the one place that cleans.

A Testbed knows containers, not Xen: lifecycle, `exec`, `shell` (testinfra)
and the chaos hooks (chaos.py).  What the containers mean to Xen -- hosts,
dom0s, domains and their devices -- is the Xen view beside it, `Xen(testbed)`
(xen.py), which uses only this public face.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import docker
from docker.errors import APIError, ImageNotFound, NotFound

from . import chaos, resources
from .chaos import History
from .compose import Project, load_project
from .container_spec import container_spec, network_kwargs, network_name, volume_kwargs
from .execs import ExecError, ExecResult, run_exec
from .resources import PROJECT, SERVICE, connect, reap_stale_runs, remove_project
from .status import rows_from_containers, status_row
from .waits import Observation, StopWaiting, WaitTimeout, wait_for

DEFAULT_COMPOSE = "compose/testbed.yml"
FAILURE_LOG_LINES = 60


# At the end of `up`: every service with a healthcheck (compose or image) is
# healthy, and every other one is running.
HEALTHY_IF_CHECKED = "healthy_if_checked"

class TestbedError(RuntimeError):
    """`up` could not bring the testbed up; the message says what and shows the relevant logs."""

    __test__ = False  # not a pytest test class, despite the name


class Testbed:
    __test__ = False

    def __init__(self, project_name: str, project: Project | None = None, *,
                 client: docker.DockerClient | None = None, keep: bool = False):
        self.project_name = project_name
        self.project = project
        self.keep = keep  # labels the run so the reaper leaves it alone after we exit
        self._client = client
        self.history = History()  # every chaos operation, invoke and outcome (chaos.py)

    @classmethod
    def from_compose(cls, path: str | Path = DEFAULT_COMPOSE, project: str | None = None,
                     env: dict | None = None, **kwargs) -> "Testbed":
        environ = {**os.environ, **(env or {})}
        return cls(project or f"xenbed-{secrets.token_hex(3)}", load_project(path, environ), **kwargs)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = connect()
        return self._client

    @property
    def label(self) -> str:
        return f"{PROJECT}={self.project_name}"

    # ------------------------------------------------------------------ lifecycle

    def up(self, timeout: float = 180, progress: Callable[[str], None] = print) -> None:
        if self.project is None:
            raise TestbedError("this Testbed was not loaded from a compose file; use Testbed.from_compose")
        deadline = time.monotonic() + timeout
        say = lambda line: progress(f"[{self.project_name}] {line}")
        for stale in reap_stale_runs(self.client):
            say(f"reaped stale run {stale}")
        self._check_images()
        for network in self.project.networks.values():
            self._create_once(self.client.api.create_network, network_kwargs(self.project_name, network, keep=self.keep))
        for volume in self.project.volumes.values():
            self._create_once(self.client.api.create_volume, volume_kwargs(self.project_name, volume, keep=self.keep))
        awaited: set[tuple[str, str]] = set()
        for name in self.project.start_order():
            service = self.project.services[name]
            for dependency, condition in service.depends_on.items():
                if (dependency, condition) not in awaited:
                    self._await(dependency, condition, deadline, say, needed_by=name)
                    awaited.add((dependency, condition))
            self._start_service(name)
            say(f"started {name}")
        for name, service in self.project.services.items():
            if (service.healthcheck is None or service.healthcheck.test != ("NONE",)) \
                    and (name, "service_healthy") not in awaited:
                self._await(name, HEALTHY_IF_CHECKED, deadline, say, needed_by=None)
        say("up")

    def down(self, timeout: float = 10) -> None:
        remove_project(self.client, self.label, timeout=timeout)

    def leftovers(self) -> list[str]:
        return resources.leftovers(self.client, self.project_name)

    # ------------------------------------------------------------------ access

    def container(self, service: str):
        found = self.client.containers.list(all=True, filters={"label": [self.label, f"{SERVICE}={service}"]})
        if not found:
            raise LookupError(f"run {self.project_name} has no container for service '{service}'")
        return found[0]

    def exec(self, service: str, cmd: list[str] | str, *, check: bool = False, user: str | None = None,
             environment: dict | None = None, timeout: float | None = None) -> ExecResult:
        result = run_exec(self.client, self.container(service), cmd, user=user,
                          environment=environment, timeout=timeout)
        if check and result.exit_code != 0:
            raise ExecError(service, cmd, result)
        return result

    def shell(self, service: str):
        """A pytest-testinfra host of the service's container: files, processes, sockets."""
        import testinfra  # imported late: only tests that ask for a shell need it
        return testinfra.get_host(f"docker://{self.container(service).id}")

    def logs(self, service: str | None = None, tail: int = 200) -> str:
        names = [service] if service else self.services()
        parts = []
        for name in names:
            try:
                text = self.container(name).logs(tail=tail).decode(errors="replace")
            except (LookupError, NotFound):
                text = "(no container)\n"
            parts.append(text if service else f"===== {name} =====\n{text}")
        return "".join(parts)

    def services(self) -> list[str]:
        if self.project is not None:
            return list(self.project.services)
        containers = self.client.containers.list(all=True, filters={"label": self.label})
        return sorted({c.labels.get(SERVICE, c.name) for c in containers})

    def status(self) -> list[dict]:
        if self.project is None:
            return rows_from_containers(self.client.containers.list(all=True, filters={"label": self.label}))
        rows = []
        for name in self.project.services:
            try:
                rows.append(status_row(name, self.container(name)))
            except LookupError:
                rows.append(status_row(name, None))
        return rows

    # ------------------------------------------------------------------ chaos
    # thin controls, each an operation in self.history (chaos.py)
    def kill(self, service: str, signal: str | int = "SIGKILL") -> None:
        self.history.run("kill", service, {"signal": signal},
                         lambda: self.container(service).kill(signal=signal))

    def stop(self, service: str, timeout: float = 10) -> None:
        self.history.run("stop", service, {"timeout": timeout},
                         lambda: self.container(service).stop(timeout=int(timeout)))

    def start(self, service: str) -> None:
        self.history.run("start", service, {}, lambda: self.container(service).start())

    def restart(self, service: str, timeout: float = 10) -> None:
        self.history.run("restart", service, {"timeout": timeout},
                         lambda: self.container(service).restart(timeout=int(timeout)))

    def pause(self, service: str) -> None:
        self.history.run("pause", service, {}, lambda: self.container(service).pause())

    def unpause(self, service: str) -> None:
        self.history.run("unpause", service, {}, lambda: self.container(service).unpause())

    def disconnect(self, service: str, network: str) -> None:
        """Unplug the service's container from compose network `network` (its short name)."""
        self.history.run("disconnect", service, {"network": network},
                         lambda: self.client.networks.get(network_name(self.project_name, network))
                         .disconnect(self.container(service)))

    def reconnect(self, service: str, network: str) -> None:
        """Plug it back in, with the aliases (and static address) its compose file gives it."""
        def plug() -> None:
            engine_name = network_name(self.project_name, network)
            endpoint = {"aliases": [service]}
            if self.project is not None and service in self.project.services:
                spec = container_spec(self.project_name, self.project, self.project.services[service])
                endpoint = spec.networks.get(engine_name, endpoint)
            self.client.networks.get(engine_name).connect(self.container(service), **endpoint)
        self.history.run("reconnect", service, {"network": network}, plug)

    def kill_process(self, service: str, pattern: str, signal: str | int = "SIGKILL") -> None:
        """Send `signal` to the processes of `service` whose command line
        matches `pattern` (an extended regex, as `pkill -f`): a driver or
        daemon killed inside a running container.  No match is a `fail`."""
        def kill() -> None:
            result = self.exec(service, chaos.pkill_command(pattern, signal))
            chaos.check_pkill(service, pattern, result.exit_code, result.stdout + result.stderr)
        self.history.run("kill_process", service, {"pattern": pattern, "signal": signal}, kill)

    # ------------------------------------------------------------------ services added at run time

    def service_labels(self) -> dict[str, dict[str, str]]:
        """{service: its labels}, from the compose file or, for a run found by
        its label alone, from its containers (xen_hosts.py reads these)."""
        if self.project is not None:
            return {name: service.labels for name, service in self.project.services.items()}
        return {c.labels.get(SERVICE, c.name): c.labels
                for c in self.client.containers.list(all=True, filters={"label": self.label})}

    def add_service(self, name: str, template: str, environment: dict[str, str] | None = None, *,
                    timeout: float = 60, progress: Callable[[str], None] = lambda line: None) -> None:
        """Start a container for a new service `name` made like `template`'s
        (its environment updated with `environment`, no dependencies) and wait
        until it is healthy.  It carries the run's labels, so `down` and the
        leak check know it."""
        if self.project is None:
            raise TestbedError("this Testbed was not loaded from a compose file")
        if name in self.project.services:
            raise TestbedError(f"{name} already exists in this run")
        template_service = self.project.services[template]
        self.project.services[name] = replace(template_service, name=name, depends_on={},
                                              environment={**template_service.environment, **(environment or {})})
        self._start_service(name)
        self._await(name, "service_healthy", time.monotonic() + timeout, progress, needed_by=None)

    def remove_service(self, name: str) -> None:
        """Remove the container of `name` (if any) and forget the service."""
        try:
            self.container(name).remove(force=True)
        except LookupError:
            pass
        if self.project is not None:
            self.project.services.pop(name, None)

    # ------------------------------------------------------------------ up, step by step

    def _check_images(self) -> None:
        missing = sorted({s.image for s in self.project.services.values()
                          if not self._image_present(s.image)})
        if missing:
            raise TestbedError(f"images not on this engine: {', '.join(missing)}; no registry is reachable, "
                               f"so build them first (`make images`)")

    def _image_present(self, image: str | None) -> bool:
        try:
            self.client.images.get(image)
            return True
        except (ImageNotFound, APIError, TypeError):
            return False

    def _create_once(self, create, kwargs: dict) -> None:
        """Create a network or volume; one already labelled for this run is reused (a second `up`)."""
        try:
            create(**kwargs)
        except APIError as error:
            if error.status_code != 409 or not self._ours(kwargs["name"]):
                raise TestbedError(f"cannot create {kwargs['name']}: {error.explanation or error}") from None

    def _ours(self, name: str) -> bool:
        for lister in (self.client.networks.list, self.client.volumes.list):
            if any(r.name == name for r in lister(filters={"label": self.label})):
                return True
        return False

    def _start_service(self, name: str) -> None:
        try:
            container = self.container(name)
        except LookupError:
            container = self._create_container(name)
        container.reload()
        if container.status != "running":
            try:
                container.start()
            except APIError as error:
                raise TestbedError(f"cannot start {name}: {error.explanation or error}\n"
                                   f"{self._failure_logs(name)}") from None

    def _create_container(self, name: str):
        spec = container_spec(self.project_name, self.project, self.project.services[name], keep=self.keep)
        api = self.client.api
        host_config = dict(spec.host_config)
        if spec.shares_network_of:
            host_config["network_mode"] = f"container:{self.container(spec.shares_network_of).id}"
        networks = list(spec.networks.items())
        networking_config = None
        if networks:
            first, endpoint = networks[0]
            networking_config = api.create_networking_config({first: api.create_endpoint_config(**endpoint)})
        try:
            created = api.create_container(**spec.create, host_config=api.create_host_config(**host_config),
                                           networking_config=networking_config)
            for network, endpoint in networks[1:]:
                api.connect_container_to_network(created["Id"], network, **endpoint)
        except APIError as error:
            raise TestbedError(f"cannot create the container of {name}: {error.explanation or error}") from None
        return self.client.containers.get(created["Id"])

    def _await(self, service: str, condition: str, deadline: float, say, needed_by: str | None) -> None:
        what = {"service_started": f"{service} to start",
                "service_healthy": f"{service} to be healthy",
                HEALTHY_IF_CHECKED: f"{service} to be healthy (or running, without a healthcheck)",
                "service_completed_successfully": f"{service} to exit with status 0"}[condition]
        if needed_by:
            what += f" (needed by {needed_by})"
        say(f"waiting for {what}")
        try:
            wait_for(lambda: self._observe(service, condition), what=what,
                     timeout=max(0.0, deadline - time.monotonic()), interval=0.5,
                     progress=say, progress_every=10)
        except (WaitTimeout, StopWaiting) as error:
            raise TestbedError(f"{error}\n{self._failure_logs(service)}") from None

    def _observe(self, service: str, condition: str) -> Observation:
        container = self.container(service)
        container.reload()
        state = container.attrs["State"]
        status, code = state.get("Status"), state.get("ExitCode")
        health = state.get("Health") or {}
        checks = health.get("Log") or []
        last_check = f"; last check: exit {checks[-1].get('ExitCode')}, " \
                     f"output {checks[-1].get('Output', '').strip()[-300:]!r}" if checks else ""
        seen = f"{service} is {status}" + (f", health {health['Status']}" if health else "") + last_check
        if condition == "service_started":
            return Observation(status in ("running", "exited") and state.get("StartedAt", "0001") > "0001", seen)
        if condition == "service_completed_successfully":
            if status in ("exited", "dead") and code != 0:
                raise StopWaiting(f"{service} exited with status {code}, not 0")
            return Observation(status == "exited", seen)
        if status in ("exited", "dead"):
            raise StopWaiting(f"{service} exited (status {code}) before it was healthy")
        if not health and status == "running":
            if condition == HEALTHY_IF_CHECKED:
                return Observation(True, seen)
            raise StopWaiting(f"{service} has no healthcheck (neither in the compose file nor in its image)")
        if health.get("Status") == "unhealthy":
            raise StopWaiting(f"{service} is unhealthy{last_check}")
        return Observation(health.get("Status") == "healthy", seen)

    def _failure_logs(self, service: str) -> str:
        return f"--- logs of {service} (last {FAILURE_LOG_LINES} lines) ---\n" \
               f"{self.logs(service, tail=FAILURE_LOG_LINES).rstrip() or '(empty)'}"
