#!/usr/bin/env bash
# bench/install.sh: install the public tools dockrune's benchmarks use, on
# Debian or Ubuntu, as root.  Safe to run twice.
#
#   webhook          adnanh/webhook, the peer for intake, burst and footprint
#   wrk              the HTTP load generator of the intake bench
#   curl             deploy.sh's "first good GET"
#   git, docker.io, docker-compose, busybox-static
#                    real deploys of a small compose app (busybox httpd)
#
# The benches also need a Python with waitress, dockrune's one dependency:
# ../install.sh --test makes .venv with it.  Then: .venv/bin/python bench/run.py
set -euo pipefail

PACKAGES="webhook wrk curl git docker.io docker-compose busybox-static"

say() { printf 'bench/install: %s\n' "$*" >&2; }
err() { printf 'bench/install: error: %s\n' "$*" >&2; exit 1; }

main() {
    [ "$(id -u)" = 0 ] || err "run as root (or: sudo apt-get install $PACKAGES)"
    local missing=() pkg
    for pkg in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$pkg")
    done
    if [ "${#missing[@]}" = 0 ]; then
        say "everything is installed"
        return 0
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

main "$@"
