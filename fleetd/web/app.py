"""Headquarters' status page as a WSGI application: login, the overview, a store's page, the
chart, their live parts and JSON.

Rules this module keeps:
- every page, fragment, chart and JSON needs a live session: a page without one is redirected
  to /login (303), a fragment, the chart or JSON answered 401 (the page's script then goes to
  /login). Only /login and /static/<file> (files shipped in this package and hostd's page.css)
  are open;
- the session cookie is random, HttpOnly, SameSite=Strict, Path=/, and Secure when the request
  came over https (waitress sets the scheme from X-Forwarded-Proto only for a trusted proxy);
- every POST carries a CSRF token compared in constant time: the session's own for /logout,
  and for /login a double-submit token (a SameSite=Strict cookie and the form field equal);
- Jinja2 with autoescape always on (store, lane and alarm text is untrusted) and a strict
  Content-Security-Policy (no inline script, nothing from elsewhere); the chart SVG alone may
  keep its inline style (an <img> runs no script);
- a form body over MAX_BODY bytes is refused; a database that does not answer is a 503 with one
  line; any other failure is logged and a 500 with one line, never a traceback.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote
from zoneinfo import ZoneInfo

import jinja2
import psycopg
from hexiao.fleetd.web import auth, chart, view

log = logging.getLogger("hexiao.fleetd.web")

REFRESH_S = 5.0  # hq.js refetches the live part this often (a store's keep-alive is 30 s)
SESSION_S = 8 * 3600.0
COOKIE, LOGIN_COOKIE = "hexiao_hq", "hexiao_hq_login"
MAX_BODY = 4096
# file -> (package, content type): hostd's page.css is shared, the rest is this page's own
_STATIC = {"page.css": ("hexiao.hostd.web", "text/css; charset=utf-8"),
           "favicon.svg": ("hexiao.hostd.web", "image/svg+xml"),
           "hq.css": ("hexiao.fleetd.web", "text/css; charset=utf-8"),
           "hq.js": ("hexiao.fleetd.web", "text/javascript; charset=utf-8")}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_TEXT, _HTML = "text/plain; charset=utf-8", "text/html; charset=utf-8"

Start = Callable[..., Any]


class _Reply(Exception):
    """Raised to answer at once (a redirect, a 401, a refused form)."""

    def __init__(self, status: str, body: bytes = b"", ctype: str = _TEXT,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.ctype, self.headers = status, body, ctype, headers or []


class HqApp:
    """The WSGI application over fleetd's database `dsn`; `clock` is epoch seconds (tests)."""

    def __init__(self, dsn: str, *, tz: str = "Asia/Shanghai", refresh_s: float = REFRESH_S,
                 session_s: float = SESSION_S, clock: Callable[[], float] = time.time) -> None:
        self.dsn, self.tz, self.refresh_s, self.session_s = dsn, ZoneInfo(tz), refresh_s, session_s
        self.clock = clock
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("hexiao.fleetd.web", "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters["q"] = lambda s: quote(str(s), safe="")
        self.statics = {n: resources.files(p).joinpath("static", n).read_bytes()
                        for n, (p, _) in _STATIC.items()}

    # -- WSGI -----------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            raw = environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8")
        except UnicodeError:
            raw = "/\0"  # no page has such a name: a 404
        try:
            status, body, ctype, headers = self._route(method, raw, environ)
        except _Reply as r:
            status, body, ctype, headers = r.status, r.body, r.ctype, r.headers
        except psycopg.OperationalError as e:
            log.error("status page: database: %s", str(e).strip().splitlines()[0])
            status, body, ctype, headers = ("503 Service Unavailable", b"headquarters' database "
                                            b"does not answer; try again shortly\n", _TEXT, [])
        except Exception:
            log.exception("status page: %s %s failed", method, raw)
            status, body, ctype, headers = ("500 Internal Server Error", b"the page failed; "
                                            b"hexiao-fleetd's log has the reason\n", _TEXT, [])
        csp = _SVG_CSP if ctype.startswith("image/svg") and raw == "/chart.svg" else _CSP
        start(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                       ("Content-Security-Policy", csp), ("X-Content-Type-Options", "nosniff"),
                       ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"),
                       ("X-Frame-Options", "DENY"), *headers])
        return [] if method == "HEAD" else [body]

    def _route(self, method: str, path: str,
               environ: dict[str, Any]) -> tuple[str, bytes, str, list[tuple[str, str]]]:
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name in self.statics and method in ("GET", "HEAD"):
                return "200 OK", self.statics[name], _STATIC[name][1], []
            raise _Reply("404 Not Found", b"no such file\n")
        if path == "/login":
            return self._login(method, environ)
        if method == "POST" and path == "/logout":
            return self._logout(environ)
        if method not in ("GET", "HEAD"):
            raise _Reply("405 Method Not Allowed", b"this page only reads\n",
                         headers=[("Allow", "GET, HEAD")])
        page = path in ("/",) or (path.startswith("/store/") and not path.endswith("/fragment"))
        with self._connect() as conn:
            s = self._session(conn, environ, page=page)
            now = datetime.fromtimestamp(self.clock(), UTC)
            ctx = {"op": s, "refresh_s": self.refresh_s}
            if path == "/chart.svg":
                return "200 OK", chart.svg(view.hourly(conn, now, self.tz)), "image/svg+xml", []
            if path in ("/", "/fragment", "/status.json"):
                data = view.overview(conn, now, self.tz)
                if path == "/status.json":
                    return "200 OK", json.dumps(data, ensure_ascii=False).encode(), \
                        "application/json", []
                tpl = "overview.html" if path == "/" else "overview_live.html"
                return "200 OK", self._render(tpl, o=data, **ctx), _HTML, []
            if path.startswith("/store/"):
                sid = path[len("/store/"):].removesuffix("/fragment")
                data = view.store(conn, sid, now, self.tz)
                if data is None:
                    raise _Reply("404 Not Found", f"no store {sid!r} at headquarters\n".encode())
                tpl = "store_live.html" if path.endswith("/fragment") else "store.html"
                return "200 OK", self._render(tpl, d=data, **ctx), _HTML, []
        raise _Reply("404 Not Found", b"no such page: try /\n")

    # -- sessions -------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)

    @staticmethod
    def _cookie(environ: dict[str, Any], name: str) -> str:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(environ.get("HTTP_COOKIE", ""))
        except CookieError:
            return ""
        return jar[name].value if name in jar else ""

    def _session(self, conn: psycopg.Connection, environ: dict[str, Any], *,
                 page: bool) -> auth.Session:
        s = auth.session(conn, self._cookie(environ, COOKIE), now=self.clock())
        if s is not None:
            return s
        if page:
            raise _Reply("303 See Other", b"log in first\n", headers=[("Location", "/login")])
        raise _Reply("401 Unauthorized", b"log in first: /login\n")

    def _set_cookie(self, environ: dict[str, Any], name: str, value: str,
                    max_age: int) -> tuple[str, str]:
        secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
        return ("Set-Cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Strict; "
                              f"Max-Age={max_age}{secure}")

    def _form(self, environ: dict[str, Any]) -> dict[str, str]:
        if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            raise _Reply("415 Unsupported Media Type", b"send the page's form\n")
        try:
            n = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            n = MAX_BODY + 1
        if n > MAX_BODY:
            raise _Reply("413 Content Too Large", b"the form is too large\n")
        body = environ["wsgi.input"].read(n).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, max_num_fields=8).items()}

    def _login(self, method: str,
               environ: dict[str, Any]) -> tuple[str, bytes, str, list[tuple[str, str]]]:
        if method in ("GET", "HEAD"):
            return self._login_form(environ, "", "200 OK")
        if method != "POST":
            raise _Reply("405 Method Not Allowed", b"GET or POST\n",
                         headers=[("Allow", "GET, HEAD, POST")])
        form = self._form(environ)
        if not auth.same(self._cookie(environ, LOGIN_COOKIE), form.get("csrf", "")):
            return self._login_form(environ, "the form expired: log in again", "403 Forbidden")
        address = environ.get("REMOTE_ADDR", "?")
        with self._connect() as conn:
            v = auth.login(conn, form.get("name", ""), form.get("password", ""), address,
                           now=self.clock(), session_s=self.session_s)
        if v.token is None:
            status = "429 Too Many Requests" if v.retry_s else "401 Unauthorized"
            extra = [("Retry-After", str(v.retry_s))] if v.retry_s else []
            st, body, ct, h = self._login_form(environ, v.refused, status)
            return st, body, ct, h + extra
        return "303 See Other", b"logged in\n", _TEXT, [
            ("Location", "/"), self._set_cookie(environ, COOKIE, v.token, int(self.session_s)),
            self._set_cookie(environ, LOGIN_COOKIE, "", 0)]

    def _login_form(self, environ: dict[str, Any], error: str,
                    status: str) -> tuple[str, bytes, str, list[tuple[str, str]]]:
        token = secrets.token_urlsafe(24)  # a new double-submit token with every form
        body = self._render("login.html", csrf=token, error=error, op=None)
        return status, body, _HTML, [self._set_cookie(environ, LOGIN_COOKIE, token, 3600)]

    def _logout(self, environ: dict[str, Any]) -> tuple[str, bytes, str, list[tuple[str, str]]]:
        form = self._form(environ)
        token = self._cookie(environ, COOKIE)
        with self._connect() as conn:
            s = self._session(conn, environ, page=False)
            if not auth.same(s.csrf, form.get("csrf", "")):
                raise _Reply("403 Forbidden", b"the form expired: reload the page\n")
            auth.logout(conn, token)
        log.info("operator %s logged out", s.operator)
        return "303 See Other", b"logged out\n", _TEXT, [
            ("Location", "/login"), self._set_cookie(environ, COOKIE, "", 0)]

    def _render(self, template: str, **ctx: Any) -> bytes:
        return self.env.get_template(template).render(**ctx).encode()
