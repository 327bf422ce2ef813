"""The admin pages and the JSON API, called in-process through wsgiref.validate."""

import base64
import datetime
import html
import json
import os
import re
import statistics
import time

import pytest

from conftest import make_settings, wsgi_call
import handlers
import health
import runners
import store

PASSWORD = "correct horse"
TOKEN = "api-token-for-tests"
XSS = "<img src=x onerror=alert(1)>"
SHA = "0123456789abcdef0123456789abcdef01234567"
OLD_SHA = "fedcba9876543210fedcba9876543210fedcba98"
HOST = "127.0.0.1:9000"


class FakeRunner:
    """Records jobs instead of running them."""

    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)
        return job

    def busy(self):
        return 0


def basic(user="admin", password=PASSWORD):
    raw = ("%s:%s" % (user, password)).encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


BEARER = {"Authorization": "Bearer " + TOKEN}


def write_app(home, name, **settings):
    lines = ["%s=%s" % (k, store.quote_env(v)) for k, v in settings.items()]
    with open(os.path.join(str(home), "apps", name + ".env"), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path):
    """An Application on a fresh home with a fake runner, and helpers."""
    return Site(tmp_path / "home")


class Site:
    def __init__(self, home, **extra):
        env = {"DOCKRUNE_ADMIN_PASSWORD": PASSWORD, "DOCKRUNE_API_TOKEN": TOKEN}
        env.update(extra)
        self.settings = make_settings(home, **env)
        self.store = store.Store(str(home))
        self.store.ensure_dirs()
        self.runner = FakeRunner()
        self.deployer = runners.Deployer(self.store, self.settings)
        self.app = handlers.Application(self.store, self.settings, self.runner,
                                        self.deployer)

    def get(self, path, headers=None, query=""):
        return wsgi_call(self.app, "GET", path, headers=basic() if headers is None
                         else headers, query=query)

    def html(self, path):
        code, headers, body = self.get(path)
        assert code == 200, body
        return body.decode()

    def post_form(self, path, fields, origin="http://" + HOST, auth=None):
        headers = dict(basic() if auth is None else auth, Host=HOST)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        if origin:
            headers["Origin"] = origin
        body = "&".join("%s=%s" % (k, v) for k, v in fields.items()).encode()
        return wsgi_call(self.app, "POST", path, body=body, headers=headers)

    def deploy(self, app, env="production", status="live", sha=SHA, **extra):
        """Record a finished deploy of app/env the way the runner does."""
        record = self.deployer.new_deploy(app, env, sha, extra.pop("ref", "main"),
                                          extra.pop("trigger", "push"), **extra)
        record = self.store.update_deploy(record["id"], status=status,
                                          started_at=store.utcnow(),
                                          finished_at=store.utcnow(), duration=4.2)
        fields = {"queued": None, "running": None, "last_deploy": record["id"],
                  "port": 18000 + len(self.store.environments()), "ref": record["ref"]}
        if status == "live":
            fields.update(status="live", sha=sha, deployed_at=record["finished_at"],
                          live_deploy=record["id"])
        else:
            fields.update(status="failing" if status == "failed" else status)
        self.store.update_environment(app, env, **fields)
        return record

    def csrf(self):
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', self.html("/admin"))
        return match.group(1)


def rows(page):
    """Return {(app, environment): status} of an admin page's environment rows."""
    found = re.findall(r'<tr id="env-[^"]*" data-app="([^"]+)" data-environment="'
                       r'([^"]+)"\s+data-status="([^"]+)"', page)
    return {(a, e): s for a, e, s in found}


# -- auth --------------------------------------------------------------------------

ADMIN_ROUTES = [("GET", "/admin"), ("GET", "/admin/"), ("GET", "/admin/apps/blog"),
                ("GET", "/admin/deploys/20260101-000000-blog-abcd"),
                ("GET", "/admin/deploys/20260101-000000-blog-abcd/log"),
                ("POST", "/admin/apps/blog/redeploy"),
                ("POST", "/admin/apps/blog/stop"),
                ("POST", "/admin/apps/blog/start"), ("GET", "/admin/nothing")]
API_ROUTES = [("GET", "/api/apps"), ("GET", "/api/apps/blog"),
              ("GET", "/api/apps/blog/deploys"),
              ("GET", "/api/deploys/20260101-000000-blog-abcd"),
              ("GET", "/api/deploys/20260101-000000-blog-abcd/log"),
              ("POST", "/api/apps/blog/deploy"), ("POST", "/api/apps/blog/stop"),
              ("GET", "/api/nothing")]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES + API_ROUTES)
def test_every_route_without_credentials_is_401(site, method, path):
    write_app(site.store.home, "blog", REPO="o/blog")
    code, headers, body = wsgi_call(site.app, method, path)
    assert code == 401, body
    scheme = "Basic" if path.startswith("/admin") else "Bearer"
    assert headers["WWW-Authenticate"].startswith(scheme)
    assert site.runner.jobs == []


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_with_wrong_credentials_is_401(site, method, path):
    for auth in (basic(password="wrong"), basic(user="root"), {"Authorization":
                 "Basic !!notbase64"}, {"Authorization": "Bearer " + TOKEN}):
        code, _headers, _body = wsgi_call(site.app, method, path, headers=auth)
        assert code == 401


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_without_password_set_is_503_with_one_line(tmp_path, method, path):
    site = Site(tmp_path / "home", DOCKRUNE_ADMIN_PASSWORD="")
    code, headers, body = wsgi_call(site.app, method, path, headers=basic(password=""))
    assert code == 503
    assert headers["Content-Type"].startswith("text/plain")
    assert body.count(b"\n") == 1 and b"DOCKRUNE_ADMIN_PASSWORD" in body


@pytest.mark.parametrize("method,path", API_ROUTES)
def test_api_without_token_set_is_503(tmp_path, method, path):
    site = Site(tmp_path / "home", DOCKRUNE_API_TOKEN="")
    code, _headers, body = wsgi_call(site.app, method, path, headers=BEARER)
    assert code == 503
    assert "DOCKRUNE_API_TOKEN" in json.loads(body)["error"]


def test_api_with_only_the_cli_token_is_503_for_others(tmp_path):
    home = tmp_path / "home"
    settings = make_settings(home)
    st = store.Store(str(home))
    st.ensure_dirs()
    app = handlers.Application(st, settings, FakeRunner(),
                               runners.Deployer(st, settings), "cli-token")
    assert wsgi_call(app, "GET", "/api/apps", headers=BEARER)[0] == 503
    ok = wsgi_call(app, "GET", "/api/apps",
                   headers={"Authorization": "Bearer cli-token"})
    assert ok[0] == 200


def test_admin_and_api_credentials_do_not_cross(site):
    assert site.get("/api/apps", headers=basic())[0] == 401
    assert site.get("/admin", headers=BEARER)[0] == 401


# -- headers -----------------------------------------------------------------------


def test_admin_page_sends_security_headers_and_nonce_matches(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    record = site.deploy("blog", status="running")
    site.store.update_deploy(record["id"], status="running")
    code, headers, body = site.get("/admin/deploys/" + record["id"])
    assert code == 200
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "form-action 'self'" in csp and "unsafe-inline" not in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    page = body.decode()
    assert '<script nonce="%s">' % nonce in page
    assert '<style nonce="%s">' % nonce in page
    assert page.count("<script") == 1
    # A fresh nonce for every response.
    again = site.get("/admin/deploys/" + record["id"])[1]["Content-Security-Policy"]
    assert again != csp


@pytest.mark.parametrize("path", ["/healthz", "/api/apps", "/nothing"])
def test_other_responses_send_security_headers(site, path):
    _code, headers, _body = site.get(path, headers=BEARER)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_admin_errors_are_plain_text(site):
    code, headers, body = site.get("/admin/apps/nope")
    assert code == 404
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"no app nope\n"


# -- the overview ------------------------------------------------------------------


def test_overview_shows_every_environment_with_its_status(site):
    write_app(site.store.home, "blog", REPO="o/blog", DOMAIN="blog.example.org")
    write_app(site.store.home, "shop", REPO="o/shop", PORT="18555")
    write_app(site.store.home, "wiki", REPO="o/wiki")
    write_app(site.store.home, "fresh", REPO="o/fresh")
    site.deploy("blog")
    site.deploy("blog", "pr-7", sha=OLD_SHA, ref="feature")
    site.deploy("shop", status="failed")
    site.deploy("wiki")
    site.store.update_environment("wiki", "production", status="stopped")
    site.deploy("fresh", status="running")
    site.store.update_environment("fresh", "production", status="deploying")
    page = site.html("/admin")
    assert rows(page) == {
        ("blog", "production"): "live", ("blog", "pr-7"): "live",
        ("fresh", "production"): "deploying", ("shop", "production"): "failing",
        ("wiki", "production"): "stopped"}
    shop = site.store.environment("shop", "production")["last_deploy"]
    assert re.search(r'<a href="/admin/deploys/%s"[^>]*><span\s+class="badge '
                     r's-failing">failing</span></a>' % shop, page)
    assert 'href="https://github.com/o/blog/commit/%s"' % SHA in page
    assert ">%s</code>" % SHA[:7] in page
    assert '<a href="https://blog.example.org">blog.example.org</a>' in page
    assert re.search(r'<time datetime="[0-9TZ:-]+" title="[0-9: -]+ UTC">'
                     r'(just now|\d+ s ago)</time>', page)
    assert "<svg" in page and 'aria-label="uptime over 24 hours' in page
    assert "5 environments" in page
    shop_row = page[page.index('data-app="shop"'):]
    shop_port = site.store.environment("shop", "production")["port"]
    assert '<td data-label="Port" class="mono">%d</td>' % shop_port in shop_row
    assert '<div class="muted mono">o/shop</div>' in shop_row


def test_ago_says_how_long_ago_in_the_largest_unit():
    now = 1_800_000_000
    iso = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat()
    at = lambda seconds: handlers._ago(iso, now + seconds)  # noqa: E731
    assert [at(3), at(42), at(61), at(7300), at(200000)] == [
        "just now", "42 s ago", "1 min ago", "2 h ago", "2 d ago"]
    assert handlers._ago("not a time", now) == "not a time"


def live_blog_and_stopped_wiki(site):
    """Deploy blog, deploy and stop wiki; return the overview page."""
    write_app(site.store.home, "blog", REPO="o/blog")
    write_app(site.store.home, "wiki", REPO="o/wiki")
    site.deploy("blog")
    site.deploy("wiki")
    site.store.update_environment("wiki", "production", status="stopped")
    return site.html("/admin")


def test_overview_offers_start_only_for_stopped_environments(site):
    page = live_blog_and_stopped_wiki(site)
    blog = page[page.index('data-app="blog"'):page.index('data-app="wiki"')]
    wiki = page[page.index('data-app="wiki"'):]
    assert 'action="/admin/apps/blog/redeploy"' in blog
    assert 'action="/admin/apps/blog/stop"' in blog
    assert "/start" not in blog
    assert 'action="/admin/apps/wiki/start"' in wiki
    assert "/redeploy" not in wiki and "/stop" not in wiki


def test_overview_draws_uptime_from_health_samples(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    site.deploy("blog")
    now = time.time()
    entry = {}
    for n in range(30):
        entry = health.add_sample(entry, n % 10 != 0, now - 60 * n)
    site.store.write_health_samples({"blog/production": entry})
    page = site.html("/admin")
    assert "90.0%" in page
    assert 'fill="%s"' % handlers.UPTIME_COLOURS["some"] in page
    rows_ = json.loads(site.get("/api/apps", headers=BEARER)[2])
    assert rows_[0]["uptime_24h"] == 90.0

    # A half hour of nothing but failed checks is drawn red, one never checked grey.
    for n in range(5):
        entry = health.add_sample(entry, False, now - 3 * 3600 - 60 * n)
    site.store.write_health_samples({"blog/production": entry})
    page = site.html("/admin")
    assert 'fill="%s"' % handlers.UPTIME_COLOURS["down"] in page
    assert 'fill="%s"' % handlers.UPTIME_COLOURS["none"] in page


def test_every_form_on_the_overview_carries_the_csrf_token(site):
    page = live_blog_and_stopped_wiki(site)
    forms = re.findall(r'<form method="post".*?</form>', page, re.S)
    assert len(forms) == 3         # Redeploy and Stop of blog, Start of wiki
    token = site.csrf()
    assert all('name="csrf" value="%s"' % token in form for form in forms)


def test_overview_escapes_untrusted_text(site):
    write_app(site.store.home, "blog", REPO="o/blog", BRANCH=XSS)
    site.deploy("blog", ref=XSS, message=XSS)
    page = site.html("/admin")
    assert XSS not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_overview_with_no_apps_says_how_to_add_one(site):
    page = site.html("/admin")
    assert "No apps yet" in page
    assert rows(page) == {}


# -- the app page and the log page -------------------------------------------------


def test_app_page_lists_environments_and_last_fifty_deploys(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    records = [site.deploy("blog", message="change %d" % n) for n in range(55)]
    site.deploy("blog", "pr-3", ref="feature")
    page = site.html("/admin/apps/blog")
    assert set(rows(page)) == {("blog", "production"), ("blog", "pr-3")}
    listed = re.findall(r'<tr data-deploy="([^"]+)"', page)
    assert len(listed) == 50
    assert records[-1]["id"] in listed and records[4]["id"] not in listed
    assert 'href="/admin/deploys/%s"' % records[-1]["id"] in page
    assert "4.2 s" in page and ">push<" in page


def test_app_page_and_log_page_escape_untrusted_text(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    record = site.deploy("blog", status="failed", ref=XSS, message=XSS)
    site.store.update_deploy(record["id"], error="failed: " + XSS)
    os.makedirs(os.path.dirname(record["log"]), exist_ok=True)
    with open(record["log"], "w") as f:
        f.write("12:00:00 -----> building\n12:00:01        %s\n" % XSS)
    for path in ("/admin/apps/blog", "/admin/deploys/" + record["id"]):
        page = site.html(path)
        assert XSS not in page, path
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
    code, headers, body = site.get("/admin/deploys/%s/log" % record["id"])
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_log_page_follows_only_while_the_deploy_runs(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    record = site.deploy("blog")
    os.makedirs(os.path.dirname(record["log"]), exist_ok=True)
    with open(record["log"], "w") as f:
        f.write("first line\n")
    site.store.update_deploy(record["id"], status="running")
    page = site.html("/admin/deploys/" + record["id"])
    assert 'data-offset="11"' in page and "first line" in page
    assert '<meta http-equiv="refresh"' in page and "fetch(" in page
    site.store.update_deploy(record["id"], status="live")
    page = site.html("/admin/deploys/" + record["id"])
    assert '<meta http-equiv="refresh"' not in page


def test_log_endpoint_sends_whole_lines_from_offset(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    record = site.deploy("blog", status="running")
    site.store.update_deploy(record["id"], status="running")
    os.makedirs(os.path.dirname(record["log"]), exist_ok=True)
    with open(record["log"], "wb") as f:
        f.write("one\ntwo ✓\nhalf".encode())
    path = "/admin/deploys/%s/log" % record["id"]
    code, headers, body = site.get(path)
    assert body == "one\ntwo ✓\n".encode()
    assert headers["X-Deploy-Status"] == "running"
    offset = headers["X-Log-Offset"]
    assert site.get(path, query="offset=" + offset)[2] == b""
    with open(record["log"], "ab") as f:
        f.write(b" done\n")
    assert site.get(path, query="offset=" + offset)[2] == b"half done\n"
    assert site.get(path, query="offset=x")[0] == 400


def test_log_page_of_unknown_deploy_is_404(site):
    assert site.get("/admin/deploys/20260101-000000-blog-abcd")[0] == 404
    assert site.get("/admin/deploys/../../etc/passwd")[0] == 404


# -- form buttons ------------------------------------------------------------------


def test_redeploy_button_queues_the_branch_and_redirects_to_its_log(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    site.deploy("blog", ref="main")
    code, headers, body = site.post_form("/admin/apps/blog/redeploy", {
        "csrf": site.csrf(), "environment": "production"})
    assert code == 303, body
    [job] = site.runner.jobs
    assert job["app"] == "blog" and job["environment"] == "production"
    assert job["sha"] is None and job["ref"] == "main" and job["trigger"] == "admin"
    assert headers["Location"] == "/admin/deploys/" + job["id"]


def test_redeploy_of_a_pull_request_preview_takes_its_commit_not_its_branch(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    site.deploy("blog", "pr-4", sha=OLD_SHA, ref="patch-1")     # a fork's branch
    code, headers, body = site.post_form("/admin/apps/blog/redeploy", {
        "csrf": site.csrf(), "environment": "pr-4"})
    assert code == 303, body
    [job] = site.runner.jobs
    assert (job["environment"], job["sha"]) == ("pr-4", OLD_SHA)


def test_start_button_brings_back_the_stopped_commit(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    site.deploy("blog")
    site.store.update_environment("blog", "production", status="stopped")
    code, _headers, _body = site.post_form("/admin/apps/blog/start", {
        "csrf": site.csrf(), "environment": "production"})
    assert code == 303
    assert site.runner.jobs[0]["sha"] == SHA


def test_stop_button_queues_a_stop(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    site.deploy("blog")
    code, headers, _body = site.post_form("/admin/apps/blog/stop", {
        "csrf": site.csrf(), "environment": "production"})
    assert code == 303 and headers["Location"] == "/admin/apps/blog"
    assert site.runner.jobs == [{"action": "stop", "app": "blog",
                                 "environment": "production"}]


def test_post_with_referer_but_no_origin_is_accepted(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    headers = dict(basic(), Host=HOST, Referer="http://%s/admin" % HOST)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    body = ("csrf=%s" % site.csrf()).encode()
    code, _h, _b = wsgi_call(site.app, "POST", "/admin/apps/blog/stop", body=body,
                             headers=headers)
    assert code == 303


@pytest.mark.parametrize("fields,origin", [
    ({}, "http://" + HOST),
    ({"csrf": "0" * 64}, "http://" + HOST),
    ({"csrf": None}, "https://evil.example"),
    ({"csrf": None}, "null"),
    ({"csrf": None}, "http://127.0.0.1:9001"),
    ({"csrf": None}, None),
])
def test_post_without_token_or_from_another_origin_is_403(site, fields, origin):
    write_app(site.store.home, "blog", REPO="o/blog")
    site.deploy("blog")
    fields = {k: site.csrf() if v is None else v for k, v in fields.items()}
    for action in handlers.ADMIN_ACTIONS:
        code, _headers, body = site.post_form("/admin/apps/blog/" + action,
                                              dict(fields, environment="production"),
                                              origin=origin)
        assert code == 403, (action, body)
    assert site.runner.jobs == []


def test_post_to_unknown_app_or_environment_starts_nothing(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    token = site.csrf()
    assert site.post_form("/admin/apps/nope/redeploy", {"csrf": token})[0] == 404
    assert site.post_form("/admin/apps/blog/redeploy", {
        "csrf": token, "environment": "pr-9"})[0] == 404
    assert site.post_form("/admin/apps/blog/stop", {
        "csrf": token, "environment": "../x"})[0] == 400
    assert site.post_form("/admin/apps/blog/explode", {"csrf": token})[0] == 404
    assert site.runner.jobs == []


def test_get_on_a_button_route_is_405(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    code, headers, _body = site.get("/admin/apps/blog/redeploy")
    assert code == 405 and headers["Allow"] == "POST"


# -- the JSON API ------------------------------------------------------------------


def api(site, method, path, data=None, query=""):
    body = json.dumps(data).encode() if data is not None else b""
    code, headers, raw = wsgi_call(site.app, method, path, body=body, headers=BEARER,
                                   query=query)
    if headers["Content-Type"].startswith("application/json"):
        return code, json.loads(raw)
    return code, raw


def test_api_lists_apps_with_status_fields(site):
    write_app(site.store.home, "blog", REPO="o/blog", DOMAIN="blog.example.org")
    record = site.deploy("blog")
    code, data = api(site, "GET", "/api/apps")
    assert code == 200
    [row] = data
    for key in ("app", "environment", "status", "sha", "deployed_at", "port",
                "domain", "url", "last_deploy", "uptime_24h", "health"):
        assert key in row
    assert row["status"] == "live" and row["last_deploy"] == record["id"]
    assert row["url"] == "https://blog.example.org"
    assert api(site, "GET", "/api/apps/blog")[1] == data


def test_api_deploys_newest_first_with_limit(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    records = [site.deploy("blog") for _ in range(5)]
    code, data = api(site, "GET", "/api/apps/blog/deploys", query="limit=2")
    assert code == 200
    assert [r["id"] for r in data] == [records[4]["id"], records[3]["id"]]
    assert api(site, "GET", "/api/deploys/" + records[0]["id"])[1]["id"] == \
        records[0]["id"]
    assert api(site, "GET", "/api/apps/blog/deploys", query="limit=z")[0] == 400


def test_api_log_follows_by_offset(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    record = site.deploy("blog")
    os.makedirs(os.path.dirname(record["log"]), exist_ok=True)
    with open(record["log"], "w") as f:
        f.write("abc\ndef\n")
    code, body = api(site, "GET", "/api/deploys/%s/log" % record["id"],
                     query="offset=4")
    assert code == 200 and body == b"def\n"


def test_api_deploy_and_stop_queue_jobs(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    code, data = api(site, "POST", "/api/apps/blog/deploy", {"ref": "main"})
    assert code == 202 and data["ref"] == "main"
    code, data = api(site, "POST", "/api/apps/blog/stop")
    assert code == 202 and data == {"stopping": "blog", "environment": "production"}
    assert [j["action"] for j in site.runner.jobs] == ["deploy", "stop"]


def test_api_errors_are_json_and_start_nothing(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    cases = [("POST", "/api/apps/nope/deploy", {}, 404),
             ("POST", "/api/apps/nope/stop", {}, 404),
             ("GET", "/api/apps/nope", None, 404),
             ("POST", "/api/apps/blog/deploy", {"ref": "--upload-pack=x"}, 400),
             ("POST", "/api/apps/blog/stop", {"environment": "pr-1"}, 404),
             ("POST", "/api/apps/blog/stop", {"environment": "../../etc"}, 400),
             ("GET", "/api/apps/blog/deploy", None, 405),
             ("GET", "/api/deploys/nope", None, 404),
             ("GET", "/api/nothing", None, 404)]
    for method, path, data, status in cases:
        code, answer = api(site, method, path, data)
        assert code == status, (path, answer)
        assert set(answer) == {"error"} and answer["error"]
    assert site.runner.jobs == []
    nested = b"[" * 3000 + b"]" * 3000
    code, headers, raw = wsgi_call(site.app, "POST", "/api/apps/blog/deploy",
                                   body=nested, headers=BEARER)
    assert code == 400 and json.loads(raw) == {"error": "body is not valid JSON"}
    assert site.runner.jobs == []


# -- speed -------------------------------------------------------------------------


def test_overview_of_200_apps_with_1000_deploys_each_renders_fast(site, monkeypatch):
    apps, deploys = 200, 1000
    envs, samples = {}, {}
    now = time.time()
    # A day of checks every 7.5 minutes, with a few different outage patterns.
    patterns = []
    for every in (5, 7, 11, 1000):
        entry = {}
        for n in range(health.KEEP_SLOTS * 4):
            entry = health.add_sample(entry, n % every != 0,
                                      now - n * health.SLOT_SECONDS / 4)
        patterns.append(entry)
    for n in range(apps):
        name = "app-%03d" % n
        write_app(site.store.home, name, REPO="o/" + name, PORT=str(20000 + n),
                  DOMAIN=name + ".example.org")
        ids = ["20260101-%06d-%s-%04x" % (i, name, i) for i in range(deploys)]
        store.write_json(os.path.join(site.store.state_dir, "history",
                                      name + ".json"), ids)
        envs[name + "/production"] = {
            "app": name, "environment": "production", "status": "live", "sha": SHA,
            "deployed_at": store.utcnow(), "last_deploy": ids[-1], "port": 20000 + n,
            "live_deploy": ids[-1], "ref": "main", "queued": None, "running": None}
        samples[name + "/production"] = patterns[n % len(patterns)]
    store.write_json(os.path.join(site.store.state_dir, "apps.json"), envs)
    site.store.write_health_samples(samples)

    # The overview must not touch deploy records or histories at all.
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the overview read deploy history")

    monkeypatch.setattr(site.store, "deploy", forbidden)
    monkeypatch.setattr(site.store, "history", forbidden)
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        code, _headers, body = site.get("/admin")
        timings.append(time.perf_counter() - started)
        assert code == 200
    assert len(rows(body.decode())) == apps
    median = statistics.median(timings)
    print("overview of %d apps: median %.1f ms, %d bytes" % (apps, median * 1000,
                                                             len(body)))
    assert median < 0.05


def test_overview_says_when_health_checks_are_off(tmp_path):
    site = Site(tmp_path / "home", DOCKRUNE_HEALTH_INTERVAL="0")
    assert "Health checks are off" in site.html("/admin")
    site = Site(tmp_path / "other")
    assert "Health checks are off" not in site.html("/admin")


# -- approvals of pull requests from forks --


def hold(site, app="blog", env="pr-4", sha=SHA, title=XSS):
    site.store.request_approval({"app": app, "environment": env, "sha": sha,
                                 "ref": "patch-1", "fork": "stranger/blog",
                                 "title": title, "pr": 4, "repo": "o/blog"})


def test_overview_offers_to_approve_the_held_commit_escaped(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    hold(site)
    page = site.html("/admin")
    assert 'data-approval="%s"' % SHA in page
    assert "Approve %s" % SHA[:12] in page
    assert XSS not in page and html.escape(XSS) in page


def test_approve_deploys_exactly_the_held_sha_once(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    hold(site)
    code, headers, body = site.post_form("/admin/apps/blog/approve", {
        "csrf": site.csrf(), "environment": "pr-4", "sha": SHA})
    assert code == 303, body
    [job] = site.runner.jobs
    assert (job["environment"], job["sha"], job["trigger"]) == ("pr-4", SHA, "approved")
    assert job["pr"] == 4 and job["ref"] == "patch-1"
    assert site.store.approvals() == {}
    code, _headers, body = site.post_form("/admin/apps/blog/approve", {
        "csrf": site.csrf(), "environment": "pr-4", "sha": SHA})
    assert code == 409 and len(site.runner.jobs) == 1


def test_approve_of_another_sha_than_the_held_one_is_refused(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    hold(site, sha=OLD_SHA)
    code, _headers, body = site.post_form("/admin/apps/blog/approve", {
        "csrf": site.csrf(), "environment": "pr-4", "sha": SHA})
    assert code == 409 and b"newer commit needs its own approval" in body
    assert site.runner.jobs == []


def test_approve_without_csrf_token_is_403(site):
    write_app(site.store.home, "blog", REPO="o/blog")
    hold(site)
    code, _headers, _body = site.post_form("/admin/apps/blog/approve", {
        "environment": "pr-4", "sha": SHA})
    assert code == 403 and site.runner.jobs == []
    assert site.store.approvals() != {}
