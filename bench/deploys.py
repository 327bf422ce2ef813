"""Real deploys of a small compose app (busybox httpd built from a Dockerfile).

2. burst: 100 pushes to one branch within a second.  dockrune runs the one in
   progress and then only the newest; adnanh/webhook runs bench/deploy.sh once
   per delivery.  Figures: deploys run, and seconds from the first delivery
   until the last pushed sha is what the app serves.
3. overhead: push-to-live of one commit through dockrune against
   bench/deploy.sh run directly (fetch, checkout, compose up -d --build, first
   good GET).  Both deploy the same commit, taking turns.

"Live" is seen from outside, the same way for every peer: GET / every 20 ms
until it answers with the commit's marker.
"""

import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from common import (BENCH, NOISE, Dockrune, Remote, Webhook, compose_app,
                    compose_down, ensure_base_image, fmt, free_port, get_text, median,
                    need_tool, post_push, push_body, ratio, say, signed_hook,
                    store_records, table, unique, verdict, wait_text, write_app)

REPO = "octo/benchapp"
DEPLOY_SH = os.path.join(BENCH, "deploy.sh")
BURST = 100


class Setup:
    """A git remote, a dockrune app and a script checkout, all unique names."""

    def __init__(self, tmp, **dockrune_settings):
        self.tmp = tmp
        self.remote = Remote(os.path.join(tmp, "git"))
        self.name = unique("bench")
        self.project = "dockrune-" + self.name
        self.script_project = self.name + "-script"
        self.port, self.script_port = free_port(), free_port()
        self.home = os.path.join(tmp, "home")
        write_app(self.home, self.name, REPO, GIT_URL=self.remote.bare, BRANCH="main",
                  PORT=str(self.port), HEALTH_TIMEOUT="60")
        self.dockrune = Dockrune(self.home, **dockrune_settings)
        self.checkout = os.path.join(tmp, "script-src")
        self.url = "http://127.0.0.1:%d/" % self.port
        self.script_url = "http://127.0.0.1:%d/" % self.script_port

    def script_argv(self, sha):
        return [DEPLOY_SH, self.remote.bare, self.checkout, self.script_project,
                str(self.script_port), sha]

    def clean(self):
        self.dockrune.stop()
        compose_down(self.project)
        compose_down(self.script_project)


def push_to_live(setup, marker, sha, peer):
    """Deploy sha through peer; return seconds until marker is served."""
    began = time.monotonic()
    if peer == "dockrune":
        status = post_push(setup.dockrune.hook_url, push_body(REPO, sha))
        if status != 202:
            raise RuntimeError("dockrune answered %d to a push" % status)
        live = wait_text(setup.url, marker, 300)
        setup.dockrune.wait_idle(120)
    else:
        proc = subprocess.Popen(setup.script_argv(sha), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        live = wait_text(setup.script_url, marker, 300)
        _out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError("deploy.sh failed: %s" % err.decode()[-300:])
    return live - began if live else None


def run_overhead(runs=5):
    say("== 3. deploy overhead, push to live (%d runs each, taking turns; %s)"
        % (runs, NOISE))
    need_tool("curl", "curl")
    ensure_base_image()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        setup = Setup(tmp)
        try:
            setup.dockrune.start()
            times = {"dockrune": [], "deploy.sh": []}
            for n in range(runs + 1):
                marker = "overhead-%d" % n
                sha = setup.remote.commit(compose_app(marker), marker)
                peers = ["dockrune", "deploy.sh"][::1 if n % 2 else -1]
                for peer in peers:
                    seconds = push_to_live(setup, marker, sha, peer)
                    if n:       # the first round builds from cold: warm-up only
                        times[peer].append(seconds)
        finally:
            setup.clean()
    rows = [[peer, " ".join(fmt(t, "", 2) for t in got), fmt(median(got), " s", 2)]
            for peer, got in times.items()]
    table(rows, ["peer", "runs (s)", "median"])
    r = ratio(median(times["dockrune"]), median(times["deploy.sh"]))
    say("  dockrune/deploy.sh %s (target <= 1.10: %s)"
        % (fmt(r, "", 2), verdict(r is not None and r <= 1.10)))
    return {"times": times, "ratio": r}


def run_burst(runs=3, window=90):
    say("== 2. burst of %d pushes within a second (%d runs each; the webhook peer "
        "is watched for %d s; %s)" % (BURST, runs, window, NOISE))
    need_tool("webhook", "webhook")
    need_tool("curl", "curl")
    ensure_base_image()
    results = {"dockrune": [], "webhook": []}
    for n in range(runs):
        for peer in ("dockrune", "webhook")[::1 if n % 2 == 0 else -1]:
            with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
                results[peer].append(_burst_once(tmp, peer, window))
    rows = []
    for peer, got in results.items():
        rows.append([peer, " ".join(str(g["started"]) for g in got),
                     fmt(median([g["finished"] for g in got]), "", 0),
                     " ".join(fmt(g["live"], "", 1) if g["live"] else ">%d" % window
                              for g in got),
                     fmt(median([g["live"] for g in got]), " s", 1),
                     ", ".join(g["final"] for g in got),
                     sum(g["refused"] for g in got),
                     " ".join(fmt(g["spread"], "", 2) for g in got)])
    table(rows, ["peer", "deploys run", "finished", "last sha live (s)", "median",
                 "serving at the end", "not 2xx", "burst sent+answered (s)"])
    ours = median([g["live"] for g in results["dockrune"]])
    theirs = median([g["live"] for g in results["webhook"]])
    ran = max(g["started"] for g in results["dockrune"])
    if theirs:
        versus = fmt(ratio(ours, theirs), "", 2)
    else:
        versus = "< %s (webhook: not live within %d s)" % (
            fmt(ratio(ours, window), "", 2), window)
    say("  dockrune deploys run: at most %d (target <= 2: %s); time to last sha "
        "live dockrune/webhook %s" % (ran, verdict(ran <= 2), versus))
    return results


def _burst_once(tmp, peer, window):
    setup = Setup(tmp, DOCKRUNE_KEEP_DEPLOYS="1000")
    webhook = None
    try:
        first = setup.remote.commit(compose_app("burst-0"), "burst-0")
        shas = [setup.remote.commit(compose_app("burst-%d" % i), "burst-%d" % i)
                for i in range(1, BURST + 1)]
        if peer == "dockrune":
            setup.dockrune.start()
            url, hook_url = setup.url, setup.dockrune.hook_url
        else:
            webhook = Webhook(os.path.join(tmp, "webhook"), [signed_hook(
                "deploy", DEPLOY_SH, workdir=tmp)])
            hook = webhook.hooks_file
            _script_hook(hook, setup)
            webhook.start()
            url, hook_url = setup.script_url, webhook.hook_url("deploy")
        # Start from a live app, so the burst replaces a running version.
        post_push(hook_url, push_body(REPO, first))
        if not wait_text(url, "burst-0", 300):
            raise RuntimeError("%s did not deploy the first commit" % peer)
        if peer == "dockrune":
            setup.dockrune.wait_idle(120)
        began = time.monotonic()
        refused, spread = _send_burst(hook_url, shas)
        live = wait_text(url, "burst-%d" % BURST, window)
        if peer == "dockrune":
            setup.dockrune.wait_idle(300)
            burst = set(shas)
            records = [r for r in store_records(setup.home, setup.name)
                       if r.get("sha") in burst]
            started = sum(1 for r in records if r.get("started_at"))
            finished = sum(1 for r in records if r.get("status") in ("live", "failed"))
        else:
            time.sleep(max(0.0, began + window - time.monotonic()))
            started = _count_lines(setup.checkout + ".started") - 1
            finished = _count_lines(setup.checkout + ".done") - 1
        final = _served(url)
        return {"started": started, "finished": finished, "refused": refused,
                "spread": spread,
                "live": live - began if live else None, "final": final}
    finally:
        if webhook is not None:
            webhook.stop()
            # A compose up killed with webhook's scripts may still have asked
            # the engine for a container: let it land, then remove it too.
            time.sleep(5)
        setup.clean()
        if webhook is not None:
            time.sleep(5)
            compose_down(setup.script_project)


def _script_hook(hooks_file, setup):
    """Give the hook its fixed arguments and the pushed sha, like deploy.sh wants."""
    import json
    with open(hooks_file) as f:
        hooks = json.load(f)
    hooks[0]["pass-arguments-to-command"] = [
        {"source": "string", "name": setup.remote.bare},
        {"source": "string", "name": setup.checkout},
        {"source": "string", "name": setup.script_project},
        {"source": "string", "name": str(setup.script_port)},
        {"source": "payload", "name": "after"}]
    with open(hooks_file, "w") as f:
        json.dump(hooks, f, indent=1)


def _send_burst(hook_url, shas):
    """POST one push per sha, oldest first, one every 1/len(shas) seconds.

    Each is sent on time even when earlier ones are still waiting for their
    answer, as GitHub does.  Return (deliveries not answered 2xx, seconds
    from the first send to the last answer).
    """
    began = time.monotonic()

    def send(i):
        time.sleep(max(0.0, began + i / len(shas) - time.monotonic()))
        status = post_push(hook_url, push_body(REPO, shas[i]))
        return not (status and 200 <= status < 300)

    with ThreadPoolExecutor(max_workers=len(shas)) as pool:
        refused = sum(pool.map(send, range(len(shas))))
    return refused, time.monotonic() - began


def _count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _served(url):
    text = get_text(url)
    return text.strip() if text else "nothing"
