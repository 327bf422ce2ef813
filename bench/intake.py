"""Webhook intake: signed push deliveries under load (wrk), three servers.

- dockrune serve with DOCKRUNE_WORKERS=0: every delivery is verified, parsed,
  deduped, recorded (deploy record, history, app summary, delivery ids) and
  queued, superseding the one waiting before it; no deploy runs.
- adnanh/webhook with an HMAC-SHA256 trigger rule and /bin/true as command.
- a bare waitress app that checks the HMAC and parses the JSON: the ceiling.

Each delivery carries its own X-GitHub-Delivery id.  Servers take turns run by
run; the figures are medians.
"""

import os
import subprocess
import tempfile

from common import (NOISE, PYTHON, SECRET, BENCH, Dockrune, Webhook, fmt, free_port,
                    median, need_tool, push_body, ratio, run_wrk, say,
                    signed_hook, stop_process, table, verdict, wait_http)

CONNECTIONS = (10, 50)
SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"


def start_ceiling(workdir):
    port = free_port()
    log = open(os.path.join(workdir, "ceiling.log"), "ab")
    proc = subprocess.Popen([PYTHON, os.path.join(BENCH, "ceiling.py"), str(port)],
                            env=dict(os.environ, BENCH_SECRET=SECRET),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    url = "http://127.0.0.1:%d/" % port
    try:
        wait_http(url, 20, proc)
    except Exception:
        stop_process(proc)
        raise
    return proc, url


def run(runs=3, seconds=5):
    need_tool("wrk", "wrk")
    need_tool("webhook", "webhook")
    say("== 1. webhook intake (%d runs x %ds per server and load; %s)"
        % (runs, seconds, NOISE))
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        body_file = os.path.join(tmp, "push.json")
        with open(body_file, "wb") as f:
            f.write(push_body("octo/bench", SHA))
        return _measure(tmp, body_file, runs, seconds)


def _measure(tmp, body_file, runs, seconds):
    home = os.path.join(tmp, "home")
    from common import write_app
    write_app(home, "bench", "octo/bench", BRANCH="main", PORT="18999",
              GIT_URL=os.path.join(tmp, "nowhere.git"))
    dockrune = Dockrune(home, DOCKRUNE_WORKERS="0")
    webhook = Webhook(os.path.join(tmp, "webhook"),
                      [signed_hook("bench", "/bin/true")])
    ceiling = None
    try:
        dockrune.start()
        webhook.start()
        ceiling, ceiling_url = start_ceiling(tmp)
        targets = {"dockrune": dockrune.hook_url, "webhook": webhook.hook_url("bench"),
                   "ceiling": ceiling_url}
        for url in targets.values():
            run_wrk(url, body_file, 10, 1)     # warm up
        results = {}
        for connections in CONNECTIONS:
            for n in range(runs):
                names = list(targets)
                names = names[n % 3:] + names[:n % 3]
                for name in names:
                    got = run_wrk(targets[name], body_file, connections, seconds)
                    results.setdefault((name, connections), []).append(got)
        return report(results, runs)
    finally:
        dockrune.stop()
        webhook.stop()
        stop_process(ceiling)


def report(results, runs):
    rows, summary = [], {}
    for (name, connections), got in sorted(results.items(),
                                           key=lambda kv: (kv[0][1], kv[0][0])):
        figures = {key: median([g[key] for g in got]) for key in ("rps", "p50", "p99")}
        figures["errors"] = sum(g["errors"] for g in got)
        summary[(name, connections)] = figures
        rows.append([name, connections, fmt(figures["rps"], "", 0),
                     fmt(figures["p50"], " ms", 2), fmt(figures["p99"], " ms", 2),
                     figures["errors"]])
    table(rows, ["server", "conns", "req/s", "p50", "p99", "non-2xx/err"])
    out = {}
    for connections in CONNECTIONS:
        ours = summary[("dockrune", connections)]
        vs_webhook = ratio(ours["rps"], summary[("webhook", connections)]["rps"])
        vs_ceiling = ratio(ours["rps"], summary[("ceiling", connections)]["rps"])
        say("  %d connections: dockrune/webhook %s (target >= 1.0: %s), "
            "dockrune/ceiling %s (target >= 0.75: %s)"
            % (connections, fmt(vs_webhook, "", 2),
               verdict(vs_webhook and vs_webhook >= 1.0), fmt(vs_ceiling, "", 2),
               verdict(vs_ceiling and vs_ceiling >= 0.75)))
        out[connections] = {"vs_webhook": vs_webhook, "vs_ceiling": vs_ceiling,
                            "figures": {n: summary[(n, connections)]
                                        for n in ("dockrune", "webhook", "ceiling")}}
    p99 = summary[("dockrune", 10)]["p99"]
    say("  dockrune p99 at 10 connections: %s (target < 25 ms: %s)"
        % (fmt(p99, " ms", 2), verdict(p99 is not None and p99 < 25)))
    return out
