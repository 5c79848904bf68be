"""One run of a compose project on the Docker engine, under its own project name.

`up` creates networks, volumes and containers in dependency order and waits
for each `depends_on` condition and finally for every healthcheck; `down`
removes whatever carries the run's label.  A failed `up` raises with the logs
of the container it was waiting for and leaves cleanup to `down`, so the
caller's `finally` (or `xenbed down`) is the one place that cleans.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Callable

import docker
from docker.errors import APIError, ImageNotFound, NotFound

from . import resources
from .chaos import History
from .compose import Project, load_project
from .container_spec import container_spec, network_kwargs, network_name, volume_kwargs
from .execs import ExecError, ExecResult, run_exec
from .hosts import Host, HostError, find_hosts, resolve_host
from .resources import PROJECT, SERVICE, connect, reap_stale_runs, remove_project
from .status import rows_from_containers, status_row
from .waits import StopWaiting, WaitTimeout, wait_for

DEFAULT_COMPOSE = "compose/testbed.yml"
FAILURE_LOG_LINES = 60


# At the end of `up`: every service with a healthcheck (compose or image) is
# healthy, and every other one is running.
HEALTHY_IF_CHECKED = "healthy_if_checked"

class TestbedError(RuntimeError):
    """`up` could not bring the testbed up; the message says what and shows the relevant logs."""

    __test__ = False  # not a pytest test class, despite the name


class _Observation:
    """What a wait probe saw: truthy when the condition holds, readable in a timeout message."""

    def __init__(self, ready: bool, seen: str):
        self.ready, self.seen = ready, seen

    def __bool__(self) -> bool:
        return self.ready

    def __repr__(self) -> str:
        return self.seen


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
        import os
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

    def host(self, service: str):
        import testinfra  # imported late: only tests that ask for a host need it
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

    # chaos hooks: thin controls, each an operation in self.history (chaos.py)
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

    # ------------------------------------------------------------------ up, step by step

    # ------------------------------------------------------------------ domains

    def create_domain(self, name: str, *, template: str = "domu1", memory_mb: int = 16,
                      timeout: float = 60, environment: dict[str, str] | None = None,
                      progress: Callable[[str], None] = lambda line: None) -> int:
        """A new guest at run time, as a toolstack user makes one: `xl create`
        in dom0 (which returns the domain's fresh credential), then a
        container like `template`'s that boots with that credential.  Returns
        the domid.  The container carries the run's labels, so `down` and the
        leak audit know it.  `environment` overrides the template's, e.g.
        `{"XENBED_MODULES": ""}` for a guest whose kernel starts no driver
        daemon (a program of one's own is then its frontend).  With several
        Xen hosts (compose/two-hosts.yml) the domain goes on the template's
        host: its dom0 creates it, and the container has the template's
        host label and hypervisor socket."""
        from dataclasses import replace

        if self.project is None:
            raise TestbedError("this Testbed was not loaded from a compose file")
        if name in self.project.services:
            raise TestbedError(f"{name} already exists in this run")
        dom0 = self.dom0(template)
        config = f'name = "{name}"\nmemory = {memory_mb}\n'
        created = self.exec(dom0, ["sh", "-c", f"cat > /tmp/{name}.cfg <<'EOF'\n{config}EOF\n"
                                               f"xl create --print-credential /tmp/{name}.cfg"], check=True)
        credential = created.stdout.strip().splitlines()[-1]
        template_service = self.project.services[template]
        environment = {**template_service.environment, **(environment or {}),
                       "XENBED_DOMAIN_NAME": name, "XENBED_CREDENTIAL": credential}
        self.project.services[name] = replace(template_service, name=name, environment=environment, depends_on={})
        self._start_service(name)
        self._await(name, "service_healthy", time.monotonic() + timeout, progress, needed_by=None)
        return int(self.exec(dom0, ["xl", "domid", name], check=True).stdout.strip())

    def wait_devices_connected(self, timeout: float = 60, progress: Callable[[str], None] = lambda line: None) -> None:
        """Until every PV device in every host's store is Connected at both
        ends: containers are healthy before their guests' devices have
        finished connecting, and a test should not start in between.  The
        timeout names each device that is not, with its states."""
        from .domains import devices_in, store_tree
        from xenbed.protocols.xenbus_state import XenbusState

        hosts = [h for h, host in self.xen_hosts().items() if host.dom0 is not None]

        def pending() -> list[str]:
            waiting = []
            for host in hosts:
                for d in devices_in(store_tree(self, host=host)):
                    if (d.frontend_state, d.backend_state) != (XenbusState.Connected, XenbusState.Connected):
                        waiting.append(f"{host}: dom{d.domid} {d.kind} {d.devid} "
                                       f"{d.frontend_state.name}/{d.backend_state.name}")
            return waiting

        wait_for(lambda: _Observation(not (left := pending()), ", ".join(left) or "all Connected"),
                 what="every PV device Connected at both ends", timeout=timeout, progress=progress)

    def domain(self, name: str, host: str | None = None):
        """A handle to drive domain `name` through the toolstack and read its
        devices (harness/domains.py); "dom0" (or a host's dom0 service, e.g.
        "dom0-b") is that host's Domain-0.  `host` names the Xen host whose
        toolstack knows the domain -- a host name or one of its services,
        e.g. `testbed.domain("domu1", host="dom0-b")` after a migration --
        by default the host the service `name` belongs to (or the only one)."""
        from .domains import Domain
        hosts = self.xen_hosts()
        dom0_services = {h.dom0 for h in hosts.values()} - {None}
        if name in ("dom0", "Domain-0") or name in dom0_services:
            which = host if host is not None else (name if name in dom0_services else None)
            return Domain(self, "Domain-0", dom0=self.dom0(which))
        return Domain(self, name, dom0=self.dom0(host if host is not None else self._host_hint(name, hosts)))

    # ------------------------------------------------------------------ Xen hosts

    def xen_hosts(self) -> dict[str, Host]:
        """The run's Xen hosts (harness/hosts.py): one, `host`, for the
        default topology; host-a and host-b for compose/two-hosts.yml."""
        if self.project is not None:
            labels = {name: service.labels for name, service in self.project.services.items()}
        else:
            labels = {c.labels.get(SERVICE, c.name): c.labels
                      for c in self.client.containers.list(all=True, filters={"label": self.label})}
        return find_hosts(labels)

    def xen_host(self, which: str | None = None) -> Host:
        """The host `which` names (a host name or any of its services), or the only one."""
        return resolve_host(self.xen_hosts(), which)

    def dom0(self, which: str | None = None) -> str:
        """The service name of the dom0 of host `which` (see xen_host): "dom0",
        or "dom0-a" / "dom0-b" in compose/two-hosts.yml."""
        host = self.xen_host(which)
        if host.dom0 is None:
            raise HostError(f"host {host.name} has no dom0 service")
        return host.dom0

    def hypervisor(self, which: str | None = None) -> str:
        """The service name of the hypervisor of host `which` (see xen_host)."""
        host = self.xen_host(which)
        if host.hypervisor is None:
            raise HostError(f"host {host.name} has no hypervisor service")
        return host.hypervisor

    @staticmethod
    def _host_hint(name: str, hosts: dict[str, Host]) -> str | None:
        """`name` when it is a service of some host (its host is then meant), else None (the only host)."""
        return name if any(name in h for h in hosts.values()) else None

    def audit(self, host: str | None = None) -> dict:
        """The hypervisor's report of what dead domains left behind (grant
        mappings of their pages, ports offered to them, their store nodes,
        domains dying and never destroyed), asked from dom0.  Without `host`,
        of every host of the run; with several, each finding says its host."""
        import json

        script = ("import json\n"
                  "from xenbed.drivers.xen.hypercall import HypervisorLink\n"
                  "from xenbed.protocols import hypercall as hc\n"
                  "print(json.dumps(HypervisorLink.open(role='device').call(hc.Call.AUDIT)))\n")
        hosts = [self.xen_host(host)] if host is not None else \
            [h for h in self.xen_hosts().values() if h.dom0 is not None]
        reports = {}
        for each in hosts:
            result = self.exec(each.dom0, ["python3", "-c", script], check=True)
            reports[each.name] = json.loads(result.stdout.strip().splitlines()[-1])
        if len(reports) == 1:
            return next(iter(reports.values()))
        merged: dict[str, list] = {}
        for name, report in reports.items():
            for kind, found in report.items():
                merged.setdefault(kind, []).extend(
                    {"host": name, **item} if isinstance(item, dict) else {"host": name, "found": item}
                    for item in found)
        return merged

    def destroy_domain(self, name: str, host: str | None = None) -> None:
        """`xl destroy` in dom0 (of `host`, by default the domain's service's), then the domain's container goes."""
        dom0 = self.dom0(host if host is not None else self._host_hint(name, self.xen_hosts()))
        self.exec(dom0, ["xl", "destroy", name], check=True)
        try:
            self.container(name).remove(force=True)
        except LookupError:
            pass
        if self.project is not None:
            self.project.services.pop(name, None)

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

    def _observe(self, service: str, condition: str) -> _Observation:
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
            return _Observation(status in ("running", "exited") and state.get("StartedAt", "0001") > "0001", seen)
        if condition == "service_completed_successfully":
            if status in ("exited", "dead") and code != 0:
                raise StopWaiting(f"{service} exited with status {code}, not 0")
            return _Observation(status == "exited", seen)
        if status in ("exited", "dead"):
            raise StopWaiting(f"{service} exited (status {code}) before it was healthy")
        if not health and status == "running":
            if condition == HEALTHY_IF_CHECKED:
                return _Observation(True, seen)
            raise StopWaiting(f"{service} has no healthcheck (neither in the compose file nor in its image)")
        if health.get("Status") == "unhealthy":
            raise StopWaiting(f"{service} is unhealthy{last_check}")
        return _Observation(health.get("Status") == "healthy", seen)

    def _failure_logs(self, service: str) -> str:
        return f"--- logs of {service} (last {FAILURE_LOG_LINES} lines) ---\n" \
               f"{self.logs(service, tail=FAILURE_LOG_LINES).rstrip() or '(empty)'}"
