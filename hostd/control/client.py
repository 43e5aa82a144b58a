"""The client side of hostd's control socket (control.py serves it), and its errors.

Wire: one JSON request per line, {"id", "cmd", "args"}; one reply line each, answered in order,
{"id", "ok": true, "result"} or {"id", "ok": false, "error": {"kind", "message"}}.

Rules this module keeps:
- Every failure is a ControlError with a kind the CLI maps to an exit code: the server's kinds
  as sent, plus not_running (HostdNotRunning: nothing listens), forbidden (no permission on the
  socket), timeout, and internal (lost connection, a reply that is not JSON or over MAX_LINE).
- No server code here: tools that only ask hostd import this module alone.
- A connection hostd closed while it sat idle (server.py's idle deadline) is reopened before
  the next request, never reported as an error: nothing was lost, no request was in flight.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from pathlib import Path
from typing import Any

MAX_LINE = 64 * 1024  # one request or response line, newline excluded
DEFAULT_SOCKET = "/run/hexiao/hostd.sock"  # as hostd/config/__init__.py's control_socket default
START_HINT = "start it with `systemctl start hexiao-hostd` or `hexiao-hostd --config FILE`"


def default_socket() -> Path:
    return Path(os.environ.get("HEXIAO_SOCKET") or DEFAULT_SOCKET)


class ControlError(Exception):
    """An error with a kind the CLI maps to an exit code; str() is the message alone."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class HostdNotRunning(ControlError):
    def __init__(self, path: str | Path) -> None:
        super().__init__("not_running", f"hostd is not running (no answer on {path}); "
                                        f"{START_HINT}")



class ControlClient:
    """A connection to hostd; call(cmd, **args) returns the result or raises ControlError."""

    def __init__(self, path: str | Path | None = None, timeout: float = 10.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    def _connect(self) -> socket.socket:
        if self._sock is not None and not self._buf and self._hung_up(0):
            self.close()  # hostd closed it while idle: a new connection, same as the first
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                raise HostdNotRunning(self.path) from None
            except PermissionError:
                sock.close()
                raise ControlError("forbidden", f"permission denied on {self.path}: run as root "
                                                f"or join the socket's group") from None
            self._sock = sock
        return self._sock

    def call(self, cmd: str, **args: Any) -> Any:
        sock = self._connect()
        self._next_id += 1
        rid = self._next_id
        req = {"id": rid, "cmd": cmd, "args": {k: v for k, v in args.items() if v is not None}}
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps(req).encode() + b"\n")  # a refusal may be waiting
            line = self._readline(sock)
        except TimeoutError:
            self.close()
            raise ControlError("timeout", f"hostd did not answer {cmd} within "
                                          f"{self.timeout:g} s ({self.path})") from None
        except OSError as e:
            self.close()
            raise ControlError("internal", f"lost the connection to hostd ({self.path}): "
                                           f"{e.strerror or e}") from None
        try:
            resp = json.loads(line)
        except ValueError:
            raise ControlError("internal", f"hostd sent a reply that is not JSON ({self.path})") \
                from None
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise ControlError(str(err.get("kind", "internal")), str(err.get("message", "")))
        if resp.get("id") != rid:
            raise ControlError("internal", f"hostd answered request {resp.get('id')}, not {rid}")
        return resp.get("result")

    def _readline(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise ControlError("internal", f"hostd's reply is over {MAX_LINE} bytes")
            data = sock.recv(65536)
            if not data:
                self.close()
                raise ControlError("internal", f"hostd closed the connection ({self.path})")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _hung_up(self, timeout: float | None) -> bool:
        """Whether hostd has closed this connection (waiting up to timeout; None: forever).
        Between requests hostd sends nothing, so anything readable is its hang-up."""
        assert self._sock is not None
        ready, _, _ = select.select([self._sock], [], [], timeout)
        return bool(ready)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait, between requests, until hostd closes the connection (True) or timeout passes
        (False); e.g. a capture's client waiting for its end."""
        return self._hung_up(timeout) if self._sock is not None else True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
