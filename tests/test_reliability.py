"""Faults and hostile input: crashes, full disks, a missing Docker engine, load."""

import json
import os
import random
import secrets
import signal
import socket
import threading
import time

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, http_get,
                      make_settings, post_hook, push_body)
import runners
import store
from test_integration import write_app


@pytest.fixture
def app_name():
    name = "rel-" + secrets.token_hex(3)
    yield name
    compose_down("dockrune-" + name)


def deploy_and_wait(server, repo, sha, **extra):
    code, answer = post_hook(server.url, "push", push_body(repo, sha, **extra))
    assert code == 202, answer
    return server.wait_deploy(answer["deploy"])


# -- order --


def test_push_of_an_ancestor_after_its_descendant_leaves_the_descendant_live(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    older = remote.commit(compose_app("A"))
    newer = remote.commit(compose_app("B"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name

    assert deploy_and_wait(server, repo, newer)["status"] == "live"
    late = deploy_and_wait(server, repo, older)
    assert late["status"] == "superseded"
    assert "older than" in late["error"]
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "B\n")
    row = server.status(app_name)
    assert (row["status"], row["sha"]) == ("live", newer)


def test_out_of_order_deliveries_waiting_in_a_lane_deploy_the_newest_commit(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(compose_app("first"))
    older = remote.commit(compose_app("A"))
    newer = remote.commit(compose_app("B"))
    port = free_port()
    server = server_factory(DOCKRUNE_WORKERS="1")
    write_app(server.home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name

    code, running = post_hook(server.url, "push", push_body(repo, first))
    code, waiting = post_hook(server.url, "push", push_body(repo, newer))
    code, late = post_hook(server.url, "push", push_body(repo, older))
    assert server.wait_deploy(running["deploy"])["status"] == "live"
    record = server.wait_deploy(late["deploy"])
    assert record["status"] == "live", open(record["log"]).read()
    assert record["sha"] == newer
    assert server.wait_deploy(waiting["deploy"])["status"] == "superseded"
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "B\n")


def test_forced_push_to_an_older_commit_is_deployed(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    older = remote.commit(compose_app("A"))
    newer = remote.commit(compose_app("B"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name
    assert deploy_and_wait(server, repo, newer)["status"] == "live"
    body = json.loads(push_body(repo, older))
    body["forced"] = True
    code, answer = post_hook(server.url, "push", json.dumps(body).encode())
    assert server.wait_deploy(answer["deploy"])["status"] == "live"
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "A\n")


# -- bounds --


def test_full_disk_while_logging_fails_the_deploy_and_not_the_worker(
        tmp_path, remote):
    settings = make_settings(tmp_path / "home")
    st = store.Store(settings.home)
    st.ensure_dirs()
    sha = remote.commit(compose_app("x"))
    with open(st.app_path("full"), "w") as f:
        f.write("REPO=t/full\nGIT_URL=%s\nPORT=%d\n" % (remote.bare, free_port()))
    deployer = runners.Deployer(st, settings)
    record = deployer.new_deploy("full", "production", sha, "main", "push")
    os.makedirs(os.path.dirname(record["log"]))
    os.symlink("/dev/full", record["log"])     # every write: ENOSPC

    result = deployer.run_deploy(record)

    assert result["status"] == "failed"
    assert "cannot write the deploy log" in result["error"]
    assert "No space left on device" in result["error"]
    assert st.environment("full", "production")["status"] == "failing"
    assert st.environment("full", "production")["running"] is None


# -- the Docker engine --


def test_docker_engine_down_fails_fast_and_leaves_running_apps_alone(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    good = remote.commit(compose_app("up"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name
    assert deploy_and_wait(server, repo, good)["status"] == "live"
    server.stop()

    down = server_factory(home=server.home,
                          DOCKER_HOST="unix://%s" % (tmp_path / "no-docker.sock"))
    down.start()
    newer = remote.commit(compose_app("newer"))
    started = time.monotonic()
    record = deploy_and_wait(down, repo, newer)
    assert record["status"] == "failed"
    assert record["error"].startswith("Docker engine not reachable")
    assert time.monotonic() - started < 30
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "up\n")
    down.stop()

    back = server_factory(home=server.home).start()
    record = deploy_and_wait(back, repo, newer)
    assert record["status"] == "live"
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "newer\n")


# -- crashes --


def state_files_parse(home):
    """Parse every state file; return the names of temporary files found."""
    leftovers = []
    for root, _dirs, files in os.walk(os.path.join(str(home), "state")):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith(".tmp-"):
                leftovers.append(path)
                continue
            with open(path) as f:
                json.load(f)
    return leftovers


def test_sigkill_at_random_points_loses_nothing(
        base_image, server_factory, tmp_path, app_name):
    rng = random.Random(int(os.environ.get("DOCKRUNE_TEST_SEED", "7")))
    remote = GitRemote(str(tmp_path / "git"))
    port = free_port()
    home = tmp_path / "home"
    server = server_factory(home=home)
    write_app(home, app_name, remote, port)
    server.start()
    repo = "tester/" + app_name
    first = remote.commit(compose_app("v0"))
    assert deploy_and_wait(server, repo, first)["status"] == "live"
    st = store.Store(str(home))
    last = first

    for trial in range(1, 21):
        last = remote.commit(compose_app("v%d" % trial))
        code, answer = post_hook(server.url, "push", push_body(repo, last))
        assert code == 202
        time.sleep(rng.uniform(0, 2.0))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        left = state_files_parse(home)
        was = st.deploy(answer["deploy"])["status"]

        # The new daemon writes state as it runs: only what the crash left
        # behind must be gone.
        server = server_factory(home=home).start()
        state_files_parse(home)
        assert [p for p in left if os.path.exists(p)] == [], "trial %d" % trial
        record = st.deploy(answer["deploy"])
        if was == "running":
            assert record["status"] == "interrupted", "trial %d" % trial
        # The app that was live keeps answering through every crash.
        assert http_get("http://127.0.0.1:%d/" % port)[0] == 200, "trial %d" % trial

    # The resumed (or re-queued) deploy of the last push ends live.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        row = server.status(app_name)
        if row["status"] == "live" and row["sha"] == last:
            break
        time.sleep(0.5)
    assert (row["status"], row["sha"]) == ("live", last), server.log()
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "v20\n")


def test_resume_off_marks_interrupted_and_deploys_nothing(tmp_path):
    import dockrune
    settings = make_settings(tmp_path, DOCKRUNE_RESUME="off")
    daemon = dockrune.Daemon(settings)
    record = daemon.deployer.new_deploy("gone", "production", "1" * 40, "main", "push")
    daemon.store.update_deploy(record["id"], status="running")
    daemon.store.update_environment("gone", "production", running=record["id"],
                                    queued=None)
    daemon.start()
    try:
        assert daemon.store.deploy(record["id"])["status"] == "interrupted"
        assert daemon.runner.busy() == 0
        assert len(daemon.store.history("gone")) == 1
    finally:
        daemon.stop()


def test_kill_leftovers_finds_processes_by_their_deploy_mark():
    import subprocess
    marked = subprocess.Popen(["sleep", "60"], env=dict(
        os.environ, DOCKRUNE_DEPLOY="20260101-000000-x-abcd"))
    other = subprocess.Popen(["sleep", "60"], env=dict(
        os.environ, DOCKRUNE_DEPLOY="20260101-000000-x-ffff"))
    try:
        assert runners.kill_leftovers("20260101-000000-x-abcd") == 1
        assert marked.wait(timeout=5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        other.kill()
        marked.kill()
