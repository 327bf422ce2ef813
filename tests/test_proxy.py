import os
import secrets
import time

import pytest

from conftest import GitRemote, compose_app, compose_down, free_port, post_hook, push_body
import proxy
from conftest import write_app


def test_render_routes_is_sorted_and_stable():
    routes = [{"domain": "b.example.org", "port": 8102, "app": "b"},
              {"domain": "a.example.org", "port": 8101, "app": "a"}]
    text = proxy.render_routes(routes)
    assert text.index("a.example.org {") < text.index("b.example.org {")
    assert "\treverse_proxy 127.0.0.1:8101\n" in text
    assert text == proxy.render_routes(list(reversed(routes)))


@pytest.mark.parametrize("domain", [
    "evil.org {\n}\n:80 {", "a b", "*.example.org", "../x", "", "x" * 300,
    "ex\u0430mple.org", "a.org:80"])
def test_render_routes_skips_domains_that_are_not_plain_host_names(domain):
    text = proxy.render_routes([{"domain": domain, "port": 8101, "app": "x"}])
    assert text == proxy.render_routes([])
    assert not domain or domain not in text


def test_render_routes_serves_dockrunes_own_domain():
    text = proxy.render_routes(
        [{"domain": "docs.example.org", "port": 8101, "app": "docs"}],
        template="{domain}", own=("deploy.example.org", "127.0.0.1:9000"))
    assert "docs.example.org {\n\treverse_proxy 127.0.0.1:8101\n}" in text
    assert "deploy.example.org {\n\treverse_proxy 127.0.0.1:9000\n}" in text


def test_routes_from_state_takes_live_environments_with_a_domain():
    envs = {
        "a/production": {"app": "a", "environment": "production", "status": "live",
                         "domain": "a.org", "port": 1},
        "b/production": {"app": "b", "environment": "production", "status": "stopped",
                         "domain": "b.org", "port": 2},
        "c/production": {"app": "c", "environment": "production", "status": "live",
                         "domain": None, "port": 3},
        # Redeploying while the old version serves: keeps its route.
        "d/production": {"app": "d", "environment": "production",
                         "status": "deploying", "serving": True,
                         "domain": "d.org", "port": 4},
        # Deploying after a stop: nothing answers yet.
        "e/production": {"app": "e", "environment": "production",
                         "status": "deploying", "serving": False,
                         "domain": "e.org", "port": 5},
    }
    assert sorted(r["domain"] for r in proxy.routes_from_state(envs)) == [
        "a.org", "d.org"]


def test_live_app_is_routed_through_caddy_and_unrouted_when_stopped(
        base_image, caddy, server_factory, tmp_path):
    name = "px-" + secrets.token_hex(3)
    remote = GitRemote(str(tmp_path / "git"))
    sha = remote.commit(compose_app("through caddy"))
    server = server_factory(**caddy.settings())
    domain = name + ".apps.test"
    write_app(server.home, name, remote, free_port(), DOMAIN=domain)
    server.start()
    try:
        code, answer = post_hook(server.url, "push", push_body("tester/" + name, sha))
        assert server.wait_deploy(answer["deploy"])["status"] == "live"
        assert caddy.get(domain) == (200, "through caddy\n")
        assert caddy.get("operator.test") == (200, "operator's own")
        with open(caddy.routes) as f:
            assert f.read().startswith(proxy.HEADER)

        server.cli("stop", name)
        deadline = time.monotonic() + 60
        while domain in open(caddy.routes).read():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        assert server.status(name)["status"] == "stopped"
        assert caddy.get(domain)[1] != "through caddy\n"
        assert caddy.get("operator.test") == (200, "operator's own")
    finally:
        compose_down("dockrune-" + name)


def test_refused_reload_puts_the_previous_routes_back(tmp_path, caddy):
    import store
    from conftest import make_settings
    settings = make_settings(tmp_path / "home", **dict(
        caddy.settings(), DOCKRUNE_CADDY_SITE="http://{domain}:%d {" % 1))
    st = store.Store(settings.home)
    st.ensure_dirs()
    st.update_environment("a", "production", status="live", domain="a.test",
                          port=8101)
    routes = proxy.Proxy(st, settings)
    before = open(caddy.routes).read()
    with pytest.raises(proxy.ProxyError, match="caddy reload"):
        routes.sync()
    assert open(caddy.routes).read() == before
    assert caddy.get("operator.test") == (200, "operator's own")
    assert os.path.exists(caddy.routes)
