"""The domain table: who exists, with which privilege, bound by which credential.

Pure bookkeeping, no I/O.  The server shell asks it whether a credential names
a domain (`authenticate`) and whether a domain may perform a call (`require`).

Privileges follow Xen's two capabilities (seed 004): the control domain
(dom0, DF_PRIVILEGED) may create, inspect and destroy domains; a driver domain
(DF_PHYSDEV only, `backend` here) may host backends but control nothing; a
plain guest has neither.

Credentials.  Each domain is bound to a random 128-bit credential issued when
it is created; a container proves it *is* that domain by presenting it in
HELLO, and everything it does afterwards is done as that domid.  The domains a
compose file declares are pre-provisioned: the hypervisor-service starts with
`XENBED_CREDENTIALS=name=cred,...`, the container with `XENBED_CREDENTIAL`, so
a container may start before or after `xl create` names it.  A domain created
under any other name gets a fresh credential, returned only to its creator.
"""

from __future__ import annotations

import enum
import hmac
import secrets
import time
from dataclasses import dataclass, field

DOMID_FIRST_GUEST = 1
DOMID_FIRST_RESERVED = 0x7FF0  # DOMID_FIRST_RESERVED in xen.h: ids above are special


class Privilege(str, enum.Enum):
    CONTROL = "control"  # dom0: everything
    BACKEND = "backend"  # driver domain: may host backends, may not control domains
    NONE = "none"  # a plain guest


class DomainState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"  # the guest saved its state; memory stays, nothing runs
    DYING = "dying"  # its kernel went away; resources are being torn down


# SCHEDOP_shutdown's reasons (sched.h SHUTDOWN_*), by the names xl prints.
SHUTDOWN_REASONS = ("poweroff", "reboot", "suspend", "crash")


class DomainError(Exception):
    """A call the domain table refuses; `code` is the errno name sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Domain:
    domid: int
    name: str
    privilege: Privilege
    credential: str = field(repr=False)
    memory_mb: int
    state: DomainState = DomainState.RUNNING
    created_at: float = field(default_factory=time.time)
    kernel_connected: bool = False
    # Why the domain last shut down (Xen's shutdown_code): "suspend" while it
    # is suspended, "" while it runs.
    shutdown_reason: str = ""

    @property
    def is_control(self) -> bool:
        return self.privilege is Privilege.CONTROL

    def summary(self) -> dict:
        return {
            "domid": self.domid,
            "name": self.name,
            "privilege": self.privilege.value,
            "memory_mb": self.memory_mb,
            "state": self.state.value,
            "connected": self.kernel_connected,
            "created_at": self.created_at,
            "shutdown_reason": self.shutdown_reason,
        }


def parse_credentials(spec: str) -> dict[str, str]:
    """`dom0=abc,domu1=def` -> {"dom0": "abc", "domu1": "def"}."""
    table: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, credential = item.partition("=")
        if not sep or not name or not credential:
            raise ValueError(f"bad credential entry {item!r}: expected name=credential")
        table[name] = credential
    return table


class DomainTable:
    def __init__(self, preprovisioned: dict[str, str] | None = None, dom0_memory_mb: int = 1024) -> None:
        self._preprovisioned = dict(preprovisioned or {})
        self._domains: dict[int, Domain] = {}
        self._next_domid = DOMID_FIRST_GUEST
        dom0_credential = self._preprovisioned.get("dom0") or secrets.token_hex(16)
        self._domains[0] = Domain(0, "Domain-0", Privilege.CONTROL, dom0_credential, dom0_memory_mb)

    # -- queries -------------------------------------------------------------
    def get(self, domid: int) -> Domain:
        try:
            return self._domains[domid]
        except KeyError:
            raise DomainError("ESRCH", f"no domain {domid}") from None

    def by_name(self, name: str) -> Domain | None:
        for domain in self._domains.values():
            if domain.name == name and domain.state is not DomainState.DYING:
                return domain
        return None

    def list(self) -> list[Domain]:
        return sorted(self._domains.values(), key=lambda d: d.domid)

    def authenticate(self, credential: str) -> Domain:
        """The live domain this credential is bound to.  Compared in constant
        time so that a guest cannot guess another's credential byte by byte."""
        matches = [d for d in self._domains.values()
                   if hmac.compare_digest(d.credential.encode(), credential.encode())]
        live = [d for d in matches if d.state is not DomainState.DYING]
        if live:
            return live[0]
        if matches:
            raise DomainError("ESRCH", f"domain {matches[0].domid} ({matches[0].name}) is dying")
        raise DomainError("ENOENT", "no domain holds this credential (not created yet?)")

    @staticmethod
    def require_control(caller: Domain, what: str) -> None:
        if not caller.is_control:
            raise DomainError("EPERM", f"{what} needs the control privilege; domain {caller.domid} has {caller.privilege.value}")

    # -- changes -------------------------------------------------------------
    def create(self, caller: Domain, name: str, memory_mb: int, privilege: Privilege = Privilege.NONE) -> Domain:
        self.require_control(caller, "creating a domain")
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise DomainError("EINVAL", f"bad domain name {name!r}")
        if self.by_name(name) is not None:
            raise DomainError("EEXIST", f"a domain named {name!r} exists")
        if not isinstance(memory_mb, int) or not 1 <= memory_mb <= 65536:
            raise DomainError("EINVAL", f"bad memory size {memory_mb!r} MiB")
        if privilege is Privilege.CONTROL:
            raise DomainError("EPERM", "a second control domain cannot be created")
        domid = self._allocate_domid()
        credential = self._preprovisioned.get(name) or secrets.token_hex(16)
        domain = Domain(domid, name, privilege, credential, memory_mb)
        self._domains[domid] = domain
        return domain

    def _allocate_domid(self) -> int:
        # Xen hands out increasing domids and wraps below the reserved range;
        # never reusing one soon keeps stale references from hitting a newcomer.
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self._next_domid
            self._next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else DOMID_FIRST_GUEST
            if domid not in self._domains:
                return domid
        raise DomainError("ENOSPC", "no free domid")

    def _guest_to_control(self, caller: Domain, domid: int, what: str) -> Domain:
        """The live guest `domid`, which only the control domain may `what`."""
        self.require_control(caller, "changing the run state of a domain")
        domain = self.get(domid)
        if domid == 0:
            raise DomainError("EINVAL", f"dom0 cannot be {what}")
        if domain.state is DomainState.DYING:
            raise DomainError("ESRCH", f"domain {domid} is dying")
        return domain

    def set_paused(self, caller: Domain, domid: int, paused: bool) -> Domain:
        domain = self._guest_to_control(caller, domid, "paused" if paused else "unpaused")
        domain.state = DomainState.PAUSED if paused else DomainState.RUNNING
        return domain

    def set_suspended(self, caller: Domain, domid: int, suspended: bool) -> Domain:
        domain = self._guest_to_control(caller, domid, "suspended" if suspended else "resumed")
        if suspended == (domain.state is DomainState.SUSPENDED):
            raise DomainError("EINVAL", f"domain {domid} is {'already' if suspended else 'not'} suspended")
        domain.state = DomainState.SUSPENDED if suspended else DomainState.RUNNING
        domain.shutdown_reason = "suspend" if suspended else ""
        return domain

    def shutdown_self(self, caller: Domain, reason: str) -> Domain:
        """SCHEDOP_shutdown: a domain stops itself.  Only "suspend" changes
        the state here (the domain stays, its memory, grants and ports too);
        "poweroff", "reboot" and "crash" are recorded as the reason -- the
        toolstack destroys or recreates the domain, as libxl does on
        @releaseDomain.  dom0 cannot suspend (it runs the toolstack that
        would have to resume it)."""
        if reason not in SHUTDOWN_REASONS:
            raise DomainError("EINVAL", f"unknown shutdown reason {reason!r}; one of {', '.join(SHUTDOWN_REASONS)}")
        if caller.domid == 0 and reason == "suspend":
            raise DomainError("EINVAL", "dom0 cannot suspend itself")
        if caller.state is DomainState.DYING:
            raise DomainError("ESRCH", f"domain {caller.domid} is dying")
        if reason == "suspend":
            if caller.state is DomainState.SUSPENDED:
                raise DomainError("EBUSY", f"domain {caller.domid} is suspended already")
            caller.state = DomainState.SUSPENDED
        caller.shutdown_reason = reason
        return caller

    def mark_dying(self, domid: int) -> Domain:
        domain = self.get(domid)
        domain.state = DomainState.DYING
        domain.kernel_connected = False
        return domain

    def destroy(self, caller: Domain, domid: int) -> Domain:
        self.require_control(caller, "destroying a domain")
        if domid == 0:
            raise DomainError("EINVAL", "dom0 cannot be destroyed")
        return self._domains.pop(self.get(domid).domid)

    def forget(self, domid: int) -> None:
        self._domains.pop(domid, None)
