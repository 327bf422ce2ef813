import json
import os
import threading

import pytest

import store


# -- .env parsing (Docker Compose's rules) --


def test_parse_env_skips_comments_and_blank_lines():
    assert store.parse_env("# a comment\n\nA=1\n   # indented comment\nB=2\n") == {
        "A": "1", "B": "2"}


def test_parse_env_strips_export_prefix():
    assert store.parse_env("export PORT=8080\nexport\tX=y\n") == {"PORT": "8080",
                                                                  "X": "y"}


def test_parse_env_unquoted_value_ends_at_inline_comment():
    assert store.parse_env("A=value # note\nB=val#ue\n") == {"A": "value", "B": "val#ue"}


def test_parse_env_single_quotes_are_literal():
    assert store.parse_env("A='x # y $B \\n'\n") == {"A": "x # y $B \\n"}


def test_parse_env_double_quotes_understand_escapes():
    assert store.parse_env('A="line1\\nline2 \\"q\\" \\\\"\n') == {
        "A": 'line1\nline2 "q" \\'}


def test_parse_env_quoted_value_may_span_lines():
    assert store.parse_env("KEY='-----BEGIN\nabc\n-----END'\nNEXT=1\n") == {
        "KEY": "-----BEGIN\nabc\n-----END", "NEXT": "1"}


def test_parse_env_expands_earlier_keys_but_never_runs_commands():
    parsed = store.parse_env('HOST=db\nURL=postgres://${HOST}/$HOST\n'
                             'CMD=$(touch /tmp/canary)\nTICK=`id`\n'
                             "RAW='${HOST}'\nMISSING=${NOPE}x\n")
    assert parsed["URL"] == "postgres://db/db"
    assert parsed["CMD"] == "$(touch /tmp/canary)"
    assert parsed["TICK"] == "`id`"
    assert parsed["RAW"] == "${HOST}"
    assert parsed["MISSING"] == "x"


def test_parse_env_keeps_empty_values_and_whitespace_around_equals():
    assert store.parse_env("A=\nB = spaced \nC=''\n") == {"A": "", "B": "spaced",
                                                          "C": ""}


def test_parse_env_rejects_line_without_equals_naming_the_line():
    with pytest.raises(store.EnvFileError, match="line 2: expected KEY=VALUE"):
        store.parse_env("A=1\njust words\n", source="apps/x.env")


def test_parse_env_rejects_unterminated_quote():
    with pytest.raises(store.EnvFileError, match="unterminated"):
        store.parse_env('A="open\nB=2\n')


def test_quote_env_round_trips_awkward_values():
    for value in ("plain", "", "with space", "it's", 'say "hi" $HOME', "a#b c"):
        text = "K=%s\n" % store.quote_env(value)
        assert store.parse_env(text)["K"] == value, text


# -- names --


@pytest.mark.parametrize("raw,name", [
    ("Hello-World", "hello-world"), ("my_app.v2", "my-app-v2"),
    ("--upload-pack", "upload-pack"), ("../x", "x"), ("a" * 60, "a" * 40),
])
def test_sanitize_name_keeps_only_safe_characters(raw, name):
    assert store.sanitize_name(raw) == name


@pytest.mark.parametrize("raw", ["", "...", "---", "ｅｖｉｌ", None, "$(id)"[:2]])
def test_sanitize_name_refuses_text_without_a_usable_name(raw):
    with pytest.raises(ValueError):
        store.sanitize_name(raw)


@pytest.mark.parametrize("repo,ok", [
    ("owner/name", True), ("Owner/Hello.World_2", True), ("../x", False),
    ("owner/..", False), ("owner", False), ("a/b/c", False), ("o/n;id", False),
    ("-x/y", True),
])
def test_is_repo_accepts_only_owner_slash_name(repo, ok):
    assert store.is_repo(repo) is ok


# -- atomic writes --


def test_write_json_replaces_file_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "state" / "x.json")
    store.write_json(path, {"a": 1})
    store.write_json(path, {"a": 2})
    assert store.read_json(path) == {"a": 2}
    assert os.listdir(str(tmp_path / "state")) == ["x.json"]


@pytest.mark.parametrize("data", [
    [], ["a"], ["a", "b\"\\\n", "\u00e9\u2603"], [1, "a"], ["a", None],
    {"b": [1, 2], "a": {"c": "d"}}, "text",
])
def test_dumps_gives_the_text_json_module_gives(data):
    assert store.dumps(data) == json.dumps(data, indent=1, sort_keys=True)


def test_write_json_failure_keeps_old_content(tmp_path):
    path = str(tmp_path / "x.json")
    store.write_json(path, {"old": True})
    with pytest.raises(TypeError):
        store.write_json(path, {"bad": object()})
    assert store.read_json(path) == {"old": True}
    assert os.listdir(str(tmp_path)) == ["x.json"]


def test_read_json_refuses_a_torn_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"half": ')
    with pytest.raises(store.StoreError, match="cannot read"):
        store.read_json(str(path))


def test_write_text_sets_mode(tmp_path):
    path = str(tmp_path / "secret.json")
    store.write_json(path, {}, mode=0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_remove_temp_files_clears_leftovers_of_a_crash(tmp_path):
    (tmp_path / ".tmp-abc").write_text("partial")
    (tmp_path / "keep.json").write_text("{}")
    assert store.remove_temp_files(str(tmp_path)) == 1
    assert os.listdir(str(tmp_path)) == ["keep.json"]


# -- the store --


@pytest.fixture
def st(tmp_path):
    s = store.Store(str(tmp_path), keep_deploys=3, remember_deliveries=3)
    s.ensure_dirs()
    return s


def test_deliveries_are_remembered_across_restarts_in_bounded_space(st, tmp_path):
    assert st.claim_delivery("d1") is True
    assert st.claim_delivery("d1") is False
    again = store.Store(str(tmp_path), remember_deliveries=3)
    assert again.claim_delivery("d1") is False
    for n in range(2, 6):
        again.claim_delivery("d%d" % n)
    assert len(store.read_json(str(tmp_path / "state" / "deliveries.json"))) == 3
    assert again.claim_delivery("d1") is True


def test_released_delivery_can_be_claimed_again(st):
    assert st.claim_delivery("d1") is True
    st.release_delivery("d1")
    assert st.claim_delivery("d1") is True


def test_load_apps_sees_edits_to_app_files(st):
    path = st.app_path("blog")
    with open(path, "w") as f:
        f.write("PORT=1\n")
    assert st.load_apps()["blog"]["PORT"] == "1"
    with open(path, "w") as f:
        f.write("PORT=22\n")
    assert st.load_apps()["blog"]["PORT"] == "22"
    st.load_apps()["blog"]["PORT"] = "mutated"
    assert st.load_apps()["blog"]["PORT"] == "22"


def test_new_deploy_record_holds_the_documented_fields(st):
    record = st.new_deploy("blog", "production", "a" * 40, "main", "push")
    assert store.is_deploy_id(record["id"])
    assert record["status"] == "queued"
    for key in ("app", "environment", "sha", "ref", "trigger", "created_at",
                "started_at", "finished_at", "log", "error"):
        assert key in record
    assert st.deploy(record["id"]) == record
    assert record["log"].endswith("/logs/blog/%s.log" % record["id"])


def test_deploy_lookup_rejects_ids_that_are_paths(st):
    assert st.deploy("../../etc/passwd") is None


def test_history_keeps_only_newest_deploys_and_deletes_old_logs(st, tmp_path):
    ids = []
    for n in range(5):
        record = st.new_deploy("blog", "production", "%040d" % n, "main", "push")
        os.makedirs(os.path.dirname(record["log"]), exist_ok=True)
        open(record["log"], "w").close()
        ids.append(record["id"])
    assert [r["id"] for r in st.history("blog")] == ids[:1:-1]
    assert st.deploy(ids[0]) is None
    assert sorted(os.listdir(str(tmp_path / "logs" / "blog"))) == sorted(
        i + ".log" for i in ids[2:])


def test_allocate_port_is_stable_per_key_and_skips_taken_ports(st):
    first = st.allocate_port("a/production", 20000, 20010, taken=[20000])
    assert first == 20001
    assert st.allocate_port("a/production", 20000, 20010) == first
    assert st.allocate_port("b/production", 20000, 20010, taken=[20000]) == 20002
    st.release_port("a/production")
    assert st.allocate_port("c/production", 20000, 20010, taken=[20000]) == 20001


def test_allocate_port_reports_exhausted_range(st):
    st.allocate_port("a", 20020, 20020)
    with pytest.raises(store.StoreError, match="no free port"):
        st.allocate_port("b", 20020, 20020)


def test_register_app_writes_commented_file_with_unique_name(st):
    name = st.register_app("Owner/My.Site", 8123, "my-site.example.org",
                           "https://github.com/Owner/My.Site.git")
    assert name == "my-site"
    text = open(st.app_path(name)).read()
    assert text.startswith("#")
    settings = st.load_app(name)
    assert settings["REPO"] == "Owner/My.Site"
    assert settings["PORT"] == "8123"
    assert settings["DOMAIN"] == "my-site.example.org"
    assert st.register_app("other/my-site", 8124, "", "x") == "my-site-2"


def test_load_apps_skips_a_broken_file_and_keeps_the_rest(st, caplog):
    with open(os.path.join(st.apps_dir, "good.env"), "w") as f:
        f.write("REPO=o/good\n")
    with open(os.path.join(st.apps_dir, "bad.env"), "w") as f:
        f.write("this is not an env file\n")
    assert list(st.load_apps()) == ["good"]
    assert "app bad skipped" in caplog.text


def test_recover_marks_running_interrupted_and_returns_queued(st):
    running = st.new_deploy("a", "production", "1" * 40, "main", "push")
    st.update_deploy(running["id"], status="running")
    st.update_environment("a", "production", running=running["id"],
                          status="deploying", live_deploy="earlier")
    queued = st.new_deploy("b", "production", "2" * 40, "main", "push")
    st.update_environment("b", "production", queued=queued["id"], status="deploying")
    # Deployed after a stop: nothing served when the crash came.
    st.update_environment("c", "production", status="deploying", serving=False,
                          live_deploy="before-the-stop")
    leftovers = [os.path.join(st.state_dir, ".tmp-leftover"),
                 os.path.join(st.run_dir, "procs", ".tmp-spec"),
                 os.path.join(st.home, "caddy", ".tmp-routes")]
    kept = os.path.join(st.src_dir, "a", "production", ".tmp-belongs-to-the-app")
    for path in leftovers + [kept]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("{")

    requeue, interrupted = st.recover()

    assert [r["id"] for r in requeue] == [queued["id"]]
    assert [r["id"] for r in interrupted] == [running["id"]]
    assert st.deploy(running["id"])["status"] == "interrupted"
    assert st.environment("a", "production")["status"] == "live"
    assert st.environment("a", "production")["running"] is None
    assert st.environment("c", "production")["status"] == "failing"
    assert [p for p in leftovers if os.path.exists(p)] == []
    assert os.path.exists(kept)


def test_update_environment_is_safe_from_many_threads(st):
    def bump(n):
        for i in range(20):
            st.update_environment("app%d" % n, "production", counter=i)

    threads = [threading.Thread(target=bump, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    envs = st.environments()
    assert sorted(envs) == ["app%d/production" % n for n in range(5)]
    assert all(e["counter"] == 19 for e in envs.values())
    json.dumps(envs)
