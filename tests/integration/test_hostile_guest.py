"""A guest that misbehaves on purpose: bad bytes, other domains' identities,
privileged calls.  Each refusal is asserted, and the daemons must live on."""

from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = pytest.mark.integration


def guest_python(testbed, service: str, script: str) -> dict:
    result = testbed.exec(service, ["python3", "-c", textwrap.dedent(script)])
    assert result.exit_code == 0, f"{service} script failed: {result.stdout}{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_oversized_xenstore_header_closes_only_that_connection(testbed):
    out = guest_python(testbed, "domu1", """
        import json, os, socket, struct
        path = os.environ["XENSTORED_PATH"]
        bad = socket.socket(socket.AF_UNIX); bad.connect(path)
        # XS_READ announcing 4097 bytes of payload: above XENSTORE_PAYLOAD_MAX
        bad.sendall(struct.pack("<IIII", 2, 1, 0, 4097) + b"x" * 64)
        bad.settimeout(5)
        closed = bad.recv(100) == b""
        good = socket.socket(socket.AF_UNIX); good.connect(path)
        good.sendall(struct.pack("<IIII", 2, 9, 0, 6) + b"domid\\0")
        good.settimeout(5)
        reply = good.recv(100)
        print(json.dumps({"closed": closed, "req_id": struct.unpack_from("<IIII", reply)[1],
                          "value": reply[16:].decode()}))
    """)
    assert out["closed"], "xenstored kept reading a stream it cannot frame"
    assert out["req_id"] == 9 and out["value"].isdigit()


def test_garbage_and_unknown_types_get_errors_not_crashes(testbed):
    out = guest_python(testbed, "domu1", """
        import json, os, socket, struct
        s = socket.socket(socket.AF_UNIX); s.connect(os.environ["XENSTORED_PATH"])
        s.settimeout(5)
        answers = []
        for op, payload in ((20, b""), (0xFFFF, b"x\\0"), (15, b"a\\0b\\0"), (2, b"no-nul"),
                            (11, b"/bad//path\\0v"), (8, b"5\\0nonsense\\0x\\0")):
            s.sendall(struct.pack("<IIII", op, 77, 0, len(payload)) + payload)
            header = s.recv(16)
            body = s.recv(struct.unpack("<IIII", header)[3])
            answers.append([struct.unpack("<IIII", header)[0], body.rstrip(b"\\0").decode()])
        print(json.dumps(answers))
    """)
    assert out == [[16, "ENOSYS"], [16, "ENOSYS"], [16, "ENOSYS"], [16, "EINVAL"], [16, "EINVAL"], [16, "EACCES"]]
    # and the store still answers everyone
    assert testbed.exec("dom0", ["xenstore-read", "/local/domain/0/name"]).stdout.strip() == "Domain-0"


HYPERCALL = """
    import json, os
    from xenbed.drivers.xen.hypercall import HypervisorLink, HypercallError
    from xenbed.protocols import hypercall as hc
    def attempt(fn):
        try:
            fn()
            return "allowed"
        except HypercallError as exc:
            return exc.code
    results = {}
"""


def test_a_guest_cannot_become_another_domain_or_act_as_dom0(testbed):
    out = guest_python(testbed, "domu1", textwrap.dedent(HYPERCALL) + textwrap.dedent("""
        def hello(credential, role):
            link = HypervisorLink(); link.connect()
            try:
                link.hello(credential, role)
            finally:
                link.close()
        results["guessed credential"] = attempt(lambda: hello("0" * 32, "device"))
        # its own credential a second time as a kernel: one kernel per domain
        results["second kernel"] = attempt(lambda: hello(os.environ["XENBED_CREDENTIAL"], "kernel"))
        link = HypervisorLink.open(role="device")
        results["whoami"] = link.call(hc.Call.WHOAMI)["name"]
        results["create"] = attempt(lambda: link.call(hc.Call.DOMAIN_CREATE, {"name": "evil", "memory_mb": 8}))
        results["destroy dom2"] = attempt(lambda: link.call(hc.Call.DOMAIN_DESTROY, {"domid": 2}))
        results["list"] = attempt(lambda: link.call(hc.Call.DOMAIN_LIST))
        results["call before hello"] = attempt(lambda: (lambda l: (l.connect(), l.call(hc.Call.WHOAMI)))(HypervisorLink()))
        print(json.dumps(results))
    """))
    assert out == {
        "guessed credential": "ENOENT",
        "second kernel": "EBUSY",
        "whoami": "domu1",
        "create": "EPERM",
        "destroy dom2": "EPERM",
        "list": "EPERM",
        "call before hello": "EACCES",
    }
    # domu2 is untouched
    assert testbed.exec("domu2", ["xenstore-read", "name"]).stdout.strip() == "domu2"


def test_garbage_on_the_hypervisor_socket_drops_only_that_link(testbed):
    out = guest_python(testbed, "domu2", """
        import json, socket
        s = socket.socket(socket.AF_UNIX); s.connect("/run/xenbed/hypervisor.sock")
        s.sendall(b"\\xff" * 64)  # a frame header announcing a 4 GiB body
        s.settimeout(5)
        print(json.dumps({"closed": s.recv(10) == b""}))
    """)
    assert out["closed"]
    assert testbed.exec("dom0", ["xl", "list"]).exit_code == 0
