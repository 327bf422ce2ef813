"""Alerts to people: Coach Artie, a Discord webhook and n8n, through the outbox."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

import alerts
import dockrune
from alerthelpers import (SHA1, make_alerts, settings_for, simulate, wait_until,
                          write_app)
from conftest import ROOT
from standins import CoachArtie, Discord, N8n, StandIn

CHANNEL = "123456789012345678"
LOG = ["12:00:01 -----> building web (docker compose)",
       "12:00:02        Step 3/4 : RUN false",
       "12:00:03        The command '/bin/sh -c false' returned a non-zero code: 1",
       "12:00:04 -----> deploy failed: web exited 1"]


@pytest.fixture
def targets():
    servers = {"coach-artie": CoachArtie(), "discord": Discord(),
               "n8n": N8n(header=("X-Dockrune-Key", "n8n-s3cret"))}
    yield servers
    for server in servers.values():
        server.close()


def target_env(targets, **extra):
    env = {"DOCKRUNE_COACH_ARTIE_URL": targets["coach-artie"].url,
           "DOCKRUNE_COACH_ARTIE_CHANNEL": CHANNEL,
           "DOCKRUNE_DISCORD_WEBHOOK_URL": targets["discord"].url
           + targets["discord"].path,
           "DOCKRUNE_N8N_WEBHOOK_URL": targets["n8n"].url + "/webhook/dockrune",
           "DOCKRUNE_N8N_HEADER": "X-Dockrune-Key: n8n-s3cret"}
    env.update(extra)
    return env


@pytest.fixture
def started(tmp_path, targets):
    boxes = []

    def start(**extra):
        st, box = make_alerts(tmp_path / "home", **target_env(targets, **extra))
        boxes.append(box)
        return st, box

    yield start
    for box in boxes:
        box.shutdown(timeout=2)


def delivered(targets):
    return {name: [r for r in server.calls() if r["status"] in (200, 204)]
            for name, server in targets.items()}


def test_failed_deploy_sends_one_alert_per_target_with_the_log_tail(
        started, targets):
    st, box = started()
    record = simulate(st, box, outcome="failed", log_lines=LOG,
                      error="docker compose up exited 1")
    assert box.outbox.flush(10)

    got = delivered(targets)
    assert [len(v) for v in got.values()] == [1, 1, 1]
    content = targets["coach-artie"].contents()[0]
    assert "Deploy of shop (production) failed at %s" % SHA1[:7] in content
    assert "returned a non-zero code: 1" in content
    assert "https://deploy.example.org/admin/deploys/%s" % record["id"] in content

    embed = targets["discord"].bodies()[0]["embeds"][0]
    assert embed["color"] == 0xE74C3C and "deploy failed" in embed["title"]
    assert "returned a non-zero code: 1" in embed["description"]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["App"] == "shop" and fields["Environment"] == "production"
    assert fields["Branch"] == "main" and fields["Duration"] == "41 s"
    assert fields["Commit"] == "[%s](https://github.com/octo/shop/commit/%s)" % (
        SHA1[:7], SHA1)
    assert "[app](https://shop.example.org)" in fields["Links"]
    assert "[log](https://deploy.example.org/admin/deploys/" in fields["Links"]

    doc = targets["n8n"].documents()[0]
    assert doc["version"] == 1 and doc["event"] == "deploy_failed"
    assert doc["app"] == "shop" and doc["sha"] == SHA1 and doc["status"] == "failed"
    assert doc["repo"] == "octo/shop" and doc["ref"] == "main"
    assert doc["log_tail"][-1].endswith("deploy failed: web exited 1")
    assert doc["urls"]["log"].endswith(record["id"])
    assert doc["duration"] == 41.2 and doc["timestamps"]["finished"]
    for server in targets.values():
        assert server.problems == []


def test_recovery_after_a_failure_reaches_every_target(started, targets):
    st, box = started()
    simulate(st, box, outcome="failed")
    simulate(st, box, outcome="live")
    assert box.outbox.flush(10)
    assert "recovered" in targets["coach-artie"].contents()[1]
    assert targets["discord"].bodies()[1]["embeds"][0]["color"] == 0x2ECC71
    assert [d["event"] for d in targets["n8n"].documents()] == [
        "deploy_failed", "recovered"]


def test_plain_success_goes_only_to_n8n_by_default(started, targets):
    st, box = started()
    simulate(st, box, outcome="live")
    simulate(st, box, env="pr-3", outcome="live")
    assert box.outbox.flush(10)
    assert targets["coach-artie"].calls() == [] and targets["discord"].calls() == []
    assert [d["event"] for d in targets["n8n"].documents()] == [
        "deploy_succeeded", "preview_ready"]
    assert targets["n8n"].documents()[1]["urls"]["preview"] == (
        "https://pr-3-shop.example.org")


def test_fifty_failures_respect_discord_429s_and_all_arrive(started, targets):
    targets["discord"].limit_every = 7
    targets["discord"].retry_after = 0.25
    st, box = started()
    ids = [simulate(st, box, outcome="failed")["id"] for _ in range(50)]
    assert box.outbox.flush(60)

    discord = targets["discord"]
    assert discord.accepted == 50 and discord.early == 0
    assert len([r for r in discord.calls() if r["status"] == 429]) >= 7
    logged = [b["embeds"][0]["url"].rsplit("/", 1)[1] for b in discord.bodies()]
    assert logged == ids                    # in order, each once
    assert len(targets["coach-artie"].contents()) == 50
    assert len(targets["n8n"].documents()) == 50


def test_retry_after_is_capped_by_the_retry_max_setting(started, targets):
    targets["discord"].answer_next((429, {"Retry-After": "3600"},
                                    {"message": "You are being rate limited.",
                                     "retry_after": 3600.0, "global": True}))
    st, box = started(DOCKRUNE_OUTBOX_RETRY_MAX="0.5")
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    assert targets["discord"].accepted == 1


def test_custom_template_renders_for_its_target_only(tmp_path, started, targets):
    os.makedirs(str(tmp_path / "home" / "templates"))
    with open(str(tmp_path / "home" / "templates" /
                  "deploy_failed.coach-artie.txt"), "w") as f:
        f.write("BROKEN ${app}@${short_sha} by ${author}: ${error} $$5\n")
    st, box = started()
    simulate(st, box, outcome="failed", error="health check failed")
    assert box.outbox.flush(10)
    assert targets["coach-artie"].contents() == [
        "BROKEN shop@%s by Ann Author: health check failed $5" % SHA1[:7]]
    assert "BROKEN" not in targets["discord"].bodies()[0]["embeds"][0]["description"]


def test_unknown_template_variable_is_reported_and_never_crashes(
        tmp_path, started, targets, caplog, capsys):
    os.makedirs(str(tmp_path / "home" / "templates"))
    with open(str(tmp_path / "home" / "templates" / "deploy_failed.discord.txt"),
              "w") as f:
        f.write("${app} broke: ${nope}\n")
    with caplog.at_level(logging.WARNING, logger="dockrune.alerts"):
        st, box = started()
    assert "deploy_failed.discord.txt: unknown variable ${nope}" in caplog.text
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    assert targets["discord"].bodies()[0]["embeds"][0]["description"] == (
        "shop broke: ${nope}")

    settings = settings_for(tmp_path / "home")
    assert dockrune.cmd_doctor(settings, None) == 1
    assert ("FAIL template         deploy_failed.discord.txt: unknown variable "
            "${nope}") in capsys.readouterr().out


def test_everyone_in_a_commit_message_pings_no_one(started, targets):
    st, box = started()
    simulate(st, box, outcome="failed", message="@everyone look <@123> <@&456> @here",
             log_lines=["@everyone from the log"])
    assert box.outbox.flush(10)
    body = targets["discord"].bodies()[0]
    assert body["allowed_mentions"] == {"parse": []}
    text = json.dumps(body, ensure_ascii=False) + targets["coach-artie"].contents()[0]
    for mention in ("@everyone", "@here", "<@123>", "<@&456>"):
        assert mention not in text


def test_one_target_down_does_not_delay_the_others(started, targets):
    targets["coach-artie"].delay = 5        # answers long after the timeout
    st, box = started(DOCKRUNE_OUTBOX_TIMEOUT="3")
    began = time.monotonic()
    simulate(st, box, outcome="failed")
    wait_until(lambda: targets["discord"].accepted == 1
               and len(targets["n8n"].documents()) == 1, 10, "the fast targets")
    assert time.monotonic() - began < 2.5
    assert targets["coach-artie"].contents() == []


def test_every_message_fits_its_target_even_with_huge_text(started, targets):
    st, box = started()
    simulate(st, box, outcome="failed", error="E" * 9000, message="M" * 9000,
             log_lines=["L" * 3000] * 20)
    assert box.outbox.flush(10)
    content = targets["coach-artie"].contents()[0]
    assert len(content) <= 2000 and content.endswith(alerts.TRUNCATED)
    embed = targets["discord"].bodies()[0]["embeds"][0]
    assert embed["description"].endswith(alerts.TRUNCATED)
    for server in targets.values():
        assert server.problems == []


def test_wrong_n8n_header_is_refused_once_and_not_retried(started, targets):
    st, box = started(DOCKRUNE_N8N_HEADER="X-Dockrune-Key: wrong")
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    assert [r["status"] for r in targets["n8n"].calls()] == [403]
    assert targets["discord"].accepted == 1


def test_rules_choose_events_globally_and_per_app(started, targets):
    st, box = started(DOCKRUNE_ALERTS_N8N="deploy_failed",
                      DOCKRUNE_ALERTS_COACH_ARTIE="all")
    write_app(st, "shop", ALERTS_DISCORD="none")
    simulate(st, box, outcome="live")
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    assert targets["discord"].calls() == []
    assert [d["event"] for d in targets["n8n"].documents()] == ["deploy_failed"]
    assert len(targets["coach-artie"].contents()) == 2


def test_a_mistyped_app_rule_falls_back_to_the_global_one(
        tmp_path, started, targets, capsys):
    st, box = started(DOCKRUNE_ALERTS_DISCORD="none")
    write_app(st, "shop", ALERTS_DISCORD="deploy_faild")
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    assert targets["discord"].calls() == []
    assert len(targets["coach-artie"].contents()) == 1
    assert alerts.rule_problems({"ALERTS_DISCORD": "deploy_faild"}) == [
        "ALERTS_DISCORD='deploy_faild': unknown events deploy_faild; known: "
        + ", ".join(alerts.EVENTS) + ", all, none"]
    assert alerts.rule_problems({"ALERTS_N8N": "all", "OTHER": "x"}) == []
    assert dockrune.cmd_doctor(settings_for(tmp_path / "home"), None) == 1
    assert ("FAIL app shop         ALERTS_DISCORD='deploy_faild': unknown events"
            in capsys.readouterr().out)


def test_log_tail_hides_secrets_and_control_characters(started, targets):
    st, box = started(DOCKRUNE_ADMIN_PASSWORD="adminpass123")
    simulate(st, box, outcome="failed", log_lines=[
        "leaked s3cret-hook and adminpass123", "colour \x1b[31mred\x1b[0m"])
    assert box.outbox.flush(10)
    tail = targets["n8n"].documents()[0]["log_tail"]
    assert tail[0] == "leaked *** and ***"
    assert "\x1b" not in tail[1]
    with open(os.path.join(st.state_dir, "outbox.json")) as f:
        state = f.read()
    assert "n8n-s3cret" not in state and "standin-webhook-token" not in state


def test_server_errors_and_timeouts_are_retried(started, targets):
    targets["coach-artie"].answer_next((500, {}, {"error": "Discord is down"}),
                                       (502, {}, None))
    st, box = started()
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    assert [r["status"] for r in targets["coach-artie"].calls()] == [500, 502, 200]


def test_alert_urls_must_be_http_or_https(tmp_path):
    with pytest.raises(dockrune.SettingsError):
        settings_for(tmp_path, DOCKRUNE_DISCORD_WEBHOOK_URL="file:///etc/passwd")
    with pytest.raises(dockrune.SettingsError):
        settings_for(tmp_path, DOCKRUNE_ALERTS_DISCORD="deploy_faild")


def test_alert_test_command_prints_what_each_target_answered(tmp_path, targets):
    env = dict(os.environ, DOCKRUNE_HOME=str(tmp_path / "home"),
               **target_env(targets))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "dockrune.py"),
                           "alert", "test"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("coach-artie  200 ")
    assert lines[1] == "discord      204 (empty body)"
    assert lines[2] == "n8n          200 Workflow was started"
    assert targets["n8n"].documents()[0]["event"] == "test"

    env["DOCKRUNE_N8N_HEADER"] = "X-Dockrune-Key: nope"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "dockrune.py"),
                           "alert", "test", "n8n"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == "n8n          403 Authorization data is wrong!\n"


class Redirector(StandIn):
    def respond(self, request):
        return 302, {"Location": "http://127.0.0.1:9/elsewhere"}, None


def test_alert_redirects_are_not_followed(started, targets):
    other = Redirector()
    try:
        st, box = started(DOCKRUNE_N8N_WEBHOOK_URL=other.url + "/webhook/x")
        simulate(st, box, outcome="failed")
        assert box.outbox.flush(10)
        assert [r["status"] for r in other.calls()] == [302]
    finally:
        other.close()


def test_health_checker_down_and_up_reach_every_target(started, targets):
    st, box = started()
    record = simulate(st, box, outcome="live")
    info = {"app": "shop", "environment": "production", "sha": SHA1,
            "deploy": record["id"], "url": "https://shop.example.org",
            "port": 8123, "detail": "connection refused", "since": "x"}
    box.notify("app-down", info)
    box.notify("app-up", dict(info, detail="HTTP 200"))
    assert box.outbox.flush(10)
    artie = targets["coach-artie"].contents()
    assert artie == ["shop (production) is down at https://shop.example.org: "
                     "connection refused",
                     "shop (production) is back up at https://shop.example.org."]
    assert [b["embeds"][0]["title"] for b in targets["discord"].bodies()] == [
        "🔥 shop: down", "✅ shop: back up"]
    docs = targets["n8n"].documents()
    assert [d["event"] for d in docs] == ["deploy_succeeded", "app_down", "app_up"]
    assert docs[1]["repo"] == "octo/shop" and docs[1]["status"] == "down"


def test_template_that_renders_to_nothing_still_makes_a_valid_embed(
        tmp_path, started, targets):
    os.makedirs(str(tmp_path / "home" / "templates"))
    with open(str(tmp_path / "home" / "templates" / "deploy_failed.discord.txt"),
              "w") as f:
        f.write("   \n")
    st, box = started()
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    embed = targets["discord"].bodies()[0]["embeds"][0]
    assert "description" not in embed and embed["title"] == "❌ shop: deploy failed"
    assert targets["discord"].problems == []


def test_coach_artie_template_that_renders_to_nothing_falls_back_to_built_in(
        tmp_path, started, targets):
    os.makedirs(str(tmp_path / "home" / "templates"))
    with open(str(tmp_path / "home" / "templates" /
                  "deploy_failed.coach-artie.txt"), "w") as f:
        f.write("   \n")
    st, box = started()
    simulate(st, box, outcome="failed")
    assert box.outbox.flush(10)
    (content,) = targets["coach-artie"].contents()
    assert content.startswith("Deploy of shop (production) failed at ")
    assert targets["coach-artie"].problems == []


def test_process_found_dead_by_the_supervisor_alerts_every_target(started, targets):
    st, box = started()
    record = simulate(st, box, outcome="live")
    spec = {"app": "shop", "environment": "production", "slot": "live", "pid": 4242,
            "sha": SHA1, "deploy": record["id"], "port": 8123, "kind": "procfile",
            "argv": ["node", "server.js"], "env": {"SESSION_KEY": "app-secret-value"}}
    box.notify("process_exited", spec)
    box.notify("process_restarted", dict(spec, pid=4243))
    assert box.outbox.flush(10)
    assert targets["coach-artie"].contents() == [
        "shop (production) crashed at %s: exited (pid 4242); the supervisor "
        "restarts it" % SHA1[:7]]
    assert [b["embeds"][0]["title"] for b in targets["discord"].bodies()] == [
        "💥 shop: crashed"]
    docs = targets["n8n"].documents()
    assert [d["event"] for d in docs] == ["deploy_succeeded", "app_crashed"]
    assert docs[1]["status"] == "crashed" and docs[1]["repo"] == "octo/shop"
    for target in targets.values():
        assert "app-secret-value" not in json.dumps([r["body"] for r in target.requests])


def test_outbox_retries_double_up_to_their_cap_then_give_up_when_too_old(tmp_path):
    import store
    st = store.Store(str(tmp_path / "home"))
    st.ensure_dirs()
    box = alerts.Outbox(st, {"n8n": lambda item: None}, retry_base=2.0,
                        retry_max=30.0, max_age=3600.0)
    item = box.enqueue("n8n", "alerts:n8n", "deploy_failed", {"body": {}})
    delays = []
    for attempt in range(6):
        before = time.time()
        box._settle(item, alerts.RETRY, None, "connection refused")
        (left,) = box.pending()
        delays.append(round(left["due"] - before))
        assert left["attempts"] == attempt + 1
        assert left["last_error"] == "connection refused"
    assert delays == [2, 4, 8, 16, 30, 30]

    # Older than max_age: the next failure is the last one.
    box._items[0]["created"] = time.time() - 3601
    box._settle(item, alerts.RETRY, None, "connection refused")
    assert box.pending() == []
    # And none of it was lost on the way: the file says the same.
    assert store.read_json(box.path)["items"] == []
