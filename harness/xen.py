"""The Xen view of a testbed: its Xen hosts, their dom0s and hypervisors, the
domains they run and those domains' devices.

A `Testbed` (testbed.py) runs containers and knows nothing of Xen; `Xen`
reads which of them are which Xen host's pillars (xen_hosts.py, from the
services' labels) and goes through the right dom0 for everything a person
would do there: `xl`, the store, the hypervisor's audit.

    xen = Xen(testbed)                      # or the `xen` fixture
    xen.dom0("domu2"), xen.hypervisor("host-a")   # "dom0-b", "hypervisor-a" in compose/two-hosts.yml
    guest = xen.domain("domu1")             # a Domain (domains.py), xl in its host's dom0
    xen.domain("domu1", xen_host="dom0-b")  # the one dom0-b's toolstack knows, e.g. after a migration
    domid = xen.create_domain("scratch", memory_mb=16)   # xl create + a container for it
    xen.destroy_domain("scratch")
    xen.audit()                             # what dead domains left behind, per host
    xen.wait_devices_connected()            # every PV device Connected at both ends

The dependencies go one way: xen -> domains, xen_hosts, waits; neither the
Testbed nor the Domain handles import this module (a Domain holds its `Xen`).
"""

from __future__ import annotations

import json
from typing import Callable

from xenbed.protocols.xenbus_state import XenbusState

from .domains import Domain, devices_in, parse_xenstore_ls
from .waits import Observation, wait_for
from .xen_hosts import XenHost, XenHostError, find_xen_hosts, resolve_xen_host

DOMAIN_0 = "Domain-0"
_AUDIT_SCRIPT = ("import json\n"
                 "from xenbed.drivers.xen.hypercall import HypervisorLink\n"
                 "from xenbed.protocols import hypercall as hc\n"
                 "print(json.dumps(HypervisorLink.open(role='device').call(hc.Call.AUDIT)))\n")


class Xen:
    """The Xen hosts of `testbed` and what runs on them (see the module doc).
    Holds nothing but the testbed: make one wherever it is needed."""

    def __init__(self, testbed) -> None:
        self.testbed = testbed

    def __repr__(self) -> str:
        return f"<Xen view of {self.testbed.project_name}>"

    # ------------------------------------------------------------------ Xen hosts

    def xen_hosts(self) -> dict[str, XenHost]:
        """The run's Xen hosts: one, "host", for the default topology;
        host-a and host-b for compose/two-hosts.yml."""
        return find_xen_hosts(self.testbed.service_labels())

    def xen_host(self, which: str | None = None) -> XenHost:
        """The Xen host `which` names (a host name or any of its services), or the only one."""
        return resolve_xen_host(self.xen_hosts(), which)

    def dom0(self, which: str | None = None) -> str:
        """The service name of the dom0 of Xen host `which` (see xen_host):
        "dom0", or "dom0-a" / "dom0-b" in compose/two-hosts.yml."""
        xen_host = self.xen_host(which)
        if xen_host.dom0 is None:
            raise XenHostError(f"host {xen_host.name} has no dom0 service")
        return xen_host.dom0

    def hypervisor(self, which: str | None = None) -> str:
        """The service name of the hypervisor of Xen host `which` (see xen_host)."""
        xen_host = self.xen_host(which)
        if xen_host.hypervisor is None:
            raise XenHostError(f"host {xen_host.name} has no hypervisor service")
        return xen_host.hypervisor

    def _dom0_of_domain(self, name: str, xen_host: str | None) -> str:
        """The dom0 whose toolstack knows domain `name`: that of `xen_host`,
        else of the host the service `name` belongs to, else of the only host."""
        if xen_host is None and any(name in h for h in self.xen_hosts().values()):
            xen_host = name
        return self.dom0(xen_host)

    # ------------------------------------------------------------------ domains

    def domain(self, name: str, xen_host: str | None = None) -> Domain:
        """A handle to drive domain `name` through the toolstack and read its
        devices (domains.py); "dom0" (or a host's dom0 service, e.g.
        "dom0-b") is that host's Domain-0.  `xen_host` names the Xen host
        whose toolstack knows the domain -- a host name or one of its
        services, e.g. `xen.domain("domu1", xen_host="dom0-b")` after a
        migration -- by default the host the service `name` belongs to (or
        the only one)."""
        dom0_services = {h.dom0 for h in self.xen_hosts().values()} - {None}
        if name in ("dom0", DOMAIN_0) or name in dom0_services:
            which = xen_host if xen_host is not None else (name if name in dom0_services else None)
            return Domain(self, DOMAIN_0, dom0=self.dom0(which))
        return Domain(self, name, dom0=self._dom0_of_domain(name, xen_host))

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
        dom0 = self.dom0(template)
        config = f'name = "{name}"\nmemory = {memory_mb}\n'
        created = self.testbed.exec(dom0, ["sh", "-c", f"cat > /tmp/{name}.cfg <<'EOF'\n{config}EOF\n"
                                                       f"xl create --print-credential /tmp/{name}.cfg"], check=True)
        credential = created.stdout.strip().splitlines()[-1]
        self.testbed.add_service(name, template, {**(environment or {}), "XENBED_DOMAIN_NAME": name,
                                                  "XENBED_CREDENTIAL": credential},
                                 timeout=timeout, progress=progress)
        return int(self.testbed.exec(dom0, ["xl", "domid", name], check=True).stdout.strip())

    def destroy_domain(self, name: str, xen_host: str | None = None) -> None:
        """`xl destroy` in dom0 (of `xen_host`, by default the domain's
        service's), then the domain's container goes."""
        self.testbed.exec(self._dom0_of_domain(name, xen_host), ["xl", "destroy", name], check=True)
        self.testbed.remove_service(name)

    # ------------------------------------------------------------------ the store and the hypervisor

    def store_tree(self, root: str = "/local/domain", xen_host: str | None = None) -> dict[str, str]:
        """The store under `root`, as the dom0 of `xen_host` (a host name or
        one of its services; by default the run's only host) sees it: every
        Xen host has a store of its own."""
        result = self.testbed.exec(self.dom0(xen_host), ["xenstore-ls", "-f", root], check=True)
        return parse_xenstore_ls(result.stdout)

    def _hosts_with_dom0(self) -> list[XenHost]:
        return [h for h in self.xen_hosts().values() if h.dom0 is not None]

    def audit(self, xen_host: str | None = None) -> dict:
        """The hypervisor's report of what dead domains left behind (grant
        mappings of their pages, ports offered to them, their store nodes,
        domains dying and never destroyed), asked from dom0.  Without
        `xen_host`, of every Xen host of the run; with several, each finding
        says its host."""
        hosts = [self.xen_host(xen_host)] if xen_host is not None else self._hosts_with_dom0()
        reports = {}
        for each in hosts:
            result = self.testbed.exec(each.dom0, ["python3", "-c", _AUDIT_SCRIPT], check=True)
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

    def wait_devices_connected(self, timeout: float = 60,
                               progress: Callable[[str], None] = lambda line: None) -> None:
        """Until every PV device in every Xen host's store is Connected at
        both ends: containers are healthy before their guests' devices have
        finished connecting, and a test should not start in between.  The
        timeout names each device that is not, with its states."""
        hosts = [h.name for h in self._hosts_with_dom0()]

        def pending() -> list[str]:
            waiting = []
            for xen_host in hosts:
                for d in devices_in(self.store_tree(xen_host=xen_host)):
                    if (d.frontend_state, d.backend_state) != (XenbusState.Connected, XenbusState.Connected):
                        waiting.append(f"{xen_host}: dom{d.domid} {d.kind} {d.devid} "
                                       f"{d.frontend_state.name}/{d.backend_state.name}")
            return waiting

        wait_for(lambda: Observation(not (left := pending()), ", ".join(left) or "all Connected"),
                 what="every PV device Connected at both ends", timeout=timeout, progress=progress)
