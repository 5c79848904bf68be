#!/usr/bin/env bash
# Create .venv with the host-side Python dependencies (harness, pytest, docker
# SDK).  Called by the Makefile only when pyproject.toml is newer than the
# venv's stamp, so a normal `make test` does not touch the network.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

say() { echo "ensure-venv: $*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "ERROR: $PYTHON is missing or older than 3.11 (pyproject.toml requires >=3.11)"
    exit 1
fi
# Debian splits venv/ensurepip out of python3; install it rather than fail.
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv </dev/null
    else
        say "ERROR: $PYTHON has no venv module; install python3-venv"
        exit 1
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
say "installing xenbed[dev] (editable) into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-input -e "$ROOT[dev]"
