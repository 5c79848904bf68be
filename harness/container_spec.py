"""Translate compose dataclasses into docker SDK (low-level API) arguments; pure, no I/O.

Kept apart from `testbed.py` so the translation is unit-tested without an
engine, and so the one place that knows Docker's argument names is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .compose import Healthcheck, Network, Project, Service, Volume
from .resources import container_labels, network_labels, volume_labels

NANOSECONDS = 1_000_000_000


def container_name(project: str, service: str) -> str:
    return f"{project}_{service}_1"  # docker-compose 1.x naming


def network_name(project: str, network: str) -> str:
    return f"{project}_{network}"


def volume_name(project: str, volume: str) -> str:
    return f"{project}_{volume}"


@dataclass
class ContainerSpec:
    """Everything needed to create one service's container; `create` and `host_config` are SDK kwargs."""
    name: str
    create: dict[str, Any]
    host_config: dict[str, Any]
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine network name -> endpoint kwargs
    shares_network_of: str | None = None  # service whose container's network namespace we join


def healthcheck_kwargs(check: Healthcheck) -> dict[str, Any]:
    """The SDK wants durations in nanoseconds; unset values are left to the engine's defaults."""
    result: dict[str, Any] = {"test": list(check.test)}
    for key in ("interval", "timeout", "start_period"):
        seconds = getattr(check, key)
        if seconds is not None:
            result[key] = int(seconds * NANOSECONDS)
    if check.retries is not None:
        result["retries"] = check.retries
    return result


def container_spec(project_name: str, project: Project, service: Service, *, keep: bool = False) -> ContainerSpec:
    labels = {**service.labels, **container_labels(project_name, service.name, project.path, keep=keep)}
    create: dict[str, Any] = {
        "image": service.image,
        "name": container_name(project_name, service.name),
        "labels": labels,
        "detach": True,
    }
    optional = {
        "command": list(service.command) if service.command is not None else None,
        "entrypoint": list(service.entrypoint) if service.entrypoint is not None else None,
        "environment": dict(service.environment) or None,
        "hostname": service.hostname,
        "user": service.user,
        "working_dir": service.working_dir,
        "stop_signal": service.stop_signal,
        "stop_timeout": int(service.stop_grace_period) if service.stop_grace_period is not None else None,
        "healthcheck": healthcheck_kwargs(service.healthcheck) if service.healthcheck else None,
    }
    create.update({key: value for key, value in optional.items() if value is not None})

    binds = [f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in service.mounts if m.type == "bind"]
    volume_mounts = [
        {"Type": m.type, "Target": m.target, "ReadOnly": m.read_only,
         **({"Source": volume_name(project_name, m.source)} if m.type == "volume" and m.source else {})}
        for m in service.mounts if m.type != "bind"
    ]
    host_config: dict[str, Any] = {
        "binds": binds or None,
        "mounts": volume_mounts or None,
        "cap_add": list(service.cap_add) or None,
        "cap_drop": list(service.cap_drop) or None,
        "devices": list(service.devices) or None,
        "device_cgroup_rules": list(service.device_cgroup_rules) or None,
        "security_opt": list(service.security_opt) or None,
        "sysctls": dict(service.sysctls) or None,
        "tmpfs": list(service.tmpfs) or None,
        "init": service.init,
        "restart_policy": {"Name": service.restart} if service.restart and service.restart != "no" else None,
    }
    host_config = {key: value for key, value in host_config.items() if value is not None}

    spec = ContainerSpec(create["name"], create, host_config)
    mode = service.network_mode
    if mode and mode.startswith("service:"):
        spec.shares_network_of = mode.split(":", 1)[1]  # resolved to container:<id> at creation
    elif mode:
        host_config["network_mode"] = mode
    else:
        for network, attachment in service.networks.items():
            # compose makes every service reachable by its name on each of its networks
            endpoint: dict[str, Any] = {"aliases": [service.name, *attachment.aliases]}
            if attachment.ipv4_address:
                endpoint["ipv4_address"] = attachment.ipv4_address
            spec.networks[network_name(project_name, network)] = endpoint
        host_config["network_mode"] = next(iter(spec.networks), None) or "none"
    return spec


def network_kwargs(project_name: str, network: Network, *, keep: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "name": network_name(project_name, network.name),
        "driver": network.driver or "bridge",
        "labels": {**network.labels, **network_labels(project_name, network.name, keep=keep)},
        "internal": network.internal,
        "attachable": network.attachable,
        "enable_ipv6": network.enable_ipv6,
        "check_duplicate": True,
    }
    if network.driver_opts:
        kwargs["options"] = dict(network.driver_opts)
    if network.ipam_pools or network.ipam_driver:
        kwargs["ipam"] = {
            "Driver": network.ipam_driver or "default",
            "Config": [{key: value for key, value in
                        (("Subnet", p.subnet), ("IPRange", p.ip_range), ("Gateway", p.gateway)) if value}
                       for p in network.ipam_pools],
        }
    return kwargs


def volume_kwargs(project_name: str, volume: Volume, *, keep: bool = False) -> dict[str, Any]:
    return {
        "name": volume_name(project_name, volume.name),
        "driver": volume.driver or "local",
        "driver_opts": dict(volume.driver_opts) or None,
        "labels": {**volume.labels, **volume_labels(project_name, volume.name, keep=keep)},
    }
