"""The WSGI application: routing, GitHub webhook intake, admin pages, JSON API.

The webhook handler only verifies, records, enqueues and answers: it never runs
git, docker or node and never calls out over the network.  Everything slow
happens in the runner's worker threads.

The admin pages (/admin) sit behind HTTP Basic auth; their only state-changing
requests are POST forms that carry a CSRF token and must come from this same
origin.  Every piece of outside text is HTML-escaped by fill(): a value is
inserted raw only when it is a Markup fragment built from admin.html itself.
"""

import base64
import binascii
import datetime
import fnmatch
import hashlib
import hmac
import html
import json
import logging
import os
import re
import secrets
import string
import time
import urllib.parse

import health
import poll
import runners
import store
import swarm

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
    303: "303 See Other", 401: "401 Unauthorized", 403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed", 411: "411 Length Required",
    413: "413 Payload Too Large", 415: "415 Unsupported Media Type",
    500: "500 Internal Server Error", 503: "503 Service Unavailable",
}


# Sent with every response; admin pages replace the CSP with one that allows
# their own inline style and script by nonce, and nothing from elsewhere.
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # same-origin keeps the Referer (and a real Origin) on our own form posts,
    # which the CSRF check reads, and sends nothing to other sites.
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]
PLAIN_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
PAGE_CSP = ("default-src 'none'; script-src 'nonce-{0}'; style-src 'nonce-{0}'; "
            "img-src 'self'; connect-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
ADMIN_USER = "admin"
MAX_LOG_PAGE = 2 * 1024 * 1024
ADMIN_DEPLOYS = 50


class Markup(str):
    """HTML built from admin.html's own sections: fill() inserts it unescaped."""


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
        # Signs the admin forms' CSRF token.  New on every start: a page left
        # open across a restart must be reloaded before its buttons work.
        self._csrf_key = secrets.token_bytes(32)
        self.templates = load_templates()

    def __call__(self, environ, start_response):
        as_text = (environ.get("PATH_INFO") or "").startswith("/admin")
        try:
            status, headers, body = self.route(environ)
        except HTTPError as e:
            status, headers, body = (_plain(e.status, e.message) if as_text else
                                     _json(e.status, {"error": e.message}))
            headers += e.headers
        except Exception:
            log.exception("%s %s failed", environ.get("REQUEST_METHOD"),
                          _printable(environ.get("PATH_INFO", ""))[:200])
            message = "internal error; see the dockrune log"
            status, headers, body = (_plain(500, message) if as_text else
                                     _json(500, {"error": message}))
        if not any(name == "Content-Security-Policy" for name, _v in headers):
            headers.append(("Content-Security-Policy", PLAIN_CSP))
        headers += SECURITY_HEADERS
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
        if path == "/admin" or path.startswith("/admin/"):
            self.check_basic(environ)
            return self.admin(method, path[len("/admin"):].strip("/"), environ)
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
        if delivery and not self.store.claim_delivery(delivery):
            return _json(200, {"ignored": "duplicate delivery %s" % delivery})
        try:
            status, answer = self.route_event(event, payload)
        except Exception:
            # Not acted on: a redelivery of it must be allowed to try again.
            if delivery:
                self.store.release_delivery(delivery)
            raise
        log.info("delivery %s (%s): %s", delivery or "-", _printable(event)[:40],
                 answer.get("ignored") or "deploy %s" % answer.get("deploy"))
        return _json(status, answer)

    def route_event(self, event, payload):
        """Act on one verified event; return (HTTP status, JSON answer)."""
        if event == "ping":
            return 200, {"message": "pong"}
        if event == "push":
            return self.on_push(payload)
        if event == "pull_request":
            return self.on_pull_request(payload)
        if event == "delete":
            return self.on_delete(payload)
        return 200, {"ignored": "event %s" % _printable(event)[:40] or "no event"}

    def on_push(self, payload):
        ref = _text(payload.get("ref"))
        repo = _text((payload.get("repository") or {}).get("full_name"))
        if ref.startswith("refs/tags/"):
            return 200, {"ignored": "tag push"}
        if payload.get("deleted") or _text(payload.get("after")) == ZERO_SHA:
            if ref.startswith("refs/heads/"):
                return self.on_branch_gone(repo, ref[len("refs/heads/"):])
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
        env = "production"
        if branch != wanted:
            env = branch_environment(settings, branch)
            if env is None:
                return 200, {"ignored": "push to %s; %s deploys %s"
                                        % (_clip(branch), app, _clip(wanted))}
        def make_record():
            return self.deployer.new_deploy(
                app, env, sha, branch, "push", repo=repo,
                forced=payload.get("forced") is True,
                pusher=_clip(_text((payload.get("pusher") or {}).get("name"))),
                message=_clip(_text((payload.get("head_commit") or {}).get(
                    "message")), 500))

        if poll.poll_enabled(self.settings, settings):
            # The poller may have seen this push already: deploy it once.
            record = self.runner.submit_new(app, env, sha, make_record)
            if record is None:
                return 200, {"ignored": "%s is live or on its way in %s/%s"
                                        % (sha[:12], app, env)}
        else:
            record = self.runner.submit(make_record())
        return 202, {"deploy": record["id"], "app": app, "environment": env,
                     "sha": sha}

    # -- previews --

    def on_pull_request(self, payload):
        """Deploy, hold for approval, or tear down the preview of a pull request."""
        action = _text(payload.get("action"))
        pr = payload.get("pull_request") or {}
        number = payload.get("number", pr.get("number"))
        repo = _text((payload.get("repository") or {}).get("full_name"))
        if not isinstance(number, int) or isinstance(number, bool) or number <= 0:
            raise HTTPError(400, "pull_request without a valid number")
        if not store.is_repo(repo):
            return 200, {"ignored": "invalid repository name %s" % _clip(repo)}
        app, settings = self.store.find_app_by_repo(repo)
        if app is None:
            return 200, {"ignored": "unknown repository %s" % repo}
        env = "pr-%d" % number
        if action == "closed":
            return self.tear_down(app, env, "pull request #%d closed" % number)
        if action not in ("opened", "reopened", "synchronize"):
            return 200, {"ignored": "pull_request %s" % _clip(action, 40)}
        if not _switch_on(settings.get("PREVIEWS", "on")):
            return 200, {"ignored": "previews are off for %s" % app}
        head = pr.get("head") or {}
        sha = _text(head.get("sha"))
        if not _SHA_RE.match(sha):
            raise HTTPError(400, "pull_request without a valid head sha")
        facts = {"pr": number, "repo": repo,
                 "title": _clip(_text(pr.get("title")), 200),
                 "author": _clip(_text((pr.get("user") or {}).get("login"))),
                 "pr_url": _clip(_text(pr.get("html_url")), 300)}
        head_repo = _text((head.get("repo") or {}).get("full_name"))
        if head_repo.lower() != repo.lower() and not _switch_on(
                settings.get("PREVIEW_FORKS", "off")):
            return self.hold_for_approval(app, env, sha, head, facts)
        self.store.drop_approval(app, env)
        record = self.deployer.new_deploy(app, env, sha, _clip(_text(head.get("ref"))),
                                          "pull_request", **facts)
        self.runner.submit(record)
        return 202, {"deploy": record["id"], "app": app, "environment": env,
                     "sha": sha}

    def hold_for_approval(self, app, env, sha, head, facts):
        """Record a fork's pull request; nothing of it runs until approved."""
        request = dict(facts, app=app, environment=env, sha=sha,
                       ref=_clip(_text(head.get("ref"))),
                       fork=_clip(_text((head.get("repo") or {}).get("full_name"))))
        self.store.request_approval(request)
        self.deployer.notify("approval-needed", request)
        log.info("preview %s/%s from a fork waits for approval of %s", app, env, sha)
        return 202, {"waiting": "approval", "app": app, "environment": env,
                     "sha": sha}

    def on_delete(self, payload):
        if _text(payload.get("ref_type")) != "branch":
            return 200, {"ignored": "%s deleted" % _clip(_text(payload.get("ref_type")))}
        repo = _text((payload.get("repository") or {}).get("full_name"))
        return self.on_branch_gone(repo, _text(payload.get("ref")))

    def on_branch_gone(self, repo, branch):
        """Tear down the preview of a deleted branch, if there is one."""
        if not store.is_repo(repo):
            return 200, {"ignored": "invalid repository name %s" % _clip(repo)}
        app, settings = self.store.find_app_by_repo(repo)
        env = branch_environment(settings, branch) if app else None
        if env is None or self.store.environment(app, env) is None:
            return 200, {"ignored": "branch deleted"}
        return self.tear_down(app, env, "branch %s deleted" % _clip(branch))

    def tear_down(self, app, env, reason):
        self.store.drop_approval(app, env)
        if self.store.environment(app, env) is None:
            return 200, {"ignored": "%s has no preview %s" % (app, env)}
        self.runner.submit({"action": "teardown", "app": app, "environment": env,
                            "reason": reason})
        return 202, {"teardown": env, "app": app, "reason": reason}

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
            ok |= _same_secret(token.strip(), expected)
        if scheme.lower() != "bearer" or not ok:
            if not self.settings.api_token:
                # Only the CLI's own token is set: say how to turn the API on.
                raise HTTPError(503, "the API is off: set DOCKRUNE_API_TOKEN")
            raise HTTPError(401, "a valid bearer token is needed",
                            [("WWW-Authenticate", 'Bearer realm="dockrune"')])

    def api(self, method, path, environ):
        parts = path.split("/")
        if parts == ["apps"]:
            _allow(method, "GET")
            return _json(200, _public(self.status_rows()))
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
            return _json(200, _public(self.status_rows(app)))
        if rest == ["deploys"]:
            _allow(method, "GET")
            limit = _query_number(environ, "limit", 50)
            return _json(200, self.store.history(app, limit=max(1, min(limit, 1000))))
        if rest == ["deploy"]:
            _allow(method, "POST")
            form = _read_form(environ)
            env = form.get("environment") or "production"
            self.known_environment(app, env)
            return self.manual_deploy(app, form.get("ref") or None, env)
        if rest == ["rollback"]:
            _allow(method, "POST")
            return self.rollback(app, _read_form(environ))
        if rest == ["stop"]:
            _allow(method, "POST")
            env = _read_form(environ).get("environment") or "production"
            self.known_environment(app, env)
            self.runner.submit({"action": "stop", "app": app, "environment": env})
            log.info("stop of %s/%s asked through the API", app, env)
            return _json(202, {"stopping": app, "environment": env})
        raise HTTPError(404, "not found")

    def manual_deploy(self, app, ref, env, trigger="manual"):
        if ref is not None and not _REF_RE.match(ref):
            raise HTTPError(400, "ref %s is not a branch, tag or sha" % _clip(ref))
        if not store.is_name(env):
            raise HTTPError(400, "environment %s is not a name" % _clip(env))
        sha = ref if ref and _SHA_RE.match(ref) else None
        record = self.deployer.new_deploy(app, env, sha, ref, trigger)
        self.runner.submit(record)
        log.info("deploy %s of %s/%s asked (%s)", record["id"], app, env, trigger)
        return _json(202, {"deploy": record["id"], "app": app, "environment": env,
                           "ref": ref})

    def rollback(self, app, form):
        env = form.get("environment") or "production"
        deploy_id = form.get("deploy") or None
        if not store.is_name(env):
            raise HTTPError(400, "environment %s is not a name" % _clip(env))
        if deploy_id is not None and not store.is_deploy_id(deploy_id):
            raise HTTPError(400, "deploy %s is not a deploy id" % _clip(deploy_id))
        try:
            record = self.deployer.new_rollback(app, env, deploy_id)
        except runners.DeployError as e:
            raise HTTPError(409, str(e)) from None
        self.runner.submit(record)
        return _json(202, {"deploy": record["id"], "app": app, "environment": env,
                           "rollback_to": record["rollback_to"],
                           "sha": record["sha"]})

    def known_environment(self, app, env):
        """Return app/env's summary ({} for a production never deployed).

        Raises HTTPError 400 for a malformed name and 404 for an environment
        that does not exist, so that nothing is started for it.
        """
        if not store.is_name(env):
            raise HTTPError(400, "environment %s is not a name" % _clip(env))
        summary = self.store.environment(app, env)
        if summary is None and env != "production":
            raise HTTPError(404, "%s has no environment %s" % (app, env))
        return summary or {}

    def api_log(self, record, environ, whole_lines=False):
        """Answer the log's bytes from ?offset= on, at most 1 MiB at a time.

        X-Log-Offset is where to ask next; X-Deploy-Status was read before
        the file, so once it is final the bytes sent are the last ones.
        With whole_lines, a chunk ends at a line break (never inside a
        UTF-8 character) unless one line fills it all.
        """
        offset = _query_number(environ, "offset", 0)
        limit = 1024 * 1024
        data = b""
        try:
            with open(record["log"], "rb") as f:
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            pass
        if whole_lines:
            cut = data.rfind(b"\n") + 1
            if cut or len(data) < limit:
                data = data[:cut]
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("X-Log-Offset", str(offset + len(data))),
                   ("X-Deploy-Status", record["status"])]
        return 200, headers, data

    def load_app(self, app):
        try:
            return self.store.load_app(app)
        except store.EnvFileError as e:
            raise HTTPError(500, str(e)) from e

    def status_rows(self, app=None, envs=None, samples=None):
        """Return status --json's rows (of one app, or all) with health added."""
        envs = self.store.environments() if envs is None else envs
        samples = self.store.health_samples() if samples is None else samples
        now = time.time()
        rows = []
        for row in self.store.statuses(envs):
            if app is not None and row["app"] != app:
                continue
            key = "%s/%s" % (row["app"], row["environment"])
            entry = samples.get(key) or {}
            pairs = health.day_slots(entry, now)
            total = sum(t for _u, t in pairs)
            share = sum(u for u, _t in pairs) / total if total else None
            row.update(ref=(envs.get(key) or {}).get("ref"),
                       health=(envs.get(key) or {}).get("health"),
                       checked_at=entry.get("checked_at"),
                       uptime_24h=None if share is None else round(share * 100, 2))
            row[_SLOTS] = pairs
            rows.append(row)
        return swarm.annotate(poll.annotate(rows, self.store, self.settings),
                             self.store)

    # -- the admin pages --

    def check_basic(self, environ):
        """Let the admin in, or raise 401 (503 while no password is set)."""
        password = self.settings.admin_password
        if not password:
            raise HTTPError(503, "/admin is off: set DOCKRUNE_ADMIN_PASSWORD in "
                                 "dockrune.env or the environment, then restart "
                                 "dockrune")
        scheme, _, encoded = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            decoded = ""
        user, _, given = decoded.partition(":")
        # Both comparisons always run, on digests of equal length, so that
        # the time taken says nothing about which part was wrong or how long
        # the password is.
        ok = _same_secret(user, ADMIN_USER) & _same_secret(given, password)
        if scheme.lower() != "basic" or not ok:
            raise HTTPError(401, "log in as admin with DOCKRUNE_ADMIN_PASSWORD", [
                ("WWW-Authenticate", 'Basic realm="dockrune", charset="UTF-8"')])

    def check_same_origin(self, environ):
        """Refuse (403) a POST whose Origin, or else Referer, is another site."""
        origin = environ.get("HTTP_ORIGIN", "")
        if not origin:
            referer = urllib.parse.urlsplit(environ.get("HTTP_REFERER", ""))
            origin = "%s://%s" % (referer.scheme, referer.netloc) if (
                referer.scheme and referer.netloc) else ""
        netloc = urllib.parse.urlsplit(origin).netloc.lower() if origin else ""
        allowed = {(environ.get("HTTP_HOST") or "%s:%s" % (
            environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", ""))).lower()}
        if self.settings.public_url:
            allowed.add(urllib.parse.urlsplit(self.settings.public_url).netloc.lower())
        if not netloc or netloc not in allowed:
            log.warning("refused a cross-site admin POST from %s",
                        _clip(origin) or "an unknown origin")
            raise HTTPError(403, "cross-site request refused: post the form from "
                                 "dockrune's own admin page")

    def csrf_token(self):
        return hmac.new(self._csrf_key, b"dockrune admin form",
                        hashlib.sha256).hexdigest()

    def admin(self, method, path, environ):
        parts = path.split("/") if path else []
        if not parts:
            _allow(method, "GET")
            return self.page_overview()
        if parts[0] == "apps" and len(parts) in (2, 3):
            app = parts[1]
            if not store.is_name(app) or self.load_app(app) is None:
                raise HTTPError(404, "no app %s" % _clip(app))
            if len(parts) == 2:
                _allow(method, "GET")
                return self.page_app(app)
            if parts[2] not in ADMIN_ACTIONS:
                raise HTTPError(404, "not found")
            _allow(method, "POST")
            return self.admin_action(app, parts[2], environ)
        if parts[0] == "deploys" and len(parts) in (2, 3):
            record = self.store.deploy(parts[1])
            if record is None:
                raise HTTPError(404, "no deploy %s" % _clip(parts[1]))
            _allow(method, "GET")
            if len(parts) == 2:
                return self.page_log(record)
            if parts[2] == "log":
                return self.api_log(record, environ, whole_lines=True)
        raise HTTPError(404, "not found")

    def admin_action(self, app, action, environ):
        """Run a form button: Redeploy, Start or Stop; answer a redirect."""
        self.check_same_origin(environ)
        form = _read_form(environ)
        if not hmac.compare_digest(form.get("csrf", "").encode("utf-8"),
                                   self.csrf_token().encode()):
            log.warning("refused an admin POST without a valid CSRF token")
            raise HTTPError(403, "the form's CSRF token is missing or stale: "
                                 "reload the page and try again")
        env = form.get("environment") or "production"
        if action == "approve":
            return self.approve(app, env, form.get("sha", ""))
        summary = self.known_environment(app, env)
        if action == "stop":
            self.runner.submit({"action": "stop", "app": app, "environment": env})
            log.info("stop of %s/%s asked on the admin page", app, env)
            return _redirect("/admin/apps/%s" % app)
        # Redeploy takes the newest commit of the environment's branch; Start
        # brings back the very commit that was stopped.  A pull request's
        # preview is redeployed at its commit: its branch may live in a fork,
        # whose new commits come by webhook (and may need an approval).
        ref = summary.get("ref") if summary.get("ref") and _REF_RE.match(
            summary["ref"]) else None
        pull_request = re.fullmatch(r"pr-[0-9]+", env) and summary.get("sha")
        sha = summary.get("sha") if action == "start" or pull_request else None
        record = self.deployer.new_deploy(app, env, sha, ref, "admin")
        self.runner.submit(record)
        log.info("deploy %s of %s/%s asked on the admin page (%s)", record["id"],
                 app, env, action)
        return _redirect("/admin/deploys/%s" % record["id"])

    def approve(self, app, env, sha):
        """Deploy the held preview of a fork's pull request, for that sha only."""
        if not store.is_name(env) or not _SHA_RE.match(sha):
            raise HTTPError(400, "approve needs an environment and a full sha")
        request = self.store.take_approval(app, env, sha)
        if request is None:
            raise HTTPError(409, "nothing waits for approval of %s in %s/%s: a newer "
                                 "commit needs its own approval" % (sha, app, env))
        facts = {k: request[k] for k in ("pr", "repo", "title", "author", "pr_url",
                                         "fork") if k in request}
        record = self.deployer.new_deploy(app, env, sha, request.get("ref"),
                                          "approved", **facts)
        self.runner.submit(record)
        log.info("preview %s/%s at %s approved on the admin page", app, env, sha)
        return _redirect("/admin/deploys/%s" % record["id"])

    def approval_rows(self, csrf):
        held = self.store.approvals()
        if not held:
            return Markup("")
        rows = [self.fill("approval_row", app=r["app"], environment=r["environment"],
                          title=r.get("title") or "", sha=r["sha"],
                          short_sha=r["sha"][:12], fork=r.get("fork") or "",
                          ref=r.get("ref") or "", csrf=csrf)
                for _key, r in sorted(held.items())]
        return self.fill("approvals", rows=Markup("\n".join(rows)))

    def page_overview(self):
        # Two state files and the apps' .env files: nothing here reads deploy
        # records, so the page costs the same after a thousand deploys.
        envs = self.store.environments()
        samples = self.store.health_samples()
        rows = self.status_rows(envs=envs, samples=samples)
        now = time.time()
        csrf = self.csrf_token()
        counts = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        summary = "%d apps, %d environments: %s" % (
            len({r["app"] for r in rows}), len(rows), ", ".join(
                "%d %s" % (counts[s], s) for s in store.ENV_STATUSES if s in counts)
            or "nothing deployed yet")
        body = self.fill("overview", summary=summary, notice=self.notice(),
                         approvals=self.approval_rows(csrf),
                         rows=Markup("\n".join(self.env_row(r, now, csrf)
                                                for r in rows)) or self.fill("empty"))
        return self.page("Apps", body)

    def page_app(self, app):
        now = time.time()
        samples = self.store.health_samples()
        rows = self.status_rows(app, samples=samples)
        csrf = self.csrf_token()
        settings = self.load_app(app) or {}
        deploys = [self.deploy_row(r, now)
                   for r in self.store.history(app, limit=ADMIN_DEPLOYS)]
        body = self.fill("app", app=app, repo=settings.get("REPO") or "-",
                         branch=settings.get("BRANCH") or "the default branch",
                         notice=self.notice(),
                         rows=Markup("\n".join(self.env_row(r, now, csrf)
                                                for r in rows)),
                         deploys=Markup("\n".join(deploys)) or self.fill("no_deploys"))
        return self.page(app, body, crumbs=self.fill("crumbs_app", app=app))

    def page_log(self, record):
        text, offset = _read_log_tail(record["log"], MAX_LOG_PAGE)
        active = record["status"] in store.ACTIVE
        body = self.fill(
            "log", id=record["id"], app=record["app"],
            environment=record["environment"], commit=self.commit_link(record),
            ref=record.get("ref") or "", message=record.get("message") or "",
            trigger=record.get("trigger") or "", status=record["status"],
            error=record.get("error") or "",
            when=self.when(record.get("started_at") or record["created_at"],
                           time.time()),
            offset=offset, log=text if text or active else "(nothing logged)\n")
        crumbs = self.fill("crumbs_deploy", app=record["app"], id=record["id"])
        return self.page("Deploy %s" % record["id"], body, crumbs=crumbs,
                         head=self.fill("log_noscript") if active else Markup(""),
                         script="log_script")

    def page(self, title, body, crumbs=Markup(""), head=Markup(""), script=None):
        """Return a whole admin page: status, headers with a fresh nonce, body."""
        nonce = secrets.token_urlsafe(16)
        text = self.fill("page", title=title, nonce=nonce, crumbs=crumbs, head=head,
                         body=body, script=self.fill(script, nonce=nonce)
                         if script else Markup(""))
        headers = [("Content-Type", "text/html; charset=utf-8"),
                   ("Content-Security-Policy", PAGE_CSP.format(nonce))]
        return 200, headers, text.encode("utf-8")

    def fill(self, name, **values):
        """Fill the admin.html section name; escape every value but Markup."""
        return Markup(self.templates[name].substitute(
            {k: v if isinstance(v, Markup) else _escape(v) for k, v in values.items()}))

    def notice(self):
        if self.settings.health_interval > 0:
            return Markup("")
        return self.fill("health_off")

    def env_row(self, row, now, csrf):
        status = row["status"]
        buttons = self.fill("buttons_stopped" if status == "stopped" else
                            "buttons_running", app=row["app"], csrf=csrf,
                            environment=row["environment"])
        domain = Markup('<a href="https://%s">%s</a>' % (
            html.escape(row["domain"]), html.escape(row["domain"]))) if (
            row["domain"]) else "-"
        return self.fill(
            "env_row", anchor="%s-%s" % (row["app"], row["environment"]),
            app=row["app"], repo=row["repo"] or "", environment=row["environment"],
            ref=row.get("ref") or "", status=status, badge=self.fill(
                "badge_linked", status=status, deploy=row["last_deploy"])
            if store.is_deploy_id(row["last_deploy"]) else self.fill(
                "badge", status=status), commit=self.commit_link(row),
            when=self.when(row["deployed_at"], now), port=row["port"] or "-",
            domain=domain, uptime=self.uptime_bar(row), buttons=buttons,
            replicas=Markup('<div class="muted mono">%s replicas</div>' % html.escape(
                row["replicas"])) if row.get("replicas") else "")

    def deploy_row(self, record, now):
        duration = record.get("duration")
        return self.fill(
            "deploy_row", id=record["id"], environment=record["environment"],
            commit=self.commit_link(record), ref=record.get("ref") or "",
            message=record.get("message") or "", trigger=record.get("trigger"),
            status=record["status"], error=record.get("error") or "",
            duration="%.1f s" % duration if isinstance(duration, (int, float))
            else "-", when=self.when(record.get("started_at") or
                                      record.get("created_at"), now))

    def commit_link(self, item):
        """Return the short sha, linked to the commit when the repo is on the web."""
        sha = item.get("sha")
        if not sha:
            return Markup('<span class="muted">-</span>')
        base = self.settings.git_base_url.rstrip("/")
        short = html.escape(sha[:7])
        if not (store.is_repo(item.get("repo") or "") and _SHA_RE.match(sha)
                and base.startswith(("https://", "http://"))):
            return Markup('<code title="%s">%s</code>' % (html.escape(sha), short))
        href = "%s/%s/commit/%s" % (base, item["repo"], sha)
        return Markup('<a href="%s" title="%s"><code>%s</code></a>' % (
            html.escape(href), html.escape(sha), short))

    def when(self, iso, now):
        """Return a <time> saying how long ago iso was, the exact time on hover."""
        if not iso:
            return Markup('<span class="muted">never</span>')
        return Markup('<time datetime="%s" title="%s">%s</time>' % (
            html.escape(iso), html.escape(iso.replace("T", " ").replace(
                "Z", " UTC")), html.escape(_ago(iso, now))))

    def uptime_bar(self, row):
        """Return the 24-hour uptime as a small SVG: one bar per half hour."""
        pairs = row[_SLOTS]
        bars, start, previous = [], 0, None
        # One rect per run of half hours of the same colour: a day that was
        # all up is a single element, which keeps 200 rows light.
        for x, (up, total) in enumerate(pairs + [(-1, -1)]):
            colour = (_END if total < 0 else _NONE if not total else
                      _UP if up == total else _DOWN if not up else _SOME)
            if colour is not previous:
                if previous is not None:
                    bars.append('<rect x="%d" width="%d" height="7" fill="%s"/>'
                                % (start, x - start, previous))
                start, previous = x, colour
        share = row.get("uptime_24h")
        text = "-" if share is None else "%.1f%%" % share
        return self.fill("uptime", slots=len(pairs), bars=Markup("".join(bars)),
                         share=text, label="uptime over 24 hours: %s" % (
                             "no checks yet" if share is None else text))

# -- admin helpers -------------------------------------------------------------------

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "admin.html")
_SECTION_RE = re.compile(r"^<!-- @([a-z_]+) -->$")
ADMIN_ACTIONS = ("redeploy", "start", "stop", "approve")
# The key under which status_rows() hands the uptime slots to the pages; the
# API drops it.
_SLOTS = "_slots"
UPTIME_COLOURS = {"none": "#d0d7de", "up": "#2da44e", "down": "#cf222e",
                  "some": "#d4a72c"}
_NONE, _UP, _DOWN, _SOME = (UPTIME_COLOURS[k] for k in ("none", "up", "down", "some"))
_END = "end"


def load_templates(path=TEMPLATE_PATH):
    """Return {name: string.Template} for every "<!-- @name -->" section of path."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    sections, name = {}, None
    for line in lines:
        match = _SECTION_RE.match(line.strip())
        if match:
            name = match.group(1)
            sections[name] = []
        elif name:
            sections[name].append(line)
    return {key: string.Template("\n".join(body).strip("\n") + "\n")
            for key, body in sections.items()}


_SPECIAL_RE = re.compile(r"[&<>\"']")


def _escape(value):
    """Return value as HTML text; the common case, nothing to escape, is fast."""
    if value is None:
        return ""
    text = str(value)
    return html.escape(text) if _SPECIAL_RE.search(text) else text


def _public(rows):
    """Return status rows without the keys that are only for the pages."""
    for row in rows:
        row.pop(_SLOTS, None)
    return rows


def _same_secret(given, expected):
    """Compare two secrets in time that does not depend on where they differ."""
    return hmac.compare_digest(hashlib.sha256(given.encode("utf-8")).digest(),
                               hashlib.sha256(expected.encode("utf-8")).digest())


def _read_log_tail(path, limit):
    """Return (text, offset): the log's whole lines within its last limit bytes.

    offset is the byte position just after the text, where following resumes.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - limit)
            f.seek(start)
            data = f.read(limit)
    except FileNotFoundError:
        return "", 0
    end = start + data.rfind(b"\n") + 1
    data = data[:end - start]
    prefix = ""
    if start:
        # Begin at a line start; say what is left out rather than hide it.
        data = data[data.find(b"\n") + 1:]
        prefix = "[the first %d bytes are not shown]\n" % (end - len(data))
    return prefix + data.decode("utf-8", "replace"), end


def _ago(iso, now):
    """Return '3 min ago' for an ISO 8601 UTC time; the text itself if unparsable."""
    try:
        then = datetime.datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return str(iso)
    seconds = int(now - then)
    if seconds < 60:
        return "just now" if seconds < 10 else "%d s ago" % seconds
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return "%d %s ago" % (seconds // size, unit)
    return "just now"


def _redirect(location):
    return 303, [("Location", location),
                 ("Content-Type", "text/plain; charset=utf-8")], b"see " + (
        location.encode("utf-8")) + b"\n"


def _plain(status, message):
    return status, [("Content-Type", "text/plain; charset=utf-8")], (
        message.encode("utf-8") + b"\n")


def _query_number(environ, name, default):
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    try:
        return max(0, int(query.get(name, [str(default)])[0]))
    except ValueError:
        raise HTTPError(400, "%s must be a whole number" % name) from None


# -- helpers -----------------------------------------------------------------------


def branch_environment(settings, branch):
    """Return the preview environment of branch when PREVIEW_BRANCHES matches it.

    PREVIEW_BRANCHES holds shell-style patterns separated by spaces
    ("feature/* fix-*").  The environment is "branch-<name>", with the name
    passed through the one sanitiser; a branch that leaves no usable name
    gets no preview.
    """
    patterns = (settings or {}).get("PREVIEW_BRANCHES", "").split()
    if not branch or not any(fnmatch.fnmatchcase(branch, p) for p in patterns):
        return None
    try:
        name = store.sanitize_name("branch-" + branch)
    except ValueError:
        return None
    if name == "branch":
        return None
    if len(name) == store.MAX_NAME:
        # Cut short: two long branches alike at the start must not share one.
        digest = hashlib.sha256(branch.encode("utf-8", "replace")).hexdigest()[:8]
        name = "%s-%s" % (name[:store.MAX_NAME - 9].rstrip("-"), digest)
    return name


def _switch_on(value):
    return value.strip().lower() in ("on", "true", "yes", "1")


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
        except (ValueError, RecursionError):
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
