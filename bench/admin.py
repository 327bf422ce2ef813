"""Admin at scale: 200 apps with 1000 deploy records each (200,000 records).

The state is written straight into a temporary DOCKRUNE_HOME in dockrune's
own layout (apps/*.env, state/apps.json, state/history, state/deploys), then
`dockrune serve` answers GET /api/apps and GET /admin, one request at a time.
/healthz, measured the same way, is the floor: a request that reads nothing.
/admin is measured when the route answers; a 404 means it is not built yet.
"""

import base64
import json
import os
import tempfile
import time
import urllib.error
import urllib.request

from common import NOISE, Dockrune, fmt, median, ratio, say, table, verdict

APPS = 200
RECORDS = 1000
TOKEN = "bench-api-token"
PASSWORD = "bench-admin-password"


def run(requests=20):
    say("== 5. admin at scale: %d apps x %d deploy records (median of %d requests; "
        "%s)" % (APPS, RECORDS, requests, NOISE))
    with tempfile.TemporaryDirectory(prefix="bench-admin-") as tmp:
        home = os.path.join(tmp, "home")
        began = time.monotonic()
        write_state(home)
        say("  state written in %.0f s" % (time.monotonic() - began))
        server = Dockrune(home, DOCKRUNE_API_TOKEN=TOKEN, DOCKRUNE_WORKERS="0",
                          DOCKRUNE_ADMIN_PASSWORD=PASSWORD,
                          DOCKRUNE_KEEP_DEPLOYS=str(RECORDS))
        try:
            server.start(timeout=120)
            return _measure(server, requests)
        finally:
            server.stop()


def _measure(server, requests):
    basic = base64.b64encode(("admin:" + PASSWORD).encode()).decode()
    targets = [("/healthz", {}), ("/api/apps", {"Authorization": "Bearer " + TOKEN}),
               ("/admin", {"Authorization": "Basic " + basic})]
    times, statuses = {}, {}
    for path, headers in targets:
        _get(server.url + path, headers)      # warm up
    for _ in range(requests):
        for path, headers in targets:
            status, seconds, size = _get(server.url + path, headers)
            statuses[path] = (status, size)
            times.setdefault(path, []).append(seconds * 1000)
    rows, summary = [], {}
    for path, _headers in targets:
        status, size = statuses[path]
        if path == "/admin" and status == 404:
            rows.append([path, "not built (404)", "", ""])
            summary[path] = None
            continue
        if status != 200:       # a login this bench does not know, or an error
            rows.append([path, "answered %d: not measured" % status, "", ""])
            summary[path] = None
            continue
        summary[path] = median(times[path])
        rows.append([path, status, "%d bytes" % size, fmt(summary[path], " ms", 1)])
    table(rows, ["path", "status", "answer", "median"])
    for path in ("/api/apps", "/admin"):
        if summary[path] is None:
            say("  %s: not measured (%s)" % (path, "not built" if statuses[path][0]
                                             == 404 else "no 200 answer"))
            continue
        say("  %s: %s (target < 50 ms: %s), %s x the /healthz floor"
            % (path, fmt(summary[path], " ms", 1), verdict(summary[path] < 50),
               fmt(ratio(summary[path], summary["/healthz"]), "", 1)))
    return summary


def _get(url, headers):
    request = urllib.request.Request(url, headers=headers)
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        body = e.read()
        status = e.code
    return status, time.perf_counter() - began, len(body)


def write_state(home):
    """Write APPS apps with RECORDS finished deploys each, as dockrune would."""
    state = os.path.join(home, "state")
    for sub in ("apps", "deploys", "history"):
        os.makedirs(os.path.join(home if sub == "apps" else state, sub),
                    exist_ok=True)
    summaries = {}
    for a in range(APPS):
        app = "app-%03d" % a
        with open(os.path.join(home, "apps", app + ".env"), "w") as f:
            f.write("REPO=octo/%s\nBRANCH=main\nPORT=%d\nDOMAIN=%s.example.org\n"
                    % (app, 20000 + a, app))
        ids = [_write_record(home, app, a, n) for n in range(RECORDS)]
        with open(os.path.join(state, "history", app + ".json"), "w") as f:
            json.dump(ids, f, indent=1)
        summaries["%s/production" % app] = {
            "app": app, "environment": "production", "status": "live",
            "sha": "%040x" % (a * RECORDS + RECORDS), "ref": "main",
            "deployed_at": "2026-01-01T00:00:00Z", "last_deploy": ids[-1],
            "live_deploy": ids[-1], "queued": None, "running": None,
            "port": 20000 + a, "domain": "%s.example.org" % app,
            "url": "https://%s.example.org" % app}
    with open(os.path.join(state, "apps.json"), "w") as f:
        json.dump(summaries, f, indent=1, sort_keys=True)


def _write_record(home, app, a, n):
    day, second = divmod(n, 86400)
    deploy_id = "202601%02d-%02d%02d%02d-%s-%04x" % (
        1 + day, second // 3600, second // 60 % 60, second % 60, app, n % 65536)
    record = {
        "id": deploy_id, "app": app, "environment": "production",
        "sha": "%040x" % (a * RECORDS + n + 1), "ref": "main", "trigger": "push",
        "status": "live" if n % 10 else "failed", "repo": "octo/" + app,
        "pusher": "octocat", "message": "change number %d" % n,
        "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z",
        "finished_at": "2026-01-01T00:00:09Z", "duration": 8.0,
        "error": None if n % 10 else "health check failed",
        "log": os.path.join(home, "logs", app, deploy_id + ".log"),
        "kind": "compose", "port": 20000 + a, "domain": "%s.example.org" % app,
        "url": "https://%s.example.org" % app, "author": "Octo Cat",
    }
    with open(os.path.join(home, "state", "deploys", deploy_id + ".json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return deploy_id
