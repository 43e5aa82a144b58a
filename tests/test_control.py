"""hostd's control socket (hostd/control/server.py) and the CLI on it (tools/support/ctl.py).

A real server on a Unix socket in tmp_path with a fake Handlers object (this tests the socket
layer, not the daemon), the real SO_PEERCRED path, a real second uid when run as root, and the
CLI's direct mode against the MicroPython sim peer over a pty."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hexiao.hostd.control.server import (
    MAX_LINE,
    ControlClient,
    ControlError,
    ControlServer,
    HostdNotRunning,
    Peer,
    default_socket,
)
from hexiao.hostd.keystore import Keystore
from hexiao.tools import micropython
from hexiao.tools.sim import relay
from hexiao.tools.support import ctl

KNOWN = "lane-1"
ENTRY = {"id": 7, "state": "consumed", "code": "********9012", "lane": KNOWN}


class FakeHandlers:
    """Answers like a daemon with one device (lane-1) and one journal entry (7)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

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
        return [{"device": KNOWN, "port": "/dev/hexiao/A1", "connected": True},
                {"device": "lane-22", "port": None, "connected": False}]

    def device_info(self, device: str) -> dict[str, Any]:
        self._dev("device_info", device)
        return {"device": device, "firmware": "linkpeer/0.1", "board": "sim"}

    def device_ping(self, device: str) -> dict[str, Any]:
        self._dev("device_ping", device)
        return {"device": device, "rtt_ms": 3.5}

    def device_health(self, device: str) -> dict[str, Any]:
        self._dev("device_health", device)
        return {"device": device, "uptime_ms": 1000, "link": {"sessions": 1}}

    def device_logs(self, device: str, since: int | None = None,
                    max: int | None = None) -> dict[str, Any]:
        self._dev("device_logs", device, since=since, max=max)
        return {"entries": [{"seq": 4, "uptime_ms": 10, "level": "info", "event": "boot"}],
                "next": 5}

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

    def capture_start(self, device: str, path: str) -> dict[str, Any]:
        self._dev("capture_start", device, path=path)
        return {"device": device, "path": path}

    def capture_stop(self, device: str) -> dict[str, Any]:
        self._dev("capture_stop", device)
        return {"device": device, "frames": 12}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, FakeHandlers]]:
    path = tmp_path / "run" / "hostd.sock"
    fake = FakeHandlers()
    with ControlServer(path, fake):
        yield path, fake


def cli(*args: str) -> Any:
    group = {"status": ctl.status_main, "device": ctl.device_main, "journal": ctl.journal_main}
    r = CliRunner().invoke(group[args[0]], list(args[1:]))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a crash is a failure with its traceback, not an exit code
    return r


def raw(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw lines on one connection; every response line until the server hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"".join(lines))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines()]


# -- every command through the client ------------------------------------------------------------


def test_every_command_through_one_client_connection(served: tuple[Path, FakeHandlers]) -> None:
    path, fake = served
    with ControlClient(path) as c:
        assert c.call("status")["devices"] == {"connected": 1, "known": 2}
        assert [d["device"] for d in c.call("device.list")] == [KNOWN, "lane-22"]
        assert c.call("device.info", device=KNOWN)["board"] == "sim"
        assert c.call("device.ping", device=KNOWN)["rtt_ms"] == 3.5
        assert c.call("device.health", device=KNOWN)["link"] == {"sessions": 1}
        assert c.call("device.logs", device=KNOWN, since=4, max=3)["next"] == 5
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
     "device.ping, journal.list, journal.reconcile, journal.show, status"),
    ("device.info", {}, "bad_request", "device.info: missing argument 'device' (a device name)"),
    ("device.info", {"device": 3}, "bad_request",
     "device.info: argument 'device' must be a device name"),
    ("device.info", {"device": KNOWN, "port": "x"}, "bad_request",
     "device.info: unexpected argument 'port'"),
    ("journal.show", {"entry_id": True}, "bad_request",
     "journal.show: argument 'entry_id' must be a journal entry id"),
    ("journal.list", {"limit": -1}, "bad_request",
     "journal.list: argument 'limit' must be a count"),
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
        assert f"error: hostd is not running (no answer on {path})" in r.output


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
    assert r.output.splitlines() == ["DEVICE   PORT            CONNECTED",
                                     "lane-1   /dev/hexiao/A1  True",
                                     "lane-22  -               False"]
    assert json.loads(cli("device", "list", *s, "--json").output)[1]["port"] is None
    assert "board: sim" in cli("device", "info", KNOWN, *s).output
    assert json.loads(cli("device", "ping", KNOWN, *s, "--json").output)["rtt_ms"] == 3.5
    assert "link:\n  sessions: 1" in cli("device", "health", KNOWN, *s).output
    r = cli("device", "logs", KNOWN, "--since", "4", "--max", "3", *s)
    assert r.output.splitlines() == ["entries:", "  SEQ  UPTIME_MS  LEVEL  EVENT",
                                     "  4    10         info   boot", "next: 5"]
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


@pytest.mark.parametrize(("args", "code", "message"), [
    (("device", "info", "nope"), 4, "error: no device 'nope'; see `hexiao device list`"),
    (("journal", "show", "8"), 4, "error: no journal entry 8"),
    (("device", "ping", "offline-1"), 5, "error: device offline-1 is not connected"),
    (("device", "health", "slow-1"), 5, "error: device slow-1 did not answer within 2 s"),
    (("device", "logs", "boom"), 1, "error: hostd failed on device.logs; see its log"),
])
def test_cli_exit_codes(served, args, code, message) -> None:
    path, _ = served
    r = cli(*args, "--socket", str(path))
    assert (r.exit_code, r.output.strip()) == (code, message)
    r = cli(*args, "--socket", str(path), "--json")
    assert r.exit_code == code
    assert json.loads(r.output.splitlines()[0])["error"]["message"] == message[len("error: "):]


def test_cli_usage_errors(served) -> None:
    path, _ = served
    r = cli("device", "health", "--socket", str(path))
    assert r.exit_code == 2
    assert "name a DEVICE (see `hexiao device list`), or give --port" in r.output
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
    assert lines[:4] == ["device: lane-1", f"kid: {KID.hex()}", f"port: {port}",
                         "connected: True"]
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
    assert r.output.strip() == (f"error: no 32-byte key for device 6c616e652d32 in the "
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
    assert r.exit_code == 5 and r.output.startswith(f"error: cannot open {tmp_path}/ttyNONE: ")
    ks.chmod(0o644)
    r = cli("device", "health", "--port", "/dev/null", "--keystore", str(ks))
    assert r.exit_code == 1 and "lets other users read it" in r.output
