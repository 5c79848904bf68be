"""The one exception of the store core.

Every rule violation raises `XenStoreError(name, why)` where `name` is one of
the error names of `io/xs_wire.h` (EINVAL, EACCES, ...).  Dispatch turns it
into an XS_ERROR reply in exactly one place; `why` is for logs only and never
travels on the wire.
"""

from __future__ import annotations

from xenbed.protocols.xs_wire import ERROR_NAMES


class XenStoreError(Exception):
    def __init__(self, name: str, why: str = "") -> None:
        if name not in ERROR_NAMES:
            raise ValueError(f"{name!r} is not an xs_wire error name")
        super().__init__(f"{name}: {why}" if why else name)
        self.name = name
        self.why = why
