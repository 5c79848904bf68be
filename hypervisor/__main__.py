"""`python3 -m xenbed.hypervisor`: the hypervisor-service (domains, xenstored).

`--health` instead asks a running service over its socket whether it answers
(the container's healthcheck)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from xenbed.hypervisor.domains import DomainTable, parse_credentials
from xenbed.hypervisor.server import HypervisorServer
from xenbed.hypervisor.sharing import Sharing
from xenbed.hypervisor.trace import DEFAULT_MAX_BYTES, FileSink, Tracer, enabled_by_environment
from xenbed.hypervisor.trace import default_path as trace_default_path
from xenbed.hypervisor.xenstored import XenStore, XenStoreError
from xenbed.hypervisor.xenstored.quota import Quota
from xenbed.protocols import hypercall as hc


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="xenbed-hypervisor", description=__doc__)
    parser.add_argument("--run-dir", default=os.environ.get("XENBED_RUN_DIR", "/run/xenbed"),
                        help="where hypervisor.sock is created (a volume the domains share)")
    parser.add_argument("--memory-dir", default=os.environ.get("XENBED_MEMORY_DIR", "/var/lib/xenbed/memory"),
                        help="guest memory: page files on a tmpfs only the hypervisor and dom0 mount")
    parser.add_argument("--health", action="store_true", help="check that a running service answers, then exit")
    parser.add_argument("--trace-file", default=trace_default_path(),
                        help="the trace (JSONL) of every store, watch, grant and event-channel operation; "
                             "XENBED_TRACE=0 turns it off, SIGUSR1/SIGUSR2 turn it on/off while running")
    parser.add_argument("--trace-max-bytes", type=int,
                        default=int(os.environ.get("XENBED_TRACE_MAX_BYTES", DEFAULT_MAX_BYTES)),
                        help="rotate the trace to <file>.1 at this size (one old file is kept)")
    parser.epilog = ("xenstored quotas may follow, as --quota-NAME VALUE (names: "
                     + ", ".join(Quota.names()) + "); dom0 is exempt from all of them.")
    args, rest = parser.parse_known_args(argv)
    try:
        args.quota = Quota.parse(rest)
    except XenStoreError as exc:
        parser.error(str(exc))
    return args


def health(run_dir: str) -> int:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(os.path.join(run_dir, "hypervisor.sock"))
            sock.sendall(hc.call(hc.Call.PING, 1).encode())
            reader = hc.FrameReader()
            while (frame := reader.next_frame()) is None:
                data = sock.recv(4096)
                if not data:
                    break
                reader.feed(data)
    except OSError as exc:
        print(f"hypervisor-service does not answer on {run_dir}/hypervisor.sock: {exc}", file=sys.stderr)
        return 1
    if frame is None or not frame.body.get("pong"):
        print(f"unexpected answer to PING: {frame}", file=sys.stderr)
        return 1
    return 0


def open_trace(path: str, max_bytes: int) -> tuple[Tracer, FileSink | None]:
    """The trace (XENBED_TRACE, default on) and its file; tracing stays off,
    with a warning, when the file cannot be opened."""
    tracer = Tracer(enabled=enabled_by_environment())
    try:
        return tracer, FileSink(path, max_bytes=max_bytes)
    except OSError as exc:
        logging.getLogger("xenbed.hypervisor").warning("no trace: cannot open %s: %s", path, exc)
        return Tracer.disabled(), None


async def serve(args) -> None:
    credentials = parse_credentials(os.environ.get("XENBED_CREDENTIALS", ""))
    tracer, sink = open_trace(args.trace_file, args.trace_max_bytes)
    server = HypervisorServer(args.run_dir, DomainTable(credentials), XenStore(args.quota), Sharing(args.memory_dir),
                              tracer, sink)
    await server.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stopping.set)
    if sink is not None:
        # A running service's trace switch: the bench measures with it off and on.
        loop.add_signal_handler(signal.SIGUSR1, server.tracer.set_enabled, True)
        loop.add_signal_handler(signal.SIGUSR2, server.tracer.set_enabled, False)
    await server.stopping.wait()
    await server.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.health:
        return health(args.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
