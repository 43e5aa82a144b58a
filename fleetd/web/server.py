"""Headquarters' page served by waitress in its own process (`hexiao-fleetd web`).

Rules this module keeps:
- its own process, not a thread of `hexiao-fleetd run`: the page only reads PostgreSQL (a read
  replica will do), runs once while fleetd runs as N instances, and a slow page or a burst of
  browsers never takes CPU or a connection from the consumer that acknowledges records;
- loopback by default; TLS is terminated by a proxy in front (docs/fleet-deployment.md). Only
  a proxy named with `trusted_proxy` may set X-Forwarded-For/-Proto (the address the login
  backoff counts, and https for Secure cookies); such headers from anyone else are dropped;
- few threads and connections (operators, not the public), idle connections dropped;
- SIGTERM and SIGINT stop it cleanly (the listening socket closed, exit 0).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from hexiao.hostd.web.server import is_loopback, split_listen
from waitress.server import create_server

log = logging.getLogger("hexiao.fleetd.web")

DEFAULT_LISTEN = "127.0.0.1:8790"
THREADS = 4
CONNECTION_LIMIT = 64
CHANNEL_TIMEOUT_S = 30


def create(app: Any, listen: str, trusted_proxy: str | None = None) -> Any:
    """A waitress server for `app` on HOST:PORT (port 0: a free one); raises OSError/ValueError
    when it cannot listen."""
    host, port = split_listen(listen)
    proxy: dict[str, Any] = {}
    if trusted_proxy:
        proxy = {"trusted_proxy": trusted_proxy, "trusted_proxy_count": 1,
                 "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"}}
    return create_server(app, host=host, port=port, threads=THREADS,
                         connection_limit=CONNECTION_LIMIT, channel_timeout=CHANNEL_TIMEOUT_S,
                         ident="hexiao-fleetd", clear_untrusted_proxy_headers=True, **proxy)


def url(server: Any) -> str:
    host, port = server.effective_host, server.effective_port
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def run(server: Any) -> None:
    """Serve until SIGTERM or SIGINT."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    where = url(server)
    if is_loopback(server.effective_host):
        log.info("headquarters' page on %s", where)
    else:
        log.warning("headquarters' page on %s: plain HTTP on a network address; put a TLS "
                    "proxy in front (docs/fleet-deployment.md)", where)
    try:
        server.run()
    finally:
        server.task_dispatcher.shutdown(timeout=5)
        server.close()
