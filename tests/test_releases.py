"""Supervision, health-checked releases and rollback, through a real daemon."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, http_get,
                      log_of, make_settings, push)
import conftest
import runners
import store
import supervise


def write_app(home, name, remote, port, **extra):
    extra.setdefault("HEALTH_TIMEOUT", "15")
    conftest.write_app(home, name, remote, port, **extra)


# -- helpers ---------------------------------------------------------------------------


def spec_of(home, name, slot="live"):
    path = os.path.join(str(home), "run", "procs", name, "production.%s.json" % slot)
    with open(path) as f:
        return json.load(f)


def wait_for(condition, timeout=30, what="a condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.2)


def answers(port, text):
    return lambda: http_get("http://127.0.0.1:%d/" % port, timeout=2) == (200, text)


def web_app(text, status=200):
    """Return the files of a Procfile app that answers text with status."""
    server = (
        "import http.server, os, sys, subprocess\n"
        "# A child in the same session, as real servers have (workers, npm).\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "text = ' '.join(sys.argv[2:]).encode()\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(%d)\n"
        "        self.send_header('Content-Length', str(len(text)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(text)\n"
        "    def log_message(self, *args):\n"
        "        print('request', self.path, flush=True)\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H)"
        ".serve_forever()\n" % status)
    return {"server.py": server, "Procfile": "web: python3 server.py $PORT %s\n" % text}


@pytest.fixture
def app_name(tmp_path):
    name = "r-" + secrets.token_hex(3)
    yield name
    home = tmp_path / "home"
    if (home / "apps" / (name + ".env")).exists():
        runners.Deployer(store.Store(str(home)), make_settings(home)).run_stop(
            name, "production")


def remove_compose_image(name):
    subprocess.run(["docker", "image", "rm", "dockrune-%s_web" % name],
                   capture_output=True, timeout=120)


def session_alive(sid):
    return bool(supervise.session_members(sid))


# -- supervision -----------------------------------------------------------------------


def test_killed_process_comes_back_and_stop_ends_its_whole_group(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(web_app("alive"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    record = push(server, app_name, sha)
    assert record["status"] == "live", log_of(record)
    first = spec_of(server.home, app_name)
    assert os.getpgid(first["pid"]) == first["pid"] == os.getsid(first["pid"])
    assert len(supervise.session_members(first["pid"])) == 2

    os.killpg(first["pid"], signal.SIGKILL)
    second = wait_for(lambda: spec_of(server.home, app_name)["pid"] != first["pid"]
                      and spec_of(server.home, app_name), what="a restart")
    wait_for(answers(port, "alive"), what="the restarted app")
    assert second["restarts"] == 1
    assert "exited after" in server.log() and "restarting in" in server.log()
    runtime = server.cli("logs", app_name, "--runtime").stdout
    assert runtime.count("starting: python3 server.py") >= 3
    assert "request /" in runtime

    server.cli("stop", app_name)
    wait_for(lambda: not session_alive(second["pid"]), what="the group to end")
    assert http_get("http://127.0.0.1:%d/" % port)[0] is None
    assert not os.path.exists(os.path.join(str(server.home), "run", "procs",
                                           app_name, "production.live.json"))
    wait_for(lambda: server.status(app_name)["status"] == "stopped")


def test_restarted_daemon_leaves_app_serving_and_adopts_it(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(web_app("kept"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    assert push(server, app_name, sha)["status"] == "live"
    before = spec_of(server.home, app_name)

    server.stop()
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "kept")
    server.start()
    wait_for(lambda: "re-adopted %s/production: pid %d" % (app_name, before["pid"])
             in server.log(), what="the adoption")
    assert spec_of(server.home, app_name)["pid"] == before["pid"]

    # Still supervised: the new daemon restarts it when it dies.
    os.killpg(before["pid"], signal.SIGKILL)
    wait_for(lambda: spec_of(server.home, app_name)["pid"] != before["pid"],
             what="a restart by the new daemon")
    wait_for(answers(port, "kept"), what="the restarted app")


def test_cli_deploy_without_daemon_leaves_process_for_serve_to_adopt(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(web_app("from the cli"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)

    done = server.cli("deploy", app_name)
    assert "-----> live at" in done.stdout
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "from the cli")
    spec = spec_of(server.home, app_name)
    assert spec["sha"] == sha
    server.start()
    wait_for(lambda: "re-adopted %s/production: pid %d" % (app_name, spec["pid"])
             in server.log(), what="the adoption")


def test_stranger_with_a_recorded_pid_is_never_adopted_or_signalled(tmp_path):
    sup = supervise.Supervisor(str(tmp_path / "run"))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)
    try:
        spec = {"app": "x", "environment": "production", "slot": "live",
                "pid": stranger.pid, "start_time":
                supervise.start_time(stranger.pid) + 1, "argv": ["true"],
                "cwd": str(tmp_path), "env": {}, "log": str(tmp_path / "x.log")}
        os.makedirs(os.path.dirname(sup.spec_path("x", "production", "live")))
        store.write_json(sup.spec_path("x", "production", "live"), spec)
        assert not sup.alive("x", "production")
        sup.stop("x", "production", "live")
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_runtime_log_is_rotated_past_its_cap(tmp_path):
    sup = supervise.Supervisor(str(tmp_path / "run"), log_max_bytes=1000)
    path = str(tmp_path / "app.runtime.log")
    code = "import sys\nfor i in range(200): print('line %d' % i, flush=True)\n" \
           "import time; time.sleep(60)\n"
    sup.start("x", "production", "live", [sys.executable, "-c", code],
              str(tmp_path), dict(os.environ), path)
    try:
        wait_for(lambda: os.path.getsize(path) > 1000, what="output")
        sup.check()
        assert os.path.getsize(path) == 0
        assert os.path.getsize(path + ".1") > 1000
    finally:
        sup.stop("x", "production", "live")


# -- health-checked releases and rollback ----------------------------------------------


def test_release_failing_its_health_check_leaves_old_version_answering(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    good = remote.commit(web_app("good"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port, HEALTH_TIMEOUT="6")
    server.start()
    assert push(server, app_name, good)["status"] == "live"
    live = spec_of(server.home, app_name)

    bad = remote.commit(web_app("bad", status=500))
    record = push(server, app_name, bad)
    assert record["status"] == "failed"
    assert "health check failed" in record["error"] and "HTTP 500" in record["error"]
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "good")
    assert spec_of(server.home, app_name)["pid"] == live["pid"]
    row = server.status(app_name)
    assert row["status"] == "failing" and row["sha"] == good
    text = log_of(record)
    assert "starting the new version beside the old one on port" in text
    assert "switching" not in text
    # The candidate is gone with its whole group.
    assert not os.path.exists(os.path.join(str(server.home), "run", "procs",
                                           app_name, "production.next.json"))

    crash = remote.commit({"Procfile": "web: python3 -c 'raise SystemExit(3)'\n"})
    record = push(server, app_name, crash)
    assert record["status"] == "failed"
    assert "exited before" in record["error"]
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "good")

    missing = remote.commit({"Procfile": "web: no-such-program-here $PORT\n"})
    record = push(server, app_name, missing)
    assert record["status"] == "failed"
    assert record["error"].startswith("cannot start no-such-program-here:")
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "good")


def test_release_failing_only_on_the_app_port_brings_the_old_one_back(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    good = remote.commit(web_app("good"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port, HEALTH_TIMEOUT="6",
              BAD_PORT=str(port))
    server.start()
    assert push(server, app_name, good)["status"] == "live"

    # This version passes beside the old one and fails once it takes over.
    files = web_app("picky")
    files["server.py"] = files["server.py"].replace(
        "self.send_response(200)",
        "self.send_response(500 if sys.argv[1] == os.environ['BAD_PORT'] else 200)")
    record = push(server, app_name, remote.commit(files))
    assert record["status"] == "failed"
    assert record["error"].endswith("the previous version serves again")
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "good")
    assert spec_of(server.home, app_name)["sha"] == good
    row = server.status(app_name)
    assert row["sha"] == good and row["status"] == "failing"
    assert "-----> starting the previous version (%s) again" % good[:12] in log_of(
        record)


def test_rollback_restores_the_previous_release_without_rebuilding(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(web_app("first"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()
    first_deploy = push(server, app_name, first)
    assert first_deploy["status"] == "live"
    second = remote.commit(web_app("second"))
    assert push(server, app_name, second)["status"] == "live"
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "second")

    done = server.cli("rollback", app_name)
    assert done.stdout.startswith("queued rollback ")
    deploy_id = done.stdout.split()[2]
    record = server.wait_deploy(deploy_id)
    assert record["status"] == "live", log_of(record)
    assert record["trigger"] == "rollback"
    assert record["rollback_to"] == first_deploy["id"]
    assert record["sha"] == first
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "first")
    assert "release %s is already built" % first[:12] in log_of(record)
    assert server.status(app_name)["sha"] == first

    # Going back to a named deploy works as well, and so does saying no.
    done = server.cli("rollback", app_name, "20000101-000000-nope-abcd", check=False)
    assert done.returncode != 0 and "no deploy" in done.stderr


def test_old_releases_are_pruned_to_keep_releases(server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    port = free_port()
    server = server_factory(DOCKRUNE_KEEP_RELEASES="2")
    write_app(server.home, app_name, remote, port)
    server.start()
    shas = []
    for n in range(3):
        shas.append(remote.commit(web_app("v%d" % n)))
        assert push(server, app_name, shas[-1])["status"] == "live"
    releases = os.path.join(str(server.home), "releases", app_name, "production")
    assert sorted(os.listdir(releases)) == sorted(shas[1:])


def test_compose_release_failing_health_check_rolls_back_to_previous_sha(
        base_image, server_factory, tmp_path):
    name = "rc-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    good = remote.commit(compose_app("good"))
    port = free_port()
    server = server_factory()
    write_app(server.home, name, remote, port, HEALTH_TIMEOUT="6")
    server.start()
    try:
        assert push(server, name, good)["status"] == "live"
        files = compose_app("bad")
        files["site/index.html"] = None
        files["site/other.html"] = "other\n"
        bad = remote.commit(files)
        record = push(server, name, bad)
        assert record["status"] == "failed"
        assert "rolled back to %s" % good[:12] in record["error"]
        assert http_get("http://127.0.0.1:%d/" % port) == (200, "good\n")
        row = server.status(name)
        assert row["sha"] == good and row["status"] == "failing"
        assert "-----> rolling back to %s" % good[:12] in log_of(record)
    finally:
        compose_down("dockrune-" + name)
        remove_compose_image(name)


# -- small parts -----------------------------------------------------------------------


def test_split_command_expands_port_and_variables_without_a_shell():
    env = {"PORT": "8123", "NAME": "a b", "EMPTY": ""}
    argv = runners.split_command(
        "gunicorn app:app --bind 127.0.0.1:$PORT --name ${NAME} $UNSET "
        "${EMPTY:-fallback} '; rm -rf /' $(id)", env, "Procfile web:")
    assert argv == ["gunicorn", "app:app", "--bind", "127.0.0.1:8123", "--name",
                    "a b", "fallback", "; rm -rf /", "$(id)"]
    with pytest.raises(runners.DeployError, match="cannot split"):
        runners.split_command("echo 'open", env, "START=")


def test_read_procfile_takes_the_first_line_of_each_type(tmp_path):
    path = tmp_path / "Procfile"
    path.write_text("# comment\nweb: one --x\nworker:two\nweb: three\n\nbad line\n")
    assert runners.read_procfile(str(path)) == {"web": "one --x", "worker": "two"}
    assert runners.read_procfile(str(tmp_path / "missing")) == {}


def test_detect_kind_says_why_and_honours_start_and_type(tmp_path):
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "index.html").write_text("x")
    assert runners.detect_kind(str(tmp_path)) == ("static", "found public/index.html")
    assert runners.detect_kind(str(tmp_path), settings={"START": "run"}) == (
        "procfile", "found START= in the app's settings")
    (tmp_path / "package.json").write_text('{"devDependencies": {"nitropack": "2"}}')
    assert runners.detect_kind(str(tmp_path))[0] == "nitro"
    with pytest.raises(runners.DeployError, match="no Dockerfile"):
        runners.detect_kind(str(tmp_path), "dockerfile")


def test_dead_process_is_restarted_after_a_delay_and_reported(tmp_path):
    events = []
    sup = supervise.Supervisor(str(tmp_path / "run"),
                               notify=lambda event, info: events.append(
                                   (event, info["pid"], info["restarts"])))
    code = "import time; time.sleep(60)"
    spec = sup.start("x", "production", "live", [sys.executable, "-c", code],
                     str(tmp_path), dict(os.environ), str(tmp_path / "x.log"))
    try:
        os.kill(spec["pid"], signal.SIGKILL)
        wait_for(lambda: not sup.alive("x", "production"), what="the death")
        sup.check()
        assert events == [("process_exited", spec["pid"], 0)]
        assert sup.get("x", "production")["pid"] == spec["pid"]   # not yet: backoff
        wait_for(lambda: sup.check() or sup.alive("x", "production"), timeout=5,
                 what="the restart")
        again = sup.get("x", "production")
        assert again["pid"] != spec["pid"] and again["restarts"] == 1
        assert events[-1] == ("process_restarted", again["pid"], 1)
    finally:
        sup.stop("x", "production", "live")
    assert not supervise.session_members(again["pid"])


def test_api_rollback_without_an_earlier_live_deploy_is_a_conflict(tmp_path):
    from conftest import wsgi_call
    import handlers

    home = tmp_path / "home"
    settings = make_settings(home, DOCKRUNE_API_TOKEN="api-token-1234")
    st = store.Store(str(home))
    st.ensure_dirs()
    (home / "apps" / "solo.env").write_text("REPO=tester/solo\n")
    deployer = runners.Deployer(st, settings)
    app = handlers.Application(st, settings, runners.Runner(deployer), deployer)
    status, _headers, body = wsgi_call(
        app, "POST", "/api/apps/solo/rollback", b"{}",
        {"Authorization": "Bearer api-token-1234"})
    assert status == 409
    assert b"no earlier live deploy" in body
    status, _headers, body = wsgi_call(
        app, "POST", "/api/apps/solo/rollback", b'{"deploy": "../x"}',
        {"Authorization": "Bearer api-token-1234"})
    assert status == 400


def test_missing_tool_fails_with_its_name_instead_of_crashing(tmp_path):
    dlog = runners.DeployLog(str(tmp_path / "deploy.log"))
    with pytest.raises(runners.DeployError, match="cannot run no-such-tool-here"):
        runners.run_command(["no-such-tool-here", "--version"], dlog, timeout=5)
    dlog.close()


def test_changing_kind_from_compose_to_procfile_takes_over_the_port(
        base_image, server_factory, tmp_path):
    name = "rk-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(compose_app("compose"))
    port = free_port()
    server = server_factory()
    write_app(server.home, name, remote, port)
    server.start()
    try:
        assert push(server, name, first)["status"] == "live"
        assert http_get("http://127.0.0.1:%d/" % port) == (200, "compose\n")
        files = {path: None for path in compose_app("x")}
        files.update(web_app("procfile now"))
        record = push(server, name, remote.commit(files))
        assert record["status"] == "live", log_of(record)
        assert http_get("http://127.0.0.1:%d/" % port) == (200, "procfile now")
        left = subprocess.run(["docker", "ps", "-aq", "--filter",
                               "label=com.docker.compose.project=dockrune-" + name],
                              capture_output=True, text=True, timeout=60).stdout
        assert left.split() == []
    finally:
        runners.Deployer(store.Store(str(server.home)),
                         make_settings(server.home)).run_stop(name, "production")
        compose_down("dockrune-" + name)
        remove_compose_image(name)


def test_switch_cut_short_by_a_crash_brings_the_previous_version_back(tmp_path):
    sup = supervise.Supervisor(str(tmp_path / "run"))
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    log = str(tmp_path / "x.log")
    old = sup.start("x", "production", "live", sleep + ["old"], str(tmp_path),
                    dict(os.environ), log, sha="old")
    # What switch_process leaves behind when dockrune dies during the check.
    sup.remember_previous(old)
    sup.stop("x", "production", "live")
    new = sup.start("x", "production", "live", sleep + ["new"], str(tmp_path),
                    dict(os.environ), log, sha="new")
    try:
        supervise.Supervisor(str(tmp_path / "run")).adopt_all()
        live = sup.get("x", "production")
        assert live["sha"] == "old" and live["argv"][-1] == "old"
        assert sup.alive("x", "production")
        assert not supervise.is_running(new["pid"], new["start_time"])
        assert sup.get("x", "production", "previous") is None
    finally:
        sup.stop("x", "production", "live")
