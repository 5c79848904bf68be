"""xl disk specifications (xl-disk-configuration(5)), parsed with no I/O.

    parse_disk_spec("/dev/vg/guest-volume,,hda")
    parse_disk_spec("format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso")
    parse_disk_spec("phy:/dev/loop0,xvdb,w")          # deprecated, still accepted

The grammar is the one libxlu's flex lexer (libxlu_disk_l.l) implements, token
by token, with flex's longest-match rule worked out by hand:

- whitespace before a parameter is skipped;
- ``target=`` takes the whole rest of the spec, commas and trailing
  whitespace included (one trailing comma is dropped), so it comes last;
- ``<prefix>:`` at the start of a parameter is a deprecated prefix:
  raw: qcow: qcow2: vhd: set the format, iscsi: nbd: enbd: drbd: set the
  script to block-<prefix>, tapdisk: tap: tap2: aio: ioemu: file: phy: are
  ignored; any other lowercase ``word:`` followed by the end of the spec or by
  a character that is not ``[a-z0-9]`` is an unknown prefix (an error);
- ``key=value`` up to the next comma for the known keys; bare flags
  (cdrom, direct-io-safe, discard, no-discard, trusted, untrusted);
- anything else is positional and fills, in order, target, format, vdev,
  access.  After a deprecated prefix the format slot is skipped (old
  ``[<format>:]<target>,<vdev>[:<devtype>],<access>`` syntax), and a vdev may
  carry a deprecated ``:cdrom`` / ``:disk`` suffix.

Defaults: format raw; access rw; a cdrom is always read-only (libxl forces it)
and may have an empty target (an empty drive).  Differences from libxl, all
stricter, each reported with the offending token:

- repeating a parameter with a different value is an error for every
  parameter ("Each parameter may be specified at most once"; libxl only
  checks the strings and the enums);
- an empty target is refused for anything but a cdrom (libxl fails later,
  when attaching);
- the vdev is checked here (xen-vbd-interface(7), see vdev.py), not at attach;
- COLO parameters, ``specification=virtio`` and ``grant_usage=`` are refused
  as unsupported by xenbed; ``no-colo`` (the default) is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from xenbed.protocols.vdev import VdevError, vdev_to_number

__all__ = ["DiskSpec", "DiskSpecError", "parse_disk_spec", "FORMATS", "BACKENDTYPES"]

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")
BACKENDTYPES = ("phy", "qdisk", "tap", "standalone")

_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_IGNORED_PREFIXES = ("tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy")
_FLAGS = ("cdrom", "direct-io-safe", "discard", "no-discard", "trusted", "untrusted",
          "colo", "no-colo")
_COLO_KEYS = ("colo-host", "colo-port", "colo-export", "active-disk", "hidden-disk")
_KEYS = ("format", "devtype", "access", "backend", "backendtype", "specification",
         "vdev", "script", "grant_usage") + _COLO_KEYS


class DiskSpecError(ValueError):
    """A disk spec xl would refuse.

    ``message`` says what is wrong, ``token`` is the offending part of the
    spec (None when nothing in particular is: "no vdev specified"), ``spec``
    the whole spec and ``offset`` where the token starts in it (or None).
    """

    def __init__(self, message: str, token: str | None = None, spec: str = "",
                 offset: int | None = None) -> None:
        self.message, self.token, self.spec, self.offset = message, token, spec, offset
        text = message
        if token is not None:
            text += f": near {token!r}"
            if offset is not None:
                text += f" at offset {offset}"
        text += f" in disk spec {spec!r}"
        super().__init__(text)


@dataclass(frozen=True)
class DiskSpec:
    """A parsed disk.

    ``target`` is the path (or the script's argument) as written; "" only for
    an empty cdrom drive.  ``format`` is one of FORMATS, or "empty" for an
    empty cdrom (as libxl).  ``devnum`` is the XenStore device id of
    ``vdev``.  ``backend`` is the backend domain's name, None for dom0;
    ``backendtype`` None means libxl's automatic choice.  ``discard_enable``
    and ``trusted`` are None when not given (libxl's defaults: discard on,
    trusted).
    """

    target: str
    vdev: str
    devnum: int
    format: str = "raw"
    readonly: bool = False
    is_cdrom: bool = False
    backend: str | None = None
    backendtype: str | None = None
    script: str | None = None
    discard_enable: bool | None = None
    direct_io_safe: bool = False
    trusted: bool | None = None

    @property
    def mode(self) -> str:
        """The backend's ``mode`` key, as libxl writes it: "r" or "w"."""
        return "r" if self.readonly else "w"

    @property
    def device_type(self) -> str:
        """The ``device-type`` key: "cdrom" or "disk"."""
        return "cdrom" if self.is_cdrom else "disk"

    @property
    def removable(self) -> bool:
        return self.is_cdrom

    @property
    def path(self) -> str | None:
        """The host path of the target: "/dev/" prepended to a relative one.

        None when there is no path: an empty cdrom, or a script target
        (which is the script's argument, not a path).
        """
        if not self.target or self.script is not None:
            return None
        return self.target if self.target.startswith("/") else "/dev/" + self.target

    def to_spec(self) -> str:
        """Normalised spec, all keywords, target last; parses back to self."""
        parts = []
        if self.format != "empty":
            parts.append(f"format={self.format}")
        parts.append(f"vdev={self.vdev}")
        parts.append("access=ro" if self.readonly else "access=rw")
        if self.is_cdrom:
            parts.append("devtype=cdrom")
        for key in ("backendtype", "backend", "script"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        if self.direct_io_safe:
            parts.append("direct-io-safe")
        if self.discard_enable is not None:
            parts.append("discard" if self.discard_enable else "no-discard")
        if self.trusted is not None:
            parts.append("trusted" if self.trusted else "untrusted")
        if self.target:
            # target= drops one trailing comma: double a final one
            parts.append(f"target={self.target}" + ("," if self.target.endswith(",") else ""))
        return ", ".join(parts)


_SHOWN_NAME = {"readonly": "access", "is_cdrom": "devtype", "discard_enable": "discard",
               "direct_io_safe": "direct-io-safe"}
_SHOWN = {
    "readonly": lambda v: "access=ro" if v else "access=rw",
    "is_cdrom": lambda v: "devtype=cdrom" if v else "devtype=disk",
    "discard_enable": lambda v: "discard" if v else "no-discard",
    "trusted": lambda v: "trusted" if v else "untrusted",
    "direct_io_safe": lambda v: "direct-io-safe",
}


class _Parse:
    """The lexer's state (libxlu's DiskParseContext), over one or more specs."""

    def __init__(self, whole: str) -> None:
        self.whole = whole                 # for messages
        self.spec = ""
        self.values: dict[str, object] = {}
        self.offsets: dict[str, int] = {}
        self.tokens: dict[str, str] = {}
        self.had_depr_prefix = False
        self.access_set = False            # the positional access slot is used

    def fail(self, message: str, token: str | None = None, offset: int | None = None):
        raise DiskSpecError(message, token, self.whole, offset)

    def set(self, name: str, value: object, token: str, offset: int) -> None:
        """Set once; setting again to the same value is fine (libxl's DSET)."""
        old = self.values.get(name)
        if name in self.values and old != value:
            # libxl's savestring: an empty string may be overwritten
            if not (isinstance(old, str) and old == ""):
                shown = _SHOWN.get(name, lambda v: f"{name}={v}")(old)
                self.fail(f"{_SHOWN_NAME.get(name, name)} respecified (was {shown})",
                          token, offset)
        self.values[name] = value
        self.offsets[name] = offset
        self.tokens[name] = token

    # value setters, as libxlu's setformat/setaccess/...
    def format(self, value: str, token: str, offset: int) -> None:
        if value == "":
            value = "raw"
        if value not in FORMATS + ("empty",):
            self.fail(f"unknown value for format (one of {', '.join(FORMATS)})", token, offset)
        self.set("format", value, token, offset)

    def access(self, value: str, token: str, offset: int) -> None:
        if value in ("r", "ro"):
            readonly = True
        elif value in ("w", "rw", ""):
            readonly = False
        else:
            self.fail("unknown value for access (r, ro, w or rw)", token, offset)
        self.set("readonly", readonly, token, offset)

    def vdev_and_devtype(self, value: str, token: str, offset: int) -> bool:
        """A positional ``<vdev>:<devtype>`` (deprecated); False if no colon."""
        if ":" not in value:
            return False
        vdev, devtype = value.rsplit(":", 1)
        self.set("vdev", vdev, token, offset)
        if devtype == "cdrom":
            self.set("is_cdrom", True, token, offset)
        elif devtype == "disk":
            self.set("is_cdrom", False, token, offset)
        else:
            self.fail("unknown deprecated type (vdev suffix :cdrom or :disk)", token, offset)
        return True

    def run(self, spec: str, base: int) -> None:
        self.spec = spec
        i, n = 0, len(spec)
        while i < n:
            while i < n and spec[i] in " \t\n":
                i += 1
            if i >= n:
                break
            rest = spec[i:]
            at = base + i
            if rest.startswith("target="):
                value = rest[len("target="):]
                if value.endswith(","):
                    value = value[:-1]
                self.set("target", value, rest, at)
                return
            m = re.match(r"[a-z][a-z0-9]*:", rest)
            if m:
                word = m.group(0)[:-1]
                after = rest[m.end():m.end() + 1]
                if word in _FORMAT_PREFIXES + _SCRIPT_PREFIXES + _IGNORED_PREFIXES:
                    self.had_depr_prefix = True
                    if word in _FORMAT_PREFIXES:
                        self.format(word, m.group(0), at)
                    elif word in _SCRIPT_PREFIXES:
                        self.set("script", "block-" + word, m.group(0), at)
                    i += m.end()
                    continue
                if after == "" or not re.match(r"[a-z0-9]", after):
                    self.fail("unknown deprecated disk prefix", m.group(0), at)
            end = spec.find(",", i)
            if end < 0:
                token, i = rest, n
            else:
                token, i = spec[i:end], end + 1
            self.parameter(token, at)

    def parameter(self, token: str, at: int) -> None:
        if "=" in token:
            key, value = token.split("=", 1)
            if key in _KEYS:
                self.keyword(key, value, token, at)
            elif re.fullmatch(r"[A-Za-z][-A-Za-z0-9_]*", key):
                hint = " (did you mean access=?)" if key == "mode" else ""
                self.fail(f"unknown parameter {key!r}{hint}", token, at)
            else:
                self.fail("bad disk syntax: a positional parameter cannot contain '='"
                          " (put the target last as target=...)", token, at)
        elif token in _FLAGS:
            self.flag(token, at)
        else:
            self.positional(token, at)

    def keyword(self, key: str, value: str, token: str, at: int) -> None:
        if key == "format":
            self.format(value, token, at)
        elif key == "access":
            self.access(value, token, at)
        elif key == "devtype":
            if value not in ("cdrom", "disk"):
                self.fail("unknown value for devtype (cdrom or disk)", token, at)
            self.set("is_cdrom", value == "cdrom", token, at)
        elif key == "backendtype":
            if value not in BACKENDTYPES:
                self.fail(f"unknown value for backendtype (one of {', '.join(BACKENDTYPES)})",
                          token, at)
            self.set("backendtype", value, token, at)
        elif key == "specification":
            if value == "virtio":
                self.fail("specification=virtio is not supported by xenbed"
                          " (Xen PV block only)", token, at)
            if value != "xen":
                self.fail("unknown value for specification (xen or virtio)", token, at)
        elif key in ("vdev", "script", "backend"):
            self.set(key, value, token, at)
        elif key == "grant_usage":
            self.fail("grant_usage is not supported by xenbed (it is for virtio disks)",
                      token, at)
        else:   # COLO
            self.fail(f"{key} is not supported by xenbed (COLO)", token, at)

    def flag(self, token: str, at: int) -> None:
        if token == "cdrom":
            self.set("is_cdrom", True, token, at)
        elif token == "direct-io-safe":
            self.set("direct_io_safe", True, token, at)
        elif token in ("discard", "no-discard"):
            self.set("discard_enable", token == "discard", token, at)
        elif token in ("trusted", "untrusted"):
            self.set("trusted", token == "trusted", token, at)
        elif token == "colo":
            self.fail("colo is not supported by xenbed (COLO)", token, at)
        # no-colo: COLO off, which is the default

    def positional(self, token: str, at: int) -> None:
        v = self.values
        if "target" not in v:
            self.set("target", token, token, at)
        elif not self.had_depr_prefix and "format" not in v:
            if v["target"] == "" and self.vdev_and_devtype(token, token, at):
                v["format"] = "empty"        # xend's ",hdc:cdrom,r"
            else:
                try:
                    self.format(token, token, at)
                except DiskSpecError as e:
                    hint = ""
                    if _looks_like_vdev(token):
                        hint = (" (the positional order is target,format,vdev,access:"
                                " leave the format empty, as in 'TARGET,,VDEV')")
                    raise DiskSpecError(e.message + hint, token, self.whole, at) from None
        elif "vdev" not in v:
            if not self.vdev_and_devtype(token, token, at):
                self.set("vdev", token, token, at)
        elif not self.access_set:
            self.access_set = True
            self.access(token, token, at)
        else:
            self.fail("too many positional parameters", token, at)


def _looks_like_vdev(token: str) -> bool:
    try:
        vdev_to_number(token.split(":")[0])
        return True
    except VdevError:
        return False


def parse_disk_spec(text: str | Iterable[str]) -> DiskSpec:
    """Parse one disk spec (a string), or several that together make one disk
    (as ``xl block-attach <dom> <spec> <spec>...`` passes them).

    Raises DiskSpecError naming the offending token.
    """
    specs = [text] if isinstance(text, str) else list(text)
    for s in specs:
        if not isinstance(s, str):
            raise DiskSpecError(f"disk spec must be a string, not {type(s).__name__}", None,
                                repr(s))
    whole = " ".join(specs) if len(specs) != 1 else specs[0]
    p = _Parse(whole)
    base = 0
    for s in specs:
        p.run(s, base)
        base += len(s) + 1

    v = p.values
    is_cdrom = bool(v.get("is_cdrom", False))
    fmt = v.get("format", "raw")
    target = v.get("target")
    readonly = bool(v.get("readonly", False))
    if is_cdrom:
        readonly = True
        if not target:
            fmt = "empty"
    if "vdev" not in v:
        p.fail("no vdev specified")
    vdev = v["vdev"]
    if target is None and not is_cdrom:
        p.fail("no target specified (and device not removable)")
    if target == "" and not is_cdrom:
        p.fail("empty target: only a cdrom drive may be empty", "", p.offsets.get("target"))
    if fmt == "empty" and target:
        p.fail("format=empty is only for an empty cdrom drive", p.tokens.get("format"),
               p.offsets.get("format"))
    try:
        devnum = vdev_to_number(vdev)
    except VdevError as e:
        raise DiskSpecError(str(e), vdev, whole, p.offsets.get("vdev")) from None
    backend = v.get("backend") or None
    return DiskSpec(
        target=target or "",
        vdev=vdev,
        devnum=devnum,
        format=fmt,
        readonly=readonly,
        is_cdrom=is_cdrom,
        backend=backend,
        backendtype=v.get("backendtype"),
        script=v.get("script") or None,
        discard_enable=v.get("discard_enable"),
        direct_io_safe=bool(v.get("direct_io_safe", False)),
        trusted=v.get("trusted"),
    )
