"""Which containers make up which Xen host of a run; pure, no Docker.

A *Xen host* here is one machine as Xen sees it: a hypervisor, its dom0 and
the domains they run.  (The harness calls a pytest-testinfra handle on a
container a *shell*, `Testbed.shell`, so the two never share a name.)

A compose file may hold several independent Xen hosts (compose/two-hosts.yml:
host-a and host-b, each with its own hypervisor-service, dom0, xenbus socket
and guest memory).  Everything the harness does "in dom0" -- `xl`, reading the
store, the hypervisor's audit and trace -- must then go to the right host's
dom0 or hypervisor, since domids, store paths and even domain names mean
something only within one host.

How a service says where it belongs, as container labels (so that a run
found by its labels alone, e.g. by `xenbed status`, is understood too):

    org.xenbed.host: host-a        the Xen host the service belongs to
    org.xenbed.role: dom0          "hypervisor" or "dom0" for the host's two
                                   pillars; anything else (or nothing) for
                                   its domains, peers, ...

A topology with no such labels -- the default compose/testbed.yml -- is one
host, `DEFAULT_XEN_HOST`, whose pillars are the services named exactly
`hypervisor` and `dom0`.  In a topology with several hosts an unlabelled
service (the peer machine on the uplink) belongs to none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

XEN_HOST_LABEL = "org.xenbed.host"
ROLE_LABEL = "org.xenbed.role"
HYPERVISOR, DOM0 = "hypervisor", "dom0"
DEFAULT_XEN_HOST = "host"


class XenHostError(LookupError):
    """No such host, or a question that needs a host when the run has several."""


@dataclass(frozen=True)
class XenHost:
    name: str
    hypervisor: str | None  # the hypervisor-service's service name
    dom0: str | None        # dom0's service name
    members: tuple[str, ...]  # every service of the host, its pillars included

    def __contains__(self, service: str) -> bool:
        return service in self.members


def role_of(service: str, labels: Mapping[str, str]) -> str | None:
    """"hypervisor", "dom0" or None; unlabelled services by their name."""
    role = labels.get(ROLE_LABEL)
    if role:
        return role
    return service if service in (HYPERVISOR, DOM0) else None


def find_xen_hosts(labels_by_service: Mapping[str, Mapping[str, str]]) -> dict[str, XenHost]:
    """{Xen host name: XenHost} of a run whose services carry these labels (see the module doc)."""
    named = {labels.get(XEN_HOST_LABEL) for labels in labels_by_service.values()} - {None, ""}
    members: dict[str, list[str]] = {name: [] for name in sorted(named)}
    if not members:
        members[DEFAULT_XEN_HOST] = []
    for service, labels in labels_by_service.items():
        host = labels.get(XEN_HOST_LABEL) or (DEFAULT_XEN_HOST if not named else None)
        if host is not None:
            members[host].append(service)
    hosts = {}
    for name, services in members.items():
        pillars = {role: [s for s in services if role_of(s, labels_by_service[s]) == role]
                   for role in (HYPERVISOR, DOM0)}
        for role, found in pillars.items():
            if len(found) > 1:
                raise XenHostError(f"host {name} has several {role} services: {', '.join(found)}")
        if not services:
            continue
        hosts[name] = XenHost(name, (pillars[HYPERVISOR] or [None])[0], (pillars[DOM0] or [None])[0], tuple(services))
    return hosts


def resolve_xen_host(hosts: Mapping[str, XenHost], which: str | None = None) -> XenHost:
    """The host `which` names -- a host name, or any of its services (its
    dom0, its hypervisor, one of its guests) -- or, for None, the run's only
    host.  XenHostError saying what there is otherwise."""
    with_dom0 = [h for h in hosts.values() if h.dom0 or h.hypervisor]
    if which is None:
        if len(with_dom0) == 1:
            return with_dom0[0]
        raise XenHostError(f"this run has {len(with_dom0)} Xen hosts ({describe_xen_hosts(hosts)}): say which")
    if which in hosts:
        return hosts[which]
    for host in hosts.values():
        if which in host.members:
            return host
    raise XenHostError(f"{which!r} is neither a host nor a service of one ({describe_xen_hosts(hosts)})")


def describe_xen_hosts(hosts: Mapping[str, XenHost]) -> str:
    return "; ".join(f"{h.name}: dom0 {h.dom0 or '-'}, hypervisor {h.hypervisor or '-'}"
                     for h in hosts.values()) or "none"
