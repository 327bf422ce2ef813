"""Footprint: resident memory and start-up time, dockrune against adnanh/webhook.

dockrune serves 50 apps (50 .env files); webhook serves 50 HMAC-checked hooks.
Resident memory (VmRSS) is read idle, then after 1000 signed deliveries spread
over the 50 apps (10 at a time).  dockrune runs with DOCKRUNE_WORKERS=0, so
every delivery is taken, recorded and queued and no deploy runs.  Start-up
time is from exec until the first HTTP answer.
"""

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from common import (NOISE, Dockrune, Webhook, fmt, median, need_tool, post_push,
                    push_body, ratio, rss_kb, say, signed_hook, table, verdict,
                    write_app)

APPS = 50
DELIVERIES = 1000


def run(runs=3):
    need_tool("webhook", "webhook")
    say("== 4. footprint: %d apps, %d deliveries (%d runs; %s)"
        % (APPS, DELIVERIES, runs, NOISE))
    got = {"dockrune": [], "webhook": []}
    for n in range(runs):
        for peer in ("dockrune", "webhook")[::1 if n % 2 == 0 else -1]:
            with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
                got[peer].append(_once(tmp, peer))
    rows, summary = [], {}
    for peer, results in got.items():
        figures = {k: median([r[k] for r in results])
                   for k in ("start", "idle", "after")}
        figures["growth"] = (figures["after"] / figures["idle"] - 1) * 100
        summary[peer] = figures
        rows.append([peer, fmt(figures["start"] * 1000, " ms", 0),
                     fmt(figures["idle"] / 1024, " MB", 1),
                     fmt(figures["after"] / 1024, " MB", 1),
                     fmt(figures["growth"], " %", 1)])
    table(rows, ["peer", "start-up", "RSS idle", "RSS after", "growth"])
    ours = summary["dockrune"]
    say("  dockrune idle %s (target < 30 MB: %s), growth %s (target <= 10%%: %s); "
        "dockrune/webhook RSS idle %s, start-up %s"
        % (fmt(ours["idle"] / 1024, " MB", 1), verdict(ours["idle"] < 30 * 1024),
           fmt(ours["growth"], " %", 1), verdict(ours["growth"] <= 10),
           fmt(ratio(ours["idle"], summary["webhook"]["idle"]), "", 2),
           fmt(ratio(ours["start"], summary["webhook"]["start"]), "", 2)))
    return summary


def _once(tmp, peer):
    if peer == "dockrune":
        home = os.path.join(tmp, "home")
        for i in range(APPS):
            write_app(home, "app-%02d" % i, "octo/app-%02d" % i, BRANCH="main",
                      PORT=str(18000 + i), GIT_URL=os.path.join(tmp, "none.git"))
        server = Dockrune(home, DOCKRUNE_WORKERS="0")
        urls = [server.hook_url] * APPS
    else:
        server = Webhook(os.path.join(tmp, "webhook"),
                         [signed_hook("app-%02d" % i, "/bin/true")
                          for i in range(APPS)])
        urls = [server.hook_url("app-%02d" % i) for i in range(APPS)]
    try:
        server.start()
        time.sleep(1.0)
        idle = rss_kb(server.proc.pid)
        bodies = [push_body("octo/app-%02d" % i, "%040x" % (i + 1))
                  for i in range(APPS)]
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda n: post_push(urls[n % APPS],
                                                         bodies[n % APPS]),
                                     range(DELIVERIES)))
        bad = [s for s in statuses if s not in (200, 202)]
        if bad:
            raise RuntimeError("%s answered %d deliveries with %s"
                               % (peer, len(bad), sorted(set(bad))))
        time.sleep(1.0)
        after = rss_kb(server.proc.pid)
        return {"start": server.started_in, "idle": idle, "after": after}
    finally:
        server.stop()
