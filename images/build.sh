#!/usr/bin/env bash
# Build the xenbed images without a registry, incrementally.
#
#   images/build.sh            base (if needed), domain, then every role
#   images/build.sh dom0 domu  only those roles (and what they are built FROM)
#
# Order and caching, cheapest first:
#   1. root filesystem: debian:bookworm-slim if the engine has it or can pull
#      it, else xenbed/rootfs:bookworm made once with debootstrap.  An existing
#      root is never rebuilt: a code change must not redo debootstrap.
#   2. xenbed/base:bookworm, xenbed/domain:bookworm: Debian packages only.
#   3. roles: packages first, project code last, so touching a .py file
#      rebuilds only the COPY layers.
# Each build's output goes to out/images/<name>.log; the terminal gets one line
# a step with its time (V=1 streams the full output instead).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

ROLES_ALL=(hypervisor dom0 domu peer)
ROOTFS_IMAGE=xenbed/rootfs:bookworm
# Role images carry this tag (compose files read the same variable), so two
# checkouts on one engine -- e.g. parallel worktrees -- do not run each
# other's code.  The Debian-only layers below are shared.
ROLE_TAG=${XENBED_IMAGE_TAG:-latest}
SLIM_IMAGE=debian:bookworm-slim
MIRROR=${XENBED_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOGDIR=$ROOT/out/images
mkdir -p "$LOGDIR"

# The legacy builder is what a Debian engine (20.10) has without buildx; say
# so explicitly so newer clients without buildx do not refuse or nag.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi

T0=$(date +%s)
say() { printf '[images %3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }

# run_logged NAME CMD...: run, keep the output in out/images/NAME.log, report
# the time; on failure show the end of the log so CI output is enough to act.
run_logged() {
    local name=$1; shift
    local log=$LOGDIR/$name.log start=$(date +%s) rc=0
    if [ "${V:-0}" = 1 ]; then
        "$@" 2>&1 | tee "$log" || rc=$?
    else
        "$@" >"$log" 2>&1 </dev/null || rc=$?
    fi
    if [ "$rc" -ne 0 ]; then
        say "FAILED $name (rc=$rc); last lines of $log:"
        tail -n 30 "$log" | sed 's/^/    /'
        return "$rc"
    fi
    local cached=""
    # Legacy builder marks reused steps "Using cache"; count the steps that ran.
    if grep -q '^Step ' "$log"; then
        local steps ran
        steps=$(grep -c '^Step ' "$log")
        # FROM (and an ARG before it) never say "Using cache"; do not count them as work.
        ran=$(( steps - $(grep -c 'Using cache' "$log" || true) - $(grep -cE '^Step [0-9/]* : FROM|^Step 1/[0-9]* : ARG' "$log" || true) ))
        cached=" ($ran of $steps steps ran)"
    fi
    say "ok $name in $(( $(date +%s) - start ))s$cached"
}

debootstrap_rootfs() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing debootstrap"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap </dev/null
        else
            say "ERROR: no $SLIM_IMAGE, no registry and no debootstrap; install debootstrap (as root) or load $SLIM_IMAGE (docker load)"
            exit 1
        fi
    fi
    local dir
    dir=$(mktemp -d "${TMPDIR:-/var/tmp}/xenbed-rootfs.XXXXXX")
    # The half-built tree is large; never leave it behind, whatever happens.
    trap 'rm -rf "$dir"' EXIT
    say "debootstrap bookworm from $MIRROR (about a minute, done once per machine)"
    run_logged debootstrap debootstrap --variant=minbase bookworm "$dir" "$MIRROR"
    # Keep the package cache out of the image.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    run_logged rootfs-import sh -c "tar -C '$dir' -c . | docker import --change 'CMD [\"bash\"]' - $ROOTFS_IMAGE"
    rm -rf "$dir"
    trap - EXIT
}

# Prints the image the base is built FROM, making it if there is none.
choose_rootfs() {
    if exists "$SLIM_IMAGE"; then ROOTFS=$SLIM_IMAGE; return; fi
    if exists "$ROOTFS_IMAGE"; then ROOTFS=$ROOTFS_IMAGE; return; fi
    # A registry may be reachable elsewhere; here it fails at once, and the
    # timeout keeps a hanging proxy from costing more than the fallback.
    if [ "${XENBED_NO_PULL:-0}" != 1 ] && timeout 30 docker pull -q "$SLIM_IMAGE" >/dev/null 2>&1; then
        say "pulled $SLIM_IMAGE"
        ROOTFS=$SLIM_IMAGE; return
    fi
    debootstrap_rootfs
    ROOTFS=$ROOTFS_IMAGE
}

build() { # build NAME TAG DOCKERFILE CONTEXT [extra docker build args...]
    local name=$1 tag=$2 file=$3 ctx=$4; shift 4
    run_logged "$name" docker build --label org.xenbed.image="$name" -t "$tag" -f "$file" "$@" "$ctx"
}

roles=("$@")
[ ${#roles[@]} -gt 0 ] || roles=("${ROLES_ALL[@]}")
for r in "${roles[@]}"; do
    case " ${ROLES_ALL[*]} " in
        *" $r "*) ;;
        *) echo "unknown role '$r' (have: ${ROLES_ALL[*]}; base is built for each)" >&2; exit 2 ;;
    esac
done

choose_rootfs
say "root filesystem: $ROOTFS"
build base xenbed/base:bookworm images/base/Dockerfile images/base --build-arg "ROOTFS=$ROOTFS"
needs_domain=0
for r in "${roles[@]}"; do case $r in dom0|domu) needs_domain=1 ;; esac; done
if [ "$needs_domain" = 1 ]; then
    build domain xenbed/domain:bookworm images/domain/Dockerfile images/domain
fi
for r in "${roles[@]}"; do
    build "$r" "xenbed/$r:$ROLE_TAG" "images/$r/Dockerfile" .
done
say "done: $(printf "xenbed/%s:$ROLE_TAG " "${roles[@]}")"
