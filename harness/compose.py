"""Load a compose file (format 2.x) into plain dataclasses, strictly.

The harness runs compose files itself through the docker SDK, so it must
understand every key it is given: a key it does not know is an error naming
the file, the service and the key, never something silently ignored (a typo in
`cap_add` would otherwise surface an hour later as a mysterious EPERM).
Keys starting with `x-` are compose extension fields and are allowed anywhere.

Nothing here touches Docker; `Project.start_order()` is the dependency order.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .interpolation import InterpolationError, interpolate_tree, read_dotenv

CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


class ComposeError(ValueError):
    """The compose file is not one the harness can run; the message says where and why."""


@dataclass(frozen=True)
class Healthcheck:
    test: tuple[str, ...]          # ("CMD", ...), ("CMD-SHELL", "..."), or ("NONE",)
    interval: float | None = None  # seconds
    timeout: float | None = None
    retries: int | None = None
    start_period: float | None = None


@dataclass(frozen=True)
class Mount:
    type: str                      # "volume", "bind" or "tmpfs"
    target: str
    source: str | None = None      # volume name (as in the file), absolute host path, or None
    read_only: bool = False


@dataclass(frozen=True)
class NetworkAttachment:
    aliases: tuple[str, ...] = ()
    ipv4_address: str | None = None


@dataclass(frozen=True)
class IpamPool:
    subnet: str | None = None
    ip_range: str | None = None
    gateway: str | None = None


@dataclass(frozen=True)
class Network:
    name: str
    driver: str | None = None
    driver_opts: dict[str, str] = field(default_factory=dict)
    ipam_driver: str | None = None
    ipam_pools: tuple[IpamPool, ...] = ()
    internal: bool = False
    attachable: bool = False
    enable_ipv6: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Volume:
    name: str
    driver: str | None = None
    driver_opts: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Service:
    name: str
    image: str | None = None
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    networks: dict[str, NetworkAttachment] = field(default_factory=dict)
    network_mode: str | None = None          # "none", "host", "bridge", "service:<name>", "container:<id>"
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()            # normalised to "host:container:perms"
    device_cgroup_rules: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    sysctls: dict[str, str] = field(default_factory=dict)
    healthcheck: Healthcheck | None = None
    depends_on: dict[str, str] = field(default_factory=dict)  # service -> condition
    init: bool | None = None
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str | None = None
    stop_grace_period: float | None = None   # seconds
    tmpfs: tuple[str, ...] = ()
    working_dir: str | None = None
    hostname: str | None = None
    user: str | None = None
    restart: str | None = None
    build: Any = None                        # recorded only: the harness never builds images

    def dependencies(self) -> list[str]:
        """Services that must exist first: depends_on plus a `network_mode: service:X`."""
        names = list(self.depends_on)
        if self.network_mode and self.network_mode.startswith("service:"):
            shared = self.network_mode.split(":", 1)[1]
            if shared not in names:
                names.append(shared)
        return names


@dataclass(frozen=True)
class Project:
    path: Path                 # the compose file, absolute
    services: dict[str, Service]
    networks: dict[str, Network]
    volumes: dict[str, Volume]
    version: str | None = None

    @property
    def working_dir(self) -> Path:
        return self.path.parent

    def start_order(self) -> list[str]:
        return dependency_order({name: s.dependencies() for name, s in self.services.items()})


def dependency_order(graph: Mapping[str, list[str]]) -> list[str]:
    """Topological order (dependencies first), stable in file order; a cycle is a ComposeError."""
    order: list[str] = []
    state: dict[str, str] = {}  # "visiting" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise ComposeError(f"dependency cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for dependency in graph[name]:
            visit(dependency, path + [name])
        state[name] = "done"
        order.append(name)

    for name in graph:
        visit(name, [])
    return order


# --------------------------------------------------------------------------- loading

def load_project(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Project:
    """Read, interpolate and validate a compose file.

    Variables come from `.env` at the repository root, then `.env` beside the
    compose file, then `environ` (the process environment by default), each
    overriding the one before, as the shell overrides `.env` in compose.
    """
    path = Path(path).resolve()
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ComposeError(f"{path}: no such compose file") from None
    except yaml.YAMLError as error:
        raise ComposeError(f"{path}: not valid YAML: {error}") from None
    variables = _variables(path, os.environ if environ is None else environ)
    try:
        document = interpolate_tree(document, variables)
    except InterpolationError as error:
        raise ComposeError(f"{path}: {error}") from None
    return _Parser(path, variables).project(document)


def _variables(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    variables: dict[str, str] = {}
    root = _repository_root(path.parent)
    if root is not None and root != path.parent:
        variables.update(read_dotenv(root / ".env"))
    variables.update(read_dotenv(path.parent / ".env"))
    variables.update(environ)
    return variables


def _repository_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Compose durations ("1m30s", "500ms", "10s", or a number of seconds) in seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if not text or _DURATION.sub("", text):
        raise ValueError(f"not a duration: {value!r} (use e.g. 10s, 1m30s, 500ms)")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION.findall(text))


def normalise_device(spec: str) -> str:
    """`/dev/fuse` -> `/dev/fuse:/dev/fuse:rwm`, as `docker run --device` reads it."""
    parts = spec.split(":")
    if len(parts) == 1:
        return f"{parts[0]}:{parts[0]}:rwm"
    if len(parts) == 2:
        if set(parts[1]) <= set("rwm"):  # "/dev/x:rw" is path + permissions
            return f"{parts[0]}:{parts[0]}:{parts[1]}"
        return f"{parts[0]}:{parts[1]}:rwm"
    return spec


class _Parser:
    """One pass over the interpolated document; every error says file, service and key."""

    def __init__(self, path: Path, variables: Mapping[str, str]):
        self.path = path
        self.variables = variables

    def fail(self, where: str, message: str) -> ComposeError:
        return ComposeError(f"{self.path}: {where}: {message}")

    def check_keys(self, mapping: Any, allowed: Mapping[str, Any] | set, where: str) -> dict:
        if not isinstance(mapping, dict):
            raise self.fail(where, f"expected a mapping, got {type(mapping).__name__}")
        for key in mapping:
            if isinstance(key, str) and key.startswith("x-"):
                continue
            if key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise self.fail(where, f"unknown key '{key}'{hint}")
        return {k: v for k, v in mapping.items() if not (isinstance(k, str) and k.startswith("x-"))}

    # -- top level

    def project(self, document: Any) -> Project:
        if document is None:
            raise self.fail("file", "is empty")
        top = self.check_keys(document, {"version", "services", "networks", "volumes"}, "top level")
        if not isinstance(top.get("services"), dict) or not top["services"]:
            raise self.fail("top level", "'services' must be a non-empty mapping")
        volumes = {name: self.volume(name, spec) for name, spec in (top.get("volumes") or {}).items()}
        networks = {name: self.network(name, spec) for name, spec in (top.get("networks") or {}).items()}
        services = {name: self.service(name, spec or {}) for name, spec in top["services"].items()}
        self.check_references(services, networks, volumes)
        if any("default" in s.networks for s in services.values()) and "default" not in networks:
            networks["default"] = Network(name="default")  # compose's implicit network
        project = Project(self.path, services, networks, volumes, str(top["version"]) if "version" in top else None)
        try:
            project.start_order()
        except ComposeError as error:
            raise self.fail("services", str(error)) from None
        return project

    def volume(self, name: str, spec: Any) -> Volume:
        where = f"volume '{name}'"
        spec = self.check_keys(spec or {}, {"driver", "driver_opts", "labels"}, where)
        return Volume(name, spec.get("driver"), self.string_map(spec.get("driver_opts"), where),
                      self.string_map(spec.get("labels"), where))

    def network(self, name: str, spec: Any) -> Network:
        where = f"network '{name}'"
        spec = self.check_keys(spec or {}, {"driver", "driver_opts", "ipam", "internal", "attachable",
                                            "enable_ipv6", "labels"}, where)
        ipam = self.check_keys(spec.get("ipam") or {}, {"driver", "config"}, f"{where} ipam")
        pools = []
        for index, pool in enumerate(ipam.get("config") or []):
            pool = self.check_keys(pool, {"subnet", "ip_range", "gateway"}, f"{where} ipam config[{index}]")
            pools.append(IpamPool(pool.get("subnet"), pool.get("ip_range"), pool.get("gateway")))
        return Network(name, spec.get("driver"), self.string_map(spec.get("driver_opts"), where),
                       ipam.get("driver"), tuple(pools), bool(spec.get("internal", False)),
                       bool(spec.get("attachable", False)), bool(spec.get("enable_ipv6", False)),
                       self.string_map(spec.get("labels"), where))

    # -- services

    def service(self, name: str, spec: Any) -> Service:
        where = f"service '{name}'"
        spec = self.check_keys(spec, _SERVICE_KEYS, where)
        values: dict[str, Any] = {}
        for key, value in spec.items():
            try:
                values[key] = _SERVICE_KEYS[key](self, value, where)
            except ComposeError:
                raise
            except (ValueError, TypeError, AttributeError) as error:
                raise self.fail(f"{where} key '{key}'", str(error)) from None
        if not values.get("image") and "build" not in values:
            raise self.fail(where, "needs an 'image'")
        if "networks" in values and "network_mode" in values:
            raise self.fail(where, "'networks' and 'network_mode' cannot be used together")
        if "network_mode" not in values and not values.get("networks"):
            values["networks"] = {"default": NetworkAttachment()}
        if "volumes" in values:
            values["mounts"] = values.pop("volumes")
        return Service(name=name, **values)

    def check_references(self, services: dict[str, Service], networks: dict, volumes: dict) -> None:
        for service in services.values():
            where = f"service '{service.name}'"
            for dependency, condition in service.depends_on.items():
                if dependency not in services:
                    raise self.fail(where, f"depends_on names unknown service '{dependency}'")
                # A missing healthcheck may come from the image (docker-compose
                # allows that too); only one switched off here can never pass.
                check = services[dependency].healthcheck
                if condition == "service_healthy" and check is not None and check.test == ("NONE",):
                    raise self.fail(where, f"waits for '{dependency}' to be healthy, "
                                           f"but '{dependency}' has its healthcheck disabled")
            mode = service.network_mode or ""
            if mode.startswith("service:") and mode.split(":", 1)[1] not in services:
                raise self.fail(where, f"network_mode names unknown service '{mode.split(':', 1)[1]}'")
            for network in service.networks:
                if network != "default" and network not in networks:
                    raise self.fail(where, f"uses network '{network}', not declared under top-level 'networks'")
            for mount in service.mounts:
                if mount.type == "volume" and mount.source and mount.source not in volumes:
                    raise self.fail(where, f"uses volume '{mount.source}', not declared under top-level 'volumes'")

    # -- value parsers, one per service key (see _SERVICE_KEYS)

    def string(self, value: Any, where: str) -> str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return str(value)

    def strings(self, value: Any, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings, got {type(value).__name__}")
        return tuple(str(item) for item in value)

    def command(self, value: Any, where: str) -> tuple[str, ...]:
        # compose splits a string command like a shell would, without running one
        return tuple(shlex.split(value)) if isinstance(value, str) else self.strings(value, where)

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    def string_map(self, value: Any, where: str) -> dict[str, str]:
        """A `KEY: value` mapping or a `KEY=value` list (labels, sysctls, driver_opts)."""
        if value is None:
            return {}
        if isinstance(value, list):
            pairs = [str(item).partition("=") for item in value]
            return {key: val for key, _, val in pairs}
        if isinstance(value, dict):
            return {str(key): "" if val is None else _scalar(val) for key, val in value.items()}
        raise ValueError(f"expected a mapping or a list of KEY=value, got {type(value).__name__}")

    def environment(self, value: Any, where: str) -> dict[str, str]:
        """As compose: a name without a value takes the host's value, or is left out if unset."""
        if isinstance(value, list):
            items = [(key, val if sep else None) for key, sep, val in (str(i).partition("=") for i in value)]
        elif isinstance(value, dict):
            items = [(str(key), None if val is None else _scalar(val)) for key, val in value.items()]
        else:
            raise ValueError(f"expected a mapping or a list of KEY=value, got {type(value).__name__}")
        result = {}
        for key, val in items:
            if val is None:
                val = self.variables.get(key)
            if val is not None:
                result[key] = val
        return result

    def devices(self, value: Any, where: str) -> tuple[str, ...]:
        return tuple(normalise_device(device) for device in self.strings(value, where))

    def duration(self, value: Any, where: str) -> float:
        return parse_duration(value)

    def healthcheck(self, value: Any, where: str) -> Healthcheck | None:
        spec = self.check_keys(value, {"test", "interval", "timeout", "retries", "start_period", "disable"},
                               f"{where} healthcheck")
        if spec.get("disable"):
            return Healthcheck(("NONE",))
        test = spec.get("test")
        if isinstance(test, str):
            test = ("CMD-SHELL", test)
        elif isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL", "NONE"):
            test = tuple(str(part) for part in test)
        else:
            raise ValueError("healthcheck 'test' must be a string or a list starting with CMD, CMD-SHELL or NONE")
        durations = {key: parse_duration(spec[key]) for key in ("interval", "timeout", "start_period") if key in spec}
        retries = spec.get("retries")
        return Healthcheck(test, retries=None if retries is None else int(retries), **durations)

    def depends_on(self, value: Any, where: str) -> dict[str, str]:
        if isinstance(value, list):
            return {str(name): "service_started" for name in value}
        if not isinstance(value, dict):
            raise ValueError("expected a list of services or a mapping service -> {condition: ...}")
        result = {}
        for name, spec in value.items():
            spec = self.check_keys(spec or {}, {"condition"}, f"{where} depends_on '{name}'")
            condition = spec.get("condition", "service_started")
            if condition not in CONDITIONS:
                raise ValueError(f"depends_on '{name}': condition must be one of {', '.join(CONDITIONS)}")
            result[str(name)] = condition
        return result

    def networks(self, value: Any, where: str) -> dict[str, NetworkAttachment]:
        if isinstance(value, list):
            return {str(name): NetworkAttachment() for name in value}
        if not isinstance(value, dict):
            raise ValueError("expected a list of networks or a mapping")
        result = {}
        for name, spec in value.items():
            spec = self.check_keys(spec or {}, {"aliases", "ipv4_address"}, f"{where} network '{name}'")
            result[str(name)] = NetworkAttachment(tuple(spec.get("aliases") or ()), spec.get("ipv4_address"))
        return result

    def network_mode(self, value: Any, where: str) -> str:
        mode = str(value)
        if mode not in ("none", "host", "bridge") and not mode.startswith(("service:", "container:")):
            raise ValueError(f"unsupported network_mode {mode!r} (none, host, bridge, service:X, container:X)")
        return mode

    def volumes(self, value: Any, where: str) -> tuple[Mount, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list of volumes")
        return tuple(self.mount(item, f"{where} volumes[{index}]") for index, item in enumerate(value))

    def mount(self, item: Any, where: str) -> Mount:
        if isinstance(item, dict):
            spec = self.check_keys(item, {"type", "source", "target", "read_only", "volume", "bind", "tmpfs"}, where)
            kind = spec.get("type", "volume")
            if kind not in ("volume", "bind", "tmpfs") or "target" not in spec:
                raise self.fail(where, "needs 'target' and a type of volume, bind or tmpfs")
            source = spec.get("source")
            if kind == "bind":
                source = self.host_path(str(source))
            return Mount(kind, str(spec["target"]), source, bool(spec.get("read_only", False)))
        parts = str(item).split(":")
        if len(parts) == 1:
            return Mount("volume", parts[0])  # anonymous volume
        if len(parts) > 3:
            raise self.fail(where, f"cannot read {item!r} (expected SOURCE:TARGET[:MODE])")
        source, target = parts[0], parts[1]
        modes = set(parts[2].split(",")) if len(parts) == 3 else set()
        if source.startswith(("/", ".", "~")):
            return Mount("bind", target, self.host_path(source), "ro" in modes)
        return Mount("volume", target, source, "ro" in modes)

    def host_path(self, source: str) -> str:
        # relative binds are relative to the compose file's folder, as in compose
        return str((self.path.parent / Path(source).expanduser()).resolve())


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # YAML `true` must reach the container as compose writes it
    return str(value)


_ParserFn = Callable[[_Parser, Any, str], Any]
_SERVICE_KEYS: dict[str, _ParserFn] = {
    "image": _Parser.string,
    "build": lambda parser, value, where: value,
    "command": _Parser.command,
    "entrypoint": _Parser.command,
    "environment": _Parser.environment,
    "volumes": _Parser.volumes,
    "networks": _Parser.networks,
    "network_mode": _Parser.network_mode,
    "cap_add": _Parser.strings,
    "cap_drop": _Parser.strings,
    "devices": _Parser.devices,
    "device_cgroup_rules": _Parser.strings,
    "security_opt": _Parser.strings,
    "sysctls": _Parser.string_map,
    "healthcheck": _Parser.healthcheck,
    "depends_on": _Parser.depends_on,
    "init": _Parser.boolean,
    "labels": _Parser.string_map,
    "stop_signal": _Parser.string,
    "stop_grace_period": _Parser.duration,
    "tmpfs": _Parser.strings,
    "working_dir": _Parser.string,
    "hostname": _Parser.string,
    "user": _Parser.string,
    # YAML 1.1 reads an unquoted `no` as false
    "restart": lambda parser, value, where: "no" if value is False else parser.string(value, where),
}
