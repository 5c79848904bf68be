"""XenStore path rules (xenstore.txt "Paths", xenstored's canonicalize()).

Paths are '/'-separated, made of ASCII alphanumerics and ``-/_@``; no ``//``,
no trailing ``/`` except the root, never empty.  A path not starting with
``/`` (or ``@``) is relative to the caller's domain path
``/local/domain/<domid>``; like C xenstored, the empty relative path becomes
``/local/domain/<domid>/`` which has a trailing slash and is EINVAL.
Paths starting with ``@`` are special watch names (``@introduceDomain``,
``@releaseDomain``) and only some operations accept them.

Length rules: at most XENSTORE_ABS_PATH_MAX bytes overall (xenstore.txt); for
an unprivileged caller, as xenstored's ACC_PATHLEN quota does it, the part
after ``/local/domain/<domid>/`` (or the whole path when it is not under a
domain path) may not exceed the "path-max" quota (default
XENSTORE_REL_PATH_MAX).  Every violation is EINVAL.
"""

from __future__ import annotations

import re

from xenbed.protocols.xs_wire import ABS_PATH_MAX

from .errors import XenStoreError

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*")
# sscanf("/local/domain/%5u/%n"): up to five digits, then a slash.
_LOCAL = re.compile(r"/local/domain/\d{1,5}/")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def valid_chars(path: str) -> bool:
    return _VALID.fullmatch(path) is not None


def is_special(path: str) -> bool:
    return path.startswith("@")


def canonicalize(path: str, domid: int, *, privileged: bool = False, path_max: int | None = None,
                 allow_special: bool = False) -> tuple[str, bool]:
    """(absolute path, was_relative) or XenStoreError("EINVAL").

    Drivers ask for the same few paths over and over; the answer depends
    only on the arguments, so the last few thousand are remembered."""
    key = (path, domid, privileged, path_max, allow_special)
    hit = _canonical_cache.get(key)
    if hit is not None:
        return hit
    result = _canonicalize(path, domid, privileged=privileged, path_max=path_max, allow_special=allow_special)
    if len(_canonical_cache) >= _CANONICAL_CACHE_SIZE:
        _canonical_cache.clear()
    _canonical_cache[key] = result
    return result


_CANONICAL_CACHE_SIZE = 4096
_canonical_cache: dict[tuple, tuple[str, bool]] = {}


def _canonicalize(
    path: str,
    domid: int,
    *,
    privileged: bool = False,
    path_max: int | None = None,
    allow_special: bool = False,
) -> tuple[str, bool]:
    """(absolute path, was_relative) or XenStoreError("EINVAL")."""
    if not valid_chars(path):
        raise XenStoreError("EINVAL", "invalid character in path")
    if path.startswith("@") and not allow_special:
        raise XenStoreError("EINVAL", "special path not allowed here")
    relative = not path.startswith(("/", "@"))
    name = f"{domain_path(domid)}/{path}" if relative else path
    if name.endswith("/") and name != "/":
        raise XenStoreError("EINVAL", "trailing slash")
    if "//" in name:
        raise XenStoreError("EINVAL", "double slash")
    if len(name) > ABS_PATH_MAX:
        raise XenStoreError("EINVAL", "path longer than XENSTORE_ABS_PATH_MAX")
    if not privileged and path_max:
        m = _LOCAL.match(name)
        if len(name) - (m.end() if m else 0) > path_max:
            raise XenStoreError("EINVAL", "path longer than the path-max quota")
    return name, relative


def parent(path: str) -> str:
    """Parent of an absolute path ('/' for top-level nodes)."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(parent_path: str, child: str) -> str:
    return f"/{child}" if parent_path == "/" else f"{parent_path}/{child}"


def is_child(child: str, parent_path: str) -> bool:
    """True if `child` is `parent_path` or below it (xenstored's is_child)."""
    if parent_path == "/":
        return True
    if not child.startswith(parent_path):
        return False
    rest = child[len(parent_path) :]
    return rest == "" or rest.startswith("/")


def ancestors(path: str) -> list[str]:
    """Strict ancestors of an absolute path, nearest first, ending with '/'."""
    out = []
    while path != "/":
        path = parent(path)
        out.append(path)
    return out
