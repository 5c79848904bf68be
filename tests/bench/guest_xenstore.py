"""Runs inside a domain container (sent by tests/bench/run.py as `python3 -c`).

Measures, over the same kind of Unix socket from the same container:
  * the round trip of one XS_READ through the kernel's XENSTORED_PATH socket,
    which xenstored (in the hypervisor-service) serves directly;
  * the round trip of the same bytes through the hypervisor-service's raw echo
    socket: the physical limit for any request/response over a Unix socket;
  * pipelined READ throughput with N client processes, each keeping a window
    of requests in flight.
Prints one JSON object.
"""

import json
import multiprocessing
import os
import socket
import struct
import sys
import time

HEADER = struct.Struct("<IIII")
XS_READ = 2
XS_WRITE = 11
STORE = os.environ.get("XENSTORED_PATH", "/run/xenstored/socket")
ECHO = "/run/xenbed/echo.sock"


def packet(op, req_id, payload):
    return HEADER.pack(op, req_id, 0, len(payload)) + payload


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def rtt_samples(path, request, reply_len, count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    samples = []
    for i in range(count + 50):
        t0 = time.perf_counter_ns()
        sock.sendall(request)
        recv_exact(sock, reply_len)
        if i >= 50:  # warm-up
            samples.append(time.perf_counter_ns() - t0)
    sock.close()
    samples.sort()
    return samples


def p50_us(samples):
    return samples[len(samples) // 2] / 1000.0


def pipelined_client(args):
    seconds, window, value_path = args
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(STORE)
    request = packet(XS_READ, 1, value_path)
    batch = request * window
    done = 0
    buffered = b""
    deadline = time.perf_counter() + seconds
    sock.sendall(batch)
    inflight = window
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("xenstored closed the connection")
        buffered += data
        replies = 0
        while len(buffered) >= 16:
            length = HEADER.unpack_from(buffered)[3]
            if len(buffered) < 16 + length:
                break
            buffered = buffered[16 + length:]
            replies += 1
        done += replies
        inflight -= replies
        if time.perf_counter() < deadline:
            if replies:
                sock.sendall(request * replies)
                inflight += replies
        elif inflight == 0:
            break
    sock.close()
    return done


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    # a node the guest owns, so the READ is a real permission-checked lookup
    setup = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    setup.connect(STORE)
    setup.sendall(packet(XS_WRITE, 1, b"data/bench\0" + b"x" * 16))
    recv_exact(setup, 16 + 3)
    setup.close()
    path = b"data/bench\0"
    request = packet(XS_READ, 7, path)
    reply_len = 16 + 16
    # Alternate short rounds of the two, so that whatever else the machine is
    # doing (2 cores) weighs on both figures alike.
    store, echo = [], []
    rounds = 10
    for _ in range(rounds):
        store += rtt_samples(STORE, request, reply_len, count // rounds)
        echo += rtt_samples(ECHO, request, len(request), count // rounds)
    store.sort()
    echo.sort()
    with multiprocessing.Pool(clients) as pool:
        t0 = time.perf_counter()
        totals = pool.map(pipelined_client, [(seconds, 32, path)] * clients)
        elapsed = time.perf_counter() - t0
    print(json.dumps({
        "read_rtt_us": p50_us(store),
        "read_rtt_us_p99": store[int(len(store) * 0.99)] / 1000.0,
        "echo_rtt_us": p50_us(echo),
        "echo_rtt_us_p99": echo[int(len(echo) * 0.99)] / 1000.0,
        "ops": sum(totals),
        "ops_seconds": elapsed,
        "clients": clients,
    }))


if __name__ == "__main__":
    main()
