"""What a run owns on the engine: its labels, finding its resources, removing them, reaping.

Resources are found by label, never by name pattern, so removal cannot touch
anything that is not ours.  The labels follow docker-compose 1.29, so that
`docker-compose -p <project> ps/exec/down` work on a run the harness started
and `xenbed down` works on a run docker-compose started.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import docker
from docker.errors import APIError, NotFound

PROJECT = "com.docker.compose.project"
SERVICE = "com.docker.compose.service"
RUN = "xenbed.run"
OWNER = "xenbed.owner"
CREATED = "xenbed.created"
KEEP = "xenbed.keep"  # set on runs meant to outlive their owner (`xenbed up`, --keep-testbed)

COMPOSE_VERSION = "1.29.2"  # what docker-compose checks containers against; the installed one
STALE_AFTER_HOURS = 12.0


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_labels(project: str, *, keep: bool = False) -> dict[str, str]:
    """Labels every resource of a harness run carries."""
    labels = {PROJECT: project, RUN: project, OWNER: owner_id(), CREATED: str(int(time.time()))}
    if keep:
        labels[KEEP] = "true"
    return labels


def container_labels(project: str, service: str, compose_file: Path, *, keep: bool = False) -> dict[str, str]:
    return {
        **run_labels(project, keep=keep),
        SERVICE: service,
        "com.docker.compose.container-number": "1",
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.project.working_dir": str(compose_file.parent),
        "com.docker.compose.project.config_files": str(compose_file),
        "com.docker.compose.version": COMPOSE_VERSION,
    }


def network_labels(project: str, network: str, *, keep: bool = False) -> dict[str, str]:
    return {**run_labels(project, keep=keep), "com.docker.compose.network": network,
            "com.docker.compose.version": COMPOSE_VERSION}


def volume_labels(project: str, volume: str, *, keep: bool = False) -> dict[str, str]:
    return {**run_labels(project, keep=keep), "com.docker.compose.volume": volume,
            "com.docker.compose.version": COMPOSE_VERSION}


def connect(client: docker.DockerClient | None = None) -> docker.DockerClient:
    """A client that has answered a ping; the error says how to get an engine."""
    if client is not None:
        return client
    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception as error:  # the SDK raises several unrelated types here
        raise DockerUnavailable(
            f"no Docker engine reachable ({error}); run scripts/ensure-docker.sh, or use `make test`"
        ) from None


class DockerUnavailable(RuntimeError):
    pass


def project_resources(client: docker.DockerClient, label: str) -> tuple[list, list, list]:
    """Containers (also stopped ones), networks and volumes carrying `label` ("key=value")."""
    filters = {"label": label}
    return (client.containers.list(all=True, filters=filters),
            client.networks.list(filters=filters),
            client.volumes.list(filters=filters))


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    """Human-readable list of what is still on the engine for this run; empty when clean."""
    containers, networks, volumes = project_resources(client, f"{RUN}={project}")
    return ([f"container {c.name}" for c in containers] + [f"network {n.name}" for n in networks]
            + [f"volume {v.name}" for v in volumes])


def remove_project(client: docker.DockerClient, label: str, timeout: float = 10) -> list[str]:
    """Stop and remove every container, then network, then volume carrying `label`; idempotent.

    Containers stop in parallel: a PID 1 that ignores SIGTERM costs `timeout`
    once, not once per container.  Returns the names removed.
    """
    containers, _, _ = project_resources(client, label)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(containers)))) as pool:
        removed = list(pool.map(lambda c: _remove_container(c, timeout), containers))
    # list again: containers of the run created meanwhile would hold networks
    _, networks, volumes = project_resources(client, label)
    for network in networks:
        _ignore_missing(network.reload)
        for endpoint in (network.attrs.get("Containers") or {}):
            _ignore_missing(lambda: network.disconnect(endpoint, force=True))
        _ignore_missing(network.remove)
        removed.append(network.name)
    for volume in volumes:
        _ignore_missing(lambda: volume.remove(force=True))
        removed.append(volume.name)
    return removed


def _remove_container(container, timeout: float) -> str:
    if container.status in ("running", "paused", "restarting"):
        if container.status == "paused":
            _ignore_missing(container.unpause)
        _ignore_missing(lambda: container.stop(timeout=int(timeout)))
    _ignore_missing(lambda: container.remove(v=True, force=True))
    return container.name


def _ignore_missing(action) -> None:
    try:
        action()
    except NotFound:
        pass
    except APIError as error:
        # removal already in progress (another `down` racing us) is as good as done
        if "already in progress" not in str(error) and error.status_code != 409:
            raise


# --------------------------------------------------------------------------- reaping

def reap_stale_runs(client: docker.DockerClient | None = None, *,
                    stale_after_hours: float = STALE_AFTER_HOURS) -> list[str]:
    """Remove the resources of harness runs whose owner is gone; return their project names.

    A run is stale when its owner process ran on this host and is no longer
    alive, or when it is older than `stale_after_hours` and its owner cannot be
    checked (another host).  Runs labelled `xenbed.keep` are left alone: they
    were meant to outlive their owner and are removed with `xenbed down`.
    """
    client = connect(client)
    runs: dict[str, list[dict[str, str]]] = {}
    for group in project_resources(client, RUN):
        for resource in group:
            labels = resource.attrs.get("Labels") or resource.attrs.get("Config", {}).get("Labels") or {}
            runs.setdefault(labels[RUN], []).append(labels)
    stale = [project for project, labels in runs.items() if _is_stale(labels, stale_after_hours)]
    for project in stale:
        remove_project(client, f"{RUN}={project}", timeout=2)
    return stale


def _is_stale(all_labels: Iterable[dict[str, str]], stale_after_hours: float) -> bool:
    hostname = socket.gethostname()
    for labels in all_labels:
        if labels.get(KEEP) == "true":
            return False
        host, _, pid = labels.get(OWNER, "").rpartition(":")
        if host == hostname and pid.isdigit():
            if _pid_alive(int(pid)):
                return False
            continue
        age_hours = (time.time() - float(labels.get(CREATED, "0") or 0)) / 3600
        if age_hours < stale_after_hours:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True
