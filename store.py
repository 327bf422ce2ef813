"""All of dockrune's state on disk: JSON with atomic writes, .env files, logs.

Layout under DOCKRUNE_HOME::

    dockrune.env             global settings (hand-edited)
    apps/<app>.env           one per app (hand-edited, or written on first push)
    state/apps.json          one summary per app environment
    state/deploys/<id>.json  one record per deploy
    state/history/<app>.json the app's deploy ids, oldest first, bounded
    state/deliveries.json    recent X-GitHub-Delivery ids, bounded
    state/ports.json         ports handed out by dockrune
    logs/<app>/<id>.log      one file per deploy
    logs/<app>/<environment>.runtime.log  output of the app's own processes
    src/<app>/<environment>  git checkouts
    releases/<app>/<environment>/<sha>  builds kept for rollback (runners.py)
    run/procs/<app>/<environment>.<slot>.json  supervised processes (supervise.py)

Every write goes through write_json() or write_text(): a temporary file in the
same directory, fsync, os.replace, fsync of the directory.  A crash leaves the
old file or the new one, never half of either.

The Store is thread-safe: one lock guards every read-modify-write.
"""

import datetime
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading

log = logging.getLogger("dockrune.store")

# Deploy statuses (records) and environment statuses (what users see).
DEPLOY_STATUSES = ("queued", "running", "live", "failed", "superseded", "interrupted")
ENV_STATUSES = ("deploying", "live", "failing", "stopped")
ACTIVE = ("queued", "running")

MAX_NAME = 40
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[a-z0-9][a-z0-9-]*-[0-9a-f]{4}$")


class StoreError(Exception):
    """A state or configuration file cannot be read or written."""


class EnvFileError(ValueError):
    """An .env file does not follow the rules; the message names the line."""


# -- names ------------------------------------------------------------------


def sanitize_name(raw):
    """Return raw as a safe app or environment name, or raise ValueError.

    This is the one gate between outside text and paths, argv and compose
    project names: lower case, [a-z0-9-], starting with a letter or digit,
    at most MAX_NAME characters.  Runs of anything else become one '-'.
    """
    if not isinstance(raw, str):
        raise ValueError("name must be text")
    name = re.sub(r"[^a-z0-9]+", "-", raw.strip().lower()).strip("-")
    name = name[:MAX_NAME].rstrip("-")
    if not _NAME_RE.match(name):
        raise ValueError("no usable name in %r" % raw[:80])
    return name


def is_name(value):
    """Tell whether value is already a sanitised name."""
    return isinstance(value, str) and len(value) <= MAX_NAME and bool(
        _NAME_RE.match(value))


def is_repo(value):
    """Tell whether value looks like a GitHub owner/name and nothing else."""
    if not isinstance(value, str) or not _REPO_RE.match(value):
        return False
    return all(part not in (".", "..") for part in value.split("/"))


def is_deploy_id(value):
    return isinstance(value, str) and bool(_ID_RE.match(value))


def utcnow():
    """Return the current time as ISO 8601 in UTC, to the second."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


# -- atomic files -------------------------------------------------------------


def write_text(path, text, mode=0o644):
    """Replace the file at path with text, atomically and durably."""
    # XXX: a push delivery makes four or five of these writes (record,
    # history, apps.json, the superseded record, delivery ids), two fsyncs
    # each; that, not Python, bounds webhook intake to a few hundred per
    # second.  Batching the writes of concurrent deliveries into one
    # commit would lift it; left until intake rate matters more than the
    # simplicity of one file per piece of state.
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)


def write_json(path, data, mode=0o644):
    """Replace the JSON file at path with data, atomically and durably."""
    write_text(path, dumps(data) + "\n", mode)


def dumps(data):
    """Return data as JSON, indented by one space, keys sorted.

    A flat list of strings (delivery ids, deploy ids) is joined here rather
    than by json's indenting encoder, which is pure Python and took most of
    a webhook delivery's CPU time; the text is the same either way.
    """
    if isinstance(data, list) and data and set(map(type, data)) == {str}:
        return "[\n " + json.dumps(data, separators=(",\n ", ": "))[1:-1] + "\n]"
    return json.dumps(data, indent=1, sort_keys=True)


def read_json(path, default=None):
    """Return the parsed JSON at path, or default when there is no file.

    A file that exists but does not parse raises StoreError: state that
    cannot be read is never silently replaced.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise StoreError("cannot read %s: %s" % (path, e)) from e


def remove_temp_files(directory):
    """Delete temporary files left by a write that a crash interrupted."""
    removed = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.startswith(".tmp-"):
                _unlink_quietly(os.path.join(root, name))
                removed += 1
    return removed


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- .env files ---------------------------------------------------------------


def parse_env(text, source="<env>"):
    """Parse .env text with the rules Docker Compose uses; return a dict.

    Blank lines and lines starting with '#' are skipped; 'export ' before a key
    is allowed.  Unquoted values end at ' #' and are trimmed.  Single quotes
    keep everything literally.  Double quotes understand \\n, \\t, \\r, \\"
    and \\\\.  Quoted values may span lines.  ${VAR} and $VAR in unquoted and
    double-quoted values expand from keys defined earlier in the same file
    (unknown ones become empty); nothing is ever run: $(...) stays as it is.
    """
    result = {}
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].lstrip()
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise EnvFileError("%s line %d: expected KEY=VALUE, got %r"
                               % (source, number, lines[number - 1][:80]))
        rest = rest.lstrip()
        if rest[:1] in ("'", '"'):
            value, i = _read_quoted(rest, lines, i, source, number)
            if rest[0] == '"':
                value = _expand(_unescape(value), result)
        else:
            value = _expand(_strip_comment(rest).strip(), result)
        result[key] = value
    return result


def _read_quoted(rest, lines, i, source, number):
    """Read a quoted value that may continue on the following lines."""
    quote = rest[0]
    body = rest[1:]
    while True:
        end = _closing_quote(body, quote)
        if end >= 0:
            return body[:end], i
        if i >= len(lines):
            raise EnvFileError("%s line %d: unterminated %s quote"
                               % (source, number, quote))
        body += "\n" + lines[i]
        i += 1


def _closing_quote(body, quote):
    escaped = False
    for pos, char in enumerate(body):
        if quote == '"' and char == "\\" and not escaped:
            escaped = True
            continue
        if char == quote and not escaped:
            return pos
        escaped = False
    return -1


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def _unescape(value):
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), value)


def _strip_comment(value):
    match = re.search(r"\s#", value)
    return value[:match.start()] if match else value


def _expand(value, known):
    pattern = r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)"
    return re.sub(pattern, lambda m: known.get(m.group(1) or m.group(2), ""), value)


def read_env_file(path):
    """Return the parsed .env file at path ({} when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    return parse_env(text, source=path)


def quote_env(value):
    """Quote value for an .env file so that parse_env() gives it back."""
    if re.match(r"^[A-Za-z0-9_./:@+,-]*$", value):
        return value
    return "'%s'" % value if "'" not in value else '"%s"' % (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$"))


# -- the store ----------------------------------------------------------------


class Store:
    """State under one DOCKRUNE_HOME.  All methods are thread-safe."""

    def __init__(self, home, keep_deploys=100, remember_deliveries=2000):
        self.home = os.path.abspath(home)
        self.apps_dir = os.path.join(self.home, "apps")
        self.state_dir = os.path.join(self.home, "state")
        self.logs_dir = os.path.join(self.home, "logs")
        self.src_dir = os.path.join(self.home, "src")
        self.run_dir = os.path.join(self.home, "run")
        self.keep_deploys = keep_deploys
        self.remember_deliveries = remember_deliveries
        # One lock per kind of file, so that a webhook's writes to the
        # deliveries, a deploy record and apps.json need not wait for each
        # other (each write is fsynced: waiting adds up under a burst).
        self.lock = threading.RLock()           # apps.json, ports.json, recovery
        self._records_lock = threading.RLock()  # state/deploys/*
        self._history_lock = threading.Lock()   # state/history/*
        self._deliveries_lock = threading.Lock()
        self._deliveries = None
        self._app_cache = {}

    def ensure_dirs(self):
        for path in (self.home, self.apps_dir, self.state_dir, self.logs_dir,
                     self.src_dir, os.path.join(self.state_dir, "deploys"),
                     os.path.join(self.state_dir, "history")):
            os.makedirs(path, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)

    def _state(self, *parts):
        return os.path.join(self.state_dir, *parts)

    # -- apps (hand-edited .env files) --

    def app_path(self, app):
        return os.path.join(self.apps_dir, sanitize_name(app) + ".env")

    def app_names(self):
        """Return the names of every app with a valid file name, sorted."""
        try:
            names = os.listdir(self.apps_dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-4] for n in names
                      if n.endswith(".env") and is_name(n[:-4]))

    def load_app(self, app):
        """Return the app's settings (dict), or None when it has no file.

        Raises EnvFileError when the file is malformed.
        """
        path = self.app_path(app)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        # Parsing is what costs when every page lists every app: keep each
        # file's settings until the file changes.
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self.lock:
            cached = self._app_cache.get(path)
        if cached and cached[0] == stamp:
            return dict(cached[1])
        settings = read_env_file(path)
        with self.lock:
            self._app_cache[path] = (stamp, dict(settings))
        return settings

    def load_apps(self):
        """Return {name: settings} for every readable app; log the others.

        load_app() parses a file again only when it changed, so the webhook
        handler can afford to look through every app on each push.
        """
        apps = {}
        for name in self.app_names():
            try:
                settings = self.load_app(name)
            except (EnvFileError, OSError) as e:
                log.error("app %s skipped: %s", name, e)
                continue
            if settings is not None:
                apps[name] = settings
        return apps

    def find_app_by_repo(self, repo):
        """Return (name, settings) of the app deploying repo, or (None, None)."""
        wanted = repo.lower()
        for name, settings in self.load_apps().items():
            if settings.get("REPO", "").lower() == wanted:
                return name, settings
        return None, None

    def register_app(self, repo, port, domain, git_url):
        """Write apps/<name>.env for repo on its first push; return the name.

        The name comes from the repo's name, made unique among existing apps.
        """
        with self.lock:
            base = sanitize_name(repo.split("/", 1)[1])
            name, n = base, 1
            while os.path.exists(self.app_path(name)):
                n += 1
                name = "%s-%d" % (base[:MAX_NAME - 4], n)
            text = APP_TEMPLATE.format(
                repo=repo, port=port, domain=quote_env(domain or ""),
                git_url=quote_env(git_url), when=utcnow())
            write_text(self.app_path(name), text)
            return name

    # -- ports --

    def allocate_port(self, key, low, high, taken=()):
        """Return the port held by key, or hand out a free one in [low, high].

        A port is free when no app file names it, dockrune has not handed it
        out, and nothing listens on it on 127.0.0.1 right now.
        """
        with self.lock:
            ports = read_json(self._state("ports.json"), {})
            if key in ports:
                return ports[key]
            used = set(ports.values()) | {int(p) for p in taken}
            for port in range(low, high + 1):
                if port not in used and _port_is_free(port):
                    ports[key] = port
                    write_json(self._state("ports.json"), ports)
                    return port
        raise StoreError("no free port left in %d-%d" % (low, high))

    def release_port(self, key):
        with self.lock:
            ports = read_json(self._state("ports.json"), {})
            if ports.pop(key, None) is not None:
                write_json(self._state("ports.json"), ports)

    # -- webhook deliveries --

    def claim_delivery(self, delivery):
        """Remember delivery; return False when it had been claimed before.

        Only the newest remember_deliveries ids are kept, across restarts.
        """
        with self._deliveries_lock:
            self._load_deliveries()
            if delivery in self._delivery_set:
                return False
            self._deliveries.append(delivery)
            self._delivery_set.add(delivery)
            for old in self._deliveries[:-self.remember_deliveries]:
                self._delivery_set.discard(old)
            del self._deliveries[:-self.remember_deliveries]
            write_json(self._state("deliveries.json"), self._deliveries)
            return True

    def release_delivery(self, delivery):
        """Forget a claimed delivery that could not be acted on."""
        with self._deliveries_lock:
            self._load_deliveries()
            if delivery in self._delivery_set:
                self._delivery_set.discard(delivery)
                self._deliveries.remove(delivery)
                write_json(self._state("deliveries.json"), self._deliveries)

    def _load_deliveries(self):
        if self._deliveries is None:
            self._deliveries = read_json(self._state("deliveries.json"), [])
            self._delivery_set = set(self._deliveries)

    # -- environments (state/apps.json) --

    def environments(self):
        """Return {"<app>/<environment>": summary} for every known environment."""
        with self.lock:
            return read_json(self._state("apps.json"), {})

    def environment(self, app, env):
        return self.environments().get("%s/%s" % (app, env))

    def update_environment(self, app, env, **fields):
        """Merge fields into the summary of app/env and return the new summary."""
        with self.lock:
            envs = read_json(self._state("apps.json"), {})
            summary = envs.setdefault("%s/%s" % (app, env), {
                "app": app, "environment": env, "status": "stopped", "sha": None,
                "deployed_at": None, "last_deploy": None, "queued": None,
                "running": None})
            summary.update(fields)
            write_json(self._state("apps.json"), envs)
            return dict(summary)

    def update_environment_if(self, app, env, expect, **fields):
        """Merge fields into app/env only while its summary still matches expect.

        expect is {key: value}; return the new summary, or None (nothing
        written) when the environment is gone or any expected value differs.
        This lets a slow reader (the health checker) act on what it saw
        without undoing a deploy or a stop that happened in the meantime.
        """
        with self.lock:
            envs = read_json(self._state("apps.json"), {})
            summary = envs.get("%s/%s" % (app, env))
            if summary is None or any(summary.get(k) != v for k, v in expect.items()):
                return None
            summary.update(fields)
            write_json(self._state("apps.json"), envs)
            return dict(summary)

    def statuses(self, envs=None):
        """Return one summary per app environment, as status --json shows it.

        Every app with a file has at least its production environment, even
        before its first deploy.  envs is what environments() returned, for a
        caller that has read it already.
        """
        envs = self.environments() if envs is None else envs
        by_app = {}
        for key in envs:
            by_app.setdefault(key.split("/", 1)[0], []).append(key)
        result = []
        for app, settings in self.load_apps().items():
            keys = sorted(by_app.get(app, ()))
            if "%s/production" % app not in keys:
                keys.insert(0, "%s/production" % app)
            for key in keys:
                summary = envs.get(key) or {}
                env = key.split("/", 1)[1]
                domain = summary.get("domain") or (
                    settings.get("DOMAIN") if env == "production" else None) or None
                port = summary.get("port") or (
                    int(settings["PORT"]) if settings.get("PORT", "").isdigit()
                    and env == "production" else None)
                result.append({
                    "app": app, "environment": env, "repo": settings.get("REPO"),
                    "status": summary.get("status", "stopped"),
                    "sha": summary.get("sha"),
                    "deployed_at": summary.get("deployed_at"),
                    "port": port, "domain": domain,
                    "url": "https://%s" % domain if domain else (
                        "http://127.0.0.1:%d" % port if port else None),
                    "last_deploy": summary.get("last_deploy"),
                })
        return result

    def remove_environment(self, app, env):
        """Forget app/env entirely (a preview torn down)."""
        with self.lock:
            envs = read_json(self._state("apps.json"), {})
            if envs.pop("%s/%s" % (app, env), None) is not None:
                write_json(self._state("apps.json"), envs)

    # -- approvals of pull requests from forks --

    def approvals(self):
        """Return {"<app>/<environment>": request} for every preview on hold."""
        with self.lock:
            return read_json(self._state("approvals.json"), {})

    def request_approval(self, request):
        """Hold request (app, environment, sha, ...) until an operator approves it.

        A newer request for the same environment replaces the older one: each
        new commit needs its own approval.
        """
        with self.lock:
            held = read_json(self._state("approvals.json"), {})
            held["%s/%s" % (request["app"], request["environment"])] = dict(
                request, requested_at=utcnow())
            write_json(self._state("approvals.json"), held)

    def take_approval(self, app, env, sha):
        """Remove and return the held request of app/env if it is for sha, else None."""
        with self.lock:
            held = read_json(self._state("approvals.json"), {})
            request = held.get("%s/%s" % (app, env))
            if request is None or request.get("sha") != sha:
                return None
            del held["%s/%s" % (app, env)]
            write_json(self._state("approvals.json"), held)
            return request

    def drop_approval(self, app, env):
        with self.lock:
            held = read_json(self._state("approvals.json"), {})
            if held.pop("%s/%s" % (app, env), None) is not None:
                write_json(self._state("approvals.json"), held)

    # -- deploy records --

    def new_deploy(self, app, env, sha, ref, trigger, **extra):
        """Create and return a queued deploy record for app/env."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        with self._records_lock:
            while True:
                deploy_id = "%s-%s-%s" % (stamp, app, secrets.token_hex(2))
                if not os.path.exists(self._state("deploys", deploy_id + ".json")):
                    break
            record = dict(extra, id=deploy_id, app=app, environment=env, sha=sha,
                          ref=ref, trigger=trigger, status="queued",
                          created_at=utcnow(), started_at=None, finished_at=None,
                          error=None, log=os.path.join(self.logs_dir, app,
                                                       deploy_id + ".log"))
            write_json(self._state("deploys", deploy_id + ".json"), record)
        with self._history_lock:
            self._append_history(app, deploy_id)
        return record

    def deploy(self, deploy_id):
        """Return the deploy record with that id, or None."""
        if not is_deploy_id(deploy_id):
            return None
        return read_json(self._state("deploys", deploy_id + ".json"))

    def update_deploy(self, deploy_id, **fields):
        """Merge fields into the deploy record and return the new record."""
        with self._records_lock:
            record = self.deploy(deploy_id)
            if record is None:
                raise StoreError("no deploy %r" % deploy_id)
            record.update(fields)
            write_json(self._state("deploys", deploy_id + ".json"), record)
            return record

    def history(self, app, limit=50):
        """Return the app's newest deploy records, newest first."""
        ids = read_json(self._state("history", app + ".json"), [])
        records = (self.deploy(i) for i in reversed(ids[-limit:]))
        return [r for r in records if r]

    def _append_history(self, app, deploy_id):
        path = self._state("history", app + ".json")
        ids = read_json(path, [])
        ids.append(deploy_id)
        dropped, ids = ids[:-self.keep_deploys], ids[-self.keep_deploys:]
        write_json(path, ids)
        for old in dropped:
            self._forget_deploy(app, old)

    def _forget_deploy(self, app, deploy_id):
        """Delete an old deploy's record and log (only finished ones get here)."""
        _unlink_quietly(self._state("deploys", deploy_id + ".json"))
        _unlink_quietly(os.path.join(self.logs_dir, app, deploy_id + ".log"))

    # -- health samples (state/health.json) --

    def health_samples(self):
        """Return {"<app>/<environment>": samples} as the health checker left it."""
        return read_json(self._state("health.json"), {})

    def write_health_samples(self, samples):
        """Replace every environment's health samples (health checker only)."""
        # Compact on purpose: the overview reads this file on every request.
        text = json.dumps(samples, separators=(",", ":"), sort_keys=True) + "\n"
        with self.lock:
            write_text(self._state("health.json"), text)

    # -- start-up --

    def recover(self):
        """Tidy state after an unclean stop.

        Temporary files from interrupted writes are removed.  Deploys that
        were running are marked interrupted.  Returns (queued, interrupted):
        the records that were still waiting, to queue again as they are, and
        the ones that were cut short, which the caller may deploy afresh.
        """
        with self.lock:
            # Not src/ or releases/: what is there belongs to the apps.
            removed = sum(remove_temp_files(d) for d in (
                self.state_dir, self.run_dir, os.path.join(self.home, "caddy")))
            if removed:
                log.warning("removed %d temporary files left by a crash", removed)
            requeue, interrupted = [], []
            for key, summary in self.environments().items():
                app, env = key.split("/", 1)
                running, queued = summary.get("running"), summary.get("queued")
                if running and (self.deploy(running) or {}).get("status") in ACTIVE:
                    interrupted.append(self.update_deploy(
                        running, status="interrupted", finished_at=utcnow(),
                        error="dockrune stopped during the deploy"))
                    log.warning("deploy %s of %s/%s was interrupted", running, app, env)
                record = self.deploy(queued) if queued else None
                if record and record["status"] == "queued":
                    requeue.append(record)
                status = summary.get("status")
                if status == "deploying":
                    serving = summary.get("serving", bool(summary.get("live_deploy")))
                    status = "live" if serving else "failing"
                self.update_environment(app, env, running=None, status=status)
            return requeue, interrupted


def _port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


APP_TEMPLATE = """\
# dockrune app, registered on the first push from {repo} ({when}).
# Edit freely: dockrune reads this file again for every deploy.  Every key
# below is also handed to the app (and to docker compose) as an environment
# variable.

# The GitHub repository, and where to fetch it from (a local path works too).
REPO={repo}
GIT_URL={git_url}

# The branch that deploys to production (empty: the repository's default).
BRANCH=

# The port the app listens on, on 127.0.0.1 (compose files use ${{PORT}}).
PORT={port}

# The domain the app answers on, and the path that says it is healthy.
DOMAIN={domain}
HEALTH_PATH=/

# Force a project kind instead of detecting it: compose, dockerfile, nitro,
# procfile, static.
#TYPE=
"""
