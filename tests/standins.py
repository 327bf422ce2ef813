"""Local HTTP servers that behave like GitHub, Coach Artie, Discord and n8n.

Each records every request it gets.  Whatever the real service would refuse
(a body that fails GitHub's own OpenAPI schema, a Discord message over a
documented limit, a request during a rate-limit wait) is answered the way the
service answers it and also noted in `problems`, so a test can assert that
dockrune never provoked it.
"""

import http.server
import json
import os
import re
import threading
import time

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OPENAPI = os.path.join(FIXTURES, "github", "openapi")


# -- a validator for the part of JSON Schema GitHub's OpenAPI files use ------------

# Keywords that only annotate; everything else must be understood or the
# validator refuses to pass a body it did not really check.
_ANNOTATIONS = {"description", "default", "example", "examples", "title", "format",
                "deprecated", "readOnly", "writeOnly", "externalDocs"}
_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list}


def validate(value, schema, where="$"):
    """Return a list of problems of value against an OpenAPI 3.0 schema.

    OpenAPI 3.0's `nullable: true` lets null through, which plain JSON Schema
    would not.  Keywords this validator does not know are problems too.
    """
    if value is None and schema.get("nullable"):
        return []
    problems = []
    for key in schema:
        if key not in _ANNOTATIONS and key not in _CHECKS and key != "nullable":
            problems.append("%s: schema keyword %r is not supported" % (where, key))
    for key, check in _CHECKS.items():
        if key in schema:
            problems += check(value, schema, where)
    return problems


def _check_type(value, schema, where):
    wanted = schema["type"]
    if wanted == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif wanted == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif wanted == "null":
        ok = value is None
    else:
        ok = isinstance(value, _TYPES[wanted])
    return [] if ok else ["%s: expected %s, got %s" % (where, wanted,
                                                      json.dumps(value)[:60])]


def _check_properties(value, schema, where):
    if not isinstance(value, dict):
        return []
    problems = []
    for name, sub in schema["properties"].items():
        if name in value:
            problems += validate(value[name], sub, "%s.%s" % (where, name))
    extra = schema.get("additionalProperties", True)
    for name in value:
        if name in schema["properties"]:
            continue
        if extra is False:
            problems.append("%s: unexpected property %r" % (where, name))
        elif isinstance(extra, dict):
            problems += validate(value[name], extra, "%s.%s" % (where, name))
    return problems


def _check_required(value, schema, where):
    if not isinstance(value, dict):
        return []
    return ["%s: %r is required" % (where, n) for n in schema["required"]
            if n not in value]


def _check_items(value, schema, where):
    if not isinstance(value, list):
        return []
    problems = []
    for n, item in enumerate(value):
        problems += validate(item, schema["items"], "%s[%d]" % (where, n))
    return problems


def _check_enum(value, schema, where):
    return [] if value in schema["enum"] else [
        "%s: %s is not one of %s" % (where, json.dumps(value)[:60], schema["enum"])]


def _check_one_of(value, schema, where):
    passing = sum(1 for sub in schema["oneOf"] if not validate(value, sub, where))
    return [] if passing == 1 else [
        "%s: matches %d of the oneOf schemas, not exactly one" % (where, passing)]


def _check_any_of(value, schema, where):
    if any(not validate(value, sub, where) for sub in schema["anyOf"]):
        return []
    return ["%s: matches none of the anyOf schemas" % where]


def _check_all_of(value, schema, where):
    return [p for sub in schema["allOf"] for p in validate(value, sub, where)]


def _check_min_length(value, schema, where):
    if isinstance(value, str) and len(value) < schema["minLength"]:
        return ["%s: shorter than %d" % (where, schema["minLength"])]
    return []


def _check_max_length(value, schema, where):
    if isinstance(value, str) and len(value) > schema["maxLength"]:
        return ["%s: longer than %d" % (where, schema["maxLength"])]
    return []


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_minimum(value, schema, where):
    if _is_number(value) and value < schema["minimum"]:
        return ["%s: %s below %s" % (where, value, schema["minimum"])]
    return []


def _check_maximum(value, schema, where):
    if _is_number(value) and value > schema["maximum"]:
        return ["%s: %s above %s" % (where, value, schema["maximum"])]
    return []


_CHECKS = {"type": _check_type, "properties": _check_properties,
           "additionalProperties": lambda v, s, w: [], "required": _check_required,
           "items": _check_items, "enum": _check_enum, "oneOf": _check_one_of,
           "anyOf": _check_any_of, "allOf": _check_all_of,
           "minLength": _check_min_length, "maxLength": _check_max_length,
           "minimum": _check_minimum, "maximum": _check_maximum}


def operation(name):
    """Return GitHub's description of one operation from the fixtures."""
    with open(os.path.join(OPENAPI, name + ".json")) as f:
        return json.load(f)


def example(name):
    with open(os.path.join(OPENAPI, "examples", name + ".json")) as f:
        return json.load(f)


# -- a recording server -------------------------------------------------------------


class StandIn:
    """A threaded HTTP server on 127.0.0.1 that records and answers requests."""

    def __init__(self):
        self.requests = []
        self.problems = []
        self.lock = threading.Lock()
        self.delay = 0.0
        self.script = []        # answers to give before the normal ones
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner._handle(self, "GET")

            def do_POST(self):
                owner._handle(self, "POST")

            def do_PATCH(self):
                owner._handle(self, "PATCH")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name="standin-%s" % type(self).__name__,
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer_next(self, *answers):
        """Give these (status, headers, body) answers to the next requests."""
        with self.lock:
            self.script.extend(answers)

    def calls(self, method=None):
        with self.lock:
            return [r for r in self.requests if method is None or r["method"] == method]

    def wait_for(self, predicate, timeout=20.0):
        """Wait until predicate(requests) is true; return the requests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                done = predicate(list(self.requests))
            if done:
                return self.calls()
            time.sleep(0.05)
        raise AssertionError("%s: not there after %ss; got %s" % (
            type(self).__name__, timeout,
            json.dumps([(r["method"], r["path"]) for r in self.calls()], indent=0)))

    def _handle(self, http, method):
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode()) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in http.headers.items()}
        request = {"method": method, "path": http.path, "headers": headers,
                   "body": body, "time": time.time()}
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            scripted = self.script.pop(0) if self.script else None
            if scripted is None:
                status, headers, answer = self.respond(request)
            else:
                status, headers, answer = scripted
            request["status"] = status
            self.requests.append(request)
        data = json.dumps(answer).encode() if answer is not None else b""
        http.send_response(status)
        for name, value in dict(headers or {}).items():
            http.send_header(name, str(value))
        if data:
            http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)

    def respond(self, request):
        raise NotImplementedError

    def problem(self, request, text):
        self.problems.append("%s %s: %s" % (request["method"], request["path"], text))


# -- GitHub ---------------------------------------------------------------------------


GITHUB_ROUTES = (
    ("POST", r"^/repos/[^/]+/[^/]+/deployments$", "repos__create-deployment"),
    ("POST", r"^/repos/[^/]+/[^/]+/deployments/(\d+)/statuses$",
     "repos__create-deployment-status"),
    ("POST", r"^/repos/[^/]+/[^/]+/statuses/([0-9a-f]{40})$",
     "repos__create-commit-status"),
    ("POST", r"^/repos/[^/]+/[^/]+/issues/(\d+)/comments$", "issues__create-comment"),
    # Updating a comment takes the same body as creating one.
    ("PATCH", r"^/repos/[^/]+/[^/]+/issues/comments/(\d+)$", "issues__create-comment"),
)
STATUS_DESCRIPTION_MAX = 140    # documented for both kinds of status


class GitHub(StandIn):
    """Plays GitHub's REST API for deployments, statuses and issue comments.

    Every request must carry the headers GitHub documents; every body must
    pass the operation's request schema from the OpenAPI fixtures, with no
    property the schema does not name.  `down` answers 503 to everything;
    `permissions` is what the token may do (for dockrune doctor).
    """

    def __init__(self, token="ghp_standin_token", user_agent_prefix="dockrune/"):
        self.token = token
        self.user_agent_prefix = user_agent_prefix
        self.down = False
        self.permissions = {"deployments", "statuses", "pull_requests"}
        self.schemas = {name: operation(name)["request_body_schema"]
                        for _m, _p, name in GITHUB_ROUTES}
        self.next_id = 1000
        self.comments = {}
        self.pulls = {}         # (repo, number) -> "open" or "closed"
        super().__init__()

    def respond(self, request):
        if self.down:
            return 503, {}, {"message": "Service Unavailable"}
        problems = self._check_headers(request)
        if request["headers"].get("authorization") != "Bearer " + self.token:
            return 401, {}, {"message": "Bad credentials"}
        if request["method"] == "GET" and request["path"] == "/rate_limit":
            return 200, {}, {"resources": {}, "rate": {"remaining": 4999}}
        pull = re.match(r"^/repos/([^/]+/[^/]+)/pulls/(\d+)$", request["path"])
        if request["method"] == "GET" and pull:
            state = self.pulls.get((pull.group(1), int(pull.group(2))))
            if state is None:
                return 404, {}, {"message": "Not Found"}
            return 200, {}, {"number": int(pull.group(2)), "state": state}
        for method, pattern, name in GITHUB_ROUTES:
            match = re.match(pattern, request["path"])
            if method == request["method"] and match:
                break
        else:
            self.problem(request, "no such route")
            return 404, {}, {"message": "Not Found"}
        if not self._permitted(name):
            return 403, {}, {"message": "Resource not accessible by personal "
                                        "access token"}
        problems += self._check_body(request["body"], name)
        if problems:
            for text in problems:
                self.problem(request, text)
            return 422, {}, {"message": "Validation Failed", "errors": problems,
                             "documentation_url": "https://docs.github.com/rest"}
        return self._create(request, name, match)

    def _permitted(self, name):
        needed = {"repos__create-deployment": "deployments",
                  "repos__create-deployment-status": "deployments",
                  "repos__create-commit-status": "statuses",
                  "issues__create-comment": "pull_requests"}[name]
        return needed in self.permissions

    def _check_headers(self, request):
        headers = request["headers"]
        found = []
        if headers.get("accept") != "application/vnd.github+json":
            found.append("Accept is %r" % headers.get("accept"))
        if headers.get("x-github-api-version") != "2022-11-28":
            found.append("X-GitHub-Api-Version is %r"
                         % headers.get("x-github-api-version"))
        if not (headers.get("user-agent") or "").startswith(self.user_agent_prefix):
            found.append("User-Agent is %r" % headers.get("user-agent"))
        return found

    def _check_body(self, body, name):
        if not isinstance(body, dict):
            return ["body is not a JSON object"]
        schema = dict(self.schemas[name], additionalProperties=False)
        found = validate(body, schema)
        for key in ("description",):
            if name.endswith("status") and len(body.get(key) or "") > (
                    STATUS_DESCRIPTION_MAX):
                found.append("description over %d characters" % STATUS_DESCRIPTION_MAX)
        return found

    def _create(self, request, name, match):
        self.next_id += 1
        body = request["body"]
        if name == "repos__create-deployment":
            answer = dict(example("deployment"), id=self.next_id, sha=body["ref"],
                          ref=body["ref"], environment=body.get("environment"))
        elif name == "repos__create-deployment-status":
            answer = dict(example("deployment-status"), id=self.next_id,
                          state=body["state"])
        elif name == "repos__create-commit-status":
            answer = dict(example("status"), id=self.next_id, state=body["state"])
        elif request["method"] == "PATCH":
            number = int(match.group(1))
            if number not in self.comments:
                return 404, {}, {"message": "Not Found"}
            self.comments[number] = body["body"]
            return 200, {}, dict(example("issue-comment"), id=number, body=body["body"])
        else:
            self.comments[self.next_id] = body["body"]
            answer = dict(example("issue-comment"), id=self.next_id, body=body["body"])
        return 201, {}, answer

    # -- what the tests read --

    def deployments(self):
        return [r for r in self.calls("POST")
                if r["path"].endswith("/deployments") and r["status"] == 201]

    def deployment_states(self):
        return [r["body"]["state"] for r in self.calls("POST")
                if "/statuses" in r["path"] and "/deployments/" in r["path"]
                and r["status"] == 201]

    def commit_states(self):
        return [r["body"]["state"] for r in self.calls("POST")
                if re.search(r"/statuses/[0-9a-f]{40}$", r["path"])
                and r["status"] == 201]

    def sequence(self):
        """Return the delivered calls as short names, in the order they came."""
        names = []
        for r in self.calls():
            if r["status"] not in (200, 201):
                continue
            path = r["path"]
            if path.endswith("/deployments"):
                names.append("deployment")
            elif "/deployments/" in path:
                names.append("deployment:" + r["body"]["state"])
            elif "/statuses/" in path:
                names.append("commit:" + r["body"]["state"])
            elif "/comments" in path:
                names.append("comment:" + r["method"])
        return names


# -- Coach Artie, Discord, n8n ---------------------------------------------------------


class CoachArtie(StandIn):
    """POST /api/channels/<id>/messages with {"content"}; 2000 characters at most."""

    def __init__(self, channels=("123456789012345678",)):
        self.channels = set(channels)
        super().__init__()

    def respond(self, request):
        match = re.match(r"^/api/channels/([^/]+)/messages$", request["path"])
        if request["method"] != "POST" or not match:
            return 404, {}, {"error": "Not found"}
        if match.group(1) not in self.channels:
            return 404, {}, {"error": "Channel not found"}
        content = (request["body"] or {}).get("content") if isinstance(
            request["body"], dict) else None
        if not isinstance(content, str) or not content:
            self.problem(request, "no content")
            return 400, {}, {"error": "content is required"}
        if len(content) > 2000:
            self.problem(request, "content of %d characters" % len(content))
            return 500, {}, {"error": "Invalid Form Body: content: Must be 2000 or "
                                      "fewer in length."}
        return 200, {}, {"success": True, "id": str(len(self.requests) + 1),
                         "channelId": match.group(1)}

    def contents(self):
        return [r["body"]["content"] for r in self.calls("POST") if r["status"] == 200]


class Discord(StandIn):
    """A webhook: 400 over any documented limit, 429 every `limit_every` calls."""

    def __init__(self, limit_every=0, retry_after=0.3):
        with open(os.path.join(FIXTURES, "discord-limits.json")) as f:
            self.limits = json.load(f)["limits"]
        self.limit_every = limit_every
        self.retry_after = retry_after
        self.blocked_until = 0.0
        self.accepted = 0
        self.early = 0
        super().__init__()

    @property
    def path(self):
        return "/api/webhooks/1234567890/standin-webhook-token"

    def respond(self, request):
        if request["method"] != "POST" or request["path"] != self.path:
            return 404, {}, {"message": "Unknown Webhook", "code": 10015}
        now = time.time()
        if now < self.blocked_until:
            self.early += 1
            self.problem(request, "sent %.2fs before retry_after ran out"
                         % (self.blocked_until - now))
            return self._rate_limited(self.blocked_until - now)
        if self.limit_every and (len(self.requests) + 1) % self.limit_every == 0:
            self.blocked_until = now + self.retry_after
            return self._rate_limited(self.retry_after)
        found = self.check_limits(request["body"])
        if found:
            for text in found:
                self.problem(request, text)
            return 400, {}, {"message": "Invalid Form Body", "code": 50035}
        self.accepted += 1
        return 204, {}, None

    def _rate_limited(self, seconds):
        return 429, {"Retry-After": "%.3f" % seconds, "X-RateLimit-Remaining": "0"}, {
            "message": "You are being rate limited.", "retry_after": seconds,
            "global": False}

    def check_limits(self, body):
        """Return every documented limit body breaks (empty: Discord takes it)."""
        lim = self.limits
        if not isinstance(body, dict):
            return ["not a JSON object"]
        found = []
        if not (body.get("content") or body.get("embeds")):
            found.append("no content and no embeds")
        if len((body.get("content") or "").strip()) > lim["content"]:
            found.append("content over %d" % lim["content"])
        embeds = body.get("embeds") or []
        if len(embeds) > lim["embeds_per_message"]:
            found.append("more than %d embeds" % lim["embeds_per_message"])
        total = 0
        for embed in embeds:
            parts = {"embed.title": embed.get("title"),
                     "embed.description": embed.get("description"),
                     "embed.footer.text": (embed.get("footer") or {}).get("text"),
                     "embed.author.name": (embed.get("author") or {}).get("name")}
            fields = embed.get("fields") or []
            if len(fields) > lim["embed.fields"]:
                found.append("more than %d fields" % lim["embed.fields"])
            for field in fields:
                for key, value in (("embed.field.name", field.get("name")),
                                   ("embed.field.value", field.get("value"))):
                    if not value or not str(value).strip():
                        found.append("%s is empty" % key)
                    parts.setdefault(key + "#%d" % len(parts), value)
            for key, value in parts.items():
                text = (value or "").strip()
                total += len(text)
                if len(text) > lim[key.split("#")[0]]:
                    found.append("%s over %d" % (key, lim[key.split("#")[0]]))
        if total > lim["embeds_total_characters"]:
            found.append("embeds total %d over %d" % (total,
                                                      lim["embeds_total_characters"]))
        return found

    def bodies(self):
        return [r["body"] for r in self.calls("POST") if r["status"] == 204]


class N8n(StandIn):
    """A Webhook node at /webhook/<path>, with header auth when `header` is set."""

    def __init__(self, path="dockrune", header=None):
        self.webhook_path = "/webhook/" + path
        self.header = header        # (name, value) or None
        super().__init__()

    def respond(self, request):
        if request["method"] != "POST" or request["path"] != self.webhook_path:
            return 404, {}, {"code": 404, "message": "The requested webhook is not "
                                                     "registered."}
        if self.header:
            name, value = self.header
            if request["headers"].get(name.lower()) != value:
                return 403, {}, {"message": "Authorization data is wrong!"}
        return 200, {}, {"message": "Workflow was started"}

    def documents(self):
        return [r["body"] for r in self.calls("POST") if r["status"] == 200]
