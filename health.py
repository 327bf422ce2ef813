"""Uptime: a background thread that checks every live environment.

Every DOCKRUNE_HEALTH_INTERVAL seconds each environment that has been live
(status live or failing, with a port) gets one GET on its HEALTH_PATH at
http://127.0.0.1:<port>.  A 2xx or 3xx answer is up; anything else, after one
quick retry, is down.

Samples stay small and bounded: per environment, one [slot, up, total] triple
per half hour (SLOT_SECONDS), the last 24 hours only (KEEP_SLOTS), in
state/health.json.  The overview draws its uptime bar from them without
reading any deploy record.

When an environment that was up stops answering, a live one is flipped to
failing and the event "app-down" is raised; when it answers again, "app-up"
is raised and the status goes back to live if it was the health checker that
made it failing (and no deploy came in between).  Events go to a notify
callable, notify(event, info), the same shape as the Deployer's.
"""

import concurrent.futures
import logging
import threading
import time

import runners

log = logging.getLogger("dockrune.health")

SLOT_SECONDS = 1800
KEEP_SLOTS = 48
PROBERS = 8
CHECKED = ("live", "failing")


# -- samples ----------------------------------------------------------------------


def add_sample(entry, up, now, detail=""):
    """Return entry (a dict, possibly empty) with one check at now added.

    The entry keeps at most KEEP_SLOTS slots, the newest ones; the time and
    outcome of the last check are kept beside them.
    """
    slot = int(now // SLOT_SECONDS)
    slots = [s for s in entry.get("slots", []) if s[0] > slot - KEEP_SLOTS]
    if slots and slots[-1][0] == slot:
        slots[-1] = [slot, slots[-1][1] + (1 if up else 0), slots[-1][2] + 1]
    else:
        slots.append([slot, 1 if up else 0, 1])
    return dict(entry, slots=slots, up=bool(up), checked_at=_iso(now),
                detail=detail[:100])


def day_slots(entry, now):
    """Return KEEP_SLOTS (up, total) pairs, oldest first, ending at now's slot.

    A slot without any check is (0, 0).
    """
    first = int(now // SLOT_SECONDS) - KEEP_SLOTS + 1
    pairs = [(0, 0)] * KEEP_SLOTS
    for slot, up, total in (entry or {}).get("slots", ()):
        if 0 <= slot - first < KEEP_SLOTS:
            pairs[slot - first] = (up, total)
    return pairs


def uptime(entry, now):
    """Return the share of checks that were up over the last 24 hours, or None."""
    pairs = day_slots(entry, now)
    total = sum(t for _u, t in pairs)
    return sum(u for u, _t in pairs) / total if total else None


def _iso(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# -- the checker thread --------------------------------------------------------------


class HealthChecker:
    """Checks every live environment on a timer, in one named thread.

    start() and stop() are called from the daemon's thread; check_all() may be
    called directly (tests do), but not from two threads at once.
    """

    def __init__(self, store_, interval=30, notify=None, retry_delay=2.0,
                 timeout=3.0, busy=None):
        self.store = store_
        # busy(app, env) tells whether a deploy or a stop is queued or under
        # way there: its answers then say nothing about the app's health.
        self.busy = busy or (lambda app, env: False)
        self.interval = interval
        self.notify_hook = notify
        self.retry_delay = retry_delay
        self.timeout = timeout
        self._stopping = threading.Event()
        self._thread = None

    def start(self):
        if self.interval <= 0:
            log.info("health checks are off (DOCKRUNE_HEALTH_INTERVAL=0)")
            return
        self._thread = threading.Thread(target=self._loop, name="dockrune-health",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout=10.0):
        """Ask the thread to stop; return False if it is still busy after timeout."""
        self._stopping.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self):
        while not self._stopping.is_set():
            try:
                self.check_all()
            except Exception:
                # One bad round (an unreadable state file, say) must not end
                # uptime checks for good: log it and try again next time.
                log.exception("health check round failed")
            self._stopping.wait(self.interval)

    def notify(self, event, info):
        if self.notify_hook is None:
            return
        try:
            self.notify_hook(event, info)
        except Exception:
            log.exception("notify %s failed for %s/%s", event, info.get("app"),
                          info.get("environment"))

    # -- one round --

    def check_all(self):
        """Check every environment that should be answering; return {key: up}."""
        targets = self.targets()
        results = {}
        if targets:
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(PROBERS, len(targets)),
                    thread_name_prefix="dockrune-probe") as pool:
                answers = pool.map(lambda t: self.check(t[2]), targets)
                for (key, summary, _url), (up, detail) in zip(targets, answers):
                    # A stop that began while we probed is not an outage.
                    if not self.busy(summary["app"], summary["environment"]):
                        results[key] = (summary, up, detail)
        samples = self.record(results)
        for key, (summary, up, detail) in results.items():
            self.apply(summary, samples.get(key, {}), up, detail)
        return {key: result[1] for key, result in results.items()}

    def targets(self):
        """Return (key, summary, url) for every environment to check now."""
        apps = self.store.load_apps()
        found = []
        for key, summary in sorted(self.store.environments().items()):
            settings = apps.get(summary.get("app"))
            if (settings is None or summary.get("status") not in CHECKED
                    or not summary.get("live_deploy") or not summary.get("port")
                    or self.busy(summary["app"], summary["environment"])):
                continue
            path = settings.get("HEALTH_PATH") or "/"
            url = "http://127.0.0.1:%d%s" % (int(summary["port"]),
                                             path if path.startswith("/") else
                                             "/" + path)
            found.append((key, summary, url))
        return found

    def check(self, url):
        """Return (up, detail) for url: a failure is tried once more first."""
        code, detail = runners.probe(url, timeout=self.timeout)
        if not (code and 200 <= code < 400) and self.retry_delay >= 0:
            if self._stopping.wait(self.retry_delay):
                return True, "not checked: shutting down"
            code, detail = runners.probe(url, timeout=self.timeout)
        return bool(code and 200 <= code < 400), detail

    def record(self, results):
        """Add this round's outcomes to the samples on disk; return them all.

        Environments that are gone lose their samples; those not checked this
        round (stopped, deploying) keep theirs.
        """
        now = time.time()
        samples = self.store.health_samples()
        known = self.store.environments()
        samples = {k: v for k, v in samples.items() if k in known}
        for key, (_summary, up, detail) in results.items():
            previous = samples.get(key, {})
            entry = add_sample(previous, up, now, detail)
            if previous.get("up") != entry["up"]:
                entry["since"] = _iso(now)
            samples[key] = entry
        self.store.write_health_samples(samples)
        return samples

    def apply(self, summary, entry, up, detail):
        """Flip the environment's status and raise an event when up/down changed."""
        app, env = summary["app"], summary["environment"]
        # What the checker last said holds for the deploy it said it of; a
        # newer deploy starts with a clean slate.
        was = summary.get("health") if summary.get(
            "health_deploy") == summary.get("last_deploy") else None
        if up and was in (None, "up"):
            if was is None:
                self._mark(summary, health="up")
            return
        if not up and was == "down":
            return
        info = {"app": app, "environment": env, "sha": summary.get("sha"),
                "deploy": summary.get("last_deploy"), "url": summary.get("url"),
                "port": summary.get("port"), "detail": detail,
                "since": entry.get("since")}
        if up:
            self._back_up(summary, info)
        else:
            self._gone_down(summary, info)

    def _gone_down(self, summary, info):
        app, env = info["app"], info["environment"]
        fields = {"health": "down", "health_since": info["since"]}
        if summary.get("status") == "live":
            fields.update(status="failing", failing_since=info["since"],
                          failed_by_health=summary.get("last_deploy"))
        if self._mark(summary, **fields) is None:
            return
        log.warning("%s/%s stopped answering on port %s: %s", app, env,
                    info["port"], info["detail"])
        self.notify("app-down", info)

    def _back_up(self, summary, info):
        app, env = info["app"], info["environment"]
        fields = {"health": "up", "health_since": info["since"]}
        if (summary.get("status") == "failing"
                and summary.get("failed_by_health") == summary.get("last_deploy")):
            fields.update(status="live", failed_by_health=None, failing_since=None)
        if self._mark(summary, **fields) is None:
            return
        log.warning("%s/%s answers again on port %s (%s)", app, env, info["port"],
                    info["detail"])
        self.notify("app-up", info)

    def _mark(self, summary, **fields):
        """Write fields unless a deploy or a stop changed the environment meanwhile."""
        expect = {k: summary.get(k) for k in ("status", "last_deploy", "running")}
        return self.store.update_environment_if(
            summary["app"], summary["environment"], expect,
            health_deploy=summary.get("last_deploy"), **fields)

