"""xl domain configuration files (xl.cfg(5)), parsed with no I/O.

The syntax is xl's: `key = value` per line (or separated by `;`), `#`
comments, values that are "strings" or 'strings', integers, or lists
`[ item, item ]` of those, possibly over several lines.  Everything is kept;
the keys xenbed acts on are read through `DomainConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+|\\\n)
  | (?P<comment>\#[^\n]*)
  | (?P<newline>[\n;])
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>0x[0-9a-fA-F]+|-?[0-9]+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.-]*)
  | (?P<punct>[=\[\],])
    """,
    re.VERBOSE,
)


class ConfigError(ValueError):
    """A config file xl would refuse; says where and why."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}")


def _tokens(text: str, source: str):
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ConfigError(source, line, f"unexpected character {text[pos]!r}")
        kind = match.lastgroup
        value = match.group()
        if kind == "newline" or (kind == "ws" and "\n" in value):
            yield ("newline", value, line)
        elif kind not in ("ws", "comment"):
            yield (kind, value, line)
        line += value.count("\n")
        pos = match.end()
    yield ("newline", "", line)


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def parse(text: str, source: str = "<config>") -> dict[str, object]:
    settings: dict[str, object] = {}
    tokens = list(_tokens(text, source))
    i = 0

    def atom(j):
        kind, value, line = tokens[j]
        if kind == "string":
            return _unquote(value), j + 1
        if kind == "number":
            return int(value, 0), j + 1
        raise ConfigError(source, line, f"expected a string or a number, found {value!r}")

    while i < len(tokens):
        kind, value, line = tokens[i]
        if kind == "newline":
            i += 1
            continue
        if kind != "ident":
            raise ConfigError(source, line, f"expected a setting name, found {value!r}")
        key = value
        if tokens[i + 1][1] != "=":
            raise ConfigError(source, line, f"expected '=' after {key}")
        i += 2
        while tokens[i][0] == "newline" and tokens[i][1] == "":
            i += 1
        if tokens[i][1] == "[":
            items, i = [], i + 1
            while True:
                while tokens[i][0] == "newline":
                    if tokens[i][1] == "":
                        raise ConfigError(source, tokens[i][2], f"unterminated list for {key}")
                    i += 1
                if tokens[i][1] == "]":
                    i += 1
                    break
                item, i = atom(i)
                items.append(item)
                while tokens[i][0] == "newline" and tokens[i][1] != "":
                    i += 1
                if tokens[i][1] == ",":
                    i += 1
                elif tokens[i][1] != "]":
                    raise ConfigError(source, tokens[i][2], f"expected ',' or ']' in {key}, found {tokens[i][1]!r}")
            settings[key] = items
        else:
            settings[key], i = atom(i)
        if tokens[i][0] != "newline":
            raise ConfigError(source, tokens[i][2], f"unexpected {tokens[i][1]!r} after {key}")
    return settings


@dataclass
class DomainConfig:
    name: str
    memory_mb: int = 64
    driver_domain: bool = False
    disks: list[str] = field(default_factory=list)
    vifs: list[str] = field(default_factory=list)
    settings: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str, source: str = "<config>") -> DomainConfig:
        settings = parse(text, source)
        name = settings.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(source, 1, "a domain config needs name = \"...\"")
        memory = settings.get("memory", 64)
        if not isinstance(memory, int) or memory <= 0:
            raise ConfigError(source, 1, f"memory must be a positive number of MiB, not {memory!r}")
        def string_list(key):
            value = settings.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(source, 1, f"{key} must be a list of strings")
            return value
        return cls(name=name, memory_mb=memory, driver_domain=bool(settings.get("driver_domain", 0)),
                   disks=string_list("disk"), vifs=string_list("vif"), settings=settings)

    @classmethod
    def from_file(cls, path: str) -> DomainConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_text(f.read(), path)
