"""Compose-style variable substitution and `.env` files, with no I/O but reading the file.

Compose substitutes `$VAR`, `${VAR}`, `${VAR:-default}` (default when unset or
empty), `${VAR-default}` (default when unset), `${VAR:?message}` /
`${VAR?message}` (error) and turns `$$` into a literal `$`.  Only values are
substituted, never keys, exactly as docker-compose 1.29 does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

_PATTERN = re.compile(
    r"""\$(?:
        (?P<escaped>\$) |
        (?P<named>[_a-zA-Z][_a-zA-Z0-9]*) |
        \{(?P<braced>[^}]*)\} |
        (?P<invalid>)
    )""",
    re.VERBOSE,
)
_BRACED = re.compile(r"^(?P<name>[_a-zA-Z][_a-zA-Z0-9]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>.*))?$", re.DOTALL)


class InterpolationError(ValueError):
    """A value names a variable in a way compose would refuse, or a required one is unset."""


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return environ.get(match.group("named"), "")
        braced = match.group("braced")
        if braced is None:
            raise InterpolationError(f"invalid '$' in {text!r} (write '$$' for a literal dollar)")
        parts = _BRACED.match(braced)
        if not parts:
            raise InterpolationError(f"invalid substitution '${{{braced}}}' in {text!r}")
        name, op, arg = parts.group("name", "op", "arg")
        value = environ.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise InterpolationError(f"required variable {name} is missing: {arg or 'no message'}")
        return value or ""

    return _PATTERN.sub(substitute, text)


def interpolate_tree(node: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """Substitute in every string value of a YAML tree; `where` prefixes error messages."""
    if isinstance(node, str):
        try:
            return interpolate(node, environ)
        except InterpolationError as error:
            raise InterpolationError(f"{where}: {error}") from None
    if isinstance(node, dict):
        return {key: interpolate_tree(value, environ, f"{where}.{key}" if where else str(key))
                for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, environ, f"{where}[{index}]") for index, item in enumerate(node)]
    return node


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional `export` and quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InterpolationError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values
