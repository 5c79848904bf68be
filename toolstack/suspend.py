"""Suspend and resume a guest in place: `xl suspend` / `xl resume` (xenbed
extensions; docs/suspend-resume.md has the sequence diagram).

Real xl has no such commands: it suspends a guest inside `xl save` and
`xl migrate` (libxl_domain_suspend -> libxl__domain_suspend_common), and
resumes one in place only through `xl save -c` / a failed migration
(libxl_domain_resume with suspend_cancel=1, xc_domain_resume's fast path).
xenbed offers the two halves on their own so that tests can stand between
them, and adds the non-cancelled resume in place, which on Xen is what a
restore does on the target host.

Suspend (libxl__domain_suspend_common_pvcontrol_suspend)
--------------------------------------------------------
Write "suspend" to the guest's `control/shutdown`; the guest acknowledges
by writing "" and, its devices frozen, makes SCHEDOP_shutdown(suspend);
the hypervisor fires @releaseDomain and the domain's state reads
"suspended" (`xl list`: the `s` flag).  Both waits share one timeout: a
guest that never acknowledges has the request withdrawn (as libxl's
"guest didn't acknowledge suspend, cancelling request"), one that
acknowledged but does not suspend is reported as such; either way the
domain keeps running and SuspendTimeout says so.

Resume
------
cancelled (`xl resume --cancel`; xc_domain_resume fast path): DOMAIN_RESUME
with cancelled=true.  SCHEDOP_shutdown returns 1 in the guest, whose devices
go on on their old rings with their old backends: no XenBus change at all.

not cancelled (what a restore or the target of a migration does): the old
backends are torn down and new ones made, as on a new host, while the guest
is still suspended:

1. for each vbd and vif (found from the backend side, any backend domain):
   note the keys the toolstack wrote (TOOLSTACK_KEYS), run the hotplug
   removal (loop device, vif), remove the backend dir -- the backend
   releases its ring mapping and its port -- and wait until the guest's
   ports of that device are no longer bound (the backend's bus has taken
   the removal: the same path may be written again);
2. in ONE transaction: each frontend dir keeps its node (the guest's bus
   must never see it go, or it would remove the device and close the FUSE
   file / tap) but loses what the old connection wrote (ring-ref,
   event-channel, ...) and gets state Initialising; each backend dir is
   written afresh with state Initialising, as at creation;
3. each new backend reaches InitWait and its hotplug step runs (as libxl
   does before it unpauses a restored domain);
4. DOMAIN_RESUME with cancelled=false: the guest's frontends read the new
   backend details, make new rings, grants, ports and watches, go
   Initialised / Connected and replay what they kept in their shadow;
5. wait until every device is Connected at both ends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from xenbed.drivers.xen.store import XenStoreError
from xenbed.protocols import hypercall as hc
from xenbed.toolstack import devices
from xenbed.toolstack.devices import Device, DeviceError

SUSPEND_TIMEOUT = 20.0  # libxl waits up to 60 s for a guest to suspend; containers answer in ms
RESUME_TIMEOUT = 60.0
RELEASE_TIMEOUT = 10.0  # for an old backend to let go of a device

# The keys the toolstack writes in each dir (toolstack/blk.py vbd_device,
# toolstack/net.py vif_device, devices.write_device): what a non-cancelled
# resume writes again.  Everything else in the dirs was written by the
# backend, the hotplug step or the frontend for the old connection.
TOOLSTACK_KEYS = {
    "vbd": {"frontend": ("backend", "backend-id", "virtual-device", "device-type"),
            "backend": ("frontend", "frontend-id", "online", "params", "mode", "type", "dev", "device-type",
                        "removable", "bootable", "discard-enable")},
    "vif": {"frontend": ("backend", "backend-id", "handle", "mac", "mtu"),
            "backend": ("frontend", "frontend-id", "online", "script", "mac", "bridge", "handle", "type", "mtu",
                        "rate", "ip", "vifname", "gatewaydev", "model")},
}
# The nodes that name a device's event channel(s) in its frontend dir.
PORT_KEYS = ("event-channel", "event-channel-tx", "event-channel-rx")


class SuspendError(Exception):
    pass


class SuspendTimeout(SuspendError):
    """The guest did not suspend in time; it is still running."""


@dataclass
class SavedDevice:
    """One device's toolstack keys, noted before its backend is torn down."""

    device: Device
    frontend: dict[str, str] = field(default_factory=dict)
    backend: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)


def _state(link, domid: int) -> dict:
    for d in link.call(hc.Call.DOMAIN_LIST)["domains"]:
        if d["domid"] == domid:
            return d
    raise SuspendError(f"domain {domid} is gone")


def suspend(store, link, domid: int, timeout: float = SUSPEND_TIMEOUT) -> float:
    """Ask the guest to suspend and wait until it has; returns the seconds
    it took.  SuspendTimeout when it did not (see the module doc)."""
    info = _state(link, domid)
    if info["state"] != "running":
        raise SuspendError(f"domain {domid} ({info['name']}) is {info['state']}, not running")
    node = f"/local/domain/{domid}/control/shutdown"
    started = time.monotonic()
    released = threading.Event()
    token = f"xl-suspend:{domid}:{started}"
    store.watch("@releaseDomain", token, lambda _p, _t: released.set())
    try:
        store.write(node, "suspend")
        deadline = started + timeout
        acknowledged = False
        while True:
            if not acknowledged:
                acknowledged = store.try_read(node) != "suspend"
            info = _state(link, domid)
            if info["state"] == "suspended":
                return time.monotonic() - started
            if info["state"] == "dying":
                raise SuspendError(f"domain {domid} died instead of suspending")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # @releaseDomain wakes us at once; the poll covers a guest that
            # acknowledged (no event for that)
            released.wait(min(left, 0.02 if acknowledged else 0.05))
            released.clear()
    finally:
        try:
            store.unwatch("@releaseDomain", token)
        except Exception:
            pass
    if not acknowledged:
        # withdraw the request, unless the guest took it just now
        def withdraw(tx: int) -> bool:
            if store.try_read(node, tx) == "suspend":
                store.write(node, "", tx)
                return True
            return False
        withdrawn = store.run_transaction(withdraw)
        raise SuspendTimeout(
            f"domain {domid} ({info['name']}) did not acknowledge the suspend request within {timeout:.0f}s "
            f"(control/shutdown still said \"suspend\": the guest has no PV control driver, or is hung); "
            f"{'request withdrawn' if withdrawn else 'it acknowledged just now'}; the domain is still {info['state']}")
    raise SuspendTimeout(f"domain {domid} ({info['name']}) acknowledged the suspend request but did not suspend "
                         f"within {timeout:.0f}s (a driver that would not freeze?); the domain is still {info['state']}")


def devices_of(store, domid: int) -> list[Device]:
    """Every vbd and vif of `domid`, found from the backend side (any
    backend domain), as `xl destroy` finds them."""
    found = []
    for backend_id in store.directory("/local/domain"):
        if not backend_id.isdigit():
            continue
        for kind in TOOLSTACK_KEYS:
            base = f"/local/domain/{backend_id}/backend/{kind}/{domid}"
            try:
                devids = store.directory(base)
            except XenStoreError as exc:
                if exc.errno_name in ("ENOENT", "EACCES"):
                    continue
                raise
            found += [Device(kind, domid, int(backend_id), int(devid)) for devid in devids if devid.isdigit()]
    return sorted(found, key=lambda d: (d.kind, d.devid))


def save_device(store, device: Device) -> SavedDevice:
    keys = TOOLSTACK_KEYS[device.kind]
    saved = SavedDevice(device)
    for side, path in (("frontend", device.frontend_path), ("backend", device.backend_path)):
        values = getattr(saved, side)
        for key in keys[side]:
            value = store.try_read(f"{path}/{key}")
            if value is not None:
                values[key] = value
    for key in PORT_KEYS:
        value = store.try_read(f"{device.frontend_path}/{key}")
        if value is not None and value.strip().isdigit():
            saved.ports.append(int(value))
    return saved


def _hotplug(kind: str):
    from xenbed.toolstack import blk, net
    return blk if kind == "vbd" else net


def tear_down_backend(store, link, saved: SavedDevice, timeout: float = RELEASE_TIMEOUT) -> None:
    """Step 1 for one device: hotplug removal, backend dir removed, wait
    until the guest's ports of it are unbound (the backend let go)."""
    from xenbed.drivers.xen.evtchn import EventChannels

    device = saved.device
    module = _hotplug(device.kind)
    try:
        if device.kind == "vif":
            module.run_hotplug("remove", device.backend_path, module._vif_name(store, device))
        else:
            module.run_hotplug("remove", device.backend_path)
    except DeviceError as exc:
        print(f"xl: {exc} (going on)")

    def rm(tx: int) -> None:
        try:
            store.rm(device.backend_path, tx)
        except XenStoreError as exc:
            if exc.errno_name != "ENOENT":
                raise

    store.run_transaction(rm)
    evtchn = EventChannels(link)
    deadline = time.monotonic() + timeout
    for port in saved.ports:
        while True:
            try:
                status = evtchn.status(port, device.frontend_domid)["status"]
            except Exception:
                break  # closed or never there
            if status != "interdomain":
                break
            if time.monotonic() > deadline:
                raise SuspendError(f"the old backend of {device.kind} {device.devid} still holds the guest's "
                                   f"port {port} {timeout:.0f}s after its directory was removed")
            time.sleep(0.02)


def rewrite_directories(store, saved: list[SavedDevice]) -> None:
    """Step 2: every device's dirs in ONE transaction (see the module doc)."""

    def body(tx: int) -> None:
        for s in saved:
            d = s.device
            front, back = d.frontend_path, d.backend_path
            fe, be = d.frontend_domid, d.backend_domid
            if not store.exists(front, tx):
                raise DeviceError(f"{front} is gone: the guest removed {d.kind} {d.devid} meanwhile")
            for key in store.directory(front, tx):
                if key not in s.frontend:
                    store.rm(f"{front}/{key}", tx)
            for key, value in {**s.frontend, "backend": back, "backend-id": str(be),
                               "state": str(devices.XENBUS_INITIALISING)}.items():
                store.write(f"{front}/{key}", value, tx)
            backend = {**s.backend, "frontend": front, "frontend-id": str(fe), "online": "1",
                       "state": str(devices.XENBUS_INITIALISING)}
            devices.write_backend_dir(store, d, backend, tx)

    store.run_transaction(body)


def resume(store, link, domid: int, cancel: bool = False, timeout: float = RESUME_TIMEOUT) -> dict:
    """Run a suspended guest again (see the module doc).  Returns what was
    done: {"cancelled", "devices", "seconds"}; with cancel=False it returns
    once every device is Connected at both ends."""
    info = _state(link, domid)
    if info["state"] != "suspended":
        raise SuspendError(f"domain {domid} ({info['name']}) is {info['state']}, not suspended")
    started = time.monotonic()
    if cancel:
        reply = link.call(hc.Call.DOMAIN_RESUME, {"domid": domid, "cancelled": True})
        return {"cancelled": True, "devices": [], "guest_answered": reply.get("guest_answered"),
                "seconds": time.monotonic() - started}
    phases = {}
    mark = started

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 3)
        mark = now

    saved = [save_device(store, d) for d in devices_of(store, domid)]
    for s in saved:
        tear_down_backend(store, link, s)
    phase("teardown")
    rewrite_directories(store, saved)
    for s in saved:
        d = s.device
        module = _hotplug(d.kind)
        devices.bring_up(store, d, f"{d.kind} {d.devid}", lambda path, m=module: m.run_hotplug("add", path),
                         module.remove, initwait_timeout=module.INITWAIT_TIMEOUT, wait_connected=0)
    phase("new_backends")
    reply = link.call(hc.Call.DOMAIN_RESUME, {"domid": domid, "cancelled": False})
    deadline = time.monotonic() + timeout
    for s in saved:
        d = s.device
        for path, what in ((d.backend_path, "backend"), (d.frontend_path, "frontend")):
            devices.wait_for_state(store, path, {devices.XENBUS_CONNECTED}, max(0.1, deadline - time.monotonic()),
                                   f"the {what} of {d.kind} {d.devid} to connect again after the resume")
    phase("reconnect")
    return {"cancelled": False, "devices": [f"{s.device.kind}/{s.device.devid}" for s in saved],
            "guest_answered": reply.get("guest_answered"), "seconds": time.monotonic() - started,
            "phases": phases}
