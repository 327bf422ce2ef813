"""Shared fixtures: temporary homes, signed deliveries, git remotes, Docker.

Integration tests use the real tools.  Where a tool is missing they skip with
the reason on a developer's machine, and fail when CI=true: a green CI run
always means the integration tests ran.
"""

import hashlib
import hmac
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)

import dockrune  # noqa: E402
import proxy  # noqa: E402
import runners  # noqa: E402
import store  # noqa: E402

SECRET = "test-webhook-secret"
BASE_IMAGE = "dockrune-test-busybox:1"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition, reason):
    """Skip (or, in CI, fail) the test when condition is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail("CI=true and %s" % reason, pytrace=False)
    pytest.skip(reason)


def payload(name):
    with open(os.path.join(FIXTURES, "github", "webhooks", name + ".json")) as f:
        return json.load(f)


def sign(body, secret=SECRET):
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(home, **extra):
    environ = {"DOCKRUNE_HOME": str(home), "DOCKRUNE_WEBHOOK_SECRET": SECRET}
    environ.update(extra)
    return dockrune.load_settings(environ)


def wsgi_call(app, method, path, body=b"", headers=None, query=""):
    """Call a WSGI app in-process; return (status int, headers dict, body bytes)."""
    from wsgiref.validate import validator

    environ = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "9000",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)),
    }
    for key, value in (headers or {}).items():
        name = key.upper().replace("-", "_")
        if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[name] = value
        else:
            environ["HTTP_" + name] = value
    environ.setdefault("CONTENT_TYPE", "application/json")
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(response_headers)
        return lambda data: None

    result = validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    return seen["status"], seen["headers"], data


def push_body(repo, sha, branch="main", default_branch="main", message="change"):
    """Return a real push payload re-aimed at repo, branch and sha."""
    data = payload("push.noaction.5")
    data["ref"] = "refs/heads/" + branch
    data["after"] = sha
    data["repository"]["full_name"] = repo
    data["repository"]["name"] = repo.split("/")[1]
    data["repository"]["default_branch"] = default_branch
    data["head_commit"]["id"] = sha
    data["head_commit"]["message"] = message
    return json.dumps(data).encode()


def post_hook(base_url, event, body, delivery=None, secret=SECRET):
    """POST a signed delivery to a running dockrune; return (status, JSON)."""
    request = urllib.request.Request(base_url + "/hooks/github", data=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or os.urandom(8).hex(),
        "X-Hub-Signature-256": sign(body, secret),
        "User-Agent": "GitHub-Hookshot/test"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# -- git --------------------------------------------------------------------------


class GitRemote:
    """A bare repository standing in for GitHub, with a work tree to commit from."""

    def __init__(self, root, branch="main"):
        self.bare = os.path.join(root, "remote.git")
        self.work = os.path.join(root, "work")
        self.branch = branch
        git("init", "--quiet", "--bare", "--initial-branch", branch, self.bare)
        git("init", "--quiet", "--initial-branch", branch, self.work)

    def commit(self, files, message="change"):
        """Write files ({path: text}, None deletes), commit, push; return the sha."""
        for path, text in files.items():
            full = os.path.join(self.work, path)
            if text is None:
                os.unlink(full)
                continue
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
        git("-C", self.work, "add", "--all")
        git("-C", self.work, "-c", "user.name=Test Author", "-c",
            "user.email=author@example.com", "commit", "--quiet", "-m", message)
        git("-C", self.work, "push", "--quiet", self.bare,
            "HEAD:refs/heads/" + self.branch)
        return git("-C", self.work, "rev-parse", "HEAD").strip()


def git(*args):
    return subprocess.run(("git",) + args, check=True, capture_output=True,
                          text=True, timeout=60).stdout


@pytest.fixture
def remote(tmp_path):
    return GitRemote(str(tmp_path / "git"))


def write_app(home, name, remote, port, **extra):
    """Write apps/<name>.env for a test app fetched from remote; extra adds keys."""
    os.makedirs(os.path.join(str(home), "apps"), exist_ok=True)
    settings = {"REPO": "tester/" + name, "GIT_URL": remote.bare, "BRANCH": "main",
                "PORT": str(port), "HEALTH_TIMEOUT": "30"}
    settings.update(extra)
    with open(os.path.join(str(home), "apps", name + ".env"), "w") as f:
        f.write("".join("%s=%s\n" % kv for kv in settings.items()))


def push(server, name, sha, timeout=180):
    """Deliver a signed push of sha to app name; return the finished record."""
    code, answer = post_hook(server.url, "push", push_body("tester/" + name, sha))
    assert code == 202, answer
    return server.wait_deploy(answer["deploy"], timeout=timeout)


def log_of(record):
    with open(record["log"]) as f:
        return f.read()


# -- docker -------------------------------------------------------------------------


def docker_works():
    try:
        return subprocess.run(["docker", "info"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine():
    need(shutil.which("docker") is not None, "the docker command is missing")
    need(docker_works(), "no Docker engine answers 'docker info'")
    need(shutil.which("busybox") is not None, "busybox is missing (busybox-static)")
    try:
        runners.compose_command()
    except runners.DeployError as e:
        need(False, str(e))
    return True


@pytest.fixture(scope="session")
def base_image(docker_engine):
    """Import a busybox root filesystem as BASE_IMAGE, once per machine."""
    found = subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                           capture_output=True, timeout=30)
    if found.returncode == 0:
        return BASE_IMAGE
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "bin"))
        shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
        for tool in ("sh", "httpd", "cat", "echo", "sleep", "false", "true", "wget"):
            os.symlink("busybox", os.path.join(root, "bin", tool))
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout,
                       check=True, capture_output=True, timeout=120)
        tar.wait(timeout=60)
    return BASE_IMAGE


def compose_app(sha_marker="v1", fail_build=False):
    """Return the files of a small compose app that serves sha_marker on ${PORT}."""
    dockerfile = "FROM %s\nCOPY site /www\n" % BASE_IMAGE
    if fail_build:
        dockerfile += 'RUN ["false"]\n'
    dockerfile += 'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n'
    return {
        "Dockerfile": dockerfile,
        "site/index.html": sha_marker + "\n",
        # busybox httpd runs as pid 1 and so ignores SIGTERM: without this,
        # every recreate would wait out Docker's 10 s stop timeout.
        "compose.yaml": ("services:\n  web:\n    build: .\n    stop_signal: SIGKILL\n"
                         "    ports:\n      - \"127.0.0.1:${PORT}:8080\"\n"),
    }


def compose_down(project):
    """Remove every container and network of a compose project (test clean-up)."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter",
                          "label=com.docker.compose.project=%s" % project],
                         capture_output=True, text=True, timeout=60).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f"] + ids, capture_output=True, timeout=120)
    subprocess.run(["docker", "network", "rm", project + "_default"],
                   capture_output=True, timeout=60)


# -- a running daemon -----------------------------------------------------------------


class Server:
    """`dockrune serve` in a subprocess on a temporary home."""

    def __init__(self, home, env):
        self.home = home
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.env = dict(os.environ, DOCKRUNE_HOME=str(home),
                        DOCKRUNE_LISTEN="127.0.0.1:%d" % self.port,
                        DOCKRUNE_WEBHOOK_SECRET=SECRET, **env)
        self.stderr_path = os.path.join(str(home), "serve.stderr")
        self.proc = None

    def start(self):
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dockrune.py"),
                                      "serve"], env=self.env, stdout=self.stderr,
                                     stderr=self.stderr, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise AssertionError("dockrune serve did not start:\n" + self.log())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.stderr.close()

    def log(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def cli(self, *args, check=True, timeout=300):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "dockrune.py")]
                              + list(args), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError("dockrune %s exited %d:\n%s%s" % (
                " ".join(args), done.returncode, done.stdout, done.stderr))
        return done

    def status(self, app, env="production"):
        rows = json.loads(self.cli("status", "--json").stdout)
        return next(r for r in rows if r["app"] == app and r["environment"] == env)

    def wait_deploy(self, deploy_id, timeout=180):
        st = store.Store(str(self.home))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = st.deploy(deploy_id)
            if record and record["status"] not in store.ACTIVE:
                return record
            time.sleep(0.2)
        raise AssertionError("deploy %s did not finish:\n%s" % (deploy_id, self.log()))


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def start(home=None, **env):
        server = Server(home or tmp_path / "home", env)
        os.makedirs(str(server.home), exist_ok=True)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for home in {str(server.home) for server in started}:
        stop_supervised(home)
        remove_containers(home)


def remove_containers(home):
    """Remove what the apps of a test's home left in Docker, once its daemon is down.

    The test's own clean-up may run while a deploy still goes on; this runs
    after the daemon stopped, so nothing starts the containers again.
    """
    try:
        envs = store.Store(home).environments()
    except store.StoreError:
        return
    if not envs or shutil.which("docker") is None:
        return
    for summary in envs.values():
        project = runners.compose_project(summary["app"], summary["environment"])
        compose_down(project)
        for name in (project, project + "-next"):
            subprocess.run(["docker", "rm", "--force", name], capture_output=True,
                           timeout=120)


def stop_supervised(home):
    """Stop the app processes a test's daemon left running (they outlive it)."""
    import supervise
    run_dir = os.path.join(home, "run")
    if not os.path.isdir(os.path.join(run_dir, "procs")):
        return
    sup = supervise.Supervisor(run_dir)
    for spec in sup.specs():
        sup.stop(spec["app"], spec["environment"], spec["slot"])


def http_get(url, timeout=5):
    """GET url; return (status, text) or (None, error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


# -- caddy ---------------------------------------------------------------------------


class Caddy:
    """A real Caddy on high ports, plain HTTP, importing dockrune's routes."""

    def __init__(self, root):
        self.root = str(root)
        self.http_port = free_port()
        self.admin = "127.0.0.1:%d" % free_port()
        self.routes = os.path.join(self.root, "routes", "dockrune.caddy")
        self.config = os.path.join(self.root, "Caddyfile")
        os.makedirs(os.path.dirname(self.routes))
        with open(self.routes, "w") as f:
            f.write(proxy.render_routes([]))
        with open(self.config, "w") as f:
            f.write("{\n\tadmin %s\n\tauto_https off\n\thttp_port %d\n}\n\n"
                    "http://operator.test:%d {\n\trespond \"operator's own\"\n}\n\n"
                    "import %s/*.caddy\n"
                    % (self.admin, self.http_port, self.http_port,
                       os.path.dirname(self.routes)))
        self.log = open(os.path.join(self.root, "caddy.log"), "wb")
        env = dict(os.environ, HOME=self.root, XDG_DATA_HOME=self.root,
                   XDG_CONFIG_HOME=self.root)
        self.proc = subprocess.Popen(["caddy", "run", "--config", self.config,
                                      "--adapter", "caddyfile"], env=env,
                                     stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.get("operator.test")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError("caddy did not start")

    def settings(self):
        """The dockrune settings that point at this Caddy."""
        return {"DOCKRUNE_CADDY_CONFIG": self.config,
                "DOCKRUNE_CADDY_FILE": self.routes,
                "DOCKRUNE_CADDY_ADMIN": self.admin,
                "DOCKRUNE_CADDY_SITE": "http://{domain}:%d" % self.http_port}

    def get(self, host, path="/", timeout=5):
        """GET path through Caddy for Host host; return (status, text)."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port,
                                          timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        except OSError as e:
            return None, str(e)
        finally:
            conn.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def caddy(tmp_path):
    need(shutil.which("caddy") is not None, "caddy is missing (apt-get install caddy)")
    server = Caddy(tmp_path / "caddy")
    yield server
    server.stop()
