#!/usr/bin/env bash
# deploy.sh: the raw steps of one deploy, as a hand-written script would do
# them; the peer that dockrune is measured against.
#
# Usage: deploy.sh GIT_URL CHECKOUT PROJECT PORT SHA
#
# Fetches SHA from GIT_URL into CHECKOUT, checks it out, runs `docker compose
# up -d --build` as project PROJECT with PORT in the environment, then waits
# for the first good GET on http://127.0.0.1:PORT/ (polled every 0.1 s, 60 s
# at most).  Runs of the same CHECKOUT take turns (flock): without the lock,
# concurrent runs break each other's git index.
set -euo pipefail

err() { printf 'deploy.sh: %s\n' "$*" >&2; exit 1; }

# docker compose (v2) where it works, else docker-compose (v1).
compose_argv() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    else
        COMPOSE=(docker-compose)
    fi
}

wait_live() {
    local port=$1 i
    for i in $(seq 1 600); do
        curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/" && return 0
        sleep 0.1
    done
    err "http://127.0.0.1:$port/ did not answer within 60 s"
}

main() {
    [ "$#" = 5 ] || err "usage: deploy.sh GIT_URL CHECKOUT PROJECT PORT SHA"
    local url=$1 checkout=$2 project=$3 port=$4 sha=$5
    mkdir -p "$checkout"
    printf '%s %s\n' "$(date +%s.%N)" "$sha" >>"$checkout.started"
    exec 9>"$checkout.lock"
    flock 9
    [ -d "$checkout/.git" ] || git init --quiet "$checkout"
    timeout 120 git -C "$checkout" fetch --quiet --no-tags -- "$url" "$sha"
    git -C "$checkout" checkout --quiet --force --detach "$sha" --
    cd "$checkout"
    compose_argv
    PORT=$port timeout 600 "${COMPOSE[@]}" -p "$project" \
        up -d --build --remove-orphans >"$checkout.compose.log" 2>&1 \
        || err "compose up failed: $(tail -n 3 "$checkout.compose.log")"
    wait_live "$port"
    printf '%s %s\n' "$(date +%s.%N)" "$sha" >>"$checkout.done"
}

main "$@"
