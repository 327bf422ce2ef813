"""GitHub reporting through the outbox, against a stand-in that checks schemas."""

import json
import logging
import os
import time

import pytest

import alerts
from alerthelpers import PUBLIC, SHA1, SHA2, make_alerts, settings_for, simulate
from standins import GitHub, operation, validate

FULL = ["deployment", "deployment:queued", "commit:pending",
        "deployment:in_progress", "commit:pending"]


@pytest.fixture
def gh():
    server = GitHub()
    yield server
    server.close()


@pytest.fixture
def started(tmp_path, gh):
    boxes = []

    def start(home=None, **extra):
        env = dict(DOCKRUNE_GITHUB_TOKEN=gh.token, DOCKRUNE_GITHUB_API=gh.url)
        env.update(extra)
        st, box = make_alerts(home or tmp_path / "home", **env)
        boxes.append(box)
        return st, box

    yield start
    for box in boxes:
        box.shutdown(timeout=2)


def test_successful_deploy_reports_deployment_statuses_and_commit_status(
        started, gh):
    st, box = started()
    record = simulate(st, box)
    gh.wait_for(lambda r: len(r) >= 7)
    assert box.outbox.flush(5)

    assert gh.sequence() == FULL + ["deployment:success", "commit:success"]
    assert gh.problems == []
    deployment = gh.deployments()[0]
    assert deployment["path"] == "/repos/octo/shop/deployments"
    body = deployment["body"]
    assert body["ref"] == SHA1 and body["environment"] == "production"
    assert body["auto_merge"] is False and body["required_contexts"] == []
    assert body["production_environment"] is True
    assert body["transient_environment"] is False
    assert "dockrune" in body["description"] and SHA1[:7] in body["description"]

    statuses = [r for r in gh.calls() if "/deployments/" in r["path"]]
    assert all(r["path"] == "/repos/octo/shop/deployments/1001/statuses"
               for r in statuses)
    final = statuses[-1]["body"]
    assert final["log_url"] == "%s/admin/deploys/%s" % (PUBLIC, record["id"])
    assert final["environment_url"] == "https://shop.example.org"
    commit = [r for r in gh.calls() if "/statuses/" + SHA1 in r["path"]][-1]
    assert commit["body"]["context"] == "dockrune/shop"
    assert commit["body"]["target_url"] == final["log_url"]
    assert commit["body"]["description"] == "live at https://shop.example.org in 41 s"
    assert box.outbox.pending() == []


def test_failing_deploy_ends_failure_with_its_log_url(started, gh):
    st, box = started()
    record = simulate(st, box, outcome="failed",
                      error="docker compose -f compose.yaml up -d exited 1: boom")
    gh.wait_for(lambda r: len(r) >= 7)
    assert gh.sequence() == FULL + ["deployment:failure", "commit:failure"]
    final = [r for r in gh.calls() if "/deployments/" in r["path"]][-1]["body"]
    assert final["log_url"] == "%s/admin/deploys/%s" % (PUBLIC, record["id"])
    commit = gh.calls()[-1]["body"]
    assert commit["description"] == "compose up failed: boom"
    assert gh.problems == []


@pytest.mark.parametrize("error,said", [
    ("docker-compose -f compose.yaml -p dockrune-x up -d --build --remove-orphans "
     "exited 1:  ---> Running in baf7360de941 | The command 'false' returned a "
     "non-zero code: 1 | Service 'web' failed to build : Build failed",
     "build failed: web: The command 'false' returned a non-zero code: 1"),
    ("docker compose -f compose.yaml -p dockrune-x up -d --build exited 17: "
     "#5 ERROR: process \"/bin/sh -c false\" did not complete | target api: "
     "failed to solve: process \"/bin/sh -c false\" did not complete successfully",
     "build failed: api: failed to solve: process \"/bin/sh -c false\" did not "
     "complete successfully"),
    ("docker compose -f compose.yaml up -d exited 1: Bind for 127.0.0.1:8101 "
     "failed: port is already allocated",
     "compose up failed: Bind for 127.0.0.1:8101 failed: port is already allocated"),
    ("health check failed: GET / answered 500",
     "health check failed: GET / answered 500"),
])
def test_failure_descriptions_name_the_service_and_the_cause(error, said):
    assert alerts.describe({"status": "failed", "error": error}) == said[:140]


def test_internal_error_ends_error_not_failure(started, gh):
    st, box = started()
    simulate(st, box, outcome="failed", error="internal error: disk full")
    gh.wait_for(lambda r: len(r) >= 7)
    assert gh.sequence()[-2:] == ["deployment:error", "commit:error"]


def test_server_errors_are_retried_and_the_call_delivered_once(started, gh):
    gh.answer_next((500, {}, {"message": "oops"}), (500, {}, {"message": "oops"}))
    st, box = started()
    simulate(st, box)
    gh.wait_for(lambda r: len([x for x in r if x["status"] in (200, 201)]) >= 7)
    assert [r["status"] for r in gh.calls()][:3] == [500, 500, 201]
    assert len(gh.deployments()) == 1
    assert gh.sequence() == FULL + ["deployment:success", "commit:success"]


def test_rate_limit_403_waits_for_the_reset_time(started, gh):
    reset = int(time.time()) + 2
    gh.answer_next((403, {"X-RateLimit-Remaining": "0",
                          "X-RateLimit-Reset": str(reset)},
                    {"message": "API rate limit exceeded"}))
    st, box = started()
    simulate(st, box)
    calls = gh.wait_for(lambda r: len(r) >= 8)
    assert calls[0]["status"] == 403
    assert calls[1]["time"] >= reset - 0.05
    assert gh.sequence() == FULL + ["deployment:success", "commit:success"]


def test_429_retry_after_holds_every_github_call(started, gh):
    gh.answer_next((429, {"Retry-After": "1"}, {"message": "slow down"}))
    st, box = started()
    simulate(st, box)
    calls = gh.wait_for(lambda r: len(r) >= 8)
    assert calls[1]["time"] - calls[0]["time"] >= 0.95


def test_github_down_during_the_deploy_statuses_arrive_when_it_returns(
        started, gh):
    gh.down = True
    st, box = started()
    record = simulate(st, box)
    assert record["status"] == "live"       # the deploy did not wait
    gh.wait_for(lambda r: len(r) >= 3)
    assert gh.sequence() == []
    gh.down = False
    gh.wait_for(lambda r: len([x for x in r if x["status"] == 201]) >= 7)
    assert gh.sequence() == FULL + ["deployment:success", "commit:success"]


def test_outbox_left_at_a_stop_is_delivered_after_a_restart(tmp_path, started, gh):
    home = tmp_path / "home"
    st, box = started(home, DOCKRUNE_GITHUB_API="http://127.0.0.1:9")
    simulate(st, box)
    box.shutdown(timeout=5)
    with open(os.path.join(st.state_dir, "outbox.json")) as f:
        assert len(json.load(f)["items"]) == 7

    st, box = started(home)
    gh.wait_for(lambda r: len(r) >= 7)
    assert gh.sequence() == FULL + ["deployment:success", "commit:success"]
    assert box.outbox.flush(5)


def test_superseded_deploy_ends_inactive_naming_the_newer_sha(started, gh):
    st, box = started()
    older = st.new_deploy("shop", "production", SHA1, "main", "push",
                          repo="octo/shop", action="deploy")
    box.notify("queued", older)
    newer = st.new_deploy("shop", "production", SHA2, "main", "push",
                          repo="octo/shop", action="deploy")
    older = st.update_deploy(older["id"], status="superseded",
                             superseded_by=newer["id"], finished_at="x")
    box.notify("superseded", older)
    gh.wait_for(lambda r: len(r) >= 5)
    assert gh.sequence() == ["deployment", "deployment:queued", "commit:pending",
                             "deployment:inactive", "commit:error"]
    inactive = [r for r in gh.calls() if "/deployments/" in r["path"]][-1]["body"]
    assert inactive["description"] == "not deployed: superseded by %s" % SHA2[:7]


def test_stopped_environment_becomes_inactive(started, gh):
    st, box = started()
    simulate(st, box)
    gh.wait_for(lambda r: len(r) >= 7)
    box.notify("stopped", {"app": "shop", "environment": "production",
                           "status": "stopped"})
    gh.wait_for(lambda r: len(r) >= 8)
    last = gh.calls()[-1]
    assert last["path"] == "/repos/octo/shop/deployments/1001/statuses"
    assert last["body"]["state"] == "inactive"


def test_preview_deploys_edit_one_pull_request_comment(started, gh):
    st, box = started()
    first = simulate(st, box, env="pr-7")
    gh.wait_for(lambda r: any("/comments" in x["path"] for x in r))
    simulate(st, box, env="pr-7", sha=SHA2, outcome="failed")
    gh.wait_for(lambda r: sum("/comments" in x["path"] for x in r) >= 2)

    comments = [r for r in gh.calls() if "/comments" in r["path"]]
    assert [(r["method"], r["path"]) for r in comments] == [
        ("POST", "/repos/octo/shop/issues/7/comments"),
        ("PATCH", "/repos/octo/shop/issues/comments/%d" % list(gh.comments)[0])]
    assert len(gh.comments) == 1
    text = list(gh.comments.values())[0]
    assert "https://pr-7-shop.example.org" in text and "failed" in text
    assert SHA2[:7] in text and "/admin/deploys/" in text
    deployment = gh.deployments()[0]["body"]
    assert deployment["environment"] == "pr-7"
    assert deployment["transient_environment"] is True
    assert deployment["production_environment"] is False
    commit = [r for r in gh.calls() if "/statuses/" + SHA1 in r["path"]][0]
    assert commit["body"]["context"] == "dockrune/shop/pr-7"
    assert gh.problems == [] and first["status"] == "live"


def test_validation_error_is_logged_and_dropped_not_retried(started, gh, caplog):
    gh.answer_next((422, {}, {"message": "Validation Failed",
                              "documentation_url": "https://docs.github.com"}))
    st, box = started()
    with caplog.at_level(logging.WARNING, logger="dockrune.alerts"):
        simulate(st, box)
        assert box.outbox.flush(10)
    assert len([r for r in gh.calls() if r["path"].endswith("/deployments")]) == 1
    # Without a deployment there is nothing to post statuses on; the commit
    # statuses still go out.
    assert gh.sequence() == ["commit:pending", "commit:pending", "commit:success"]
    assert "Validation Failed" in caplog.text


def test_token_stays_out_of_state_files_and_logs(started, gh, caplog, tmp_path):
    gh.down = True
    with caplog.at_level(logging.DEBUG):
        st, box = started()
        simulate(st, box)
        gh.wait_for(lambda r: len(r) >= 3)
        box.shutdown(timeout=3)
    for root, _dirs, files in os.walk(str(tmp_path / "home")):
        for name in files:
            with open(os.path.join(root, name), errors="replace") as f:
                assert gh.token not in f.read(), name
    assert gh.token not in caplog.text


def test_redirect_is_not_followed_and_the_call_is_dropped(started, gh):
    gh.answer_next((302, {"Location": "http://127.0.0.2:9/elsewhere"}, None))
    st, box = started()
    simulate(st, box)
    assert box.outbox.flush(10)
    assert all(r["path"].startswith("/repos/octo/shop/") for r in gh.calls())
    assert gh.deployments() == []


def test_no_token_means_no_calls(tmp_path, gh):
    st, box = make_alerts(tmp_path / "home", DOCKRUNE_GITHUB_API=gh.url)
    simulate(st, box)
    assert box.outbox.pending() == []
    box.shutdown(timeout=2)
    assert gh.calls() == []


def test_doctor_names_missing_repository_permissions(tmp_path, gh):
    gh.permissions = {"deployments"}
    settings = settings_for(tmp_path, DOCKRUNE_GITHUB_TOKEN=gh.token,
                            DOCKRUNE_GITHUB_API=gh.url)
    lines = alerts.check_github_token(settings, ["octo/shop"], "dockrune/test")
    assert lines[0][0] is True
    ok, name, detail = lines[-1]
    assert not ok and name == "github octo/shop"
    assert detail == "token lacks Commit statuses: write, Pull requests: write"
    assert gh.deployments() == [] and gh.comments == {}


def test_doctor_rejects_a_bad_token(tmp_path, gh):
    settings = settings_for(tmp_path, DOCKRUNE_GITHUB_TOKEN="wrong-token",
                            DOCKRUNE_GITHUB_API=gh.url)
    lines = alerts.check_github_token(settings, ["octo/shop"], "dockrune/test")
    assert lines == [(False, "github token",
                      "GitHub answered 401: Bad credentials (make a new token)")]


def test_validator_lets_null_through_only_where_nullable():
    schema = operation("repos__create-commit-status")["request_body_schema"]
    assert validate({"state": "success", "target_url": None}, schema) == []
    assert validate({"state": None}, schema) != []
    deployment = operation("repos__create-deployment")["request_body_schema"]
    assert validate({"ref": "x", "description": None}, deployment) == []
    assert validate({"ref": None}, deployment) != []
    assert validate({"ref": "x", "payload": 3}, deployment) != []


def test_deploy_interrupted_by_a_stop_ends_error_after_the_restart(
        tmp_path, started, gh):
    home = tmp_path / "home"
    st, box = started(home, DOCKRUNE_GITHUB_API="http://127.0.0.1:9")
    record = st.new_deploy("shop", "production", SHA1, "main", "push",
                           repo="octo/shop", action="deploy")
    box.notify("queued", record)
    st.update_deploy(record["id"], status="running")
    box.notify("started", st.deploy(record["id"]))
    box.shutdown(timeout=2)
    st.update_environment("shop", "production", running=record["id"])
    st.recover()                # what Daemon.start does first

    started(home)
    gh.wait_for(lambda r: len(r) >= 7)
    assert gh.sequence() == FULL + ["deployment:error", "commit:error"]
    assert gh.calls()[-1]["body"]["description"] == (
        "dockrune stopped during the deploy")


def test_last_call_of_a_rate_limit_window_holds_the_next_one(started, gh):
    reset = int(time.time()) + 2
    gh.answer_next((201, {"X-RateLimit-Remaining": "0",
                          "X-RateLimit-Reset": str(reset)},
                    dict(id=77, url="x")))
    st, box = started()
    simulate(st, box)
    calls = gh.wait_for(lambda r: len(r) >= 7)
    assert calls[1]["time"] >= reset - 0.05


def test_doctor_command_prints_the_token_and_permission_checks(
        tmp_path, gh, capsys):
    import dockrune
    from alerthelpers import write_app
    import store

    gh.permissions = {"deployments", "statuses"}
    settings = settings_for(tmp_path / "home", DOCKRUNE_GITHUB_TOKEN=gh.token,
                            DOCKRUNE_GITHUB_API=gh.url)
    st = store.Store(settings.home)
    st.ensure_dirs()
    write_app(st, "shop", repo="octo/shop")
    assert dockrune.cmd_doctor(settings, None) == 1
    out = capsys.readouterr().out
    assert "ok   github token     accepted by %s\n" % gh.url in out
    assert "FAIL github octo/shop token lacks Pull requests: write\n" in out
    assert gh.token not in out


def test_stopped_preview_says_so_in_its_pull_request_comment(started, gh):
    st, box = started()
    simulate(st, box, env="pr-7")
    gh.wait_for(lambda r: any("/comments" in x["path"] for x in r))
    box.notify("stopped", {"app": "shop", "environment": "pr-7",
                           "status": "stopped"})
    gh.wait_for(lambda r: sum("/comments" in x["path"] for x in r) >= 2)
    assert gh.calls()[-1]["method"] == "PATCH"
    text = list(gh.comments.values())[0]
    assert "preview removed" in text and "https://pr-7-shop" not in text
    assert gh.deployment_states()[-1] == "inactive"


# -- previews: forks waiting for approval, and reconciliation --


def test_fork_waiting_for_approval_gets_a_pending_commit_status(started, gh):
    st, box = started()
    box.notify("approval-needed", {"app": "shop", "environment": "pr-3", "sha": SHA2,
                                   "repo": "octo/shop", "pr": 3,
                                   "fork": "stranger/shop"})
    gh.wait_for(lambda r: len(r) >= 1)
    assert box.outbox.flush(5)
    assert gh.problems == []
    [call] = gh.calls()
    assert call["path"] == "/repos/octo/shop/statuses/" + SHA2
    body = call["body"]
    assert body["state"] == "pending" and body["context"] == "dockrune/shop/pr-3"
    assert "waits for approval" in body["description"]
    assert len(body["description"]) <= 140
    assert body["target_url"] == PUBLIC + "/admin"
    assert gh.deployments() == []


def test_pull_request_state_asks_github_and_says_none_when_it_cannot_tell(
        started, gh):
    st, box = started()
    gh.pulls[("octo/shop", 1)] = "closed"
    gh.pulls[("octo/shop", 2)] = "open"
    ask = box.github.pull_request_state
    assert ask("octo/shop", 1) == "closed"
    assert ask("octo/shop", 2) == "open"
    assert ask("octo/shop", 3) is None
    assert ask("../x", 1) is None
    gh.down = True
    assert ask("octo/shop", 1) is None


def test_reconcile_tears_down_the_preview_of_a_closed_pull_request(started, gh):
    import runners
    st, box = started()
    with open(st.app_path("shop"), "w") as f:
        f.write("REPO=octo/shop\n")
    for n in (1, 2):
        st.update_environment("shop", "pr-%d" % n, status="live",
                              deployed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                        time.gmtime()))
    gh.pulls[("octo/shop", 1)] = "closed"
    gh.pulls[("octo/shop", 2)] = "open"

    class Queue:
        jobs = []

        def submit(self, job):
            self.jobs.append(job)

    queue = Queue()
    runners.Reconciler(st, queue, pull_request_state=box.github.pull_request_state
                       ).run_once()
    assert [(j["action"], j["environment"]) for j in queue.jobs] == [
        ("teardown", "pr-1")]
