"""A WeChat card API simulator: a real HTTP server on loopback (`hexiao sim wechat`).

The rules live in state.py (no I/O) and the seed format in seed.py; this module
is the HTTP layer: the standard library's ThreadingHTTPServer (one thread per connection, HTTP/1.1
keep-alive), injected latency, dropped replies, and a log that never shows a query string (it
carries the secret and the access_token) nor a coupon code.

    with WeChatSim(seed_dict) as sim:      # port 0: a free port; sim.url is http://127.0.0.1:N
        httpx.get(f"{sim.url}/cgi-bin/token", params=...)
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

from hexiao.hostd.backends.sim.state import Reply, SimState

HOST = "127.0.0.1"  # loopback only: the seed's secrets are not secret
MAX_BODY = 1 << 20  # the real API takes small JSON bodies
_QUERY = re.compile(r"\?[^\s'\"]*")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up exit
    request_queue_size = 128  # socketserver's 5 resets connections when many lanes connect at once
    sim: WeChatSim

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that gave up (timeout, dropped connection) is normal here, not a server error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hexiao-wechat-sim"
    timeout = 60  # drop idle keep-alive connections eventually
    # one write per reply: headers and body in separate segments cost ~40 ms (Nagle + delayed
    # ACK); http.server flushes after each request
    wbufsize = 1 << 16
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        sim = self.server.sim
        url = urlsplit(self.path)
        body = self._body()
        if body is None:
            reply = Reply(status=411 if self._chunked() else 413, drop=None,
                          body=b'{"error":"send a Content-Length body of at most 1 MiB"}')
            self.close_connection = True
        elif url.path.startswith("/_sim/"):
            reply = sim.state.admin(self.command, url.path, body)
        else:
            delay = sim.state.delay_for(url.path)
            if delay:
                sim.sleep(delay)
            reply = sim.state.api(self.command, url.path, dict(parse_qsl(url.query)), body)
        if reply.delay:
            sim.sleep(reply.delay)
        sim.log_line(self.command, url.path, reply)
        if reply.drop == "close":
            self.close_connection = True  # the state change is committed; the reply is lost
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def version_string(self) -> str:
        return self.server_version

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body(self) -> bytes | None:
        if self._chunked():
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY:
            return None
        return self.rfile.read(length)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the default line holds the query string (secret, access_token): log_line instead

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own errors quote the request line: cut its query string out
        note = _QUERY.sub("?...", format % args)[:200]
        self.server.sim.log_line(self.command or "-", note, None)


class WeChatSim:
    """The simulator server. start() serves in a thread; stop() shuts down; or use `with`."""

    def __init__(self, seed: Any, *, port: int = 0, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None, log: TextIO | None = None) -> None:
        self.state = SimState(seed, clock)  # SeedError before any socket is opened
        self._stop = threading.Event()
        # the default sleep wakes up at stop(), so shutdown never waits out injected latency
        self.sleep: Callable[[float], None] = sleep or self._wait
        self._log = log
        self._log_lock = threading.Lock()
        self._httpd = _Server((HOST, port), _Handler)  # OSError if the port is taken
        self._httpd.sim = self
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread: threading.Thread | None = None

    def _wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def log_line(self, method: str, path: str, reply: Reply | None) -> None:
        if self._log is None:
            return
        outcome = ""
        if reply is not None:
            outcome = "reply dropped" if reply.drop else str(reply.status)
            if reply.errcode is not None and not reply.drop:
                outcome += f" errcode={reply.errcode}"
        with self._log_lock:
            self._log.write(f"{time.strftime('%H:%M:%S')} {method} {path} {outcome}\n")
            self._log.flush()

    def start(self) -> WeChatSim:
        # stop() waits up to one poll interval; 20 ms keeps test teardown quick at no real cost
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.02}, name="wechat-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> WeChatSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

