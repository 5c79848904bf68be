"""The XenStore wire protocol of Xen's `io/xs_wire.h`, with no I/O in it.

Both ends share this module: xenstored in the hypervisor-service and the
store client in the domains.  A message is a 16-byte header of four
little-endian uint32 -- type, req_id, tx_id, len -- followed by `len` bytes
of payload, usually NUL-terminated strings.  `PacketReader` turns a byte
stream into packets (feed it bytes, take packets out, `None` means it needs
more data), `Packet.encode()` turns a packet back into bytes.

Misuse by the caller raises `ValueError`; a peer that breaks the protocol
(a header announcing more than XENSTORE_PAYLOAD_MAX bytes) raises
`WireProtocolError`, after which the stream cannot be trusted and the
connection must be closed.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16

PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX: "violating this is very bad"
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX: violating it gets an error back
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX

WRITE_NONE = "NONE"
WRITE_CREATE = "CREATE"
WRITE_CREATE_EXCL = "CREATE|EXCL"


class Op(enum.IntEnum):
    """enum xsd_sockmsg_type, values exactly as in xs_wire.h."""

    CONTROL = 0  # formerly XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT; it has been removed and must be answered ENOSYS.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"UNKNOWN({value})"


TYPE_COUNT = 23  # XS_TYPE_COUNT
INVALID = 0xFFFF  # XS_INVALID: guaranteed to remain an invalid type

# struct xsd_errors, in the header's order.  Errors travel as their names.
ERROR_NAMES = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)


class WireProtocolError(Exception):
    """The peer sent something that is not the XenStore wire protocol."""


@dataclass(slots=True)
class Packet:
    """One message in either direction.  `op` is an int so that unknown
    types survive decoding and can be answered with ENOSYS."""

    op: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > PAYLOAD_MAX:
            raise ValueError(
                f"payload of {len(self.payload)} bytes exceeds XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})"
            )
        return HEADER.pack(self.op, self.req_id, self.tx_id, len(self.payload)) + self.payload

    @property
    def op_name(self) -> str:
        return Op.name_of(self.op)

    def strings(self) -> list[str]:
        return split_strings(self.payload)

    def reply(self, payload: bytes) -> Packet:
        """A reply echoes the request's type, req_id and tx_id."""
        return Packet(self.op, self.req_id, self.tx_id, payload)

    def error_reply(self, name: str) -> Packet:
        return Packet(Op.ERROR, self.req_id, self.tx_id, error_payload(name))

    def is_error(self) -> bool:
        return self.op == Op.ERROR

    def error_name(self) -> str | None:
        if self.op != Op.ERROR:
            return None
        return self.payload.rstrip(b"\0").decode("ascii", "replace")


class PacketReader:
    """Accumulates bytes and yields complete packets (sans-I/O).

    >>> r = PacketReader(); r.feed(Packet(Op.READ, 7, 0, b"a\\0").encode())
    >>> r.next_packet()
    Packet(op=<Op.READ: 2>, req_id=7, tx_id=0, payload=b'a\\x00')
    """

    def __init__(self, payload_max: int = PAYLOAD_MAX) -> None:
        self._buffer = bytearray()
        self._payload_max = payload_max

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None when more bytes are needed.

        Raises WireProtocolError as soon as a header announces a payload
        larger than the limit: the rest of the stream cannot be framed."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        op, req_id, tx_id, length = HEADER.unpack_from(self._buffer)
        if length > self._payload_max:
            raise WireProtocolError(
                f"header announces a {length}-byte payload, above XENSTORE_PAYLOAD_MAX ({self._payload_max})"
            )
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        try:
            op = Op(op)
        except ValueError:
            pass
        return Packet(op, req_id, tx_id, payload)

    def __iter__(self):
        while (packet := self.next_packet()) is not None:
            yield packet


def split_strings(payload: bytes) -> list[str]:
    """NUL-separated strings; a final NUL terminates rather than separates."""
    if not payload:
        return []
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return [part.decode("utf-8", "surrogateescape") for part in payload.split(b"\0")]


def join_strings(*parts: str, terminate: bool = True) -> bytes:
    data = b"\0".join(p.encode("utf-8", "surrogateescape") for p in parts)
    return data + b"\0" if terminate else data


def error_payload(name: str) -> bytes:
    if name not in ERROR_NAMES:
        raise ValueError(f"{name!r} is not an xs_wire error name")
    return name.encode("ascii") + b"\0"


def watch_event(path: str, token: str) -> Packet:
    """XS_WATCH_EVENT: unsolicited, req_id and tx_id are 0."""
    return Packet(Op.WATCH_EVENT, 0, 0, join_strings(path, token))
