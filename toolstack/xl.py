"""`xl`: dom0's toolstack command, with the subcommands and output Xen users know.

    xl create [--if-absent] CONFIG   create a domain from an xl config file
    xl list [DOMAIN...]              Name / ID / Mem / VCPUs / State / Time(s)
    xl destroy DOMAIN                destroy at once (no guest cooperation)
    xl pause DOMAIN / unpause DOMAIN
    xl suspend [-t SECONDS] DOMAIN       ask the guest to suspend (xenbed extension: real xl
                                         suspends only inside `xl save` / `xl migrate`)
    xl resume [--cancel] DOMAIN          run a suspended guest again: --cancel on its old
                                         devices (as `xl save -c`), else on new backends (as a
                                         restore); xenbed extension, see toolstack/suspend.py
    xl migrate DOMAIN HOST[:PORT]        live migration: pre-copy rounds, stop-and-copy, the guest
                                         resumes on HOST's dom0 (which runs the receiver)
    xl migrate-receive [--port N]        the receiver, in the foreground (dom0's kernel runs it)
    xl domid NAME / domname ID
    xl block-attach DOMAIN DISKSPEC...   add a disk (xl-disk-configuration(5) syntax)
    xl block-detach DOMAIN VDEV          orderly closedown, forced after a timeout
    xl block-list DOMAIN
    xl block-resize DOMAIN VDEV SIZE     grow a disk online (xenbed extension: real xl has none)
    xl cd-insert DOMAIN VDEV TARGET      put a medium in a cdrom drive (PV here; libxl: HVM only)
    xl cd-eject DOMAIN VDEV              empty a cdrom drive
    xl network-attach DOMAIN VIFSPEC...  add a NIC (xl-network-configuration(5) syntax)
    xl network-detach DOMAIN DEVID|MAC
    xl network-list DOMAIN
    xl network-set DOMAIN DEVID|MAC [mtu=N] [rate=RATE|unlimited]
                                         xenbed extension: change a running vif's MTU
                                         and rate while it stays connected (net.py)

SIZE is bytes or a number with a binary unit (512k, 128M, 1G, 2GiB); "+64M"
grows by that much.  block-resize and cd-insert/cd-eject change a disk while
both ends stay Connected (seed 000, Device reconfiguration): blkback rewrites
`sectors` with Connected and the guest's open file follows.

DOMAIN is a name or a domid.  `--if-absent` makes `create` succeed quietly
when a domain of that name runs already (dom0's autostart uses it, so a
restarted dom0 does not fail on the guests it created before).
"""

from __future__ import annotations

import argparse
import sys
import time

from xenbed.drivers.xen.hypercall import HypercallError, HypervisorLink
from xenbed.drivers.xen.store import XenStoreClient
from xenbed.protocols import hypercall as hc
from xenbed.toolstack import blk, domain_store, net
from xenbed.toolstack.devices import DeviceError
from xenbed.toolstack.config import ConfigError, DomainConfig


# Nominal store ring frame and event channel passed to XS_INTRODUCE (see create).
STORE_RING_GFN = 0
STORE_EVTCHN_PORT = 1


class XlError(Exception):
    pass


class Toolstack:
    """The operations behind the subcommands, usable from Python too."""

    def __init__(self, link: HypervisorLink | None = None, store: XenStoreClient | None = None) -> None:
        self.link = link or HypervisorLink.open(role="device")
        self.store = store or XenStoreClient()

    def close(self) -> None:
        self.store.close()
        self.link.close()

    def domains(self) -> list[dict]:
        return self.link.call(hc.Call.DOMAIN_LIST)["domains"]

    def resolve(self, name_or_id: str) -> dict:
        for domain in self.domains():
            if domain["name"] == name_or_id or str(domain["domid"]) == name_or_id:
                return domain
        raise XlError(f"{name_or_id!r} is not a domain name or id")

    def create(self, config: DomainConfig) -> tuple[int, str]:
        privilege = "backend" if config.driver_domain else "none"
        created = self.link.call(hc.Call.DOMAIN_CREATE,
                                 {"name": config.name, "memory_mb": config.memory_mb, "privilege": privilege})
        domid = created["domid"]
        try:
            domain_store.write_domain(self.store, domid, config.name, config.memory_mb)
            # mfn and port name the store ring in real Xen; here the domain
            # reaches xenstored through its hypervisor link, so they are
            # nominal (xenstored still insists on a non-zero port).
            self.store.introduce(domid, STORE_RING_GFN, STORE_EVTCHN_PORT)
            for disk in config.disks:
                # The guest's frontend connects once its container boots;
                # creating the domain waits only for the backend side.
                blk.attach(self.store, domid, disk, wait_connected=0)
            net.attach_all(self.store, domid, config.vifs)
        except BaseException:
            self._destroy(domid)
            raise
        return domid, created["credential"]

    def destroy(self, name_or_id: str) -> int:
        domid = self.resolve(name_or_id)["domid"]
        if domid == 0:
            raise XlError("dom0 cannot be destroyed")
        self._destroy(domid)
        return domid

    def _destroy(self, domid: int) -> None:
        """As libxl: the domain goes at once, then its backends are removed by
        force (hotplug removal: loop devices and vifs go) and its nodes."""
        devices = self._devices_of(domid)
        try:
            self.link.call(hc.Call.DOMAIN_DESTROY, {"domid": domid})
        finally:
            for module, device in devices:
                try:
                    module.remove(self.store, device, force=True)
                except DeviceError as exc:
                    print(f"xl: removing {device.kind} {device.devid} of dom{domid}: {exc}", file=sys.stderr)
            domain_store.remove_domain(self.store, domid)

    def _devices_of(self, domid: int) -> list:
        from xenbed.toolstack.devices import Device

        # From the backend side: a guest that died already lost its own
        # /local/domain/<id> (xenstored drops it), its backends did not.
        found = []
        for backend_id in self.store.directory("/local/domain"):
            for kind, module in (("vbd", blk), ("vif", net)):
                base = f"/local/domain/{backend_id}/backend/{kind}/{domid}"
                if backend_id.isdigit() and self.store.exists(base):
                    found += [(module, Device(kind, domid, int(backend_id), int(devid)))
                              for devid in self.store.directory(base) if devid.isdigit()]
        return found

    def pause(self, name_or_id: str, paused: bool = True) -> None:
        domid = self.resolve(name_or_id)["domid"]
        self.link.call(hc.Call.DOMAIN_PAUSE if paused else hc.Call.DOMAIN_UNPAUSE, {"domid": domid})


_STATE_FLAGS = {"running": "r-----", "paused": "--p---", "suspended": "---s--", "dying": "-----d"}


def format_list(domains: list[dict]) -> str:
    lines = [f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}\tState\tTime(s)"]
    now = time.time()
    for d in domains:
        state = _STATE_FLAGS.get(d["state"], "------")
        lines.append(f"{d['name']:<40}{d['domid']:>5}{d['memory_mb']:>6}{1:>6}\t{state}\t{now - d['created_at']:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a domain from a config file")
    create.add_argument("config")
    create.add_argument("--if-absent", action="store_true")
    create.add_argument("--print-credential", action="store_true",
                        help="print the new domain's credential (for starting its container)")
    lst = sub.add_parser("list", help="list domains")
    lst.add_argument("domains", nargs="*")
    for name in ("destroy", "pause", "unpause"):
        sub.add_parser(name).add_argument("domain")
    sus = sub.add_parser("suspend", help="xenbed extension: ask a guest to suspend via control/shutdown "
                                         "(real xl does this only inside `xl save` / `xl migrate`)")
    sus.add_argument("domain")
    sus.add_argument("-t", "--timeout", type=float, default=None,
                     help="seconds the guest has to suspend (default 20); it keeps running if it does not")
    res = sub.add_parser("resume", help="xenbed extension: run a suspended guest again, on new backends "
                                        "(as after a restore) or with --cancel on its old ones (as `xl save -c`)")
    res.add_argument("domain")
    res.add_argument("--cancel", action="store_true",
                     help="cancelled suspend: SCHEDOP_shutdown returns 1, devices go on on their old rings")
    sub.add_parser("domid").add_argument("name")
    attach = sub.add_parser("block-attach", help="attach a disk to a domain")
    attach.add_argument("domain")
    attach.add_argument("spec", nargs="+", help="disk spec; several words are joined with commas, as xl does")
    detach = sub.add_parser("block-detach", help="detach a disk")
    detach.add_argument("domain")
    detach.add_argument("vdev")
    sub.add_parser("block-list", help="list a domain's disks").add_argument("domain")
    resize = sub.add_parser("block-resize", help="grow a disk while the guest uses it "
                                                 "(xenbed extension; real xl has no such command)")
    resize.add_argument("domain")
    resize.add_argument("vdev")
    resize.add_argument("size", help="new size: bytes, or with a unit (128M, 1G); +SIZE grows by SIZE")
    insert = sub.add_parser("cd-insert", help="insert a medium in a cdrom drive (PV; libxl does it for HVM only)")
    insert.add_argument("domain")
    insert.add_argument("vdev")
    insert.add_argument("target", help="the image (or block device) to insert")
    eject = sub.add_parser("cd-eject", help="eject the medium of a cdrom drive")
    eject.add_argument("domain")
    eject.add_argument("vdev")
    nattach = sub.add_parser("network-attach", help="attach a NIC to a domain")
    nattach.add_argument("domain")
    nattach.add_argument("spec", nargs="*", help="vif spec; several words are joined with commas, as xl does")
    ndetach = sub.add_parser("network-detach", help="detach a NIC (by devid or MAC)")
    ndetach.add_argument("domain")
    ndetach.add_argument("which")
    sub.add_parser("network-list", help="list a domain's NICs").add_argument("domain")
    nset = sub.add_parser("network-set", help="xenbed extension: change a running NIC's mtu and rate")
    nset.add_argument("domain")
    nset.add_argument("which", help="devid or MAC")
    nset.add_argument("settings", nargs="+", help="mtu=N and/or rate=RATE (xl's rate syntax; 'unlimited' lifts it)")
    sub.add_parser("domname").add_argument("domid")
    mig = sub.add_parser("migrate", help="live-migrate a domain to another host's dom0 (toolstack/migrate.py)")
    mig.add_argument("domain")
    mig.add_argument("host", help="the destination dom0, HOST[:PORT] (port 8002 by default)")
    mig.add_argument("--json", action="store_true", help="print the figures (rounds, pages, downtime) as JSON")
    mig.add_argument("--disk-backend", metavar="DOMAIN", default=None,
                     help="at the destination, serve the disks from this driver domain (default: its dom0); "
                          "real xl says this with -C and a config whose disks name backend=")
    rcv = sub.add_parser("migrate-receive", help="receive migrations (dom0's kernel runs this as a daemon)")
    rcv.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)

    try:
        xl = Toolstack()
    except (OSError, HypercallError) as exc:
        print(f"xl: cannot reach the hypervisor or xenstored: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(xl, args)
    except (XlError, ConfigError, HypercallError, DeviceError, ValueError) as exc:
        print(f"xl: {exc}", file=sys.stderr)
        return 1
    finally:
        xl.close()


def _run(xl: Toolstack, args) -> int:
    if args.command == "create":
        config = DomainConfig.from_file(args.config)
        print(f'Parsing config from {args.config}', file=sys.stderr)
        if args.if_absent and any(d["name"] == config.name and d["state"] != "dying" for d in xl.domains()):
            print(f"{config.name} is already running", file=sys.stderr)
            return 0
        domid, credential = xl.create(config)
        print(f"Created domain {config.name} with id {domid}", file=sys.stderr)
        if args.print_credential:
            print(credential)
    elif args.command == "list":
        domains = xl.domains()
        if args.domains:
            domains = [xl.resolve(d) for d in args.domains]
        print(format_list(domains))
    elif args.command == "destroy":
        xl.destroy(args.domain)
    elif args.command in ("pause", "unpause"):
        xl.pause(args.domain, paused=args.command == "pause")
    elif args.command == "suspend":
        from xenbed.toolstack import suspend

        domain = xl.resolve(args.domain)
        try:
            took = suspend.suspend(xl.store, xl.link, domain["domid"],
                                   timeout=suspend.SUSPEND_TIMEOUT if args.timeout is None else args.timeout)
        except suspend.SuspendError as exc:
            raise XlError(str(exc)) from None
        print(f"Domain {domain['domid']} ({domain['name']}) suspended in {took * 1000:.0f} ms", file=sys.stderr)
    elif args.command == "resume":
        from xenbed.toolstack import suspend

        domain = xl.resolve(args.domain)
        try:
            done = suspend.resume(xl.store, xl.link, domain["domid"], cancel=args.cancel)
        except suspend.SuspendError as exc:
            raise XlError(str(exc)) from None
        how = "suspend cancelled, devices on their old rings" if done["cancelled"] else \
            f"{len(done['devices'])} device(s) reconnected to new backends"
        print(f"Domain {domain['domid']} ({domain['name']}) resumed in {done['seconds'] * 1000:.0f} ms: {how}",
              file=sys.stderr)
    elif args.command == "domid":
        print(xl.resolve(args.name)["domid"])
    elif args.command == "domname":
        print(xl.resolve(args.domid)["name"])
    elif args.command == "block-attach":
        blk.attach(xl.store, xl.resolve(args.domain)["domid"], ",".join(args.spec))
    elif args.command == "block-detach":
        if not blk.detach(xl.store, xl.resolve(args.domain)["domid"], args.vdev):
            print(f"xl: {args.vdev} did not close in time; removed by force", file=sys.stderr)
    elif args.command == "block-resize":
        size = blk.resize(xl.store, xl.resolve(args.domain)["domid"], args.vdev, args.size)
        print(f"{args.vdev}: {size} bytes ({size // 512} sectors)", file=sys.stderr)
    elif args.command == "cd-insert":
        blk.change_media(xl.store, xl.resolve(args.domain)["domid"], args.vdev, args.target)
    elif args.command == "cd-eject":
        blk.change_media(xl.store, xl.resolve(args.domain)["domid"], args.vdev, None)
    elif args.command == "network-attach":
        net.attach(xl.store, xl.resolve(args.domain)["domid"], ",".join(args.spec))
    elif args.command == "network-detach":
        if not net.detach(xl.store, xl.resolve(args.domain)["domid"], args.which):
            print(f"xl: vif {args.which} did not close in time; removed by force", file=sys.stderr)
    elif args.command == "network-set":
        settings = net.parse_live_settings(args.settings)
        net.set_live(xl.store, xl.resolve(args.domain)["domid"], args.which, settings)
    elif args.command == "migrate":
        import json

        from xenbed.toolstack import migrate
        try:
            report = migrate.migrate(xl, args.domain, args.host, say=lambda line: print(line, file=sys.stderr),
                                     disk_backend=args.disk_backend)
        except migrate.MigrationError as exc:
            raise XlError(str(exc)) from None
        if args.json:
            print(json.dumps(report.as_dict(), sort_keys=True))
    elif args.command == "migrate-receive":
        from xenbed.toolstack import migrate
        return migrate.main([] if args.port is None else ["--port", str(args.port)])
    elif args.command == "network-list":
        print(net.format_list(net.list_rows(xl.store, xl.resolve(args.domain)["domid"])))
    elif args.command == "block-list":
        from xenbed.toolstack.devices import list_devices
        print(blk.format_list(list_devices(xl.store, "vbd", xl.resolve(args.domain)["domid"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
