"""The status page as a WSGI application: server-rendered HTML, its JSON, its own CSS and JS.

Rules this module keeps:
- GET and HEAD only, four paths: `/` (the page), `/fragment` (the page's live part, fetched by
  page.js every `refresh_s`), `/status.json` (the same data for scripts), `/static/<file>`
  (files shipped in this package; no CDN, nothing fetched from elsewhere);
- Jinja2 with autoescape always on: every value from a device, the backend or the journal is
  untrusted text; a strict Content-Security-Policy (no inline script, nothing from elsewhere)
  is the second line of defence;
- bound to loopback, the page answers only requests whose Host is a loopback name (a web page
  elsewhere cannot read it through DNS rebinding); on an address the config names explicitly
  it answers any Host and has no login (the config docs say so);
- nothing here writes: the page reads the control handlers and changes nothing in hostd;
- a failure while rendering is logged and answered 500 with one line, never a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

import jinja2
from hexiao.hostd.web import view

if TYPE_CHECKING:
    from hexiao.hostd.control.handlers import ControlHandlers

log = logging.getLogger("hexiao.web")

REFRESH_S = 2.0  # page.js refetches the live part this often: a lane offline shows within it
_STATIC = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
           "favicon.svg": "image/svg+xml"}
_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

Start = Callable[[str, list[tuple[str, str]]], Any]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("hexiao.hostd.web", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def _static(name: str) -> bytes | None:
    if name not in _STATIC:  # a fixed list: no path from the request reaches the file system
        return None
    return resources.files("hexiao.hostd.web").joinpath("static", name).read_bytes()


class StatusApp:
    """The WSGI application; `loopback_only` turns the Host check on (see the rules)."""

    def __init__(self, handlers: ControlHandlers, *, loopback_only: bool,
                 refresh_s: float = REFRESH_S, bound: str = "") -> None:
        self.handlers, self.loopback_only, self.refresh_s = handlers, loopback_only, refresh_s
        # the names a loopback page answers to: the usual ones and the address it is bound to
        self.names = {*LOOPBACK_NAMES, bound.lower(), f"[{bound.lower()}]"} - {"", "[]"}
        self.env = _env()
        self.statics = {name: _static(name) for name in _STATIC}

    def __call__(self, environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        out = self._route(environ, start)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else out

    def _route(self, environ: dict[str, Any], start: Start) -> list[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        if method not in ("GET", "HEAD"):
            return self._reply(start, "405 Method Not Allowed", b"this page only reads\n",
                               "text/plain; charset=utf-8", [("Allow", "GET, HEAD")])
        if self.loopback_only and not self._host_ok(environ.get("HTTP_HOST", "")):
            return self._reply(start, "421 Misdirected Request",
                               b"this page answers only to localhost\n",
                               "text/plain; charset=utf-8")
        try:
            if path == "/":
                return self._html(start, "page.html")
            if path == "/fragment":
                return self._html(start, "live.html")
            if path == "/status.json":
                body = json.dumps(self._snapshot(), ensure_ascii=False).encode()
                return self._reply(start, "200 OK", body, "application/json")
            if path.startswith("/static/") and (data := self.statics.get(path[8:])) is not None:
                return self._reply(start, "200 OK", data, _STATIC[path[8:]])
        except Exception:
            log.exception("status page: %s failed", path)
            return self._reply(start, "500 Internal Server Error",
                               b"the status page failed; hostd's log has the reason\n",
                               "text/plain; charset=utf-8")
        return self._reply(start, "404 Not Found", b"no such page: try /\n",
                           "text/plain; charset=utf-8")

    def _host_ok(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower() in self.names

    def _snapshot(self) -> dict[str, Any]:
        return view.snapshot(self.handlers, refresh_s=self.refresh_s)

    def _html(self, start: Start, template: str) -> list[bytes]:
        body = self.env.get_template(template).render(s=self._snapshot()).encode()
        return self._reply(start, "200 OK", body, "text/html; charset=utf-8")

    def _reply(self, start: Start, status: str, body: bytes, ctype: str,
               extra: list[tuple[str, str]] | None = None) -> list[bytes]:
        start(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                       *_HEADERS, *(extra or [])])
        return [body]
