"""The WSGI app, called in-process through wsgiref.validate (no sockets)."""

import json
import os
import time

import pytest

from conftest import FIXTURES, SECRET, make_settings, payload, push_body, sign, wsgi_call
import handlers
import runners
import store

SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"


class Harness:
    """An Application over a temporary home whose runner is never started.

    Jobs stay waiting in their lanes, so tests can look at what was queued.
    """

    def __init__(self, home, **settings):
        self.settings = make_settings(home, **settings)
        self.store = store.Store(self.settings.home)
        self.store.ensure_dirs()
        self.deployer = runners.Deployer(self.store, self.settings)
        self.runner = runners.Runner(self.deployer)
        self.app = handlers.Application(self.store, self.settings, self.runner,
                                        self.deployer, control_token="ctl-token")

    def add_app(self, name, text):
        with open(os.path.join(self.store.apps_dir, name + ".env"), "w") as f:
            f.write(text)

    def hook(self, event, body, delivery=None, signature=None, headers=None):
        all_headers = {"X-GitHub-Event": event,
                       "X-GitHub-Delivery": delivery or os.urandom(6).hex(),
                       "X-Hub-Signature-256": signature or sign(body)}
        all_headers.update(headers or {})
        status, response_headers, data = wsgi_call(self.app, "POST", "/hooks/github",
                                                   body, all_headers)
        return status, json.loads(data)

    def waiting(self):
        return dict(self.runner._waiting)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    harness.add_app("hello", "REPO=Codertocat/Hello-World\nBRANCH=master\nPORT=8200\n")
    return harness


# -- signatures --


def test_verify_signature_matches_githubs_test_vector():
    with open(os.path.join(FIXTURES, "github", "signature-test-vector.json")) as f:
        vector = json.load(f)
    assert handlers.verify_signature(vector["secret"], vector["payload"].encode(),
                                     vector["X-Hub-Signature-256"])
    assert not handlers.verify_signature(vector["secret"], b"Hello, World?",
                                         vector["X-Hub-Signature-256"])


@pytest.mark.parametrize("signature", [
    "", "sha256=", "sha256=zz", "sha256=" + "0" * 64, "sha1=" + "0" * 40,
    "SHA256", "sha256=" + "a" * 65,
])
def test_webhook_rejects_missing_malformed_or_wrong_signature(h, signature):
    body = push_body("Codertocat/Hello-World", SHA, "master", "master")
    status, answer = h.hook("push", body, signature=signature or " ")
    assert status == 401
    assert answer == {"error": "bad signature"}
    assert h.waiting() == {}


def test_webhook_rejects_sha1_only_signature(h):
    import hashlib
    import hmac
    body = push_body("Codertocat/Hello-World", SHA, "master", "master")
    sha1 = "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    status, answer = wsgi_call(h.app, "POST", "/hooks/github", body, {
        "X-GitHub-Event": "push", "X-Hub-Signature": sha1})[::2]
    assert status == 401


def test_webhook_signed_with_another_secret_is_refused(h):
    body = push_body("Codertocat/Hello-World", SHA, "master", "master")
    status, _ = h.hook("push", body, signature=sign(body, "other secret"))
    assert status == 401


def test_webhook_checks_signature_before_parsing(h):
    status, answer = h.hook("push", b"{not json", signature="sha256=" + "1" * 64)
    assert status == 401


def test_webhook_malformed_json_with_valid_signature_is_400(h):
    status, answer = h.hook("push", b"{not json")
    assert status == 400
    assert "JSON" in answer["error"]


def test_webhook_deeply_nested_json_is_400_not_a_crash(h):
    body = b"[" * 100000 + b"]" * 100000
    status, _ = h.hook("push", body)
    assert status == 400


def test_webhook_body_over_25mb_is_413_without_reading_it(h):
    class Unreadable:
        def read(self, *args):
            raise AssertionError("the body must not be read")

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/hooks/github",
               "CONTENT_LENGTH": str(25 * 1024 * 1024 + 1),
               "wsgi.input": Unreadable(), "HTTP_X_GITHUB_EVENT": "push"}
    seen = {}
    body = h.app(environ, lambda s, hd, exc=None: seen.update(status=s))
    assert seen["status"].startswith("413")
    assert b"body over" in b"".join(body)


def test_webhook_without_content_length_is_411(h):
    seen = {}
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/hooks/github",
               "wsgi.input": None}
    h.app(environ, lambda s, hd, exc=None: seen.update(status=s))
    assert seen["status"].startswith("411")


def test_webhook_only_accepts_post(h):
    status, headers, _ = wsgi_call(h.app, "GET", "/hooks/github")
    assert status == 405
    assert headers["Allow"] == "POST"


# -- events --


def test_ping_is_answered_200(h):
    for name in ("ping.noaction.1", "ping.noaction.4"):
        status, answer = h.hook("ping", json.dumps(payload(name)).encode())
        assert (status, answer) == (200, {"message": "pong"})


def test_push_to_configured_branch_is_queued_with_202(h):
    body = json.dumps(payload("push.noaction.5")).encode()
    started = time.monotonic()
    status, answer = h.hook("push", body)
    assert time.monotonic() - started < 0.5
    assert status == 202
    assert answer["app"] == "hello" and answer["sha"] == SHA
    record = h.store.deploy(answer["deploy"])
    assert record["status"] == "queued"
    assert record["trigger"] == "push" and record["ref"] == "master"
    assert record["repo"] == "Codertocat/Hello-World"
    assert list(h.waiting()) == [("hello", "production")]
    assert h.store.environment("hello", "production")["queued"] == answer["deploy"]


def test_push_form_encoded_body_is_understood(h):
    import urllib.parse
    body = urllib.parse.urlencode({"payload": json.dumps(payload("push.noaction.5"))})
    status, answer = h.hook("push", body.encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 202


@pytest.mark.parametrize("name,reason", [
    ("push.noaction.1", "ignored: tag push"),
    ("push.noaction.2", "ignored: tag push"),
])
def test_tag_pushes_are_ignored_with_a_reason(h, name, reason):
    status, answer = h.hook("push", json.dumps(payload(name)).encode())
    assert status == 200
    assert "ignored: " + answer["ignored"] == reason
    assert h.waiting() == {}


def test_branch_deletion_is_ignored(h):
    data = payload("push.noaction.5")
    data.update(deleted=True, after="0" * 40)
    status, answer = h.hook("push", json.dumps(data).encode())
    assert (status, answer) == (200, {"ignored": "branch deleted"})


def test_push_to_another_branch_is_ignored(h):
    body = push_body("Codertocat/Hello-World", SHA, "feature/x", "master")
    status, answer = h.hook("push", body)
    assert status == 200
    assert answer["ignored"] == "push to feature/x; hello deploys master"
    assert h.waiting() == {}


def test_push_from_unknown_repository_is_ignored(h):
    status, answer = h.hook("push", push_body("someone/else", SHA))
    assert (status, answer) == (200, {"ignored": "unknown repository someone/else"})
    assert h.store.app_names() == ["hello"]


def test_unknown_event_is_acknowledged(h):
    status, answer = h.hook("issues", b"{}")
    assert (status, answer) == (200, {"ignored": "event issues"})


# -- pull requests and branch previews --

PR_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def pr_body(name="pull_request.opened.1", fork=None, sha=None, action=None):
    data = payload(name)
    if fork:
        data["pull_request"]["head"]["repo"]["full_name"] = fork
    if sha:
        data["pull_request"]["head"]["sha"] = sha
    if action:
        data["action"] = action
    return json.dumps(data).encode()


def test_pull_request_opened_queues_a_preview(h):
    status, answer = h.hook("pull_request", pr_body())
    assert status == 202
    assert answer["environment"] == "pr-2" and answer["sha"] == PR_SHA
    record = h.store.deploy(answer["deploy"])
    assert (record["trigger"], record["pr"], record["ref"]) == (
        "pull_request", 2, "changes")
    assert record["title"] == "Update the README with new information."
    assert list(h.waiting()) == [("hello", "pr-2")]


def test_pull_request_synchronize_supersedes_the_waiting_preview(h):
    first = h.hook("pull_request", pr_body())[1]
    second = h.hook("pull_request", pr_body("pull_request.synchronize.1",
                                            sha="5" * 40))[1]
    assert h.store.deploy(first["deploy"])["status"] == "superseded"
    assert h.waiting()[("hello", "pr-2")]["id"] == second["deploy"]


def test_pull_request_from_a_fork_waits_for_approval_of_that_sha(h):
    status, answer = h.hook("pull_request", pr_body(fork="stranger/Hello-World"))
    assert status == 202 and answer["waiting"] == "approval"
    assert h.waiting() == {}
    held = h.store.approvals()["hello/pr-2"]
    assert (held["sha"], held["fork"]) == (PR_SHA, "stranger/Hello-World")
    h.hook("pull_request", pr_body("pull_request.synchronize.1",
                                   fork="stranger/Hello-World", sha="6" * 40))
    assert h.store.take_approval("hello", "pr-2", PR_SHA) is None
    assert h.store.approvals()["hello/pr-2"]["sha"] == "6" * 40


def test_pull_request_from_a_fork_deploys_when_forks_are_allowed(tmp_path):
    h = Harness(tmp_path)
    h.add_app("hello", "REPO=Codertocat/Hello-World\nPREVIEW_FORKS=on\n")
    status, answer = h.hook("pull_request", pr_body(fork="stranger/Hello-World"))
    assert status == 202 and "deploy" in answer


def test_previews_off_ignores_pull_requests(tmp_path):
    h = Harness(tmp_path)
    h.add_app("hello", "REPO=Codertocat/Hello-World\nPREVIEWS=off\n")
    status, answer = h.hook("pull_request", pr_body())
    assert (status, answer) == (200, {"ignored": "previews are off for hello"})


def test_pull_request_closed_tears_the_preview_down(h):
    h.hook("pull_request", pr_body())
    status, answer = h.hook("pull_request", pr_body("pull_request.closed.1"))
    assert status == 202 and answer["teardown"] == "pr-2"
    job = h.waiting()[("hello", "pr-2")]
    assert job["action"] == "teardown" and "closed" in job["reason"]


def test_pull_request_closed_without_a_preview_is_ignored(h):
    status, answer = h.hook("pull_request", pr_body("pull_request.closed.1"))
    assert (status, answer) == (200, {"ignored": "hello has no preview pr-2"})


def test_pull_request_other_actions_are_ignored(h):
    status, answer = h.hook("pull_request", pr_body(action="labeled"))
    assert (status, answer) == (200, {"ignored": "pull_request labeled"})


def test_pull_request_with_bad_number_is_400(h):
    data = payload("pull_request.opened.1")
    data["number"] = "2; rm -rf /"
    status, _ = h.hook("pull_request", json.dumps(data).encode())
    assert status == 400


def test_branch_matching_preview_branches_gets_its_own_environment(tmp_path):
    h = Harness(tmp_path)
    h.add_app("hello", "REPO=Codertocat/Hello-World\nBRANCH=master\n"
              "PREVIEW_BRANCHES='feature/* fix-*'\n")
    status, answer = h.hook("push", push_body("Codertocat/Hello-World", SHA,
                                              "feature/Login", "master"))
    assert status == 202 and answer["environment"] == "branch-feature-login"
    status, answer = h.hook("push", push_body("Codertocat/Hello-World", SHA,
                                              "other", "master"))
    assert status == 200

    data = payload("delete.noaction.1")
    data.update(ref="feature/Login", ref_type="branch")
    status, answer = h.hook("delete", json.dumps(data).encode())
    assert status == 202 and answer["teardown"] == "branch-feature-login"


def test_branch_environment_survives_hostile_names():
    settings = {"PREVIEW_BRANCHES": "*"}
    assert handlers.branch_environment(settings, "--upload-pack=x") == (
        "branch-upload-pack-x")
    assert handlers.branch_environment(settings, "$(id)") == "branch-id"
    assert handlers.branch_environment(settings, "..") is None
    assert handlers.branch_environment({}, "main") is None
    # Long names are cut, and two that differ only past the cut stay apart.
    one = handlers.branch_environment(settings, "feature/" + "x" * 290 + "-one")
    two = handlers.branch_environment(settings, "feature/" + "x" * 290 + "-two")
    assert one != two
    assert store.is_name(one) and store.is_name(two)
    assert one.startswith("branch-feature-xxx")


def test_repeated_delivery_is_acknowledged_once_and_deployed_once(h):
    body = json.dumps(payload("push.noaction.5")).encode()
    status, first = h.hook("push", body, delivery="abc-123")
    assert status == 202
    status, second = h.hook("push", body, delivery="abc-123")
    assert status == 200
    assert second == {"ignored": "duplicate delivery abc-123"}
    assert len(h.store.history("hello")) == 1


def test_delivery_ids_survive_a_restart(h, tmp_path):
    body = json.dumps(payload("push.noaction.5")).encode()
    h.hook("push", body, delivery="same-id")
    again = Harness(tmp_path)
    status, answer = again.hook("push", body, delivery="same-id")
    assert answer == {"ignored": "duplicate delivery same-id"}


def test_newer_push_supersedes_the_queued_one(h):
    first = h.hook("push", push_body("Codertocat/Hello-World", "1" * 40, "master",
                                     "master"))[1]
    second = h.hook("push", push_body("Codertocat/Hello-World", "2" * 40, "master",
                                      "master"))[1]
    assert h.store.deploy(first["deploy"])["status"] == "superseded"
    assert h.store.deploy(first["deploy"])["superseded_by"] == second["deploy"]
    assert h.waiting()[("hello", "production")]["id"] == second["deploy"]


def test_push_with_invalid_repository_name_is_ignored(h):
    status, answer = h.hook("push", push_body("../x", SHA))
    assert status == 200 and answer["ignored"].startswith("invalid repository name")
    assert not os.path.exists(os.path.join(h.store.home, "x.env"))


def test_hostile_branch_name_is_never_queued(h):
    branch = "--upload-pack=touch /tmp/x;$(id)`id`\n"
    status, answer = h.hook("push", push_body("Codertocat/Hello-World", SHA, branch,
                                              "master"))
    assert status == 200
    assert "\n" not in answer["ignored"]
    assert h.waiting() == {}


def test_zero_config_registers_on_push_to_default_branch(tmp_path):
    h = Harness(tmp_path, DOCKRUNE_ALLOWED_OWNERS="codertocat",
                DOCKRUNE_BASE_DOMAIN="example.org", DOCKRUNE_PORT_RANGE="21000-21100")
    status, answer = h.hook("push", json.dumps(payload("push.noaction.5")).encode())
    assert status == 202 and answer["app"] == "hello-world"
    settings = h.store.load_app("hello-world")
    assert settings["REPO"] == "Codertocat/Hello-World"
    assert settings["DOMAIN"] == "hello-world.example.org"
    assert 21000 <= int(settings["PORT"]) <= 21100
    assert settings["GIT_URL"] == "https://github.com/Codertocat/Hello-World.git"


def test_zero_config_ignores_push_to_other_branch_of_unregistered_repo(tmp_path):
    h = Harness(tmp_path, DOCKRUNE_ALLOWED_OWNERS="codertocat")
    body = push_body("Codertocat/Hello-World", SHA, "feature", "master")
    status, answer = h.hook("push", body)
    assert status == 200 and h.store.app_names() == []


# -- the API and the rest --


def api(h, method, path, token="ctl-token", body=b"", query=""):
    headers = {"Authorization": "Bearer " + token} if token else {}
    status, headers, data = wsgi_call(h.app, method, path, body, headers, query=query)
    return status, data


def test_api_without_or_with_wrong_token_is_401(tmp_path):
    h = Harness(tmp_path, DOCKRUNE_API_TOKEN="api-secret")
    assert api(h, "GET", "/api/apps", token=None)[0] == 401
    assert api(h, "GET", "/api/apps", token="wrong")[0] == 401
    assert api(h, "GET", "/api/apps", token="api-secret")[0] == 200
    assert api(h, "GET", "/api/apps", token="ctl-token")[0] == 200


def test_api_without_any_token_configured_is_503(tmp_path):
    h = Harness(tmp_path)
    h.app.control_token = None
    status, data = api(h, "GET", "/api/apps")
    assert status == 503 and b"DOCKRUNE_API_TOKEN" in data


def test_api_lists_apps_and_queues_manual_deploy(h):
    status, data = api(h, "GET", "/api/apps")
    assert status == 200
    assert json.loads(data)[0]["app"] == "hello"
    status, data = api(h, "POST", "/api/apps/hello/deploy",
                       body=json.dumps({"ref": "main"}).encode())
    assert status == 202
    record = h.store.deploy(json.loads(data)["deploy"])
    assert record["trigger"] == "manual" and record["ref"] == "main"
    assert record["sha"] is None


def test_api_unknown_app_is_404_and_starts_nothing(h):
    status, data = api(h, "POST", "/api/apps/nope/deploy")
    assert status == 404 and json.loads(data) == {"error": "no app nope"}
    assert h.waiting() == {}


def test_api_rejects_ref_that_looks_like_an_option(h):
    status, data = api(h, "POST", "/api/apps/hello/deploy",
                       body=json.dumps({"ref": "--upload-pack=x"}).encode())
    assert status == 400


def test_api_log_follows_by_offset(h):
    record = h.store.new_deploy("hello", "production", SHA, "master", "push")
    os.makedirs(os.path.dirname(record["log"]))
    with open(record["log"], "w") as f:
        f.write("line one\nline two\n")
    status, headers, data = wsgi_call(h.app, "GET", "/api/deploys/%s/log" % record["id"],
                                      headers={"Authorization": "Bearer ctl-token"},
                                      query="offset=9")
    assert status == 200 and data == b"line two\n"
    assert headers["X-Log-Offset"] == "18"


def test_healthz_answers(h):
    status, _, data = wsgi_call(h.app, "GET", "/healthz")
    assert status == 200 and json.loads(data)["ok"] is True


def test_unknown_path_is_404(h):
    assert wsgi_call(h.app, "GET", "/nope")[0] == 404


def test_delivery_that_fails_can_be_redelivered(h):
    data = payload("push.noaction.5")
    data["after"] = "not-a-sha"
    status, _ = h.hook("push", json.dumps(data).encode(), delivery="retry-me")
    assert status == 400
    status, answer = h.hook("push", json.dumps(payload("push.noaction.5")).encode(),
                            delivery="retry-me")
    assert status == 202, answer
