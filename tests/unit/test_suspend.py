"""Suspend / resume, the parts that need no Docker (docs/suspend-resume.md):
the kernel<->module control channel over a real socketpair, the
control/shutdown acknowledgement and the toolstack's directory rewrite
against the real xenstored core, the domain table's SCHEDOP_shutdown, the
hypervisor holding upcalls of a suspended domain, the bus holding watch
events, and blkfront's engine freezing with requests in flight."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from xenbed.drivers.blk.front_engine import Shadow
from xenbed.drivers.kernel import control
from xenbed.drivers.kernel.control import ControlError, KernelControl, ModuleChannel
from xenbed.drivers.kernel.shutdown import take_request
from xenbed.hypervisor.domains import DomainError, DomainState, DomainTable
from xenbed.hypervisor.sharing import Sharing
from xenbed.protocols import hypercall as hc
from xenbed.protocols.blkif import BLKIF_OP_WRITE
from xenbed.drivers.xenbus import XenbusState as S
from xenbed.toolstack import domain_store
from xenbed.toolstack import suspend as ts

from .test_blkfront_indirect import make_engine
from .test_sharing import call, world  # noqa: F401  (fixture)
from .test_xenbus_bus import Host, connect
from .xenbus_store import StoreHub


# -- the control channel -------------------------------------------------------------------
def test_codec_round_trip_and_refusals():
    assert control.decode(control.encode(control.request(3, "thaw", cancelled=False))) == \
        {"seq": 3, "op": "thaw", "cancelled": False}
    assert control.decode(control.encode(control.answer(3, False, "no"))) == {"seq": 3, "ok": False, "error": "no"}
    assert control.decode(control.encode(control.hello("m")))["ops"] == ["freeze", "thaw"]
    for bad in (b"not json", b"[1]", b'{"op": "freeze"}', b'{"seq": 0, "op": "freeze"}', b'{"seq": 1}',
                b'{"op": "hello"}', b'{"seq": true, "ok": true}'):
        with pytest.raises(ControlError):
            control.decode(bad)
    with pytest.raises(ValueError):
        control.request(1, "reboot")  # not an op of protocol 1


def _pair(handlers):
    """A kernel end and a module end, as modules.py and daemon.py make them."""
    channel = ModuleChannel("test.module")
    module_sock = socket.socket(fileno=os.dup(channel.child_fd))
    channel.child_started()
    module = KernelControl(module_sock, "test.module", handlers)
    assert channel.greeted.wait(5)
    return channel, module


def test_freeze_and_thaw_are_answered_with_the_handler_results():
    seen = []
    channel, module = _pair({"freeze": lambda m: seen.append(m) or {"inflight": 2},
                             "thaw": lambda m: seen.append(m) or None})
    try:
        assert channel.takes("freeze") and channel.takes("thaw")
        assert channel.call("freeze", 5)["inflight"] == 2
        assert channel.call("thaw", 5, cancelled=True, hypervisor="/new/host.sock")["ok"] is True
        # a field the module does not know yet reaches it untouched (migration's thaw)
        assert seen[1] == {"seq": 2, "op": "thaw", "cancelled": True, "hypervisor": "/new/host.sock"}
    finally:
        module.close()
        channel.close()


def test_a_failing_handler_a_missing_op_and_a_dead_module_are_errors():
    def broken(message):
        raise RuntimeError("ring is gone")

    channel, module = _pair({"freeze": broken})
    try:
        assert not channel.takes("thaw")
        with pytest.raises(ControlError, match="RuntimeError: ring is gone"):
            channel.call("freeze", 5)
        with pytest.raises(ControlError, match="does not take 'thaw'"):
            channel.call("thaw", 5, cancelled=True)
        module.close()  # the module process died
        with pytest.raises(ControlError, match="went away|cannot be told"):
            channel.call("freeze", 5)
    finally:
        channel.close()


def test_a_module_that_does_not_answer_times_out():
    release = threading.Event()
    channel, module = _pair({"freeze": lambda m: release.wait(10) and None})
    try:
        started = time.monotonic()
        with pytest.raises(ControlError, match="did not answer freeze within"):
            channel.call("freeze", 0.3)
        assert time.monotonic() - started < 3
    finally:
        release.set()
        module.close()
        channel.close()


# -- control/shutdown ------------------------------------------------------------------------
def test_shutdown_request_is_acknowledged_in_the_same_transaction_only_when_known():
    hub = StoreHub()
    tools, guest = hub.connect(0), hub.connect(1)
    domain_store.write_domain(tools, 1, "guest", 16)
    node = "/local/domain/1/control/shutdown"
    assert take_request(guest, node) == ""  # nothing asked
    tools.write(node, "suspend")
    assert take_request(guest, node) == "suspend"
    assert tools.read(node) == ""  # the acknowledgement libxl waits for
    tools.write(node, "sysrq-b")
    assert take_request(guest, node) == "sysrq-b"
    assert tools.read(node) == "sysrq-b"  # unknown: not acknowledged


# -- the domain table -----------------------------------------------------------------------
def test_schedop_shutdown_suspend_and_resume_in_the_domain_table():
    table = DomainTable()
    dom0 = table.get(0)
    guest = table.create(dom0, "g", 16)
    table.shutdown_self(guest, "suspend")
    assert guest.state is DomainState.SUSPENDED and guest.summary()["shutdown_reason"] == "suspend"
    with pytest.raises(DomainError) as twice:
        table.shutdown_self(guest, "suspend")
    assert twice.value.code == "EBUSY"
    with pytest.raises(DomainError) as not_control:
        table.set_suspended(guest, guest.domid, False)  # a guest cannot resume itself
    assert not_control.value.code == "EPERM"
    table.set_suspended(dom0, guest.domid, False)
    assert guest.state is DomainState.RUNNING and guest.shutdown_reason == ""
    for reason, code in (("nap", "EINVAL"),):
        with pytest.raises(DomainError) as bad:
            table.shutdown_self(guest, reason)
        assert bad.value.code == code
    with pytest.raises(DomainError):
        table.shutdown_self(dom0, "suspend")
    table.shutdown_self(guest, "poweroff")  # recorded; the toolstack acts on it
    assert guest.state is DomainState.RUNNING and guest.shutdown_reason == "poweroff"


# -- the hypervisor holds a suspended domain's upcalls ---------------------------------------
def test_upcalls_to_a_suspended_domain_are_held_until_it_resumes(world):  # noqa: F811
    sharing, links = world
    port = call(sharing, links[1], hc.Call.EVTCHN_ALLOC_UNBOUND, remote_dom=0)["port"]
    bound = call(sharing, links[0], hc.Call.EVTCHN_BIND_INTERDOMAIN, remote_dom=1, remote_port=port)["port"]
    call(sharing, links[1], hc.Call.EVTCHN_CLEAR, port=port)
    links[1].upcalls.clear()
    sharing.suspend_domain(1)
    call(sharing, links[0], hc.Call.EVTCHN_SEND, port=bound)
    call(sharing, links[0], hc.Call.EVTCHN_SEND, port=bound)
    assert links[1].upcalls == []  # it does not run
    assert sharing.evtchn.status(1, port, caller=1)["pending"]  # but the port is pending
    sharing.resume_domain(1)
    assert links[1].upcalls == [{"port": port}]  # once: the sends coalesced
    call(sharing, links[1], hc.Call.EVTCHN_CLEAR, port=port)
    call(sharing, links[0], hc.Call.EVTCHN_SEND, port=bound)
    assert links[1].upcalls == [{"port": port}, {"port": port}]  # running again: at once


# -- the bus holds watch events while frozen --------------------------------------------------
def test_frozen_bus_holds_the_other_ends_events_and_cancel_delivers_them():
    h = Host()
    fe, be = connect(h)
    calls = len(h.front_drv.calls)
    h.front.suspend()
    h.tools.unplug(be)  # the backend goes Closing while the guest is suspended
    h.pump()
    assert len(h.front_drv.calls) == calls and h.state(fe) == S.Connected  # nothing ran
    h.front.resume_cancelled()
    h.pump()
    assert ("changed", fe, S.Closing) in h.front_drv.calls[calls:]
    assert h.state(fe) == S.Closed
    assert h.recorder.check() == []


def test_resume_after_suspend_drops_the_old_backends_events():
    h = Host()
    fe, be = connect(h)
    h.front.suspend()
    h.tools.xs.write(f"{be}/state", str(int(S.Closed)))  # the old backend's last word, while suspended
    h.front_drv.calls.clear()
    h.tools.xs.write(f"{fe}/state", "1")  # the toolstack's fresh dirs (same backend path here)
    h.tools.xs.write(f"{be}/state", "1")
    h.front.resume()
    h.pump()
    assert h.front_drv.calls[0] == ("resume", fe)
    assert ("changed", fe, S.Closed) not in h.front_drv.calls  # held, then dropped with its watch


# -- blkfront's engine ----------------------------------------------------------------------
def test_frozen_engine_takes_nothing_new_and_keeps_what_is_in_flight():
    engine, backend, _front = make_engine(0)
    try:
        backend.paused = True
        first = engine.submit(Shadow(BLKIF_OP_WRITE, 0, 8, write_data=memoryview(b"a" * 4096)))
        time.sleep(0.01)
        assert engine.freeze() == 1
        late = Shadow(BLKIF_OP_WRITE, 8, 8, write_data=memoryview(b"b" * 4096))
        submitted = threading.Event()
        threading.Thread(target=lambda: (engine.submit(late), submitted.set()), daemon=True).start()
        backend.paused = False
        engine.wait([first], timeout=5)  # what was in flight completes (the guest still runs)
        assert not submitted.wait(0.3)  # the new one waits for the thaw
        assert len(backend.seen) == 1
        engine.thaw()
        assert submitted.wait(5)
        engine.wait([late], timeout=5)
        assert bytes(backend.disk[:8192]) == b"a" * 4096 + b"b" * 4096
    finally:
        backend.stop()


# -- the toolstack --------------------------------------------------------------------------
def test_toolstack_keys_cover_every_key_the_toolstack_writes():
    from xenbed.toolstack.blk import vbd_device
    from xenbed.toolstack.disk_spec import parse_disk_spec
    from xenbed.toolstack.net import vif_device
    from xenbed.toolstack.vif_spec import parse_vif_spec

    vbd = vbd_device(parse_disk_spec("vdev=xvda,target=/x.img,discard"), 1, 0)
    vif = vif_device(parse_vif_spec("mac=00:16:3e:00:00:01,bridge=xenbr0,ip=10.0.0.2,rate=10Mb/s,"
                                    "vifname=v,gatewaydev=eth0,model=e1000,mtu=1400"), 1, 0, 0)
    for device in (vbd, vif):
        keys = ts.TOOLSTACK_KEYS[device.kind]
        assert set(device.frontend_keys) <= set(keys["frontend"]), device.kind
        assert set(device.backend_keys) <= set(keys["backend"]), device.kind


def test_rewrite_keeps_the_frontend_node_and_writes_fresh_backends():
    hub = StoreHub()
    tools, guest = hub.connect(0), hub.connect(1)
    domain_store.write_domain(tools, 1, "guest", 16)
    from xenbed.toolstack.blk import vbd_device
    from xenbed.toolstack.devices import write_device
    from xenbed.toolstack.disk_spec import parse_disk_spec

    device = vbd_device(parse_disk_spec("vdev=xvda,target=/x.img"), 1, 0)
    write_device(tools, device)
    front, back = device.frontend_path, device.backend_path
    for key, value in (("ring-ref", "8"), ("event-channel", "3"), ("protocol", "x86_64-abi"), ("state", "4")):
        tools.write(f"{front}/{key}", value)
    for key, value in (("physical-device", "7:0"), ("sectors", "2048"), ("state", "4")):
        tools.write(f"{back}/{key}", value)
    saved = ts.save_device(tools, device)
    assert saved.ports == [3]
    tools.rm(back)  # the old backend torn down
    removed = []
    guest.watch(front, "t", lambda p, t: removed.append(p) if not guest.exists(front) else None)
    ts.rewrite_directories(tools, [saved])
    hub.pump()
    assert removed == []  # the frontend dir never went away
    assert sorted(tools.directory(front)) == ["backend", "backend-id", "device-type", "state", "virtual-device"]
    assert tools.read(f"{front}/state") == "1" and tools.read(f"{back}/state") == "1"
    assert tools.read(f"{back}/params") == "/x.img" and tools.read(f"{back}/online") == "1"
    assert tools.try_read(f"{back}/physical-device") is None  # the hotplug step writes it anew
    assert tools.get_perms(back) == ["n0", "r1"] and tools.get_perms(front)[0] == "n1"
