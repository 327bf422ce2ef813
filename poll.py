"""Poll mode: find new commits without any inbound connection.

With DOCKRUNE_POLL_INTERVAL set, one thread asks each app's remote for the
head of its branch (`git ls-remote`) and, with a GitHub token, the REST API
for the app's open pull requests.  A head that is new is deployed through the
same lanes and records as a webhook push, with trigger "poll".

Each remote (a GIT_URL, or a repository's pull-request list) has its own
schedule: every interval seconds, give or take a tenth so that many apps do
not ask at the same instant, and, after errors, twice as long each time up
to DOCKRUNE_POLL_MAX_BACKOFF.  What each app saw last is kept in
state/poll.json, for `dockrune status` and across restarts.
"""

import json
import logging
import os
import random
import subprocess
import threading
import time
import urllib.parse

import runners
import store

log = logging.getLogger("dockrune.poll")

GIT_TIMEOUT = 60
API_TIMEOUT = 20
JITTER = 0.1
MAX_PULLS = 100


class PollError(Exception):
    """A remote could not be asked; the message says what failed."""


# -- timing -----------------------------------------------------------------------


def jittered(seconds, spread=JITTER, rand=random.random):
    """Return seconds moved at random by up to spread (a fraction) either way."""
    return seconds * (1.0 + spread * (2.0 * rand() - 1.0))


def backoff_delay(interval, failures, ceiling):
    """Return the seconds to wait after failures errors in a row.

    No failure: interval.  Then twice as long after each failure, never more
    than ceiling (and never less than interval).
    """
    if failures <= 0:
        return float(interval)
    return float(min(interval * 2 ** min(failures, 30), max(ceiling, interval)))


def poll_enabled(global_settings, app_settings):
    """Tell whether the poller looks after this app (POLL=off in its .env: no)."""
    if global_settings.poll_interval <= 0:
        return False
    value = (app_settings or {}).get("POLL", "on").strip().lower()
    return value not in ("off", "false", "no", "0")


# -- asking the remotes -------------------------------------------------------------


def list_heads(url, patterns, token, timeout=GIT_TIMEOUT,
               token_base="https://github.com"):
    """Return ({ref: sha}, {symref: target}) of url's refs matching patterns.

    Runs `git ls-remote --symref`, so that "HEAD" names the default branch.
    Raises PollError when git fails or takes longer than timeout seconds.
    """
    argv = ["git", "ls-remote", "--symref", "--", url] + list(patterns)
    env = runners.git_environment(url, token, token_base)
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as e:
        raise PollError("cannot run git: %s" % (e.strerror or e)) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        runners.kill_group(proc)
        proc.communicate()
        raise PollError("git ls-remote timed out after %ds" % timeout) from None
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        last = runners._printable(lines[-1])[:200] if lines else "no output"
        raise PollError("git ls-remote exited %d: %s" % (proc.returncode, last))
    return parse_ls_remote(out.decode("utf-8", "replace"))


def parse_ls_remote(text):
    """Parse `git ls-remote --symref` output into ({ref: sha}, {symref: target})."""
    refs, symrefs = {}, {}
    for line in text.splitlines():
        left, _, name = line.partition("\t")
        if left.startswith("ref: "):
            symrefs[name] = left[len("ref: "):]
        elif runners._is_sha(left):
            refs[name] = left
    return refs, symrefs


_openers = []


def _opener():
    """Return the opener that follows redirects to the same host only.

    Built on first use, as in alerts.py: urllib.request is heavy to load.
    """
    if not _openers:
        import urllib.request

        class SameHostRedirect(urllib.request.HTTPRedirectHandler):
            """Follow a redirect only to the host asked: the token stays there."""

            def redirect_request(self, req, fp, code, msg, headers, newurl):
                old = urllib.parse.urlsplit(req.full_url)
                new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url,
                                                                 newurl))
                if (new.scheme, new.netloc) != (old.scheme, old.netloc):
                    return None
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        _openers.append(urllib.request.build_opener(SameHostRedirect))
    return _openers[0]


def get_github(api, path, token, etag=None, timeout=API_TIMEOUT):
    """GET api + path from the REST API; return (status, JSON or None, ETag).

    With etag, the request is conditional: 304 (nothing changed) comes back
    as (304, None, etag), and GitHub does not count it against the rate
    limit.  Raises PollError on any other failure.
    """
    headers = {"Accept": "application/vnd.github+json",
               "X-GitHub-Api-Version": "2022-11-28",
               "Authorization": "Bearer " + token,
               "User-Agent": "dockrune-poll"}
    if etag:
        headers["If-None-Match"] = etag
    import urllib.error
    import urllib.request
    request = urllib.request.Request(api + path, headers=headers)
    try:
        with _opener().open(request, timeout=timeout) as response:
            data = json.loads(response.read(5_000_000).decode("utf-8"))
            return response.status, data, response.headers.get("ETag")
    except urllib.error.HTTPError as e:
        if e.code == 304:
            return 304, None, etag
        raise PollError("GitHub answered %d to GET %s" % (e.code, path)) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise PollError("GET %s failed: %s" % (path, str(reason)[:200])) from None


# -- the poller ----------------------------------------------------------------------


class Poller:
    """Looks for new heads of every app's branch and pull requests.

    runner.submit_new() queues what is new; a sha that is live, running or
    waiting in its lane is not queued again, whoever saw it first.
    """

    def __init__(self, store_, settings, runner, deployer, rand=random.random,
                 clock=time.time):
        self.store = store_
        self.settings = settings
        self.runner = runner
        self.deployer = deployer
        self.interval = settings.poll_interval
        self.ceiling = max(settings.poll_max_backoff, self.interval)
        self.rand = rand
        self.clock = clock
        self.path = os.path.join(store_.state_dir, "poll.json")
        self._remotes = {}      # remote -> {"failures": n, "next_at": time}
        self._pulls = {}        # repo -> (ETag, [pull request], ...)
        self._stopping = threading.Event()
        self._thread = None

    # -- the thread --

    def start(self):
        if self.interval <= 0:
            return
        log.info("polling every %ds (backoff up to %ds)", self.interval,
                 self.ceiling)
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="dockrune-poll")
        self._thread.start()

    def stop(self, timeout=5.0):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        # A short random pause first, so that a restart of many daemons (or
        # one with many apps) does not ask every remote at the same moment.
        self._stopping.wait(self.rand() * min(self.interval * JITTER, 5.0))
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("a polling pass failed")
            self._stopping.wait(self.seconds_to_next())

    def seconds_to_next(self):
        """Return how long to sleep before some remote is due (0.5 s at least)."""
        now = self.clock()
        due = [r["next_at"] for r in self._remotes.values()] or [now + self.interval]
        return max(0.5, min(min(due) - now, self.interval))

    # -- one pass --

    def run_once(self):
        """Ask every remote that is due; return the deploys queued."""
        now = self.clock()
        queued = []
        by_url = {}
        seen = store.read_json(self.path, {})
        apps = self.store.load_apps()
        for app, app_settings in apps.items():
            if not poll_enabled(self.settings, app_settings):
                continue
            try:
                url = runners.git_url_for(app_settings, self.settings)
            except runners.DeployError as e:
                _note(seen, app, "production", now, error=str(e))
                continue
            by_url.setdefault(url, []).append((app, app_settings))
        for url, members in sorted(by_url.items()):
            if self._due("git:" + url, now):
                queued += self.poll_branches(url, members, seen, now)
        if self.settings.github_token:
            for app, app_settings in sorted(apps.items()):
                if self._wants_pulls(app_settings) and self._due(
                        "api:" + app_settings["REPO"].lower(), now):
                    queued += self.poll_pulls(app, app_settings, seen, now)
        for key in [k for k in seen if k.split("/", 1)[0] not in apps]:
            del seen[key]
        store.write_json(self.path, seen)
        return queued

    def poll_branches(self, url, members, seen, now):
        """Ask url for the branch of each app in members; queue the new heads."""
        branches = sorted({s.get("BRANCH") or "HEAD" for _a, s in members})
        patterns = ["HEAD" if b == "HEAD" else "refs/heads/" + b for b in branches]
        try:
            refs, symrefs = list_heads(url, patterns, self.settings.github_token,
                                         token_base=self.settings.git_base_url)
        except PollError as e:
            wait = self._failed("git:" + url, now, e)
            for app, _s in members:
                _note(seen, app, "production", now, error=str(e),
                      retry_at=store_time(now + wait))
            return []
        self._succeeded("git:" + url, now)
        queued = []
        default = symrefs.get("HEAD", "")
        default = default[len("refs/heads/"):] if default.startswith(
            "refs/heads/") else ""
        for app, app_settings in members:
            branch = app_settings.get("BRANCH")
            sha = refs.get("refs/heads/%s" % branch) if branch else None
            if not branch and default:
                # No BRANCH: the remote's HEAD, as a deploy by ref would take.
                branch, sha = default, refs.get("HEAD")
            if sha is None:
                _note(seen, app, "production", now,
                      error="no branch %r on the remote" % (branch or "HEAD"))
                continue
            record = self.consider(seen, app, "production", sha, branch, now,
                                   repo=app_settings.get("REPO"))
            queued += [record] if record else []
        return queued

    def consider(self, seen, app, env, sha, ref, now, **facts):
        """Queue a deploy of sha to app/env unless it was seen or is there already.

        Returns the new record or None.  A head the poller acted on once is
        not queued again when its deploy fails or is refused as outdated: the
        next push (or `dockrune deploy`) decides.
        """
        before = (seen.get("%s/%s" % (app, env)) or {}).get("sha")
        _note(seen, app, env, now, sha=sha, ref=ref)
        if before == sha:
            return None
        record = self.runner.submit_new(app, env, sha, lambda: self.deployer.new_deploy(
            app, env, sha, ref, "poll", **facts))
        if record is None:
            log.info("%s/%s: %s is already live or on its way", app, env, sha[:12])
            return None
        seen["%s/%s" % (app, env)]["deploy"] = record["id"]
        log.info("deploy %s of %s/%s: new head %s of %s", record["id"], app, env,
                 sha[:12], ref)
        return record

    # -- pull requests --

    def _wants_pulls(self, app_settings):
        previews = app_settings.get("PREVIEWS", "on").strip().lower()
        return store.is_repo(app_settings.get("REPO", "")) and previews in (
            "on", "true", "yes", "1")

    def poll_pulls(self, app, app_settings, seen, now):
        """Queue a preview deploy of every open pull request whose head is new."""
        repo = app_settings["REPO"]
        key = "api:" + repo.lower()
        etag, pulls = self._pulls.get(repo.lower(), (None, []))
        path = "/repos/%s/pulls?state=open&per_page=%d" % (repo, MAX_PULLS)
        try:
            status, data, etag = get_github(self.settings.github_api, path,
                                            self.settings.github_token, etag)
            if status != 304:
                if not isinstance(data, list):
                    raise PollError("GET %s did not return a list" % path)
                pulls = data
        except PollError as e:
            wait = self._failed(key, now, e)
            seen.setdefault("%s/pulls" % app, {}).update(
                polled_at=store_time(now), error=str(e),
                retry_at=store_time(now + wait))
            return []
        self._succeeded(key, now)
        self._pulls[repo.lower()] = (etag, pulls)
        seen["%s/pulls" % app] = {"polled_at": store_time(now), "open": len(pulls),
                                  "error": None}
        queued = []
        for pr in pulls:
            record = self.consider_pull(seen, app, app_settings, repo, pr, now)
            queued += [record] if record else []
        # Forget what was seen of pull requests no longer open: one reopened
        # at the same head is new again.
        still = {"%s/pr-%s" % (app, pr.get("number")) for pr in pulls
                 if isinstance(pr, dict)}
        for key in [k for k in seen if k.startswith(app + "/pr-") and k not in still]:
            del seen[key]
        return queued

    def consider_pull(self, seen, app, app_settings, repo, pr, now):
        """Queue the preview of one open pull request (forks only when allowed)."""
        number = pr.get("number") if isinstance(pr, dict) else None
        head = (pr.get("head") or {}) if isinstance(pr, dict) else {}
        sha = head.get("sha")
        if not isinstance(number, int) or number <= 0 or not runners._is_sha(sha):
            return None
        head_repo = str((head.get("repo") or {}).get("full_name") or "")
        forks = app_settings.get("PREVIEW_FORKS", "off").strip().lower()
        if head_repo.lower() != repo.lower() and forks not in ("on", "true", "yes",
                                                                "1"):
            # XXX: a fork's pull request seen only by polling is not offered
            # for approval on the admin page; it needs the webhook for that.
            return None
        ref = str(head.get("ref") or "")[:100]
        return self.consider(
            seen, app, "pr-%d" % number, sha, ref, now, repo=repo, pr=number,
            title=str(pr.get("title") or "")[:200],
            author=str((pr.get("user") or {}).get("login") or "")[:100],
            pr_url=str(pr.get("html_url") or "")[:300])

    # -- schedule per remote --

    def _due(self, remote, now):
        state = self._remotes.setdefault(remote, {"failures": 0, "next_at": now})
        return state["next_at"] <= now

    def _failed(self, remote, now, error):
        """Push the remote's next attempt back; return the seconds until then."""
        state = self._remotes[remote]
        state["failures"] += 1
        wait = jittered(backoff_delay(self.interval, state["failures"], self.ceiling),
                        rand=self.rand)
        state["next_at"] = now + wait
        level = logging.WARNING if state["failures"] == 1 else logging.INFO
        log.log(level, "polling %s failed (%d in a row; next try in %ds): %s",
                _shown(remote), state["failures"], wait, error)
        return wait

    def _succeeded(self, remote, now):
        state = self._remotes[remote]
        if state["failures"]:
            log.warning("polling %s works again after %d failures", _shown(remote),
                        state["failures"])
        state["failures"] = 0
        state["next_at"] = now + jittered(self.interval, rand=self.rand)

    def failures(self, remote):
        """Return the errors in a row of a remote ("git:<url>" or "api:<repo>")."""
        return self._remotes.get(remote, {}).get("failures", 0)


def _note(seen, app, env, now, **fields):
    """Record in seen what polling app/env found at now."""
    entry = seen.setdefault("%s/%s" % (app, env), {})
    entry.update(polled_at=store_time(now), error=None, retry_at=None)
    entry.update(fields)


def _shown(remote):
    """Return a remote's key fit for the log: no credentials in a URL."""
    _kind, _, where = remote.partition(":")
    parts = urllib.parse.urlsplit(where)
    if parts.password or parts.username:
        where = where.replace(parts.netloc, parts.hostname or "", 1)
    return where


def store_time(seconds):
    """Return a time.time() value as ISO 8601 UTC, like every time in state."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def annotate(rows, store_, settings):
    """Add what polling saw to status rows: polled_at, poll_sha, poll_error.

    Only in poll mode: without it the rows stay as they always were.
    """
    if settings.poll_interval <= 0:
        return rows
    seen = store.read_json(os.path.join(store_.state_dir, "poll.json"), {})
    for row in rows:
        entry = seen.get("%s/%s" % (row["app"], row["environment"])) or {}
        row["polled_at"] = entry.get("polled_at")
        row["poll_sha"] = entry.get("sha")
        row["poll_error"] = entry.get("error")
    return rows
