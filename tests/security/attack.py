"""What the tests in tests/security share: running an attacker's script in
a container and reading its one-line JSON verdict."""

from __future__ import annotations

import json
import textwrap


def sh(testbed, service: str, script: str, check: bool = True) -> str:
    return testbed.exec(service, ["sh", "-c", script], check=check).stdout


def python_in(testbed, service: str, script: str, timeout: float | None = None) -> dict:
    """Run `script` with the container's python3 (the project's code is on
    its PYTHONPATH); its last line of output is JSON."""
    result = testbed.exec(service, ["python3", "-c", textwrap.dedent(script)], timeout=timeout)
    assert result.exit_code == 0, f"{service} script failed: {result.stdout}{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def everyone_still_answers(testbed) -> None:
    """After an attack: the hypervisor, dom0, xenstored and both guests answer."""
    health = testbed.exec("hypervisor", ["python3", "-m", "xenbed.hypervisor", "--health"])
    assert health.exit_code == 0, f"the hypervisor does not answer: {health.stdout}{health.stderr}"
    assert testbed.exec("dom0", ["xenstore-read", "/local/domain/0/name"]).stdout.strip() == "Domain-0"
    assert testbed.exec("domu2", ["xenstore-read", "name"]).stdout.strip() == "domu2"
    assert testbed.exec("domu1", ["xenstore-read", "name"]).stdout.strip() == "domu1"


def uplink_of(testbed, service: str) -> str:
    """The container's interface with a global IPv4 address: eth0 when it
    started, another name after a test cut and restored its network."""
    return sh(testbed, service, "ip -4 -o addr show scope global").split()[1]


def address_of(testbed, service: str, dev: str = "") -> str:
    """The container's first global IPv4 address (on `dev` if given)."""
    return sh(testbed, service, f"ip -4 -o addr show {dev} scope global").split()[3].split("/")[0]


# A connection attempt from inside a container: "refused", "timeout" or "open".
CONNECT = """
    import json, socket
    def attempt(host, port):
        try:
            socket.create_connection((host, port), timeout=3).close()
            return "open"
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            return type(exc).__name__
"""
