"""Poll mode: new heads found with git ls-remote and the REST API, no webhook."""

import http.server
import json
import os
import secrets
import threading
import time

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, http_get,
                      make_settings, post_hook, push_body, sign, wsgi_call,
                      write_app)
import dockrune
import handlers
import poll
import runners
import store


# -- timing ------------------------------------------------------------------------


def test_backoff_delay_doubles_after_each_failure_up_to_the_ceiling():
    assert poll.backoff_delay(10, 0, 300) == 10
    assert [poll.backoff_delay(10, n, 300) for n in range(1, 7)] == [
        20, 40, 80, 160, 300, 300]
    assert poll.backoff_delay(10, 1000, 300) == 300


def test_backoff_delay_never_shorter_than_the_interval():
    assert poll.backoff_delay(60, 3, 30) == 60


def test_jittered_stays_within_a_tenth_either_way():
    assert poll.jittered(100, rand=lambda: 0.0) == pytest.approx(90)
    assert poll.jittered(100, rand=lambda: 0.5) == pytest.approx(100)
    assert poll.jittered(100, rand=lambda: 1.0) == pytest.approx(110)
    values = [poll.jittered(100) for _ in range(500)]
    assert all(90 <= v <= 110 for v in values)
    assert len({round(v, 3) for v in values}) > 100


def test_parse_ls_remote_reads_refs_and_the_head_symref():
    sha1, sha2 = "a" * 40, "b" * 40
    text = ("ref: refs/heads/trunk\tHEAD\n%s\tHEAD\n%s\trefs/heads/trunk\n"
            "%s\trefs/heads/other\nnonsense\n" % (sha1, sha1, sha2))
    refs, symrefs = poll.parse_ls_remote(text)
    assert symrefs == {"HEAD": "refs/heads/trunk"}
    assert refs == {"HEAD": sha1, "refs/heads/trunk": sha1, "refs/heads/other": sha2}


def test_poll_enabled_needs_an_interval_and_respects_poll_off(tmp_path):
    assert not poll.poll_enabled(make_settings(tmp_path), {})
    on = make_settings(tmp_path, DOCKRUNE_POLL_INTERVAL="30")
    assert poll.poll_enabled(on, {})
    assert not poll.poll_enabled(on, {"POLL": "off"})


# -- the poller, with a runner that never starts (jobs stay waiting) ----------------


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


class Rig:
    """A poller over a temporary home, its runner never started."""

    def __init__(self, home, **settings):
        settings.setdefault("DOCKRUNE_POLL_INTERVAL", "10")
        settings.setdefault("DOCKRUNE_POLL_MAX_BACKOFF", "60")
        self.settings = make_settings(home, **settings)
        self.store = store.Store(self.settings.home)
        self.store.ensure_dirs()
        self.deployer = runners.Deployer(self.store, self.settings)
        self.runner = runners.Runner(self.deployer)
        self.clock = Clock()
        self.poller = poll.Poller(self.store, self.settings, self.runner,
                                  self.deployer, rand=lambda: 0.5, clock=self.clock)
        self.app = handlers.Application(self.store, self.settings, self.runner,
                                        self.deployer)

    def seen(self, key):
        return store.read_json(os.path.join(self.store.state_dir, "poll.json"))[key]

    def hook_push(self, repo, sha):
        body = push_body(repo, sha)
        status, _h, data = wsgi_call(self.app, "POST", "/hooks/github", body, {
            "X-GitHub-Event": "push", "X-GitHub-Delivery": os.urandom(6).hex(),
            "X-Hub-Signature-256": sign(body)})
        return status, json.loads(data)


def test_poller_queues_a_new_head_once_with_trigger_poll(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)

    queued = rig.poller.run_once()
    assert [(r["app"], r["environment"], r["sha"], r["ref"], r["trigger"])
            for r in queued] == [("blog", "production", first, "main", "poll")]
    assert rig.store.environment("blog", "production")["queued"] == queued[0]["id"]
    assert rig.seen("blog/production")["sha"] == first

    rig.clock.now += 5
    assert rig.poller.run_once() == []      # not due yet
    rig.clock.now += 10
    assert rig.poller.run_once() == []      # due, but nothing new

    second = remote.commit({"index.html": "two"})
    rig.clock.now += 10
    older = rig.store.history("blog")[0]
    queued = rig.poller.run_once()
    assert [r["sha"] for r in queued] == [second]
    # The first, still waiting, was superseded in its lane as by a push.
    assert queued[0]["candidates"] == [first]
    assert rig.store.deploy(older["id"])["status"] == "superseded"


def test_poller_follows_the_remote_default_branch_when_branch_is_unset(tmp_path):
    remote = GitRemote(str(tmp_path / "git"), branch="trunk")
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123, BRANCH="")

    queued = rig.poller.run_once()
    assert [(r["sha"], r["ref"]) for r in queued] == [(sha, "trunk")]


def test_poller_reports_a_missing_branch_without_queueing(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123, BRANCH="nope")

    assert rig.poller.run_once() == []
    assert rig.seen("blog/production")["error"] == "no branch 'nope' on the remote"


def test_failing_remote_backs_off_doubling_then_recovers(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    hidden = remote.bare + ".away"
    os.rename(remote.bare, hidden)
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)
    key = "git:" + remote.bare

    assert rig.poller.run_once() == []
    assert rig.poller.failures(key) == 1
    seen = rig.seen("blog/production")
    assert "git ls-remote exited" in seen["error"] and seen["retry_at"]

    # 20 s after one failure, then 40, then 60 (the ceiling), then 60 again.
    for failures, wait in ((2, 20), (3, 40), (4, 60), (5, 60)):
        rig.clock.now += wait - 1
        rig.poller.run_once()
        assert rig.poller.failures(key) == failures - 1, "asked too early"
        rig.clock.now += 1
        rig.poller.run_once()
        assert rig.poller.failures(key) == failures

    os.rename(hidden, remote.bare)
    rig.clock.now += 60
    queued = rig.poller.run_once()
    assert [r["sha"] for r in queued] == [sha]
    assert rig.poller.failures(key) == 0
    assert rig.seen("blog/production")["error"] is None
    rig.clock.now += 10
    rig.poller.run_once()       # back on the normal interval
    assert rig.seen("blog/production")["polled_at"] == poll.store_time(rig.clock.now)


def test_apps_sharing_a_remote_ask_it_once_per_pass(tmp_path, monkeypatch):
    remote = GitRemote(str(tmp_path / "git"))
    remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)
    write_app(rig.settings.home, "blog-copy", remote, 8124, REPO="tester/copy")
    calls = []
    real = poll.list_heads
    monkeypatch.setattr(poll, "list_heads", lambda *a, **k: calls.append(a) or real(
        *a, **k))

    assert len(rig.poller.run_once()) == 2
    assert len(calls) == 1


def test_poll_then_webhook_of_the_same_sha_queues_one_deploy(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)

    assert len(rig.poller.run_once()) == 1
    status, answer = rig.hook_push("tester/blog", sha)
    assert status == 200 and "on its way" in answer["ignored"]
    assert [r["sha"] for r in rig.store.history("blog")] == [sha]


def test_webhook_then_poll_of_the_same_sha_queues_one_deploy(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)

    status, answer = rig.hook_push("tester/blog", sha)
    assert status == 202, answer
    assert rig.poller.run_once() == []
    assert [r["sha"] for r in rig.store.history("blog")] == [sha]


def test_poll_skips_a_sha_that_is_live(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)
    rig.store.update_environment("blog", "production", status="live", sha=sha)

    assert rig.poller.run_once() == []
    assert rig.store.history("blog") == []
    assert rig.seen("blog/production")["sha"] == sha


def test_webhook_without_poll_mode_still_queues_a_live_sha(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home", DOCKRUNE_POLL_INTERVAL="0")
    write_app(rig.settings.home, "blog", remote, 8123)
    rig.store.update_environment("blog", "production", status="live", sha=sha)

    assert rig.hook_push("tester/blog", sha)[0] == 202


def test_app_with_poll_off_is_not_polled(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123, POLL="off")

    assert rig.poller.run_once() == []
    assert store.read_json(os.path.join(rig.store.state_dir, "poll.json")) == {}


# -- pull requests through a stand-in for the REST API ------------------------------


class FakeGitHub(http.server.BaseHTTPRequestHandler):
    pulls = []
    seen = []
    redirect_to = None

    def do_GET(self):
        FakeGitHub.seen.append((self.path, self.headers))
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        body = json.dumps(FakeGitHub.pulls).encode()
        etag = '"%s"' % abs(hash(body))
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def github():
    FakeGitHub.pulls, FakeGitHub.seen, FakeGitHub.redirect_to = [], [], None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGitHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def pull(number, sha, repo="tester/blog"):
    return {"number": number, "title": "Change %d" % number,
            "html_url": "https://github.com/tester/blog/pull/%d" % number,
            "user": {"login": "someone"},
            "head": {"sha": sha, "ref": "feature-%d" % number,
                     "repo": {"full_name": repo}}}


def test_open_pull_requests_get_previews_with_conditional_requests(
        tmp_path, github):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home", DOCKRUNE_GITHUB_TOKEN="tok-12345",
              DOCKRUNE_GITHUB_API=github)
    write_app(rig.settings.home, "blog", remote, 8123)
    FakeGitHub.pulls = [pull(7, "c" * 40), pull(8, "d" * 40, repo="stranger/blog")]

    queued = rig.poller.run_once()
    assert [(r["environment"], r["sha"], r["trigger"]) for r in queued] == [
        ("production", sha, "poll"), ("pr-7", "c" * 40, "poll")]
    preview = queued[1]
    assert (preview["pr"], preview["ref"], preview["title"]) == (
        7, "feature-7", "Change 7")
    path, headers = FakeGitHub.seen[0]
    assert path == "/repos/tester/blog/pulls?state=open&per_page=100"
    assert headers["Authorization"] == "Bearer tok-12345"
    assert headers["Accept"] == "application/vnd.github+json"
    assert headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert "If-None-Match" not in headers

    rig.clock.now += 10
    assert rig.poller.run_once() == []
    assert FakeGitHub.seen[1][1]["If-None-Match"]
    assert rig.seen("blog/pulls")["open"] == 2

    FakeGitHub.pulls = [pull(7, "e" * 40)]
    rig.clock.now += 10
    assert [(r["environment"], r["sha"]) for r in rig.poller.run_once()] == [
        ("pr-7", "e" * 40)]

    # Closed, then reopened at the same head: deployed again.
    FakeGitHub.pulls = []
    rig.clock.now += 10
    assert rig.poller.run_once() == []
    rig.store.remove_environment("blog", "pr-7")
    rig.runner = rig.poller.runner = runners.Runner(rig.deployer)
    FakeGitHub.pulls = [pull(7, "e" * 40)]
    rig.clock.now += 10
    assert [(r["environment"], r["sha"]) for r in rig.poller.run_once()] == [
        ("pr-7", "e" * 40)]


def test_api_apps_shows_what_polling_saw(tmp_path):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home", DOCKRUNE_API_TOKEN="api-token-1234")
    write_app(rig.settings.home, "blog", remote, 8123)
    rig.poller.run_once()

    status, _h, data = wsgi_call(rig.app, "GET", "/api/apps", headers={
        "Authorization": "Bearer api-token-1234"})
    assert status == 200
    row = json.loads(data)[0]
    assert row["poll_sha"] == sha and row["polled_at"].endswith("Z")


def test_api_redirect_to_another_host_is_not_followed(tmp_path, github):
    remote = GitRemote(str(tmp_path / "git"))
    remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home", DOCKRUNE_GITHUB_TOKEN="tok-12345",
              DOCKRUNE_GITHUB_API=github)
    write_app(rig.settings.home, "blog", remote, 8123)
    FakeGitHub.redirect_to = "http://elsewhere.invalid/steal"

    rig.poller.run_once()
    assert len(FakeGitHub.seen) == 1
    assert "302" in rig.seen("blog/pulls")["error"]
    assert rig.poller.failures("api:tester/blog") == 1
    assert rig.poller.failures("git:" + remote.bare) == 0


# -- status ------------------------------------------------------------------------


def test_status_shows_when_each_app_was_polled_and_what_it_saw(
        tmp_path, monkeypatch, capsys):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "one"})
    rig = Rig(tmp_path / "home")
    write_app(rig.settings.home, "blog", remote, 8123)
    rig.poller.run_once()
    monkeypatch.setenv("DOCKRUNE_HOME", rig.settings.home)
    monkeypatch.setenv("DOCKRUNE_POLL_INTERVAL", "10")

    assert dockrune.main(["status", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["polled_at"] == poll.store_time(rig.clock.now)
    assert row["poll_sha"] == sha and row["poll_error"] is None

    assert dockrune.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "POLLED" in out and "saw %s" % sha[:12] in out

    # Without poll mode, status looks as it always did.
    monkeypatch.setenv("DOCKRUNE_POLL_INTERVAL", "0")
    assert dockrune.main(["status", "--json"]) == 0
    assert "polled_at" not in json.loads(capsys.readouterr().out)[0]
    assert dockrune.main(["status"]) == 0
    assert "POLLED" not in capsys.readouterr().out


# -- end to end: a real daemon, real git, a real Docker engine ------------------------


@pytest.fixture
def app_name():
    name = "poll-" + secrets.token_hex(3)
    yield name
    compose_down("dockrune-" + name)


def wait_for(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def deploys_of(server, app):
    return store.Store(str(server.home)).history(app)


def test_commit_pushed_without_webhooks_goes_live_within_two_intervals(
        base_image, server_factory, tmp_path, app_name):
    # Long enough for the poll and the deploy (a few seconds: the test app's
    # container stops at once, see compose_app).
    interval = 8
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(compose_app("first"))
    port = free_port()
    server = server_factory(DOCKRUNE_POLL_INTERVAL=str(interval))
    write_app(server.home, app_name, remote, port)
    server.start()

    live = wait_for(lambda: http_get("http://127.0.0.1:%d/" % port, 1) == (
        200, "first\n"), timeout=2 * interval + 60)
    assert live, server.log()

    second = remote.commit(compose_app("second"))
    pushed = time.monotonic()
    assert wait_for(lambda: http_get("http://127.0.0.1:%d/" % port, 1) == (
        200, "second\n"), timeout=2 * interval), server.log()
    assert time.monotonic() - pushed <= 2 * interval
    records = deploys_of(server, app_name)
    assert [(r["sha"], r["trigger"], r["status"]) for r in records] == [
        (second, "poll", "live"), (first, "poll", "live")]
    row = server.status(app_name)
    assert row["sha"] == second and row["poll_sha"] == second
    assert row["polled_at"].endswith("Z")


def test_failing_remote_backs_off_then_recovers_and_deploys(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(compose_app("late"))
    hidden = remote.bare + ".away"
    os.rename(remote.bare, hidden)
    port = free_port()
    server = server_factory(DOCKRUNE_POLL_INTERVAL="1", DOCKRUNE_POLL_MAX_BACKOFF="4")
    write_app(server.home, app_name, remote, port)
    server.start()

    assert wait_for(lambda: server.log().count("next try in") >= 3, 30), server.log()
    row = server.status(app_name)
    assert "git ls-remote exited" in row["poll_error"]
    text = server.log()
    assert "1 in a row; next try in 2s" in text or "1 in a row; next try in 1s" in text
    assert "3 in a row; next try in 4s" in text or "3 in a row; next try in 3s" in text

    os.rename(hidden, remote.bare)
    assert wait_for(lambda: http_get("http://127.0.0.1:%d/" % port, 1) == (
        200, "late\n"), timeout=90), server.log()
    assert "works again after" in server.log()
    assert server.status(app_name)["poll_error"] is None
    assert [(r["sha"], r["trigger"]) for r in deploys_of(server, app_name)] == [
        (sha, "poll")]


def test_push_seen_by_webhook_and_poll_deploys_once(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    port = free_port()
    server = server_factory(DOCKRUNE_POLL_INTERVAL="2")
    write_app(server.home, app_name, remote, port)
    server.start()

    for marker in ("one", "two"):
        sha = remote.commit(compose_app(marker))
        code, answer = post_hook(server.url, "push",
                                 push_body("tester/" + app_name, sha))
        assert code in (200, 202), answer
        assert wait_for(lambda: http_get("http://127.0.0.1:%d/" % port, 1) == (
            200, marker + "\n"), timeout=90), server.log()
        time.sleep(5)       # more than two intervals: the poller had its look
        records = [r for r in deploys_of(server, app_name) if r["sha"] == sha]
        assert len(records) == 1, records
        assert records[0]["status"] == "live"
    assert server.status(app_name)["poll_sha"] == sha
