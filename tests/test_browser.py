"""The admin page in a real headless Chromium, over a real daemon and Docker.

Three apps are deployed for real: one live, one failing (its second build
breaks), one stopped.  The browser logs in with Basic auth, must show each
status, must show a hostile branch name, commit message and log line as
plain text, and clicking Redeploy must deploy and follow the log live.
Screenshots are kept in $DOCKRUNE_TEST_ARTIFACTS (default: artifacts/).
"""

import base64
import json
import os
import secrets
import shutil
import time
import urllib.request

import pytest

from browser import Browser
from conftest import (ROOT, GitRemote, compose_app, compose_down, free_port,
                      http_get, need, post_hook, push_body)
import store

PASSWORD = "browser-test-password"
TOKEN = "browser-test-token"
XSS = "<img src=x onerror=alert(1)>"
ARTIFACTS = os.environ.get("DOCKRUNE_TEST_ARTIFACTS") or os.path.join(ROOT,
                                                                      "artifacts")


@pytest.fixture
def chromium():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    need(executable is not None, "chromium is missing (apt-get install chromium)")
    browser = Browser(executable)
    yield browser
    browser.close()


@pytest.fixture
def names():
    tag = secrets.token_hex(3)
    found = {kind: "br-%s-%s" % (tag, kind) for kind in ("live", "failing", "stopped")}
    yield found
    for name in found.values():
        compose_down("dockrune-" + name)


def write_app(home, name, remote, port, branch="main"):
    os.makedirs(os.path.join(str(home), "apps"), exist_ok=True)
    with open(os.path.join(str(home), "apps", name + ".env"), "w") as f:
        f.write("REPO=tester/%s\nGIT_URL=%s\nBRANCH=%s\nPORT=%d\nHEALTH_TIMEOUT=30\n"
                % (name, remote.bare, store.quote_env(branch), port))


def api(server, method, path, data=None):
    request = urllib.request.Request(
        server.url + path, method=method,
        data=json.dumps(data).encode() if data is not None else None,
        headers={"Authorization": "Bearer " + TOKEN,
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_status(server, app, wanted, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = api(server, "GET", "/api/apps/" + app)
        if rows[0]["status"] == wanted:
            return rows[0]
        time.sleep(0.3)
    raise AssertionError("%s never became %s:\n%s" % (app, wanted, server.log()))


def deploy_three_apps(server, tmp_path, names):
    """Deploy a live, a failing and a stopped app; return the failed deploy."""
    remotes, shas = {}, {}
    for kind, name in names.items():
        remotes[kind] = GitRemote(str(tmp_path / ("git-" + kind)))
        shas[kind] = remotes[kind].commit(compose_app(kind), "first version")
        write_app(server.home, name, remotes[kind], free_port(),
                  branch=XSS if kind == "failing" else "main")
    server.start()

    # First deploys, all at once (the daemon runs three workers).
    started = {}
    for kind, name in names.items():
        branch = XSS if kind == "failing" else "main"
        code, answer = post_hook(server.url, "push", push_body(
            "tester/" + name, shas[kind], branch=branch, default_branch=branch))
        assert code == 202, answer
        started[kind] = answer["deploy"]
    for kind, deploy_id in started.items():
        record = server.wait_deploy(deploy_id)
        assert record["status"] == "live", open(record["log"]).read()

    # A broken build whose commit message and build output are hostile.
    files = compose_app("bad", fail_build=True)
    files["Dockerfile"] = files["Dockerfile"].replace(
        'RUN ["false"]', 'RUN ["echo", "%s"]\nRUN ["false"]' % XSS)
    bad = remotes["failing"].commit(files, XSS)
    code, answer = post_hook(server.url, "push", push_body(
        "tester/" + names["failing"], bad, branch=XSS, default_branch=XSS))
    assert code == 202, answer
    failed = server.wait_deploy(answer["deploy"])
    assert failed["status"] == "failed"
    assert failed["message"] == XSS and failed["ref"] == XSS
    with open(failed["log"]) as f:
        assert XSS in f.read()

    api(server, "POST", "/api/apps/%s/stop" % names["stopped"], {})
    wait_status(server, names["stopped"], "stopped")
    return failed


def page_rows(browser):
    return {tuple(row[:2]): row[2] for row in browser.evaluate(
        "Array.from(document.querySelectorAll('tr[data-app]')).map(function (tr) {"
        " return [tr.dataset.app, tr.dataset.environment,"
        " tr.querySelector('.badge').textContent]; })")}


def assert_shown_as_text(browser, where):
    assert XSS in browser.evaluate("document.body.innerText"), where
    assert browser.evaluate("document.images.length") == 0, where


def test_admin_page_in_a_real_browser(base_image, server_factory, tmp_path, names,
                                      chromium):
    server = server_factory(DOCKRUNE_ADMIN_PASSWORD=PASSWORD, DOCKRUNE_API_TOKEN=TOKEN,
                            DOCKRUNE_HEALTH_INTERVAL="1", DOCKRUNE_WORKERS="3")
    failed = deploy_three_apps(server, tmp_path, names)
    time.sleep(2)                    # let the health checker sample each app

    browser = chromium
    for domain in ("Page", "Runtime", "Network"):
        browser.call(domain + ".enable")
    login = base64.b64encode(("admin:" + PASSWORD).encode()).decode()
    browser.call("Network.setExtraHTTPHeaders",
                 headers={"Authorization": "Basic " + login})

    # The overview: each app with its status, the hostile branch as text.
    browser.navigate(server.url + "/admin")
    rows = page_rows(browser)
    assert rows[(names["live"], "production")] == "live"
    assert rows[(names["failing"], "production")] == "failing"
    assert rows[(names["stopped"], "production")] == "stopped"
    assert_shown_as_text(browser, "overview")
    uptime = browser.evaluate(
        "document.querySelector('tr[data-app=\"%s\"] .uptime').textContent"
        % names["live"])
    assert "100.0%" in uptime
    browser.screenshot(os.path.join(ARTIFACTS, "admin-overview.png"))

    # On a phone: the rows fold into cards and nothing needs sideways scrolling.
    browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844,
                 deviceScaleFactor=2, mobile=True)
    browser.navigate(server.url + "/admin")
    assert browser.evaluate("document.documentElement.scrollWidth"
                            " <= window.innerWidth")
    browser.screenshot(os.path.join(ARTIFACTS, "admin-phone.png"))
    browser.call("Emulation.clearDeviceMetricsOverride")

    # The failing app's page and its failed deploy's log.
    browser.navigate(server.url + "/admin/apps/" + names["failing"])
    assert_shown_as_text(browser, "app page")
    browser.navigate(server.url + "/admin/deploys/" + failed["id"])
    assert_shown_as_text(browser, "log page")
    assert XSS in browser.evaluate("document.getElementById('log').textContent")
    browser.screenshot(os.path.join(ARTIFACTS, "admin-failed-log.png"))

    # With scripts off the log still reads, all of it, as text.
    browser.call("Emulation.setScriptExecutionDisabled", value=True)
    browser.navigate(server.url + "/admin/deploys/" + failed["id"])
    assert "deploy failed:" in browser.evaluate(
        "document.getElementById('log').textContent")
    assert_shown_as_text(browser, "log page without scripts")
    browser.call("Emulation.setScriptExecutionDisabled", value=False)

    # Redeploy, clicked like a person would; the log page follows it live.
    browser.navigate(server.url + "/admin")
    mark = len(browser.events)
    browser.click('tr[data-app="%s"] button[data-action="redeploy"]' % names["live"])
    browser.wait_event("Page.loadEventFired", after=mark, timeout=30)
    path = browser.evaluate("location.pathname")
    assert path.startswith("/admin/deploys/"), path
    deploy_id = path.rsplit("/", 1)[1]
    assert browser.evaluate("document.getElementById('log').dataset.status") in (
        "queued", "running")
    record = server.wait_deploy(deploy_id)
    assert record["status"] == "live", open(record["log"]).read()
    assert record["trigger"] == "admin" and record["app"] == names["live"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shown = browser.evaluate("[document.getElementById('status').textContent,"
                                 " document.getElementById('log').textContent]")
        if shown[0] == "live" and "-----> live at" in shown[1]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the log page did not follow the deploy: %r" % shown)
    browser.screenshot(os.path.join(ARTIFACTS, "admin-redeploy-log.png"))
    port = api(server, "GET", "/api/apps/" + names["live"])[0]["port"]
    assert http_get("http://127.0.0.1:%d/" % port) == (200, "live\n")

    # Nothing was fetched from any other host, and no script ran that should not.
    urls = {p["request"]["url"] for e, p in browser.events
            if e == "Network.requestWillBeSent"}
    assert urls and [u for u in urls if not u.startswith(server.url + "/")] == []
    dialogs = [e for e, _p in browser.events if e == "Page.javascriptDialogOpening"]
    errors = [p for e, p in browser.events if e == "Runtime.exceptionThrown"]
    assert dialogs == [] and errors == []
