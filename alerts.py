"""Everything dockrune says over HTTP: GitHub reports, and alerts to people.

Nothing here ever runs in the webhook handler or holds up a deploy.  The
Deployer's notify hook turns each deploy event into outbox items: small JSON
documents that name a target ("github", "coach-artie", "discord", "n8n"), an
operation and its arguments.  The outbox lives in state/outbox.json (written
atomically through store.py) and one named sender thread per target works
through it, so a target that is down or slow never delays another.

Order is kept per chain: a chain is the GitHub reports of one deploy, the
comment on one pull request, or the alerts of one target.  Only the oldest
item of a chain may be sent; the next waits until it was delivered or given
up.  An answer sorts an item into one of four fates:

    2xx                                  delivered, removed
    429, or 403 with Retry-After or      the whole target waits (Retry-After,
      X-RateLimit-Remaining: 0           retry_after or X-RateLimit-Reset)
    5xx, 408, timeouts, refused          retried with exponential back-off
    any other 4xx, a redirect            logged with the answer, dropped

Secrets stay out of the outbox file: the GitHub token, the Discord webhook
URL and the n8n header are added when a request is sent, from the settings.
"""

import contextlib
import json
import logging
import os
import re
import string
import threading
import time
import urllib.parse

import store

log = logging.getLogger("dockrune.alerts")

GITHUB_API_VERSION = "2022-11-28"
TARGETS = ("github", "coach-artie", "discord", "n8n")
ALERT_TARGETS = ("coach-artie", "discord", "n8n")
EVENTS = ("deploy_failed", "deploy_succeeded", "recovered", "preview_ready",
          "app_down", "app_up", "app_crashed")
DEFAULT_RULES = {"coach-artie": "deploy_failed,recovered,app_down,app_up,app_crashed",
                 "discord": "deploy_failed,recovered,app_down,app_up,app_crashed",
                 "n8n": "all"}
N8N_VERSION = 1
STATUS_LIMIT = 140          # GitHub: a status description is at most 140 chars
COACH_ARTIE_LIMIT = 2000    # Coach Artie forwards content to Discord as is
TAIL_LINES = 20
KEEP_GITHUB_DEPLOYS = 500
TRUNCATED = "… (truncated)"

# Template variables; DESIGN and README document them.  Adding is fine,
# renaming breaks users' templates.
VARIABLES = ("event", "app", "environment", "repo", "sha", "short_sha", "ref",
             "status", "url", "preview_url", "log_url", "log_tail", "duration",
             "error", "commit_message", "author", "commit_url", "deploy_id")


# -- HTTP ------------------------------------------------------------------------


class TransportError(Exception):
    """No HTTP answer at all: refused, reset, timed out, bad URL."""


class Answer:
    """One HTTP answer: status, headers (lower-case names) and body bytes."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8", "replace") or "null")
        except ValueError:
            return None

    def message(self):
        """Return what the server said, short and printable, for a log line."""
        data = self.json()
        if isinstance(data, dict) and data.get("message"):
            text = str(data["message"])
            errors = data.get("errors")
            if errors:
                text += " " + json.dumps(errors)[:200]
        else:
            text = self.body.decode("utf-8", "replace")
        return _printable(text)[:300] or "(empty body)"


_openers = []


def _opener():
    """Return the urllib opener that follows no redirect, built on first use.

    Built late: urllib.request brings http.client, email and ssl, a good part
    of dockrune's memory, which a daemon with no outbound target never needs.
    """
    if not _openers:
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            """Hand 3xx answers back as they are: they may lead to another host."""

            def redirect_request(self, *args, **kwargs):
                return None

        _openers.append(urllib.request.build_opener(NoRedirect))
    return _openers[0]


def http_request(method, url, data=None, headers=None, timeout=10.0):
    """Send one request; return an Answer for any HTTP status.

    data (a dict or list) goes out as JSON.  Raises TransportError when no
    answer came; its message never contains the URL, which may hold a token.
    """
    if not url.startswith(("http://", "https://")):
        raise TransportError("only http and https URLs are allowed")
    body = None
    headers = dict(headers or {})
    if data is not None:
        body = json.dumps(data).encode("utf-8")
        headers["Content-Type"] = "application/json"
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _opener().open(request, timeout=timeout) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as e:
        with e:
            try:
                data = e.read()
            except OSError:     # the error body timed out: the status is enough
                data = b""
            return Answer(e.code, dict(e.headers or {}), data)
    except ValueError:
        # urllib's message may quote the URL, and the URL may hold a token.
        raise TransportError("malformed URL") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise TransportError(_printable(str(reason))[:200]) from None


# -- outcomes ------------------------------------------------------------------------


DONE, RETRY, HOLD, DROP = "done", "retry", "hold", "drop"


def judge(answer, now=None):
    """Sort an answer into (fate, seconds to wait or None, reason)."""
    now = time.time() if now is None else now
    status = answer.status
    wait = _rate_limit_wait(answer, now)
    if 200 <= status < 300:
        # The last call the window allows: wait for the reset before the next.
        return DONE, wait if answer.headers.get(
            "x-ratelimit-remaining") == "0" else None, "HTTP %d" % status
    if status == 429 or (status == 403 and wait is not None):
        return HOLD, 60.0 if wait is None else wait, "rate limited (HTTP %d)" % status
    if status >= 500 or status == 408:
        return RETRY, None, "HTTP %d: %s" % (status, answer.message())
    if 300 <= status < 400:
        return DROP, None, "HTTP %d: redirect not followed" % status
    return DROP, None, "HTTP %d: %s" % (status, answer.message())


def _rate_limit_wait(answer, now):
    """Return how long the server asked us to wait, or None if it did not."""
    headers = answer.headers
    for value in (headers.get("retry-after"), _body_retry_after(answer)):
        try:
            if value is not None:
                return max(0.0, float(value))
        except ValueError:
            pass
    if headers.get("x-ratelimit-remaining") == "0":
        try:
            return max(0.0, float(headers.get("x-ratelimit-reset", "")) - now)
        except ValueError:
            return 60.0
    return None


def _body_retry_after(answer):
    data = answer.json() if answer.body[:1] == b"{" else None
    return data.get("retry_after") if isinstance(data, dict) else None


# -- the outbox ----------------------------------------------------------------------


class Outbox:
    """Persisted queue of outbound calls with one sender thread per target.

    senders maps a target to a function(item) that makes the call and returns
    an Answer (or raises TransportError).  enqueue() is thread-safe and only
    writes a file; it never touches the network.
    """

    def __init__(self, store_, senders, retry_base=2.0, retry_max=300.0,
                 max_age=86400.0, hold_caps=None):
        self.store = store_
        self.senders = dict(senders)
        self.retry_base = retry_base
        self.retry_max = retry_max
        # The longest a target's own wait (Retry-After, a rate-limit reset) is
        # honoured; past it the call is tried again and may be told to wait.
        self.hold_caps = dict(hold_caps or {})
        self.max_age = max_age
        self.path = os.path.join(store_.state_dir, "outbox.json")
        self._cond = threading.Condition()
        self._hold = {}         # target -> time.time() before which it waits
        self._busy = set()      # ids being sent right now
        self._threads = []
        self._stopping = False
        self._batching = 0      # open batch() blocks; while any, saves wait
        self._dirty = False
        state = store.read_json(self.path, None) or {}
        self._items = list(state.get("items", []))
        self._next_id = int(state.get("next_id", 1))
        for item in self._items:
            item["due"] = 0.0   # after a restart, try everything at once

    def enqueue(self, target, chain, op, args):
        """Persist one call and wake its sender; return the item."""
        with self._cond:
            item = {"id": self._next_id, "target": target, "chain": chain,
                    "op": op, "args": args, "attempts": 0, "due": 0.0,
                    "created": time.time(), "last_error": None}
            self._next_id += 1
            self._items.append(item)
            if self._batching:
                self._dirty = True
            else:
                self._save()
            self._cond.notify_all()
        return item

    @contextlib.contextmanager
    def batch(self):
        """Write the calls queued inside the block once, at its end.

        One event makes several calls; writing the file once for all of them
        keeps the webhook handler quick.  A sender may take a call before the
        block ends: it is sent at most once more after a crash, as any call.
        """
        with self._cond:
            self._batching += 1
        try:
            yield
        finally:
            with self._cond:
                self._batching -= 1
                if not self._batching and self._dirty:
                    self._dirty = False
                    self._save()
                    self._cond.notify_all()

    def pending(self, target=None):
        """Return copies of the items still to send (of one target, or all)."""
        with self._cond:
            return [dict(i) for i in self._items
                    if target is None or i["target"] == target]

    def start(self):
        for target in self.senders:
            thread = threading.Thread(target=self._work, args=(target,),
                                      name="dockrune-outbox-%s" % target,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def flush(self, timeout):
        """Wait until nothing is left to send; return False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(i["target"] in self.senders for i in self._items):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def shutdown(self, timeout=5.0):
        """Stop the senders; what is left stays on disk for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = len(self.pending())
        if left:
            log.info("outbox: %d calls left for the next start", left)
        return left

    # -- the sender threads --

    def _work(self, target):
        while True:
            item = self._next(target)
            if item is None:
                return
            try:
                fate, wait, reason = self._send(target, item)
            except Exception as e:
                # A sender outlives any call: log it, and drop that call.
                log.exception("outbox: %s %s crashed", target, item["op"])
                fate, wait, reason = DROP, None, "internal error: %s" % e
            self._settle(item, fate, wait, reason)

    def _send(self, target, item):
        try:
            answer = self.senders[target](item)
        except TransportError as e:
            return RETRY, None, str(e)
        if answer is None:      # the sender decided there is nothing to send
            return DONE, None, "nothing to send"
        return judge(answer)

    def _next(self, target):
        """Block until an item of target is due; return it (None: stopping)."""
        with self._cond:
            while not self._stopping:
                now = time.time()
                wait = self._hold.get(target, 0.0) - now
                if wait <= 0:
                    item, wait = self._due(target, now)
                    if item is not None:
                        self._busy.add(item["id"])
                        return dict(item)
                self._cond.wait(min(wait, 30.0) if wait else 30.0)
            return None

    def _due(self, target, now):
        """Return (item, None) for the first due head of a chain, else (None, wait)."""
        seen, soonest = set(), None
        for item in self._items:
            if item["target"] != target or item["chain"] in seen:
                continue
            seen.add(item["chain"])
            if item["id"] in self._busy:
                continue
            if item["due"] <= now:
                return item, None
            soonest = min(soonest or item["due"], item["due"])
        return None, (soonest - now if soonest else None)

    def _settle(self, sent, fate, wait, reason):
        """Apply the fate of one sent item and persist the outbox."""
        with self._cond:
            self._busy.discard(sent["id"])
            item = next((i for i in self._items if i["id"] == sent["id"]), None)
            if item is None:
                return
            item["attempts"] += 1
            item["last_error"] = None if fate == DONE else reason
            too_old = time.time() - item["created"] > self.max_age
            cap = self.hold_caps.get(item["target"], self.retry_max)
            if fate == DONE and wait:
                self._hold[item["target"]] = time.time() + min(wait, cap)
            if fate == DONE or fate == DROP or too_old:
                self._items.remove(item)
                self._report(item, fate, reason, too_old)
            elif fate == HOLD:
                wait = min(wait, cap)
                self._hold[item["target"]] = time.time() + wait
                log.warning("outbox: %s asked to wait %.1fs (%s)", item["target"],
                            wait, reason)
            else:
                delay = min(self.retry_base * 2 ** min(item["attempts"] - 1, 40),
                            self.retry_max)
                item["due"] = time.time() + delay
                log.warning("outbox: %s %s for %s failed (%s); attempt %d, next "
                            "in %.1fs", item["target"], item["op"], item["chain"],
                            reason, item["attempts"] + 1, delay)
            self._save()
            self._cond.notify_all()

    def _report(self, item, fate, reason, too_old):
        if fate == DONE:
            log.debug("outbox: %s %s for %s delivered", item["target"],
                      item["op"], item["chain"])
        elif too_old and fate != DROP:
            log.error("outbox: gave up %s %s for %s after %d attempts: %s",
                      item["target"], item["op"], item["chain"], item["attempts"],
                      reason)
        else:
            log.error("outbox: %s refused %s for %s, dropped: %s", item["target"],
                      item["op"], item["chain"], reason)

    def _save(self):
        """Write the outbox; a failure is logged and the calls stay in memory."""
        items = [{k: v for k, v in i.items() if k != "due"} for i in self._items]
        try:
            store.write_json(self.path, {"items": items, "next_id": self._next_id},
                             mode=0o600)
        except OSError as e:
            log.error("outbox: cannot save %s (%s): %d calls are only in memory",
                      self.path, e, len(items))


# -- GitHub ---------------------------------------------------------------------------


def log_url(settings, record):
    """Return the public URL of the deploy's log page, or None without one."""
    if not settings.public_url or not record.get("id"):
        return None
    return "%s/admin/deploys/%s" % (settings.public_url, record["id"])


def pr_number(record):
    """Return the pull request a deploy belongs to, or None."""
    number = record.get("pr") or record.get("pull_request")
    if isinstance(number, int) and number > 0:
        return number
    match = re.match(r"^pr-([0-9]{1,9})$", record.get("environment") or "")
    return int(match.group(1)) if match else None


def clip(text, limit, marker="…"):
    """Return text cut to limit characters, ending with marker when cut."""
    text = text or ""
    if _units(text) <= limit:
        return text
    while text and _units(text) > limit - _units(marker):
        text = text[:-max(1, (_units(text) - limit + _units(marker)) // 2)]
    return text + marker


def _units(text):
    """Count UTF-16 code units: what Discord measures, never fewer than len()."""
    return len(text.encode("utf-16-le")) // 2


def short(sha):
    return (sha or "")[:7]


def describe(record, newer_sha=None):
    """Return the one-line story of a deploy, for statuses (<= 140 chars)."""
    status = record.get("status")
    if status == "queued":
        text = "queued: %s" % short(record.get("sha"))
    elif status == "running":
        text = "deploying %s" % short(record.get("sha"))
    elif status == "live":
        where = record.get("url") or (
            "port %s" % record["port"] if record.get("port") else "its port")
        text = "live at %s in %s" % (where, _duration(record.get("duration")))
    elif status == "superseded":
        text = "not deployed: " + ("superseded by %s" % short(newer_sha) if newer_sha
                                   else record.get("error") or "superseded")
    else:
        text = _failure_text(record.get("error") or "failed")
    return clip(_printable(text), STATUS_LIMIT)


_BUILD_FAILED_RE = re.compile(r"Service '([^']+)' failed to build"     # v1
                              r"|target ([\w.-]+): failed to solve")       # v2


def _failure_text(error):
    """Say a failed `compose up` the short way: "build failed: web: <cause>"."""
    if "docker" not in error or " up " not in error:
        return error
    found = _BUILD_FAILED_RE.search(error)
    service = found and (found.group(1) or found.group(2))
    code = re.search(r" exited (-?\d+)", error)
    tail = error[code.end():].lstrip(": ") if code else error
    # The command's last lines, joined by " | ": the cause is the last real one.
    lines = [part.strip() for part in tail.split(" | ") if part.strip()
             and not part.strip().startswith("--->") and "failed to build" not in part]
    cause = lines[-1] if lines else "exited %s" % (code.group(1) if code else "?")
    if service:
        return "build failed: %s: %s" % (service, re.sub(r"^target [\w.-]+: ", "",
                                                         cause))
    return "compose up failed: %s" % cause


def _duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return "%d s" % seconds if seconds < 120 else "%d min %d s" % divmod(seconds, 60)


def deploy_state(record):
    """Return the GitHub state that ends a deploy: success, failure or error."""
    if record.get("status") == "live":
        return "success"
    error = record.get("error") or ""
    if error.startswith(("internal error", "dockrune stopped")):
        return "error"      # dockrune's own trouble, not the app's
    return "failure"


class GitHubReporter:
    """Turns deploy events into GitHub calls in the outbox, and makes them.

    What GitHub answered (deployment ids, the PR comment ids) is kept in
    state/github.json, so that statuses and comment edits find their target
    after a restart too.
    """

    def __init__(self, outbox, store_, settings, user_agent):
        self.outbox = outbox
        self.store = store_
        self.settings = settings
        self.user_agent = user_agent
        self.path = os.path.join(store_.state_dir, "github.json")
        self._lock = threading.Lock()

    def enabled(self):
        return bool(self.settings.github_token)

    # -- events -> items (any thread; no network) --

    def on_event(self, event, record):
        if not self.enabled():
            return
        if event in ("stopped", "torn-down"):   # torn-down: a preview is gone
            return self._on_stopped(record)
        if event == "approval-needed":
            return self._awaiting_approval(record)
        repo, sha = record.get("repo"), record.get("sha")
        if not store.is_repo(repo or "") or not sha or event not in (
                "queued", "started", "live", "failed", "superseded"):
            return
        if not self._known(record["id"]):
            self._begin(record, repo)
        if event == "queued":
            self._statuses(record, "queued", "pending")
        elif event == "started":
            self._statuses(record, "in_progress", "pending")
        elif event == "superseded":
            newer = self.store.deploy(record.get("superseded_by") or "") or {}
            self._statuses(record, "inactive", "error", newer.get("sha"))
            self._mark_final(record["id"])
        else:
            self._finish(record)

    def _awaiting_approval(self, request):
        """Mark a fork's commit pending: its preview waits for an operator."""
        repo, sha = request.get("repo"), request.get("sha")
        if not store.is_repo(repo or "") or not sha:
            return
        body = {"state": "pending",
                "context": "dockrune/%s/%s" % (request["app"], request["environment"]),
                "description": "preview from a fork: waits for approval of %s on "
                               "dockrune's admin page" % short(sha)}
        if self.settings.public_url:
            body["target_url"] = self.settings.public_url + "/admin"
        self.outbox.enqueue("github", "github:approval:%s/%s" % (
            request["app"], request["environment"]), "commit_status",
            {"repo": repo, "sha": sha, "body": body})

    def pull_request_state(self, repo, number):
        """Ask GitHub whether pull request number of repo is "open" or "closed".

        Returns None when it cannot tell (no token, GitHub down, an answer it
        does not understand): the caller then keeps the preview.
        """
        if not self.enabled() or not store.is_repo(repo or ""):
            return None
        url = "%s/repos/%s/pulls/%d" % (self.settings.github_api, repo, number)
        try:
            answer = github_request(self.settings, self.user_agent, "GET", url)
        except TransportError as e:
            log.warning("github: cannot ask about %s#%d: %s", repo, number, e)
            return None
        if answer.status != 200:
            log.warning("github: %s#%d answered HTTP %d", repo, number, answer.status)
            return None
        try:
            state = json.loads(answer.body).get("state")
        except (ValueError, AttributeError):
            return None
        return state if state in ("open", "closed") else None

    def _finish(self, record):
        state = deploy_state(record)
        self._statuses(record, state, state)
        self._comment(record)
        self._mark_final(record["id"])

    def recover(self):
        """End on GitHub the deploys that ended while dockrune was not looking.

        Call after Store.recover(): a deploy it marked interrupted (or one that
        finished just before a crash, unreported) gets its final statuses.
        """
        if not self.enabled():
            return
        with self._lock:
            state = self._load()
        for deploy_id, known in sorted(state["deploys"].items()):
            if known.get("final"):
                continue
            record = self.store.deploy(deploy_id)
            if record is None or record.get("status") in store.ACTIVE:
                continue
            log.warning("github: reporting deploy %s, which ended %s while "
                        "dockrune was stopped", deploy_id, record.get("status"))
            if record.get("status") == "superseded":
                self.on_event("superseded", record)
            else:
                self._finish(record)

    def _begin(self, record, repo):
        """Queue the deployment itself: the first call of the deploy's chain."""
        with self._lock:
            state = self._load()
            state["deploys"][record["id"]] = {
                "repo": repo, "environment": record["environment"],
                "deployment": None}
            state["environments"]["%s/%s" % (record["app"], record["environment"])] \
                = record["id"]
            self._prune(state)
            self._save(state)
        self.outbox.enqueue("github", "github:" + record["id"], "deployment", {
            "deploy": record["id"], "repo": repo, "body": deployment_body(record)})

    def _statuses(self, record, deployment_state, commit_state, newer_sha=None):
        chain = "github:" + record["id"]
        description = describe(record, newer_sha)
        url = log_url(self.settings, record)
        body = {"state": deployment_state, "description": description}
        if url:
            body["log_url"] = url
        if record.get("url") and deployment_state in ("success", "in_progress"):
            body["environment_url"] = record["url"]
        if deployment_state == "inactive" and record.get("environment") != (
                "production"):
            body["auto_inactive"] = False
        self.outbox.enqueue("github", chain, "deployment_status", {
            "deploy": record["id"], "repo": record["repo"], "body": body})
        context = "dockrune/%s" % record["app"]
        if record["environment"] != "production":
            context += "/" + record["environment"]
        self.outbox.enqueue("github", chain, "commit_status", {
            "repo": record["repo"], "sha": record["sha"], "body": {
                "state": commit_state, "target_url": url, "context": context,
                "description": description}})

    def _on_stopped(self, summary):
        key = "%s/%s" % (summary.get("app"), summary.get("environment"))
        with self._lock:
            state = self._load()
            deploy_id = state["environments"].pop(key, None)
            known = state["deploys"].get(deploy_id or "")
            self._save(state)
        if not known:
            return
        self.outbox.enqueue("github", "github:" + deploy_id, "deployment_status", {
            "deploy": deploy_id, "repo": known["repo"],
            "body": {"state": "inactive", "description": "stopped by dockrune"}})
        number = pr_number(summary)
        if number is not None:
            record = dict(self.store.deploy(deploy_id) or {}, status="stopped",
                          url=None, finished_at=store.utcnow())
            self.outbox.enqueue(
                "github", "github-pr:%s#%d" % (known["repo"], number), "comment", {
                    "repo": known["repo"], "pr": number,
                    "body": comment_body(record, log_url(self.settings, record))})

    def _comment(self, record):
        number = pr_number(record)
        if number is None:
            return
        self.outbox.enqueue(
            "github", "github-pr:%s#%d" % (record["repo"], number), "comment", {
                "repo": record["repo"], "pr": number,
                "body": comment_body(record, log_url(self.settings, record))})

    # -- items -> HTTP (the github sender thread) --

    def send(self, item):
        """Make one GitHub call for an outbox item; return its Answer or None."""
        args = item["args"]
        api = "%s/repos/%s" % (self.settings.github_api, args["repo"])
        if item["op"] == "deployment":
            answer = self.request("POST", api + "/deployments", args["body"])
            if answer.status == 201:
                self._remember_deployment(args["deploy"], answer.json())
            elif answer.status == 202:
                log.warning("github: no deployment for %s: %s", args["deploy"],
                            answer.message())
            return answer
        if item["op"] == "deployment_status":
            number = self._deployment_of(args["deploy"])
            if number is None:
                log.warning("github: no deployment on GitHub for %s: status %s "
                            "skipped", args["deploy"], args["body"]["state"])
                return None
            return self.request("POST", "%s/deployments/%d/statuses" % (api, number),
                                args["body"])
        if item["op"] == "commit_status":
            return self.request("POST", "%s/statuses/%s" % (api, args["sha"]),
                                args["body"])
        if item["op"] == "comment":
            return self.send_comment(api, args)
        raise ValueError("unknown github operation %r" % item["op"])

    def send_comment(self, api, args):
        """Edit the PR's dockrune comment, or create it the first time."""
        key = "%s#%d" % (args["repo"], args["pr"])
        with self._lock:
            comment = self._load()["comments"].get(key)
        body = {"body": args["body"]}
        if comment:
            answer = self.request("PATCH", "%s/issues/comments/%d" % (api, comment),
                                  body)
            if answer.status != 404:
                return answer
            log.warning("github: comment %d on %s is gone; writing a new one",
                        comment, key)
        answer = self.request("POST", "%s/issues/%d/comments" % (api, args["pr"]),
                              body)
        data = answer.json() if answer.status == 201 else None
        if isinstance(data, dict) and isinstance(data.get("id"), int):
            with self._lock:
                state = self._load()
                state["comments"][key] = data["id"]
                self._save(state)
        return answer

    def request(self, method, url, body=None):
        return github_request(self.settings, self.user_agent, method, url, body)

    # -- state/github.json --

    def _mark_final(self, deploy_id):
        with self._lock:
            state = self._load()
            if deploy_id in state["deploys"]:
                state["deploys"][deploy_id]["final"] = True
                self._save(state)

    def _known(self, deploy_id):
        with self._lock:
            return deploy_id in self._load()["deploys"]

    def _remember_deployment(self, deploy_id, data):
        if not isinstance(data, dict) or not isinstance(data.get("id"), int):
            return
        with self._lock:
            state = self._load()
            state["deploys"].setdefault(deploy_id, {})["deployment"] = data["id"]
            self._save(state)

    def _deployment_of(self, deploy_id):
        with self._lock:
            return (self._load()["deploys"].get(deploy_id) or {}).get("deployment")

    def _load(self):
        state = store.read_json(self.path, None) or {}
        for key in ("deploys", "environments", "comments"):
            state.setdefault(key, {})
        return state

    def _save(self, state):
        store.write_json(self.path, state)

    def _prune(self, state):
        """Forget the oldest deploys beyond KEEP_GITHUB_DEPLOYS (ids sort by time)."""
        live = set(state["environments"].values())
        for deploy_id in sorted(state["deploys"])[:-KEEP_GITHUB_DEPLOYS]:
            if deploy_id not in live:
                del state["deploys"][deploy_id]


def github_request(settings, user_agent, method, url, body=None):
    """Make one call to the REST API with the headers GitHub asks for."""
    headers = {"Accept": "application/vnd.github+json",
               "X-GitHub-Api-Version": GITHUB_API_VERSION,
               "Authorization": "Bearer " + settings.github_token,
               "User-Agent": user_agent}
    return http_request(method, url, body, headers, timeout=settings.outbox_timeout)


def deployment_body(record):
    """Return the body that creates the GitHub deployment of a deploy."""
    production = record["environment"] == "production"
    return {
        "ref": record["sha"], "task": "deploy", "auto_merge": False,
        "required_contexts": [], "environment": record["environment"],
        "transient_environment": not production,
        "production_environment": production,
        "description": "dockrune deploy of %s" % short(record["sha"]),
        "payload": {"dockrune_deploy": record["id"], "app": record["app"]},
    }


_COMMENT_MARK = "<!-- dockrune:%s/%s -->"
_ICONS = {"live": "✅ live", "failed": "❌ failed", "queued": "⏳ queued",
          "running": "⏳ deploying", "superseded": "⏭️ superseded",
          "stopped": "⏹️ preview removed"}


def comment_body(record, url_of_log):
    """Return the Markdown of the single dockrune comment on a pull request."""
    lines = [_COMMENT_MARK % (record["app"], record["environment"]),
             "**dockrune** preview of `%s` (`%s`)" % (record["app"],
                                                     record["environment"]),
             "", "| | |", "| --- | --- |",
             "| Status | %s |" % _ICONS.get(record.get("status"), record.get("status"))]
    if record.get("url"):
        lines.append("| Preview | %s |" % record["url"])
    lines.append("| Commit | `%s` |" % short(record.get("sha")))
    if record.get("status") != "live" and record.get("error"):
        lines.append("| Error | %s |" % _markdown_cell(record["error"]))
    if url_of_log:
        lines.append("| Log | [%s](%s) |" % (record["id"], url_of_log))
    lines += ["| Updated | %s |" % (record.get("finished_at") or store.utcnow()),
              "", "_This comment is edited in place on every deploy._"]
    return "\n".join(lines)


def _markdown_cell(text):
    text = _printable(text)[:300]
    for char in "\\`*_[]<>|@":
        text = text.replace(char, "\\" + char)
    return text


# -- alerts to people ---------------------------------------------------------------


BUILT_IN_TEMPLATES = {
    "deploy_failed": "Deploy of ${app} (${environment}) failed at ${short_sha} "
                     "on ${ref}: ${error}\nCommit: ${commit_message} (${author})\n"
                     "Log: ${log_url}\n${log_tail}",
    "deploy_succeeded": "${app} (${environment}) is live at ${url}: ${short_sha} "
                        "on ${ref} in ${duration}.\nCommit: ${commit_message} "
                        "(${author})",
    "recovered": "${app} (${environment}) recovered: ${short_sha} on ${ref} is "
                 "live at ${url} after failed deploys.\nCommit: ${commit_message}",
    "preview_ready": "Preview of ${app} (${environment}) is ready at "
                     "${preview_url}: ${short_sha} in ${duration}.",
    "app_down": "${app} (${environment}) is down at ${url}: ${error}",
    "app_up": "${app} (${environment}) is back up at ${url}.",
    "app_crashed": "${app} (${environment}) crashed at ${short_sha}: ${error}",
    "test": "Test alert from dockrune: if you read this, ${target} works.",
}
TITLES = {"deploy_failed": "❌ %s: deploy failed", "deploy_succeeded": "✅ %s: live",
          "recovered": "✅ %s: recovered", "preview_ready": "🔍 %s: preview ready",
          "app_down": "🔥 %s: down", "app_up": "✅ %s: back up",
          "app_crashed": "💥 %s: crashed",
          "test": "🧪 %s: test alert"}
COLOURS = {"deploy_failed": 0xE74C3C, "deploy_succeeded": 0x2ECC71,
           "recovered": 0x2ECC71, "preview_ready": 0x3498DB, "app_down": 0xE74C3C,
           "app_up": 0x2ECC71, "app_crashed": 0xE67E22, "test": 0x95A5A6}
DISCORD = {"content": 2000, "title": 256, "description": 4096, "fields": 25,
           "field_name": 256, "field_value": 1024, "footer": 2048, "author": 256,
           "total": 6000}


def rule_problems(settings):
    """Return one line per ALERTS_* key of an app's .env that names no event."""
    found = []
    for target in ALERT_TARGETS:
        key = "ALERTS_" + target.upper().replace("-", "_")
        if key in settings:
            try:
                parse_rules(settings[key])
            except ValueError as e:
                found.append("%s=%r: %s" % (key, settings[key], e))
    return found


def parse_rules(value):
    """Return the set of events a rule names: a list, 'all' or 'none'."""
    words = set(value.replace(",", " ").split())
    if words == {"all"}:
        return set(EVENTS)
    if words in ({"none"}, set()):
        return set()
    unknown = words - set(EVENTS)
    if unknown:
        raise ValueError("unknown events %s; known: %s, all, none"
                         % (", ".join(sorted(unknown)), ", ".join(EVENTS)))
    return words


def neutralise(text):
    """Strip control characters and defuse Discord mentions (@everyone, <@1>)."""
    text = "".join(c if c >= " " or c in "\n\t" else "" for c in text or "")
    return text.replace("@", "@\u200b")


def log_tail(path, secrets, lines=TAIL_LINES, max_bytes=65536):
    """Return the last lines of a deploy log, redacted and made harmless."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except (OSError, TypeError):
        return ""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    tail = "\n".join(text.splitlines()[-lines:])
    return neutralise(tail).replace("```", "'''")


class Templates:
    """Alert texts: $DOCKRUNE_HOME/templates/<event>.<target>.txt or built-in."""

    def __init__(self, directory):
        self.directory = directory

    def text(self, event, target):
        path = os.path.join(self.directory, "%s.%s.txt" % (event, target))
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip("\n")
        except FileNotFoundError:
            return BUILT_IN_TEMPLATES[event]
        except (OSError, UnicodeDecodeError) as e:
            log.error("template %s cannot be read (%s): using the built-in one",
                      path, e)
            return BUILT_IN_TEMPLATES[event]

    def render(self, event, target, values):
        """Render safely: an unknown or malformed placeholder stays as it is."""
        return string.Template(self.text(event, target)).safe_substitute(values)

    def problems(self):
        """Return one line per template file that will not render as meant."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if not name.endswith(".txt") or name.startswith("."):
                continue        # notes and editor files may live here too
            event, _, target = name[:-len(".txt")].partition(".")
            if event not in EVENTS or target not in ALERT_TARGETS:
                found.append("%s: not <event>.<target>.txt with event in %s and "
                             "target in %s" % (name, ", ".join(EVENTS),
                                               ", ".join(ALERT_TARGETS)))
                continue
            found += ["%s: %s" % (name, p) for p in self._check(name)]
        return found

    def _check(self, name):
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                template = string.Template(f.read())
        except (OSError, UnicodeDecodeError) as e:
            return ["cannot be read: %s" % e]
        if not template.is_valid():
            return ["a '$' that starts no ${variable} (write $$ for a dollar sign)"]
        unknown = sorted(set(template.get_identifiers()) - set(VARIABLES))
        return ["unknown variable ${%s}" % u for u in unknown]


class Notifier:
    """Turns deploy outcomes into alerts for Coach Artie, Discord and n8n."""

    def __init__(self, outbox, store_, settings, user_agent):
        self.outbox = outbox
        self.store = store_
        self.settings = settings
        self.user_agent = user_agent
        self.templates = Templates(os.path.join(store_.home, "templates"))

    def targets(self):
        """Return the names of the configured alert targets."""
        found = []
        if self.settings.coach_artie_url and self.settings.coach_artie_channel:
            found.append("coach-artie")
        if self.settings.discord_webhook_url:
            found.append("discord")
        if self.settings.n8n_webhook_url:
            found.append("n8n")
        return found

    # -- events -> items (a worker thread; no network) --

    def on_event(self, event, record):
        if not self.targets():
            return
        alert = self.classify(event, record)
        if alert is None:
            return
        if alert in ("app_down", "app_up"):
            record = self._health_record(alert, record)
        elif alert == "app_crashed":
            record = self._crash_record(record)
        values = None
        for target in self.targets():
            if alert not in self.rules(target, record.get("app")):
                continue
            values = values or self.values(alert, record)
            self.outbox.enqueue(target, "alerts:" + target, alert,
                                {"body": self.payload(target, alert, values, record)})

    def classify(self, event, record):
        """Return the alert event for a deploy event, or None."""
        if event == "failed":
            return "deploy_failed"
        if event in ("app-down", "app-up"):     # from the health checker
            return event.replace("-", "_")
        if event == "process_exited":           # from the supervisor
            return "app_crashed"
        if event != "live":
            return None
        if self._failed_before(record):
            return "recovered"
        return "preview_ready" if record.get("environment") != "production" else (
            "deploy_succeeded")

    def _failed_before(self, record):
        """Tell whether the environment's previous finished deploy failed."""
        older = False       # history is newest first: skip down to record
        for other in self.store.history(record["app"], limit=100):
            if other["id"] == record["id"]:
                older = True
            elif older and other.get("environment") == record["environment"] and (
                    other.get("status") in ("live", "failed")):
                return other["status"] == "failed"
        return False

    def _health_record(self, alert, info):
        """Return the last deploy's record with what the health checker saw."""
        record = dict(self.store.deploy(info.get("deploy") or "") or {})
        record.update({k: v for k, v in info.items() if v is not None})
        record.update(status="down" if alert == "app_down" else "up",
                      error=info.get("detail") or "", duration=None)
        return self._with_repo(record)

    def _crash_record(self, spec):
        """Return the deploy record of a process the supervisor found dead."""
        record = dict(self.store.deploy(spec.get("deploy") or "") or {})
        # Only these: a process's spec also holds its whole environment.
        record.update(app=spec.get("app"), environment=spec.get("environment"),
                      sha=spec.get("sha") or record.get("sha"), status="crashed",
                      error="exited (pid %s); the supervisor restarts it"
                      % spec.get("pid"), duration=None)
        return self._with_repo(record)

    def _with_repo(self, record):
        """Fill in the record's repo from its app's .env when it has none."""
        if not record.get("repo"):
            try:
                record["repo"] = (self.store.load_app(record["app"]) or {}).get("REPO")
            except store.EnvFileError:
                pass
        return record

    def rules(self, target, app):
        """Return the events target hears of for app (its .env may override)."""
        key = "ALERTS_" + target.upper().replace("-", "_")
        overall = getattr(self.settings, key.lower())
        try:
            settings = self.store.load_app(app) if app else None
        except store.EnvFileError:
            settings = None
        value = (settings or {}).get(key, overall)
        for rule, fallback in ((value, overall), (overall, DEFAULT_RULES[target])):
            try:
                return parse_rules(rule)
            except ValueError as e:
                log.error("%s=%r for %s: %s; using %r", key, rule, app, e, fallback)
        return parse_rules(DEFAULT_RULES[target])

    def values(self, alert, record):
        """Return the template variables for one alert about record."""
        sha = record.get("sha") or ""
        url = record.get("url") or (
            "http://127.0.0.1:%s" % record["port"] if record.get("port") else "")
        repo = record.get("repo") or ""
        web = self.settings.git_base_url if self.settings.git_base_url.startswith(
            ("http://", "https://")) else "https://github.com"
        return {
            "event": alert, "app": record.get("app") or "",
            "environment": record.get("environment") or "", "repo": repo,
            "sha": sha, "short_sha": short(sha), "ref": neutralise(
                record.get("ref") or ""), "status": record.get("status") or "",
            "url": url, "preview_url": url if record.get(
                "environment") != "production" else "",
            "log_url": log_url(self.settings, record) or "",
            "log_tail": log_tail(record.get("log"), self.settings.secrets()),
            "duration": _duration(record.get("duration")),
            "error": neutralise(record.get("error") or ""),
            "commit_message": neutralise(record.get("message") or ""),
            "author": neutralise(record.get("author") or record.get("pusher") or ""),
            "commit_url": "%s/%s/commit/%s" % (web.rstrip("/"), repo, sha)
            if store.is_repo(repo) and sha else "",
            "deploy_id": record.get("id") or ""}

    def payload(self, target, alert, values, record):
        text = self.templates.render(alert, target, values)
        if target == "coach-artie":
            if not text.strip():
                # Coach Artie answers 400 to empty content: say it the built-in way.
                text = string.Template(BUILT_IN_TEMPLATES[alert]).safe_substitute(values)
            return {"content": clip(text.strip(), COACH_ARTIE_LIMIT, TRUNCATED)}
        if target == "discord":
            if values["log_tail"]:
                values = dict(values, log_tail="```\n%s\n```" % values["log_tail"])
                text = self.templates.render(alert, target, values)
            return discord_message(alert, text, values)
        return n8n_document(alert, text, values, record)

    # -- items -> HTTP (one sender thread per target) --

    def send(self, target, item):
        """POST one alert to target; return the Answer (None: not configured)."""
        if target not in self.targets():
            log.warning("alerts: %s is no longer configured: %s alert dropped",
                        target, item["op"])
            return None
        return self.post(target, item["args"]["body"])

    def post(self, target, body):
        headers = {"User-Agent": self.user_agent}
        s = self.settings
        if target == "coach-artie":
            url = "%s/api/channels/%s/messages" % (
                s.coach_artie_url, urllib.parse.quote(s.coach_artie_channel, safe=""))
        elif target == "discord":
            url = s.discord_webhook_url
        elif target == "n8n":
            url = s.n8n_webhook_url
            if s.n8n_header:
                name, _, value = s.n8n_header.partition(":")
                headers[name.strip()] = value.strip()
        else:
            raise ValueError("unknown alert target %r" % target)
        if not url:
            raise TransportError("%s is not configured" % target)
        return http_request("POST", url, body, headers, timeout=s.outbox_timeout)

    def test_payload(self, target):
        """Return the body of a test alert for target."""
        values = dict.fromkeys(VARIABLES, "")
        values.update(app="dockrune", environment="test", status="test",
                      event="test", target=target)
        text = string.Template(BUILT_IN_TEMPLATES["test"]).safe_substitute(values)
        if target == "coach-artie":
            return {"content": text}
        if target == "discord":
            return discord_message("test", text, values)
        return n8n_document("test", text, values, {})


def discord_message(alert, text, values):
    """Return a Discord webhook body that stays inside every documented limit."""
    fields = [("App", values["app"]), ("Environment", values["environment"]),
              ("Branch", values["ref"])]
    if values["short_sha"]:
        fields.append(("Commit", "[%s](%s)" % (values["short_sha"],
                                               values["commit_url"])
                       if values["commit_url"] else values["short_sha"]))
    if values.get("duration") and values["duration"] != "?":
        fields.append(("Duration", values["duration"]))
    links = []
    if values.get("url"):
        links.append("[app](%s)" % values["url"])
    if values.get("log_url"):
        links.append("[log](%s)" % values["log_url"])
    if links:
        fields.append(("Links", " · ".join(links)))
    embed = {
        "title": clip(TITLES[alert] % values["app"], DISCORD["title"]),
        "description": text,
        "color": COLOURS[alert], "timestamp": store.utcnow(),
        "footer": {"text": "dockrune"},
        "fields": [{"name": clip(n, DISCORD["field_name"]),
                    "value": clip(v, DISCORD["field_value"]),
                    "inline": n != "Links"} for n, v in fields
                   if v][:DISCORD["fields"]]}
    if values.get("log_url"):
        embed["url"] = values["log_url"]
    _fit_description(embed)
    return {"username": "dockrune", "embeds": [embed],
            "allowed_mentions": {"parse": []}}


def _fit_description(embed):
    """Cut the description so the embed fits 4096 and 6000 characters overall."""
    used = _units(embed["title"]) + _units(embed["footer"]["text"]) + sum(
        _units(f["name"]) + _units(f["value"]) for f in embed["fields"])
    room = min(DISCORD["description"], DISCORD["total"] - used - 50)
    embed["description"] = clip(embed["description"].strip(), room, "\n" + TRUNCATED)
    if not embed["description"]:
        del embed["description"]    # a template may render to nothing at all


def n8n_document(alert, text, values, record):
    """Return the JSON document n8n receives (field names are documented)."""
    return {
        "version": N8N_VERSION, "event": alert, "app": values["app"],
        "environment": values["environment"], "repo": values["repo"] or None,
        "ref": values["ref"] or None, "sha": values["sha"] or None,
        "status": values["status"] or None, "message": text,
        "error": values["error"] or None,
        "commit": {"message": values["commit_message"] or None,
                   "author": values["author"] or None},
        "urls": {"app": values["url"] or None,
                 "preview": values["preview_url"] or None,
                 "log": values["log_url"] or None,
                 "commit": values["commit_url"] or None},
        "duration": record.get("duration"), "deploy_id": values["deploy_id"] or None,
        "log_tail": values["log_tail"].splitlines(),
        "timestamps": {"created": record.get("created_at"),
                       "started": record.get("started_at"),
                       "finished": record.get("finished_at"),
                       "sent": store.utcnow()},
    }


# -- checks (dockrune doctor) ---------------------------------------------------------


# What dockrune does on GitHub, and a request that proves the token may do it
# without changing anything: an empty body fails validation (422) only after
# the permission check passed; without the permission GitHub answers 403.
PERMISSION_PROBES = (
    ("Deployments: write", "POST", "/deployments"),
    ("Commit statuses: write", "POST", "/statuses/" + "0" * 40),
    ("Pull requests: write", "POST", "/issues/0/comments"),
)
CLASSIC_SCOPES = {"repo", "public_repo"}


def check_github_token(settings, repos, user_agent):
    """Return (ok, name, detail) lines about the token and each repo's permissions."""
    if not settings.github_token:
        return [(True, "github token", "not set: deploys are not reported to GitHub")]
    try:
        answer = github_request(settings, user_agent, "GET",
                                settings.github_api + "/rate_limit")
    except TransportError as e:
        return [(False, "github token", "cannot reach %s: %s"
                 % (settings.github_api, e))]
    if answer.status != 200:
        return [(False, "github token", "GitHub answered %d: %s (make a new token)"
                 % (answer.status, answer.message()))]
    lines = [(True, "github token", "accepted by %s" % settings.github_api)]
    scopes = answer.headers.get("x-oauth-scopes")
    if scopes is not None:
        granted = {s.strip() for s in scopes.split(",") if s.strip()}
        lines.append((bool(granted & CLASSIC_SCOPES), "token scopes",
                      "classic token with %s" % (", ".join(sorted(granted)) or
                                                 "no scopes")
                      + ("" if granted & CLASSIC_SCOPES else
                         ": needs the repo scope (public_repo for public repos)")))
    for repo in repos:
        lines.append(_check_repo(settings, user_agent, repo))
    return lines


def _check_repo(settings, user_agent, repo):
    api = "%s/repos/%s" % (settings.github_api, repo)
    missing = []
    for name, method, path in PERMISSION_PROBES:
        try:
            answer = github_request(settings, user_agent, method, api + path, {})
        except TransportError as e:
            return False, "github " + repo, "cannot check: %s" % e
        if answer.status in (401, 403):
            missing.append(name)
        elif answer.status == 404 and path == "/deployments":
            return False, "github " + repo, (
                "the token cannot see %s: give it access to the repository" % repo)
    if missing:
        return False, "github " + repo, "token lacks %s" % ", ".join(missing)
    return True, "github " + repo, "Deployments, Commit statuses, Pull requests: write"


# -- together ----------------------------------------------------------------------


class Alerts:
    """The outbox with its GitHub reporter and its notifier, as the daemon uses it."""

    def __init__(self, store_, settings, user_agent):
        self.settings = settings
        # GitHub's rate-limit window is an hour: its reset time is honoured
        # in full, up to that; alert targets wait at most the retry cap.
        self.outbox = Outbox(store_, {}, settings.outbox_retry_base,
                             settings.outbox_retry_max, settings.outbox_max_age,
                             hold_caps={"github": max(3600.0,
                                                      settings.outbox_retry_max)})
        self.github = GitHubReporter(self.outbox, store_, settings, user_agent)
        self.notifier = Notifier(self.outbox, store_, settings, user_agent)
        self.outbox.senders["github"] = self.github.send
        for target in ALERT_TARGETS:
            self.outbox.senders[target] = (
                lambda item, t=target: self.notifier.send(t, item))

    def notify(self, event, record):
        """Queue what a deploy or health event means; never raises.

        The Deployer's and the health checker's hook: it writes state files
        and touches no network, so the webhook handler may call it.
        """
        with self.outbox.batch():
            for part in (self.github, self.notifier):
                try:
                    part.on_event(event, dict(record))
                except Exception:
                    log.exception("alerts: %s for %s failed", event, record.get("id"))

    def start(self):
        """Report what the last run left unreported, then start the senders.

        Call after Store.recover(), before deploys run.
        """
        for problem in self.notifier.templates.problems():
            log.warning("template %s", problem)
        try:
            self.github.recover()
        except Exception:
            log.exception("github: recovering unreported deploys failed")
        self.outbox.start()

    def shutdown(self, timeout=5.0):
        return self.outbox.shutdown(timeout)


def _printable(text):
    return "".join(c if c >= " " else " " for c in str(text)).strip()
