"""Health checks: samples, status flips and app-down/app-up events."""

import http.server
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, make_settings,
                      post_hook, push_body)
import dockrune
import health
import store


class FakeApp:
    """A local HTTP server whose answer the test sets (200, 500, or gone)."""

    def __init__(self):
        self.code = 200
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(outer.code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.paths = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name="fake-app", daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_app():
    app = FakeApp()
    yield app
    app.close()


@pytest.fixture
def home(tmp_path):
    st = store.Store(str(tmp_path / "home"))
    st.ensure_dirs()
    return st


def live(st, app, port, health_path="/"):
    with open(os.path.join(st.apps_dir, app + ".env"), "w") as f:
        f.write("REPO=o/%s\nHEALTH_PATH=%s\n" % (app, health_path))
    st.update_environment(app, "production", status="live", port=port,
                          last_deploy="d1", live_deploy="d1", sha="a" * 40)


def checker(st, events):
    return health.HealthChecker(st, interval=30, retry_delay=0.05, timeout=2,
                                notify=lambda event, info: events.append(
                                    (event, info)))


# -- samples ----------------------------------------------------------------------


def test_samples_keep_one_slot_per_half_hour_for_a_day():
    entry = {}
    start = 1_800_000_000
    for n in range(3 * 24 * 2):                     # three days, two checks an hour
        entry = health.add_sample(entry, n % 4 != 0, start + n * 1800)
    assert len(entry["slots"]) == health.KEEP_SLOTS
    now = start + (3 * 24 * 2 - 1) * 1800
    assert health.uptime(entry, now) == 0.75
    assert len(health.day_slots(entry, now)) == health.KEEP_SLOTS


def test_samples_add_up_within_a_slot():
    entry = {}
    base = 1_800_000_000 - 1_800_000_000 % health.SLOT_SECONDS
    for n, up in enumerate([True, True, False]):
        entry = health.add_sample(entry, up, base + n, "HTTP 500")
    assert entry["slots"] == [[base // health.SLOT_SECONDS, 2, 3]]
    assert entry["up"] is False and entry["detail"] == "HTTP 500"
    assert health.day_slots(entry, base)[-1] == (2, 3)
    assert health.day_slots(entry, base)[0] == (0, 0)


def test_uptime_without_checks_is_none():
    assert health.uptime({}, time.time()) is None
    assert health.uptime(None, time.time()) is None


# -- the checker ---------------------------------------------------------------------


def test_down_app_flips_to_failing_then_back_to_live(home, fake_app):
    events = []
    live(home, "blog", fake_app.port, "/up")
    hc = checker(home, events)

    assert hc.check_all() == {"blog/production": True}
    assert fake_app.paths == ["/up"]
    assert home.environment("blog", "production")["status"] == "live"
    assert events == []

    fake_app.code = 500
    assert hc.check_all() == {"blog/production": False}
    summary = home.environment("blog", "production")
    assert summary["status"] == "failing" and summary["health"] == "down"
    [(event, info)] = events
    assert event == "app-down"
    assert info["app"] == "blog" and info["environment"] == "production"
    assert info["detail"] == "HTTP 500" and info["since"]

    hc.check_all()                                  # still down: no second event
    assert len(events) == 1

    fake_app.code = 204
    hc.check_all()
    assert home.environment("blog", "production")["status"] == "live"
    assert [e for e, _i in events] == ["app-down", "app-up"]

    samples = home.health_samples()["blog/production"]
    assert sum(s[2] for s in samples["slots"]) == 4
    assert sum(s[1] for s in samples["slots"]) == 2


def test_one_failed_probe_is_retried_before_it_counts(home, fake_app):
    events = []
    live(home, "blog", fake_app.port)
    calls = []
    real = health.runners.probe

    def flaky(url, timeout=3):
        calls.append(url)
        return (None, "connection reset") if len(calls) == 1 else real(url, timeout)

    hc = checker(home, events)
    health.runners.probe = flaky
    try:
        assert hc.check_all() == {"blog/production": True}
    finally:
        health.runners.probe = real
    assert len(calls) == 2 and events == []


def test_gone_app_is_down_and_failed_deploy_is_not_made_live(home, fake_app):
    events = []
    live(home, "blog", fake_app.port)
    home.update_environment("blog", "production", status="failing", last_deploy="d2")
    hc = checker(home, events)
    hc.check_all()                # the old version still answers: stays failing
    assert home.environment("blog", "production")["status"] == "failing"
    assert events == []

    fake_app.close()
    hc.check_all()
    assert [e for e, _i in events] == ["app-down"]
    assert "refused" in events[0][1]["detail"].lower()


def test_stopped_and_deploying_environments_are_not_checked(home, fake_app):
    live(home, "blog", fake_app.port)
    live(home, "shop", fake_app.port)
    home.update_environment("blog", "production", status="stopped")
    home.update_environment("shop", "production", status="deploying")
    assert checker(home, []).check_all() == {}
    assert fake_app.paths == []


def test_a_deploy_during_the_check_is_not_undone(home, fake_app):
    events = []
    live(home, "blog", fake_app.port)
    fake_app.code = 503
    hc = checker(home, events)
    real_record = hc.record

    def deploy_meanwhile(results):
        home.update_environment("blog", "production", status="deploying",
                                running="d3")
        return real_record(results)

    hc.record = deploy_meanwhile
    hc.check_all()
    assert home.environment("blog", "production")["status"] == "deploying"
    assert events == []


def test_samples_of_removed_environments_are_dropped(home, fake_app):
    live(home, "blog", fake_app.port)
    home.write_health_samples({"gone/production": {"slots": [[1, 1, 1]]}})
    checker(home, []).check_all()
    assert set(home.health_samples()) == {"blog/production"}


def test_daemon_runs_health_thread_and_hands_events_to_listeners(tmp_path, fake_app):
    settings = make_settings(tmp_path / "home", DOCKRUNE_HEALTH_INTERVAL="1")
    daemon = dockrune.Daemon(settings)
    live(daemon.store, "blog", fake_app.port)
    daemon.health.retry_delay = 0.05
    seen = []
    daemon.listeners.append(lambda event, info: seen.append(event))
    daemon.listeners.insert(0, lambda event, info: 1 / 0)   # must not stop the rest
    fake_app.code = 500
    daemon.start()
    try:
        deadline = time.monotonic() + 20
        while "app-down" not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "app-down" in seen
        assert any(t.name == "dockrune-health" for t in threading.enumerate())
    finally:
        daemon.stop(timeout=5)
    assert not any(t.name == "dockrune-health" for t in threading.enumerate())


def test_health_interval_zero_turns_checks_off(tmp_path):
    settings = make_settings(tmp_path / "home", DOCKRUNE_HEALTH_INTERVAL="0")
    daemon = dockrune.Daemon(settings)
    daemon.start()
    try:
        assert not any(t.name == "dockrune-health" for t in threading.enumerate())
    finally:
        daemon.stop(timeout=5)


def test_environment_with_a_job_in_its_lane_is_not_judged(home, fake_app):
    events = []
    live(home, "blog", fake_app.port)
    fake_app.code = 500
    hc = health.HealthChecker(home, retry_delay=0, busy=lambda app, env: True,
                              notify=lambda event, info: events.append(event))
    assert hc.check_all() == {}
    assert home.environment("blog", "production")["status"] == "live"
    assert events == [] and home.health_samples() == {}


def test_new_deploy_after_an_outage_is_judged_afresh(home, fake_app):
    events = []
    live(home, "blog", fake_app.port)
    hc = checker(home, events)
    fake_app.code = 500
    hc.check_all()
    assert home.environment("blog", "production")["status"] == "failing"

    # A new deploy goes live, and its app does not answer either.
    home.update_environment("blog", "production", status="live", last_deploy="d2",
                            live_deploy="d2")
    hc.check_all()
    assert home.environment("blog", "production")["status"] == "failing"
    assert [e for e, _i in events] == ["app-down", "app-down"]


def test_real_container_going_down_and_up_flips_status(
        base_image, server_factory, tmp_path):
    name = "hc-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(compose_app("up"))
    server = server_factory(DOCKRUNE_HEALTH_INTERVAL="1", DOCKRUNE_API_TOKEN="t")
    os.makedirs(os.path.join(str(server.home), "apps"))
    with open(os.path.join(str(server.home), "apps", name + ".env"), "w") as f:
        f.write("REPO=tester/%s\nGIT_URL=%s\nBRANCH=main\nPORT=%d\n"
                % (name, remote.bare, free_port()))
    server.start()

    def status():
        request = urllib.request.Request(server.url + "/api/apps/" + name,
                                         headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)[0]

    def wait_for(wanted, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = status()
            if row["status"] == wanted:
                return row
            time.sleep(0.3)
        raise AssertionError("never %s: %r\n%s" % (wanted, row, server.log()))

    def containers():
        return subprocess.run(
            ["docker", "ps", "-aq", "--filter",
             "label=com.docker.compose.project=dockrune-" + name],
            capture_output=True, text=True, timeout=60, check=True).stdout.split()

    try:
        code, answer = post_hook(server.url, "push", push_body("tester/" + name, sha))
        assert code == 202
        assert server.wait_deploy(answer["deploy"])["status"] == "live"
        wait_for("live")
        subprocess.run(["docker", "stop", "-t", "1"] + containers(), check=True,
                       capture_output=True, timeout=60)
        row = wait_for("failing")
        assert row["health"] == "down"
        subprocess.run(["docker", "start"] + containers(), check=True,
                       capture_output=True, timeout=60)
        row = wait_for("live")
        assert row["health"] == "up" and 0 < row["uptime_24h"] < 100
        log = server.log()
        assert "event app-down for %s/production" % name in log
        assert "event app-up for %s/production" % name in log
    finally:
        compose_down("dockrune-" + name)


@pytest.mark.parametrize("code", [200, 204, 302, 404, 500])
def test_probe_reads_the_status_and_follows_no_redirect(fake_app, code):
    import runners
    fake_app.code = code
    assert runners.probe("http://127.0.0.1:%d/health?x=1" % fake_app.port) == (
        code, "HTTP %d" % code)
    assert fake_app.paths[-1] == "/health?x=1"


def test_probe_of_a_closed_port_or_a_stranger_is_no_answer():
    import runners
    import socket
    code, detail = runners.probe("http://127.0.0.1:%d/" % free_port())
    assert code is None and "refused" in detail
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen()

    def answer_garbage():
        conn, _ = stranger.accept()
        conn.recv(1000)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        code, detail = runners.probe("http://127.0.0.1:%d/" % stranger.getsockname()[1])
        assert code is None and detail.startswith("not HTTP")
    finally:
        stranger.close()


def test_health_checks_every_thirty_seconds_unless_told(tmp_path):
    assert make_settings(tmp_path).health_interval == 30
    assert make_settings(tmp_path, DOCKRUNE_HEALTH_INTERVAL="5").health_interval == 5
