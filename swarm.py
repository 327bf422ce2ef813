"""Docker Swarm: a compose app deployed as a stack, on one node or many.

With ENGINE=swarm in an app's .env (or DOCKRUNE_ENGINE=swarm for every app),
a compose project becomes the stack dockrune-<app>: its images are built and
tagged with the commit's sha (and pushed to DOCKRUNE_REGISTRY, from where the
other nodes pull them), and `docker stack deploy` rolls the services over.
A service whose compose file says nothing of updates gets `order: start-first`
and `failure_action: rollback`, so a version whose tasks fail is replaced by
the one before it, by the swarm itself.
"""

import logging
import os
import re
import subprocess
import threading
import time

import runners
import store

log = logging.getLogger("dockrune.swarm")

OVERRIDE = ".dockrune-stack.yaml"
UPDATE_DEFAULTS = (("order", "start-first"), ("failure_action", "rollback"))
_SERVICE_RE = re.compile(r"^  ([A-Za-z0-9._-]+):\s*$")
_KEY_RE = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):")


def engine_of(settings, global_settings):
    """Return "swarm" or "compose": ENGINE in the app's .env, else the global one."""
    engine = (settings.get("ENGINE") or global_settings.engine or "compose").lower()
    if engine not in ("compose", "swarm"):
        raise runners.DeployError("ENGINE=%r: expected compose or swarm" % engine)
    return engine


def stack_name(app, env):
    """Return the stack of app/env: the name its compose project would have."""
    return runners.compose_project(app, env)


def scan_services(text):
    """Return {service: facts} from `docker stack config` output.

    facts: "build" (the service is built from source) and "update" (the keys
    its deploy.update_config sets).  The output is normalised YAML, two
    spaces a level, so reading it by indentation is reliable.
    """
    services, current, inside = {}, None, []
    in_services = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            in_services = line.startswith("services:")
            current = None
            continue
        if not in_services:
            continue
        found = _SERVICE_RE.match(line)
        if found:
            current = services.setdefault(found.group(1),
                                          {"build": False, "update": set()})
            inside = []
            continue
        key = _KEY_RE.match(line)
        if current is None or not key:
            continue
        depth = len(key.group(1)) // 2
        inside = inside[:depth - 2] + [key.group(2)]
        if inside == ["build"]:
            current["build"] = True
        if len(inside) == 3 and inside[:2] == ["deploy", "update_config"]:
            current["update"].add(inside[2])
    return services


def image_for(app, service, sha, registry=""):
    """Return the image of one service at sha, under the registry if there is one."""
    name = "dockrune/%s-%s:%s" % (store.sanitize_name(app),
                                  store.sanitize_name(service), sha)
    return "%s/%s" % (registry.rstrip("/"), name) if registry else name


def render_override(services, images):
    """Return the compose file laid over the app's: images and update defaults."""
    lines = ["services:"]
    for service in sorted(services):
        missing = [(k, v) for k, v in UPDATE_DEFAULTS
                   if k not in services[service]["update"]]
        if service not in images and not missing:
            continue
        lines.append("  %s:" % service)
        if service in images:
            lines.append("    image: %s" % images[service])
        if missing:
            lines += ["    deploy:", "      update_config:"]
            lines += ["        %s: %s" % kv for kv in missing]
    return "\n".join(lines) + "\n"


def check_manager(ctx):
    """Raise DeployError unless this engine is a swarm manager."""
    fmt = "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"
    code, out = runners._quiet(["docker", "info", "--format", fmt])
    if code != 0 or out.split() != ["active", "true"]:
        raise runners.DeployError(
            "ENGINE=swarm, but this Docker engine is not a swarm manager (%s): run "
            "docker swarm init, or join it to the swarm as a manager"
            % (out.strip() or "docker info failed"))


def deploy_stack(ctx, facts):
    """Build, push and tag the images, deploy the stack, wait until it serves."""
    compose_file = runners.find_compose_file(ctx.checkout)
    if compose_file is None:
        raise runners.DeployError("no compose file (%s) at the top level"
                                  % ", ".join(runners.COMPOSE_FILES))
    runners.check_docker(ctx)
    check_manager(ctx)
    stack = stack_name(ctx.app, ctx.env)
    environment = ctx.app_environment()
    facts["engine"] = "swarm"
    ctx.store.update_environment(ctx.app, ctx.env, engine="swarm")
    runners.stop_runtimes(ctx.deployer, ctx.app, ctx.env, ctx.dlog, keep="swarm")

    ctx.dlog.step("reading %s for the stack %s" % (compose_file, stack))
    services = scan_services(read_config(ctx, compose_file, environment))
    registry = ctx.global_settings.registry
    images = {s: image_for(ctx.app, s, ctx.sha, registry)
              for s, f in services.items() if f["build"]}
    # Beside the compose file, so that relative paths in both mean the same;
    # the next checkout's `git clean` removes it.
    override = os.path.join(ctx.checkout, OVERRIDE)
    store.write_text(override, render_override(services, images))
    ctx.dlog.blank()

    if images:
        build_images(ctx, compose_file, environment, images, registry)
        ctx.dlog.blank()
    before = update_states(stack)
    ctx.dlog.step("deploying the stack %s (docker stack deploy)" % stack)
    argv = ["docker", "stack", "deploy", "-c", compose_file, "-c", OVERRIDE,
            "--with-registry-auth", "--prune", "--detach=false"]
    if not registry:
        # Images built here exist only here: do not ask a registry for them.
        argv += ["--resolve-image", "never"]
    ctx.run(argv + ["--", stack], cwd=ctx.checkout, env=environment)
    facts["started"] = True
    ctx.dlog.blank()
    try:
        check_rollout(ctx, stack, before)
    except runners.DeployError:
        facts["started"] = False    # the swarm put the old version back
        raise
    try:
        runners.check_health(ctx)
    except runners.DeployError as e:
        if not ctx.previous()[0]:
            raise
        roll_back(ctx, stack)
        facts["started"] = False
        raise runners.DeployError("%s; the swarm rolled the stack back" % e) from None
    running, wanted = replicas(stack)
    ctx.dlog.step("%d of %d replicas running" % (running, wanted))


def roll_back(ctx, stack):
    """Put every service of stack back on its previous spec."""
    ctx.dlog.blank()
    ctx.dlog.step("rolling the stack %s back" % stack)
    for service in sorted(update_states(stack)):
        ctx.run(["docker", "service", "rollback", "--quiet", "--", service],
                timeout=300)


def update_states(stack):
    """Return {service: "<update state> <started at>"} of every service of stack."""
    code, out = runners._quiet(["docker", "stack", "services", "--format",
                                "{{.Name}}", stack])
    states = {}
    for service in out.split() if code == 0 else ():
        _code, state = runners._quiet([
            "docker", "service", "inspect", "--format", "{{if .UpdateStatus}}"
            "{{.UpdateStatus.State}} {{.UpdateStatus.StartedAt}}{{end}}", service])
        states[service] = state.strip()
    return states


def read_config(ctx, compose_file, environment):
    """Return the compose file as `docker stack config` normalises it."""
    argv = ["docker", "stack", "config", "-c", compose_file]
    try:
        done = subprocess.run(argv, cwd=ctx.checkout, env=environment,
                              capture_output=True, timeout=min(60, ctx.remaining()),
                              stdin=subprocess.DEVNULL, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise runners.DeployError("%s failed: %s" % (" ".join(argv), e)) from None
    if done.returncode != 0:
        last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise runners.DeployError("%s exited %d: %s" % (
            " ".join(argv), done.returncode, ctx.dlog.redact(" ".join(last))[:300]))
    return done.stdout.decode("utf-8", "replace")


def build_images(ctx, compose_file, environment, images, registry):
    """Build every service with a build: section as its image; push if asked."""
    ctx.dlog.step("building %s" % ", ".join(sorted(images.values())))
    ctx.run(runners.compose_command() + [
        "-f", compose_file, "-f", OVERRIDE, "-p", stack_name(ctx.app, ctx.env),
        "build"] + sorted(images), cwd=ctx.checkout, env=environment)
    if registry:
        ctx.dlog.blank()
        ctx.dlog.step("pushing to %s, where the other nodes pull from" % registry)
        for image in sorted(images.values()):
            ctx.run(["docker", "push", image], env=environment)


def check_rollout(ctx, stack, before):
    """Raise DeployError when a service of stack rolled back or is not running.

    before is update_states() from before the deploy: a rollback that was
    already there (an earlier deploy's) is not this deploy's failure.
    """
    for service, state in sorted(update_states(stack).items()):
        if state.startswith("rollback") and state != before.get(service):
            _log_tasks(ctx, service)
            raise runners.DeployError(
                "the swarm rolled %s back to the version before (%s): its new "
                "tasks failed" % (service, state.split()[0]))
    # Converged does not always mean running yet: give the tasks a moment.
    deadline = time.monotonic() + min(30, ctx.remaining())
    running, wanted = replicas(stack)
    while running < wanted and time.monotonic() < deadline:
        time.sleep(1)
        running, wanted = replicas(stack)
    if running < wanted:
        raise runners.DeployError("only %d of %d replicas of %s are running (see "
                                  "docker stack ps %s)" % (running, wanted, stack,
                                                           stack))


def _log_tasks(ctx, service):
    code, out = runners._quiet(["docker", "service", "ps", "--no-trunc", "--format",
                                "{{.Name}} {{.CurrentState}} {{.Error}}", service])
    for line in out.splitlines()[:10] if code == 0 else ():
        ctx.dlog.line(line, force=True)


def replicas(stack):
    """Return (running, wanted) replicas over every service of stack; never raises.

    Read from the tasks: those whose current state is running count, those
    whose desired state is running are wanted.
    """
    code, out = runners._quiet(["docker", "stack", "ps", "--format",
                                "{{.DesiredState}} {{.CurrentState}}", stack],
                               timeout=30)
    if code != 0:
        return 0, 0
    running = wanted = 0
    for line in out.splitlines():
        desired, _, current = line.partition(" ")
        if desired == "Running":
            wanted += 1
            running += current.startswith("Running")
    return running, wanted


def remove_stack(app, env, dlog):
    """Remove the stack of app/env if this engine runs it (docker stack rm)."""
    stack = stack_name(app, env)
    code, out = runners._quiet(["docker", "stack", "ls", "--format", "{{.Name}}"],
                               timeout=30)
    if code != 0 or stack not in out.split():
        return False
    runners.run_command(["docker", "stack", "rm", stack], dlog, timeout=120)
    return True


REPLICAS_MAX_AGE = 10.0     # seconds the admin page may show old replica counts
_seen_replicas = {}         # stack -> (monotonic time, (running, wanted))
_seen_lock = threading.Lock()


def annotate(rows, store_):
    """Add "replicas": "running/wanted" to the status rows of swarm environments.

    The counts are asked of Docker at most every REPLICAS_MAX_AGE seconds per
    stack: /admin and /api/apps call this on every request.
    """
    envs = store_.environments()
    for row in rows:
        summary = envs.get("%s/%s" % (row["app"], row["environment"])) or {}
        if summary.get("engine") == "swarm" and summary.get("status") != "stopped":
            running, wanted = _recent_replicas(stack_name(row["app"],
                                                          row["environment"]))
            row["replicas"] = "%d/%d" % (running, wanted)
    return rows


def _recent_replicas(stack):
    now = time.monotonic()
    with _seen_lock:
        seen = _seen_replicas.get(stack)
    if seen and now - seen[0] < REPLICAS_MAX_AGE:
        return seen[1]
    counts = replicas(stack)
    with _seen_lock:
        _seen_replicas[stack] = (now, counts)
    return counts
