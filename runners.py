"""The job queue, its worker threads, and the deploy pipeline.

One lane per app environment: at most one job runs in a lane at a time, and a
lane holds at most one waiting job.  A job that arrives while an older one
waits replaces it (the newest push wins; the replaced deploy is recorded as
superseded).  A small pool of named worker threads serves every lane.

A deploy is a fixed series of steps, one function each:

    fetch_source -> detect_kind -> build -> start -> check_health -> switch

How build, start and switch go depends on the kind of project:

- compose: `docker compose up` replaces the project in place; when the new
  version fails its health check, the previous sha is brought up again.
- dockerfile: an image dockrune/<app>:<sha>; the new container starts beside
  the old one on a second port, and replaces it only once it answers.
- nitro, procfile, static: a release folder per sha under releases/; the new
  process starts beside the old one on a second port (supervised, see
  supervise.py), and replaces it only once it answers.

Each step narrates into the deploy's own log file ("-----> step"), and every
command it runs streams its output there too.  Commands are argv lists, never
a shell; each runs in its own session so that a timeout kills its whole
process group.
"""

import collections
import datetime
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import store
import supervise

log = logging.getLogger("dockrune.runners")

COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml",
                 "docker-compose.yml")
STATIC_DIRS = ("", "dist", "public", "_site")
NITRO_CONFIGS = ("nuxt.config.ts", "nuxt.config.js", "nuxt.config.mjs",
                 "nuxt.config.mts", "nitro.config.ts", "nitro.config.js")
KINDS = ("compose", "dockerfile", "nitro", "procfile", "static")
PROCESS_KINDS = ("nitro", "procfile", "static")
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

    def __init__(self, path, max_bytes=2_000_000, secrets=(), rotate=False):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rotate and os.path.exists(path) and os.path.getsize(path) > max_bytes:
            # A log that every stop appends to keeps one older file, no more.
            os.replace(path, path + ".1")
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
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as e:
        # A missing tool (npm, docker) is the user's to fix, not a crash.
        raise DeployError("cannot run %s: %s (dockrune doctor checks the tools)"
                          % (argv[0], e.strerror or e)) from None
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
        self.supervisor = supervise.Supervisor(
            store_.run_dir, settings.runtime_log_max_bytes, notify=self.notify)

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
        elif job["action"] == "teardown":
            self.run_teardown(job["app"], job["environment"], job.get("reason", ""))
        else:
            self.run_deploy(job)

    def run_deploy(self, record):
        """Run one deploy to its end; return the final record.  Never raises."""
        app, env, deploy_id = record["app"], record["environment"], record["id"]
        started = time.monotonic()
        carried = {"candidates": record["candidates"]} if record.get("candidates") else {}
        record = self.store.update_deploy(deploy_id, status="running",
                                          started_at=store.utcnow(), **carried)
        # What serves now keeps its route while this deploy runs (see proxy.py).
        before = self.store.environment(app, env) or {}
        serving = before.get("status") in ("live", "failing") or (
            before.get("status") == "deploying" and bool(before.get("serving")))
        self.store.update_environment(app, env, running=deploy_id, queued=None,
                                      status="deploying", serving=serving)
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
        try:
            return self._finish(record, status, error, facts,
                                time.monotonic() - started)
        except OSError as e:
            # A full disk: the state says "deploying" until the next start marks
            # it interrupted; the people watching hear of it now.
            log.exception("deploy %s of %s/%s: cannot record its end", deploy_id,
                          app, env)
            record = dict(record, **facts)
            record.update(status="failed", finished_at=store.utcnow(),
                          error="cannot record the end of the deploy (%s): %s"
                          % (status, e.strerror or e))
            self.notify("failed", record)
            return record

    def _finish(self, record, status, error, facts, seconds):
        app, env, deploy_id = record["app"], record["environment"], record["id"]
        done = dict(record, **facts)
        if status == "live" and done.get("domain") and done.get("port"):
            # Route first: whoever sees "live" can reach it through the proxy.
            self.sync_routes(done, {(app, env): {"port": done["port"],
                                                 "domain": done["domain"]}})
        record = self.store.update_deploy(
            deploy_id, status=status, error=error, finished_at=store.utcnow(),
            duration=round(seconds, 1), **facts)
        fields = {"running": None, "last_deploy": deploy_id, "port": record.get("port"),
                  "domain": record.get("domain"), "url": record.get("url")}
        if status == "live":
            fields.update(status="live", sha=record["sha"], ref=record["ref"],
                          deployed_at=record["finished_at"], live_deploy=deploy_id,
                          kind=record.get("kind"))
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
        kind, why = detect_kind(ctx.checkout, ctx.settings.get("TYPE"), ctx.settings)
        dlog.step("%s: %s" % (kind, why))
        facts["kind"] = kind
        self.store.update_deploy(record["id"], kind=kind)
        dlog.blank()
        DEPLOY_KINDS[kind](ctx, facts)
        dlog.blank()
        prune_releases(ctx)
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
        if env != "production":
            settings = self.preview_settings(app, env, record, settings)
        return DeployContext(self, record, settings, dlog)

    def preview_settings(self, app, env, record, settings):
        """Return the settings of preview app/env: the app's, its overrides, and
        PREVIEW=1, PREVIEW_URL, PR_NUMBER; its own port and domain.

        apps/<app>.preview.env overrides the app's keys in every preview.  The
        port comes from DOCKRUNE_PREVIEW_PORT_RANGE, held until teardown; the
        domain from PREVIEW_DOMAIN (default "{env}.{domain}").
        """
        path = os.path.join(self.store.apps_dir, app + ".preview.env")
        try:
            merged = dict(settings, **store.read_env_file(path))
        except store.EnvFileError as e:
            raise DeployError(str(e)) from e
        low, high = self.settings.preview_port_range
        try:
            port = self.store.allocate_port("%s/%s" % (app, env), low, high)
        except store.StoreError as e:
            raise DeployError("%s: widen DOCKRUNE_PREVIEW_PORT_RANGE" % e) from None
        merged["PORT"] = str(port)
        merged["DOMAIN"] = preview_domain(app, env, merged, self.settings)
        merged["PREVIEW"] = "1"
        merged["PREVIEW_URL"] = ("https://%s" % merged["DOMAIN"] if merged["DOMAIN"]
                                 else "http://127.0.0.1:%d" % port)
        # From the name, so that a redeploy or a resumed deploy keeps it too.
        number = re.fullmatch(r"pr-([0-9]+)", env)
        if number:
            merged["PR_NUMBER"] = number.group(1)
        return merged

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
        """Stop app/env whatever its kind, and remember it as stopped."""
        dlog = DeployLog(os.path.join(self.store.logs_dir, app, "stop.log"),
                         self.settings.log_max_bytes, secrets=self.settings.secrets(),
                         rotate=True)
        try:
            dlog.step("stopping %s (%s)" % (app, env))
            stop_runtimes(self, app, env, dlog, keep=None)
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

    def run_teardown(self, app, env, reason):
        """Remove preview app/env completely: runtime, volumes, files, port, route."""
        if env == "production":
            raise DeployError("production is stopped, never torn down")
        dlog = DeployLog(os.path.join(self.store.logs_dir, app, "teardown.log"),
                         self.settings.log_max_bytes, secrets=self.settings.secrets(),
                         rotate=True)
        try:
            dlog.step("tearing down %s (%s): %s" % (app, env, reason))
            stop_runtimes(self, app, env, dlog, keep="compose")
            compose_down(self, app, env, dlog, volumes=True)
            for path in (os.path.join(self.store.src_dir, app, env),
                         os.path.join(self.store.home, "releases", app, env)):
                shutil.rmtree(path, ignore_errors=True)
            for key in ("%s/%s" % (app, env), "%s/%s/next" % (app, env)):
                self.store.release_port(key)
            summary = self.store.environment(app, env) or {
                "app": app, "environment": env}
            self.store.remove_environment(app, env)
            self.sync_routes(summary)
            log.info("tore down %s/%s: %s", app, env, reason)
            self.notify("torn-down", dict(summary, status="stopped", reason=reason))
        finally:
            dlog.close()

    def rollback_target(self, app, env, deploy_id=None):
        """Return the deploy record a rollback of app/env goes back to.

        With deploy_id, that deploy (it must be of app/env and have gone
        live once); without, the newest deploy that went live before the one
        live now, with another sha.  Raises DeployError when there is none.
        """
        summary = self.store.environment(app, env) or {}
        if deploy_id:
            record = self.store.deploy(deploy_id)
            if (record is None or record["app"] != app
                    or record["environment"] != env):
                raise DeployError("no deploy %r of %s (%s)" % (deploy_id, app, env))
            if record["status"] != "live":
                raise DeployError("deploy %s never went live: nothing to roll back "
                                  "to" % deploy_id)
            return record
        current = summary.get("live_deploy")
        for record in self.store.history(app, limit=self.store.keep_deploys):
            if (record["environment"] == env and record["status"] == "live"
                    and record["id"] != current and record["sha"]
                    and record["sha"] != summary.get("sha")):
                return record
        raise DeployError("%s (%s) has no earlier live deploy to roll back to"
                          % (app, env))

    def new_rollback(self, app, env, deploy_id=None):
        """Record a queued deploy that brings back an earlier live version."""
        target = self.rollback_target(app, env, deploy_id)
        return self.new_deploy(app, env, target["sha"], target.get("ref"),
                               "rollback", rollback_to=target["id"])


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
        self.releases = os.path.join(self.store.home, "releases", self.app, self.env)
        self.supervisor = deployer.supervisor
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
        return self._allocate("%s/%s" % (self.app, self.env))

    def _allocate(self, key):
        low, high = self.global_settings.port_range
        taken = [int(s["PORT"]) for s in self.store.load_apps().values()
                 if s.get("PORT", "").isdigit()]
        try:
            return self.store.allocate_port(key, low, high, taken=taken)
        except store.StoreError as e:
            raise DeployError("%s: widen DOCKRUNE_PORT_RANGE" % e) from None

    def second_port(self):
        """Return the port the new version is tried on beside the old one."""
        port = self._allocate("%s/%s/next" % (self.app, self.env))
        if port == self.port:
            raise DeployError("the second port of %s is its own PORT=%d: remove "
                              "%s/%s/next from state/ports.json"
                              % (self.app, port, self.app, self.env))
        return port

    def previous(self):
        """Return (sha, kind) of the version live before this deploy, or Nones."""
        summary = self.store.environment(self.app, self.env) or {}
        if not summary.get("live_deploy"):
            return None, None
        return summary.get("sha"), summary.get("kind")

    def log_path(self):
        """Return the runtime log of the app's own processes."""
        return os.path.join(self.store.logs_dir, self.app,
                            "%s.runtime.log" % self.env)

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
                   DOCKRUNE_ENVIRONMENT=self.env, DOCKRUNE_SHA=self.sha or "")
        return env


def preview_domain(app, env, settings, global_settings):
    """Return the domain of preview env, or "" when there is nothing to base it on."""
    template = settings.get("PREVIEW_DOMAIN") or "{env}.{domain}"
    domain = settings.get("DOMAIN") or (
        "%s.%s" % (app, global_settings.base_domain) if global_settings.base_domain
        else "")
    if "{domain}" in template and not domain:
        return ""
    return template.replace("{env}", env).replace("{app}", app).replace(
        "{domain}", domain).lower()


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


def git_environment(git_url, token, token_base="https://github.com"):
    """Return the environment for git: no prompts, few protocols, token in env.

    The token travels as an http extraheader given through GIT_CONFIG_*
    variables, so it is never part of a URL, an argv or .git/config; and only
    to the host it belongs to (token_base, DOCKRUNE_GIT_BASE_URL), never to
    another https remote an app's GIT_URL names.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKRUNE_")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_ALLOW_PROTOCOL="https:ssh:file",
               GIT_ASKPASS="true", SSH_ASKPASS="true")
    host = "/".join(git_url.split("/", 3)[:3]) + "/"
    if token and git_url.startswith("https://") and host.lower() == (
            "/".join(token_base.split("/", 3)[:3]) + "/").lower():
        import base64
        basic = base64.b64encode(("x-access-token:%s" % token).encode()).decode()
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
    env = git_environment(url, ctx.global_settings.github_token,
                          ctx.global_settings.git_base_url)
    if not os.path.isdir(os.path.join(ctx.checkout, ".git")):
        os.makedirs(ctx.checkout, exist_ok=True)
        ctx.run(["git", "init", "--quiet", "--", ctx.checkout], env=env)
    git = ["git", "-C", ctx.checkout]
    if ctx.sha is None:
        resolve_ref(ctx, url, env)
    else:
        ctx.run(git + ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                       "--", url, ctx.sha], env=env)
    if ctx.record.get("trigger") in ("push", "poll"):
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


def detect_kind(checkout, forced=None, settings=None):
    """Return (kind, reason) for the project in checkout; raise DeployError if none.

    settings are the app's: START= or BUILD= there make a procfile project.
    """
    settings = settings or {}
    if forced:
        if forced not in KINDS:
            raise DeployError("TYPE=%r is not one of %s" % (forced, ", ".join(KINDS)))
        found = _kind_reason(checkout, forced, settings)
        if found is None and forced in ("compose", "dockerfile", "static"):
            raise DeployError("TYPE=%s, but there is no %s" % (forced, {
                "compose": "compose file", "dockerfile": "Dockerfile",
                "static": "index.html"}[forced]))
        return forced, "TYPE=%s in the app's settings%s" % (
            forced, " (found %s)" % found.split(" ", 1)[1] if found else "")
    for kind in KINDS:
        reason = _kind_reason(checkout, kind, settings)
        if reason:
            return kind, reason
    raise DeployError("cannot tell what to run: no compose file, Dockerfile, "
                      "nuxt config, Procfile, START= or index.html at the top level")


def _kind_reason(checkout, kind, settings):
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
        if has("Procfile"):
            return "found Procfile"
        found = [k + "=" for k in ("START", "BUILD") if settings.get(k, "").strip()]
        return "found %s in the app's settings" % " and ".join(found) if found else None
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


def find_compose_file(checkout):
    """Return the name of the compose file in checkout, or None."""
    return next((f for f in COMPOSE_FILES
                 if os.path.isfile(os.path.join(checkout, f))), None)


def _host_environment():
    """Return dockrune's environment without its own settings, for tools."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DOCKRUNE_")}


def _quiet(argv, timeout=60, env=None):
    """Run a read-only query; return (exit code, stdout text); never raises."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    return done.returncode, done.stdout.decode("utf-8", "replace").strip()


# -- compose: replaced in place, the previous sha brought back on failure ----------


def check_preview_compose(ctx, compose_file, loopback=True):
    """Refuse a preview's compose file that cannot run twice or is not safe.

    The file is read as `docker compose config` renders it (variables filled
    in).  Its output may hold the app's secrets, so it is never logged.
    loopback=False: ports beyond 127.0.0.1 are allowed (a swarm's host-mode
    ports cannot bind it).
    """
    ctx.dlog.step("checking %s for a preview" % compose_file)
    argv = compose_command() + ["-f", compose_file, "-p", ctx.project, "config"]
    try:
        done = subprocess.run(argv, cwd=ctx.checkout, env=ctx.app_environment(),
                              capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=min(120, ctx.remaining()),
                              start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DeployError("%s failed: %s" % (" ".join(argv), e)) from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-2:]
        raise DeployError("%s exited %d: %s" % (" ".join(argv), done.returncode,
                                               ctx.dlog.redact(" | ".join(tail))))
    problems = list(dict.fromkeys(scan_compose_config(
        done.stdout.decode("utf-8", "replace"), ctx.port, loopback)))
    if problems:
        raise DeployError("; ".join(problems))


_HOST_MODES = ("network_mode", "pid", "ipc", "userns_mode", "uts")
_PUBLISHED_RE = re.compile(r"published:\s*['\"]?(\d+)|"
                           r"^-\s*['\"]?(?:[\d.]+:|\[[^\]]*\]:)?(\d+):\d+")
_BIND_RE = re.compile(r"^-\s*['\"]?(/[^:'\"]*):|source:\s*['\"]?(/[^'\"\s]*)")


def scan_compose_config(text, port, loopback=True):
    """Return what makes a rendered compose config unfit for a preview.

    A host port other than the preview's own PORT cannot be published twice;
    privileged mode, the host's network, pid, ipc or user namespace, the
    Docker socket or a mount of the host's root give a pull request the host.
    """
    problems, service, section, in_services = [], None, None, False
    items = []      # (service, text) of every list item under ports:
    for raw in text.splitlines():
        line = raw.strip()
        indent = len(raw) - len(raw.lstrip(" "))
        if not line:
            continue
        if indent == 0:
            in_services, service = line == "services:", None
            continue
        if not in_services:
            continue
        if indent == 2 and line.endswith(":"):
            service, section = line[:-1].strip("'\""), None
            continue
        if service is None:
            continue
        if indent == 4 and not line.startswith("-"):
            key, _, value = line.partition(":")
            value = value.strip().strip("'\"")
            section = None if value else key
            if key == "privileged" and value == "true":
                problems.append("service %s asks for privileged mode, which "
                                "previews may not have" % service)
            if key in _HOST_MODES and value == "host":
                problems.append("service %s asks for %s: host, which previews may "
                                "not have" % (service, key))
            continue
        if section == "ports":
            if line.startswith("-"):
                items.append((service, line[1:].strip()))
            elif items:
                items[-1] = (service, items[-1][1] + "\n" + line)
        problems.extend(_section_problem(service, section, line, port))
    for service, item in items if loopback else ():
        problems.extend(_port_problem(service, item))
    return problems


# [host ip:][published:]target[/protocol], as compose renders a short port.
_SHORT_PORT_RE = re.compile(r"^['\"]?(?:(\[[^\]]*\]|\d+\.[\d.]+):)?"
                            r"(?:(\d+(?:-\d+)?):)?\d+(?:-\d+)?(?:/\w+)?['\"]?$")


def _port_problem(service, item):
    """Return why one rendered ports: item publishes beyond 127.0.0.1, if it does."""
    fields = dict(_field(line) for line in item.splitlines() if ":" in line)
    if "target" in fields:
        host_ip, published = fields.get("host_ip", ""), fields.get("published")
    else:
        match = _SHORT_PORT_RE.match(item)
        if match is None:
            return ["service %s: cannot read its port %r" % (service, item[:60])]
        host_ip, published = (match.group(1) or "").strip("[]"), match.group(2)
    if host_ip in ("127.0.0.1", "::1"):
        return []
    return ["service %s publishes %s on every interface, past the host's firewall: "
            "publish \"127.0.0.1:${PORT}:<container port>\" instead"
            % (service, "port %s" % published if published else "a random port")]


def _field(line):
    key, _, value = line.partition(":")
    return key.strip(), value.strip().strip("'\"")


def _section_problem(service, section, line, port):
    if section == "ports":
        match = _PUBLISHED_RE.search(line)
        published = match and (match.group(1) or match.group(2))
        if published and int(published) != port:
            return ["service %s publishes the fixed host port %s, which cannot run "
                    "twice: publish \"127.0.0.1:${PORT}:<container port>\" instead"
                    % (service, published)]
    if section == "volumes":
        if "docker.sock" in line:
            return ["service %s mounts the Docker socket, which previews may not"
                    % service]
        match = _BIND_RE.search(line)
        source = match and (match.group(1) or match.group(2))
        top = source and "/" + os.path.normpath(source).strip("/")
        if top == "/":
            return ["service %s mounts the host's root, which previews may not"
                    % service]
        if top and any(top == d or top.startswith(d + "/") for d in _HOST_DIRS):
            return ["service %s mounts the host's %s, which previews may not"
                    % (service, top)]
    if section == "devices":
        return ["service %s asks for host devices, which previews may not have"
                % service]
    if section == "cap_add" and line.strip("-'\" ").upper() in _HOST_CAPS:
        return ["service %s asks for the capability %s, which previews may not have"
                % (service, line.strip("-'\" "))]
    return []


# Host directories a preview may not mount: the system, and Docker's socket.
_HOST_DIRS = ("/etc", "/proc", "/sys", "/dev", "/boot", "/root", "/run", "/var/run",
              "/var/lib/docker", "/usr", "/bin", "/sbin", "/lib")
_HOST_CAPS = ("ALL", "SYS_ADMIN", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO", "NET_ADMIN",
              "DAC_READ_SEARCH")


def deploy_compose(ctx, facts):
    """Bring the compose project up; if it fails its health check, roll back."""
    import swarm    # here: swarm builds on this module's steps
    on_swarm = swarm.engine_of(ctx.settings, ctx.global_settings) == "swarm"
    if ctx.env != "production":
        check_preview_compose(ctx, find_compose_file(ctx.checkout), not on_swarm)
        ctx.dlog.blank()
    if on_swarm:
        return swarm.deploy_stack(ctx, facts)
    if (ctx.store.environment(ctx.app, ctx.env) or {}).get("engine"):
        ctx.store.update_environment(ctx.app, ctx.env, engine=None)
    old_sha, old_kind = ctx.previous()
    stop_runtimes(ctx.deployer, ctx.app, ctx.env, ctx.dlog, keep="compose")
    compose_up(ctx, find_compose_file(ctx.checkout))
    facts["started"] = True
    ctx.dlog.blank()
    try:
        check_health(ctx)
    except DeployError as e:
        if not old_sha or old_sha == ctx.sha or old_kind != "compose":
            raise
        ctx.dlog.blank()
        try:
            rollback_compose(ctx, old_sha)
        except DeployError as again:
            raise DeployError("%s; the rollback to %s failed too: %s"
                              % (e, old_sha[:12], again)) from None
        facts["started"] = False
        raise DeployError("%s; rolled back to %s" % (e, old_sha[:12])) from None
    # After the health check, so that the check costs a push no time to live.
    check_loopback_ports(ctx)


_LOOPBACK_RE = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|::1):")


def check_loopback_ports(ctx):
    """Take the project down if Docker publishes one of its ports beyond loopback.

    Docker's published ports go around the host's firewall, so an app must be
    reached through 127.0.0.1 (and the proxy) only.  PUBLIC_PORTS=on in the
    app's .env allows it for an operator who means it.
    """
    if ctx.settings.get("PUBLIC_PORTS", "off").strip().lower() in ("on", "yes", "1",
                                                                   "true"):
        return
    code, out = _quiet(["docker", "ps", "--filter",
                        "label=com.docker.compose.project=%s" % ctx.project,
                        "--format", "{{.Names}}\t{{.Ports}}"])
    if code != 0:
        return
    exposed = []
    for line in out.splitlines():
        name, _, ports = line.partition("\t")
        exposed += ["%s %s" % (name, p.strip()) for p in ports.split(",")
                    if "->" in p and not _LOOPBACK_RE.match(p.strip())]
    if not exposed:
        return
    ctx.dlog.step("publishes ports beyond 127.0.0.1: %s" % "; ".join(exposed))
    compose_down(ctx.deployer, ctx.app, ctx.env, ctx.dlog)
    raise DeployError("%s: published on every interface, past the host's firewall; "
                      "publish \"127.0.0.1:${PORT}:<container port>\" (or set "
                      "PUBLIC_PORTS=on)" % exposed[0])


def rollback_compose(ctx, sha):
    """Check out sha again and bring its compose project back up."""
    ctx.dlog.step("rolling back to %s" % sha[:12])
    git = ["git", "-C", ctx.checkout]
    env = git_environment("", None)
    ctx.run(git + ["checkout", "--quiet", "--force", "--detach", sha, "--"], env=env)
    ctx.run(git + ["clean", "-ffdq"], env=env)
    compose_up(ctx, find_compose_file(ctx.checkout))
    check_health(ctx)
    ctx.dlog.step("%s serves again" % sha[:12])


def compose_up(ctx, compose_file):
    """Build and (re)start the app's compose project."""
    if compose_file is None:
        raise DeployError("no compose file (%s) at the top level"
                          % ", ".join(COMPOSE_FILES))
    check_docker(ctx)
    ctx.dlog.step("building and starting %s (docker compose, %s)"
                  % (ctx.project, compose_file))
    argv = compose_command() + ["-f", compose_file, "-p", ctx.project, "up", "-d",
                                "--build", "--remove-orphans"]
    ctx.run(argv, cwd=ctx.checkout, env=ctx.app_environment())


def compose_down(deployer, app, env, dlog, volumes=False):
    """Stop and remove the app's compose project (its volumes too, if asked).

    Without a compose file in the checkout (the project changed kind), the
    project's containers and default network are removed by their labels.
    """
    project = compose_project(app, env)
    if shutil.which("docker") is None:
        return
    _compose_down(deployer, app, env, dlog, project, volumes)
    if volumes:
        # A project stopped earlier has no containers left, but its volumes.
        code, names = _quiet(["docker", "volume", "ls", "-q", "--filter",
                              "label=com.docker.compose.project=%s" % project])
        if code == 0 and names:
            run_command(["docker", "volume", "rm", "--force"] + names.split(), dlog,
                        timeout=120)


def _compose_down(deployer, app, env, dlog, project, volumes):
    code, ids = _quiet(["docker", "ps", "-aq", "--filter",
                        "label=com.docker.compose.project=%s" % project])
    if code != 0 or not ids:
        return
    checkout = os.path.join(deployer.store.src_dir, app, env)
    found = find_compose_file(checkout)
    if found is None:
        run_command(["docker", "rm", "--force", "--volumes"] + ids.split(), dlog,
                    timeout=120)
        _quiet(["docker", "network", "rm", project + "_default"])
        return
    environment = _host_environment()
    try:
        environment.update(deployer.store.load_app(app) or {})
    except store.EnvFileError:
        pass
    environment.setdefault("PORT", "0")
    run_command(compose_command() + ["-f", found, "-p", project, "down",
                                     "--remove-orphans"] + (["--volumes"] if volumes
                                                            else []),
                dlog, timeout=300, cwd=checkout, env=environment)


# -- dockerfile: an image per sha, a container beside the old one ------------------


def image_name(app, sha):
    return "dockrune/%s:%s" % (store.sanitize_name(app), sha)


def container_name(app, env, slot="live"):
    """Return dockrune-<app>[-<env>], with -next for a candidate."""
    name = compose_project(app, env)
    return name if slot == "live" else name + "-next"


def deploy_dockerfile(ctx, facts):
    """Build the image, try it on a second port, then let it replace the old one."""
    image = image_name(ctx.app, ctx.sha)
    check_docker(ctx)
    build_image(ctx, image)
    inner = container_port(ctx, image)
    ctx.dlog.blank()

    # The old container keeps serving until the new one has answered.
    second = ctx.second_port()
    candidate = container_name(ctx.app, ctx.env, "next")
    ctx.dlog.step("starting %s beside the old version on port %d" % (image, second))
    remove_container(ctx.dlog, candidate)
    try:
        run_container(ctx, image, candidate, second, inner, "no")
        check_health(ctx, port=second, alive=lambda: container_running(candidate))
    except DeployError:
        _log_container_tail(ctx.dlog, candidate)
        remove_container(ctx.dlog, candidate)
        raise
    ctx.dlog.blank()
    hand_over(ctx, second, lambda: switch_container(ctx, image, inner, facts),
              lambda: remove_container(ctx.dlog, candidate))


def switch_container(ctx, image, inner, facts):
    """Replace the live container with one of image; on failure, bring back the old."""
    name = container_name(ctx.app, ctx.env)
    code, old_image = _quiet(["docker", "container", "inspect", "--format",
                              "{{.Config.Image}}", name])
    old_image = old_image if code == 0 and old_image != image else None
    ctx.dlog.step("switching port %d to %s" % (ctx.port, image))
    stop_runtimes(ctx.deployer, ctx.app, ctx.env, ctx.dlog, keep="dockerfile")
    remove_container(ctx.dlog, name)
    facts["started"] = True
    try:
        wait_port_free(ctx.port)
        run_container(ctx, image, name, ctx.port, inner, "unless-stopped")
        check_health(ctx, alive=lambda: container_running(name))
    except DeployError as e:
        _log_container_tail(ctx.dlog, name)
        if not old_image:
            raise
        ctx.dlog.step("starting the previous image %s again" % old_image)
        remove_container(ctx.dlog, name)
        try:
            run_container(ctx, old_image, name, ctx.port,
                          container_port(ctx, old_image), "unless-stopped")
            check_health(ctx, alive=lambda: container_running(name))
        except DeployError as again:
            raise DeployError("%s; %s did not start again either: %s"
                              % (e, old_image, again)) from None
        facts["started"] = False
        raise DeployError("%s; %s serves again" % (e, old_image)) from None


def build_image(ctx, image):
    """Build image from the checkout's Dockerfile, unless it exists already."""
    if _quiet(["docker", "image", "inspect", image])[0] == 0:
        ctx.dlog.step("%s is already built" % image)
        return
    ctx.dlog.step("building %s (docker build)" % image)
    ctx.run(["docker", "build", "--tag", image, "--label",
             "dockrune.app=%s" % ctx.app, "--file", "Dockerfile", "."],
            cwd=ctx.checkout, env=_host_environment())


def container_port(ctx, image):
    """Return the port the app listens on inside its container.

    CONTAINER_PORT when the app sets it, else the one port the image
    EXPOSEs, else the app's own PORT (handed to the container as PORT).
    """
    value = ctx.settings.get("CONTAINER_PORT", "")
    if value:
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise DeployError("CONTAINER_PORT=%r is not a port number" % value)
        return int(value)
    code, out = _quiet(["docker", "image", "inspect", "--format",
                        "{{json .Config.ExposedPorts}}", image])
    try:
        exposed = json.loads(out) if code == 0 else None
    except ValueError:
        exposed = None
    ports = [int(k.split("/")[0]) for k in (exposed or {}) if k.endswith("/tcp")]
    return ports[0] if len(ports) == 1 else ctx.port


def run_container(ctx, image, name, port, inner, restart):
    """Run image as name with port published on 127.0.0.1 only.

    The app's variables reach the container through the docker command's own
    environment (`--env KEY`), so their values never appear in an argv.
    """
    variables = dict(ctx.settings, PORT=str(inner), DOCKRUNE_APP=ctx.app,
                     DOCKRUNE_ENVIRONMENT=ctx.env, DOCKRUNE_SHA=ctx.sha or "")
    argv = ["docker", "run", "--detach", "--name", name, "--restart", restart,
            "--publish", "127.0.0.1:%d:%d" % (port, inner),
            "--label", "dockrune.app=%s" % ctx.app,
            "--label", "dockrune.environment=%s" % ctx.env]
    for key in sorted(variables):
        argv += ["--env", key]
    ctx.run(argv + [image], env=dict(_host_environment(), **variables), timeout=120)


def container_running(name):
    code, out = _quiet(["docker", "container", "inspect", "--format",
                        "{{.State.Running}}", name], timeout=30)
    return code == 0 and out == "true"


def remove_container(dlog, name):
    """Remove the container called name, if there is one."""
    if _quiet(["docker", "container", "inspect", name], timeout=30)[0] != 0:
        return
    try:
        run_command(["docker", "rm", "--force", name], dlog, timeout=120)
    except DeployError:
        # Someone else (a stop, docker itself) may have removed it meanwhile.
        if _quiet(["docker", "container", "inspect", name], timeout=30)[0] == 0:
            raise


def _log_container_tail(dlog, name):
    code, out = _quiet(["docker", "logs", "--tail", "20", name], timeout=30)
    if code == 0 and out:
        dlog.line("last lines from %s:" % name, force=True)
        for line in out.splitlines():
            dlog.line("  " + line, force=True)


# -- nitro, procfile, static: a release folder and a supervised process ------------


def deploy_nitro(ctx, facts):
    """Build with npm (unless .output is committed); run node .output/server."""
    release = make_release(ctx, build_nitro)
    entry = os.path.join(release, ".output", "server", "index.mjs")
    host = ctx.settings.get("HOST") or "127.0.0.1"

    def launch(port):
        env = ctx.app_environment()
        env.update(PORT=str(port), NITRO_PORT=str(port), HOST=host,
                   NITRO_HOST=ctx.settings.get("NITRO_HOST") or host,
                   NODE_ENV=ctx.settings.get("NODE_ENV") or "production")
        return ["node", entry], env

    release_process(ctx, "nitro", release, launch, facts)


def build_nitro(ctx, dest):
    """Install dependencies (dev ones too), build, and keep .output in dest."""
    output = os.path.join(ctx.checkout, ".output")
    if is_tracked(ctx.checkout, ".output/server/index.mjs"):
        ctx.dlog.step("building nothing: .output/server/index.mjs is committed")
    else:
        lock = any(os.path.isfile(os.path.join(ctx.checkout, name))
                   for name in ("package-lock.json", "npm-shrinkwrap.json"))
        install = "ci" if lock else "install"
        ctx.dlog.step("installing dependencies (npm %s%s)" % (
            install, "" if lock else ": there is no package-lock.json"))
        env = ctx.app_environment()
        ctx.run(["npm", install, "--include=dev", "--no-audit", "--no-fund"],
                cwd=ctx.checkout, env=env)
        # A stale build must never pass for this one.
        shutil.rmtree(output, ignore_errors=True)
        ctx.dlog.step("building (npm run build)")
        ctx.run(["npm", "run", "build"], cwd=ctx.checkout, env=env)
    if not os.path.isfile(os.path.join(output, "server", "index.mjs")):
        raise DeployError("there is no .output/server/index.mjs after the build: "
                          "is this a Nuxt 3+ or Nitro app?")
    os.makedirs(dest)
    shutil.copytree(output, os.path.join(dest, ".output"), symlinks=True)


def deploy_procfile(ctx, facts):
    """Run BUILD= in a release folder, then supervise START= or Procfile web:."""
    command, source = start_command(ctx)
    ctx.dlog.line("web process from %s: %s" % (source, command), force=True)
    if source == "START=" and str(ctx.port) in re.findall(r"[0-9]+", command):
        # The .env file expands $PORT itself, to the live port: the version
        # tried beside it would then ask for a port that is taken.
        ctx.dlog.line("START= names port %d literally: put it in single quotes in "
                      "the app's .env (START='... $PORT') so that each version "
                      "gets its own port" % ctx.port, force=True)
    release = make_release(ctx, build_procfile)

    def launch(port):
        env = ctx.app_environment()
        env["PORT"] = str(port)
        return split_command(command, env, source), env

    launch(ctx.port)    # a command that cannot be split fails before anything stops
    release_process(ctx, "procfile", release, launch, facts)


def build_procfile(ctx, dest):
    export_tree(ctx, dest)
    build = ctx.settings.get("BUILD", "").strip()
    if not build:
        return
    ctx.dlog.step("building (BUILD=%s)" % build)
    env = ctx.app_environment()
    ctx.run(split_command(build, env, "BUILD="), cwd=dest, env=env)


def start_command(ctx):
    """Return (command, where it came from): START=, else the Procfile's web:."""
    start = ctx.settings.get("START", "").strip()
    if start:
        return start, "START="
    web = read_procfile(os.path.join(ctx.checkout, "Procfile")).get("web")
    if web:
        return web, "Procfile web:"
    raise DeployError("nothing to start: set START= in %s or add a 'web:' line "
                      "to the Procfile" % ctx.store.app_path(ctx.app))


_PROCFILE_RE = re.compile(r"^([A-Za-z0-9_-]+)\s*:\s*(.*)$")


def read_procfile(path):
    """Return {process type: command} from the Procfile at path ({} if none)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    found = {}
    for line in lines:
        match = _PROCFILE_RE.match(line.strip())
        if match and not line.lstrip().startswith("#") and match.group(2):
            found.setdefault(match.group(1), match.group(2).strip())
    return found


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}"
                     r"|\$([A-Za-z_][A-Za-z0-9_]*)")


def split_command(command, env, source):
    """Split command like a shell would, then expand $VAR and ${VAR} from env.

    ${VAR:-default} gives default when VAR is empty or unset; an unknown
    variable becomes empty, and a word that was only such a variable goes
    away, as it does in a shell.  Nothing else of a shell happens: no
    pipes, globs, redirections or command substitution.
    """
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise DeployError("cannot split %s %r: %s" % (source, command, e)) from None

    def expand(match):
        name = match.group(1) or match.group(3)
        return env.get(name) or (match.group(2) or "")

    argv = [w for w in (_VAR_RE.sub(expand, word) for word in words) if w]
    if not argv:
        raise DeployError("%s %r is empty once expanded" % (source, command))
    return argv


def deploy_static(ctx, facts):
    """Serve the folder holding index.html with dockrune's static server."""
    folder = next(d for d in STATIC_DIRS
                  if os.path.isfile(os.path.join(ctx.checkout, d, "index.html")))
    release = make_release(ctx, export_tree)
    root = os.path.join(release, folder)
    host = ctx.settings.get("HOST") or "127.0.0.1"

    def launch(port):
        env = ctx.app_environment()
        env["PORT"] = str(port)
        return [sys.executable, STATIC_SERVER, "static", root, "--port", str(port),
                "--host", host], env

    release_process(ctx, "static", release, launch, facts)


STATIC_SERVER = os.path.abspath(supervise.__file__)


def make_release(ctx, build):
    """Return the release folder of ctx.sha, calling build(ctx, folder) if missing.

    A release is built in a temporary folder and renamed into place, so a
    folder under its sha is always complete.
    """
    final = os.path.join(ctx.releases, ctx.sha)
    if os.path.isdir(final):
        ctx.dlog.step("release %s is already built" % ctx.sha[:12])
        os.utime(final)
        return final
    os.makedirs(ctx.releases, exist_ok=True)
    temporary = "%s.tmp-%s" % (final, secrets.token_hex(3))
    try:
        build(ctx, temporary)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def export_tree(ctx, dest):
    """Copy the files git tracks at the checked-out commit into dest."""
    ctx.dlog.step("copying the files of %s into a new release" % ctx.sha[:12])
    code = subprocess.run(["git", "-C", ctx.checkout, "ls-files", "-z", "--cached"],
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    if code.returncode != 0:
        raise DeployError("git ls-files failed in %s" % ctx.checkout)
    os.makedirs(dest)
    for raw in code.stdout.split(b"\0"):
        if not raw:
            continue
        name = os.fsdecode(raw)
        source, target = os.path.join(ctx.checkout, name), os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isfile(source):
            shutil.copy2(source, target)


def is_tracked(checkout, path):
    """Tell whether git tracks path (relative to checkout) at HEAD."""
    return _quiet(["git", "-C", checkout, "ls-files", "--error-unmatch", "--",
                   path], timeout=30)[0] == 0


def release_process(ctx, kind, release, launch, facts):
    """Try the release on a second port, then let it replace the old process.

    launch(port) returns (argv, environment) for the release on that port.
    A procfile's argv is not logged: expanded, it may hold the app's secrets.
    """
    sup, app, env = ctx.supervisor, ctx.app, ctx.env
    second = ctx.second_port()
    ctx.dlog.step("starting the new version beside the old one on port %d" % second)
    sup.stop(app, env, "next")
    argv, environ = launch(second)
    if kind != "procfile":
        ctx.dlog.line("$ " + ctx.dlog.redact(shlex.join(argv)), force=True)
    try:
        start_process(ctx, "next", argv, release, environ, kind=kind, sha=ctx.sha,
                      deploy=ctx.record["id"], port=second)
        check_health(ctx, port=second, alive=lambda: sup.alive(app, env, "next"))
    except DeployError:
        _log_runtime_tail(ctx)
        sup.stop(app, env, "next")
        raise
    ctx.dlog.blank()
    hand_over(ctx, second, lambda: switch_process(ctx, kind, release, launch, facts),
              lambda: sup.stop(app, env, "next"))


def switch_process(ctx, kind, release, launch, facts):
    """Stop the old process, start the release on the app's port, check it."""
    sup, app, env = ctx.supervisor, ctx.app, ctx.env
    old = sup.get(app, env, "live")
    ctx.dlog.step("switching port %d to the new version" % ctx.port)
    stop_runtimes(ctx.deployer, app, env, ctx.dlog, keep=kind)
    if old is not None:
        sup.remember_previous(old)
    sup.stop(app, env, "live")
    facts["started"] = True
    argv, environ = launch(ctx.port)
    try:
        wait_port_free(ctx.port)
        start_process(ctx, "live", argv, release, environ, kind=kind, sha=ctx.sha,
                      deploy=ctx.record["id"], port=ctx.port)
        check_health(ctx, alive=lambda: sup.alive(app, env, "live"))
        sup.forget_previous(app, env)
    except DeployError as e:
        _log_runtime_tail(ctx)
        sup.stop(app, env, "live")
        sup.forget_previous(app, env)
        if old is None:
            raise
        ctx.dlog.step("starting the previous version (%s) again"
                      % (old.get("sha") or "?")[:12])
        facts_old = {k: old.get(k) for k in ("kind", "sha", "deploy", "port")}
        try:
            start_process(ctx, "live", old["argv"], old["cwd"], old["env"],
                          **facts_old)
            check_health(ctx, alive=lambda: sup.alive(app, env, "live"))
        except DeployError as again:
            raise DeployError("%s; the previous version did not start again "
                              "either: %s" % (e, again)) from None
        facts["started"] = False
        raise DeployError("%s; the previous version serves again" % e) from None


def hand_over(ctx, second, switch, stop_next):
    """Move the app's port to the new version while the new version serves.

    Without routes, the version tried on the second port is stopped and
    switch() restarts it on the app's port: a short gap.  With routes (Caddy
    and a domain), the proxy is first pointed at the second port, switch()
    then restarts the app's port behind it, and only once the proxy points
    back at the app's port is the second one stopped: no request fails.
    """
    routed = bool(ctx.domain and ctx.deployer.proxy and ctx.deployer.proxy.enabled)
    if routed:
        routed = ctx.deployer.sync_routes(ctx.record, {(ctx.app, ctx.env): {
            "port": second, "domain": ctx.domain}})
    if routed:
        ctx.dlog.step("%s routed to port %d while port %d switches"
                      % (ctx.domain, second, ctx.port))
    else:
        stop_next()
    try:
        switch()
    finally:
        if routed:
            ctx.deployer.sync_routes(ctx.record, {(ctx.app, ctx.env): {
                "port": ctx.port, "domain": ctx.domain}})
            ctx.dlog.step("%s routed to port %d again" % (ctx.domain, ctx.port))
            left = wait_drained(second, _seconds(ctx.settings, "DRAIN_TIMEOUT", 5))
            if left:
                ctx.dlog.line("%d connections to port %d still open: stopping it "
                              "anyway (DRAIN_TIMEOUT)" % (left, second))
            stop_next()


def start_process(ctx, slot, argv, cwd, environ, **facts):
    """Start argv as the app's supervised process in slot; raise DeployError."""
    try:
        return ctx.supervisor.start(ctx.app, ctx.env, slot, argv, cwd, environ,
                                    ctx.log_path(), **facts)
    except OSError as e:
        raise DeployError("cannot start %s: %s" % (argv[0], e.strerror or e)) from None


def _log_runtime_tail(ctx):
    lines = supervise.tail(ctx.log_path())
    if lines:
        ctx.dlog.line("last lines of %s:" % ctx.log_path(), force=True)
        for line in lines:
            ctx.dlog.line("  " + line, force=True)


def wait_drained(port, timeout):
    """Wait until no TCP connection to local port is open; return how many are.

    The proxy's requests that began before its routes moved finish on the old
    upstream: the version behind it is stopped only once they are done.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = _established(port)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _established(port, tables=("/proc/net/tcp", "/proc/net/tcp6")):
    """Count ESTABLISHED connections whose local end is port (Linux /proc)."""
    count = 0
    for table in tables:
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # fields[1] is local "ADDR:PORT" in hex, fields[3] the state.
                    if (len(fields) > 3 and fields[3] == "01"
                            and int(fields[1].rsplit(":", 1)[1], 16) == port):
                        count += 1
        except (OSError, ValueError):
            continue
    return count


def wait_port_free(port, timeout=15):
    """Wait until nothing listens on 127.0.0.1:port; raise DeployError if it stays."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise DeployError("port %d is still taken by another program after "
                              "%ds: stop it, or give the app another PORT="
                              % (port, timeout))
        time.sleep(0.2)


# -- stopping and pruning ----------------------------------------------------------


def stop_runtimes(deployer, app, env, dlog, keep=None):
    """Stop whatever serves app/env, except the runtime of kind keep."""
    if keep not in PROCESS_KINDS:
        for slot in ("next", "live"):
            spec = deployer.supervisor.stop(app, env, slot)
            if spec:
                dlog.line("stopped %s process %s (pid %s)" % (
                    spec.get("kind") or "the", slot, spec.get("pid")), force=True)
        deployer.supervisor.forget_previous(app, env)
    if keep != "dockerfile" and shutil.which("docker"):
        for slot in ("next", "live"):
            remove_container(dlog, container_name(app, env, slot))
    if keep != "compose":
        compose_down(deployer, app, env, dlog)
    if keep != "swarm" and shutil.which("docker"):
        import swarm
        if swarm.remove_stack(app, env, dlog):
            dlog.line("removed the stack %s" % swarm.stack_name(app, env), force=True)


def prune_releases(ctx):
    """Keep the newest DOCKRUNE_KEEP_RELEASES releases and images; drop the rest.

    Called once the deploy went live, before its record says so: the
    version live until now is kept whatever its age, for a rollback.
    """
    keep = max(1, ctx.global_settings.keep_releases)
    previous = ctx.previous()[0]
    in_use = {(ctx.supervisor.get(ctx.app, ctx.env, slot) or {}).get("cwd")
              for slot in ("live", "next")}
    in_use.add(os.path.join(ctx.releases, previous or "-"))
    try:
        names = os.listdir(ctx.releases)
    except FileNotFoundError:
        names = []
    folders = [os.path.join(ctx.releases, n) for n in names]
    for path in [f for f in folders if ".tmp-" in os.path.basename(f)]:
        shutil.rmtree(path, ignore_errors=True)
    folders = sorted((f for f in folders if ".tmp-" not in os.path.basename(f)),
                     key=os.path.getmtime, reverse=True)
    for path in folders[keep:]:
        if path not in in_use:
            ctx.dlog.line("removing old release %s" % os.path.basename(path)[:12],
                          force=True)
            shutil.rmtree(path, ignore_errors=True)
    if shutil.which("docker"):
        _prune_images(ctx, keep, (ctx.sha, previous))


def _prune_images(ctx, keep, kept):
    repository = "dockrune/%s" % store.sanitize_name(ctx.app)
    code, out = _quiet(["docker", "image", "ls", "--format", "{{.Tag}}", repository])
    if code != 0:
        return
    kept = {t for t in kept if t}
    # Newest first; an image a container still uses refuses to go, which is right.
    for tag in [t for t in out.split() if t not in kept][max(0, keep - len(kept)):]:
        if _quiet(["docker", "image", "rm", "%s:%s" % (repository, tag)])[0] == 0:
            ctx.dlog.line("removed old image %s:%s" % (repository, tag[:12]),
                          force=True)


DEPLOY_KINDS = {"compose": deploy_compose, "dockerfile": deploy_dockerfile,
                "nitro": deploy_nitro, "procfile": deploy_procfile,
                "static": deploy_static}


def check_health(ctx, port=None, alive=None):
    """Wait until the app answers 2xx or 3xx on HEALTH_PATH; raise DeployError.

    port defaults to the app's own; alive(), when given, tells whether the
    process being checked still runs: its death fails the check at once,
    and an answer from a port it does not hold does not count.
    """
    port = port or ctx.port
    path = ctx.settings.get("HEALTH_PATH") or "/"
    if not path.startswith("/"):
        path = "/" + path
    url = "http://127.0.0.1:%d%s" % (port, path)
    limit = _seconds(ctx.settings, "HEALTH_TIMEOUT", 60)
    ctx.dlog.step("checking %s (up to %ds)" % (url, limit))
    deadline = min(time.monotonic() + limit, ctx.deadline)
    last = "no answer"
    while True:
        code, last = probe(url)
        running = alive is None or alive()
        if code and 200 <= code < 400 and running:
            ctx.dlog.line("answered %d" % code, force=True)
            return
        if not running:
            raise DeployError("health check failed: the new version exited before "
                              "%s answered (%s)" % (url, last))
        if time.monotonic() >= deadline:
            raise DeployError("health check failed: %s gave %s after %ds"
                              % (url, last, limit))
        time.sleep(0.5)


def probe(url, timeout=3):
    """GET url (http://host:port/path) once; return (status or None, description).

    Plain HTTP/1.0 over a socket rather than urllib: the health checker calls
    this for every live app, and loading urllib (http.client, email, ssl) would
    be a good part of dockrune's idle memory.  A redirect is an answer, not
    something to follow.
    """
    parts = urllib.parse.urlsplit(url)
    target = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~-._?")
    request = ("GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: dockrune-health\r\n"
               "Connection: close\r\n\r\n" % (target, parts.netloc))
    try:
        with socket.create_connection((parts.hostname, parts.port or 80),
                                      timeout=timeout) as sock:
            sock.sendall(request.encode("ascii", "replace"))
            line = sock.makefile("rb").readline(200)
    except (OSError, ValueError) as e:
        return None, str(e)[:100] or type(e).__name__
    fields = line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not (
            fields[1].isdigit() and len(fields[1]) == 3):
        return None, "no HTTP answer" if not line else "not HTTP: %r" % line[:40]
    code = int(fields[1])
    return code, "HTTP %d" % code


# -- preview reconciliation --------------------------------------------------------


def parse_duration(value, default):
    """Return seconds for '90m', '36h', '7d' or a plain number of seconds."""
    value = (value or "").strip().lower()
    if not value:
        return default
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value[-1] in units else (value, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise ValueError("%r is not a duration like 36h or 7d" % value) from None


def stale_previews(store_, now, pull_request_state=None):
    """Return [(app, environment, reason)] of previews that should go.

    A preview goes when its pull request is closed (pull_request_state(repo,
    number) answers "closed"; None means "cannot tell" and keeps it), when it
    has not been deployed for PREVIEW_TTL (default 7d), or when the app has more
    than MAX_PREVIEWS (default 10): the least recently deployed go first.
    """
    apps = store_.load_apps()
    by_app = {}
    for summary in store_.environments().values():
        if summary.get("environment") != "production" and summary.get("app") in apps:
            by_app.setdefault(summary["app"], []).append(summary)
    stale = []
    for app, previews in sorted(by_app.items()):
        settings = apps[app]
        try:
            ttl = parse_duration(settings.get("PREVIEW_TTL"), 7 * 86400)
            most = int(settings.get("MAX_PREVIEWS") or 10)
        except ValueError as e:
            log.error("previews of %s not reconciled: %s", app, e)
            continue
        previews.sort(key=lambda s: s.get("deployed_at") or "", reverse=True)
        for rank, summary in enumerate(previews):
            reason = _stale_reason(summary, settings, now, ttl, rank, most,
                                   pull_request_state)
            if reason:
                stale.append((app, summary["environment"], reason))
    return stale


def _stale_reason(summary, settings, now, ttl, rank, most, pull_request_state):
    env = summary["environment"]
    if pull_request_state and env.startswith("pr-") and env[3:].isdigit():
        if pull_request_state(settings.get("REPO", ""), int(env[3:])) == "closed":
            return "pull request #%s is closed" % env[3:]
    when = summary.get("deployed_at")
    if when and not summary.get("running") and not summary.get("queued"):
        try:
            age = now - datetime.datetime.fromisoformat(
                when.replace("Z", "+00:00")).timestamp()
        except ValueError:
            age = 0
        if age > ttl:
            return "not deployed for %d h (PREVIEW_TTL)" % (age // 3600)
    if rank >= most:
        return "more than MAX_PREVIEWS=%d previews" % most
    return None


class Reconciler:
    """Removes stale previews at start and then every interval seconds."""

    def __init__(self, store_, runner, interval=3600, pull_request_state=None):
        self.store = store_
        self.runner = runner
        self.interval = interval
        self.pull_request_state = pull_request_state
        self._stopping = threading.Event()
        self._thread = None

    def run_once(self, now=None):
        """Queue a teardown for every stale preview; return what was queued."""
        stale = stale_previews(self.store, time.time() if now is None else now,
                               self.pull_request_state)
        for app, env, reason in stale:
            log.info("preview %s/%s goes: %s", app, env, reason)
            self.runner.submit({"action": "teardown", "app": app, "environment": env,
                                "reason": reason})
        return stale

    def start(self):
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="dockrune-reconcile")
        self._thread.start()

    def stop(self, timeout=5.0):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("reconciling previews failed")
            if self.interval <= 0:
                return
            self._stopping.wait(self.interval)


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
        # Held while one caller checks a lane for a sha and queues it, so
        # that a webhook and the poller seeing the same push queue it once.
        self._claim = threading.Lock()

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

    def submit_new(self, app, env, sha, make_job):
        """Queue make_job() unless sha is live, running or waiting in app/env.

        Returns the job queued, or None (make_job is not called) when the sha
        is there already.  Thread-safe.
        """
        with self._claim:
            if self.holds_sha(app, env, sha):
                return None
            return self.submit(make_job())

    def holds_sha(self, app, env, sha):
        """Tell whether sha is live, running or waiting in the lane of app/env."""
        with self._cond:
            jobs = [self._waiting.get((app, env)), self._running.get((app, env))]
        if any(j and j.get("action") == "deploy" and j.get("sha") == sha
               for j in jobs):
            return True
        summary = self.deployer.store.environment(app, env) or {}
        if summary.get("status") == "live" and summary.get("sha") == sha:
            return True
        # A deploy started by ref learns its sha only once it runs.
        for deploy_id in (summary.get("running"), summary.get("queued")):
            record = self.deployer.store.deploy(deploy_id) if deploy_id else None
            if record and record["status"] in store.ACTIVE and record["sha"] == sha:
                return True
        return False

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
