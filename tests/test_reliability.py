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
from conftest import write_app


@pytest.fixture
def app_name():
    name = "rel-" + secrets.token_hex(3)
    yield name
    compose_down("dockrune-" + name)


def free_ports(count):
    """Return count distinct free ports (all held at once while they are picked)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


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



def test_full_disk_when_a_deploy_ends_still_alerts_and_spares_the_worker(
        tmp_path, remote, monkeypatch):
    settings = make_settings(tmp_path / "home")
    st = store.Store(settings.home)
    st.ensure_dirs()
    sha = remote.commit({"index.html": "x\n"})
    with open(st.app_path("full"), "w") as f:
        f.write("REPO=t/full\nGIT_URL=%s\nPORT=%d\nTYPE=compose\n"
                % (remote.bare, free_port()))
    events = []
    deployer = runners.Deployer(st, settings, notify=lambda e, r: events.append((e, r)))
    runner = runners.Runner(deployer, workers=1)
    runner.start()
    real = st.update_environment

    def disk_full_at_the_end(app, env, **fields):
        if "last_deploy" in fields:
            raise OSError(28, "No space left on device")
        return real(app, env, **fields)

    monkeypatch.setattr(st, "update_environment", disk_full_at_the_end)
    try:
        runner.submit(deployer.new_deploy("full", "production", sha, "main", "push"))
        assert runner.wait_idle(60)
        event, record = events[-1]
        assert event == "failed"
        assert record["error"].startswith("cannot record the end of the deploy")
        assert "No space left on device" in record["error"]
        # The worker is still there for the next job.
        monkeypatch.setattr(st, "update_environment", real)
        runner.submit(deployer.new_deploy("full", "production", sha, "main", "push"))
        assert runner.wait_idle(60)
        assert events[-1][0] == "failed" and "no compose file" in events[-1][1]["error"]
    finally:
        runner.shutdown(5)


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



@pytest.mark.parametrize("kind", ["compose", "dockerfile"])
def test_docker_engine_down_names_itself_for_every_docker_kind_and_alerts(
        docker_engine, tmp_path, remote, monkeypatch, kind):
    monkeypatch.setenv("DOCKER_HOST", "unix://%s" % (tmp_path / "no-docker.sock"))
    settings = make_settings(tmp_path / "home")
    st = store.Store(settings.home)
    st.ensure_dirs()
    files = compose_app("x")
    if kind == "dockerfile":
        del files["compose.yaml"]
    sha = remote.commit(files)
    with open(st.app_path("nodocker"), "w") as f:
        f.write("REPO=t/nodocker\nGIT_URL=%s\nPORT=%d\n" % (remote.bare, free_port()))
    events = []
    deployer = runners.Deployer(st, settings,
                                notify=lambda event, record: events.append(event))
    record = deployer.new_deploy("nodocker", "production", sha, "main", "push")

    result = deployer.run_deploy(record)

    assert result["status"] == "failed"
    assert result["kind"] == kind
    assert result["error"].startswith("Docker engine not reachable"), result["error"]
    assert events[-1] == "failed"


# -- crashes --


def state_files_parse(home):
    """Parse every state file; return the names of temporary files found."""
    leftovers = []
    for part in ("state", "run", "caddy"):
        for root, _dirs, files in os.walk(os.path.join(str(home), part)):
            for name in files:
                path = os.path.join(root, name)
                if name.startswith(".tmp-"):
                    leftovers.append(path)
                elif part == "state" or name.endswith(".json"):
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
        # The app that was live answers again after every crash.  A crash in
        # the middle of `compose up` may leave its container being recreated:
        # the resumed deploy finishes the job.
        deadline = time.monotonic() + 60
        while http_get("http://127.0.0.1:%d/" % port)[0] != 200:
            assert time.monotonic() < deadline, "trial %d: app down" % trial
            time.sleep(0.2)

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


def test_resume_deploys_an_interrupted_deploy_afresh(tmp_path):
    import dockrune
    settings = make_settings(tmp_path, DOCKRUNE_WORKERS="0")     # queue, run nothing
    daemon = dockrune.Daemon(settings)
    record = daemon.deployer.new_deploy("cut", "production", "1" * 40, "main", "push")
    daemon.store.update_deploy(record["id"], status="running")
    daemon.store.update_environment("cut", "production", running=record["id"],
                                    queued=None, status="deploying")
    daemon.start()
    try:
        assert daemon.store.deploy(record["id"])["status"] == "interrupted"
        newest = daemon.store.history("cut")[0]
        assert (newest["trigger"], newest["resumes"], newest["sha"]) == (
            "resume", record["id"], "1" * 40)
        assert daemon.runner.holds_sha("cut", "production", "1" * 40)
        assert daemon.store.environment("cut", "production")["queued"] == newest["id"]
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


# -- load --


def test_twenty_repos_times_five_pushes_at_once_end_with_the_newest_live(
        base_image, server_factory, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    tag = secrets.token_hex(2)
    names = ["load-%s-%02d" % (tag, n) for n in range(20)]
    server = server_factory()
    pushes, ports = [], {}
    distinct_ports = free_ports(len(names))
    for name in names:
        remote = GitRemote(str(tmp_path / name))
        ports[name] = distinct_ports.pop()
        write_app(server.home, name, remote, ports[name])
        for n in range(1, 6):
            pushes.append((name, n, remote.commit(compose_app("%s-%d" % (name, n)))))
    server.start()
    st = store.Store(str(server.home))
    watching = threading.Event()
    most_running = {}

    def watch():
        while not watching.is_set():
            for name in names:
                running = [r for r in st.history(name) if r["status"] == "running"]
                most_running[name] = max(most_running.get(name, 0), len(running))
            time.sleep(0.05)

    def send(push):
        name, _n, sha = push
        started = time.monotonic()
        code, answer = post_hook(server.url, "push", push_body("tester/" + name, sha))
        return code, time.monotonic() - started

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        random.Random(3).shuffle(pushes)
        with ThreadPoolExecutor(max_workers=100) as pool:
            answers = list(pool.map(send, pushes))
        assert all(200 <= code < 300 for code, _ in answers), answers
        assert max(seconds for _, seconds in answers) < 1.0
        newest = {name: sha for name, n, sha in pushes if n == 5}
        deadline = time.monotonic() + 400
        rows = {}
        while time.monotonic() < deadline:
            rows = {r["app"]: r for r in json.loads(
                server.cli("status", "--json").stdout)}
            if all((rows[n]["status"], rows[n]["sha"]) == ("live", newest[n])
                   for n in names):
                break
            time.sleep(1)
        for name in names:
            assert (rows[name]["status"], rows[name]["sha"]) == (
                "live", newest[name]), (name, server.log()[-3000:])
            expected = (200, "%s-5\n" % name)
            deadline = time.monotonic() + 30
            while http_get("http://127.0.0.1:%d/" % ports[name]) != expected:
                assert time.monotonic() < deadline, (
                    name, http_get("http://127.0.0.1:%d/" % ports[name]),
                    server.log()[-3000:])
                time.sleep(0.5)
        assert max(most_running.values()) == 1
    finally:
        watching.set()
        watcher.join()
        server.stop()   # first, so that no deploy starts a container again
        for name in names:
            compose_down("dockrune-" + name)


def test_slow_clients_do_not_stop_a_real_delivery(server_factory):
    server = server_factory().start()
    slow = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        for s in slow:
            s.sendall(b"X")     # still trickling
        started = time.monotonic()
        code, answer = post_hook(server.url, "ping", b'{"zen": "slow"}')
        assert (code, answer) == (200, {"message": "pong"})
        assert time.monotonic() - started < 2.0
        # SIGTERM while they are still connected: serve exits at once (the
        # signal must not be swallowed by a channel's read handler).
        for s in slow:
            s.sendall(b"Y")
        stopped = time.monotonic()
        server.proc.terminate()
        assert server.proc.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 5.0
        assert "shutting down" in server.log()
    finally:
        for s in slow:
            s.close()


# -- hostile input --


def test_hostile_input_never_runs_anything(base_image, server_factory, tmp_path,
                                           app_name):
    canary = tmp_path / "canary"
    touch = "touch %s" % canary
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(compose_app("safe"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port,
              EVIL='"$(%s)"' % touch, TICKS="'`%s`'" % touch,
              MULTI='"line one\\nline two; %s"' % touch)
    server.start()
    repo = "tester/" + app_name

    branches = [";" + touch, "$(%s)" % touch, "`%s`" % touch, "main\n" + touch,
                "--upload-pack=" + touch, "../../main", "m\u0430in", "b" * 300,
                "-" + "main"]
    for branch in branches:
        code, answer = post_hook(server.url, "push",
                                 push_body(repo, sha, branch=branch))
        assert code == 200 and answer["ignored"].startswith("push to"), branch
    for name in ("../x", "tester/../../x", "tester/x;" + touch):
        code, answer = post_hook(server.url, "push", push_body(name, sha))
        assert code == 200 and "ignored" in answer, name

    # Clone URLs in the payload are never used: only GIT_URL is fetched.
    body = json.loads(push_body(repo, sha))
    for key in ("clone_url", "git_url", "ssh_url", "svn_url", "url"):
        body["repository"][key] = "ext::sh -c %s" % touch.replace(" ", "% ")
    code, answer = post_hook(server.url, "push", json.dumps(body).encode())
    assert code == 202
    assert server.wait_deploy(answer["deploy"])["status"] == "live"
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "safe\n")

    code, answer = post_hook(server.url, "push", b"[" * 50000 + b"]" * 50000)
    assert code == 400
    assert not canary.exists()


def test_hostile_branch_names_reach_branch_previews_harmlessly(
        server_factory, tmp_path):
    canary = tmp_path / "canary"
    touch = "touch %s" % canary
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"index.html": "safe\n"})
    server = server_factory()
    name = "hb-" + secrets.token_hex(3)
    write_app(server.home, name, remote, free_port(), PREVIEW_BRANCHES="*")
    server.start()
    branches = [";" + touch, "$(%s)" % touch, "`%s`" % touch, "x\n" + touch,
                "--upload-pack=" + touch, "../../x", "m\u0430in", "b" * 300]
    deploys = []
    for branch in branches:
        code, answer = post_hook(server.url, "push",
                                 push_body("tester/" + name, sha, branch=branch))
        assert code in (200, 202), (branch, answer)
        if code == 202:
            assert store.is_name(answer["environment"]), answer
            deploys.append(answer["deploy"])
    assert len(deploys) >= 6
    for deploy_id in deploys:
        record = server.wait_deploy(deploy_id)
        # Fetched by its sha, whatever the branch is called: live and harmless.
        assert record["status"] == "live", open(record["log"]).read()
    assert not canary.exists()


@pytest.mark.parametrize("url,transport", [
    ("'ext::sh -c touch%% %s'", "ext"),
    # git itself allows git:// by default: only dockrune's limit refuses it.
    ("git://127.0.0.1:1/x.git?%s", "git"),
])
def test_git_url_with_a_dangerous_transport_is_refused(
        server_factory, tmp_path, url, transport):
    canary = tmp_path / "canary"
    server = server_factory()
    os.makedirs(str(server.home / "apps"))
    with open(str(server.home / "apps" / "ext.env"), "w") as f:
        f.write("REPO=t/ext\nPORT=%d\nGIT_URL=%s\n" % (free_port(), url % canary))
    done = server.cli("deploy", "ext", "--ref", "a" * 40, check=False)
    assert done.returncode != 0
    assert "transport '%s' not allowed" % transport in done.stderr
    assert not canary.exists()


# -- secrets --


def test_secrets_never_reach_logs_state_api_or_git_config(
        base_image, server_factory, tmp_path, app_name):
    token = "ghp_" + secrets.token_hex(16)
    password = "pw-" + secrets.token_hex(8)
    api_token = "api-" + secrets.token_hex(8)
    remote = GitRemote(str(tmp_path / "git"))
    files = compose_app("env")
    files["compose.yaml"] = (
        "services:\n  web:\n    build: .\n    ports:\n"
        "      - \"127.0.0.1:${PORT}:8080\"\n    environment:\n"
        "      - LEAK_TOKEN=${DOCKRUNE_GITHUB_TOKEN:-none}\n"
        "      - LEAK_SECRET=${DOCKRUNE_WEBHOOK_SECRET:-none}\n"
        "    command: [\"sh\", \"-c\", \"env > /www/index.html; env; "
        "exec httpd -f -p 8080 -h /www\"]\n")
    sha = remote.commit(files)
    port = free_port()
    from standins import GitHub, N8n
    github, n8n = GitHub(token=token), N8n(header=("X-Hook-Key", "n8n-" + password))
    server = server_factory(DOCKRUNE_GITHUB_TOKEN=token,
                            DOCKRUNE_GITHUB_API=github.url,
                            DOCKRUNE_N8N_WEBHOOK_URL=n8n.url + "/webhook/dockrune",
                            DOCKRUNE_N8N_HEADER="X-Hook-Key: n8n-" + password,
                            DOCKRUNE_ADMIN_PASSWORD=password,
                            DOCKRUNE_API_TOKEN=api_token)
    write_app(server.home, app_name, remote, port)
    with open(os.path.join(str(server.home), "apps", "nogit.env"), "w") as f:
        f.write("REPO=t/nogit\nPORT=%d\nGIT_URL=https://127.0.0.1:%d/t/nogit.git\n"
                % (free_port(), free_port()))
    server.start()

    assert deploy_and_wait(server, "tester/" + app_name, sha)["status"] == "live"
    code, page = http_get("http://127.0.0.1:%d/" % port)
    assert code == 200 and "LEAK_TOKEN=none" in page and "LEAK_SECRET=none" in page
    failed = server.cli("deploy", "nogit", "--ref", "main")
    deploy_id = failed.stdout.split()[2].rstrip(";")
    assert server.wait_deploy(deploy_id)["status"] == "failed"
    # A torn state file makes the API fail with a logged traceback.
    with open(os.path.join(str(server.home), "state", "history", "nogit.json"),
              "w") as f:
        f.write('{"torn": ')

    import base64
    import urllib.request
    basic = "Basic " + base64.b64encode(("admin:" + password).encode()).decode()
    bodies = []
    for path in ("/api/apps", "/api/apps/%s/deploys" % app_name,
                 "/api/apps/nogit/deploys", "/api/deploys/%s" % deploy_id,
                 "/api/deploys/%s/log" % deploy_id, "/admin",
                 "/admin/apps/" + app_name, "/admin/deploys/" + deploy_id):
        request = urllib.request.Request(server.url + path, headers={
            "Authorization": basic if path.startswith("/admin") else
            "Bearer " + api_token})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                bodies.append(response.read().decode())
        except urllib.error.HTTPError as e:
            bodies.append(e.read().decode())
    assert "Traceback" in server.log()
    assert "<table" in bodies[5], bodies[5][:300]       # the real admin page
    # The live deploy was reported to GitHub; the failure (whose sha was never
    # known: the fetch failed) was alerted to n8n, with its log tail.
    github.wait_for(lambda calls: any(c["body"] and c["body"].get("state") ==
                                      "success" for c in calls), timeout=30)
    n8n.wait_for(lambda calls: any(c["body"] and c["body"].get("event") ==
                                   "deploy_failed" for c in calls), timeout=30)
    outbound = [json.dumps(c["body"]) for c in github.calls() + n8n.calls()]
    assert any("log_tail" in text for text in outbound)
    github.close()
    n8n.close()

    texts = ["\n".join(bodies), server.log()] + outbound
    for root, _dirs, names in os.walk(str(server.home)):
        for name in names:
            path = os.path.join(root, name)
            if name == "dockrune.env" or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                texts.append(f.read().decode("utf-8", "replace"))
    configs = [t for t in texts if "[core]" in t]
    assert configs, "no .git/config was searched"
    for text in texts:
        for secret in (token, password, api_token, "test-webhook-secret"):
            assert secret not in text


def test_log_formatter_redacts_secrets_in_tracebacks():
    import logging
    import dockrune
    formatter = dockrune.RedactingFormatter("%(message)s", ["hunter22"])
    try:
        raise ValueError("token hunter22 rejected")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed with %s",
                                   ("hunter22",), exc_info=True)
        import sys
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert "hunter22" not in text
    assert "token *** rejected" in text and "failed with ***" in text


def test_deploy_timeout_kills_the_whole_build_and_fails_the_deploy(
        server_factory, tmp_path):
    import subprocess
    name = "slow-" + secrets.token_hex(3)
    marker = "dockrune-test-%s" % name
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"Procfile": "web: python3 -m http.server $PORT\n",
                         "index.html": "x\n"})
    server = server_factory()
    write_app(server.home, name, remote, free_port(), TYPE="procfile",
              BUILD="'sh -c \"sleep 120 & sleep 121; echo %s\"'" % marker,
              DEPLOY_TIMEOUT="3")
    server.start()
    started = time.monotonic()
    record = deploy_and_wait(server, "tester/" + name, sha)
    assert record["status"] == "failed"
    assert "timed out" in record["error"]
    assert time.monotonic() - started < 30
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "sleep 12[01]"], capture_output=True,
                          text=True).stdout.split()
    mine = [pid for pid in left if ("DOCKRUNE_DEPLOY=%s" % record["id"]).encode()
            in open("/proc/%s/environ" % pid, "rb").read()]
    assert mine == []
