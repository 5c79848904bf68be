"""The `xenbed` command: up, down, status, logs, trace, xl for a testbed run;
`check` for a block workload's history against a disk image.

`down`, `status` and `logs` find a run by its compose project label, so they
work without the compose file and also on a run docker-compose started.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import threading

from .compose import ComposeError
from .resources import DockerUnavailable, connect, remove_project
from .status import render_status_table
from .testbed import DEFAULT_COMPOSE, Testbed, TestbedError
from .xen import Xen

DEFAULT_PROJECT = "xenbed"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.action(args)
    except (ComposeError, TestbedError, DockerUnavailable) as error:
        print(f"xenbed {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenbed", description="Run the xenbed testbed on this Docker engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, action, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--project", "-p", default=DEFAULT_PROJECT,
                         help=f"compose project name of the run (default: {DEFAULT_PROJECT})")
        sub.set_defaults(action=action)
        return sub

    up = command("up", _up, "bring the testbed up and wait until it is healthy")
    up.add_argument("--compose", "-f", default=DEFAULT_COMPOSE, help=f"compose file (default: {DEFAULT_COMPOSE})")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for health (default: 300)")
    command("down", _down, "remove every container, network and volume of the run")
    command("status", _status, "show the run's containers, their state and health")
    logs = command("logs", _logs, "print the logs of the run's containers")
    logs.add_argument("service", nargs="?", help="only this service")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", default="all", help="lines from the end of each log (default: all)")
    bench = command("bench", _bench, "measure the speed figures beside their physical limits (out/bench.json)")
    bench.add_argument("--compose", "-f", default=DEFAULT_COMPOSE, help=f"compose file (default: {DEFAULT_COMPOSE})")
    bench.add_argument("--reuse", action="store_true",
                       help="measure the running testbed of --project instead of a fresh one")
    bench.add_argument("--suite", action="append", choices=sorted(bench_suites()), help="only this suite (repeatable)")
    bench.add_argument("--output", default="out/bench.json", help="where the JSON report goes")
    trace = command("trace", _trace, "draw a device's negotiation from a trace (out/traces/*.jsonl) "
                                     "or a domain's transitions.jsonl")
    trace.add_argument("file", help="JSONL trace file")
    trace.add_argument("--device", help="the device's backend or frontend dir (default: every device)")
    trace.add_argument("--format", choices=("mermaid", "svg", "markdown", "jsonl"), default="mermaid",
                       help="mermaid: one sequenceDiagram (needs --device when there are several); "
                            "svg: seed 000's layout; markdown: a Mermaid block per device; "
                            "jsonl: the records drawn, one a line (default: mermaid)")
    trace.add_argument("--kinds", default=",".join(diagram_kinds()),
                       help="which records to draw, comma-separated (default: all of "
                            f"{','.join(diagram_kinds())}; e.g. transition,chaos for the states only)")
    trace.add_argument("-o", "--output", help="write here instead of standard output")
    check = commands.add_parser("check", help="judge a block workload's history against a disk image",
                                description="The nothing-lost checker on files: a workload history (JSONL) "
                                            "and the raw disk image (or a copy of it) it ran on.  Exit 0 when "
                                            "nothing was lost, 1 when something was.")
    check.add_argument("history", help="the workload's history, e.g. out/traces/<test>.workload.jsonl")
    check.add_argument("image", help="raw disk image; the run's slots are read at slot x block size")
    check.add_argument("--json", action="store_true", help="print the result as JSON instead of the report")
    check.set_defaults(action=_check)
    xl = command("xl", _xl, "run xl in dom0 of the run, with these arguments")
    xl.add_argument("--xen-host", help="which Xen host's dom0, when the run has several: a host name (host-b) or "
                                   "a service of it (dom0-b); before xl's own arguments")
    xl.add_argument("xl_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments of xl (e.g. list)")
    return parser


def diagram_kinds() -> tuple[str, ...]:
    from .diagram import ALL_KINDS
    return ALL_KINDS


def _trace(args) -> int:
    from . import diagram, trace
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(diagram.ALL_KINDS))
    if unknown:
        print(f"xenbed trace: unknown kinds {', '.join(unknown)}; known: {', '.join(diagram.ALL_KINDS)}",
              file=sys.stderr)
        return 2
    try:
        with open(args.file, encoding="utf-8") as f:
            records = trace.transition_records(f, service="")  # a trace's own kinds are kept
    except OSError as error:
        print(f"xenbed trace: {error}", file=sys.stderr)
        return 1
    found = diagram.devices(records)
    device = diagram.device_of(args.device) if args.device else None
    if device is not None and device not in found:
        print(f"xenbed trace: no transitions of {args.device} in {args.file}; devices: {', '.join(found) or 'none'}",
              file=sys.stderr)
        return 1
    if args.format == "svg":
        text = diagram.render_svg(records, device, kinds)
    elif args.format == "markdown":
        text = diagram.render_markdown(records, args.file, kinds, only=device)
    elif args.format == "jsonl":
        import json
        chosen = [device] if device else found
        drawn = {id(r): r for d in chosen for r in diagram.device_records(records, d, kinds)}
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(drawn.values(), key=lambda r: r["ts"]))
    else:
        if device is None and len(found) != 1:
            print(f"xenbed trace: {len(found)} devices in {args.file}, say which with --device: "
                  f"{', '.join(found) or 'none'} (or use --format markdown)", file=sys.stderr)
            return 2
        text = diagram.render_mermaid(records, device or found[0], kinds)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _check(args) -> int:
    from . import checker
    from xenbed.protocols import workload
    try:
        with open(args.history, encoding="utf-8") as f:
            history = workload.parse_history(f)
        run = next(r for r in history if r.get("type") == workload.RUN)
        size = run["block_size"]
        with open(args.image, "rb") as f:
            f.seek(run["first_slot"] * size)
            region = f.read(run["slot_count"] * size)
        result = checker.check(history, region)
    except StopIteration:
        print(f"xenbed check: {args.history} has no run record: not a workload history", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:
        print(f"xenbed check: {error}", file=sys.stderr)
        return 2
    print(checker.dump_result(result) if args.json else result.render())
    return 0 if result.ok else 1


def _xl(args) -> int:
    """`xl ARGS` in dom0: its output and its exit status, as if run there."""
    testbed = Testbed(args.project, client=connect())
    try:
        result = testbed.exec(Xen(testbed).dom0(args.xen_host), ["xl", *args.xl_args])
    except LookupError as error:  # no such container, or XenHostError: no such host / say which
        print(f"xenbed xl: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_code


def bench_suites():
    from . import bench
    return bench.SUITES


def _bench(args) -> int:
    from . import bench
    from .runenv import run_environment
    if args.reuse:
        testbed = Testbed(args.project, client=connect())
        report = bench.run(testbed, args.suite)
    else:
        client = connect()
        testbed = Testbed.from_compose(args.compose, f"xenbed-bench-{secrets.token_hex(3)}", client=client,
                                       env=run_environment(client, args.compose))
        try:
            testbed.up(progress=print)
            report = bench.run(testbed, args.suite)
        finally:
            testbed.down()
    path = bench.write(report, args.output)
    print(bench.render(report))
    print(f"report: {path}")
    return 0


def _up(args) -> int:
    # keep=True: the run must outlive this process, so the reaper must leave it alone
    testbed = Testbed.from_compose(args.compose, args.project, keep=True)
    testbed.up(timeout=args.timeout, progress=print)
    _print_status(testbed)
    return 0


def _down(args) -> int:
    removed = remove_project(connect(), f"com.docker.compose.project={args.project}")
    print(f"removed {len(removed)} resources of {args.project}" if removed else f"nothing to remove for {args.project}")
    return 0


def _status(args) -> int:
    _print_status(Testbed(args.project, client=connect()))
    return 0


def _print_status(testbed: Testbed) -> None:
    rows = testbed.status()
    print(render_status_table(rows))
    # The domains as each Xen host's toolstack sees them, for each one whose dom0 runs.
    running = {row.get("service") for row in rows if row.get("state") == "running"}
    xen = Xen(testbed)
    xen_hosts = [h for h in xen.xen_hosts().values() if h.dom0 in running]
    for xen_host in xen_hosts:
        print()
        if len(xen_hosts) > 1:
            print(f"== {xen_host.name} (xl and store of {xen_host.dom0}) ==")
        listing = testbed.exec(xen_host.dom0, ["xl", "list"])
        print(listing.stdout.rstrip() if listing.exit_code == 0 else f"xl list failed: {listing.stderr.strip()}")
        from .domains import devices_in, domain_names, render_devices_table
        try:
            tree = xen.store_tree(xen_host=xen_host.dom0)
        except Exception as error:  # the store may be what is broken: the rest was still worth printing
            print(f"\ndevices: cannot read the store: {error}")
            continue
        print()
        print(render_devices_table(devices_in(tree), domain_names(tree)))


def _logs(args) -> int:
    testbed = Testbed(args.project, client=connect())
    services = [args.service] if args.service else testbed.services()
    if not services:
        print(f"no containers for {args.project}", file=sys.stderr)
        return 1
    tail = args.tail if args.tail == "all" else int(args.tail)
    prefix = len(services) > 1
    width = max(map(len, services))
    printing = threading.Lock()  # one line at a time when several logs interleave

    def show(service: str) -> None:
        container = testbed.container(service)
        chunks = container.logs(stream=args.follow, follow=args.follow, tail=tail)
        lines = (chunks.decode(errors="replace").splitlines(keepends=True) if not args.follow
                 else _lines(chunks))
        for line in lines:
            with printing:
                sys.stdout.write(f"{service.ljust(width)} | {line}" if prefix else line)
                sys.stdout.flush()

    threads = [threading.Thread(target=show, args=(s,), daemon=True) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # short joins so Ctrl-C reaches the main thread
    return 0


def _lines(chunks):
    """Whole lines from a stream of byte chunks (a chunk may end mid-line)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace") + "\n"
    if pending:
        yield pending.decode(errors="replace") + "\n"


if __name__ == "__main__":
    sys.exit(main())
