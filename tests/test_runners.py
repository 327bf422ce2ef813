import os
import threading
import time

import pytest

import runners
import store


# -- lanes --


class RecordingDeployer:
    """Stands in for Deployer in queue tests: jobs block until released."""

    def __init__(self):
        self.ran = []
        self.superseded = []
        self.release = threading.Event()
        self.running = 0
        self.max_parallel_per_lane = {}
        self._lock = threading.Lock()
        self._lanes = {}

    def run(self, job):
        lane = (job["app"], job["environment"])
        with self._lock:
            self._lanes[lane] = self._lanes.get(lane, 0) + 1
            self.max_parallel_per_lane[lane] = max(
                self.max_parallel_per_lane.get(lane, 0), self._lanes[lane])
        self.release.wait(10)
        if job.get("explode"):
            raise RuntimeError("job failed badly")
        with self._lock:
            self._lanes[lane] -= 1
            self.ran.append(job["id"])

    def supersede(self, older, newer):
        self.superseded.append((older["id"], newer["id"]))

    def enqueued(self, job):
        pass


def job(n, app="blog", env="production", **extra):
    return dict(extra, id="j%d" % n, action="deploy", app=app, environment=env)


def test_newest_waiting_job_supersedes_the_older_one():
    deployer = RecordingDeployer()
    runner = runners.Runner(deployer, workers=2)
    runner.start()
    runner.submit(job(1))
    time.sleep(0.2)             # j1 is running now
    for n in (2, 3, 4):
        runner.submit(job(n))
    deployer.release.set()
    assert runner.wait_idle(10)
    assert deployer.ran == ["j1", "j4"]
    assert deployer.superseded == [("j2", "j3"), ("j3", "j4")]
    runner.shutdown()


def test_one_job_per_lane_at_a_time_but_lanes_run_in_parallel():
    deployer = RecordingDeployer()
    runner = runners.Runner(deployer, workers=2)
    runner.start()
    runner.submit(job(1, app="a"))
    runner.submit(job(2, app="b"))
    time.sleep(0.3)
    assert runner.busy() == 2
    assert len(deployer._lanes) == 2     # both lanes started
    runner.submit(job(3, app="a"))
    deployer.release.set()
    assert runner.wait_idle(10)
    assert sorted(deployer.ran) == ["j1", "j2", "j3"]
    assert set(deployer.max_parallel_per_lane.values()) == {1}
    runner.shutdown()


def test_worker_survives_a_job_that_raises(caplog):
    deployer = RecordingDeployer()
    deployer.release.set()
    runner = runners.Runner(deployer, workers=1)
    runner.start()
    runner.submit(job(1, explode=True))
    runner.submit(job(2, app="other"))
    assert runner.wait_idle(10)
    assert deployer.ran == ["j2"]
    assert "job j1 for blog/production failed" in caplog.text
    runner.shutdown()


def test_workers_are_named_threads():
    runner = runners.Runner(RecordingDeployer(), workers=2)
    runner.start()
    names = {t.name for t in threading.enumerate()}
    assert {"dockrune-worker-1", "dockrune-worker-2"} <= names
    assert runner.shutdown(timeout=2) == []


# -- commands --


@pytest.fixture
def dlog(tmp_path):
    log = runners.DeployLog(str(tmp_path / "deploy.log"), secrets=["s3cr3t-token"])
    yield log
    log.close()


def read(dlog):
    with open(dlog.path) as f:
        return f.read()


def test_run_command_streams_output_with_timestamps(dlog):
    runners.run_command(["sh", "-c", "echo one; echo two >&2"], dlog, timeout=10)
    text = read(dlog)
    assert "$ sh -c 'echo one; echo two >&2'" in text
    lines = [line for line in text.splitlines() if line.endswith(("one", "two"))]
    assert len(lines) == 2
    assert all(line[2] == ":" and line[5] == ":" for line in lines)


def test_run_command_failure_names_the_command_and_its_last_lines(dlog):
    with pytest.raises(runners.DeployError) as e:
        runners.run_command(["sh", "-c", "echo building; echo 'no space left' >&2; "
                             "exit 3"], dlog, timeout=10)
    assert "exited 3" in str(e.value)
    assert "no space left" in str(e.value)
    assert str(e.value).startswith("sh -c")


def test_run_command_timeout_kills_grandchildren_holding_the_pipe(dlog, tmp_path):
    canary = tmp_path / "canary"
    script = "sleep 30 & sleep 3 && touch %s; wait" % canary
    started = time.monotonic()
    with pytest.raises(runners.DeployError, match="timed out"):
        runners.run_command(["sh", "-c", script], dlog, timeout=1)
    assert time.monotonic() - started < 8
    time.sleep(3)
    assert not canary.exists()


def test_deploy_log_redacts_secrets_and_strips_control_characters(dlog):
    runners.run_command(["sh", "-c", "printf 'token=s3cr3t-token \\033[31mred\\n'"],
                        dlog, timeout=10)
    text = read(dlog)
    assert "s3cr3t-token" not in text
    assert "token=*** [31mred" in text
    assert "\033" not in text


def test_deploy_log_is_capped_with_a_visible_marker(tmp_path):
    dlog = runners.DeployLog(str(tmp_path / "big.log"), max_bytes=2000)
    runners.run_command(["sh", "-c", "i=0; while [ $i -lt 500 ]; do echo line $i; "
                         "i=$((i+1)); done"], dlog, timeout=20)
    dlog.step("still narrated after the cap")
    dlog.close()
    text = open(dlog.path).read()
    assert "[log truncated: over 2000 bytes]" in text
    assert "line 499" not in text
    assert text.rstrip().endswith("-----> still narrated after the cap")
    assert len(text) < 2600


# -- detection --


def make_tree(root, files):
    for name, text in files.items():
        path = os.path.join(str(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


@pytest.mark.parametrize("files,kind,reason", [
    ({"compose.yaml": "", "Dockerfile": ""}, "compose", "found compose.yaml"),
    ({"docker-compose.yml": ""}, "compose", "found docker-compose.yml"),
    ({"Dockerfile": "", "index.html": ""}, "dockerfile", "found Dockerfile"),
    ({"nuxt.config.ts": "", "Procfile": ""}, "nitro", "found nuxt.config.ts"),
    ({"package.json": '{"dependencies": {"nitropack": "2"}}'}, "nitro",
     "found a nuxt or nitropack dependency in package.json"),
    ({"Procfile": "web: x"}, "procfile", "found Procfile"),
    ({"public/index.html": ""}, "static", "found public/index.html"),
    ({"index.html": ""}, "static", "found index.html"),
])
def test_detect_kind_follows_the_documented_order(tmp_path, files, kind, reason):
    assert runners.detect_kind(make_tree(tmp_path, files)) == (kind, reason)


def test_detect_kind_with_nothing_known_says_what_it_looked_for(tmp_path):
    with pytest.raises(runners.DeployError, match="cannot tell what to run"):
        runners.detect_kind(make_tree(tmp_path, {"README": ""}))


def test_detect_kind_honours_type_and_rejects_unknown_type(tmp_path):
    root = make_tree(tmp_path, {"compose.yaml": "", "index.html": ""})
    assert runners.detect_kind(root, "static")[0] == "static"
    with pytest.raises(runners.DeployError, match="TYPE='php'"):
        runners.detect_kind(root, "php")


# -- small pieces --


def test_compose_project_names_environments_apart():
    assert runners.compose_project("blog", "production") == "dockrune-blog"
    assert runners.compose_project("blog", "pr-7") == "dockrune-blog-pr-7"


def test_git_environment_carries_token_outside_url_and_argv():
    env = runners.git_environment("https://github.com/o/r.git", "ghp_secret")
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_CONFIG_KEY_0"] == "http.https://github.com/.extraheader"
    assert env["GIT_CONFIG_VALUE_0"].startswith("Authorization: Basic ")
    assert "ghp_secret" not in env["GIT_CONFIG_VALUE_0"]
    assert not any(k.startswith("DOCKRUNE_") for k in env)
    assert env["GIT_ALLOW_PROTOCOL"] == "https:ssh:file"
    local = runners.git_environment("/srv/git/r.git", "ghp_secret")
    assert "GIT_CONFIG_COUNT" not in local
    # The GitHub token goes to GitHub (or the configured base) only.
    elsewhere = runners.git_environment("https://gitlab.example/o/r.git", "ghp_secret")
    assert not [v for v in elsewhere.values() if "Authorization" in v]
    enterprise = runners.git_environment("https://git.corp.example/o/r.git",
                                         "ghp_secret", "https://git.corp.example")
    assert enterprise["GIT_CONFIG_KEY_0"] == "http.https://git.corp.example/.extraheader"


def test_git_url_defaults_to_github_and_refuses_option_like_urls():
    class G:
        git_base_url = "https://github.com"

    assert runners.git_url_for({"REPO": "o/r"}, G) == "https://github.com/o/r.git"
    with pytest.raises(runners.DeployError):
        runners.git_url_for({"GIT_URL": "--upload-pack=x"}, G)
    with pytest.raises(runners.DeployError):
        runners.git_url_for({"REPO": "../x"}, G)


def test_app_environment_never_hands_dockrune_secrets_to_the_app(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKRUNE_WEBHOOK_SECRET", "hush")
    from conftest import make_settings
    settings = make_settings(tmp_path)
    st = store.Store(str(tmp_path))
    st.ensure_dirs()
    with open(st.app_path("blog"), "w") as f:
        f.write("REPO=o/blog\nPORT=8300\nDATABASE_URL=x\n")
    deployer = runners.Deployer(st, settings)
    record = deployer.new_deploy("blog", "production", "a" * 40, "main", "push")
    ctx = deployer.context(record, None)
    env = ctx.app_environment()
    assert env["PORT"] == "8300" and env["DATABASE_URL"] == "x"
    assert "DOCKRUNE_WEBHOOK_SECRET" not in env
    assert "hush" not in env.values()


# -- preview reconciliation --


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("36h", 129600),
                                          ("7d", 604800), ("45", 45), ("", 12)])
def test_parse_duration_understands_units(text, seconds):
    assert runners.parse_duration(text, 12) == seconds


def test_parse_duration_refuses_nonsense():
    with pytest.raises(ValueError, match="not a duration"):
        runners.parse_duration("soon", 1)


class Submitted:
    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)


def preview_store(tmp_path, settings="REPO=o/blog\n"):
    st = store.Store(str(tmp_path))
    st.ensure_dirs()
    with open(st.app_path("blog"), "w") as f:
        f.write(settings)
    return st


def test_reconcile_removes_previews_past_their_ttl(tmp_path):
    st = preview_store(tmp_path, "REPO=o/blog\nPREVIEW_TTL=2d\n")
    st.update_environment("blog", "production", status="live",
                          deployed_at="2026-01-01T00:00:00Z")
    st.update_environment("blog", "pr-1", status="live",
                          deployed_at="2026-01-01T00:00:00Z")
    st.update_environment("blog", "pr-2", status="live",
                          deployed_at="2026-01-04T00:00:00Z")
    now = runners.datetime.datetime(2026, 1, 4, 12, tzinfo=runners.datetime.timezone.utc)
    runner = Submitted()
    stale = runners.Reconciler(st, runner).run_once(now.timestamp())
    assert [(a, e) for a, e, _ in stale] == [("blog", "pr-1")]
    assert "PREVIEW_TTL" in stale[0][2]
    assert runner.jobs == [{"action": "teardown", "app": "blog", "environment": "pr-1",
                            "reason": stale[0][2]}]


def test_reconcile_keeps_only_the_newest_max_previews(tmp_path):
    st = preview_store(tmp_path, "REPO=o/blog\nMAX_PREVIEWS=2\n")
    for n in range(1, 5):
        st.update_environment("blog", "pr-%d" % n, status="live",
                              deployed_at="2026-01-0%dT00:00:00Z" % n)
    now = runners.datetime.datetime(2026, 1, 5, tzinfo=runners.datetime.timezone.utc)
    stale = runners.stale_previews(st, now.timestamp())
    assert sorted(e for _, e, _ in stale) == ["pr-1", "pr-2"]


def test_reconcile_asks_about_pull_requests_and_keeps_what_it_cannot_tell(tmp_path):
    st = preview_store(tmp_path)
    for n in (1, 2, 3):
        st.update_environment("blog", "pr-%d" % n, status="live",
                              deployed_at=store.utcnow())
    st.update_environment("blog", "branch-x", status="live", deployed_at=store.utcnow())
    asked = []

    def state(repo, number):
        asked.append((repo, number))
        return {1: "closed", 2: "open"}.get(number)

    stale = runners.stale_previews(st, time.time(), state)
    assert [(e, r) for _, e, r in stale] == [("pr-1", "pull request #1 is closed")]
    assert sorted(asked) == [("o/blog", 1), ("o/blog", 2), ("o/blog", 3)]


# As `docker-compose config` (v1) and `docker compose config` (v2) render ports.
V1_PORTS = ("services:\n  web:\n    build: .\n    ports:\n"
            "    - 127.0.0.1:9100:8080/tcp\n    - '[::1]:9100:8081/tcp'\n%s"
            "version: '3'\n")
V2_PORTS = ("name: x\nservices:\n  web:\n    ports:\n"
            "      - mode: ingress\n        host_ip: 127.0.0.1\n        target: 8080\n"
            "        published: \"9100\"\n        protocol: tcp\n%s")


@pytest.mark.parametrize("text,problem", [
    (V1_PORTS % "", None),
    (V2_PORTS % "", None),
    (V1_PORTS % "    - 9100:8082/tcp\n", "publishes port 9100 on every interface"),
    (V1_PORTS % "    - 0.0.0.0:9100:8082/tcp\n", "publishes port 9100 on every"),
    (V1_PORTS % "    - 8082/tcp\n", "publishes a random port on every interface"),
    (V2_PORTS % ("      - mode: ingress\n        target: 8082\n"
                 "        published: \"9100\"\n        protocol: tcp\n"),
     "publishes port 9100 on every interface"),
    (V2_PORTS % ("      - mode: ingress\n        host_ip: 0.0.0.0\n"
                 "        target: 8082\n        published: \"9100\"\n"
                 "        protocol: tcp\n"),
     "publishes port 9100 on every interface"),
])
def test_scan_compose_config_refuses_ports_beyond_loopback(text, problem):
    problems = runners.scan_compose_config(text, 9100)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems
        assert "127.0.0.1:${PORT}:<container port>" in problems[0]


class LogLines:
    def __init__(self):
        self.lines = []

    def step(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("ports,settings,exposed", [
    ("127.0.0.1:9100->8080/tcp", {}, False),
    ("[::1]:9100->8080/tcp, 127.0.0.1:9100->8080/tcp", {}, False),
    ("8080/tcp", {}, False),        # exposed in the image, published nowhere
    ("0.0.0.0:9100->8080/tcp, :::9100->8080/tcp", {}, True),
    ("0.0.0.0:9100->8080/tcp", {"PUBLIC_PORTS": "on"}, False),
])
def test_ports_published_beyond_loopback_take_the_project_down(
        monkeypatch, ports, settings, exposed):
    import types
    asked, downs = [], []
    monkeypatch.setattr(runners, "_quiet", lambda argv, **kw: (
        asked.append(argv) or (0, "dockrune-shop-web-1\t" + ports)))
    monkeypatch.setattr(runners, "compose_down", lambda *a, **kw: downs.append(a))
    ctx = types.SimpleNamespace(settings=settings, project="dockrune-shop",
                                dlog=LogLines(), deployer=None, app="shop",
                                env="production")
    if not exposed:
        runners.check_loopback_ports(ctx)
        assert downs == []
        return
    with pytest.raises(runners.DeployError) as caught:
        runners.check_loopback_ports(ctx)
    assert "dockrune-shop-web-1 0.0.0.0:9100->8080/tcp" in str(caught.value)
    assert "PUBLIC_PORTS=on" in str(caught.value)
    assert asked[0][-3:] == ["label=com.docker.compose.project=dockrune-shop",
                             "--format", "{{.Names}}\t{{.Ports}}"]
    assert len(downs) == 1


@pytest.mark.parametrize("service,problem", [
    ("    volumes:\n    - /var/run:/x:rw\n", "mounts the host's /var/run"),
    ("    volumes:\n    - /var/lib/docker/volumes:/v:rw\n",
     "mounts the host's /var/lib/docker/volumes"),
    ("    volumes:\n      - type: bind\n        source: //\n        target: /host\n",
     "mounts the host's root"),
    ("    volumes:\n      - type: bind\n        source: /etc\n        target: /e\n"
     "        bind:\n          create_host_path: true\n", "mounts the host's /etc"),
    ("    cap_add:\n    - ALL\n", "asks for the capability ALL"),
    ("    cap_add:\n    - SYS_ADMIN\n", "asks for the capability SYS_ADMIN"),
    ("    devices:\n    - /dev/sda:/dev/sda\n", "asks for host devices"),
    ("    pid: host\n", "asks for pid: host"),
    ("    volumes:\n    - /srv/shop/uploads:/data:rw\n", None),
    ("    volumes:\n      - type: volume\n        source: data\n        target: /d\n",
     None),
    ("    cap_add:\n    - NET_BIND_SERVICE\n", None),
])
def test_scan_compose_config_refuses_what_gives_a_preview_the_host(service, problem):
    problems = runners.scan_compose_config(
        "services:\n  web:\n    build: .\n" + service, 9100)
    if problem is None:
        assert problems == []
    else:
        assert problems and problem in problems[0], problems


def test_scan_compose_config_leaves_ports_to_a_swarm():
    text = V2_PORTS % ("      - mode: host\n        target: 8082\n"
                       "        published: \"9100\"\n        protocol: tcp\n")
    assert runners.scan_compose_config(text, 9100)
    assert runners.scan_compose_config(text, 9100, loopback=False) == []


def test_wait_drained_waits_for_open_connections_to_close():
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    try:
        assert runners._established(port) == 1
        assert runners.wait_drained(port, 0.3) == 1      # still open: gave up
        threading.Timer(0.3, accepted.close).start()
        threading.Timer(0.3, client.close).start()
        started = time.monotonic()
        assert runners.wait_drained(port, 5) == 0
        assert 0.2 < time.monotonic() - started < 3
    finally:
        client.close()
        accepted.close()
        server.close()


def test_a_log_every_stop_appends_to_keeps_one_older_file(tmp_path):
    path = str(tmp_path / "stop.log")
    for n in range(100):
        dlog = runners.DeployLog(path, max_bytes=1000, rotate=True)
        dlog.step("stopping, time %d" % n)
        dlog.close()
    assert os.path.getsize(path) <= 1000 + 100
    assert os.path.getsize(path + ".1") <= 1000 + 100
    assert "time 99" in open(path).read()
    assert sorted(os.listdir(str(tmp_path))) == ["stop.log", "stop.log.1"]
