"""install.sh, run for real into temporary directories."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT, need

INSTALL = os.path.join(ROOT, "install.sh")
HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
             "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
             "ProtectKernelLogs=yes", "SupplementaryGroups=docker",
             "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6")


def run_install(*args, env=None, timeout=600):
    return subprocess.run(["bash", INSTALL] + list(args), env=env, text=True,
                          capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def install_env(tmp_path):
    return dict(os.environ, HOME=str(tmp_path / "user"),
                DOCKRUNE_HOME=str(tmp_path / "home"), PREFIX=str(tmp_path / "prefix"),
                BINDIR=str(tmp_path / "bin"))


def test_systemd_unit_is_hardened_and_passes_systemd_analyze(tmp_path):
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is missing")
    prefix = tmp_path / "opt"
    os.makedirs(str(prefix / "venv" / "bin"))
    os.makedirs(str(prefix / "app"))
    os.symlink(shutil.which("python3"), str(prefix / "venv" / "bin" / "python"))
    (prefix / "app" / "dockrune.py").write_text("")
    done = run_install("--print-unit", env=dict(
        os.environ, PREFIX=str(prefix), DOCKRUNE_HOME="/var/lib/dockrune"))
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    for line in HARDENING + ("ReadWritePaths=/var/lib/dockrune", "User=dockrune"):
        assert line in unit.splitlines(), line
    assert "MemoryDenyWriteExecute" not in unit
    assert not [line for line in unit.splitlines()
                if line.startswith(("Bind", "ReadWritePaths")) and "/tmp" in line]
    path = tmp_path / "dockrune.service"
    path.write_text(unit)
    check = subprocess.run(["systemd-analyze", "verify", str(path)], text=True,
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "dockrune.service" not in check.stderr, check.stderr


def test_dry_run_prints_commands_and_changes_nothing(install_env, tmp_path):
    done = run_install("--systemd", "--dry-run", env=install_env)
    assert done.returncode == 0, done.stderr
    assert "would run: systemctl enable --now dockrune" in done.stdout
    done = run_install("--dry-run", env=install_env)
    assert done.returncode == 0, done.stderr
    assert "would run: mkdir -p %s/app" % install_env["PREFIX"] in done.stdout
    assert not os.path.exists(install_env["DOCKRUNE_HOME"])
    assert not os.path.exists(install_env["PREFIX"])


def test_install_twice_keeps_the_secret_and_gives_a_working_command(install_env):
    first = run_install(env=install_env)
    assert first.returncode == 0, first.stderr
    settings = os.path.join(install_env["DOCKRUNE_HOME"], "dockrune.env")
    with open(settings) as f:
        secret = f.read()
    assert "DOCKRUNE_WEBHOOK_SECRET=" in secret
    assert os.stat(settings).st_mode & 0o077 == 0

    second = run_install(env=install_env)
    assert second.returncode == 0, second.stderr
    assert "keeping" in second.stderr
    with open(settings) as f:
        assert f.read() == secret

    command = os.path.join(install_env["BINDIR"], "dockrune")
    done = subprocess.run([command, "status"], env=install_env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no apps yet" in done.stdout


def test_unknown_option_is_refused_with_a_reason(install_env):
    done = run_install("--frobnicate", env=install_env)
    assert done.returncode != 0
    assert "unknown option --frobnicate" in done.stderr
