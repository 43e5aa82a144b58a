"""hostd's control socket: line-delimited JSON over a Unix stream socket (the server side).

Request  {"id": N, "cmd": "device.health", "args": {"device": "lane-1"}}
Response {"id": N, "ok": true, "result": ...}
      or {"id": N, "ok": false, "error": {"kind": KIND, "message": TEXT}}

One connection may carry many requests, answered in order. Kinds: bad_request (not JSON, a line
over MAX_LINE, nesting too deep, NaN, an id that is not a number or a string, bad args),
unknown_command, forbidden (peer not allowed), unavailable (too many connections), and from the
handlers not_found, unavailable, timeout, internal. A handler crash is logged with its traceback
and reaches the client as "internal" with no detail of the code. Every reply is valid JSON.

Who may connect (SO_PEERCRED, per connection): root, the daemon's own uid, and members of the
socket's group. The socket file's mode (0660) already keeps others out; the credential check
also covers a socket reached some other way (a bind mount, a loosened mode).

Hostile clients (rules this module keeps):
- a refused peer gets its one-line answer and is closed at once, on the accept thread: it never
  holds a connection slot or a thread, however it trickles;
- group members share MAX_CONNECTIONS; root and hostd's own user have MAX_PRIVILEGED of their
  own, so a full server never locks out root's CLI;
- each request line must arrive whole within idle_s (IDLE_S) of the previous answer (or of the
  connect): idle and trickling connections are closed. A connection that holds something it
  started (a capture, commands.Session) may wait without a deadline, and when it ends, what it
  holds is released (the capture stops);
- a peer that does not read its answers is dropped once a send has waited idle_s.

One daemon per socket: a flock on "<path>.lock" is held while serving, and an existing socket is
removed only if nothing answers on it, so a second hostd refuses instead of stealing the path.

The commands and their argument checks live in commands.py, hostd's answers in handlers.py; the
client (ControlClient), the errors and the shared limits in client.py; re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import math
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hexiao.hostd.control.client import (
    DEFAULT_SOCKET,
    MAX_LINE,
    START_HINT,
    ControlClient,
    ControlError,
    HostdNotRunning,
    default_socket,
)
from hexiao.hostd.control.commands import (
    COMMANDS,
    HANDLER_KINDS,
    SESSION_COMMANDS,
    Handlers,
    Session,
    check_args,
)
from hexiao.hostd.instance import InstanceError, PidLock

log = logging.getLogger("hexiao.control")

MAX_CONNECTIONS = 32  # from group members
MAX_PRIVILEGED = 8  # root and hostd's own user, beside the others
IDLE_S = 10.0  # to send a whole request line after connecting or after an answer
_REFUSAL_LOG_S = 60.0  # one log line per refused uid per minute: a flood must not fill the log


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def _gid_of(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ControlError("bad_request", f"control socket group {name!r} does not exist; "
                                          f"create it (groupadd {name}) or set another") from None


def _groups_of(peer: Peer) -> set[int]:
    """The peer process's groups (primary and supplementary), from /proc on Linux."""
    groups = {peer.gid}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{peer.pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups.update(int(g) for g in line.split()[1:])
    return groups


class ControlServer:
    """Serves `handlers` on a Unix socket at `path`, one thread per connection."""

    def __init__(self, path: str | Path, handlers: Handlers, *, group: str | int | None = None,
                 mode: int = 0o660, peer_check: Callable[[Peer], bool] | None = None,
                 privileged: Callable[[Peer], bool] | None = None,
                 idle_s: float = IDLE_S) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.group = group
        self.mode = mode
        self.peer_check = peer_check or self._allowed
        self.privileged = privileged or (lambda p: p.uid in (0, os.geteuid()))
        self.idle_s = idle_s
        self._refusals: dict[tuple[str, int], float] = {}  # (what, uid) -> when last logged
        self._gid = -1
        self._sock: socket.socket | None = None
        self._lock: PidLock | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, bool] = {}  # -> privileged
        self._mu = threading.Lock()

    def start(self) -> ControlServer:
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o750)
        self._take_lock()
        try:
            self._clear_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            self._release_lock()
            raise
        try:
            sock.bind(str(self.path))
            sock.listen(64)
            if self.group is not None:
                self._gid = (self.group if isinstance(self.group, int)
                             else _gid_of(self.group))
                os.chown(self.path, -1, self._gid)
            else:
                self._gid = os.stat(self.path).st_gid
            os.chmod(self.path, self.mode)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # ours: we hold the lock and cleared the path before bind
            self._release_lock()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                        name="hexiao-control", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, hang up on clients, remove the socket. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        sock.close()
        with self._mu:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._release_lock()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one daemon per path ------------------------------------------------------------------

    def _take_lock(self) -> None:
        # the same flock as one hostd per journal (hostd/instance.py); the message stays ours
        where = str(self.path).replace("{", "{{").replace("}", "}}")  # a format template
        lock = PidLock(self.path.with_name(self.path.name + ".lock"),
                       f"another hostd is already serving {where}")
        try:
            self._lock = lock.acquire()
        except InstanceError as e:
            raise ControlError("in_use", str(e)) from None

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()  # never unlinks the lock file: that would race a new owner
            self._lock = None

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError("in_use", f"{self.path} exists and is not a socket; remove it or "
                                         f"set another control_socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            self.path.unlink(missing_ok=True)  # stale: left by a daemon that died
            return
        finally:
            probe.close()
        raise ControlError("in_use", f"another hostd is already serving {self.path}")

    # -- serving ------------------------------------------------------------------------------

    def _allowed(self, peer: Peer) -> bool:
        return peer.uid in (0, os.geteuid()) or self._gid in _groups_of(peer)

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = sock.accept()
                peer = peer_of(conn)
            except OSError:
                continue
            if not self.peer_check(peer):
                self._log_limited("refused", peer)
                _refuse(conn, _error(None, "forbidden", (
                    f"uid {peer.uid} may not use {self.path}: run as root or as hostd's user, "
                    f"or join the socket's group (gid {self._gid})")))
                continue
            privileged = self.privileged(peer)
            with self._mu:
                room = MAX_PRIVILEGED if privileged else MAX_CONNECTIONS
                if sum(p == privileged for p in self._conns.values()) >= room:
                    full = True
                else:
                    full = False
                    self._conns[conn] = privileged
            if full:
                self._log_limited("too many connections; refused", peer)
                _refuse(conn, _error(None, "unavailable", "hostd is serving too many control "
                                                          "connections; try again"))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="hexiao-control-conn",
                             daemon=True).start()

    def _log_limited(self, what: str, peer: Peer) -> None:
        now = time.monotonic()
        key = (what, peer.uid)
        if now - self._refusals.get(key, -_REFUSAL_LOG_S) >= _REFUSAL_LOG_S:
            if len(self._refusals) > 1024:
                self._refusals.clear()
            self._refusals[key] = now
            log.warning("control: %s uid %d (pid %d); more of these within %g s are not logged",
                        what, peer.uid, peer.pid, _REFUSAL_LOG_S)

    def _serve(self, conn: socket.socket) -> None:
        session = Session()
        try:
            for line in self._requests(conn, session):
                conn.settimeout(self.idle_s)  # a peer that does not read is dropped
                if line is None:
                    _send(conn, _error(None, "bad_request",
                                       f"request line longer than {MAX_LINE} bytes"))
                    _hang_up(conn, self.idle_s)
                    return
                if line.strip():
                    _send(conn, self.answer(line, session))
        except OSError:
            pass  # the client went away, or stopped reading
        finally:
            session.close()  # what this connection started ends with it
            with self._mu:
                self._conns.pop(conn, None)
            conn.close()

    def _requests(self, conn: socket.socket, session: Session) -> Iterator[bytes | None]:
        """Each request line (no newline), each whole within idle_s of the last answer; None
        once a line passes MAX_LINE. Ends at EOF, or at the deadline unless the session holds
        something (then the deadline starts again)."""
        buf = b""
        deadline = time.monotonic() + self.idle_s
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                if nl > MAX_LINE:
                    yield None
                    return
                line, buf = buf[:nl], buf[nl + 1:]
                yield line
                deadline = time.monotonic() + self.idle_s  # from the answer on
                continue
            if len(buf) > MAX_LINE:
                yield None
                return
            left = deadline - time.monotonic()
            if left <= 0:
                if not session.holding():
                    log.info("control: closed a connection idle for %g s", self.idle_s)
                    return
                deadline = time.monotonic() + self.idle_s
                continue
            conn.settimeout(left)
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            buf += data

    def answer(self, line: bytes, session: Session | None = None) -> bytes:
        """One request line -> one response line (without the newline). `session`: the
        connection, for SESSION_COMMANDS (None: what they start lasts until stopped)."""
        try:
            req = json.loads(line, parse_constant=_no_constant)
        except RecursionError:
            return _error(None, "bad_request", "request is nested too deeply")
        except _NotJSON:
            return _error(None, "bad_request", "request is not JSON (NaN and Infinity are not "
                                               "JSON numbers)")
        except ValueError:
            return _error(None, "bad_request", "request is not JSON")
        rid = req.get("id") if isinstance(req, dict) else None
        if not _valid_id(rid):
            return _error(None, "bad_request", "id must be a number or a string of at most "
                                               "128 characters")
        try:
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ControlError("bad_request", 'request must be {"id", "cmd", "args"}')
            cmd = req["cmd"]
            args = check_args(cmd, req.get("args", {}))
            if cmd in SESSION_COMMANDS and session is not None:
                args["session"] = session
            result = getattr(self.handlers, cmd.replace(".", "_"))(**args)
            return _encode({"id": rid, "ok": True, "result": result})
        except ControlError as e:
            kind = e.kind if e.kind in HANDLER_KINDS | {"unknown_command"} else "internal"
            return _error(rid, kind, e.message)
        except Exception:
            log.exception("control: %s failed", req.get("cmd"))
            return _error(rid, "internal", f"hostd failed on {req.get('cmd')}; see its log")


class _NotJSON(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJSON(name)  # NaN, Infinity: Python reads them, JSON has none, so no reply could


def _valid_id(rid: Any) -> bool:
    """An id we can echo back as JSON: null, a finite number (1e999 reads as inf), or text."""
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool)):
        return True
    if isinstance(rid, float):
        return math.isfinite(rid)
    return isinstance(rid, str) and len(rid) <= 128


def _encode(obj: Any) -> bytes:
    try:
        out = json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                         allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError):
        log.exception("control: result is not JSON")
        return _error(obj.get("id"), "internal", "hostd produced a result it cannot send")
    if len(out) > MAX_LINE:
        return _error(obj.get("id"), "internal", f"result larger than {MAX_LINE} bytes")
    return out


def _error(rid: Any, kind: str, message: str) -> bytes:
    return json.dumps({"id": rid, "ok": False, "error": {"kind": kind, "message": message}},
                      ensure_ascii=False, allow_nan=False).encode()


def _send(conn: socket.socket, line: bytes) -> None:
    conn.sendall(line + b"\n")


def _refuse(conn: socket.socket, line: bytes) -> None:
    """Answer once and close now, never waiting on the peer. On a Unix socket the answer stays
    in the peer's queue and is read before the reset that unread input causes."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(line + b"\n")
    conn.close()


def _hang_up(conn: socket.socket, within: float) -> None:
    """Close after an error answer to an allowed peer without losing it: closing with unread
    input would reset the connection and the client could lose the answer, so read to its EOF
    first, for at most `within` seconds and 4 lines' worth."""
    conn.shutdown(socket.SHUT_WR)
    end = time.monotonic() + within
    with contextlib.suppress(OSError):
        for _ in range(4 * MAX_LINE // 65536):
            left = end - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            if not conn.recv(65536):
                break


__all__ = ["COMMANDS", "DEFAULT_SOCKET", "HANDLER_KINDS", "IDLE_S", "MAX_CONNECTIONS", "MAX_LINE",
           "MAX_PRIVILEGED", "START_HINT", "ControlClient", "ControlError", "ControlServer",
           "Handlers", "HostdNotRunning", "Peer", "Session", "check_args", "default_socket",
           "peer_of"]
