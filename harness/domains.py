"""Domains and their PV devices, seen from the host: what a test asks about.

A test talks to the toolstack the way a person does, through `xl` in dom0,
and reads the truth from the store, through `xenstore-ls` in dom0 (one exec
for the whole tree, so a status table or a wait costs one round trip).

    guest = Xen(testbed).domain("domu1")                   # xen.py; `domains["domu1"]` in a test
    guest.pause(); guest.unpause()
    disk = guest.block_attach("format=raw, vdev=xvdb, access=rw, target=/var/lib/xen/images/b.img")
    disk.wait(frontend="Connected", backend="Connected")   # a timeout names the device and every state seen
    disk.states()                                          # (XenbusState, XenbusState)
    guest.block_detach("xvdb")
    guest.devices()                                        # [Device(...), ...]
    guest.shell                                            # a pytest-testinfra host for files, processes, sockets

Pure parts (no Docker): `parse_xenstore_ls`, `devices_in`, `render_devices_table`.
A Domain reaches the testbed through the `Xen` view it was made by (duck
typed: this module imports neither xen.py nor testbed.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from xenbed.protocols.xenbus_state import XenbusState

from .waits import wait_for

_LS_LINE = re.compile(r'^(/\S*) = "(.*)"(?:\s+\(.*\))?$')
_FRONTEND_DIR = re.compile(r"^/local/domain/(\d+)/device/([^/]+)/([^/]+)$")


# -- pure: the store as xenstore-ls -f prints it ---------------------------------------------
def parse_xenstore_ls(text: str) -> dict[str, str]:
    """`xenstore-ls -f` output -> {path: value}.  Values are printed with C
    escapes (\\n, \\\\, \\xNN) for unprintable bytes; they are decoded here."""
    tree: dict[str, str] = {}
    for line in text.splitlines():
        match = _LS_LINE.match(line)
        if match:
            tree[match.group(1)] = _unescape(match.group(2))
    return tree


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    try:
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return value


@dataclass(frozen=True)
class DeviceView:
    """One PV device as the store shows it at one moment."""

    domid: int
    kind: str  # "vbd", "vif", ...
    devid: str
    frontend: str  # path of the frontend dir
    backend: str  # path of the backend dir ("" if the frontend names none)
    frontend_state: XenbusState
    backend_state: XenbusState
    detail: str  # what a person wants to see: vdev and target for a disk, mac and bridge for a vif

    @property
    def name(self) -> str:
        return f"{self.kind} {self.detail.split()[0]}" if self.kind == "vbd" and self.detail else f"{self.kind} {self.devid}"


def devices_in(tree: dict[str, str], domid: int | None = None) -> list[DeviceView]:
    """Every frontend dir in `tree` (optionally of one domain), with both ends' states."""
    found = []
    for path in tree:
        if not path.endswith("/state"):
            continue
        match = _FRONTEND_DIR.match(path[: -len("/state")])
        if not match or (domid is not None and int(match.group(1)) != domid):
            continue
        frontend = match.group(0)
        backend = tree.get(f"{frontend}/backend", "")
        found.append(DeviceView(
            domid=int(match.group(1)), kind=match.group(2), devid=match.group(3),
            frontend=frontend, backend=backend,
            frontend_state=XenbusState.parse(tree.get(f"{frontend}/state")),
            backend_state=XenbusState.parse(tree.get(f"{backend}/state")) if backend else XenbusState.Unknown,
            detail=_detail(tree, match.group(2), match.group(3), frontend, backend)))
    return sorted(found, key=lambda d: (d.domid, d.kind, _natural(d.devid)))


def _detail(tree: dict[str, str], kind: str, devid: str, frontend: str, backend: str) -> str:
    if kind == "vbd":
        from xenbed.protocols.vdev import number_to_vdev
        try:
            vdev = number_to_vdev(int(tree.get(f"{frontend}/virtual-device", devid)))
        except ValueError:
            vdev = devid
        target = tree.get(f"{backend}/params", "")
        loop = tree.get(f"{backend}/physical-device-path", "")
        return " ".join(x for x in (vdev, target, f"on {loop}" if loop else "") if x)
    if kind == "vif":
        mac = tree.get(f"{frontend}/mac", "")
        bridge = tree.get(f"{backend}/bridge", "")
        return " ".join(x for x in (mac, bridge) if x)
    return ""


def _natural(text: str):
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def render_devices_table(devices: Iterable[DeviceView], names: dict[int, str] | None = None) -> str:
    names = names or {}
    rows = [("DOMAIN", "DEVICE", "FRONTEND", "BACKEND", "DETAIL")]
    for d in devices:
        backend_owner = d.backend.split("/")[3] if d.backend.count("/") > 3 else "?"
        rows.append((names.get(d.domid, f"dom{d.domid}"), f"{d.kind} {d.devid}",
                     f"{d.frontend_state.name} ({int(d.frontend_state)})",
                     f"{d.backend_state.name} ({int(d.backend_state)}) in dom{backend_owner}", d.detail))
    if len(rows) == 1:
        return "(no PV devices)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- against a running testbed, through a Xen view (xen.py) -----------------------------------
def domain_names(tree: dict[str, str]) -> dict[int, str]:
    names = {}
    for path, value in tree.items():
        match = re.match(r"^/local/domain/(\d+)/name$", path)
        if match:
            names[int(match.group(1))] = value
    return names


class Device:
    """A handle on one PV device of a domain (the frontend dir names it)."""

    def __init__(self, domain: Domain, kind: str, devid: str) -> None:
        self.domain, self.kind, self.devid = domain, kind, str(devid)

    def __repr__(self) -> str:
        return f"<Device {self.kind} {self.devid} of {self.domain.name}>"

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.domain.domid}/device/{self.kind}/{self.devid}"

    def view(self) -> DeviceView | None:
        tree = self.domain.xen.store_tree("/local/domain", xen_host=self.domain.dom0)
        for d in devices_in(tree, self.domain.domid):
            if d.kind == self.kind and d.devid == self.devid:
                return d
        return None

    def states(self) -> tuple[XenbusState, XenbusState]:
        """(frontend, backend); Unknown for an end whose dir is not there."""
        view = self.view()
        return (view.frontend_state, view.backend_state) if view else (XenbusState.Unknown, XenbusState.Unknown)

    def wait(self, frontend: str | XenbusState | None = "Connected", backend: str | XenbusState | None = "Connected",
             timeout: float = 30.0) -> DeviceView:
        """Until both ends are in the states asked for (None: either end's
        state does not matter).  The timeout message names the device, what
        was wanted and every distinct (frontend, backend) pair seen, in order."""
        want_f = _state(frontend)
        want_b = _state(backend)
        seen: list[str] = []

        def probe():
            view = self.view()
            pair = "gone" if view is None else f"{view.frontend_state.name}/{view.backend_state.name}"
            if not seen or seen[-1] != pair:
                seen.append(pair)
            ok = view is not None and (want_f is None or view.frontend_state == want_f) \
                and (want_b is None or view.backend_state == want_b)
            return view if ok else None

        wanted = "/".join(s.name if s is not None else "any" for s in (want_f, want_b))
        return wait_for(probe, what=f"{self.kind} {self.devid} of {self.domain.name} to be {wanted} "
                                    f"(frontend/backend)", timeout=timeout,
                        describe=lambda _: f"states seen: {' -> '.join(seen) or 'none'}")


def _state(value: str | XenbusState | None) -> XenbusState | None:
    if value is None or isinstance(value, XenbusState):
        return value
    return XenbusState[value] if not str(value).isdigit() else XenbusState(int(value))


class Domain:
    """A domain of the run, driven through `xl` in the dom0 of its Xen host
    (`dom0`: that dom0's service name, "dom0" in the default topology);
    `xen` is the Xen view (xen.py) that made it."""

    def __init__(self, xen, name: str, dom0: str = "dom0") -> None:
        self.xen, self.name, self.dom0 = xen, name, dom0

    @property
    def testbed(self):
        return self.xen.testbed

    def __repr__(self) -> str:
        return f"<Domain {self.name} on {self.dom0}>"

    def xl(self, *args: str, check: bool = True):
        return self.testbed.exec(self.dom0, ["xl", *args], check=check)

    @property
    def domid(self) -> int:
        if self.name in ("dom0", "Domain-0"):
            return 0
        return int(self.xl("domid", self.name).stdout.strip())

    @property
    def service(self) -> str:
        return self.dom0 if self.name == "Domain-0" else self.name

    def exec(self, cmd, **kwargs):
        return self.testbed.exec(self.service, cmd, **kwargs)

    @property
    def shell(self):
        """pytest-testinfra host of the domain's container (files, processes, interfaces, sockets)."""
        return self.testbed.shell(self.service)

    def pause(self) -> None:
        self.xl("pause", self.name)

    def unpause(self) -> None:
        self.xl("unpause", self.name)

    def destroy(self) -> None:
        self.xen.destroy_domain(self.name, xen_host=self.dom0)

    def devices(self, kind: str | None = None) -> list[DeviceView]:
        views = devices_in(self.xen.store_tree(xen_host=self.dom0), self.domid)
        return [v for v in views if kind is None or v.kind == kind]

    def device(self, kind: str, devid: str | int) -> Device:
        if kind == "vbd" and not str(devid).isdigit():
            from xenbed.protocols.vdev import vdev_to_number
            devid = vdev_to_number(str(devid))
        return Device(self, kind, str(devid))

    def block_attach(self, spec: str, *, wait: bool = True, timeout: float = 30.0) -> Device:
        """`xl block-attach <domain> <disk spec>`; the device, Connected at both ends unless wait=False."""
        from xenbed.toolstack.disk_spec import parse_disk_spec
        self.xl("block-attach", self.name, spec)
        device = self.device("vbd", parse_disk_spec(spec).vdev)
        if wait:
            device.wait(timeout=timeout)
        return device

    def block_detach(self, vdev: str) -> None:
        self.xl("block-detach", self.name, vdev)

    def network_attach(self, spec: str = "", *, wait: bool = True, timeout: float = 30.0) -> Device:
        """`xl network-attach <domain> <vif spec>`; the new vif (the highest devid after it)."""
        before = {v.devid for v in self.devices("vif")}
        self.xl("network-attach", self.name, *([spec] if spec else []))
        after = [v for v in self.devices("vif") if v.devid not in before]
        if len(after) != 1:
            raise AssertionError(f"network-attach on {self.name}: expected one new vif, found {after}")
        device = Device(self, "vif", after[0].devid)
        if wait:
            device.wait(timeout=timeout)
        return device

    def network_detach(self, devid: str | int) -> None:
        self.xl("network-detach", self.name, str(devid))
