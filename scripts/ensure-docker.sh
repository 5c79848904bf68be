#!/usr/bin/env bash
# Make sure a Docker engine answers and a compose implementation exists.
#
# Why this exists: a fresh machine (and CI) has no Docker engine running, and
# no init system to start one, so `make up` / `make test` must install and
# start dockerd themselves.  When everything is already there this script is
# silent apart from one line naming the compose command, so it is cheap to call
# from every Makefile target.
#
# Prints nothing to stdout except, with --print-compose, the compose command
# ("docker compose" or "docker-compose"), so callers can capture it.
set -euo pipefail

DOCKERD_LOG=${XENBED_DOCKERD_LOG:-/var/log/xenbed-dockerd.log}
WAIT_SECONDS=${XENBED_DOCKERD_WAIT:-60}

say() { echo "ensure-docker: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

have() { command -v "$1" >/dev/null 2>&1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# apt is the only installer we know works here (see DESIGN.md); anything else
# gets a clear message instead of a guess.
apt_install() {
    if ! is_root || ! have apt-get; then
        die "missing: $*. Install them (Debian/Ubuntu: apt-get install $*) and run again."
    fi
    say "installing $* with apt-get (one-off, may take a minute)"
    export DEBIAN_FRONTEND=noninteractive
    # stdin closed: CI has none, and apt must never wait for an answer.
    apt-get update -qq </dev/null >&2
    apt-get install -y -qq --no-install-recommends "$@" </dev/null >&2
}

engine_answers() { docker info >/dev/null 2>&1; }

start_dockerd() {
    is_root || die "dockerd is not running and only root can start it; start it (e.g. 'sudo dockerd &') or add yourself to the docker group."
    mkdir -p "$(dirname "$DOCKERD_LOG")" 2>/dev/null || DOCKERD_LOG=/tmp/xenbed-dockerd.log
    say "starting dockerd in the background (log: $DOCKERD_LOG)"
    # setsid + nohup: the engine must outlive `make` and the CI shell that
    # started it; with no init system nothing else would keep it alive.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local pid=$! waited=0
    until engine_answers; do
        if [ "$waited" -ge "$WAIT_SECONDS" ]; then
            say "dockerd did not answer within ${WAIT_SECONDS}s; last log lines:"
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        # dockerd exits at once on fatal errors (bad storage driver, no
        # iptables...); say so instead of waiting out the whole minute.
        if ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd exited; last log lines:"
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        if [ $((waited % 5)) -eq 0 ]; then say "waiting for dockerd (${waited}s)"; fi
        sleep 1
        waited=$((waited + 1))
    done
    say "dockerd is up after ${waited}s"
}

ensure_engine() {
    engine_answers && return 0
    local missing=()
    have docker || missing+=(docker.io)
    have dockerd || missing+=(docker.io)
    if [ "${#missing[@]}" -gt 0 ]; then
        # docker-compose comes along so that a compose exists either way.
        apt_install docker.io docker-compose
    fi
    # The CLI may be there and the engine running for someone else while we
    # lack permission; tell that apart from "not running".
    # (pidof is in Debian's essential set; pgrep may not be installed.)
    if pidof dockerd >/dev/null 2>&1; then
        engine_answers && return 0
        die "dockerd runs but 'docker info' fails: $(docker info 2>&1 | tail -n 1)"
    fi
    start_dockerd
}

# v2 plugin first: it is the maintained one; Debian bookworm ships v1.29, which
# the compose files are written to work with too (file format 2.4).
compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif have docker-compose; then
        echo "docker-compose"
    else
        return 1
    fi
}

ensure_compose() {
    local cmd
    if ! cmd=$(compose_cmd); then
        apt_install docker-compose
        cmd=$(compose_cmd) || die "no compose found after installing docker-compose"
    fi
    COMPOSE=$cmd
}

ensure_engine
ensure_compose
if [ "${1:-}" = "--print-compose" ]; then
    echo "$COMPOSE"
else
    say "engine ok, compose: $COMPOSE"
fi
