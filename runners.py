"""The job queue, its worker threads, and the deploy pipeline.

One lane per app environment: at most one job runs in a lane at a time, and a
lane holds at most one waiting job.  A job that arrives while an older one
waits replaces it (the newest push wins; the replaced deploy is recorded as
superseded).  A small pool of named worker threads serves every lane.

A deploy is a fixed series of steps, one function each:

    fetch_source -> detect_kind -> compose_up -> check_health

Each step narrates into the deploy's own log file ("-----> step"), and every
command it runs streams its output there too.  Commands are argv lists, never
a shell; each runs in its own session so that a timeout kills its whole
process group.
"""

import collections
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import store

log = logging.getLogger("dockrune.runners")

COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml",
                 "docker-compose.yml")
STATIC_DIRS = ("", "dist", "public", "_site")
NITRO_CONFIGS = ("nuxt.config.ts", "nuxt.config.js", "nuxt.config.mjs",
                 "nuxt.config.mts", "nitro.config.ts", "nitro.config.js")
SUPPORTED_KINDS = ("compose",)
KINDS = ("compose", "dockerfile", "nitro", "procfile", "static")
TAIL_LINES = 20
KILL_GRACE = 5.0


class DeployError(Exception):
    """A deploy step failed; the message is the one-line reason users see."""


class Outdated(DeployError):
    """The commit is older than the one running: nothing to deploy."""


# -- the deploy log -------------------------------------------------------------


class DeployLog:
    """Append-only, size-capped narration and command output of one deploy.

    Every line gets a UTC time stamp; every known secret is replaced by '***'.
    Past max_bytes, command output is dropped behind one visible marker while
    step narration goes on, so the end of a deploy is always in its log.
    """

    def __init__(self, path, max_bytes=2_000_000, secrets=()):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.secrets = [s for s in secrets if s and len(s) >= 4]
        self.size = 0
        self.truncated = False
        self.error = None
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8", errors="replace")

    def step(self, text):
        self._write("-----> " + text, force=True)

    def line(self, text, force=False):
        self._write("       " + text, force=force)

    def blank(self):
        with self._lock:
            self._put("\n")

    def redact(self, text):
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def check(self):
        """Raise DeployError if the log could not be written (a full disk)."""
        if self.error is not None:
            raise DeployError("cannot write the deploy log %s: %s"
                              % (self.path, self.error.strerror or self.error))

    def close(self):
        with self._lock:
            try:
                self._file.close()
            except OSError as e:
                self.error = self.error or e

    def _write(self, text, force=False):
        text = self.redact(_printable(text))
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        data = "%s %s\n" % (stamp, text)
        with self._lock:
            if self.size + len(data) > self.max_bytes and not force:
                if not self.truncated:
                    self.truncated = True
                    self._put("%s ....... [log truncated: over %d bytes]\n"
                              % (stamp, self.max_bytes))
                return
            self.size += len(data)
            self._put(data)

    def _put(self, data):
        # A full disk must fail the deploy, not the worker: remember the
        # error and stop writing; the pipeline checks it after every step.
        if self.error is not None:
            return
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as e:
            self.error = e


def _printable(text):
    """Drop control characters (ANSI colours among them) but keep tabs."""
    return "".join(c if c >= " " or c == "\t" else "" for c in text.rstrip("\r\n"))


# -- commands -------------------------------------------------------------------


def run_command(argv, dlog, timeout, cwd=None, env=None):
    """Run argv, streaming its output into dlog; raise DeployError on failure.

    The command gets its own session; when timeout seconds pass, its whole
    process group is terminated, then killed.  The error names the command
    (secrets redacted) and quotes the last lines of its output.
    """
    shown = dlog.redact(shlex.join(argv))
    dlog.line("$ " + shown, force=True)
    tail = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, dlog, tail),
                              name="dockrune-output-%d" % proc.pid, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        code = None
    # A grandchild that left the group may still hold the pipe open; do not
    # let it hold the deploy too.
    reader.join(timeout=KILL_GRACE)
    if code is None:
        raise DeployError("timed out after %ds: %s" % (timeout, shown))
    if code != 0:
        last = dlog.redact(" | ".join(list(tail)[-3:]))[-300:]
        raise DeployError("%s exited %d%s" % (shown, code, ": " + last if last else ""))
    return list(tail)


def _pump(stream, dlog, tail):
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        tail.append(dlog.redact(_printable(text)))
        dlog.line(text)
    stream.close()


def kill_group(proc, grace=KILL_GRACE):
    """Terminate proc's process group, then kill it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            # The leader is gone; make sure no member of its group survives.
            os.killpg(proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        return


def kill_leftovers(deploy_id, proc_root="/proc"):
    """Kill every process still marked with deploy_id; return how many.

    Commands of a deploy carry DOCKRUNE_DEPLOY=<id> in their environment, and
    so do their children: after a crash of dockrune itself, this finds them
    by that mark rather than by a pid that may since belong to a stranger.
    """
    mark = ("DOCKRUNE_DEPLOY=%s" % deploy_id).encode()
    killed = 0
    for pid in os.listdir(proc_root):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(os.path.join(proc_root, pid, "environ"), "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError):
            continue
    return killed


_compose_lock = threading.Lock()
_compose_argv = None


def compose_command(timeout=20):
    """Return the argv prefix for docker compose: v2 when present, else v1."""
    global _compose_argv
    with _compose_lock:
        if _compose_argv is None:
            _compose_argv = _find_compose(timeout)
        return list(_compose_argv)


def _find_compose(timeout):
    try:
        done = subprocess.run(["docker", "compose", "version"], timeout=timeout,
                              stdin=subprocess.DEVNULL, capture_output=True)
        if done.returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        done = subprocess.run(["docker-compose", "version"], timeout=timeout,
                              stdin=subprocess.DEVNULL, capture_output=True)
        if done.returncode == 0:
            return ["docker-compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    raise DeployError("neither 'docker compose' (v2) nor 'docker-compose' (v1) "
                      "works here: install one (dockrune doctor tells more)")


# -- the deploy pipeline ----------------------------------------------------------


class Deployer:
    """Runs deploy and stop jobs for one Store with one set of settings.

    notify(event, record) is called on every change a user may care about
    ("queued", "started", "live", "failed", "superseded", "stopped"); it must
    not block, and an exception it raises is logged and ignored.
    """

    def __init__(self, store_, settings, notify=None, proxy=None):
        self.store = store_
        self.settings = settings
        self.notify_hook = notify
        self.proxy = proxy

    def notify(self, event, record):
        if self.notify_hook is None:
            return
        try:
            self.notify_hook(event, record)
        except Exception:
            log.exception("notify %s failed for deploy %s", event, record.get("id"))

    # -- queueing (called from any thread) --

    def new_deploy(self, app, env, sha, ref, trigger, **extra):
        """Record a queued deploy and return it; the caller hands it to a Runner."""
        if "repo" not in extra:
            try:
                extra["repo"] = (self.store.load_app(app) or {}).get("REPO")
            except store.EnvFileError:
                extra["repo"] = None
        record = self.store.new_deploy(app, env, sha, ref, trigger, action="deploy",
                                       **extra)
        self.notify("queued", record)
        return record

    def enqueued(self, job):
        """Remember which job waits in its lane (called under the Runner's lock)."""
        self.store.update_environment(
            job["app"], job["environment"],
            queued=job["id"] if job.get("action") == "deploy" else None)

    def supersede(self, record, newer):
        record = self.store.update_deploy(
            record["id"], status="superseded", finished_at=store.utcnow(),
            superseded_by=newer.get("id"),
            error="superseded by %s" % (newer.get("sha") or "a newer job")[:12])
        log.info("deploy %s of %s superseded by %s", record["id"], record["app"],
                 newer.get("id"))
        self.notify("superseded", record)

    # -- running (called from a worker thread) --

    def run(self, job):
        if job["action"] == "stop":
            self.run_stop(job["app"], job["environment"])
        else:
            self.run_deploy(job)

    def run_deploy(self, record):
        """Run one deploy to its end; return the final record.  Never raises."""
        app, env, deploy_id = record["app"], record["environment"], record["id"]
        started = time.monotonic()
        carried = {"candidates": record["candidates"]} if record.get("candidates") else {}
        record = self.store.update_deploy(deploy_id, status="running",
                                          started_at=store.utcnow(), **carried)
        self.store.update_environment(app, env, running=deploy_id, queued=None,
                                      status="deploying")
        self.notify("started", record)
        log.info("deploy %s of %s/%s at %s started", deploy_id, app, env,
                 (record["sha"] or record.get("ref") or "its branch")[:12])
        dlog = DeployLog(record["log"], self.settings.log_max_bytes,
                         secrets=self.settings.secrets())
        facts = {}
        try:
            self._deploy_steps(record, dlog, facts)
            dlog.check()
            status, error = "live", None
        except Outdated as e:
            status, error = "superseded", str(e)
            dlog.step("nothing to do: %s" % e)
        except DeployError as e:
            status, error = "failed", str(e)
            dlog.step("deploy failed: %s" % e)
        except Exception as e:
            log.exception("deploy %s of %s crashed", deploy_id, app)
            status, error = "failed", "internal error: %s" % e
            dlog.step("deploy failed: internal error (see dockrune's log)")
        finally:
            dlog.close()
        return self._finish(record, status, error, facts, time.monotonic() - started)

    def _finish(self, record, status, error, facts, seconds):
        app, env, deploy_id = record["app"], record["environment"], record["id"]
        record = self.store.update_deploy(
            deploy_id, status=status, error=error, finished_at=store.utcnow(),
            duration=round(seconds, 1), **facts)
        fields = {"running": None, "last_deploy": deploy_id, "port": record.get("port"),
                  "domain": record.get("domain"), "url": record.get("url")}
        if status == "live":
            fields.update(status="live", sha=record["sha"], ref=record["ref"],
                          deployed_at=record["finished_at"], live_deploy=deploy_id)
        elif status == "superseded":
            summary = self.store.environment(app, env) or {}
            fields = {"running": None, "status": "live" if summary.get(
                "live_deploy") else summary.get("status", "stopped")}
        else:
            fields.update(status="failing")
            if facts.get("started"):
                fields.update(sha=record["sha"], deployed_at=record["finished_at"])
        self.store.update_environment(app, env, **fields)
        self.sync_routes(record)
        log.info("deploy %s of %s/%s %s in %.1fs%s", deploy_id, app, env, status,
                 seconds, ": " + error if error else "")
        self.notify({"live": "live", "superseded": "superseded"}.get(status, "failed"),
                    record)
        return record

    def _deploy_steps(self, record, dlog, facts):
        """Run every step, adding to facts what the record should keep.

        Raises DeployError when a step fails.
        """
        ctx = self.context(record, dlog)
        dlog.step("deploying %s (%s) at %s, %s"
                  % (ctx.app, ctx.env, (record["sha"] or "")[:12] or
                     record.get("ref") or "its branch", record["trigger"]))
        facts.update(port=ctx.port, domain=ctx.domain, url=ctx.url)
        self.store.update_deploy(record["id"], **facts)
        dlog.blank()
        facts.update(fetch_source(ctx), sha=ctx.sha)
        dlog.blank()
        kind, why = detect_kind(ctx.checkout, ctx.settings.get("TYPE"))
        dlog.step("%s: %s" % (kind, why))
        facts["kind"] = kind
        if kind not in SUPPORTED_KINDS:
            raise DeployError("not supported yet: %s (found %s)" % (kind, why))
        dlog.blank()
        compose_up(ctx, why.rsplit(" ", 1)[-1])
        facts["started"] = True
        dlog.blank()
        check_health(ctx)
        dlog.step("live at %s" % (ctx.url or "http://127.0.0.1:%d" % ctx.port))

    def context(self, record, dlog):
        """Gather everything a deploy of record needs; raise DeployError if unusable."""
        app, env = record["app"], record["environment"]
        try:
            settings = self.store.load_app(app)
        except store.EnvFileError as e:
            raise DeployError(str(e)) from e
        if settings is None:
            raise DeployError("no app file %s" % self.store.app_path(app))
        return DeployContext(self, record, settings, dlog)

    def sync_routes(self, record, overrides=None):
        """Bring the proxy's routes in line with the state; never raises.

        Returns False when the proxy refused the routes (the old ones stay).
        """
        if self.proxy is None:
            return True
        try:
            self.proxy.sync(overrides)
            return True
        except Exception as e:
            log.error("routes not updated after %s of %s: %s", record.get("id", "stop"),
                      record.get("app"), e)
            return False

    def run_stop(self, app, env):
        """Stop app/env: compose down, and remember it as stopped."""
        dlog = DeployLog(os.path.join(self.store.logs_dir, app, "stop.log"),
                         self.settings.log_max_bytes, secrets=self.settings.secrets())
        try:
            dlog.step("stopping %s (%s)" % (app, env))
            compose_down(self, app, env, dlog)
            summary = self.store.update_environment(app, env, status="stopped",
                                                    running=None)
            self.sync_routes(summary)
            log.info("stopped %s/%s", app, env)
            self.notify("stopped", summary)
        except DeployError as e:
            log.error("stop of %s/%s failed: %s", app, env, e)
            raise
        finally:
            dlog.close()


class DeployContext:
    """What one deploy knows: the app's settings, its paths, port and env."""

    def __init__(self, deployer, record, settings, dlog):
        self.deployer = deployer
        self.store = deployer.store
        self.record = record
        self.settings = settings
        self.dlog = dlog
        self.app = record["app"]
        self.env = record["environment"]
        self.sha = record["sha"]
        self.global_settings = deployer.settings
        self.checkout = os.path.join(self.store.src_dir, self.app, self.env)
        self.project = compose_project(self.app, self.env)
        self.port = self._port()
        self.domain = settings.get("DOMAIN") or None
        self.url = "https://%s" % self.domain if self.domain else None
        self.deadline = time.monotonic() + _seconds(settings, "DEPLOY_TIMEOUT", 1200)

    def _port(self):
        value = self.settings.get("PORT", "")
        if value:
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise DeployError("PORT=%r in %s is not a port number"
                                  % (value, self.store.app_path(self.app)))
            return int(value)
        low, high = self.global_settings.port_range
        return self.store.allocate_port("%s/%s" % (self.app, self.env), low, high)

    def remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeployError("deploy timed out (DEPLOY_TIMEOUT)")
        return left

    def run(self, argv, cwd=None, env=None, timeout=None):
        self.dlog.check()
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        # The mark lets a restarted dockrune find what a crash left running.
        env = dict(os.environ if env is None else env, DOCKRUNE_DEPLOY=self.record["id"])
        return run_command(argv, self.dlog, limit, cwd=cwd, env=env)

    def app_environment(self):
        """Return the environment for the app's own commands.

        dockrune's own settings (DOCKRUNE_*) are removed: the app and its
        build never see the webhook secret or the GitHub token.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKRUNE_")}
        env.update(self.settings)
        env.update(PORT=str(self.port), DOCKRUNE_APP=self.app,
                   DOCKRUNE_ENVIRONMENT=self.env, DOCKRUNE_SHA=self.sha)
        return env


def compose_project(app, env):
    """Return the compose project name of app/env (production has no suffix)."""
    app, env = store.sanitize_name(app), store.sanitize_name(env)
    return "dockrune-%s" % app if env == "production" else "dockrune-%s-%s" % (app, env)


def _seconds(settings, key, default):
    value = settings.get(key, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise DeployError("%s=%r is not a number of seconds" % (key, value)) from None


# -- steps ------------------------------------------------------------------------


def git_environment(git_url, token):
    """Return the environment for git: no prompts, few protocols, token in env.

    The token travels as an http extraheader given through GIT_CONFIG_*
    variables, so it is never part of a URL, an argv or .git/config.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKRUNE_")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_ALLOW_PROTOCOL="https:ssh:file",
               GIT_ASKPASS="true", SSH_ASKPASS="true")
    if token and git_url.startswith("https://"):
        import base64
        basic = base64.b64encode(("x-access-token:%s" % token).encode()).decode()
        host = "/".join(git_url.split("/", 3)[:3]) + "/"
        env.update(GIT_CONFIG_COUNT="1",
                   GIT_CONFIG_KEY_0="http.%s.extraheader" % host,
                   GIT_CONFIG_VALUE_0="Authorization: Basic %s" % basic)
    return env


def git_url_for(settings, global_settings):
    url = settings.get("GIT_URL") or ""
    if not url:
        repo = settings.get("REPO", "")
        if not store.is_repo(repo):
            raise DeployError("REPO=%r is not owner/name and GIT_URL is empty" % repo)
        url = "%s/%s.git" % (global_settings.git_base_url.rstrip("/"), repo)
    if url.startswith("-"):
        raise DeployError("GIT_URL=%r must not start with '-'" % url)
    return url


def fetch_source(ctx):
    """Fetch exactly the deploy's sha into the checkout and check it out detached."""
    ctx.dlog.step("fetching %s" % (ctx.sha or ctx.record.get("ref") or "the branch"))
    url = git_url_for(ctx.settings, ctx.global_settings)
    env = git_environment(url, ctx.global_settings.github_token)
    if not os.path.isdir(os.path.join(ctx.checkout, ".git")):
        os.makedirs(ctx.checkout, exist_ok=True)
        ctx.run(["git", "init", "--quiet", "--", ctx.checkout], env=env)
    git = ["git", "-C", ctx.checkout]
    if ctx.sha is None:
        resolve_ref(ctx, url, env)
    else:
        ctx.run(git + ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                       "--", url, ctx.sha], env=env)
    if ctx.record.get("trigger") == "push":
        choose_commit(ctx, url, env)
    ctx.run(git + ["checkout", "--quiet", "--force", "--detach", ctx.sha, "--"],
            env=env)
    ctx.run(git + ["clean", "-ffdq"], env=env)
    return commit_facts(ctx, env)


def resolve_ref(ctx, url, env):
    """Fetch the deploy's ref (default: BRANCH, else the remote's HEAD); pin its sha."""
    ref = ctx.record.get("ref") or ctx.settings.get("BRANCH") or "HEAD"
    if ref.startswith("-") or ".." in ref:
        raise DeployError("ref %r is not a branch, tag or sha" % ref)
    ctx.run(["git", "-C", ctx.checkout, "fetch", "--quiet", "--no-tags", "--force",
             "--no-write-fetch-head", "--", url, "%s:refs/dockrune/target" % ref],
            env=env)
    argv = ["git", "-C", ctx.checkout, "rev-parse", "--verify",
            "refs/dockrune/target^{commit}"]
    done = subprocess.run(argv, env=env, capture_output=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    sha = done.stdout.decode().strip()
    if done.returncode != 0 or len(sha) != 40:
        raise DeployError("%s does not name a commit" % ref)
    ctx.sha = sha
    ctx.record = ctx.store.update_deploy(ctx.record["id"], sha=sha)
    ctx.dlog.line("%s is %s" % (ref, sha), force=True)


def choose_commit(ctx, url, env):
    """Deploy the newest of the pushed commits; refuse one older than the live one.

    GitHub may deliver pushes out of order.  The lane keeps only the newest
    delivery, with the shas it replaced as candidates: when one of those
    descends from the delivered sha, it is the newer commit and is deployed
    instead.  A commit that is an ancestor of the one running now is not
    deployed at all, unless the push was forced (a deliberate rollback).
    """
    for sha in ctx.record.get("candidates") or ():
        if sha == ctx.sha or not _is_sha(sha):
            continue
        try:
            ctx.run(["git", "-C", ctx.checkout, "fetch", "--quiet", "--no-tags",
                     "--no-write-fetch-head", "--", url, sha], env=env, timeout=300)
        except DeployError:
            ctx.dlog.line("%s is gone from the remote; skipped" % sha, force=True)
            continue
        if is_ancestor(ctx.checkout, ctx.sha, sha, env):
            ctx.dlog.line("%s descends from %s: deploying it instead" % (sha, ctx.sha),
                          force=True)
            ctx.sha = sha
            ctx.record = ctx.store.update_deploy(ctx.record["id"], sha=sha)
    live = (ctx.store.environment(ctx.app, ctx.env) or {}).get("sha")
    if (live and live != ctx.sha and not ctx.record.get("forced")
            and is_ancestor(ctx.checkout, ctx.sha, live, env)):
        raise Outdated("%s is older than %s, which is running"
                       % (ctx.sha[:12], live[:12]))


def is_ancestor(checkout, older, newer, env):
    """Tell whether commit older is an ancestor of commit newer."""
    argv = ["git", "-C", checkout, "merge-base", "--is-ancestor", older, newer]
    try:
        return subprocess.run(argv, env=env, capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _is_sha(value):
    return isinstance(value, str) and len(value) == 40 and all(
        c in "0123456789abcdef" for c in value)


def commit_facts(ctx, env):
    """Return the commit's subject and author, for reports and alerts."""
    argv = ["git", "-C", ctx.checkout, "log", "-1", "--format=%an%n%s", ctx.sha, "--"]
    try:
        out = subprocess.run(argv, env=env, capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    author, _, subject = out.decode("utf-8", "replace").partition("\n")
    return {"author": author.strip()[:200], "message": subject.strip()[:500]}


def detect_kind(checkout, forced=None):
    """Return (kind, reason) for the project in checkout; raise DeployError if none."""
    if forced:
        if forced not in KINDS:
            raise DeployError("TYPE=%r is not one of %s" % (forced, ", ".join(KINDS)))
        found = _kind_reason(checkout, forced)
        return forced, "TYPE=%s in the app's settings%s" % (
            forced, " (found %s)" % found.split(" ", 1)[1] if found else "")
    for kind in KINDS:
        reason = _kind_reason(checkout, kind)
        if reason:
            return kind, reason
    raise DeployError("cannot tell what to run: no compose file, Dockerfile, "
                      "nuxt config, Procfile or index.html at %s" % "the top level")


def _kind_reason(checkout, kind):
    def has(name):
        return os.path.isfile(os.path.join(checkout, name))

    if kind == "compose":
        return next(("found " + f for f in COMPOSE_FILES if has(f)), None)
    if kind == "dockerfile":
        return "found Dockerfile" if has("Dockerfile") else None
    if kind == "nitro":
        found = next((f for f in NITRO_CONFIGS if has(f)), None)
        if found:
            return "found " + found
        if has("package.json") and _has_nitro_dependency(checkout):
            return "found a nuxt or nitropack dependency in package.json"
        return None
    if kind == "procfile":
        return "found Procfile" if has("Procfile") else None
    return next(("found " + os.path.join(d, "index.html").lstrip("/")
                 for d in STATIC_DIRS if has(os.path.join(d, "index.html"))), None)


def _has_nitro_dependency(checkout):
    import json
    try:
        with open(os.path.join(checkout, "package.json"), encoding="utf-8") as f:
            package = json.load(f)
    except (OSError, ValueError):
        return False
    deps = {}
    for key in ("dependencies", "devDependencies"):
        if isinstance(package.get(key), dict):
            deps.update(package[key])
    return "nuxt" in deps or "nitropack" in deps


def check_docker(ctx):
    """Fail fast, touching nothing, when the Docker engine does not answer."""
    try:
        run_command(["docker", "info", "--format", "{{.ServerVersion}}"],
                    _QuietLog(), timeout=min(20, ctx.remaining()))
    except (DeployError, OSError) as e:
        raise DeployError("Docker engine not reachable: %s" % e) from None


class _QuietLog:
    """A DeployLog stand-in that keeps nothing, for probes."""

    def redact(self, text):
        return text

    def line(self, text, force=False):
        pass


def compose_up(ctx, compose_file):
    """Build and (re)start the app's compose project."""
    check_docker(ctx)
    ctx.dlog.step("building and starting %s (docker compose, %s)"
                  % (ctx.project, compose_file))
    argv = compose_command() + ["-f", compose_file, "-p", ctx.project, "up", "-d",
                                "--build", "--remove-orphans"]
    ctx.run(argv, cwd=ctx.checkout, env=ctx.app_environment())


def compose_down(deployer, app, env, dlog):
    """Stop and remove the app's compose project (its volumes are kept)."""
    checkout = os.path.join(deployer.store.src_dir, app, env)
    found = next((f for f in COMPOSE_FILES
                  if os.path.isfile(os.path.join(checkout, f))), None)
    project = compose_project(app, env)
    if found is None:
        dlog.line("no compose file in %s: nothing to stop" % checkout, force=True)
        return
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DOCKRUNE_")}
    try:
        environment.update(deployer.store.load_app(app) or {})
    except store.EnvFileError:
        pass
    environment.setdefault("PORT", "0")
    run_command(compose_command() + ["-f", found, "-p", project, "down",
                                     "--remove-orphans"],
                dlog, timeout=300, cwd=checkout, env=environment)


def check_health(ctx):
    """Wait until the app answers 2xx or 3xx on HEALTH_PATH; raise DeployError."""
    path = ctx.settings.get("HEALTH_PATH") or "/"
    if not path.startswith("/"):
        path = "/" + path
    url = "http://127.0.0.1:%d%s" % (ctx.port, path)
    limit = _seconds(ctx.settings, "HEALTH_TIMEOUT", 60)
    ctx.dlog.step("checking %s (up to %ds)" % (url, limit))
    deadline = min(time.monotonic() + limit, ctx.deadline)
    last = "no answer"
    while True:
        code, last = probe(url)
        if code and 200 <= code < 400:
            ctx.dlog.line("answered %d" % code, force=True)
            return
        if time.monotonic() >= deadline:
            raise DeployError("health check failed: %s gave %s after %ds"
                              % (url, last, limit))
        time.sleep(0.5)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def probe(url, timeout=3):
    """GET url once; return (status code or None, a short description)."""
    try:
        with _opener.open(url, timeout=timeout) as response:
            return response.status, "HTTP %d" % response.status
    except urllib.error.HTTPError as e:
        return e.code, "HTTP %d" % e.code
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, str(reason)[:100]


# -- the queue ---------------------------------------------------------------------


class Runner:
    """Lanes of jobs served by a pool of named worker threads.

    submit() and shutdown() are thread-safe.  A job is a deploy record (a
    dict with "action": "deploy") or {"action": "stop", "app", "environment"}.
    """

    def __init__(self, deployer, workers=2):
        self.deployer = deployer
        self.workers = workers
        self._cond = threading.Condition()
        self._waiting = {}      # lane -> job waiting to run
        self._running = {}      # lane -> job running now
        self._ready = collections.deque()
        self._threads = []
        self._stopping = False

    def start(self):
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, daemon=True,
                                      name="dockrune-worker-%d" % (n + 1))
            thread.start()
            self._threads.append(thread)

    def submit(self, job):
        """Queue job in its lane; a job already waiting there is superseded."""
        lane = (job["app"], job["environment"])
        with self._cond:
            older = self._waiting.get(lane)
            replaced = older is not None and older.get("action") == "deploy"
            if replaced and job.get("action") == "deploy" and older.get("sha"):
                job["candidates"] = list(older.get("candidates") or ()) + [older["sha"]]
            self._waiting[lane] = job
            self.deployer.enqueued(job)
            if older is None and lane not in self._running:
                self._ready.append(lane)
                self._cond.notify()
        if replaced:
            self.deployer.supersede(older, job)
        return job

    def busy(self):
        """Return the number of jobs running or waiting."""
        with self._cond:
            return len(self._running) + len(self._waiting)

    def lane_busy(self, app, env):
        """Tell whether a job for app/env is running or waiting right now."""
        with self._cond:
            return (app, env) in self._running or (app, env) in self._waiting

    def wait_idle(self, timeout):
        """Wait until no job runs or waits; return False on timeout."""
        deadline = time.monotonic() + timeout
        while self.busy():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def shutdown(self, timeout=10.0):
        """Stop taking jobs, wait up to timeout, return lanes still running."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            stragglers = sorted("%s/%s" % lane for lane in self._running)
        if stragglers:
            log.warning("shut down with jobs still running: %s", ", ".join(stragglers))
        return stragglers

    def _next(self):
        with self._cond:
            while not self._ready and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None, None
            lane = self._ready.popleft()
            job = self._waiting.pop(lane)
            self._running[lane] = job
            return lane, job

    def _work(self):
        name = threading.current_thread().name
        while True:
            lane, job = self._next()
            if job is None:
                return
            threading.current_thread().name = "dockrune-deploy-%s" % lane[0]
            try:
                self.deployer.run(job)
            except Exception:
                # A worker outlives any job: log it and take the next one.
                log.exception("job %s for %s/%s failed", job.get("id", job["action"]),
                              *lane)
            finally:
                threading.current_thread().name = name
                self._done(lane)

    def _done(self, lane):
        with self._cond:
            del self._running[lane]
            if lane in self._waiting:
                self._ready.append(lane)
                self._cond.notify()
