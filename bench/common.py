"""What every bench shares: servers to start, load to send, figures to print.

Everything here runs the real programs (dockrune serve, adnanh/webhook, wrk,
git, docker compose) as subprocesses on free local ports and temporary
directories, and cleans up after itself.
"""

import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "github", "webhooks")
SECRET = "bench-webhook-secret"
BASE_IMAGE = "dockrune-test-busybox:1"
PYTHON = sys.executable
NOISE = ("shared, noisy machine: compare the ratios (peers measured in the same "
         "run, interleaved), not the absolute figures")


class BenchError(Exception):
    """A bench cannot run here; the message says what is missing."""


# -- figures -------------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours, theirs):
    if not ours or not theirs:
        return None
    return ours / theirs


def fmt(value, unit="", digits=1):
    if value is None:
        return "n/a"
    return "%.*f%s" % (digits, value, unit)


def say(text=""):
    print(text, flush=True)


def table(rows, header):
    """Print rows (lists of text) under header, in aligned columns."""
    rows = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        say("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def verdict(ok):
    return "met" if ok else "MISSED"


# -- processes and ports -------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20.0, proc=None):
    """Wait until url answers at all (any status); return seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise BenchError("%s exited %s before answering" % (proc.args[0],
                                                                proc.returncode))
        try:
            with urllib.request.urlopen(url, timeout=1):
                return time.monotonic() - started
        except urllib.error.HTTPError:
            return time.monotonic() - started
        except OSError:
            time.sleep(0.005)
    raise BenchError("%s did not answer within %ds" % (url, timeout))


def stop_process(proc, timeout=15):
    """Terminate proc's whole process group (it was started in its own)."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def rss_kb(pid):
    """Return the resident set size of pid in KiB (from /proc)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def need_tool(name, package):
    if shutil.which(name) is None:
        raise BenchError("%s is missing: apt-get install %s (or bench/install.sh)"
                         % (name, package))


# -- GitHub deliveries -----------------------------------------------------------------


def sign(body, secret=SECRET):
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def push_body(repo, sha, branch="main", message="bench"):
    """Return GitHub's own push payload re-aimed at repo, branch and sha."""
    with open(os.path.join(FIXTURES, "push.noaction.5.json")) as f:
        data = json.load(f)
    data["ref"] = "refs/heads/" + branch
    data["after"] = sha
    data["repository"]["full_name"] = repo
    data["repository"]["name"] = repo.split("/")[1]
    data["repository"]["default_branch"] = branch
    data["head_commit"]["id"] = sha
    data["head_commit"]["message"] = message
    return json.dumps(data).encode()


def post_push(url, body, delivery=None, timeout=10):
    """POST one signed push delivery; return the HTTP status (None: no answer)."""
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or os.urandom(16).hex(),
        "X-Hub-Signature-256": sign(body), "User-Agent": "GitHub-Hookshot/bench"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (http.client.HTTPException, OSError):
        return None     # no whole answer: counted by the caller


def get_text(url, timeout=2):
    """GET url; return its body as text, or None when it does not answer 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException):
        return None     # refused, reset or cut short while a container restarts


def wait_text(url, wanted, timeout, interval=0.02):
    """Poll url until its body, stripped, is wanted; return the monotonic time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = get_text(url, timeout=1)
        if text is not None and text.strip() == wanted:
            return time.monotonic()
        time.sleep(interval)
    return None


# -- dockrune ------------------------------------------------------------------------


class Dockrune:
    """`dockrune serve` in its own process group on a temporary home."""

    def __init__(self, home, **settings):
        self.home = home
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.hook_url = self.url + "/hooks/github"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKRUNE_")}
        env.update(DOCKRUNE_HOME=home, DOCKRUNE_LISTEN="127.0.0.1:%d" % self.port,
                   DOCKRUNE_WEBHOOK_SECRET=SECRET, DOCKRUNE_LOG_LEVEL="warning")
        env.update(settings)
        self.env = env
        self.proc = None
        self.started_in = None

    def start(self, timeout=30):
        os.makedirs(self.home, exist_ok=True)
        self.stderr = open(os.path.join(self.home, "serve.stderr"), "ab")
        began = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, os.path.join(ROOT, "dockrune.py"), "serve"], env=self.env,
            stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr,
            start_new_session=True)
        wait_http(self.url + "/healthz", timeout, self.proc)
        self.started_in = time.monotonic() - began
        return self

    def stop(self):
        stop_process(self.proc)
        if self.proc is not None:
            self.stderr.close()

    def wait_idle(self, timeout=600):
        """Wait until no job runs or waits (from /healthz); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = get_text(self.url + "/healthz")
            if text and json.loads(text).get("jobs") == 0:
                return True
            time.sleep(0.1)
        return False


def write_app(home, name, repo, **keys):
    """Write apps/<name>.env for repo with the given keys."""
    os.makedirs(os.path.join(home, "apps"), exist_ok=True)
    lines = ["REPO=%s" % repo] + ["%s=%s" % kv for kv in sorted(keys.items())]
    with open(os.path.join(home, "apps", name + ".env"), "w") as f:
        f.write("\n".join(lines) + "\n")


def store_records(home, app):
    """Return the app's deploy records, oldest first, read from its state files."""
    state = os.path.join(home, "state")
    with open(os.path.join(state, "history", app + ".json")) as f:
        ids = json.load(f)
    records = []
    for deploy_id in ids:
        try:
            with open(os.path.join(state, "deploys", deploy_id + ".json")) as f:
                records.append(json.load(f))
        except FileNotFoundError:
            pass
    return records


# -- adnanh/webhook ------------------------------------------------------------------


class Webhook:
    """adnanh/webhook with one HMAC-SHA256 hook per entry of hooks."""

    def __init__(self, workdir, hooks):
        self.workdir = workdir
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.hooks_file = os.path.join(workdir, "hooks.json")
        os.makedirs(workdir, exist_ok=True)
        with open(self.hooks_file, "w") as f:
            json.dump(hooks, f, indent=1)
        self.proc = None
        self.started_in = None

    def hook_url(self, hook_id):
        return "%s/hooks/%s" % (self.url, hook_id)

    def start(self, timeout=30):
        self.log = open(os.path.join(self.workdir, "webhook.log"), "ab")
        began = time.monotonic()
        self.proc = subprocess.Popen(
            ["webhook", "-hooks", self.hooks_file, "-ip", "127.0.0.1", "-port",
             str(self.port)], stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=self.log, start_new_session=True, cwd=self.workdir)
        wait_http(self.url + "/hooks/", timeout, self.proc)
        self.started_in = time.monotonic() - began
        return self

    def stop(self):
        stop_process(self.proc)
        if self.proc is not None:
            self.log.close()


def signed_hook(hook_id, command, args=(), workdir=None):
    """Return a hook that runs command when X-Hub-Signature-256 is valid.

    args are payload fields passed to the command as arguments.
    """
    hook = {
        "id": hook_id, "execute-command": command,
        "response-message": "accepted", "success-http-response-code": 202,
        "pass-arguments-to-command": [{"source": "payload", "name": a}
                                      for a in args],
        "trigger-rule": {"match": {"type": "payload-hmac-sha256",
                                   "secret": SECRET,
                                   "parameter": {"source": "header",
                                                 "name": "X-Hub-Signature-256"}}},
    }
    if workdir:
        hook["command-working-directory"] = workdir
    return hook


# -- wrk -----------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def run_wrk(url, body_file, connections, seconds, threads=2, event="push"):
    """Load url with signed deliveries; return {rps, p50, p99 (ms), errors}."""
    env = dict(os.environ, BENCH_BODY=body_file, BENCH_EVENT=event,
               BENCH_SIGNATURE=sign(open(body_file, "rb").read()))
    argv = ["wrk", "-t%d" % min(threads, connections), "-c%d" % connections,
            "-d%ds" % seconds, "--latency", "--timeout", "5s",
            "-s", os.path.join(BENCH, "intake.lua"), url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError("wrk failed: %s" % (done.stderr or done.stdout)[-300:])
    return parse_wrk(done.stdout)


def parse_wrk(out):
    result = {"rps": None, "p50": None, "p99": None, "errors": 0}
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match:
        result["rps"] = float(match.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        match = re.search(r"^\s+%s(?:\.000)?%%\s+([\d.]+)(us|ms|s|m)\s*$" % pct,
                          out, re.M)
        if match:
            result[key] = float(match.group(1)) * _UNITS[match.group(2)]
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if match:
        result["errors"] += int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                      r"timeout (\d+)", out)
    if match:
        result["errors"] += sum(int(n) for n in match.groups())
    return result


# -- git and docker ------------------------------------------------------------------


def git(*args, cwd=None):
    return subprocess.run(("git",) + args, check=True, capture_output=True,
                          text=True, timeout=120, cwd=cwd).stdout


class Remote:
    """A bare repository standing in for GitHub, with a work tree to commit from."""

    def __init__(self, root):
        self.bare = os.path.join(root, "remote.git")
        self.work = os.path.join(root, "work")
        git("init", "--quiet", "--bare", "--initial-branch", "main", self.bare)
        git("init", "--quiet", "--initial-branch", "main", self.work)

    def commit(self, files, message="bench"):
        """Write files ({path: text}), commit, push to main; return the sha."""
        for path, text in files.items():
            full = os.path.join(self.work, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
        git("-C", self.work, "add", "--all")
        git("-C", self.work, "-c", "user.name=Bench", "-c",
            "user.email=bench@example.com", "commit", "--quiet", "-m", message)
        git("-C", self.work, "push", "--quiet", self.bare, "HEAD:refs/heads/main")
        return git("-C", self.work, "rev-parse", "HEAD").strip()


def compose_app(marker):
    """Return the files of a compose app (busybox httpd) serving marker on PORT."""
    return {
        "Dockerfile": "FROM %s\nCOPY site /www\n"
                      'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n' % BASE_IMAGE,
        "site/index.html": marker + "\n",
        # init: httpd as process 1 ignores SIGTERM, and every replacement
        # would wait out docker's 10 s stop timeout.
        "compose.yaml": ("services:\n  web:\n    build: .\n    init: true\n"
                         "    ports:\n      - \"127.0.0.1:${PORT}:8080\"\n"),
    }


def ensure_base_image():
    """Import a busybox root filesystem as BASE_IMAGE unless it exists."""
    need_tool("docker", "docker.io")
    need_tool("busybox", "busybox-static")
    found = subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                           capture_output=True, timeout=60)
    if found.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "bin"))
        shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
        for tool in ("sh", "httpd", "cat", "echo", "sleep", "true", "wget"):
            os.symlink("busybox", os.path.join(root, "bin", tool))
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout,
                       check=True, capture_output=True, timeout=300)
        tar.wait(timeout=60)


def compose_down(project):
    """Remove every container, network and image of a compose project."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter",
                          "label=com.docker.compose.project=%s" % project],
                         capture_output=True, text=True, timeout=60).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f"] + ids, capture_output=True, timeout=120)
    subprocess.run(["docker", "network", "rm", project + "_default"],
                   capture_output=True, timeout=60)
    images = subprocess.run(["docker", "images", "-q", "--filter",
                             "reference=%s_web" % project, "--filter",
                             "reference=%s-web" % project],
                            capture_output=True, text=True, timeout=60).stdout.split()
    if images:
        subprocess.run(["docker", "rmi", "-f"] + sorted(set(images)),
                       capture_output=True, timeout=120)


def unique(prefix):
    """Return a name no other engineer's run on this machine will pick."""
    return "%s-%d-%s" % (prefix, os.getpid(), os.urandom(2).hex())
