"""The status page's server: waitress in one thread of hostd, on `[hostd] web_listen`.

Rules this module keeps:
- loopback by default ("127.0.0.1:8780"); any other address only because the config names it,
  and then a warning says at start that the page has no login;
- the page is not part of redemption: start() never raises; an address in use or refused is
  logged with what to change, and hostd goes on without the page (printing, redemption and
  the control socket never wait on it);
- waitress's loop runs in the server's own thread, which is also the one that closes it (its
  socket map is not thread-safe): stop() asks and wakes it, then joins it, bounded;
- few threads and connections (a status page for a shop's IT person, not a web site), idle
  connections dropped after CHANNEL_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Any

from hexiao.hostd.web.app import REFRESH_S, StatusApp
from waitress import wasyncore
from waitress.server import create_server

if TYPE_CHECKING:
    from hexiao.hostd.control.handlers import ControlHandlers

log = logging.getLogger("hexiao.web")

DEFAULT_LISTEN = "127.0.0.1:8780"
THREADS = 2
CONNECTION_LIMIT = 32
CHANNEL_TIMEOUT_S = 30


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT (checked by the config) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve anywhere
        return False


class StatusPage:
    """The page served in a thread; `url` once started (None if it could not listen)."""

    def __init__(self, handlers: ControlHandlers, listen: str = DEFAULT_LISTEN, *,
                 refresh_s: float = REFRESH_S) -> None:
        self.listen = listen
        self.host, self.port = split_listen(listen)
        self.loopback = is_loopback(self.host)
        self.app = StatusApp(handlers, loopback_only=self.loopback, refresh_s=refresh_s,
                             bound=self.host)
        self.url: str | None = None
        self.error: str | None = None
        self._server: Any = None
        self._map: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StatusPage:
        try:
            self._server = create_server(
                self.app, map=self._map, host=self.host, port=self.port, threads=THREADS,
                connection_limit=CONNECTION_LIMIT, channel_timeout=CHANNEL_TIMEOUT_S,
                ident="hexiao-hostd", clear_untrusted_proxy_headers=True)
        except (OSError, ValueError, OverflowError) as e:  # in use, refused, no such host
            wasyncore.close_all(self._map)
            self.error = f"status page: cannot listen on {self.listen}: {e}; set [hostd] " \
                         f"web_listen to a free HOST:PORT, or \"\" for no page"
            log.error("%s", self.error)
            return self
        host, port = self._server.effective_host, self._server.effective_port
        self.port = int(port)
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        self._thread = threading.Thread(target=self._run, name="hexiao-web", daemon=True)
        self._thread.start()
        if self.loopback:
            log.info("status page on %s", self.url)
        else:
            log.warning("status page on %s has no login: anyone who can reach this address "
                        "sees the lanes and the journal (config [hostd] web_listen)", self.url)
        return self

    def _run(self) -> None:
        server = self._server
        try:
            while not self._stop.is_set() and self._map:
                # one poll at a time: stop() is seen within a poll (it pulls the trigger)
                wasyncore.loop(timeout=1.0, map=self._map, count=1)
        finally:
            server.task_dispatcher.shutdown(timeout=5)
            wasyncore.close_all(self._map)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        server = self._server
        if server is not None:
            with contextlib.suppress(OSError):  # closed already: the loop has ended
                server.pull_trigger()
        self._thread.join(10)
        self._thread = None
