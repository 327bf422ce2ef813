#!/usr/bin/env bash
# install.sh: set up dockrune on a Debian or Ubuntu machine.
#
# Usage: ./install.sh [--run | --systemd | --test] [--dry-run]
#
#   (no option)  install dockrune for the current user: the system packages it
#                needs (when run as root), a virtualenv with waitress, the
#                `dockrune` command, and $DOCKRUNE_HOME (default ~/.dockrune)
#                with a dockrune.env holding a freshly generated webhook secret.
#   --run        the same, then run `dockrune serve` in the foreground.
#   --systemd    install for the whole machine (as root): a `dockrune` system
#                user in the docker group, DOCKRUNE_HOME=/var/lib/dockrune, the
#                app in /opt/dockrune, and a systemd unit, enabled and started.
#   --test       install what the test suite needs (a Docker engine, started if
#                none answers; git, busybox, caddy, chromium; a virtualenv in
#                .venv with waitress and pytest), then run the whole suite.
#   --dry-run    print every command that would change the machine; run none.
#   --print-unit print the systemd unit that --systemd would write.
#
# Safe to run twice: nothing that exists is overwritten (dockrune.env and its
# secret are kept), packages already installed are skipped.
#
# Environment: DOCKRUNE_HOME (where dockrune keeps its state), PREFIX (where the
# app and its virtualenv go: ~/.local/share/dockrune, or /opt/dockrune with
# --systemd), BINDIR (where the `dockrune` command goes: /usr/local/bin for
# root, else ~/.local/bin).
set -euo pipefail

RUNTIME_PACKAGES="git python3 python3-venv docker.io docker-compose ca-certificates"
TEST_PACKAGES="busybox-static caddy chromium curl"
WAITRESS="waitress>=3.0,<4"
PYTEST="pytest>=8,<10"
DRY_RUN=0

say() { printf 'install: %s\n' "$*" >&2; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
err() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

# Run a command that changes the machine, or only print it with --dry-run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'would run: %s\n' "$*"
    else
        "$@"
    fi
}

is_root() { [ "$(id -u)" = 0 ]; }

source_dir() { cd "$(dirname "${BASH_SOURCE[0]}")" && pwd; }

install_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$pkg")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    if ! is_root; then
        warn "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
        return 0
    fi
    say "installing ${missing[*]}"
    run env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# Docker's default address pools hold about 30 networks, and every compose
# project gets one: give the engine room for a few hundred apps.  Only where
# the engine has no daemon.json yet (an operator's own settings are kept).
configure_docker() {
    local conf=/etc/docker/daemon.json
    is_root || return 0
    [ -e "$conf" ] && return 0
    say "writing $conf (address pools for many compose networks)"
    [ "$DRY_RUN" = 1 ] && return 0
    mkdir -p /etc/docker
    cat >"$conf" <<'EOF'
{
  "default-address-pools": [
    {"base": "172.16.0.0/12", "size": 24}
  ]
}
EOF
    if docker info >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        run systemctl restart docker
    fi
}

# Start a Docker engine when none answers: systemd where it runs, else dockerd
# in the background (containers and CI machines without an init system).
start_docker() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    is_root || err "no Docker engine answers and only root can start one"
    if [ -d /run/systemd/system ]; then
        run systemctl start docker
    else
        say "starting dockerd in the background (log: /var/log/dockerd.log)"
        [ "$DRY_RUN" = 1 ] && { printf 'would run: setsid dockerd\n'; return 0; }
        setsid nohup dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
    fi
    [ "$DRY_RUN" = 1 ] && return 0
    local i
    for i in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    err "the Docker engine did not answer within 60 s; see /var/log/dockerd.log"
}

make_venv() {
    local venv=$1
    shift
    if [ ! -x "$venv/bin/python" ]; then
        say "creating a virtualenv in $venv"
        run python3 -m venv "$venv"
    fi
    run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}

# Copy the app into $1/app and put a `dockrune` command in $2.
install_app() {
    local prefix=$1 bindir=$2 src
    src=$(source_dir)
    run mkdir -p "$prefix/app" "$bindir"
    run cp "$src"/*.py "$prefix/app/"
    if compgen -G "$src/*.html" >/dev/null; then
        run cp "$src"/*.html "$prefix/app/"
    fi
    make_venv "$prefix/venv" "$WAITRESS"
    say "writing $bindir/dockrune"
    [ "$DRY_RUN" = 1 ] && return 0
    cat >"$bindir/dockrune" <<EOF
#!/bin/sh
exec "$prefix/venv/bin/python" "$prefix/app/dockrune.py" "\$@"
EOF
    chmod 755 "$bindir/dockrune"
}

# Create DOCKRUNE_HOME and, once, a dockrune.env with a random webhook secret.
make_home() {
    local home=$1 owner=${2:-}
    run mkdir -p "$home/apps" "$home/templates"
    if [ -e "$home/dockrune.env" ]; then
        say "keeping $home/dockrune.env"
    else
        say "writing $home/dockrune.env with a new webhook secret"
        [ "$DRY_RUN" = 1 ] || (
            umask 077
            cat >"$home/dockrune.env" <<EOF
# dockrune settings; the environment overrides anything here.
# The same secret goes into the GitHub webhook's settings.
DOCKRUNE_WEBHOOK_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
DOCKRUNE_LISTEN=127.0.0.1:9000
#DOCKRUNE_PUBLIC_URL=https://deploy.example.org
#DOCKRUNE_GITHUB_TOKEN=
#DOCKRUNE_ADMIN_PASSWORD=
#DOCKRUNE_API_TOKEN=
#DOCKRUNE_ALLOWED_OWNERS=your-github-name
#DOCKRUNE_BASE_DOMAIN=apps.example.org
EOF
        )
    fi
    [ -n "$owner" ] && run chown -R "$owner:$owner" "$home"
    return 0
}

default_bindir() {
    if [ -n "${BINDIR:-}" ]; then
        echo "$BINDIR"
    elif is_root; then
        echo /usr/local/bin
    else
        echo "$HOME/.local/bin"
    fi
}

install_user() {
    local home=${DOCKRUNE_HOME:-$HOME/.dockrune}
    local prefix=${PREFIX:-$HOME/.local/share/dockrune}
    local bindir
    bindir=$(default_bindir)
    install_packages $RUNTIME_PACKAGES
    configure_docker
    is_root && start_docker
    install_app "$prefix" "$bindir"
    make_home "$home"
    say "done: $bindir/dockrune serve (home $home)"
    case ":$PATH:" in *":$bindir:"*) ;; *) warn "$bindir is not on your PATH";; esac
}

# The unit: dockrune with the docker group and nothing more.  The docker group
# is root-equivalent, so the rest of the system is made read-only around it.
# KillMode=process: a restart of dockrune leaves the apps it started running.
# No MemoryDenyWriteExecute: node's JIT needs writable executable memory.
print_unit() {
    local prefix=$1 home=$2
    cat <<EOF
[Unit]
Description=dockrune push-to-deploy daemon
After=network-online.target docker.service
Wants=network-online.target docker.service

[Service]
Type=simple
User=dockrune
Group=dockrune
SupplementaryGroups=docker
Environment=DOCKRUNE_HOME=$home
ExecStart=$prefix/venv/bin/python $prefix/app/dockrune.py serve
Restart=on-failure
RestartSec=2
KillMode=process
TimeoutStopSec=30
UMask=0027
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=$home
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
EOF
}

install_systemd() {
    is_root || err "--systemd needs root"
    local home=/var/lib/dockrune prefix=${PREFIX:-/opt/dockrune}
    install_packages $RUNTIME_PACKAGES
    if ! id dockrune >/dev/null 2>&1; then
        run useradd --system --home-dir "$home" --shell /usr/sbin/nologin dockrune
    fi
    run usermod -a -G docker dockrune
    configure_docker
    install_app "$prefix" /usr/local/bin
    make_home "$home" dockrune
    say "writing /etc/systemd/system/dockrune.service"
    [ "$DRY_RUN" = 1 ] || print_unit "$prefix" "$home" >/etc/systemd/system/dockrune.service
    run systemctl daemon-reload
    run systemctl enable --now docker
    run systemctl enable --now dockrune
    say "done: systemctl status dockrune; settings in $home/dockrune.env"
}

run_tests() {
    local src
    src=$(source_dir)
    install_packages $RUNTIME_PACKAGES $TEST_PACKAGES
    configure_docker
    start_docker
    make_venv "$src/.venv" "$WAITRESS" "$PYTEST"
    say "running the test suite"
    cd "$src"
    run "$src/.venv/bin/python" -m pytest -q tests
}

main() {
    local mode=user arg
    for arg in "$@"; do
        case "$arg" in
            --run) mode=run ;;
            --systemd) mode=systemd ;;
            --test) mode=test ;;
            --dry-run) DRY_RUN=1 ;;
            --print-unit) mode=unit ;;
            -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' \
                "${BASH_SOURCE[0]}"; exit 0 ;;
            *) err "unknown option $arg (see --help)" ;;
        esac
    done
    case "$mode" in
        user) install_user ;;
        run)
            install_user
            local bindir
            bindir=$(default_bindir)
            [ "$DRY_RUN" = 1 ] && { printf 'would run: %s serve\n' "$bindir/dockrune"; exit 0; }
            exec "$bindir/dockrune" serve
            ;;
        systemd) install_systemd ;;
        test) run_tests ;;
        unit) print_unit "${PREFIX:-/opt/dockrune}" "${DOCKRUNE_HOME:-/var/lib/dockrune}" ;;
    esac
}

main "$@"
