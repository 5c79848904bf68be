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

from xenbed.drivers.xen.hypercall import HypercallError
from xenbed.toolstack import blk, net
from xenbed.toolstack.devices import DeviceError
from xenbed.toolstack.config import ConfigError, DomainConfig
from xenbed.toolstack.libxl import Toolstack, XlError


_STATE_FLAGS = {"running": "r-----", "paused": "--p---", "suspended": "---s--", "dying": "-----d"}


def format_list(domains: list[dict]) -> str:
    lines = [f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}\tState\tTime(s)"]
    now = time.time()
    for d in domains:
        state = _STATE_FLAGS.get(d["state"], "------")
        lines.append(f"{d['name']:<40}{d['domid']:>5}{d['memory_mb']:>6}{1:>6}\t{state}\t{now - d['created_at']:>7.1f}")
    return "\n".join(lines)


def _command(sub, name: str, help: str | None, *positional: str) -> argparse.ArgumentParser:
    """Subcommand `name` taking these positional arguments; add the rest to what it returns."""
    command = sub.add_parser(name) if help is None else sub.add_parser(name, help=help)
    for arg in positional:
        command.add_argument(arg)
    return command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    create = _command(sub, "create", "create a domain from a config file", "config")
    create.add_argument("--if-absent", action="store_true")
    create.add_argument("--print-credential", action="store_true",
                        help="print the new domain's credential (for starting its container)")
    _command(sub, "list", "list domains").add_argument("domains", nargs="*")
    for name in ("destroy", "pause", "unpause"):
        _command(sub, name, None, "domain")
    sus = _command(sub, "suspend", "xenbed extension: ask a guest to suspend via control/shutdown "
                                   "(real xl does this only inside `xl save` / `xl migrate`)", "domain")
    sus.add_argument("-t", "--timeout", type=float, default=None,
                     help="seconds the guest has to suspend (default 20); it keeps running if it does not")
    res = _command(sub, "resume", "xenbed extension: run a suspended guest again, on new backends "
                                  "(as after a restore) or with --cancel on its old ones (as `xl save -c`)", "domain")
    res.add_argument("--cancel", action="store_true",
                     help="cancelled suspend: SCHEDOP_shutdown returns 1, devices go on on their old rings")
    _command(sub, "domid", None, "name")
    _command(sub, "block-attach", "attach a disk to a domain", "domain").add_argument(
        "spec", nargs="+", help="disk spec; several words are joined with commas, as xl does")
    _command(sub, "block-detach", "detach a disk", "domain", "vdev")
    _command(sub, "block-list", "list a domain's disks", "domain")
    resize = _command(sub, "block-resize", "grow a disk while the guest uses it "
                                           "(xenbed extension; real xl has no such command)", "domain", "vdev")
    resize.add_argument("size", help="new size: bytes, or with a unit (128M, 1G); +SIZE grows by SIZE")
    _command(sub, "cd-insert", "insert a medium in a cdrom drive (PV; libxl does it for HVM only)",
             "domain", "vdev").add_argument("target", help="the image (or block device) to insert")
    _command(sub, "cd-eject", "eject the medium of a cdrom drive", "domain", "vdev")
    _command(sub, "network-attach", "attach a NIC to a domain", "domain").add_argument(
        "spec", nargs="*", help="vif spec; several words are joined with commas, as xl does")
    _command(sub, "network-detach", "detach a NIC (by devid or MAC)", "domain", "which")
    _command(sub, "network-list", "list a domain's NICs", "domain")
    nset = _command(sub, "network-set", "xenbed extension: change a running NIC's mtu and rate", "domain")
    nset.add_argument("which", help="devid or MAC")
    nset.add_argument("settings", nargs="+", help="mtu=N and/or rate=RATE (xl's rate syntax; 'unlimited' lifts it)")
    _command(sub, "domname", None, "domid")
    mig = _command(sub, "migrate", "live-migrate a domain to another host's dom0 (toolstack/migrate.py)", "domain")
    mig.add_argument("host", help="the destination dom0, HOST[:PORT] (port 8002 by default)")
    mig.add_argument("--json", action="store_true", help="print the figures (rounds, pages, downtime) as JSON")
    mig.add_argument("--disk-backend", metavar="DOMAIN", default=None,
                     help="at the destination, serve the disks from this driver domain (default: its dom0); "
                          "real xl says this with -C and a config whose disks name backend=")
    rcv = _command(sub, "migrate-receive", "receive migrations (dom0's kernel runs this as a daemon)")
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
