#!/usr/bin/env bash
# Host tools the test suite needs besides Docker: gcc and Xen's public headers
# (Debian libxen-dev), for the ABI conformance check that compiles a C program
# against /usr/include/xen/io/{ring,blkif,netif}.h.  Quiet when all is there.
set -euo pipefail
say() { echo "ensure-host-tools: $*" >&2; }

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -f /usr/include/xen/io/ring.h ] || missing+=(libxen-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
else
    say "ERROR: please install ${missing[*]} (Debian package names)"
    exit 1
fi
