"""Every project kind, end to end: a local git repo, a signed webhook, an answer.

Each test runs a real `dockrune serve`, real git, and the kind's real tools
(a Docker engine, node and npm, python for Procfile apps).
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest

from conftest import (BASE_IMAGE, FIXTURES, GitRemote, free_port, http_get, log_of,
                      make_settings, need)
import conftest
import runners
import store

# A warm npm cache in a stable place keeps the Nuxt build fast on CI machines.
NPM_CACHE = os.environ.get("DOCKRUNE_TEST_NPM_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "dockrune-test-npm")


def write_app(home, name, remote, port, **extra):
    extra.setdefault("HEALTH_TIMEOUT", "20")
    conftest.write_app(home, name, remote, port, **extra)


def push(server, name, sha):
    """Deliver a signed push of sha; return the finished deploy record."""
    return conftest.push(server, name, sha, timeout=400)


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def spec_of(home, name, slot="live"):
    path = os.path.join(str(home), "run", "procs", name, "production.%s.json" % slot)
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def app_name(tmp_path):
    """A unique app name; whatever it left running is stopped afterwards."""
    name = "k-" + secrets.token_hex(3)
    yield name
    home = tmp_path / "home"
    if (home / "apps" / (name + ".env")).exists():
        deployer = runners.Deployer(store.Store(str(home)), make_settings(home))
        deployer.run_stop(name, "production")
    if shutil.which("docker"):
        ids = subprocess.run(["docker", "image", "ls", "-q", "dockrune/" + name],
                             capture_output=True, text=True, timeout=60).stdout
        if ids.split():
            subprocess.run(["docker", "image", "rm", "--force"] + ids.split(),
                           capture_output=True, timeout=120)


def python_app(text, status=200):
    """Return the files of a tiny Python web app answering text (and status)."""
    server = (
        "import http.server, sys\n"
        "port, text = int(sys.argv[1]), ' '.join(sys.argv[2:])\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = text.encode()\n"
        "        self.send_response(%d)\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n" % status)
    return {"server.py": server,
            "Procfile": "# the web process\nweb: python3 server.py $PORT %s ${GREETING}"
                        "\nworker: python3 worker.py\n" % text}


# -- dockerfile ---------------------------------------------------------------------


def dockerfile_app(marker):
    """Return a Dockerfile app: busybox httpd on 8080, $GREETING in env.txt."""
    return {
        "Dockerfile": (
            "FROM %s\nCOPY site /www\nEXPOSE 8080\n"
            "CMD [\"sh\", \"-c\", \"echo \\\"$GREETING\\\" > /www/env.txt; "
            "exec httpd -f -p 8080 -h /www\"]\n" % BASE_IMAGE),
        "site/index.html": marker + "\n",
    }


def test_dockerfile_push_runs_sha_tagged_image_on_loopback_with_app_env(
        base_image, server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(dockerfile_app("one"))
    port = free_port()
    server = server_factory(DOCKRUNE_KEEP_RELEASES="2")
    write_app(server.home, app_name, remote, port, GREETING="hello-from-env",
              HEALTH_TIMEOUT="8")
    server.start()

    record = push(server, app_name, first)
    assert record["status"] == "live", log_of(record)
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "one\n")
    assert http_get("http://127.0.0.1:%d/env.txt" % port) == (200, "hello-from-env\n")
    inspect = json.loads(subprocess.run(
        ["docker", "container", "inspect", "dockrune-" + app_name],
        capture_output=True, text=True, timeout=60, check=True).stdout)[0]
    assert inspect["Config"]["Image"] == "dockrune/%s:%s" % (app_name, first)
    assert inspect["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    bindings = inspect["HostConfig"]["PortBindings"]["8080/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
    text = log_of(record)
    assert "-----> dockerfile: found Dockerfile" in text
    assert "beside the old version on port" in text
    assert "hello-from-env" not in text

    # A version that fails its health check never replaces the one that works.
    broken = remote.commit({"site/index.html": None, "site/other.html": "x\n"})
    record = push(server, app_name, broken)
    assert record["status"] == "failed"
    assert "health check failed" in record["error"]
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "one\n")
    assert server.status(app_name)["sha"] == first

    fixed = remote.commit({"site/index.html": "two\n"})
    record = push(server, app_name, fixed)
    assert record["status"] == "live", log_of(record)
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "two\n")
    names = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert "dockrune-%s-next" % app_name not in names
    # Two builds are kept: the live one and the one live before it.
    tags = subprocess.run(["docker", "image", "ls", "--format", "{{.Tag}}",
                           "dockrune/" + app_name], capture_output=True, text=True,
                          timeout=60).stdout.split()
    assert sorted(tags) == sorted([first, fixed])

    server.cli("stop", app_name)
    wait_for(lambda: server.status(app_name)["status"] == "stopped")
    assert http_get("http://127.0.0.1:%d/" % port)[0] is None
    assert "dockrune-%s" % app_name not in subprocess.run(
        ["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
        text=True, timeout=60).stdout.split()


# -- nitro --------------------------------------------------------------------------


NITRO_OUTPUT = """\
import http from "node:http";
const port = Number(process.env.NITRO_PORT);
const host = process.env.NITRO_HOST;
const facts = [process.env.PORT, process.env.HOST, process.env.NODE_ENV].join(" ");
http.createServer((req, res) => res.end(facts + "\\n")).listen(port, host);
"""


def test_nitro_with_committed_output_runs_it_without_a_build(
        server_factory, tmp_path, app_name):
    need(shutil.which("node") is not None, "node is missing (apt-get install nodejs)")
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"nuxt.config.ts": "export default {}\n",
                         "package.json": '{"dependencies": {"nuxt": "3"}}\n',
                         ".output/server/index.mjs": NITRO_OUTPUT})
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()

    record = push(server, app_name, sha)
    assert record["status"] == "live", log_of(record)
    assert http_get("http://127.0.0.1:%d/" % port) == (
        200, "%d 127.0.0.1 production\n" % port)
    text = log_of(record)
    assert "-----> nitro: found nuxt.config.ts" in text
    assert "building nothing: .output/server/index.mjs is committed" in text
    assert "npm" not in text


def test_nuxt3_app_is_built_by_nuxt_and_served_by_node(
        server_factory, tmp_path, app_name):
    need(shutil.which("npm") is not None, "npm is missing (apt-get install npm)")
    remote = GitRemote(str(tmp_path / "git"))
    files = {}
    for name in ("package.json", "package-lock.json", "nuxt.config.ts", "app.vue"):
        with open(os.path.join(FIXTURES, "nuxt3", name)) as f:
            files[name] = f.read()
    files[".gitignore"] = "node_modules\n.nuxt\n.output\n"
    sha = remote.commit(files)
    port = free_port()
    os.makedirs(NPM_CACHE, exist_ok=True)
    server = server_factory(npm_config_cache=NPM_CACHE,
                            npm_config_prefer_offline="true",
                            npm_config_update_notifier="false")
    write_app(server.home, app_name, remote, port, HEALTH_TIMEOUT="60")
    server.start()

    record = push(server, app_name, sha)
    assert record["status"] == "live", log_of(record)
    code, html = http_get("http://127.0.0.1:%d/" % port)
    assert code == 200 and "served by nuxt" in html
    text = log_of(record)
    assert "npm ci --include=dev" in text
    assert "npm run build" in text
    release = os.path.join(str(server.home), "releases", app_name, "production", sha)
    assert os.path.isfile(os.path.join(release, ".output", "server", "index.mjs"))
    assert spec_of(server.home, app_name)["argv"][-1] == os.path.join(
        release, ".output", "server", "index.mjs")


# -- procfile and custom commands -----------------------------------------------------


def test_procfile_web_line_runs_without_shell_with_port_and_vars_expanded(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(python_app("procfile says"))
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port, GREETING="'hi; there'")
    server.start()

    record = push(server, app_name, sha)
    assert record["status"] == "live", log_of(record)
    assert http_get("http://127.0.0.1:%d/" % port) == (
        200, "procfile says hi; there")
    spec = spec_of(server.home, app_name)
    assert spec["argv"] == ["python3", "server.py", str(port), "procfile", "says",
                            "hi; there"]
    assert "-----> procfile: found Procfile" in log_of(record)


def test_build_and_start_from_app_settings_run_in_the_release(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    files = python_app("unused")
    del files["Procfile"]
    sha = remote.commit(files)
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port,
              BUILD="python3 -c \"open('built.txt','w').write('built')\"",
              START="'python3 server.py ${PORT} custom ${MISSING:-default}'")
    server.start()

    record = push(server, app_name, sha)
    assert record["status"] == "live", log_of(record)
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "custom default")
    release = os.path.join(str(server.home), "releases", app_name, "production", sha)
    with open(os.path.join(release, "built.txt")) as f:
        assert f.read() == "built"
    assert "procfile: found START= and BUILD= in the app's settings" in log_of(record)


# -- static ---------------------------------------------------------------------------


def raw_get(port, path):
    """Send a GET with path exactly as given; return the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\n\r\n")
        answer = s.recv(200).decode("latin-1")
    return int(answer.split()[1])


def test_static_site_in_dist_is_served_without_listing_or_escape(
        server_factory, tmp_path, app_name):
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit({"dist/index.html": "<h1>static</h1>\n",
                         "dist/assets/app.css": "body{}\n",
                         "dist/.secret": "no\n",
                         "notes.txt": "outside the site\n"})
    os.symlink("../notes.txt", os.path.join(remote.work, "dist", "link.txt"))
    sha = remote.commit({}, "a link that leads out")
    port = free_port()
    server = server_factory()
    write_app(server.home, app_name, remote, port)
    server.start()

    record = push(server, app_name, sha)
    assert record["status"] == "live", log_of(record)
    base = "http://127.0.0.1:%d" % port
    assert http_get(base + "/") == (200, "<h1>static</h1>\n")
    assert http_get(base + "/assets/app.css") == (200, "body{}\n")
    assert http_get(base + "/assets/")[0] == 404
    assert http_get(base + "/.secret")[0] == 404
    assert http_get(base + "/%2esecret")[0] == 404
    assert http_get(base + "/link.txt")[0] == 404
    assert raw_get(port, "/../notes.txt") == 404
    assert raw_get(port, "/%2e%2e/notes.txt") == 404
    assert "-----> static: found dist/index.html" in log_of(record)
