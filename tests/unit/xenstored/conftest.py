"""Step tables for the store core, as ocaml-xenstore's server tests:
each step is (connection, tx, op, payload, expected) with a comment naming
the rule.  `expected` is the reply payload (bytes), an error name ("EACCES"),
ANY (any non-error reply), or Tx("name") for a TRANSACTION_START whose id is
remembered under that name; `tx` is 0, an int, or such a name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from xenbed.hypervisor.xenstored import Quota, XenStore
from xenbed.protocols.xs_wire import Op, Packet

OK = b"OK\0"
ANY = object()


@dataclass(frozen=True)
class Tx:
    name: str


class World:
    """A store with dom0 ("d0") and introduced domains 1 and 2 ("d1", "d2"),
    each owning /local/domain/<n> as a toolstack would set it up."""

    def __init__(self, quota: Quota | None = None, **kw) -> None:
        self.store = XenStore(quota, **kw)
        self.conns = {"d0": self.store.connect(0)}
        self.txs: dict[str, int] = {}
        for n in (1, 2):
            self.store.introduce_domain(n)
            self.conns[f"d{n}"] = self.store.connect(n)
            self.do("d0", Op.MKDIR, f"/local/domain/{n}\0".encode())
            self.do("d0", Op.SET_PERMS, f"/local/domain/{n}\0n{n}\0r0\0".encode())
        self.store.take_outgoing()

    def connect(self, name: str, domid: int, privileged: bool | None = None):
        self.conns[name] = self.store.connect(domid, privileged)
        return self.conns[name]

    def do(self, conn: str, op: int, payload: bytes, tx=0) -> Packet:
        tx_id = self.txs[tx] if isinstance(tx, str) else tx
        return self.store.handle(self.conns[conn], Packet(op, 42, tx_id, payload))

    def run(self, steps) -> None:
        for i, (conn, tx, op, payload, expected) in enumerate(steps):
            reply = self.do(conn, op, payload, tx)
            where = f"step {i}: {conn} {Op.name_of(op)} {payload!r}"
            assert reply.req_id == 42, where
            if isinstance(expected, str):
                assert reply.error_name() == expected, f"{where} -> {reply}"
                continue
            assert not reply.is_error(), f"{where} -> {reply.error_name()}"
            assert reply.op == op, where
            if isinstance(expected, Tx):
                self.txs[expected.name] = int(reply.payload.rstrip(b"\0"))
            elif expected is not ANY:
                assert reply.payload == expected, f"{where} -> {reply.payload!r}"

    def events(self) -> dict[str, list[tuple[str, str]]]:
        names = {id(c): n for n, c in self.conns.items()}
        out: dict[str, list[tuple[str, str]]] = {}
        for conn, packets in self.store.take_outgoing():
            for p in packets:
                assert p.op == Op.WATCH_EVENT and p.req_id == 0 and p.tx_id == 0
                path, token = p.payload.split(b"\0")[:2]
                out.setdefault(names[id(conn)], []).append((path.decode(), token.decode()))
        return out


@pytest.fixture
def world() -> World:
    return World()
