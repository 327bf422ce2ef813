"""End to end, as a user runs it: a real daemon, real git, a real Docker engine."""

import json
import os
import secrets

import pytest

from conftest import (GitRemote, write_app, compose_app, compose_down, http_get, post_hook,
                      push_body, free_port)
import store


@pytest.fixture
def app_name():
    name = "it-" + secrets.token_hex(3)
    yield name
    compose_down("dockrune-" + name)


def test_push_deploys_commit_then_next_push_replaces_it(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(compose_app("first"), "first version")
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name

    code, answer = post_hook(server.url, "push", push_body(repo, first))
    assert code == 202, answer
    record = server.wait_deploy(answer["deploy"])
    assert record["status"] == "live", open(record["log"]).read()
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "first\n")

    second = remote.commit(compose_app("second"), "second version")
    code, answer = post_hook(server.url, "push", push_body(repo, second))
    assert code == 202
    record = server.wait_deploy(answer["deploy"])
    assert record["status"] == "live", open(record["log"]).read()
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "second\n")

    row = server.status(app_name)
    assert row["status"] == "live"
    assert row["sha"] == second
    assert row["port"] == port
    assert row["last_deploy"] == answer["deploy"]
    assert row["deployed_at"].endswith("Z")
    text = open(record["log"]).read()
    assert "-----> compose: found compose.yaml" in text
    assert "up -d --build --remove-orphans" in text
    assert "git -C" in text and "fetch" in text
    assert "-----> live at" in text


def test_failed_build_keeps_previous_version_serving(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    good = remote.commit(compose_app("good"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name
    code, answer = post_hook(server.url, "push", push_body(repo, good))
    assert server.wait_deploy(answer["deploy"])["status"] == "live"

    bad = remote.commit(compose_app("bad", fail_build=True), "broken build")
    code, answer = post_hook(server.url, "push", push_body(repo, bad))
    assert code == 202
    record = server.wait_deploy(answer["deploy"])
    assert record["status"] == "failed"
    assert "exited" in record["error"]
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "good\n")
    row = server.status(app_name)
    assert row["status"] == "failing"
    assert row["sha"] == good
    text = open(record["log"]).read()
    assert "deploy failed:" in text
    assert "false" in text


def test_zero_config_registers_repo_of_allowed_owner(
        base_image, server_factory, tmp_path):
    # The repository's name becomes the app's name: keep it unique per run.
    name = "zc-" + secrets.token_hex(3)
    git_base = tmp_path / "github"
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(compose_app("hello"))
    os.makedirs(str(git_base / "Owner"))
    os.rename(remote.bare, str(git_base / "Owner" / (name + ".git")))
    server = server_factory(DOCKRUNE_ALLOWED_OWNERS="someone,Owner",
                            DOCKRUNE_GIT_BASE_URL=str(git_base),
                            DOCKRUNE_BASE_DOMAIN="apps.example.org",
                            DOCKRUNE_PORT_RANGE="%d-%d" % (free_port(), 65000))
    server.start()
    try:
        code, answer = post_hook(server.url, "push", push_body("Owner/" + name, sha))
        assert code == 202, answer
        assert answer["app"] == name
        record = server.wait_deploy(answer["deploy"])
        assert record["status"] == "live", open(record["log"]).read()
        settings = store.read_env_file(os.path.join(str(server.home), "apps",
                                                    name + ".env"))
        assert settings["REPO"] == "Owner/" + name
        assert settings["DOMAIN"] == name + ".apps.example.org"
        port = int(settings["PORT"])
        assert http_get("http://127.0.0.1:%d/" % port) == (200, "hello\n")
        with open(os.path.join(str(server.home), "apps", name + ".env")) as f:
            assert f.read().startswith("# dockrune app")

        code, answer = post_hook(server.url, "push", push_body("stranger/" + name, sha))
        assert code == 200 and answer["ignored"].startswith("unknown repository")
    finally:
        compose_down("dockrune-" + name)


def test_cli_deploy_status_logs_and_stop_without_daemon(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(compose_app("cli"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)

    done = server.cli("deploy", app_name)
    assert "-----> live at" in done.stdout
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "cli\n")
    row = server.status(app_name)
    assert row["status"] == "live" and row["sha"] == sha
    assert "compose: found compose.yaml" in server.cli("logs", app_name).stdout

    server.cli("stop", app_name)
    assert http_get("http://127.0.0.1:%d/" % port)[0] is None
    assert server.status(app_name)["status"] == "stopped"

    missing = server.cli("deploy", "nope", check=False)
    assert missing.returncode != 0
    assert "no app 'nope'" in missing.stderr


def test_cli_deploy_goes_through_running_daemon(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    remote.commit(compose_app("one"))
    second = remote.commit(compose_app("two"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()

    done = server.cli("deploy", app_name, "--ref", "main")
    assert done.stdout.startswith("queued deploy ")
    deploy_id = done.stdout.split()[2].rstrip(";")
    record = server.wait_deploy(deploy_id)
    assert record["status"] == "live", open(record["log"]).read()
    assert record["sha"] == second and record["trigger"] == "manual"
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "two\n")
    assert "deploy %s" % deploy_id in server.log() or deploy_id in server.log()


def test_serve_refuses_to_start_without_secret(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, DOCKRUNE_HOME=str(tmp_path))
    env.pop("DOCKRUNE_WEBHOOK_SECRET", None)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "dockrune.py"), "serve"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1
    assert "DOCKRUNE_WEBHOOK_SECRET is not set" in done.stderr


def test_status_json_lists_configured_app_before_first_deploy(server_factory, tmp_path):
    server = server_factory()
    remote = GitRemote(str(tmp_path / "git"))
    write_app(server.home, "never", remote, 18123)
    rows = json.loads(server.cli("status", "--json").stdout)
    assert rows == [{"app": "never", "environment": "production",
                     "repo": "tester/never", "status": "stopped", "sha": None,
                     "deployed_at": None, "port": 18123, "domain": None,
                     "url": "http://127.0.0.1:18123", "last_deploy": None}]


def test_serve_stops_cleanly_on_sigterm(server_factory):
    server = server_factory().start()
    daemon_json = os.path.join(str(server.home), "run", "daemon.json")
    info = json.load(open(daemon_json))
    assert info["pid"] == server.proc.pid
    assert os.stat(daemon_json).st_mode & 0o077 == 0
    server.proc.terminate()
    assert server.proc.wait(timeout=20) == 0
    assert not os.path.exists(daemon_json)
    assert "shutting down" in server.log()
    assert "Traceback" not in server.log()


def test_zero_workers_queue_deliveries_and_run_none(server_factory, tmp_path):
    server = server_factory(DOCKRUNE_WORKERS="0").start()
    remote = GitRemote(str(tmp_path / "git"))
    write_app(server.home, "paused", remote, free_port())
    shas = ["%040x" % n for n in (1, 2)]
    answers = [post_hook(server.url, "push", push_body("tester/paused", sha))
               for sha in shas]
    assert [status for status, _ in answers] == [202, 202]
    first, second = (answer["deploy"] for _, answer in answers)
    assert http_get(server.url + "/healthz")[1].count('"jobs": 1') == 1
    st = store.Store(str(server.home))
    assert st.deploy(first)["status"] == "superseded"
    assert st.deploy(second)["status"] == "queued"
    assert "DOCKRUNE_WORKERS=0" in server.log()
