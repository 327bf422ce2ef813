"""Supervision of the processes dockrune starts itself (nitro, procfile, static).

Every supervised process:

- runs in its own session, so its pid is also its process group and session
  id, and stopping it ends the whole tree it started;
- writes its output straight into a runtime log per app environment, opened
  for appending, so it keeps running when dockrune stops; the watcher keeps
  that log under a size cap by rotating it to <log>.1;
- is described by a spec file under run/procs/<app>/<environment>.<slot>.json
  (mode 0600: it holds the app's environment) with its pid and the start time
  the kernel gives that pid, so a restarted dockrune re-adopts its own
  processes and never mistakes a stranger that reused a pid for one of them;
- is started again with a growing delay when it dies, and every death and
  restart is reported through notify(event, info).

Slots: "live" is what serves the app's port and is restarted when it dies;
"next" is a candidate on a second port during a deploy, never restarted, and
stopped when found after a crash; "previous" is no process but the spec of
the version being replaced while a switch runs, until the new one has passed
its health check: a dockrune that dies in between starts the old version
again when it comes back (and stops the unproven new one).

Run as a script, this module is also the small static file server that
static sites are served with:

    python3 supervise.py static ROOT --port PORT [--host HOST]

Linux only: identities come from /proc.
"""

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import store

log = logging.getLogger("dockrune.supervise")

SLOTS = ("live", "next", "previous")
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 60.0     # a process that ran this long starts a fresh backoff
WATCH_INTERVAL = 1.0
STOP_GRACE = 10.0


# -- process identity (/proc) ----------------------------------------------------


def _stat_fields(pid):
    """Return /proc/<pid>/stat from field 3 on, or None when there is no pid."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold anything.
    return data[data.rfind(")") + 2:].split()


def start_time(pid):
    """Return the kernel's start time of a living pid (clock ticks), else None.

    Zombies count as dead: they serve nothing and only wait to be reaped.
    """
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X", "x"):
        return None
    return int(fields[19])


def is_running(pid, started):
    """Tell whether pid is still the very process that started at started."""
    return bool(pid) and started is not None and start_time(pid) == started


def session_members(sid):
    """Return the living pids whose session is sid."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields and fields[0] not in ("Z", "X", "x") and int(fields[3]) == sid:
            members.append(int(name))
    return members


# -- the supervisor ----------------------------------------------------------------


class Supervisor:
    """Starts, watches, restarts and stops the processes of app environments.

    All methods are thread-safe.  notify(event, info) is called with
    "process_exited" and "process_restarted"; it must not block.
    """

    def __init__(self, run_dir, log_max_bytes=5_000_000, notify=None):
        self.procs_dir = os.path.join(run_dir, "procs")
        self.log_max_bytes = log_max_bytes
        self.notify_hook = notify
        self._lock = threading.RLock()
        self._children = {}     # pid -> Popen, so that our children get reaped
        self._retry = {}        # (app, env) -> (monotonic time of next try, restarts)
        self._stopping = threading.Event()
        self._thread = None

    # -- specs on disk --

    def spec_path(self, app, env, slot):
        return os.path.join(self.procs_dir, app, "%s.%s.json" % (env, slot))

    def get(self, app, env, slot="live"):
        """Return the spec of app/env/slot, or None."""
        try:
            with open(self.spec_path(app, env, slot), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("unreadable process spec of %s/%s (%s): %s", app, env, slot, e)
            return None

    def specs(self):
        """Return every spec on disk."""
        found = []
        try:
            apps = sorted(os.listdir(self.procs_dir))
        except FileNotFoundError:
            return found
        for app in apps:
            for name in sorted(os.listdir(os.path.join(self.procs_dir, app))):
                env, _, rest = name.partition(".")
                slot = rest[:-len(".json")] if rest.endswith(".json") else None
                spec = self.get(app, env, slot) if slot in SLOTS else None
                if spec:
                    found.append(spec)
        return found

    def _save(self, spec):
        store.write_json(self.spec_path(spec["app"], spec["environment"],
                                        spec["slot"]), spec, mode=0o600)

    def remember_previous(self, spec):
        """Keep spec as the version to start again if a switch is cut short."""
        with self._lock:
            self._save(dict(spec, slot="previous"))

    def forget_previous(self, app, env):
        with self._lock:
            self._forget({"app": app, "environment": env, "slot": "previous"})

    def _forget(self, spec):
        try:
            os.unlink(self.spec_path(spec["app"], spec["environment"], spec["slot"]))
        except FileNotFoundError:
            pass

    # -- starting and stopping --

    def start(self, app, env, slot, argv, cwd, environ, log_path, **facts):
        """Start argv for app/env/slot and return its spec.

        A process already in that slot must have been stopped first.
        """
        spec = dict(facts, app=app, environment=env, slot=slot, argv=list(argv),
                    cwd=cwd, env=dict(environ), log=log_path, restarts=0)
        with self._lock:
            self._spawn(spec)
            self._retry.pop((app, env), None)
            return dict(spec)

    def _spawn(self, spec):
        os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
        with open(spec["log"], "ab") as out:
            out.write(("--- %s starting: %s\n" % (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                " ".join(spec["argv"]))).encode("utf-8", "replace"))
            out.flush()
            proc = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._children[proc.pid] = proc
        spec.update(pid=proc.pid, start_time=start_time(proc.pid),
                    started_at=time.time())
        self._save(spec)
        # Only the program: the rest of argv may hold the app's own secrets.
        log.info("started %s/%s (%s) pid %d: %s", spec["app"], spec["environment"],
                 spec["slot"], proc.pid, spec["argv"][0])

    def stop(self, app, env, slot, grace=STOP_GRACE):
        """Stop the whole process group of app/env/slot; return its old spec."""
        with self._lock:
            spec = self.get(app, env, slot)
            if spec is None:
                return None
            self._forget(spec)
            if slot == "live":
                self._retry.pop((app, env), None)
            self._end(spec, grace)
            log.info("stopped %s/%s (%s) pid %s", app, env, slot, spec.get("pid"))
            return spec

    def _end(self, spec, grace):
        pid, started = spec.get("pid"), spec.get("start_time")
        if not pid:
            return
        leader = start_time(pid)
        if leader is not None and leader != started:
            log.warning("pid %d of %s/%s now belongs to another process: left alone",
                        pid, spec["app"], spec["environment"])
            return
        deadline = time.monotonic() + grace
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal_session(pid, sig)
            while time.monotonic() < deadline or sig == signal.SIGKILL:
                self._reap()
                if not session_members(pid):
                    return
                if sig == signal.SIGKILL and time.monotonic() > deadline + 5:
                    log.error("session %d of %s/%s survives SIGKILL", pid,
                              spec["app"], spec["environment"])
                    return
                time.sleep(0.05)

    def _signal_session(self, sid, sig):
        try:
            os.killpg(sid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        # Members that moved to a group of their own stay in the session.
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _reap(self):
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def alive(self, app, env, slot="live"):
        """Tell whether the process of app/env/slot runs right now."""
        with self._lock:
            self._reap()
            spec = self.get(app, env, slot)
            return bool(spec) and is_running(spec.get("pid"), spec.get("start_time"))

    # -- watching --

    def adopt_all(self):
        """On dockrune's start: keep what runs, restart the dead, drop candidates."""
        with self._lock:
            for spec in self.specs():
                name = "%s/%s" % (spec["app"], spec["environment"])
                if spec["slot"] == "previous":
                    self._adopt_previous(spec, name)
                elif spec["slot"] != "live":
                    log.warning("stopping the leftover candidate of %s", name)
                    self.stop(spec["app"], spec["environment"], spec["slot"])
                elif is_running(spec.get("pid"), spec.get("start_time")):
                    log.info("re-adopted %s: pid %d", name, spec["pid"])
                else:
                    log.warning("%s was not running: starting it again", name)
                    self._restart(spec)

    def _adopt_previous(self, spec, name):
        log.warning("dockrune stopped while %s switched versions: starting the "
                    "previous one again", name)
        self.stop(spec["app"], spec["environment"], "live")
        self._forget(spec)
        spec = dict(spec, slot="live", restarts=0)
        try:
            self._spawn(spec)
        except OSError as e:
            log.error("cannot start the previous version of %s: %s", name, e)

    def start_watching(self):
        self._stopping.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="dockrune-supervisor")
        self._thread.start()

    def shutdown(self, timeout=5.0):
        """Stop watching; the supervised processes go on running."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self):
        while not self._stopping.wait(WATCH_INTERVAL):
            try:
                self.check()
            except Exception:
                # The watcher outlives any one failure: log it and go on.
                log.exception("supervisor check failed")

    def check(self):
        """Restart dead live processes whose delay has passed; cap runtime logs."""
        with self._lock:
            self._reap()
            for spec in self.specs():
                if spec["slot"] != "live":
                    continue
                self._cap_log(spec["log"])
                if is_running(spec.get("pid"), spec.get("start_time")):
                    continue
                key = (spec["app"], spec["environment"])
                if key not in self._retry:
                    self._retry[key] = self._first_retry(spec)
                    self._notify("process_exited", spec)
                when, restarts = self._retry[key]
                if time.monotonic() >= when:
                    spec["restarts"] = restarts
                    self._restart(spec)

    def _first_retry(self, spec):
        """Return (when to restart, restarts so far) for a process found dead."""
        ran = time.time() - spec.get("started_at", 0)
        # A process that ran for a while starts again soon; a crash loop waits longer.
        restarts = 0 if ran > STABLE_AFTER else spec.get("restarts", 0)
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** restarts)
        log.warning("%s/%s (pid %s) exited after %.0fs: restarting in %.0fs",
                    spec["app"], spec["environment"], spec.get("pid"), ran, delay)
        return time.monotonic() + delay, restarts

    def _restart(self, spec):
        # The leader is gone, but a child it left may still hold the port.
        self._end(spec, grace=2.0)
        spec["restarts"] = spec.get("restarts", 0) + 1
        try:
            self._spawn(spec)
        except OSError as e:
            log.error("cannot restart %s/%s: %s", spec["app"], spec["environment"], e)
            self._retry[(spec["app"], spec["environment"])] = (
                time.monotonic() + BACKOFF_MAX, spec["restarts"])
            return
        self._retry.pop((spec["app"], spec["environment"]), None)
        self._notify("process_restarted", spec)

    def _cap_log(self, path):
        """Rotate path to path.1 once it passes the cap.

        The process appends (O_APPEND), so truncating the file in place is
        safe: its next write lands at the new end.
        """
        try:
            if os.path.getsize(path) <= self.log_max_bytes:
                return
            shutil.copyfile(path, path + ".1")
            os.truncate(path, 0)
        except OSError as e:
            log.warning("cannot rotate %s: %s", path, e)

    def _notify(self, event, spec):
        if self.notify_hook is None:
            return
        info = {k: spec.get(k) for k in ("app", "environment", "pid", "restarts",
                                         "kind", "sha", "deploy", "log")}
        try:
            self.notify_hook(event, info)
        except Exception:
            log.exception("notify %s failed for %s", event, spec.get("app"))


def tail(path, lines=20, limit=64 * 1024):
    """Return the last lines of the file at path (for deploy logs and errors)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]


# -- the static file server ----------------------------------------------------------


def static_handler():
    """Return the request handler of the static server (a class).

    Made here, not at import: only the static server's own process needs
    http.server, and the daemon imports this module too.
    """
    import http.server

    class StaticHandler(http.server.SimpleHTTPRequestHandler):
        """Serve files under the root: no listings, no dotfiles, no way out.

        Symbolic links are followed only when their target is inside the root.
        """

        server_version = "dockrune-static"
        sys_version = ""

        def send_head(self):
            path = self.translate_path(self.path)
            root = os.path.realpath(self.directory)
            real = os.path.realpath(path)
            parts = urllib.parse.unquote(
                self.path.split("?", 1)[0].split("#", 1)[0]).split("/")
            if os.path.commonpath([root, real]) != root or any(
                    p.startswith(".") and p not in ("", ".") for p in parts):
                self.send_error(404, "File not found")
                return None
            return super().send_head()

        def list_directory(self, path):
            self.send_error(404, "File not found")
            return None

    return StaticHandler


def serve_static(root, port, host="127.0.0.1"):
    """Serve root on host:port until SIGTERM."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise SystemExit("static: %s is not a directory" % root)

    import http.server
    handler_class = static_handler()

    def handler(*args, **kwargs):
        return handler_class(*args, directory=root, **kwargs)

    server = http.server.ThreadingHTTPServer((host, port), handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("serving %s on http://%s:%d" % (root, host, port), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="supervise.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("static", help="serve a folder of static files")
    p.add_argument("root")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    serve_static(args.root, args.port, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
