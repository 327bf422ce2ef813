"""Preview environments and routes through a real Caddy."""

import json
import os
import secrets
import threading
import time

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, post_hook,
                      push_body)
from test_integration import write_app


def wait_for(check, timeout=30):
    """Wait until check() is true (the route follows the record by a moment)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def static_site(text):
    return {"index.html": text + "\n"}


def test_redeploy_through_caddy_drops_no_request(caddy, server_factory, tmp_path):
    name = "zd-" + secrets.token_hex(3)
    domain = name + ".apps.test"
    remote = GitRemote(str(tmp_path / "git"))
    first = remote.commit(static_site("one"))
    server = server_factory(**caddy.settings())
    write_app(server.home, name, remote, free_port(), DOMAIN=domain)
    server.start()
    repo = "tester/" + name
    code, answer = post_hook(server.url, "push", push_body(repo, first))
    assert server.wait_deploy(answer["deploy"])["status"] == "live"
    wait_for(lambda: caddy.get(domain) == (200, "one\n"))

    seen, failures, done = [], [], threading.Event()

    def hammer():
        while not done.is_set():
            status, text = caddy.get(domain, timeout=5)
            (seen if status == 200 else failures).append((status, text))
            time.sleep(0.01)

    loop = threading.Thread(target=hammer)
    loop.start()
    try:
        for n, text in enumerate(("two", "three")):
            sha = remote.commit(static_site(text))
            code, answer = post_hook(server.url, "push", push_body(repo, sha))
            record = server.wait_deploy(answer["deploy"])
            assert record["status"] == "live", open(record["log"]).read()
            time.sleep(0.5)
    finally:
        done.set()
        loop.join()
    assert failures == []
    assert {text for _, text in seen} == {"one\n", "two\n", "three\n"}
    assert len(seen) > 50
    assert "routed to port" in open(record["log"]).read()
