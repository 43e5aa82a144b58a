"""hostd's control socket (hostd/control/server.py) and the CLI on it (tools/support/ctl.py).

A real server on a Unix socket in tmp_path with a fake Handlers object (this tests the socket
layer, not the daemon), the real SO_PEERCRED path, a real second uid when run as root, and the
CLI's direct mode against the MicroPython sim peer over a pty."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from hexiao.hostd.config import load
from hexiao.hostd.control.server import (
    MAX_CONNECTIONS,
    MAX_LINE,
    ControlClient,
    ControlError,
    ControlServer,
    HostdNotRunning,
    Peer,
    Session,
    default_socket,
)
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.lanes.discovery import known_boards
from hexiao.tools import micropython
from hexiao.tools.sim import relay
from hexiao.tools.support import ctl
from serial.tools import list_ports

KNOWN = "lane-1"
ENTRY = {"id": 7, "state": "consumed", "code": "********9012", "lane": KNOWN}
LOCK = "/dev/hexiao/B2: could not lock port: [Errno 11] Resource temporarily unavailable"


def lane_info(device: str, state: str, port: str | None, error: str = "") -> dict[str, Any]:
    """What hostd's DeviceLane.info() answers (lane.py), peer and counters included."""
    peer = {"version": 1, "kid": device, "firmware": "hexiao-fw 0.1.0", "board": "sim",
            "reset_cause": "power_on"} if state == "open" else None
    return {"id": device, "lane": device, "state": state, "port": port, "peer": peer,
            "error": error, "counters": {"tx_frames": 5, "rx_frames": 5, "sessions": 1}
            if peer else {}, "stats": {"sessions": 1, "scans": 1, "verdict_accepted": 1},
            "queued": 0}


class FakeHandlers:
    """Answers like a daemon with one device (lane-1) and one journal entry (7)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sessions: list[Session | None] = []
        self.capturing: set[str] = set()
        self.released: list[str] = []

    def _dev(self, name: str, device: str, **kw: Any) -> None:
        self.calls.append((name, {"device": device, **kw}))
        if device == "offline-1":
            raise ControlError("unavailable", "device offline-1 is not connected")
        if device == "slow-1":
            raise ControlError("timeout", "device slow-1 did not answer within 2 s")
        if device == "boom":
            raise RuntimeError("secret-internal-detail")
        if device == "weird":
            raise ControlError("no_such_kind", "odd")
        if device != KNOWN:
            raise ControlError("not_found", f"no device {device!r}; see `hexiao device list`")

    def status(self) -> dict[str, Any]:
        self.calls.append(("status", {}))
        return {"version": "0.1", "devices": {"connected": 1, "known": 2}, "journal": "ok"}

    def device_list(self) -> list[dict[str, Any]]:
        self.calls.append(("device_list", {}))
        return [lane_info(KNOWN, "open", "/dev/hexiao/A1"),
                lane_info("lane-22", "waiting", None, LOCK * 3)]

    def device_info(self, device: str) -> dict[str, Any]:
        self._dev("device_info", device)
        return lane_info(device, "open", "/dev/hexiao/A1")

    def device_ping(self, device: str) -> dict[str, Any]:
        self._dev("device_ping", device)
        return {"device": device, "rtt_ms": 3.5}

    def device_health(self, device: str) -> dict[str, Any]:
        self._dev("device_health", device)
        # as hostd passes the device's health on: link counters by number, its type kept
        return {"type": "health", "uptime_ms": 9134, "reset_cause": "power_on",
                "heap_free": 3808, "link": {64: 10, 65: 15, 68: 1, 11: 2}, "app": {}}

    def device_logs(self, device: str, since: int | None = None,
                    max: int | None = None) -> dict[str, Any]:
        self._dev("device_logs", device, since=since, max=max)
        # as hostd passes the device's logs on: [seq, uptime_ms, level, event]
        return {"type": "logs", "entries": [[4, 6603, 6, "session open"],
                                            [5, 3_723_004, 5, "closed: host_lost"]], "next": 6}

    def journal_list(self, state: list[str] | None = None,
                     limit: int = 50) -> list[dict[str, Any]]:
        self.calls.append(("journal_list", {"state": state, "limit": limit}))
        return [ENTRY]

    def journal_show(self, entry_id: int) -> dict[str, Any]:
        self.calls.append(("journal_show", {"entry_id": entry_id}))
        if entry_id != 7:
            raise ControlError("not_found", f"no journal entry {entry_id}")
        return {**ENTRY, "steps": [{"step": "check", "at": 1}, {"step": "consume", "at": 2}]}

    def journal_reconcile(self) -> dict[str, Any]:
        self.calls.append(("journal_reconcile", {}))
        return {"reconciled": 2, "verify_manually": 0}

    def capture_start(self, device: str, path: str,
                      session: Session | None = None) -> dict[str, Any]:
        self._dev("capture_start", device, path=path)
        self.sessions.append(session)
        if session is not None:
            session.hold(FakeCapture(self, device))
        self.capturing.add(device)
        return {"device": device, "path": path}

    def capture_stop(self, device: str) -> dict[str, Any]:
        self._dev("capture_stop", device)
        self.capturing.discard(device)
        return {"device": device, "frames": 12}


class FakeCapture:
    """A capture held by the connection that started it (commands.Hold)."""

    def __init__(self, fake: FakeHandlers, device: str) -> None:
        self.fake, self.device = fake, device

    def active(self) -> bool:
        return self.device in self.fake.capturing

    def release(self) -> None:  # a no-op once stopped, as the real one
        if self.active():
            self.fake.released.append(self.device)
            self.fake.capturing.discard(self.device)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, FakeHandlers]]:
    path = tmp_path / "run" / "hostd.sock"
    fake = FakeHandlers()
    with ControlServer(path, fake):
        yield path, fake


@pytest.fixture
def served_fast(tmp_path: Path) -> Iterator[tuple[Path, FakeHandlers]]:
    """A server whose idle deadline is short."""
    path = tmp_path / "run" / "hostd.sock"
    fake = FakeHandlers()
    with ControlServer(path, fake, idle_s=0.3):
        yield path, fake


def cli(*args: str) -> Any:
    group = {"status": ctl.status_main, "device": ctl.device_main, "journal": ctl.journal_main}
    r = CliRunner().invoke(group[args[0]], list(args[1:]))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a crash is a failure with its traceback, not an exit code
    return r


def raw(path: Path, *lines: bytes, parse: Any = json.loads) -> list[Any]:
    """Send raw lines on one connection; every response line until the server hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"".join(lines))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [parse(x) for x in data.splitlines()]


# -- every command through the client ------------------------------------------------------------


def test_every_command_through_one_client_connection(served: tuple[Path, FakeHandlers]) -> None:
    path, fake = served
    with ControlClient(path) as c:
        assert c.call("status")["devices"] == {"connected": 1, "known": 2}
        assert [d["id"] for d in c.call("device.list")] == [KNOWN, "lane-22"]
        assert c.call("device.info", device=KNOWN)["peer"]["board"] == "sim"
        assert c.call("device.ping", device=KNOWN)["rtt_ms"] == 3.5
        assert c.call("device.health", device=KNOWN)["link"]["64"] == 10
        assert c.call("device.logs", device=KNOWN, since=4, max=3)["next"] == 6
        assert c.call("journal.list", state=["consumed", "sent"], limit=5) == [ENTRY]
        assert c.call("journal.show", entry_id=7)["steps"][1]["step"] == "consume"
        assert c.call("journal.reconcile") == {"reconciled": 2, "verify_manually": 0}
        assert c.call("capture.start", device=KNOWN, path="/tmp/x.cap")["path"] == "/tmp/x.cap"
        assert c.call("capture.stop", device=KNOWN)["frames"] == 12
        first = c._sock
        assert first is not None
    assert fake.calls == [
        ("status", {}), ("device_list", {}), ("device_info", {"device": KNOWN}),
        ("device_ping", {"device": KNOWN}), ("device_health", {"device": KNOWN}),
        ("device_logs", {"device": KNOWN, "since": 4, "max": 3}),
        ("journal_list", {"state": ["consumed", "sent"], "limit": 5}),
        ("journal_show", {"entry_id": 7}), ("journal_reconcile", {}),
        ("capture_start", {"device": KNOWN, "path": "/tmp/x.cap"}),
        ("capture_stop", {"device": KNOWN})]


def test_optional_args_left_out_reach_the_handler_as_defaults(served) -> None:
    path, fake = served
    with ControlClient(path) as c:
        c.call("device.logs", device=KNOWN)
        c.call("journal.list")
    assert fake.calls == [("device_logs", {"device": KNOWN, "since": None, "max": None}),
                          ("journal_list", {"state": None, "limit": 50})]


@pytest.mark.parametrize(("device", "kind", "message"), [
    ("nope", "not_found", "no device 'nope'; see `hexiao device list`"),
    ("offline-1", "unavailable", "device offline-1 is not connected"),
    ("slow-1", "timeout", "device slow-1 did not answer within 2 s"),
    ("boom", "internal", "hostd failed on device.health; see its log"),
    ("weird", "internal", "odd"),
])
def test_handler_errors_reach_the_client_by_kind(served, caplog, device, kind, message) -> None:
    path, _ = served
    with caplog.at_level(logging.ERROR, "hexiao.control"), ControlClient(path) as c:
        with pytest.raises(ControlError) as e:
            c.call("device.health", device=device)
        assert (e.value.kind, str(e.value)) == (kind, message)
        assert c.call("status")["journal"] == "ok"  # the connection is still good
    if device == "boom":  # the traceback is in hostd's log, never sent to the client
        assert "secret-internal-detail" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize(("cmd", "args", "kind", "message"), [
    ("device.reboot", {}, "unknown_command", "unknown command 'device.reboot'; known: "
     "capture.start, capture.stop, device.health, device.info, device.list, device.logs, "
     "device.ping, device.update, journal.list, journal.reconcile, journal.show, status"),
    ("device.info", {}, "bad_request", "device.info: missing argument 'device' (a device name)"),
    ("device.info", {"device": 3}, "bad_request",
     "device.info: argument 'device' must be a device name"),
    ("device.info", {"device": KNOWN, "port": "x"}, "bad_request",
     "device.info: unexpected argument 'port'"),
    ("journal.show", {"entry_id": True}, "bad_request",
     "journal.show: argument 'entry_id' must be a journal entry id"),
    ("journal.list", {"limit": -1}, "bad_request",
     "journal.list: argument 'limit' must be a count of 1 or more"),
    ("journal.list", {"limit": 0}, "bad_request",  # [-0:] was every entry
     "journal.list: argument 'limit' must be a count of 1 or more"),
    ("device.logs", {"device": KNOWN, "max": 13}, "bad_request",  # the device answers <= 12
     "device.logs: argument 'max' must be a count from 0 to 12"),
    ("journal.list", {"state": "sent"}, "bad_request",
     "journal.list: argument 'state' must be a list of journal states"),
])
def test_bad_requests_are_refused_by_kind(served, cmd, args, kind, message) -> None:
    path, fake = served
    with ControlClient(path) as c, pytest.raises(ControlError) as e:
        c.call(cmd, **args)
    assert (e.value.kind, str(e.value)) == (kind, message)
    assert fake.calls == []


def test_garbage_and_malformed_lines_then_a_good_one_on_the_same_connection(served) -> None:
    path, _ = served
    out = raw(path, b"not json\n", b"[1, 2]\n", b'{"id": 3, "cmd": 5}\n', b'{"id": 4, "cmd": '
              b'"status", "args": []}\n', b"\n", b'{"id": "x", "cmd": "status"}\n')
    assert out[:4] == [
        {"id": None, "ok": False, "error": {"kind": "bad_request",
                                            "message": "request is not JSON"}},
        {"id": None, "ok": False, "error": {"kind": "bad_request",
                                            "message": 'request must be {"id", "cmd", "args"}'}},
        {"id": 3, "ok": False, "error": {"kind": "bad_request",
                                         "message": 'request must be {"id", "cmd", "args"}'}},
        {"id": 4, "ok": False, "error": {"kind": "bad_request",
                                         "message": "status: args must be a JSON object"}}]
    assert out[4]["id"] == "x" and out[4]["ok"] is True and len(out) == 5  # blank line: no answer


def test_an_oversize_line_is_refused_and_the_connection_closed(served) -> None:
    path, fake = served
    big = b'{"id": 1, "cmd": "status", "args": {"x": "' + b"a" * MAX_LINE + b'"}}\n'
    out = raw(path, big, b'{"id": 2, "cmd": "status"}\n')
    assert out == [{"id": None, "ok": False, "error": {
        "kind": "bad_request", "message": f"request line longer than {MAX_LINE} bytes"}}]
    assert fake.calls == []
    # a line just under the bound is read whole and answered
    ok = b'{"id": 1, "cmd": "status", "args": {}, "pad": "' + b"a" * (MAX_LINE - 100) + b'"}\n'
    assert raw(path, ok)[0]["ok"] is True


def strict(line: bytes) -> Any:
    """Parse as JSON proper: NaN and Infinity are not JSON."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in a reply")
    return json.loads(line, parse_constant=refuse)


def raw_strict(path: Path, *lines: bytes) -> list[Any]:
    return raw(path, *lines, parse=strict)


def test_deep_nesting_nan_and_odd_ids_get_a_clear_json_reply(served, caplog) -> None:
    """Issue 17: "[" * 60000 got no reply (a RecursionError in hostd's log); {"id": NaN} was
    echoed back as invalid JSON."""
    path, fake = served
    with caplog.at_level(logging.DEBUG, "hexiao.control"):
        out = raw_strict(path, b"[" * 60000 + b"\n", b'{"id": NaN, "cmd": "status"}\n',
                         b'{"id": 1e999, "cmd": "status"}\n',
                         b'{"id": {"a": 1}, "cmd": "status"}\n',
                         b'{"id": 5, "cmd": "status", "args": {"x": Infinity}}\n',
                         b'{"id": 6, "cmd": "' + b"x" * 5000 + b'"}\n',
                         b'{"id": 7, "cmd": "status"}\n')
    bad = {"id": None, "ok": False}
    assert out[0] == {**bad, "error": {"kind": "bad_request",
                                       "message": "request is nested too deeply"}}
    nan = {**bad, "error": {"kind": "bad_request", "message": "request is not JSON (NaN and "
                                                              "Infinity are not JSON numbers)"}}
    badid = {**bad, "error": {"kind": "bad_request", "message": "id must be a number or a "
                                                                "string of at most 128 characters"}}
    assert out[1:5] == [nan, badid, badid, nan]
    assert out[5]["id"] == 6 and out[5]["error"]["kind"] == "unknown_command"
    assert len(out[5]["error"]["message"]) < 400  # the 5000-byte name is not echoed whole
    assert out[6] == {"id": 7, "ok": True, "result": fake.status()}  # same connection, fine
    assert "Recursion" not in caplog.text and "Traceback" not in caplog.text


# -- hostile clients: idle, trickling and refused connections (issue 17) ---------------------------

LONG = 30.0  # a guard against hangs, never a performance claim


def root_cli(path: Path) -> subprocess.CompletedProcess[str]:
    """`hexiao status` in a process of its own, as root's CLI runs."""
    return subprocess.run([micropython.executable("hexiao"), "status", "--socket", str(path),
                           "--json", "--timeout", str(LONG)], capture_output=True, text=True,
                          timeout=LONG * 2)


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # blocking: waits for room in the backlog, as a CLI does
    s.settimeout(LONG)
    return s


def read_to_eof(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_full_server_still_lets_root_in(tmp_path: Path) -> None:
    """Issue 17: 32 idle connections locked every client out. Here they are a group member's
    (this process); root's CLI (another process) has room of its own."""
    path = tmp_path / "hostd.sock"
    mine = os.getpid()
    with ControlServer(path, FakeHandlers(), privileged=lambda p: p.pid != mine, idle_s=LONG):
        idle = [connect(path) for _ in range(MAX_CONNECTIONS)]
        try:
            with ControlClient(path) as c, pytest.raises(ControlError) as e:
                c.call("status")  # one more from the group: no room
            assert (e.value.kind, str(e.value)) == (
                "unavailable", "hostd is serving too many control connections; try again")
            r = root_cli(path)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["journal"] == "ok"
        finally:
            for s in idle:
                s.close()


def test_idle_and_trickling_connections_are_closed_at_their_deadline(tmp_path: Path) -> None:
    """A request line must arrive whole within idle_s: an idle connection and one trickling a
    byte at a time are both closed, and their slots come back."""
    path = tmp_path / "hostd.sock"
    with ControlServer(path, FakeHandlers(), privileged=lambda p: False, idle_s=0.3):
        idle = [connect(path) for _ in range(MAX_CONNECTIONS)]
        trickle = idle.pop()
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(400):  # 400 x 0.05 s: far past the deadline, however slow we run
                trickle.sendall(b"{" if sent == 0 else b" ")
                sent += 1
                time.sleep(0.05)
        assert sent < 400  # hung up on mid-line
        assert all(read_to_eof(s) == b"" for s in idle)  # closed, without a word
        for s in [*idle, trickle]:
            s.close()
        with ControlClient(path) as c:  # the slots are free again
            assert c.call("status")["journal"] == "ok"


def test_refused_peers_are_closed_at_once_and_hold_no_slot(tmp_path: Path) -> None:
    """Issue 17: a refused user trickling a byte every 0.9 s on 40 connections held every slot
    (the refusal read on for up to 64 s). Now each is answered and closed on the spot."""
    path = tmp_path / "hostd.sock"
    mine = os.getpid()
    with ControlServer(path, FakeHandlers(), peer_check=lambda p: p.pid != mine,
                       privileged=lambda p: False):
        refused = [connect(path) for _ in range(40)]
        try:
            for s in refused:
                line = s.recv(65536).split(b"\n")[0]
                assert json.loads(line)["error"]["kind"] == "forbidden"
            for s in refused:  # the server no longer reads: a byte more is a broken pipe
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for _ in range(200):
                        s.sendall(b"x")
                        time.sleep(0.01)
            r = root_cli(path)  # not privileged here: it gets in because nothing is held
            assert r.returncode == 0, r.stderr
        finally:
            for s in refused:
                s.close()


def test_a_connection_holding_a_capture_may_idle_and_its_end_releases_it(served_fast) -> None:
    """A capture lives as long as its connection: that connection is exempt from the idle
    deadline while the capture runs, and closing it stops the capture."""
    path, fake = served_fast
    with ControlClient(path) as c:
        c.call("capture.start", device=KNOWN, path="/tmp/x.hxcap")
        time.sleep(1.5)  # five idle deadlines
        assert not c.wait_closed(0)
        assert c.call("capture.stop", device=KNOWN)["frames"] == 12
        assert isinstance(fake.sessions[0], Session)
        assert c.wait_closed(LONG)  # nothing held any more: closed at the deadline
    assert fake.released == []  # stopped by capture.stop: nothing left to release
    c = ControlClient(path)
    c.call("capture.start", device=KNOWN, path="/tmp/y.hxcap")
    c.close()  # the client goes away mid-capture
    end = time.monotonic() + LONG
    while not fake.released and time.monotonic() < end:
        time.sleep(0.01)
    assert fake.released == [KNOWN] and fake.capturing == set()


def test_the_client_reconnects_after_an_idle_close(served_fast) -> None:
    path, _ = served_fast
    with ControlClient(path) as c:
        assert c.call("status")["journal"] == "ok"
        assert c.wait_closed(LONG)  # hostd hung up on the idle connection
        assert c.call("status")["journal"] == "ok"  # a new one, no error


# -- the socket file: one daemon per path, stale sockets, permissions -----------------------------


def test_socket_file_mode_group_parent_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "new" / "hostd.sock"
    gid = os.getgid()
    with ControlServer(path, FakeHandlers(), group=gid):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
        assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o7027 == 0  # 0750 or tighter umask
    assert not path.exists()


def test_an_unknown_group_is_refused_and_leaves_no_socket(tmp_path: Path) -> None:
    path = tmp_path / "hostd.sock"
    with pytest.raises(ControlError) as e:
        ControlServer(path, FakeHandlers(), group="hexiao-no-such-group").start()
    assert str(e.value) == ("control socket group 'hexiao-no-such-group' does not exist; create "
                            "it (groupadd hexiao-no-such-group) or set another")
    with ControlServer(path, FakeHandlers()), ControlClient(path) as c:  # lock released
        assert c.call("status")["journal"] == "ok"


def test_a_second_server_on_the_same_path_refuses(served) -> None:
    path, _ = served
    with pytest.raises(ControlError) as e:
        ControlServer(path, FakeHandlers()).start()
    assert str(e.value) == f"another hostd is already serving {path}"
    with ControlClient(path) as c:  # the first one is untouched
        assert c.call("status")["journal"] == "ok"


def test_a_live_socket_without_our_lock_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "hostd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        with pytest.raises(ControlError) as e:
            ControlServer(path, FakeHandlers()).start()
        assert str(e.value) == f"another hostd is already serving {path}"
        assert path.exists()


def test_a_stale_socket_is_removed_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "hostd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: what a killed daemon leaves
    with pytest.raises(HostdNotRunning):
        ControlClient(path).call("status")
    with ControlServer(path, FakeHandlers()), ControlClient(path) as c:
        assert c.call("status")["journal"] == "ok"


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "hostd.sock"
    path.write_text("keep me")
    with pytest.raises(ControlError) as e:
        ControlServer(path, FakeHandlers()).start()
    assert str(e.value) == (f"{path} exists and is not a socket; remove it or set another "
                            f"control_socket")
    assert path.read_text() == "keep me"


def test_refused_peer_gets_forbidden_and_is_hung_up_on(tmp_path: Path) -> None:
    path = tmp_path / "hostd.sock"
    fake = FakeHandlers()
    with ControlServer(path, fake, peer_check=lambda p: False):
        with pytest.raises(ControlError) as e:
            ControlClient(path).call("status")
        assert e.value.kind == "forbidden"
        assert str(e.value).startswith(f"uid {os.geteuid()} may not use {path}: run as root or "
                                       f"as hostd's user, or join the socket's group (gid ")
        r = cli("status", "--socket", str(path))
        assert r.exit_code == 1 and "may not use" in r.output
    assert fake.calls == []


def test_real_peer_credentials_are_checked_and_our_uid_allowed(tmp_path: Path) -> None:
    path = tmp_path / "hostd.sock"
    seen: list[Peer] = []
    server = ControlServer(path, FakeHandlers(), peer_check=lambda p: seen.append(p) or
                           server._allowed(p))
    with server, ControlClient(path) as c:
        assert c.call("status")["journal"] == "ok"
    assert seen == [Peer(os.getpid(), os.geteuid(), os.getegid())]
    # the group rule, with the socket's real group: a member is let in, a stranger is not
    gid = server._gid
    assert server._allowed(Peer(os.getpid(), 54321, gid))
    assert not server._allowed(Peer(2**22 + 7, 54321, gid + 1))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_is_refused_for_real() -> None:
    folder = Path(tempfile.mkdtemp(prefix="hexiao-ctl-"))
    try:
        folder.chmod(0o755)  # let uid 65534 reach the socket, so the credential check decides
        path = folder / "hostd.sock"
        with ControlServer(path, FakeHandlers(), mode=0o666):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: become nobody, ask, write back the raw answer
                try:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.settimeout(10)
                        s.connect(str(path))
                        os.write(w, s.recv(65536))
                finally:
                    os._exit(0)
            os.close(w)
            answer = b""
            while chunk := os.read(r, 65536):
                answer += chunk
            os.close(r)
            os.waitpid(pid, 0)
        err = json.loads(answer)["error"]
        assert err["kind"] == "forbidden"
        assert err["message"].startswith(f"uid 65534 may not use {path}: ")
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_hostd_not_running_names_the_path_and_how_to_start(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(HostdNotRunning) as e:
        ControlClient(path).call("status")
    assert e.value.kind == "not_running"
    assert str(e.value) == (f"hostd is not running (no answer on {path}); start it with "
                            f"`systemctl start hexiao-hostd` or `hexiao-hostd --config FILE`")
    for args in (("status",), ("device", "list"), ("device", "health", KNOWN),
                 ("journal", "show", "7")):
        r = cli(*args, "--socket", str(path))
        assert r.exit_code == 3, r.output
        assert r.output.startswith(f"Error: hostd is not running (no answer on {path})")
        assert ("or ask the board directly: add --keystore FILE [--port PORT]" in r.output) \
            == (args[0] == "device" and len(args) == 3)


def test_a_silent_server_is_a_timeout(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)  # never accepts: the request sits in the backlog
        with pytest.raises(ControlError) as e:
            ControlClient(path, timeout=0.3).call("status")
    assert (e.value.kind, str(e.value)) == ("timeout",
                                            f"hostd did not answer status within 0.3 s ({path})")


def test_default_socket_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HEXIAO_SOCKET", "/tmp/elsewhere.sock")
    assert default_socket() == Path("/tmp/elsewhere.sock")
    monkeypatch.delenv("HEXIAO_SOCKET")
    assert default_socket() == Path("/run/hexiao/hostd.sock")


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_every_command_human_and_json(served) -> None:
    path, fake = served
    s = ("--socket", str(path))
    r = cli("status", *s)
    assert r.exit_code == 0 and "version: 0.1\ndevices:\n  connected: 1\n  known: 2" in r.output
    r = cli("device", "list", *s)
    lines = r.output.splitlines()
    assert lines[0].split() == ["DEVICE", "LANE", "STATE", "PORT", "FIRMWARE", "SCANS", "ERROR"]
    assert lines[1].split() == [KNOWN, KNOWN, "open", "/dev/hexiao/A1", "hexiao-fw", "0.1.0",
                                "1", "-"]
    # no JSON in a column; the long error elided to fit 100 columns, whole in --json
    assert lines[2].split()[:4] == ["lane-22", "lane-22", "waiting", "-"]
    assert lines[2].endswith("…") and "/dev/hexiao/B2: could not lock" in lines[2]
    assert max(len(line) for line in lines) <= 100 and "{" not in r.output
    listed = json.loads(cli("device", "list", *s, "--json").output)
    assert listed[1]["port"] is None and listed[1]["error"] == LOCK * 3  # --json as hostd gave
    assert listed[0]["peer"]["board"] == "sim"
    r = cli("device", "info", KNOWN, *s)
    assert r.output.splitlines()[:6] == [f"device: {KNOWN}", f"lane: {KNOWN}", "state: open",
                                         "port: /dev/hexiao/A1", "error: -", "version: 1"]
    assert "board: sim" in r.output and "link:\n  tx_frames: 5" in r.output
    assert json.loads(cli("device", "ping", KNOWN, *s, "--json").output)["rtt_ms"] == 3.5
    # counters by name, never by number; the message type left out
    r = cli("device", "health", KNOWN, *s)
    assert r.output.splitlines() == [
        f"device: {KNOWN}", "uptime: 0:00:09.134", "reset_cause: power_on", "heap_free: 3808",
        "link:", "  rx_frames: 10", "  tx_frames: 15", "  sessions: 1", "  mac: 2", "app: -"]
    assert json.loads(cli("device", "health", KNOWN, *s, "--json").output)["link"] == {
        "64": 10, "65": 15, "68": 1, "11": 2}  # --json unchanged: as hostd passes it on
    r = cli("device", "logs", KNOWN, "--since", "4", "--max", "3", *s)
    assert r.output.splitlines() == ["#4     0:00:06.603  info     session open",
                                     "#5     1:02:03.004  notice   closed: host_lost",
                                     "next: 6 (--since 6 for newer entries)"]
    r = cli("journal", "list", "--state", "consumed", "--state", "sent", "--limit", "5", *s)
    assert r.output.splitlines()[1].split() == ["7", "consumed", "********9012", KNOWN]
    assert json.loads(cli("journal", "list", *s, "--json").output) == [ENTRY]
    r = cli("journal", "show", "7", *s, "--json")
    assert json.loads(r.output)["code"] == "********9012"
    assert "reconciled: 2" in cli("journal", "reconcile", *s).output
    assert fake.calls[-5:] == [
        ("device_logs", {"device": KNOWN, "since": 4, "max": 3}),
        ("journal_list", {"state": ["consumed", "sent"], "limit": 5}),
        ("journal_list", {"state": None, "limit": 50}),
        ("journal_show", {"entry_id": 7}), ("journal_reconcile", {})]


def test_rendering_values_and_widths() -> None:
    from hexiao.tools.support import render

    assert [render.cell(v) for v in (True, False, None, "", [], {}, b"\x01", 0)] == [
        "yes", "no", "-", "-", "-", "-", "01", "0"]
    assert render.keyvalue({"started": True, "stopped": ""}) == "started: yes\nstopped: -"
    # CJK takes two columns: the columns after it stay aligned
    t = render.table([{"title": "满100减20代金券", "n": 1}, {"title": "x", "n": 2}]).splitlines()
    assert [render.width(line[:line.rindex(" ") + 1]) for line in t[1:]] == [17, 17]
    wide = render.table([{"id": 1, "title": "长" * 80, "state": "done"}])
    assert all(render.width(line) <= 100 for line in wide.splitlines())
    assert wide.splitlines()[1].endswith("…  done")  # free text cut first, the state whole


@pytest.mark.parametrize(("args", "code", "message"), [
    (("device", "info", "nope"), 4, "Error: no device 'nope'; see `hexiao device list`"),
    (("journal", "show", "8"), 4, "Error: no journal entry 8"),
    (("device", "ping", "offline-1"), 5, "Error: device offline-1 is not connected"),
    (("device", "health", "slow-1"), 5, "Error: device slow-1 did not answer within 2 s"),
    (("device", "logs", "boom"), 1, "Error: hostd failed on device.logs; see its log"),
])
def test_cli_exit_codes(served, args, code, message) -> None:
    path, _ = served
    r = cli(*args, "--socket", str(path))
    assert (r.exit_code, r.output.strip()) == (code, message)
    r = cli(*args, "--socket", str(path), "--json")
    assert r.exit_code == code
    assert json.loads(r.output.splitlines()[0])["error"]["message"] == message[len("Error: "):]


def test_cli_usage_errors(served) -> None:
    path, _ = served
    r = cli("device", "health", "--socket", str(path))
    assert r.exit_code == 2
    assert "name a DEVICE (see `hexiao device list`), or give --keystore FILE" in r.output
    r = cli("device", "health", "--port", "/dev/null")
    assert r.exit_code == 2 and "--port needs --keystore FILE" in r.output


# -- direct mode against the MicroPython sim peer over a pty --------------------------------------

KID = b"lane-1"


@pytest.fixture
def sim_port(mpy_stage: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A sim device running hexiao.firmware.linkpeer under MicroPython on a pty, its key in a
    0600 host keystore; yields (host port, keystore path)."""
    key = os.urandom(32)
    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps({"id": KID.decode(), "key": key.hex()}))
    cfg.chmod(0o600)
    ks = Keystore(tmp_path / "keys.jsonl", create=True)
    ks.add(KID, key)
    argv, env = micropython.command("hexiao.firmware.linkpeer", mpy_stage,
                                    args=[f"cfg={cfg}", "scans=0"])
    cable = relay.Cable().start()
    device = relay.DeviceProcess(cable, argv, env, str(mpy_stage))
    try:
        yield cable.host_port, ks.path
    finally:
        cable.close()
        device.stop()


def direct(port: str, ks: Path, *args: str) -> Any:
    return cli("device", *args, "--port", port, "--keystore", str(ks), "--timeout", "5")


def test_direct_health_and_info_from_the_sim_device(sim_port) -> None:
    port, ks = sim_port
    r = direct(port, ks, "health", "--json", "--kid", "lane-1")
    assert r.exit_code == 0, r.output
    h = json.loads(r.output)
    assert h["device"] == "lane-1" and h["firmware"] == "linkpeer/0.1"
    assert h["reset_cause"] == "power_on" and h["link"]["sessions"] == 1
    assert h["heap_free"] > 0 and h["app"] == {"verdicts": 0}


def test_direct_info_is_the_handshake(sim_port) -> None:
    port, ks = sim_port
    r = direct(port, ks, "info")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[:4] == ["device: lane-1", "state: open (direct)", f"port: {port}",
                         f"kid: {KID.hex()}"]
    assert "firmware: linkpeer/0.1" in lines and "board: sim" in lines


def test_direct_ping_and_logs_from_the_sim_device(sim_port) -> None:
    port, ks = sim_port
    ping = direct(port, ks, "ping", "--json")
    logs = direct(port, ks, "logs", "--json")
    assert ping.exit_code == 0, ping.output
    assert logs.exit_code == 0, logs.output
    assert json.loads(ping.output)["rtt_ms"] >= 0
    assert json.loads(logs.output)["entries"] == []  # the sim peer keeps no log ring


def test_direct_with_a_kid_not_in_the_keystore_says_so(sim_port) -> None:
    port, ks = sim_port
    r = direct(port, ks, "health", "--kid", "6c616e652d32")  # "lane-2" in hex: not this device
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: no 32-byte key for device 6c616e652d32 in the "
                                f"keystore ({ks})")


def test_direct_twice_the_second_pokes_the_device_out_of_its_old_session(sim_port) -> None:
    """The first tool's session is still open on the device when the second opens the port:
    the second asks it (nack(no_session), SPEC §7.7) to say hello at once."""
    port, ks = sim_port
    first = direct(port, ks, "health", "--json")
    second = direct(port, ks, "health", "--json")
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert json.loads(second.output)["link"]["sessions"] == 2
    assert json.loads(second.output)["link"].get("host_lost") == 1


def test_direct_port_errors(tmp_path: Path) -> None:
    ks = Keystore(tmp_path / "keys.jsonl", create=True).path
    r = cli("device", "health", "--port", str(tmp_path / "ttyNONE"), "--keystore", str(ks))
    assert r.exit_code == 5 and r.output.startswith(f"Error: cannot open {tmp_path}/ttyNONE: ")
    ks.chmod(0o644)
    r = cli("device", "health", "--port", "/dev/null", "--keystore", str(ks))
    assert r.exit_code == 1 and "lets other users read it" in r.output


# -- direct mode without --port: the only hexiao board on USB -------------------------------------

RP2 = next(k for k, board in known_boards().items() if board.startswith("rp2"))


def usb(device: str, serial: str) -> SimpleNamespace:
    """A port as pyserial's list_ports describes it (the board's USB ids from the udev rules)."""
    return SimpleNamespace(device=device, vid=RP2[0], pid=RP2[1], serial_number=serial)


def test_direct_without_port_uses_the_only_board(sim_port, monkeypatch) -> None:
    port, ks = sim_port
    other = SimpleNamespace(device="/dev/ttyS0", vid=0x0403, pid=0x6001, serial_number="FT1")
    monkeypatch.setattr(list_ports, "comports", lambda: [other, usb(port, "E6614C311B")])
    r = cli("device", "health", "--keystore", str(ks), "--timeout", "5")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("device: lane-1\n") and "  sessions: 1" in r.output


def test_direct_without_port_and_no_board_or_several(tmp_path: Path, monkeypatch) -> None:
    ks = Keystore(tmp_path / "keys.jsonl", create=True).path
    monkeypatch.setattr(list_ports, "comports", lambda: [])
    r = cli("device", "info", "--keystore", str(ks))
    assert (r.exit_code, r.output.strip()) == (4, (
        "Error: no hexiao board on USB (`hexiao device ports` lists them): plug one in, or "
        "give --port PORT (a sim board's is DIR/tty)"))
    monkeypatch.setattr(list_ports, "comports",
                        lambda: [usb("/dev/ttyACM1", "B"), usb("/dev/ttyACM0", "A")])
    r = cli("device", "ping", "--keystore", str(ks))
    assert (r.exit_code, r.output.strip()) == (1, (
        "Error: 2 hexiao boards on USB: /dev/ttyACM0 (rp2-dev, serial A), /dev/ttyACM1 "
        "(rp2-dev, serial B); say which with --port PORT"))


# -- one rendering: the real firmware through the real hostd, then directly ----------------------


@pytest.fixture
def firmware_lane(mpy_stage: Path, tmp_path: Path) -> Iterator[tuple[Daemon, Path, Path, str]]:
    """hexiao.firmware.main (the application, real MicroPython) on a pty and a real hostd on
    it; yields (daemon, its socket, the keystore, the port)."""
    key = os.urandom(32)
    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps({"id": KID.decode(), "key": key.hex()}))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (tmp_path / "dev").mkdir()
    Keystore(state / "keystore.jsonl", create=True).add(KID, key)
    scanner = tmp_path / "scanner"
    os.mkfifo(scanner, 0o600)
    hold = os.open(scanner, os.O_RDWR | os.O_NONBLOCK)  # the scanner stays connected
    argv, env = micropython.command("hexiao.firmware.main", mpy_stage, args=[
        f"cfg={cfg}", f"scanner={scanner}", f"hid={tmp_path / 'hid.log'}",
        f"state={tmp_path / 'dev'}"])
    cable = relay.Cable().start()
    device = relay.DeviceProcess(cable, argv, env, str(mpy_stage))
    sock = tmp_path / "run" / "hostd.sock"
    toml = tmp_path / "hostd.toml"
    toml.write_text(f'[hostd]\nstate_dir = "{state}"\ncontrol_socket = "{sock}"\n'
                    f'[backend]\nkind = "sim"\n[[lane]]\nname = "lane-1"\n'
                    f'[[device]]\nid = "lane-1"\nport = "{cable.host_port}"\nlane = "lane-1"\n')
    daemon = Daemon(load(toml)).start()
    try:
        yield daemon, sock, state / "keystore.jsonl", cable.host_port
    finally:
        daemon.stop()
        cable.close()
        os.close(hold)  # the scanner's end of input: the firmware's loop ends with it
        device.stop()


def shape(text: str) -> list[str]:
    """A rendering with its numbers blanked: what must not differ between the two paths."""
    return [re.sub(r"\d+", "N", line) for line in text.splitlines()]


def test_one_rendering_through_hostd_and_directly(firmware_lane) -> None:
    daemon, sock, ks, port = firmware_lane
    end = time.monotonic() + 60  # a guard against hangs, not a timing claim
    while daemon.device_info(KID.decode())["state"] != "open":
        assert time.monotonic() < end, daemon.device_info(KID.decode())
        time.sleep(0.02)
    s = ("--socket", str(sock), "--timeout", "10")
    via = {c: cli("device", c, "lane-1", *s) for c in ("health", "logs", "info")}
    listed = cli("device", "list", *s)
    daemon.stop()  # hostd lets go of the port: now straight from the device
    direct_ = {c: direct(port, ks, c) for c in ("health", "logs", "info")}
    for c in via:
        assert via[c].exit_code == 0 and direct_[c].exit_code == 0, (via[c].output,
                                                                     direct_[c].output)
    out = {c: (via[c].output, direct_[c].output) for c in via}
    for text in (*out["health"], *out["logs"], *out["info"], listed.output):
        assert "{" not in text and "[" not in text.replace("[[", "") and "True" not in text
        assert all(len(line) <= 100 for line in text.splitlines())
    health_via, health_direct = (shape(t) for t in out["health"])
    assert health_via[:5] == health_direct[:5] == [
        "device: lane-N", "uptime: N:N:N.N", "reset_cause: power_on",
        "firmware: hexiao-fw N.N.N", "heap_free: N"]
    link_via = [ln.split(":")[0].strip() for ln in out["health"][0].split("link:")[1]
                .split("app:")[0].splitlines() if ln.strip()]
    assert link_via and all(not name.isdigit() for name in link_via)  # named, not numbered
    assert {"rx_frames", "tx_frames", "sessions"} <= set(link_via)
    logs_via, logs_direct = out["logs"]
    assert re.fullmatch(r"#\d+ +\d+:\d\d:\d\d\.\d{3}  info {5}session open",
                        logs_via.splitlines()[0]), logs_via
    assert shape(logs_via)[0] == shape(logs_direct)[0]
    assert shape(logs_via)[-1] == shape(logs_direct)[-1] == [
        "next: N (--since N for newer entries)"][0]
    assert out["info"][0].splitlines()[:4] == ["device: lane-1", "lane: lane-1", "state: open",
                                               f"port: {port}"]
    assert out["info"][1].splitlines()[:3] == ["device: lane-1", "state: open (direct)",
                                               f"port: {port}"]
    assert listed.output.splitlines()[1].split()[:3] == ["lane-1", "lane-1", "open"]


# -- colour: verdict outcomes on a terminal, never with NO_COLOR or into a pipe ------------------


class Outcomes(FakeHandlers):
    def journal_list(self, state: list[str] | None = None,
                     limit: int = 50) -> list[dict[str, Any]]:
        return [{"id": i, "state": "done", "outcome": o, "code": "…9012"}
                for i, o in enumerate(("accepted", "refused", "verify_manually"), 1)]


def on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Run the real `hexiao` with its stdout on a pty; everything it wrote there."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(master, 65536):
            out += chunk
    os.close(master)
    assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    return out.decode()


def test_journal_outcomes_are_coloured_only_on_a_terminal_without_no_color(
        tmp_path: Path) -> None:
    path = tmp_path / "run" / "hostd.sock"
    exe = str(Path(sys.executable).parent / "hexiao")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    argv = [exe, "journal", "list", "--socket", str(path)]
    with ControlServer(path, Outcomes()):
        tty = on_a_terminal(argv, env)
        plain = on_a_terminal(argv, {**env, "NO_COLOR": "1"})
        piped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert "\x1b[32maccepted" in tty and "\x1b[31mrefused" in tty
    assert "\x1b[33mverify_manually" in tty
    for text in (plain, piped.stdout):
        assert "\x1b[" not in text and "verify_manually" in text


def test_shell_completion_reaches_the_lazy_subcommands_options() -> None:
    """`eval "$(_HEXIAO_COMPLETE=bash_source hexiao)"` (README): the real `hexiao` completes a
    subcommand's own subcommands and options, not only the top level."""
    exe = str(Path(sys.executable).parent / "hexiao")

    def complete(*words: str) -> list[str]:
        env = {**os.environ, "_HEXIAO_COMPLETE": "bash_complete",
               "COMP_WORDS": " ".join(("hexiao", *words)), "COMP_CWORD": str(len(words))}
        r = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line.split(",", 1)[1] for line in r.stdout.splitlines()]

    assert complete("dev") == ["device"]
    assert complete("device", "") == ["health", "info", "list", "logs", "ping", "ports",
                                      "update"]
    assert {"--port", "--keystore", "--json"} <= set(complete("device", "health", "--"))
    assert "reconcile" in complete("journal", "")
    source = subprocess.run([exe], env={**os.environ, "_HEXIAO_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=60)
    assert "complete -o nosort -F _hexiao_completion hexiao" in source.stdout
