"""Docker Swarm: compose apps deployed as stacks on a one-node swarm.

The swarm is created by this module's fixture and always left at its end:
the Docker engine is shared, and other tests expect it out of swarm mode.
"""

import json
import secrets
import subprocess
import time

import pytest

from conftest import (BASE_IMAGE, GitRemote, free_port, http_get, make_settings,
                      need, push, write_app)
import dockrune
import swarm


# -- without Docker ------------------------------------------------------------------

CONFIG = """\
version: "3.13"
services:
  db:
    deploy:
      update_config:
        order: stop-first
        parallelism: 1
    image: postgres:16
  web:
    build:
      context: .
    deploy:
      replicas: 2
    ports:
      - mode: host
        target: 8080
        published: 8123
networks:
  default: {}
"""


def test_scan_services_finds_builds_and_update_settings():
    assert swarm.scan_services(CONFIG) == {
        "db": {"build": False, "update": {"order", "parallelism"}},
        "web": {"build": True, "update": set()}}


def test_override_sets_images_and_only_the_missing_update_defaults():
    services = swarm.scan_services(CONFIG)
    text = swarm.render_override(services, {"web": "reg.example/dockrune/a-web:abc"})
    assert text == (
        "services:\n"
        "  db:\n    deploy:\n      update_config:\n        failure_action: rollback\n"
        "  web:\n    image: reg.example/dockrune/a-web:abc\n"
        "    deploy:\n      update_config:\n        order: start-first\n"
        "        failure_action: rollback\n")


def test_image_for_names_app_service_and_sha_under_the_registry():
    assert swarm.image_for("blog", "web", "a" * 40) == "dockrune/blog-web:" + "a" * 40
    assert swarm.image_for("blog", "web", "abc", "reg.example:5000/") == (
        "reg.example:5000/dockrune/blog-web:abc")


def test_replica_counts_are_asked_of_docker_at_most_every_few_seconds(
        tmp_path, monkeypatch):
    import store
    st = store.Store(str(tmp_path / "home"))
    st.ensure_dirs()
    st.update_environment("web", "production", status="live", engine="swarm")
    asked = []
    monkeypatch.setattr(swarm.runners, "_quiet", lambda argv, **kw: (
        asked.append(argv) or (0, "Running Running 5 minutes ago\n"
                                  "Running Starting 1 second ago\n")))
    monkeypatch.setattr(swarm, "_seen_replicas", {})
    rows = [{"app": "web", "environment": "production"}]
    for _ in range(5):
        assert swarm.annotate([dict(r) for r in rows], st)[0]["replicas"] == "1/2"
    assert len(asked) == 1
    monkeypatch.setattr(swarm, "REPLICAS_MAX_AGE", 0.0)
    swarm.annotate([dict(r) for r in rows], st)
    assert len(asked) == 2


def test_engine_comes_from_the_app_then_the_global_setting(tmp_path):
    settings = make_settings(tmp_path)
    assert swarm.engine_of({}, settings) == "compose"
    assert swarm.engine_of({"ENGINE": "swarm"}, settings) == "swarm"
    everywhere = make_settings(tmp_path, DOCKRUNE_ENGINE="swarm")
    assert swarm.engine_of({}, everywhere) == "swarm"
    assert swarm.engine_of({"ENGINE": "compose"}, everywhere) == "compose"
    with pytest.raises(dockrune.SettingsError):
        make_settings(tmp_path, DOCKRUNE_ENGINE="kubernetes")


def test_swarm_engine_on_a_host_out_of_swarm_mode_fails_with_the_fix(
        base_image, server_factory, tmp_path):
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    need(state == "inactive", "the Docker engine is in swarm mode (%s)" % state)
    name = "sw-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    server = server_factory()
    write_app(server.home, name, remote, free_port(), ENGINE="swarm")
    server.start()
    record = push(server, name, remote.commit(stack_app("one")))
    assert record["status"] == "failed"
    assert "not a swarm manager" in record["error"]
    assert "docker swarm init" in record["error"]
    assert json.loads(server.cli("status", "--json").stdout)[0]["status"] == "failing"


# -- a one-node swarm ------------------------------------------------------------------


def docker(*args, timeout=120):
    return subprocess.run(("docker",) + args, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def one_node_swarm():
    need(docker("info").returncode == 0, "no Docker engine answers 'docker info'")
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    need(state == "inactive", "the Docker engine is in swarm mode already (%s): "
         "this test makes and leaves its own swarm" % state)
    try:
        done = docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        assert done.returncode == 0, done.stderr
        yield
    finally:
        docker("swarm", "leave", "--force")


def stack_app(marker, broken=False, page="index.html"):
    """Return the files of a compose app for a swarm: a host-mode port."""
    command = '["false"]' if broken else '["httpd", "-f", "-p", "8080", "-h", "/www"]'
    return {
        "Dockerfile": "FROM %s\nCOPY site /www\nCMD %s\n" % (BASE_IMAGE, command),
        "site/index.html": None, "site/" + page: marker + "\n",
        # One node, one host port: the old task must stop before the new one
        # can bind it, so this app asks for stop-first itself.
        # stop_signal: busybox httpd as pid 1 ignores SIGTERM (see conftest).
        "compose.yaml": ("services:\n  web:\n    build: .\n    stop_signal: SIGKILL\n"
                         "    ports:\n"
                         "      - target: 8080\n        published: ${PORT}\n"
                         "        mode: host\n    deploy:\n      update_config:\n"
                         "        order: stop-first\n"),
    }


def service_image(stack):
    return docker("service", "inspect", "--format",
                  "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
                  stack + "_web").stdout.strip()


def test_stack_deploys_rolls_forward_rolls_back_and_stops(
        base_image, one_node_swarm, server_factory, tmp_path):
    name = "sw-" + secrets.token_hex(3)
    stack = "dockrune-" + name
    remote = GitRemote(str(tmp_path / "git"))
    port = free_port()
    server = server_factory()
    write_app(server.home, name, remote, port, ENGINE="swarm", HEALTH_TIMEOUT="8")
    server.start()
    url = "http://127.0.0.1:%d/" % port
    try:
        first = remote.commit(stack_app("one"))
        record = push(server, name, first)
        assert record["status"] == "live", open(record["log"]).read()
        assert http_get(url) == (200, "one\n")
        assert service_image(stack) == "dockrune/%s-web:%s" % (name, first)
        row = server.status(name)
        assert (row["status"], row["sha"], row["replicas"]) == ("live", first, "1/1")
        assert "live 1/1" in server.cli("status").stdout
        text = open(record["log"]).read()
        assert "docker stack deploy -c compose.yaml" in text
        assert "--with-registry-auth --prune" in text

        second = remote.commit(stack_app("two"))
        record = push(server, name, second)
        assert record["status"] == "live", open(record["log"]).read()
        assert http_get(url) == (200, "two\n")
        assert service_image(stack).endswith(second)

        # Runs, but does not answer on / (404): dockrune rolls the stack back.
        unhealthy = remote.commit(stack_app("three", page="other.html"))
        record = push(server, name, unhealthy)
        assert record["status"] == "failed"
        assert "the swarm rolled the stack back" in record["error"]
        assert http_get(url) == (200, "two\n")
        assert service_image(stack).endswith(second)

        broken = remote.commit(stack_app("four", broken=True))
        record = push(server, name, broken)
        assert record["status"] == "failed"
        assert "the swarm rolled %s_web back" % stack in record["error"]
        assert http_get(url) == (200, "two\n")
        assert service_image(stack).endswith(second)
        row = server.status(name)
        assert (row["sha"], row["replicas"]) == (second, "1/1")

        server.cli("stop", name)
        assert _wait(lambda: server.status(name)["status"] == "stopped"), server.log()
        assert _wait(lambda: stack not in docker(
            "stack", "ls", "--format", "{{.Name}}").stdout.split())
        assert "replicas" not in server.status(name)
    finally:
        docker("stack", "rm", stack)


def _wait(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False
