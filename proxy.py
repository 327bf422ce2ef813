"""Routes to every live app through Caddy.

dockrune owns one file, $DOCKRUNE_HOME/caddy/dockrune.caddy (or
DOCKRUNE_CADDY_FILE), with one site block per live environment that has a
domain.  The operator's own Caddyfile imports it:

    import /var/lib/dockrune/caddy/*.caddy

so dockrune never touches a route it does not own.  After writing the file it
asks Caddy to reload the operator's Caddyfile (DOCKRUNE_CADDY_CONFIG) through
`caddy reload`, which talks to Caddy's admin API.  TLS is Caddy's automatic
HTTPS; nothing here deals with certificates.
"""

import logging
import os
import re
import subprocess
import threading

import store

log = logging.getLogger("dockrune.proxy")

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                        r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HEADER = "# Written by dockrune; edits are lost on the next deploy.\n"
# Caddy refuses to import a file without a single token, so the file always
# defines this (unused) snippet, even when no app is routed.
FOOTER = "(dockrune-routes) {\n}\n"


class ProxyError(Exception):
    """Caddy refused the routes or could not be reached."""


def is_domain(value):
    """Tell whether value is a plain host name that may go into a Caddyfile."""
    return isinstance(value, str) and bool(_DOMAIN_RE.match(value))


def site_address(domain, template):
    """Return the Caddy site address of domain ('{domain}' in template)."""
    return template.replace("{domain}", domain)


def render_routes(routes, template="{domain}", own=None):
    """Return the Caddyfile text for routes, sorted so that output is stable.

    routes: dicts with "domain" and "port" (reverse_proxy to 127.0.0.1:port).
    Static sites too: dockrune's own static server keeps its rules (no
    listing, no dotfiles, no symlink out) behind the proxy.
    own: optional (domain, "host:port") for dockrune's own webhook and admin.
    Routes whose domain is not a plain host name are skipped and logged:
    nothing from outside may reach this file unchecked.
    """
    blocks = [HEADER]
    entries = list(routes)
    if own:
        entries.append({"domain": own[0], "upstream": own[1], "app": "dockrune"})
    seen = set()
    for route in sorted(entries, key=lambda r: r["domain"]):
        domain = route["domain"]
        if not is_domain(domain) or domain in seen:
            log.warning("route for %s skipped: %r is not a usable domain",
                        route.get("app"), domain)
            continue
        seen.add(domain)
        blocks.append(_site_block(route, site_address(domain, template)))
    blocks.append(FOOTER)
    return "\n".join(blocks)


def _site_block(route, address):
    label = "# %s/%s\n" % (route.get("app", "?"), route.get("environment", "-"))
    upstream = route.get("upstream") or "127.0.0.1:%d" % int(route["port"])
    return "%s%s {\n\treverse_proxy %s\n}\n" % (label, address, upstream)


def routes_from_state(environments):
    """Return the routes for every serving environment with a domain and port.

    Serving: live, failing (its previous version still answers), or deploying
    while the version before the deploy still answers.
    """
    routes = []
    for summary in environments.values():
        status = summary.get("status")
        serving = status in ("live", "failing") or (
            status == "deploying" and summary.get("serving"))
        if not serving or not summary.get("domain"):
            continue
        if summary.get("port"):
            routes.append({"domain": summary["domain"], "port": summary["port"],
                           "app": summary["app"],
                           "environment": summary["environment"]})
    return routes


class Proxy:
    """Keeps Caddy's routes in step with the state.  sync() is thread-safe."""

    def __init__(self, store_, settings):
        self.store = store_
        self.settings = settings
        self.path = settings.caddy_file or os.path.join(store_.home, "caddy",
                                                        "dockrune.caddy")
        self._lock = threading.Lock()

    @property
    def enabled(self):
        return bool(self.settings.caddy_config or self.settings.caddy_file)

    def sync(self, overrides=None):
        """Write the routes file from the state and reload Caddy if it changed.

        overrides: {(app, environment): {"port": ..., "domain": ...}} to route
        before the state says so (the switch of a zero-downtime release).  Returns True when Caddy
        was reloaded.  Raises ProxyError when Caddy refuses the new routes;
        the previous file is then put back.
        """
        if not self.enabled:
            return False
        with self._lock:
            envs = self.store.environments()
            for (app, env), fields in (overrides or {}).items():
                summary = envs.setdefault("%s/%s" % (app, env), {
                    "app": app, "environment": env})
                summary.update(fields, status="live")
            own = None
            if self.settings.domain:
                own = (self.settings.domain, "%s:%d" % self.settings.listen)
            text = render_routes(routes_from_state(envs), self.settings.caddy_site,
                                 own)
            try:
                with open(self.path, encoding="utf-8") as f:
                    old = f.read()
            except FileNotFoundError:
                old = None
            if text == old:
                return False
            store.write_text(self.path, text)
            try:
                self.reload()
            except ProxyError:
                if old is not None:
                    store.write_text(self.path, old)
                raise
            log.info("routes updated: %d sites", text.count(" {\n"))
            return True

    def reload(self):
        """Ask Caddy to load the operator's Caddyfile again (which imports ours)."""
        if not self.settings.caddy_config:
            return
        argv = ["caddy", "reload", "--config", self.settings.caddy_config,
                "--adapter", "caddyfile"]
        if self.settings.caddy_admin:
            argv += ["--address", self.settings.caddy_admin]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ProxyError("%s failed: %s" % (" ".join(argv), e)) from None
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise ProxyError("%s exited %d: %s" % (" ".join(argv), done.returncode,
                                                   " | ".join(tail)))
