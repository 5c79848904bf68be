"""Reading the values drivers find in the store, one way for both ends.

Two kinds of reader, because the two ends of a device trust different things:

* a backend reading what its frontend wrote (`ring-ref`, `event-channel`,
  `feature-*`) treats a malformed value as the frontend's error: it is
  fatal for the device (Linux's xenbus_scanf failing in connect_ring), so
  `read_uint` / `read_flag` raise `BadNode` with the errno to report;
* a frontend reading its backend's advertised features treats a missing or
  unreadable value as "not offered" (`feature_flag`, `read_int`), as
  Linux's xenbus_read_unsigned does with its default.
"""

from __future__ import annotations

import errno

U32_MAX = 0xFFFFFFFF


class BadNode(Exception):
    """A store node the other end wrote is missing or malformed; `err` is the
    errno to report with dev_fatal."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.err = err


def read_uint(text: str | None, key: str, limit: int = U32_MAX) -> int:
    """An unsigned decimal no larger than `limit`; BadNode(ENOENT) when the
    node is missing, BadNode(EINVAL) when it is not such a number."""
    if text is None:
        raise BadNode(errno.ENOENT, f"reading {key}: missing")
    text = text.strip()
    if not text.isascii() or not text.isdigit() or int(text) > limit:
        raise BadNode(errno.EINVAL, f"reading {key}: {text!r} is not an unsigned number")
    return int(text)


def read_flag(text: str | None, key: str, default: bool = False) -> bool:
    """A strict feature node: absent is `default`, otherwise an unsigned
    number where non-zero is on (anything else is BadNode)."""
    return default if text is None else read_uint(text, key) != 0


def feature_flag(text: str | None) -> bool:
    """A lenient feature node: "1" (any non-zero number) is on; absent, "0"
    or garbage is off."""
    try:
        return text is not None and int(text.strip() or "0") != 0
    except ValueError:
        return False


def read_int(text: str | None, default: int = 0) -> int:
    """A lenient number: `default` when absent or unreadable."""
    try:
        return int(text.strip()) if text is not None else default
    except ValueError:
        return default
