"""Helpers for the outbox tests: settings with fast retries, simulated deploys."""

import os
import time

import alerts
import dockrune
import store

SHA1 = "a" * 39 + "1"
SHA2 = "b" * 39 + "2"
PUBLIC = "https://deploy.example.org"


def settings_for(home, **extra):
    environ = {"DOCKRUNE_HOME": str(home), "DOCKRUNE_WEBHOOK_SECRET": "s3cret-hook",
               "DOCKRUNE_PUBLIC_URL": PUBLIC, "DOCKRUNE_OUTBOX_RETRY_BASE": "0.05",
               "DOCKRUNE_OUTBOX_RETRY_MAX": "2", "DOCKRUNE_OUTBOX_TIMEOUT": "2"}
    environ.update(extra)
    return dockrune.load_settings(environ)


def make_alerts(home, start=True, **extra):
    """Return (store, Alerts) on home, the senders started unless start=False."""
    settings = settings_for(home, **extra)
    st = store.Store(settings.home)
    st.ensure_dirs()
    box = alerts.Alerts(st, settings, dockrune.user_agent())
    if start:
        box.start()
    return st, box


def write_app(st, app, repo="octo/shop", **keys):
    lines = ["REPO=%s" % repo] + ["%s=%s" % kv for kv in keys.items()]
    with open(st.app_path(app), "w") as f:
        f.write("\n".join(lines) + "\n")


def simulate(st, box, app="shop", env="production", sha=SHA1, outcome="live",
             repo="octo/shop", error="web exited 1", log_lines=(), message="change",
             superseded=False):
    """Walk one deploy record through the events the Deployer sends."""
    record = st.new_deploy(app, env, sha, "main", "push", repo=repo, action="deploy",
                           message=message, author="Ann Author")
    box.notify("queued", record)
    record = st.update_deploy(record["id"], status="running",
                              started_at=store.utcnow())
    box.notify("started", record)
    os.makedirs(os.path.dirname(record["log"]), exist_ok=True)
    with open(record["log"], "w") as f:
        f.write("".join(line + "\n" for line in log_lines))
    domain = "%s.example.org" % (app if env == "production" else "%s-%s" % (env, app))
    fields = dict(status=outcome, finished_at=store.utcnow(), duration=41.2,
                  url="https://" + domain, domain=domain, port=8123)
    if outcome != "live":
        fields["error"] = error
    record = st.update_deploy(record["id"], **fields)
    box.notify("live" if outcome == "live" else "failed", record)
    return record


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("%s not reached in %ss" % (what, timeout))
