"""xl vif specifications (xl-network-configuration(5)), parsed with no I/O.

    parse_vif_spec("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0")
    parse_vif_spec("")                      # all defaults, a fresh 00:16:3e MAC
    parse_vif_spec("rate=10Mb/s").rate_store_value() == "62500,50000"

A spec is comma-separated ``key=value`` items (xl splits on commas, skipping
empty items, and strips the spaces before each).  Keys are those of xl's
`parse_nic_config`: mac, bridge, gatewaydev (netdev is its deprecated
alias), ip, script, backend, vifname, model, type, rate, devid, mtu,
forwarddev; and the flags trusted / untrusted.

Defaults follow libxl (`libxl__device_nic_setdefault`): bridge "xenbr0";
a MAC in Xen's OUI, 00:16:3e:xx:xx:xx with the top bit of the fourth byte
clear, drawn from the ``rng`` you pass (tests seed one); an all-zero MAC also
means "generate" as in libxl.  ``rate`` is parsed exactly as libxlu's
`xlu_vif_parse_rate` into bytes per interval and interval in microseconds.

Stricter than xl, each with a message naming the item:

- an unknown key is an error (xl prints it and carries on); so are the COLO
  keys and ``accel`` (unsupported by xenbed);
- a key given twice with different values is an error (xl: last wins);
- mac must be six ``:``-separated groups of 1-2 hex digits and unicast;
- ip items must be IP addresses (``addr`` or ``addr/prefix``), space separated;
- mtu must be 68..65535; devid 0..2**31-1; names of network interfaces
  (vifname, bridge, gatewaydev, forwarddev) must be valid Linux names;
- numbers in ``rate`` take no leading zero (libxl would read them as octal),
  and a rate below one byte per interval is refused (it would stop all
  traffic).
"""

from __future__ import annotations

import ipaddress
import random as _random
import re
from dataclasses import dataclass

__all__ = ["VifSpec", "VifSpecError", "parse_vif_spec", "parse_rate", "generate_mac",
           "XEN_OUI", "DEFAULT_BRIDGE", "DEFAULT_RATE_INTERVAL_USECS"]

XEN_OUI = (0x00, 0x16, 0x3E)
DEFAULT_BRIDGE = "xenbr0"
DEFAULT_RATE_INTERVAL_USECS = 50_000       # libxlu: "Default to 50ms"

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
IFNAMSIZ = 16

_STRING_KEYS = ("bridge", "gatewaydev", "script", "backend", "vifname", "model", "forwarddev")
_IFNAME_KEYS = ("bridge", "gatewaydev", "vifname", "forwarddev")
_KNOWN = ("mac", "bridge", "ip", "mtu", "rate", "vifname", "script", "backend", "model",
          "type", "devid", "gatewaydev", "netdev", "forwarddev", "trusted", "untrusted")


class VifSpecError(ValueError):
    """A vif spec xl would refuse (or that xenbed cannot honour).

    ``item`` is the offending ``key=value`` item (None when the problem is
    the spec as a whole) and ``spec`` the whole spec.
    """

    def __init__(self, message: str, item: str | None = None, spec: str | None = None) -> None:
        self.message, self.item, self.spec = message, item, spec
        text = message
        if item is not None:
            text += f": in {item!r}"
        if spec is not None:
            text += f" of vif spec {spec!r}"
        super().__init__(text)


@dataclass(frozen=True)
class VifSpec:
    """A parsed vif.

    ``mac`` is lowercase "aa:bb:cc:dd:ee:ff"; ``mac_generated`` says it was
    not in the spec.  ``ip`` is the normalised space-separated list (None if
    not given), ``ips`` the same as a tuple.  ``rate`` is
    ``(bytes_per_interval, interval_usecs)`` or None for unlimited.
    ``backend`` is the backend domain's name, None for dom0.  ``type`` is
    "vif" (PV only) or "ioemu"; ``devid`` None means "the index in the list"
    (xl's choice).  ``script`` None means libxl's default, vif-bridge.
    """

    mac: str
    mac_generated: bool = False
    bridge: str = DEFAULT_BRIDGE
    ip: str | None = None
    mtu: int | None = None
    rate: tuple[int, int] | None = None
    vifname: str | None = None
    script: str | None = None
    backend: str | None = None
    model: str | None = None
    type: str = "vif"
    devid: int | None = None
    gatewaydev: str | None = None
    forwarddev: str | None = None
    trusted: bool | None = None

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(self.ip.split()) if self.ip else ()

    @property
    def rate_bytes_per_interval(self) -> int | None:
        return self.rate[0] if self.rate else None

    @property
    def rate_interval_usecs(self) -> int | None:
        return self.rate[1] if self.rate else None

    def rate_store_value(self) -> str | None:
        """The backend's ``rate`` key as libxl writes it, or None (no key):
        "<bytes_per_interval>,<interval_usecs>", e.g. 10Mb/s -> "62500,50000".
        """
        if self.rate is None:
            return None
        return f"{self.rate[0]},{self.rate[1]}"

    def to_spec(self) -> str:
        """Normalised spec; parses back to self (the MAC is always written).

        The rate is written as bytes per second at its interval in us, which
        parses back to the same pair whenever the interval is at most 1s.
        """
        parts = [f"mac={self.mac}", f"bridge={self.bridge}"]
        if self.type != "vif":
            parts.append(f"type={self.type}")
        for key in ("vifname", "script", "backend", "model", "gatewaydev", "forwarddev", "ip", "mtu", "devid"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        if self.rate is not None:
            per_interval, usecs = self.rate
            parts.append(f"rate={_rate_text(per_interval, usecs)}")
        if self.trusted is not None:
            parts.append("trusted" if self.trusted else "untrusted")
        return ",".join(parts)


def _rate_text(per_interval: int, usecs: int) -> str:
    # the smallest bytes/s b with b * usecs // 10**6 == per_interval, which
    # exists whenever usecs <= 1s
    bps = -(-per_interval * 1_000_000 // usecs)
    suffix = ""
    for s in ("K", "M", "G"):
        if bps % 1000:
            break
        bps //= 1000
        suffix = s
    return f"{bps}{suffix}B/s@{usecs}us"


def generate_mac(rng: _random.Random | None = None) -> str:
    """A MAC in Xen's OUI as libxl makes one: 00:16:3e, then 7+8+8 random bits."""
    rng = rng if rng is not None else _random.SystemRandom()
    r0, r1, r2 = (rng.randrange(256) for _ in range(3))
    return "%02x:%02x:%02x:%02x:%02x:%02x" % (*XEN_OUI, r0 & 0x7F, r1, r2)


_MAC = re.compile(r"[0-9a-fA-F]{1,2}(?::[0-9a-fA-F]{1,2}){5}")


def _parse_mac(value: str) -> str | None:
    """Normalised MAC, or None for all zeros (libxl: generate one)."""
    if not _MAC.fullmatch(value):
        raise ValueError("a MAC is six ':'-separated groups of hex digits, e.g. 00:16:3e:74:3d:76")
    octets = [int(x, 16) for x in value.split(":")]
    if not any(octets):
        return None
    if octets[0] & 1:
        raise ValueError("a multicast (or broadcast) MAC cannot be a NIC's address"
                         " (the low bit of the first byte must be 0)")
    return ":".join(f"{o:02x}" for o in octets)


_RATE_RE = re.compile(r"([0-9]+)([GMK]?)([Bb])/s")
_INTERVAL_RE = re.compile(r"([0-9]+)([mu]?)(s?)")
_MULT = {"G": 1000 ** 3, "M": 1000 ** 2, "K": 1000, "": 1}


def _number(digits: str, what: str) -> int:
    if len(digits) > 1 and digits[0] == "0":
        raise ValueError(f"{what} {digits!r} has a leading zero (libxl would read it as octal)")
    return int(digits)


def parse_rate(text: str) -> tuple[int, int]:
    """``RATE/s[@INTERVAL]`` -> (bytes_per_interval, interval_usecs), as libxlu.

    RATE is ``<n>[G|M|K](B|b)/s`` (B bytes, b bits; powers of 1000);
    INTERVAL is ``<n>[ms|us|s]`` (also ``<n>m``, ``<n>u``, ``<n>``; a bare
    number is seconds), default 50ms.  Raises ValueError.
    """
    rate, at, interval = text.partition("@")
    if rate == "":
        raise ValueError("no rate specified")
    m = _RATE_RE.fullmatch(rate)
    if not m:
        hint = ""
        if re.fullmatch(r"[0-9]+[gmk][Bb]/s", rate):
            hint = " (the multipliers are uppercase: G, M, K)"
        raise ValueError(f"invalid rate {rate!r}: expected <n>[G|M|K](B|b)/s{hint}")
    bytes_per_sec = _number(m.group(1), "rate")
    if bytes_per_sec == 0:
        raise ValueError("rate must be more than 0")
    if bytes_per_sec > UINT32_MAX:
        raise ValueError(f"rate overflow: {bytes_per_sec} > {UINT32_MAX}")
    bytes_per_sec *= _MULT[m.group(2)]
    if m.group(3) == "b":
        bytes_per_sec //= 8
    usecs = DEFAULT_RATE_INTERVAL_USECS
    if at:
        mi = _INTERVAL_RE.fullmatch(interval)
        if not mi:
            raise ValueError(f"invalid replenishment interval {interval!r}:"
                             " expected <n>[ms|us|s]")
        usecs = _number(mi.group(1), "replenishment interval")
        if usecs == 0:
            raise ValueError("replenishment interval must be more than 0")
        if usecs > UINT32_MAX:
            raise ValueError("replenishment interval overflow")
        unit = mi.group(2)
        if unit == "":
            usecs *= 1_000_000
        elif unit == "m":
            usecs *= 1000
        if usecs > UINT32_MAX:
            raise ValueError(f"replenishment interval overflow: {usecs}us > {UINT32_MAX}us")
    if bytes_per_sec > UINT64_MAX // usecs:
        raise ValueError("rate overflow")
    per_interval = bytes_per_sec * usecs // 1_000_000
    if per_interval == 0:
        raise ValueError(f"rate too low: {bytes_per_sec} bytes/s is less than one byte"
                         f" per {usecs}us interval")
    return per_interval, usecs


def _check_ifname(key: str, value: str) -> None:
    if value == "":
        raise ValueError(f"{key} is empty")
    if len(value.encode()) >= IFNAMSIZ:
        raise ValueError(f"{key} {value!r} is longer than {IFNAMSIZ - 1} bytes"
                         " (a Linux interface name)")
    if value in (".", "..") or re.search(r"[\s/:]", value):
        raise ValueError(f"{key} {value!r} is not a valid interface name"
                         " (no whitespace, '/' or ':')")


def _parse_ip(value: str) -> str:
    items = value.split()
    if not items:
        raise ValueError("ip is empty")
    out = []
    for item in items:
        try:
            if "/" in item:
                out.append(str(ipaddress.ip_interface(item)))
            else:
                out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    return " ".join(out)


def _parse_uint(key: str, value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"{key} {value!r} is not a decimal number")
    n = int(value)
    if not low <= n <= high:
        raise ValueError(f"{key} {n} is out of range ({low}..{high})")
    return n


def parse_vif_spec(text: str, *, rng: _random.Random | None = None) -> VifSpec:
    """Parse one vif spec; raise VifSpecError naming the offending item.

    ``rng`` draws the MAC when the spec has none (default: the system's
    random source); pass ``random.Random(seed)`` for a reproducible one.
    """
    if not isinstance(text, str):
        raise VifSpecError(f"vif spec must be a string, not {type(text).__name__}")
    values: dict[str, object] = {}
    items: dict[str, str] = {}

    def put(key: str, value: object, item: str) -> None:
        if key in values and values[key] != value:
            raise VifSpecError(f"{key} respecified (was {items[key]!r})", item, text)
        values[key] = value
        items[key] = item

    for raw in text.split(","):
        item = raw.strip()
        if item == "":
            continue
        if "=" not in item:
            if item in ("trusted", "untrusted"):
                put("trusted", item == "trusted", item)
                continue
            raise VifSpecError(f"expected key=value, got {item!r}", item, text)
        key, value = item.split("=", 1)
        try:
            if key == "mac":
                put("mac", _parse_mac(value), item)
            elif key in ("gatewaydev", "netdev"):
                _check_ifname(key, value)
                put("gatewaydev", value, item)
            elif key in _STRING_KEYS:
                if key in _IFNAME_KEYS:
                    _check_ifname(key, value)
                elif value == "" and key != "backend":
                    raise ValueError(f"{key} is empty")
                put(key, value, item)
            elif key == "ip":
                put("ip", _parse_ip(value), item)
            elif key == "type":
                if value not in ("vif", "ioemu"):
                    raise ValueError(f"type must be vif or ioemu, not {value!r}")
                put("type", value, item)
            elif key == "rate":
                put("rate", parse_rate(value), item)
            elif key == "mtu":
                put("mtu", _parse_uint("mtu", value, 68, 65535), item)
            elif key == "devid":
                put("devid", _parse_uint("devid", value, 0, (1 << 31) - 1), item)
            elif key == "accel":
                raise ValueError("accel is not supported")
            elif key.startswith("colo_"):
                raise ValueError(f"{key} is not supported by xenbed (COLO)")
            else:
                raise ValueError(f"unknown key {key!r} (known: {', '.join(_KNOWN)})")
        except ValueError as e:
            if isinstance(e, VifSpecError):
                raise
            raise VifSpecError(str(e), item, text) from None

    mac = values.get("mac")
    generated = mac is None
    if generated:
        mac = generate_mac(rng)
    return VifSpec(
        mac=mac,
        mac_generated=generated,
        bridge=values.get("bridge", DEFAULT_BRIDGE),
        ip=values.get("ip"),
        mtu=values.get("mtu"),
        rate=values.get("rate"),
        vifname=values.get("vifname"),
        script=values.get("script"),
        backend=values.get("backend") or None,
        model=values.get("model"),
        type=values.get("type", "vif"),
        devid=values.get("devid"),
        gatewaydev=values.get("gatewaydev"),
        forwarddev=values.get("forwarddev"),
        trusted=values.get("trusted"),
    )
