#!/usr/bin/env python3
"""dockrune: push-to-deploy for one server.

GitHub sends a webhook; dockrune fetches the pushed commit, deploys it (docker
compose, a Dockerfile, a Nuxt/Nitro app, a Procfile or a static site), checks
that it answers, and keeps a log of every deploy.

    dockrune serve                  run the daemon (webhook, admin, API, health)
    dockrune deploy APP [--ref REF] deploy now (through the daemon if it runs)
    dockrune rollback APP [DEPLOY]  deploy an earlier live version again
    dockrune stop APP               stop an app
    dockrune status [--json]        every app and environment
    dockrune logs APP [--deploy ID | --runtime] [--follow]
    dockrune doctor                 check this machine and the settings
    dockrune alert test [TARGET]    send a test alert to each alert target

Settings come from the environment or from $DOCKRUNE_HOME/dockrune.env (the
environment wins); the SETTINGS table below lists them with their defaults.
"""

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import alerts
import handlers
import health
import poll
import proxy
import runners
import store
import swarm

__version__ = "0.1.0"

log = logging.getLogger("dockrune")


# -- settings ----------------------------------------------------------------------


def _text(value):
    return value.strip()


def _whole(value):
    try:
        number = int(value)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if number < 0:
        raise ValueError("expected a number of zero or more")
    return number


def _listen(value):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, like 127.0.0.1:9000")
    return host.strip("[]") or "127.0.0.1", int(port)


def _port_range(value):
    low, sep, high = value.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not (
            1024 <= int(low) <= int(high) < 65536):
        raise ValueError("expected LOW-HIGH between 1024 and 65535")
    return int(low), int(high)


def _owners(value):
    return frozenset(o.strip().lower() for o in value.replace(",", " ").split())


def _switch(value):
    value = value.strip().lower()
    if value not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
        raise ValueError("expected on or off")
    return value in ("on", "true", "yes", "1")


def _url(value):
    value = value.strip()
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


def _seconds(value):
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not number >= 0:
        raise ValueError("expected a number of seconds, zero or more")
    return number


def _header(value):
    value = value.strip()
    name, sep, _rest = value.partition(":")
    if value and (not sep or not name.strip() or any(
            c in name for c in " \t\r\n")):
        raise ValueError('expected "Name: value", like "X-Dockrune-Key: s3cret"')
    return value


def _rules(value):
    alerts.parse_rules(value)
    return value.strip()


def _engine(value):
    value = value.strip().lower()
    if value not in ("compose", "swarm"):
        raise ValueError("expected compose or swarm")
    return value


# key, default, converter, what it is.  The attribute name is the key without
# its DOCKRUNE_ prefix, in lower case (DOCKRUNE_WEBHOOK_SECRET -> webhook_secret).
SETTINGS = (
    ("DOCKRUNE_HOME", "~/.dockrune", _text, "where everything lives"),
    ("DOCKRUNE_LISTEN", "127.0.0.1:9000", _listen, "host:port of the HTTP server"),
    ("DOCKRUNE_WEBHOOK_SECRET", "", _text, "GitHub webhook secret (required)"),
    ("DOCKRUNE_GITHUB_TOKEN", "", _text, "token for git over https and the API"),
    ("DOCKRUNE_GITHUB_API", "https://api.github.com", _url, "REST API base"),
    ("DOCKRUNE_GIT_BASE_URL", "https://github.com", _text,
     "where REPO=owner/name is fetched from when GIT_URL is empty"),
    ("DOCKRUNE_PUBLIC_URL", "", _url, "how the world reaches dockrune"),
    ("DOCKRUNE_ADMIN_PASSWORD", "", _text, "password for /admin (user admin)"),
    ("DOCKRUNE_API_TOKEN", "", _text, "bearer token for /api"),
    ("DOCKRUNE_ALLOWED_OWNERS", "", _owners,
     "GitHub owners whose repos register themselves on first push"),
    ("DOCKRUNE_BASE_DOMAIN", "", _text, "domains for apps that set none"),
    ("DOCKRUNE_COACH_ARTIE_URL", "", _url, "Coach Artie base URL"),
    ("DOCKRUNE_COACH_ARTIE_CHANNEL", "", _text, "Coach Artie channel id"),
    ("DOCKRUNE_DISCORD_WEBHOOK_URL", "", _url, "a Discord webhook"),
    ("DOCKRUNE_N8N_WEBHOOK_URL", "", _url, "an n8n Webhook node URL"),
    ("DOCKRUNE_N8N_HEADER", "", _header,
     'header the n8n Webhook node checks, "Name: value"'),
    ("DOCKRUNE_ALERTS_COACH_ARTIE", alerts.DEFAULT_RULES["coach-artie"], _rules,
     "events sent to Coach Artie (a list, all or none)"),
    ("DOCKRUNE_ALERTS_DISCORD", alerts.DEFAULT_RULES["discord"], _rules,
     "events sent to the Discord webhook"),
    ("DOCKRUNE_ALERTS_N8N", alerts.DEFAULT_RULES["n8n"], _rules,
     "events sent to n8n"),
    ("DOCKRUNE_OUTBOX_TIMEOUT", "10", _seconds,
     "timeout of one outbound HTTP request"),
    ("DOCKRUNE_OUTBOX_RETRY_BASE", "2", _seconds,
     "first retry delay of a failed outbound call; it doubles each time"),
    ("DOCKRUNE_OUTBOX_RETRY_MAX", "300", _seconds,
     "longest wait between retries, or asked for by a rate limit"),
    ("DOCKRUNE_OUTBOX_MAX_AGE", "86400", _seconds,
     "outbound calls still failing after this long are given up"),
    ("DOCKRUNE_WORKERS", "2", _whole,
     "deploys that may run at once; 0 queues deploys and runs none (paused)"),
    ("DOCKRUNE_PORT_RANGE", "8100-8999", _port_range,
     "ports handed to apps that set no PORT"),
    ("DOCKRUNE_PREVIEW_PORT_RANGE", "9100-9899", _port_range,
     "ports handed to preview environments"),
    ("DOCKRUNE_RECONCILE_INTERVAL", "3600", _whole,
     "seconds between passes that remove stale previews (0: only at start)"),
    ("DOCKRUNE_KEEP_DEPLOYS", "100", _whole, "deploy records and logs kept per app"),
    ("DOCKRUNE_LOG_MAX_BYTES", "2000000", _whole, "size cap of one deploy log"),
    ("DOCKRUNE_KEEP_RELEASES", "3", _whole,
     "builds kept per app for rollback (release folders, images)"),
    ("DOCKRUNE_RUNTIME_LOG_MAX_BYTES", "5000000", _whole,
     "size at which an app's runtime log is rotated to <log>.1"),
    ("DOCKRUNE_LOG_LEVEL", "info", _text, "debug, info, warning or error"),
    ("DOCKRUNE_DOMAIN", "", _text, "dockrune's own domain, routed through Caddy"),
    ("DOCKRUNE_CADDY_CONFIG", "", _text,
     "the Caddyfile that imports dockrune's routes; set it to manage routes"),
    ("DOCKRUNE_CADDY_FILE", "", _text,
     "where dockrune writes its routes (default: $DOCKRUNE_HOME/caddy/dockrune.caddy)"),
    ("DOCKRUNE_CADDY_ADMIN", "", _text, "Caddy's admin address, if not the default"),
    ("DOCKRUNE_CADDY_SITE", "{domain}", _text,
     "site address of each route; {domain} is replaced"),
    ("DOCKRUNE_RESUME", "on", _switch,
     "deploy again, at start, what a crash interrupted"),
    ("DOCKRUNE_HEALTH_INTERVAL", "30", _whole,
     "seconds between uptime checks of live apps (0: no checks)"),
    ("DOCKRUNE_ENGINE", "compose", _engine,
     "how compose apps run: compose (this host) or swarm (a stack)"),
    ("DOCKRUNE_REGISTRY", "", _text,
     "registry that swarm images are pushed to, for the other nodes"),
    ("DOCKRUNE_POLL_INTERVAL", "0", _whole,
     "seconds between looks for new commits without webhooks (0: off)"),
    ("DOCKRUNE_POLL_MAX_BACKOFF", "900", _whole,
     "longest wait, in seconds, before asking a failing remote again"),
)
SECRET_KEYS = ("DOCKRUNE_WEBHOOK_SECRET", "DOCKRUNE_GITHUB_TOKEN",
               "DOCKRUNE_ADMIN_PASSWORD", "DOCKRUNE_API_TOKEN",
               "DOCKRUNE_DISCORD_WEBHOOK_URL")


class SettingsError(Exception):
    """A setting is missing or malformed; the message says which and why."""


class Settings:
    """The global settings, one attribute per SETTINGS key."""

    def __init__(self, values):
        self.raw = dict(values)
        for key, _default, convert, _help in SETTINGS:
            value = values.get(key, "")
            try:
                converted = convert(value)
            except ValueError as e:
                raise SettingsError("%s=%r: %s" % (key, value, e)) from None
            setattr(self, key[len("DOCKRUNE_"):].lower(), converted)
        self.home = os.path.abspath(os.path.expanduser(self.home))

    def secrets(self):
        """Return every secret value, so logs can redact them."""
        found = [self.raw.get(k, "") for k in SECRET_KEYS if self.raw.get(k)]
        header_value = self.n8n_header.partition(":")[2].strip()
        if header_value:
            found.append(header_value)
        return found


def load_settings(environ=None):
    """Return Settings from the defaults, dockrune.env and the environment."""
    environ = os.environ if environ is None else environ
    values = {key: default for key, default, _c, _h in SETTINGS}
    home = os.path.expanduser(environ.get("DOCKRUNE_HOME") or values["DOCKRUNE_HOME"])
    path = os.path.join(home, "dockrune.env")
    try:
        from_file = store.read_env_file(path)
    except (store.EnvFileError, OSError) as e:
        raise SettingsError(str(e)) from None
    known = {key for key, *_ in SETTINGS}
    for key in sorted(set(from_file) - known):
        log.warning("%s: unknown setting %s (a typo?)", path, key)
    values.update({k: v for k, v in from_file.items() if k in known})
    values.update({k: v for k, v in environ.items() if k in known})
    values["DOCKRUNE_HOME"] = home
    return Settings(values)


class RedactingFormatter(logging.Formatter):
    """A formatter that replaces every secret with '***', tracebacks included."""

    def __init__(self, fmt, secrets=()):
        super().__init__(fmt)
        self.secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record):
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def setup_logging(level="info", secrets=()):
    """Log to stderr; under systemd, leave the time stamps to journald."""
    fmt = "%(levelname)s %(name)s [%(threadName)s] %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(fmt, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


# -- wiring ------------------------------------------------------------------------


class Daemon:
    """Everything `serve` runs, wired together, without the HTTP server."""

    def __init__(self, settings):
        self.settings = settings
        self.store = store.Store(settings.home, keep_deploys=settings.keep_deploys)
        self.store.ensure_dirs()
        self.alerts = alerts.Alerts(self.store, settings, user_agent())
        self.proxy = proxy.Proxy(self.store, settings)
        self.deployer = runners.Deployer(self.store, settings,
                                         notify=self.alerts.notify, proxy=self.proxy)
        # Zero workers is a pause: deliveries are still verified, recorded and
        # queued, and the newest waiting deploy runs once workers are back.
        self.runner = runners.Runner(self.deployer, workers=settings.workers)
        self.reconciler = runners.Reconciler(
            self.store, self.runner, settings.reconcile_interval,
            pull_request_state=self.alerts.github.pull_request_state)
        self.poller = poll.Poller(self.store, settings, self.runner, self.deployer)
        self.control_token = secrets.token_urlsafe(32)
        self.app = handlers.Application(self.store, settings, self.runner,
                                        self.deployer, self.control_token)
        # Whoever wants app-down and app-up events (the alerts outbox) appends
        # a callable listener(event, info) here.
        self.listeners = [self.alerts.notify]
        self.health = health.HealthChecker(self.store, settings.health_interval,
                                           notify=self.notify,
                                           busy=self.runner.lane_busy)

    def notify(self, event, info):
        """Hand an event to every listener; one that fails does not stop the rest."""
        log.info("event %s for %s/%s", event, info.get("app"), info.get("environment"))
        for listener in list(self.listeners):
            try:
                listener(event, info)
            except Exception:
                log.exception("listener for %s failed", event)

    def start(self):
        """Recover from an unclean stop, then start the workers.

        Deploys that were waiting are queued again; deploys that a crash cut
        short are deployed afresh (trigger "resume") unless DOCKRUNE_RESUME=off.
        """
        queued, interrupted = self.store.recover()
        self.deployer.sync_routes({"app": "-", "id": "start-up"})
        self.deployer.supervisor.adopt_all()
        self.deployer.supervisor.start_watching()
        for old in interrupted:
            killed = runners.kill_leftovers(old["id"])
            if killed:
                log.warning("killed %d processes left by interrupted deploy %s",
                            killed, old["id"])
        self.alerts.start()
        self.runner.start()
        for record in queued:
            log.info("queueing deploy %s of %s again", record["id"], record["app"])
            self.runner.submit(record)
        for old in interrupted if self.settings.resume else ():
            summary = self.store.environment(old["app"], old["environment"]) or {}
            if summary.get("queued"):
                continue    # a newer deploy already waits in that lane
            record = self.deployer.new_deploy(
                old["app"], old["environment"], old["sha"], old["ref"], "resume",
                resumes=old["id"], forced=True)
            log.info("deploy %s of %s resumes interrupted deploy %s", record["id"],
                     record["app"], old["id"])
            self.runner.submit(record)
        self.health.start()
        self.reconciler.start()
        self.poller.start()

    def stop(self, timeout=10.0):
        """Stop the workers; the apps' processes go on running."""
        self.health.stop(timeout=min(timeout, 5.0))
        self.poller.stop()
        self.reconciler.stop()
        stragglers = self.runner.shutdown(timeout)
        self.deployer.supervisor.shutdown()
        self.alerts.shutdown()
        return stragglers


def user_agent():
    return "dockrune/%s (push-to-deploy; python-urllib)" % __version__


def daemon_file(settings):
    return os.path.join(settings.home, "run", "daemon.json")


def serve(settings):
    """Run the daemon until SIGTERM or SIGINT."""
    import waitress

    if not settings.webhook_secret:
        raise SettingsError("DOCKRUNE_WEBHOOK_SECRET is not set: set it in %s or "
                            "the environment (the same secret as in GitHub's "
                            "webhook settings)" % os.path.join(settings.home,
                                                                 "dockrune.env"))
    daemon = Daemon(settings)
    daemon.start()
    if not settings.workers:
        log.warning("DOCKRUNE_WORKERS=0: deploys are queued but none runs")
    host, port = settings.listen
    # waitress reads requests in its event loop and hands only complete ones
    # to its threads, so slow clients cost a socket, not a thread; the limit
    # on connections is raised so that a few hundred of them cannot lock
    # GitHub out, and idle ones are closed after channel_timeout seconds.
    server = waitress.create_server(
        daemon.app, host=host, port=port, threads=8, ident="dockrune",
        max_request_body_size=handlers.MAX_BODY, channel_timeout=30,
        connection_limit=1000, clear_untrusted_proxy_headers=True)
    store.write_json(daemon_file(settings), {
        "pid": os.getpid(), "listen": "%s:%d" % (host, port),
        "token": daemon.control_token}, mode=0o600)
    log.info("dockrune %s listening on http://%s:%d, home %s", __version__, host,
             port, settings.home)

    # The handler only records the signal: an exception raised from it could
    # land inside a channel's read handler, where waitress catches it, logs it
    # and goes on serving. The loop below runs waitress's event loop one pass
    # at a time (each pass waits at most a second) and looks at the flag.
    signals = []

    def shut(signum, _frame):
        signals.append(signum)

    signal.signal(signal.SIGTERM, shut)
    signal.signal(signal.SIGINT, shut)
    try:
        while not signals:
            server.asyncore.loop(timeout=1.0, map=server._map, count=1,
                                 use_poll=server.adj.asyncore_use_poll)
        log.info("signal %d: shutting down", signals[0])
    finally:
        server.close()
        # Requests already handed to a thread finish; new ones are not read.
        server.task_dispatcher.shutdown(timeout=5)
        try:
            os.unlink(daemon_file(settings))
        except FileNotFoundError:
            pass
        daemon.stop()
    return 0


# -- the command line ----------------------------------------------------------------


def running_daemon(settings):
    """Return (base URL, token) of the daemon serving this home, or None."""
    info = store.read_json(daemon_file(settings), None)
    if not info:
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return "http://%s" % info["listen"], info["token"]


def call_daemon(daemon, method, path, data=None):
    import urllib.error     # here: the daemon itself never needs urllib.request
    import urllib.request
    base, token = daemon
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(base + path, data=body, method=method, headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise SettingsError("the daemon answered %d: %s" % (e.code, message)) from None
    except (urllib.error.URLError, OSError) as e:
        raise SettingsError("cannot reach the daemon at %s: %s" % (base, e)) from None


def cmd_deploy(settings, args):
    app = _existing_app(settings, args.app)
    daemon = running_daemon(settings)
    if daemon:
        answer = call_daemon(daemon, "POST", "/api/apps/%s/deploy" % app,
                             {"ref": args.ref} if args.ref else {})
        print("queued deploy %s; follow it with: dockrune logs %s --follow"
              % (answer["deploy"], app))
        return 0
    return deploy_foreground(settings, app, args.ref)


def deploy_foreground(settings, app, ref, record=None):
    """Deploy app (or run the queued record) here, printing its log as it goes."""
    daemon = Daemon(settings)
    daemon.alerts.start()
    if record is None:
        sha = ref if ref and handlers._SHA_RE.match(ref) else None
        record = daemon.deployer.new_deploy(app, "production", sha, ref, "manual")
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        daemon.deployer.run_deploy(record)), name="dockrune-deploy-%s" % app)
    worker.start()
    follow_log(record["log"], lambda: not worker.is_alive())
    worker.join()
    flush_alerts(daemon.alerts)
    if result.get("status") != "live":
        raise SettingsError("deploy %s failed: %s"
                            % (record["id"], result.get("error")))
    return 0


def flush_alerts(alerts_, timeout=20.0):
    """Give GitHub and the alert targets a moment; what is left waits on disk."""
    if not alerts_.outbox.flush(timeout):
        print("dockrune: some reports are not delivered yet; the daemon sends "
              "them when it starts", file=sys.stderr)
    alerts_.shutdown()


def follow_log(path, finished, out=None):
    """Copy the log at path to out until finished() and the end is reached."""
    out = out or sys.stdout
    offset = 0
    while True:
        done = finished()
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except FileNotFoundError:
            chunk = ""
        if chunk:
            out.write(chunk)
            out.flush()
        if done and not chunk:
            return
        time.sleep(0.2)


def cmd_rollback(settings, args):
    app = _existing_app(settings, args.app)
    daemon = running_daemon(settings)
    if daemon:
        answer = call_daemon(daemon, "POST", "/api/apps/%s/rollback" % app,
                             {"deploy": args.deploy} if args.deploy else {})
        print("queued rollback %s to %s; follow it with: dockrune logs %s --follow"
              % (answer["deploy"], answer["rollback_to"], app))
        return 0
    deployer = runners.Deployer(_store(settings), settings)
    try:
        record = deployer.new_rollback(app, "production", args.deploy)
    except runners.DeployError as e:
        raise SettingsError(str(e)) from None
    return deploy_foreground(settings, app, None, record)


def cmd_stop(settings, args):
    app = _existing_app(settings, args.app)
    daemon = running_daemon(settings)
    if daemon:
        call_daemon(daemon, "POST", "/api/apps/%s/stop" % app, {})
        print("stopping %s (through the daemon)" % app)
        return 0
    st = _store(settings)
    alerts_ = alerts.Alerts(st, settings, user_agent())
    alerts_.start()
    deployer = runners.Deployer(st, settings, notify=alerts_.notify)
    try:
        deployer.run_stop(app, "production")
    except runners.DeployError as e:
        raise SettingsError("stop failed: %s" % e) from None
    finally:
        flush_alerts(alerts_)
    print("stopped %s" % app)
    return 0


def cmd_status(settings, args):
    st = _store(settings)
    rows = swarm.annotate(poll.annotate(st.statuses(), st, settings), st)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no apps yet: push to a repository of an allowed owner, or write "
              "%s/<app>.env" % os.path.join(settings.home, "apps"))
        return 0
    polled = any(row.get("polled_at") for row in rows)
    line = "%-20s %-12s %-10s %-12s %-6s %-20s" + (" %s" if polled else "%s")
    print((line % ("APP", "ENV", "STATUS", "SHA", "PORT", "DEPLOYED",
                   "POLLED" if polled else "")).rstrip())
    for row in rows:
        status = row["status"] + (" " + row["replicas"] if "replicas" in row else "")
        print((line % (
            row["app"], row["environment"], status, (row["sha"] or "-")[:12],
            row["port"] or "-", row["deployed_at"] or "-",
            _poll_column(row) if polled else "")).rstrip())
    return 0


def _poll_column(row):
    """Say when the row's app was last polled and what that saw."""
    if not row["polled_at"]:
        return "-"
    if row["poll_error"]:
        return "%s error: %s" % (row["polled_at"], row["poll_error"][:60])
    return "%s saw %s" % (row["polled_at"], (row["poll_sha"] or "-")[:12])


def cmd_logs(settings, args):
    app = _existing_app(settings, args.app)
    st = _store(settings)
    if args.runtime:
        return print_runtime_log(st, app, args.follow)
    if args.deploy:
        record = st.deploy(args.deploy)
        if record is None or record["app"] != app:
            raise SettingsError("no deploy %r of %s" % (args.deploy, app))
    else:
        history = st.history(app, limit=1)
        if not history:
            raise SettingsError("%s has no deploys yet" % app)
        record = history[0]
    if not args.follow:
        try:
            with open(record["log"], encoding="utf-8", errors="replace") as f:
                shutil.copyfileobj(f, sys.stdout)
        except FileNotFoundError:
            print("(deploy %s has no log yet: it is %s)" % (record["id"],
                                                           record["status"]))
        return 0
    follow_log(record["log"], lambda: (st.deploy(record["id"]) or {}).get(
        "status") not in store.ACTIVE)
    return 0


def print_runtime_log(st, app, follow):
    """Print what the app's own processes wrote (nitro, procfile, static)."""
    path = os.path.join(st.logs_dir, app, "production.runtime.log")
    if not os.path.exists(path):
        raise SettingsError("%s has no runtime log: only apps that dockrune runs "
                            "itself have one (docker apps: docker logs)" % app)
    if follow:
        follow_log(path, lambda: False)
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        shutil.copyfileobj(f, sys.stdout)
    return 0


def cmd_doctor(settings, _args):
    """Check what dockrune needs; print one line per check; 1 if any failed."""
    checks = [
        ("docker engine", _check_command(["docker", "info", "--format",
                                          "{{.ServerVersion}}"],
                                         "start it: systemctl start docker")),
        ("docker compose", _check_compose()),
        ("git", _check_command(["git", "--version"], "apt-get install git")),
        ("node", _check_command(["node", "--version"],
                                "only Nitro apps need it: apt-get install nodejs")),
        ("npm", _check_command(["npm", "--version"],
                               "only Nitro apps need it: apt-get install npm")),
        ("webhook secret", (bool(settings.webhook_secret), "set" if
                            settings.webhook_secret else
                            "set DOCKRUNE_WEBHOOK_SECRET in dockrune.env")),
        ("home", _check_home(settings.home)),
    ]
    failed = 0
    for name, (ok, detail) in checks:
        print("%-4s %-16s %s" % ("ok" if ok else "FAIL", name, detail))
        failed += 0 if ok or name in ("node", "npm") else 1
    repos = set()
    for app in store.Store(settings.home).app_names():
        try:
            values = store.Store(settings.home).load_app(app) or {}
        except store.EnvFileError as e:
            print("FAIL %-16s %s" % ("app " + app, e))
            failed += 1
            continue
        for problem in alerts.rule_problems(values):
            print("FAIL %-16s %s" % ("app " + app, problem))
            failed += 1
        repo = values.get("REPO")
        if store.is_repo(repo or ""):
            repos.add(repo)
    for ok, name, detail in alerts.check_github_token(settings, sorted(repos),
                                                      user_agent()):
        print("%-4s %-16s %s" % ("ok" if ok else "FAIL", name, detail))
        failed += 0 if ok else 1
    templates = alerts.Templates(os.path.join(settings.home, "templates"))
    for problem in templates.problems():
        print("FAIL %-16s %s" % ("template", problem))
        failed += 1
    return 1 if failed else 0


def cmd_alert(settings, args):
    """Send a test alert to each configured target; print what each answered."""
    notifier = alerts.Notifier(None, _store(settings), settings, user_agent())
    configured = notifier.targets()
    if args.target and args.target not in configured:
        raise SettingsError("%s is not configured (configured: %s)" % (
            args.target, ", ".join(configured) or "none; see DOCKRUNE_COACH_ARTIE_URL,"
            " DOCKRUNE_DISCORD_WEBHOOK_URL, DOCKRUNE_N8N_WEBHOOK_URL"))
    if not configured:
        raise SettingsError("no alert target is configured: set "
                            "DOCKRUNE_COACH_ARTIE_URL and _CHANNEL, "
                            "DOCKRUNE_DISCORD_WEBHOOK_URL or DOCKRUNE_N8N_WEBHOOK_URL")
    failed = 0
    for target in [args.target] if args.target else configured:
        try:
            answer = notifier.post(target, notifier.test_payload(target))
        except alerts.TransportError as e:
            print("%-12s no answer: %s" % (target, e))
            failed += 1
            continue
        ok = 200 <= answer.status < 300
        print("%-12s %d %s" % (target, answer.status, answer.message()
                               if answer.body else "(empty body)"))
        failed += 0 if ok else 1
    return 1 if failed else 0


def _check_command(argv, fix):
    try:
        done = subprocess.run(argv, capture_output=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, "%s: %s; %s" % (argv[0], e, fix)
    out = (done.stdout or done.stderr).decode("utf-8", "replace").strip()
    if done.returncode != 0:
        return False, "%s (%s)" % (fix, out.splitlines()[-1][:120] if out else "failed")
    return True, out.splitlines()[0][:120] if out else "ok"


def _check_compose():
    try:
        argv = runners.compose_command()
    except runners.DeployError as e:
        return False, str(e)
    return True, " ".join(argv) + (" (v2)" if argv == ["docker", "compose"] else
                                   " (v1; v2 is preferred)")


def _check_home(home):
    try:
        os.makedirs(home, exist_ok=True)
        store.write_text(os.path.join(home, ".doctor"), "ok\n")
        os.unlink(os.path.join(home, ".doctor"))
    except OSError as e:
        return False, "%s is not writable: %s" % (home, e)
    return True, home


def _store(settings):
    st = store.Store(settings.home, keep_deploys=settings.keep_deploys)
    st.ensure_dirs()
    return st


def _existing_app(settings, name):
    st = store.Store(settings.home)
    if not store.is_name(name) or not os.path.exists(st.app_path(name)):
        raise SettingsError("no app %r: write %s/<app>.env or push to register it"
                            % (name, st.apps_dir))
    return name


def build_parser():
    parser = argparse.ArgumentParser(prog="dockrune", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon")
    p = sub.add_parser("deploy", help="deploy an app now")
    p.add_argument("app")
    p.add_argument("--ref", help="branch, tag or sha (default: the app's branch)")
    p = sub.add_parser("rollback", help="deploy an earlier live version again")
    p.add_argument("app")
    p.add_argument("deploy", nargs="?", metavar="DEPLOY",
                   help="the deploy to go back to (default: the one live before)")
    p = sub.add_parser("stop", help="stop an app")
    p.add_argument("app")
    p = sub.add_parser("status", help="show every app and environment")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("logs", help="print a deploy's log")
    p.add_argument("app")
    p.add_argument("--deploy", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--runtime", action="store_true",
                   help="the output of the app's own process, not a deploy's log")
    sub.add_parser("doctor", help="check this machine and the settings")
    p = sub.add_parser("alert", help="alert targets")
    alert_sub = p.add_subparsers(dest="alert_command", required=True)
    p = alert_sub.add_parser("test", help="send a test alert to each target")
    p.add_argument("target", nargs="?", choices=alerts.ALERT_TARGETS)
    return parser


COMMANDS = {"deploy": cmd_deploy, "rollback": cmd_rollback, "stop": cmd_stop,
            "status": cmd_status, "logs": cmd_logs, "doctor": cmd_doctor,
            "alert": cmd_alert}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, settings.secrets())
        if args.command == "serve":
            return serve(settings)
        return COMMANDS[args.command](settings, args)
    except (SettingsError, store.StoreError, store.EnvFileError) as e:
        print("dockrune: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
