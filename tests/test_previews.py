"""Preview environments and routes through a real Caddy."""

import json
import os
import secrets
import threading
import time

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, post_hook,
                      push_body)
from conftest import write_app


def wait_for(check, timeout=30):
    """Wait until check() is true (the route follows the record by a moment)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def static_site(text):
    return {"index.html": text + "\n"}


def test_redeploy_through_caddy_drops_no_request(caddy, server_factory, tmp_path):
    name = "zd-" + secrets.token_hex(3)
    domain = name + ".apps.test"
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(static_site("one"))
    server = server_factory(**caddy.settings())
    write_app(server.home, name, remote, free_port(), DOMAIN=domain)
    server.start()
    repo = "tester/" + name
    code, answer = post_hook(server.url, "push", push_body(repo, first))
    assert server.wait_deploy(answer["deploy"])["status"] == "live"
    wait_for(lambda: caddy.get(domain) == (200, "one\n"))

    seen, failures, done = [], [], threading.Event()

    def hammer():
        while not done.is_set():
            status, text = caddy.get(domain, timeout=5)
            (seen if status == 200 else failures).append((status, text))
            time.sleep(0.01)

    loop = threading.Thread(target=hammer)
    loop.start()
    try:
        for n, text in enumerate(("two", "three")):
            sha = remote.commit(static_site(text))
            code, answer = post_hook(server.url, "push", push_body(repo, sha))
            record = server.wait_deploy(answer["deploy"])
            assert record["status"] == "live", open(record["log"]).read()
            time.sleep(0.5)
    finally:
        done.set()
        loop.join()
    assert failures == []
    assert {text for _, text in seen} == {"one\n", "two\n", "three\n"}
    assert len(seen) > 50
    assert "routed to port" in open(record["log"]).read()


# -- pull request previews --


def pr_payload(repo, number, sha, action="opened", fork=None, branch="feature"):
    from conftest import payload
    data = payload("pull_request.%s.1" % ("closed" if action == "closed" else
                                          "opened"))
    data["action"] = action
    data["number"] = data["pull_request"]["number"] = number
    data["repository"]["full_name"] = repo
    data["pull_request"]["head"]["sha"] = sha
    data["pull_request"]["head"]["ref"] = branch
    data["pull_request"]["head"]["repo"]["full_name"] = fork or repo
    data["pull_request"]["title"] = "Preview #%d" % number
    return json.dumps(data).encode()


@pytest.fixture
def preview_app(caddy, server_factory, tmp_path):
    name = "pv-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    server = server_factory(DOCKRUNE_ADMIN_PASSWORD="preview-admin",
                            **caddy.settings())
    write_app(server.home, name, remote, free_port(), DOMAIN=name + ".apps.test")
    yield name, remote, server
    for n in range(1, 4):
        compose_down("dockrune-%s-pr-%d" % (name, n))
    compose_down("dockrune-" + name)


def preview_route(caddy, name, number):
    return caddy.get("pr-%d.%s.apps.test" % (number, name))


def test_pull_request_preview_lives_and_dies_with_the_pull_request(
        base_image, caddy, preview_app):
    import subprocess
    name, remote, server = preview_app
    repo = "tester/" + name
    first = remote.commit(compose_app("pr one"))
    server.start()

    code, answer = post_hook(server.url, "pull_request", pr_payload(repo, 1, first))
    assert code == 202 and answer["environment"] == "pr-1"
    record = server.wait_deploy(answer["deploy"])
    assert record["status"] == "live", open(record["log"]).read()
    wait_for(lambda: preview_route(caddy, name, 1) == (200, "pr one\n"))
    row = server.status(name, "pr-1")
    assert row["domain"] == "pr-1.%s.apps.test" % name
    port = row["port"]
    assert 9100 <= port <= 9899

    second = remote.commit(compose_app("pr two"))
    code, answer = post_hook(server.url, "pull_request",
                             pr_payload(repo, 1, second, "synchronize"))
    assert server.wait_deploy(answer["deploy"])["status"] == "live"
    wait_for(lambda: preview_route(caddy, name, 1) == (200, "pr two\n"))
    assert server.status(name, "pr-1")["port"] == port

    code, answer = post_hook(server.url, "pull_request",
                             pr_payload(repo, 1, second, "closed"))
    assert code == 202 and answer["teardown"] == "pr-1"
    checkout = os.path.join(str(server.home), "src", name, "pr-1")
    wait_for(lambda: not os.path.exists(checkout), timeout=60)
    wait_for(lambda: "pr-1.%s" % name not in open(caddy.routes).read())
    assert not [r for r in json.loads(server.cli("status", "--json").stdout)
                if r["environment"] == "pr-1"]
    containers = subprocess.run(
        ["docker", "ps", "-aq", "--filter",
         "label=com.docker.compose.project=dockrune-%s-pr-1" % name],
        capture_output=True, text=True, timeout=60).stdout.split()
    assert containers == []
    ports = json.load(open(os.path.join(str(server.home), "state", "ports.json")))
    assert "%s/pr-1" % name not in ports


def test_two_pull_requests_get_two_ports_and_two_routes(
        base_image, caddy, preview_app):
    name, remote, server = preview_app
    repo = "tester/" + name
    sha = remote.commit(compose_app("shared"))
    server.start()
    ids = []
    for number in (2, 3):
        code, answer = post_hook(server.url, "pull_request",
                                 pr_payload(repo, number, sha))
        ids.append(answer["deploy"])
    for deploy_id in ids:
        assert server.wait_deploy(deploy_id)["status"] == "live"
    ports = {server.status(name, "pr-%d" % n)["port"] for n in (2, 3)}
    assert len(ports) == 2
    for number in (2, 3):
        wait_for(lambda: preview_route(caddy, name, number) == (200, "shared\n"))


def test_pull_request_from_a_fork_is_not_deployed_until_approved(
        base_image, caddy, preview_app):
    name, remote, server = preview_app
    repo = "tester/" + name
    sha = remote.commit(compose_app("from a fork"))
    server.start()
    code, answer = post_hook(server.url, "pull_request",
                             pr_payload(repo, 1, sha, fork="stranger/" + name))
    assert code == 202 and answer["waiting"] == "approval"
    time.sleep(1)
    assert not os.path.exists(os.path.join(str(server.home), "src", name, "pr-1"))
    held = json.load(open(os.path.join(str(server.home), "state", "approvals.json")))
    assert held["%s/pr-1" % name]["sha"] == sha
    assert preview_route(caddy, name, 1)[1] != "from a fork\n"

    # The operator approves that exact commit on the admin page.
    import base64
    import re
    import urllib.parse
    import urllib.request
    auth = "Basic " + base64.b64encode(b"admin:preview-admin").decode()
    request = urllib.request.Request(server.url + "/admin",
                                     headers={"Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    assert 'data-approval="%s"' % sha in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "environment": "pr-1", "sha": sha})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    request = urllib.request.Request(
        server.url + "/admin/apps/%s/approve" % name, data=form.encode(),
        headers={"Authorization": auth, "Origin": server.url,
                 "Content-Type": "application/x-www-form-urlencoded"})
    try:
        urllib.request.build_opener(NoRedirect).open(request, timeout=10)
        raise AssertionError("approve did not redirect to the deploy's log")
    except urllib.error.HTTPError as e:
        assert e.code == 303
        deploy_id = e.headers["Location"].rsplit("/", 1)[1]
    record = server.wait_deploy(deploy_id)
    assert (record["status"], record["sha"], record["trigger"]) == (
        "live", sha, "approved")
    wait_for(lambda: preview_route(caddy, name, 1) == (200, "from a fork\n"))


@pytest.mark.parametrize("compose,message", [
    ("services:\n  web:\n    build: .\n    ports:\n      - \"127.0.0.1:${PORT}:8080\"\n"
     "      - \"5432:8080\"\n",
     "service web publishes the fixed host port 5432"),
    ("services:\n  web:\n    build: .\n    privileged: true\n    ports:\n"
     "      - \"127.0.0.1:${PORT}:8080\"\n",
     "service web asks for privileged mode"),
    ("services:\n  web:\n    build: .\n    volumes:\n"
     "      - /var/run/docker.sock:/var/run/docker.sock\n    ports:\n"
     "      - \"127.0.0.1:${PORT}:8080\"\n",
     "service web mounts the Docker socket"),
    ("services:\n  web:\n    build: .\n    volumes:\n      - /:/host\n    ports:\n"
     "      - \"127.0.0.1:${PORT}:8080\"\n",
     "service web mounts the host's root"),
    ("services:\n  web:\n    build: .\n    network_mode: host\n",
     "service web asks for network_mode: host"),
])
def test_preview_compose_that_cannot_run_twice_or_safely_is_refused(
        base_image, caddy, preview_app, compose, message):
    name, remote, server = preview_app
    files = compose_app("unsafe")
    files["compose.yaml"] = compose
    sha = remote.commit(files)
    server.start()
    code, answer = post_hook(server.url, "pull_request",
                             pr_payload("tester/" + name, 1, sha))
    record = server.wait_deploy(answer["deploy"])
    assert record["status"] == "failed"
    assert message in record["error"]
    import subprocess
    containers = subprocess.run(
        ["docker", "ps", "-aq", "--filter",
         "label=com.docker.compose.project=dockrune-%s-pr-1" % name],
        capture_output=True, text=True, timeout=60).stdout.split()
    assert containers == []


def env_reporting_app(marker):
    """A compose app that serves what its preview was given, with a named volume."""
    files = compose_app(marker)
    files["compose.yaml"] = (
        "services:\n  web:\n    build: .\n    stop_signal: SIGKILL\n"
        "    environment: [PREVIEW, PREVIEW_URL, PR_NUMBER, GREETING]\n"
        "    command: [\"sh\", \"-c\", \"echo \\\"$$PREVIEW $$PR_NUMBER $$PREVIEW_URL "
        "$$GREETING\\\" > /www/env.txt && exec httpd -f -p 8080 -h /www\"]\n"
        "    volumes: [\"data:/data\"]\n"
        "    ports:\n      - \"127.0.0.1:${PORT}:8080\"\n"
        "volumes:\n  data: {}\n")
    return files


def project_volumes(project):
    import subprocess
    return subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter",
         "label=com.docker.compose.project=%s" % project],
        capture_output=True, text=True, timeout=60).stdout.split()


def api_post(server, path, fields):
    import urllib.parse
    import urllib.request
    request = urllib.request.Request(
        server.url + "/api/" + path, data=urllib.parse.urlencode(fields).encode(),
        headers={"Authorization": "Bearer preview-api"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, json.load(answer)


def test_preview_gets_its_env_and_overrides_and_loses_its_volumes_after_a_stop(
        base_image, caddy, server_factory, tmp_path):
    name = "pe-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    server = server_factory(DOCKRUNE_API_TOKEN="preview-api", **caddy.settings())
    write_app(server.home, name, remote, free_port(), DOMAIN=name + ".apps.test",
              GREETING="production")
    with open(os.path.join(str(server.home), "apps", name + ".preview.env"), "w") as f:
        f.write("# every preview of this app\nGREETING=preview\n")
    project = "dockrune-%s-pr-2" % name
    repo = "tester/" + name
    sha = remote.commit(env_reporting_app("env"))
    server.start()
    try:
        code, answer = post_hook(server.url, "pull_request", pr_payload(repo, 2, sha))
        record = server.wait_deploy(answer["deploy"])
        assert record["status"] == "live", open(record["log"]).read()
        domain = "pr-2.%s.apps.test" % name
        expected = (200, "1 2 https://%s preview\n" % domain)
        wait_for(lambda: caddy.get(domain, "/env.txt") == expected)
        assert project_volumes(project) == [project + "_data"]

        # A redeploy through the API has no pull request payload: same env.
        code, answer = api_post(server, "apps/%s/deploy" % name,
                                {"environment": "pr-2", "ref": sha})
        assert code == 202
        record = server.wait_deploy(answer["deploy"])
        assert record["status"] == "live", open(record["log"]).read()
        wait_for(lambda: caddy.get(domain, "/env.txt") == expected)

        # Stopped first, closed later: the volume goes with the teardown.
        code, _answer = api_post(server, "apps/%s/stop" % name, {"environment": "pr-2"})
        assert code == 202
        wait_for(lambda: server.status(name, "pr-2")["status"] == "stopped", 60)
        assert project_volumes(project) == [project + "_data"]
        code, answer = post_hook(server.url, "pull_request",
                                 pr_payload(repo, 2, sha, "closed"))
        assert code == 202
        wait_for(lambda: project_volumes(project) == [], timeout=60)
    finally:
        compose_down(project)
        import subprocess
        subprocess.run(["docker", "volume", "rm", "-f", project + "_data"],
                       capture_output=True, timeout=60)
