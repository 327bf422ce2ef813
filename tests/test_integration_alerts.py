"""End to end with the outbox: a real daemon, git and Docker, and stand-ins for
GitHub, Coach Artie, a Discord webhook and n8n."""

import json
import os
import secrets

import pytest

from conftest import (GitRemote, compose_app, compose_down, free_port, payload,
                      post_hook, push_body)
from standins import CoachArtie, Discord, GitHub, N8n

CHANNEL = "123456789012345678"
PUBLIC = "https://deploy.example.org"
REPORTS = ["deployment", "deployment:queued", "commit:pending",
           "deployment:in_progress", "commit:pending"]


@pytest.fixture
def app_name():
    name = "ia-" + secrets.token_hex(3)
    yield name
    compose_down("dockrune-" + name)


@pytest.fixture
def outside():
    servers = {"github": GitHub(), "coach-artie": CoachArtie(), "discord": Discord(),
               "n8n": N8n(header=("X-Dockrune-Key", "n8n-s3cret"))}
    yield servers
    for server in servers.values():
        server.close()


def settings_env(outside):
    gh, discord = outside["github"], outside["discord"]
    return {"DOCKRUNE_GITHUB_TOKEN": gh.token, "DOCKRUNE_GITHUB_API": gh.url,
            "DOCKRUNE_PUBLIC_URL": PUBLIC, "DOCKRUNE_OUTBOX_RETRY_BASE": "0.2",
            "DOCKRUNE_OUTBOX_RETRY_MAX": "2",
            "DOCKRUNE_COACH_ARTIE_URL": outside["coach-artie"].url,
            "DOCKRUNE_COACH_ARTIE_CHANNEL": CHANNEL,
            "DOCKRUNE_DISCORD_WEBHOOK_URL": discord.url + discord.path,
            "DOCKRUNE_N8N_WEBHOOK_URL": outside["n8n"].url + "/webhook/dockrune",
            "DOCKRUNE_N8N_HEADER": "X-Dockrune-Key: n8n-s3cret"}


def write_app(home, name, remote, port):
    os.makedirs(os.path.join(str(home), "apps"), exist_ok=True)
    with open(os.path.join(str(home), "apps", name + ".env"), "w") as f:
        f.write("REPO=tester/%s\nGIT_URL=%s\nBRANCH=main\nPORT=%d\nHEALTH_TIMEOUT=30\n"
                % (name, remote.bare, port))


def deploy(server, repo, sha, message):
    code, answer = post_hook(server.url, "push", push_body(repo, sha, message=message))
    assert code == 202, answer
    record = server.wait_deploy(answer["deploy"])
    return record


def test_deploys_report_to_github_and_alert_on_failure_and_recovery(
        base_image, server_factory, tmp_path, app_name, outside):
    gh = outside["github"]
    remote = GitRemote(str(tmp_path / "git"))
    server = server_factory(**settings_env(outside))
    write_app(server.home, app_name, remote, free_port())
    server.start()
    repo = "tester/" + app_name

    # A good deploy: GitHub hears every step; only n8n hears of a plain success.
    good = remote.commit(compose_app("good"), "good version")
    record = deploy(server, repo, good, "good version")
    assert record["status"] == "live", open(record["log"]).read()
    gh.wait_for(lambda r: len(r) >= 7)
    assert gh.sequence() == REPORTS + ["deployment:success", "commit:success"]
    deployment = gh.deployments()[0]
    assert deployment["path"] == "/repos/%s/deployments" % repo
    assert deployment["body"]["ref"] == good
    final = gh.calls()[-2]["body"]
    assert final["log_url"] == "%s/admin/deploys/%s" % (PUBLIC, record["id"])
    assert gh.calls()[-1]["path"] == "/repos/%s/statuses/%s" % (repo, good)
    assert gh.calls()[-1]["body"]["context"] == "dockrune/" + app_name
    outside["n8n"].wait_for(lambda r: len(r) == 1)
    assert outside["n8n"].documents()[0]["event"] == "deploy_succeeded"

    # A broken build: red on GitHub, one alert per target with the log tail.
    bad = remote.commit(compose_app("bad", fail_build=True), "@everyone broken build")
    record = deploy(server, repo, bad, "@everyone broken build")
    assert record["status"] == "failed"
    gh.wait_for(lambda r: len(r) >= 14)
    assert gh.sequence()[7:] == REPORTS + ["deployment:failure", "commit:failure"]
    for name in ("coach-artie", "discord", "n8n"):
        outside[name].wait_for(lambda r: len(r) >= (2 if name == "n8n" else 1))
    artie = outside["coach-artie"].contents()
    assert len(artie) == 1 and "failed at %s" % bad[:7] in artie[0]
    assert "deploy failed:" in artie[0] and "@everyone" not in artie[0]
    embed = outside["discord"].bodies()[0]["embeds"][0]
    assert "deploy failed:" in embed["description"]
    failed_doc = outside["n8n"].documents()[1]
    assert failed_doc["event"] == "deploy_failed" and failed_doc["sha"] == bad
    assert any("deploy failed:" in line for line in failed_doc["log_tail"])

    # The fix: green again, and everyone hears that it recovered.
    fixed = remote.commit(compose_app("fixed"), "fixed")
    record = deploy(server, repo, fixed, "fixed")
    assert record["status"] == "live", open(record["log"]).read()
    gh.wait_for(lambda r: len(r) >= 21)
    assert gh.sequence()[14:] == REPORTS + ["deployment:success", "commit:success"]
    outside["discord"].wait_for(lambda r: len(r) >= 2)
    outside["coach-artie"].wait_for(lambda r: len(r) >= 2)
    outside["n8n"].wait_for(lambda r: len(r) >= 3)
    assert "recovered" in outside["coach-artie"].contents()[1]
    assert "recovered" in outside["discord"].bodies()[1]["embeds"][0]["title"]
    assert outside["n8n"].documents()[2]["event"] == "recovered"

    for server_ in outside.values():
        assert server_.problems == []
    server.stop()
    assert gh.token not in server.log()
    for root, _dirs, files in os.walk(str(server.home)):
        for name in files:
            with open(os.path.join(root, name), errors="replace") as f:
                text = f.read()
            assert gh.token not in text and "n8n-s3cret" not in text, name
            assert "standin-webhook-token" not in text, name


def test_github_down_for_a_whole_deploy_and_a_restart_reports_it_afterwards(
        base_image, server_factory, tmp_path, app_name, outside):
    gh = outside["github"]
    gh.down = True
    remote = GitRemote(str(tmp_path / "git"))
    home = tmp_path / "home"
    server = server_factory(home=home, **settings_env(outside))
    write_app(home, app_name, remote, free_port())
    server.start()
    repo = "tester/" + app_name

    sha = remote.commit(compose_app("offline"), "while GitHub is down")
    record = deploy(server, repo, sha, "while GitHub is down")
    assert record["status"] == "live", open(record["log"]).read()
    gh.wait_for(lambda r: len(r) >= 2)
    server.stop()
    assert gh.sequence() == []

    gh.down = False
    server = server_factory(home=home, **settings_env(outside)).start()
    gh.wait_for(lambda r: len([x for x in r if x["status"] == 201]) >= 7)
    assert gh.sequence() == REPORTS + ["deployment:success", "commit:success"]
    assert gh.deployments()[0]["body"]["ref"] == sha
    assert gh.problems == []


def pull_request_body(repo, sha, action):
    data = payload("pull_request.opened.1")
    data["action"] = action
    data["repository"]["full_name"] = repo
    data["pull_request"]["head"]["repo"]["full_name"] = repo
    data["pull_request"]["head"]["sha"] = sha
    return json.dumps(data).encode()


def test_pull_request_preview_keeps_one_comment_edited_in_place(
        base_image, server_factory, tmp_path, app_name, outside):
    gh = outside["github"]
    remote = GitRemote(str(tmp_path / "git"))
    low = free_port()
    server = server_factory(DOCKRUNE_PORT_RANGE="%d-%d" % (low, min(low + 50, 65000)),
                            **settings_env(outside))
    os.makedirs(os.path.join(str(server.home), "apps"))
    with open(os.path.join(str(server.home), "apps", app_name + ".env"), "w") as f:
        f.write("REPO=tester/%s\nGIT_URL=%s\nBRANCH=main\nHEALTH_TIMEOUT=30\n"
                % (app_name, remote.bare))
    server.start()
    repo = "tester/" + app_name
    try:
        for n, action in enumerate(("opened", "synchronize")):
            sha = remote.commit(compose_app("preview %d" % n), "preview %d" % n)
            code, answer = post_hook(server.url, "pull_request",
                                     pull_request_body(repo, sha, action))
            assert code == 202, answer
            record = server.wait_deploy(answer["deploy"])
            assert record["status"] == "live", open(record["log"]).read()
            gh.wait_for(lambda r: sum("/comments" in x["path"] for x in r) > n)

        # Closing the pull request tears the preview down: inactive on GitHub,
        # and the comment says the preview is gone.
        code, answer = post_hook(server.url, "pull_request",
                                 pull_request_body(repo, sha, "closed"))
        assert code == 202, answer
        gh.wait_for(lambda r: sum("/comments" in x["path"] for x in r) >= 3)
        gh.wait_for(lambda r: any(x["body"].get("state") == "inactive" for x in r
                                  if "/deployments/" in x["path"]))
    finally:
        compose_down("dockrune-%s-pr-2" % app_name)

    comments = [(r["method"], r["path"]) for r in gh.calls()
                if "/comments" in r["path"]]
    number = list(gh.comments)[0]
    edit = ("PATCH", "/repos/%s/issues/comments/%d" % (repo, number))
    assert comments == [("POST", "/repos/%s/issues/2/comments" % repo), edit, edit]
    assert len(gh.comments) == 1 and "preview removed" in gh.comments[number]
    assert sha[:7] in gh.comments[number]
    assert gh.deployment_states()[-1] == "inactive"
    contexts = {r["body"]["context"] for r in gh.calls() if "/statuses/" in r["path"]
                and "/deployments/" not in r["path"]}
    assert contexts == {"dockrune/%s/pr-2" % app_name}
    assert {d["body"]["environment"] for d in gh.deployments()} == {"pr-2"}
    assert gh.problems == []
