"""The WSGI application: routing, GitHub webhook intake, the JSON API.

The webhook handler only verifies, records, enqueues and answers: it never runs
git, docker or node and never calls out over the network.  Everything slow
happens in the runner's worker threads.
"""

import hashlib
import hmac
import json
import logging
import re
import threading
import urllib.parse

import store

log = logging.getLogger("dockrune.handlers")

# GitHub caps webhook payloads at 25 MB and drops anything bigger.
MAX_BODY = 25 * 1024 * 1024
MAX_API_BODY = 64 * 1024
_SIGNATURE_RE = re.compile(r"^sha256=[0-9a-fA-F]{64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REF_RE = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/-]{1,200}$")
ZERO_SHA = "0" * 40

STATUS_LINES = {
    200: "200 OK", 202: "202 Accepted", 400: "400 Bad Request",
    401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found",
    405: "405 Method Not Allowed", 411: "411 Length Required",
    413: "413 Payload Too Large", 415: "415 Unsupported Media Type",
    500: "500 Internal Server Error", 503: "503 Service Unavailable",
}


class HTTPError(Exception):
    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def verify_signature(secret, body, header):
    """Tell whether header is a valid X-Hub-Signature-256 of body under secret.

    Only 'sha256=<64 hex>' is accepted; the old sha1 header is not enough.
    """
    if not secret or not header or not _SIGNATURE_RE.match(header):
        return False
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("sha256=" + expected, header.lower())


class Application:
    """dockrune's WSGI app.  Thread-safe: waitress calls it from many threads."""

    def __init__(self, store_, settings, runner, deployer, control_token=None):
        self.store = store_
        self.settings = settings
        self.runner = runner
        self.deployer = deployer
        self.control_token = control_token
        self._intake_lock = threading.Lock()

    def __call__(self, environ, start_response):
        try:
            status, headers, body = self.route(environ)
        except HTTPError as e:
            status, headers, body = _json(e.status, {"error": e.message})
            headers += e.headers
        except Exception:
            log.exception("%s %s failed", environ.get("REQUEST_METHOD"),
                          _printable(environ.get("PATH_INFO", ""))[:200])
            status, headers, body = _json(500, {"error": "internal error; see the "
                                                "dockrune log"})
        headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_LINES.get(status, "%d Status" % status), headers)
        return [body]

    def route(self, environ):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/healthz":
            _allow(method, "GET", "HEAD")
            return _json(200, {"ok": True, "jobs": self.runner.busy()})
        if path == "/hooks/github":
            _allow(method, "POST")
            return self.github_hook(environ)
        if path.startswith("/api/"):
            self.check_bearer(environ)
            return self.api(method, path[len("/api/"):].rstrip("/"), environ)
        raise HTTPError(404, "not found")

    # -- the GitHub webhook --

    def github_hook(self, environ):
        body = _read_body(environ, MAX_BODY)
        if not verify_signature(self.settings.webhook_secret, body,
                                environ.get("HTTP_X_HUB_SIGNATURE_256", "")):
            log.warning("webhook with a missing or wrong signature from %s",
                        environ.get("REMOTE_ADDR", "?"))
            raise HTTPError(401, "bad signature")
        payload = _parse_payload(body, environ.get("CONTENT_TYPE", ""))
        event = environ.get("HTTP_X_GITHUB_EVENT", "")
        delivery = _printable(environ.get("HTTP_X_GITHUB_DELIVERY", ""))[:100]
        with self._intake_lock:
            if delivery and self.store.seen_delivery(delivery, peek=True):
                return _json(200, {"ignored": "duplicate delivery %s" % delivery})
            status, answer = self.route_event(event, payload)
            if delivery:
                self.store.seen_delivery(delivery)
        log.info("delivery %s (%s): %s", delivery or "-", _printable(event)[:40],
                 answer.get("ignored") or "deploy %s" % answer.get("deploy"))
        return _json(status, answer)

    def route_event(self, event, payload):
        """Act on one verified event; return (HTTP status, JSON answer)."""
        if event == "ping":
            return 200, {"message": "pong"}
        if event == "push":
            return self.on_push(payload)
        return 200, {"ignored": "event %s" % _printable(event)[:40] or "no event"}

    def on_push(self, payload):
        ref = _text(payload.get("ref"))
        repo = _text((payload.get("repository") or {}).get("full_name"))
        if ref.startswith("refs/tags/"):
            return 200, {"ignored": "tag push"}
        if payload.get("deleted") or _text(payload.get("after")) == ZERO_SHA:
            return 200, {"ignored": "branch deleted"}
        if not ref.startswith("refs/heads/"):
            return 200, {"ignored": "push to %s" % _clip(ref)}
        if not store.is_repo(repo):
            return 200, {"ignored": "invalid repository name %s" % _clip(repo)}
        sha = _text(payload.get("after"))
        if not _SHA_RE.match(sha):
            raise HTTPError(400, "push without a valid 'after' sha")
        branch = ref[len("refs/heads/"):]
        default_branch = _text((payload.get("repository") or {}).get("default_branch"))
        app, settings = self.store.find_app_by_repo(repo)
        if app is None:
            app = self.register(repo, branch, default_branch)
            if app is None:
                return 200, {"ignored": "unknown repository %s" % repo}
            settings = self.store.load_app(app)
        wanted = settings.get("BRANCH") or default_branch
        if branch != wanted:
            return 200, {"ignored": "push to %s; %s deploys %s"
                                    % (_clip(branch), app, _clip(wanted))}
        record = self.deployer.new_deploy(
            app, "production", sha, branch, "push", repo=repo,
            forced=payload.get("forced") is True,
            pusher=_clip(_text((payload.get("pusher") or {}).get("name"))),
            message=_clip(_text((payload.get("head_commit") or {}).get("message")),
                          500))
        self.runner.submit(record)
        return 202, {"deploy": record["id"], "app": app, "environment": "production",
                     "sha": sha}

    def register(self, repo, branch, default_branch):
        """Register repo as an app on a push to its default branch, if allowed."""
        owner = repo.split("/", 1)[0].lower()
        if owner not in self.settings.allowed_owners or branch != default_branch:
            return None
        low, high = self.settings.port_range
        taken = [s.get("PORT") for s in self.store.load_apps().values()
                 if (s.get("PORT") or "").isdigit()]
        port = self.store.allocate_port("repo:" + repo.lower(), low, high, taken)
        name = store.sanitize_name(repo.split("/", 1)[1])
        domain = ("%s.%s" % (name, self.settings.base_domain)
                  if self.settings.base_domain else "")
        git_url = "%s/%s.git" % (self.settings.git_base_url.rstrip("/"), repo)
        app = self.store.register_app(repo, port, domain, git_url)
        log.info("registered %s as app %s on port %d", repo, app, port)
        return app

    # -- the JSON API --

    def check_bearer(self, environ):
        tokens = [t for t in (self.settings.api_token, self.control_token) if t]
        if not tokens:
            raise HTTPError(503, "the API is off: set DOCKRUNE_API_TOKEN")
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = given.partition(" ")
        ok = False
        for expected in tokens:
            ok |= hmac.compare_digest(token.strip().encode(), expected.encode())
        if scheme.lower() != "bearer" or not ok:
            raise HTTPError(401, "a valid bearer token is needed",
                            [("WWW-Authenticate", 'Bearer realm="dockrune"')])

    def api(self, method, path, environ):
        parts = path.split("/")
        if parts == ["apps"]:
            _allow(method, "GET")
            return _json(200, self.store.statuses())
        if len(parts) >= 2 and parts[0] == "apps":
            app = parts[1]
            if not store.is_name(app) or self.load_app(app) is None:
                raise HTTPError(404, "no app %s" % _clip(app))
            return self.api_app(method, app, parts[2:], environ)
        if len(parts) in (2, 3) and parts[0] == "deploys":
            record = self.store.deploy(parts[1])
            if record is None:
                raise HTTPError(404, "no deploy %s" % _clip(parts[1]))
            _allow(method, "GET")
            if len(parts) == 2:
                return _json(200, record)
            if parts[2] == "log":
                return self.api_log(record, environ)
        raise HTTPError(404, "not found")

    def api_app(self, method, app, rest, environ):
        if not rest:
            _allow(method, "GET")
            return _json(200, [s for s in self.store.statuses() if s["app"] == app])
        if rest == ["deploys"]:
            _allow(method, "GET")
            return _json(200, self.store.history(app))
        if rest == ["deploy"]:
            _allow(method, "POST")
            form = _read_form(environ)
            return self.manual_deploy(app, form.get("ref") or None,
                                      form.get("environment") or "production")
        if rest == ["stop"]:
            _allow(method, "POST")
            env = _read_form(environ).get("environment") or "production"
            self.runner.submit({"action": "stop", "app": app, "environment": env})
            return _json(202, {"stopping": app, "environment": env})
        raise HTTPError(404, "not found")

    def manual_deploy(self, app, ref, env):
        if ref is not None and not _REF_RE.match(ref):
            raise HTTPError(400, "ref %s is not a branch, tag or sha" % _clip(ref))
        if not store.is_name(env):
            raise HTTPError(400, "environment %s is not a name" % _clip(env))
        sha = ref if ref and _SHA_RE.match(ref) else None
        record = self.deployer.new_deploy(app, env, sha, ref, "manual")
        self.runner.submit(record)
        return _json(202, {"deploy": record["id"], "app": app, "environment": env,
                           "ref": ref})

    def api_log(self, record, environ):
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        try:
            offset = max(0, int(query.get("offset", ["0"])[0]))
        except ValueError:
            raise HTTPError(400, "offset must be a whole number") from None
        data = b""
        try:
            with open(record["log"], "rb") as f:
                f.seek(offset)
                data = f.read(1024 * 1024)
        except FileNotFoundError:
            pass
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("X-Log-Offset", str(offset + len(data))),
                   ("X-Deploy-Status", record["status"])]
        return 200, headers, data

    def load_app(self, app):
        try:
            return self.store.load_app(app)
        except store.EnvFileError as e:
            raise HTTPError(500, str(e)) from e


# -- helpers -----------------------------------------------------------------------


def _allow(method, *allowed):
    if method not in allowed:
        raise HTTPError(405, "use %s" % " or ".join(allowed),
                        [("Allow", ", ".join(allowed))])


def _json(status, data):
    body = json.dumps(data, indent=1).encode("utf-8") + b"\n"
    return status, [("Content-Type", "application/json")], body


def _read_body(environ, limit):
    """Read the request body, refusing one over limit before reading it."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        raise HTTPError(411, "a Content-Length is needed") from None
    if length < 0:
        raise HTTPError(400, "bad Content-Length")
    if length > limit:
        raise HTTPError(413, "body over %d bytes" % limit)
    return environ["wsgi.input"].read(length) if length else b""


def _parse_payload(body, content_type):
    """Parse a webhook body sent as JSON or as a form with a payload= field."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        if "payload" not in fields:
            raise HTTPError(400, "form body without a payload field")
        body = fields["payload"][0].encode("utf-8")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPError(400, "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise HTTPError(400, "body is not a JSON object")
    return payload


def _read_form(environ):
    """Read a small JSON or form body of an API call as a dict of strings."""
    body = _read_body(environ, MAX_API_BODY) if environ.get("CONTENT_LENGTH") else b""
    if not body.strip():
        return {}
    kind = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            raise HTTPError(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "body is not a JSON object")
        return {k: v for k, v in data.items() if isinstance(v, str)}
    fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    return {k: v[0] for k, v in fields.items()}


def _text(value):
    return value if isinstance(value, str) else ""


def _clip(text, limit=100):
    text = _printable(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _printable(text):
    """Escape control characters so that outside text cannot forge log lines."""
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256
                   else "\\u%04x" % ord(c) for c in text)
