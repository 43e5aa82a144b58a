"""`hexiao doctor` against a real lane: a sim board provisioned with `hexiao provision`, its
firmware under MicroPython on a pty, a real hostd Daemon, the WeChat simulator on loopback and a
printer socket; then each thing broken in turn. Every wait is bounded; nothing asserts a
duration."""

from __future__ import annotations

import email.utils
import importlib.resources
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.config import load
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.keystore import Keystore
from hexiao.tools import micropython
from hexiao.tools.install import provision
from hexiao.tools.sim import relay
from hexiao.tools.support import doctor

KID = "hx-0001"
LONG = 60.0  # a guard against hangs, never a performance claim


@pytest.fixture(autouse=True)
def no_modemmanager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This machine's processes are not the test's: an empty /proc unless a test adds one."""
    proc = tmp_path / "proc"
    proc.mkdir()
    monkeypatch.setattr(doctor, "PROC_DIR", proc)
    monkeypatch.setattr(doctor, "RULES_DIRS", (tmp_path / "rules.d",))
    return proc


@pytest.fixture
def sim() -> Iterator[WeChatSim]:
    with WeChatSim(read(EXAMPLE)) as s:
        yield s


@pytest.fixture
def printer() -> Iterator[str]:
    with socket.create_server(("127.0.0.1", 0)) as s:  # connects queue in the backlog
        yield f"127.0.0.1:{s.getsockname()[1]}"


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, base_url: str, port: str | None, printer: str,
                 appid: str = "wxd0c0ffee5eed0001",
                 secret: str = "0000hexiaosimfakesecret000000001") -> Path:
    (tmp_path / "wechat.secret").write_text(secret)
    (tmp_path / "wechat.secret").chmod(0o600)
    (tmp_path / "tap.key").touch(mode=0o600)
    (tmp_path / "tap.key").write_text(os.urandom(32).hex())
    device = f'[[device]]\nid = "{KID}"\nport = "{port}"\nlane = "lane-1"\n' if port else ""
    cfg = tmp_path / "hostd.toml"
    cfg.write_text(
        f'[hostd]\nstate_dir = "state"\ncontrol_socket = "{tmp_path}/run/hostd.sock"\n'
        f'[backend]\nkind = "wechat_card"\nbase_url = "{base_url}"\nappid = "{appid}"\n'
        f'secret_file = "wechat.secret"\ntimeout_s = 2.0\n'
        f'[[lane]]\nname = "lane-1"\n{device}'
        f'[tap]\nenabled = true\nlisten = "127.0.0.1:0"\nprinter = "tcp:{printer}"\n'
        f'key_file = "tap.key"\n')
    return cfg


def doc(cfg: Path, timeout: float = 3.0) -> tuple[Result, dict[str, dict[str, Any]]]:
    r = CliRunner().invoke(doctor.main, ["--config", str(cfg), "--json", "--timeout",
                                         str(timeout)])
    checks = {c["name"]: c for c in json.loads(r.output)["checks"]}
    return r, checks


def status(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items()}


@contextmanager
def lane(mpy_stage: Path, tmp_path: Path, base_url: str, printer: str, *, hostd: bool = True,
         wrong_key: bool = False, cables: list[relay.Cable] | None = None,
         ) -> Iterator[tuple[Path, Daemon | None]]:
    """Provision a sim board with `hexiao provision --config`, boot it on a cable whose port
    the config names, and start hostd (unless hostd=False)."""
    board = tmp_path / "board"
    shutil.copytree(mpy_stage / "hexiao", board / "hexiao")
    cable = relay.Cable().start()
    if cables is not None:
        cables.append(cable)
    cfg = write_config(tmp_path, base_url, cable.host_port, printer)
    (tmp_path / "state").mkdir(mode=0o700)
    r = CliRunner().invoke(provision.main, ["--sim-dir", str(board), "--id", KID, "--lane",
                                            "lane-1", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    if wrong_key:
        Keystore(tmp_path / "state" / "keystore.jsonl").add(KID.encode(), os.urandom(32),
                                                            replace=True)
    # the scripted link peer, in the 64 KB budget: the doctor's checks need only the link
    argv, env = micropython.command("hexiao.firmware.linkpeer", board, heap=micropython.HEAP,
                                    args=["cfg=config.json"])
    device = relay.DeviceProcess(cable, argv, env, str(board))
    daemon = Daemon(load(cfg)).start() if hostd else None
    try:
        yield cfg, daemon
    finally:
        if daemon is not None:
            daemon.stop()
        cable.close()
        device.stop()


def wait_until(pred: Callable[[], Any], what: str) -> None:
    end = time.monotonic() + LONG
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_healthy_lane_is_all_ok(mpy_stage: Path, tmp_path: Path, sim: WeChatSim,
                                  printer: str) -> None:
    with lane(mpy_stage, tmp_path, sim.url, printer) as (cfg, daemon):
        assert daemon is not None
        wait_until(lambda: daemon.device_info(KID)["state"] == "open", "the session")
        r, checks = doc(cfg)
        text = CliRunner().invoke(doctor.main, ["--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert status(checks) == {
        "config": "ok", "private files": "ok", "hostd": "ok", "modemmanager": "ok",
        f"device {KID}: present": "ok",
        f"device {KID}: permission": "ok", f"device {KID}: key": "ok",
        f"device {KID}: handshake": "ok", "backend": "ok", "backend token": "ok", "clock": "ok",
        "printer": "ok", "tap": "ok"}
    assert checks[f"device {KID}: handshake"]["detail"] == \
        "session open via hostd; firmware linkpeer/0.1"
    assert text.exit_code == 0 and text.output.endswith("all checks passed\n")


def test_hostd_stopped_says_how_to_start_it_and_checks_the_device_directly(
        mpy_stage: Path, tmp_path: Path, sim: WeChatSim, printer: str) -> None:
    with lane(mpy_stage, tmp_path, sim.url, printer, hostd=False) as (cfg, _):
        r, checks = doc(cfg, timeout=10)
    assert r.exit_code == 1
    assert checks["hostd"]["detail"] == f"hostd is not running (no answer on {tmp_path}/run/" \
                                        f"hostd.sock)"
    assert checks["hostd"]["fix"] == ("Start it with `systemctl start hexiao-hostd` or "
                                      f"`hexiao-hostd --config FILE` (--config {cfg})")
    assert checks[f"device {KID}: permission"]["detail"].endswith(": opened read/write")
    hs = checks[f"device {KID}: handshake"]
    assert hs["status"] == "ok" and hs["detail"].startswith("direct on ")
    assert [n for n, s in status(checks).items() if s == "fail"] == ["hostd"]


def test_a_key_mismatch_is_named(mpy_stage: Path, tmp_path: Path, sim: WeChatSim,
                                 printer: str) -> None:
    with lane(mpy_stage, tmp_path, sim.url, printer, wrong_key=True) as (cfg, daemon):
        assert daemon is not None
        wait_until(lambda: daemon.device_info(KID)["counters"].get("mac"), "a MAC failure")
        r, checks = doc(cfg)
    assert r.exit_code == 1
    hs = checks[f"device {KID}: handshake"]
    assert hs["status"] == "fail" and hs["detail"] == (
        "key mismatch: the device's frames fail the MAC (its key is not the one in the "
        "keystore)")
    assert hs["fix"].startswith("re-provision it: hexiao provision --force --id hx-0001")
    assert checks[f"device {KID}: key"]["status"] == "ok"  # a key is there: the wrong one


def test_a_missing_device(tmp_path: Path, sim: WeChatSim, printer: str) -> None:
    gone = "/dev/ttyACM97"  # a USB board's port, unplugged
    assert not os.path.exists(gone)
    cfg = write_config(tmp_path, sim.url, gone, printer)
    r, checks = doc(cfg)
    assert r.exit_code == 1
    present = checks[f"device {KID}: present"]
    assert present["status"] == "fail" and present["detail"] == f"not found ({gone})"
    assert present["fix"].startswith("plug the device in and check its USB cable")
    # without a keystore the key is reported, not a crash; nothing to shake hands with
    assert checks[f"device {KID}: key"]["detail"].startswith(f"{tmp_path}/state/keystore.jsonl: "
                                                            f"no such keystore")
    assert checks[f"device {KID}: handshake"]["status"] == "n/a"


def test_a_broken_config_lists_its_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "hostd.toml"
    cfg.write_text('[backend]\ntimeout_s = "fast"\n')
    r, checks = doc(cfg)
    assert r.exit_code == 1
    assert list(checks) == ["config"]
    assert checks["config"]["detail"] == (f'config {cfg}: backend.timeout_s: expected a number '
                                          f'of seconds > 0, got "fast"')
    missing = CliRunner().invoke(doctor.main, ["--config", str(tmp_path / "none.toml")])
    assert missing.exit_code == 1 and "[FAIL] config: config " in missing.output
    assert "none.toml: no such file" in missing.output


def test_an_unreachable_backend(tmp_path: Path, printer: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    r, checks = doc(write_config(tmp_path, url, None, printer))
    assert r.exit_code == 1
    assert checks["backend"]["status"] == "fail"
    assert checks["backend"]["detail"].startswith(f"cannot reach {url}: ConnectError")
    assert checks["clock"] == {"name": "clock", "status": "n/a",
                               "detail": "the backend did not answer", "fix": ""}
    assert "backend token" not in checks


def test_token_quota_exhausted(tmp_path: Path, printer: str) -> None:
    seed = read(EXAMPLE)
    seed["apps"][0]["token_daily_quota"] = 0
    seed["apps"][0]["stable_token_daily_quota"] = 0  # hostd asks cgi-bin/stable_token
    with WeChatSim(seed) as sim:
        r, checks = doc(write_config(tmp_path, sim.url, None, printer))
    assert r.exit_code == 1
    tok = checks["backend token"]
    assert tok["status"] == "fail"
    assert tok["detail"].startswith("token quota exhausted (errcode 45009: reach max api daily "
                                    "quota limit")
    assert tok["fix"].startswith("wait for the daily reset (midnight, China time)")
    assert checks["backend"]["status"] == "ok" and checks["clock"]["status"] == "ok"


class _Skewed(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response_only(200)
        self.send_header("Date", email.utils.formatdate(time.time() - 3600, usegmt=True))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_clock_skew(tmp_path: Path, printer: str) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Skewed)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r, checks = doc(write_config(tmp_path, url, None, printer))
    finally:
        server.shutdown()
        server.server_close()
    assert r.exit_code == 1
    clock = checks["clock"]
    assert clock["status"] == "fail"
    # the Date header has whole seconds: 3600 or 3601 s
    assert clock["detail"].startswith("this machine is 360") and clock["detail"].endswith(
        f"s ahead of {url} (more than 60 s)")
    assert clock["fix"].startswith("sync the clock: sudo timedatectl set-ntp true")


def test_printer_offline(tmp_path: Path, sim: WeChatSim) -> None:
    where = f"127.0.0.1:{closed_port()}"
    r, checks = doc(write_config(tmp_path, sim.url, None, where))
    assert r.exit_code == 1
    assert checks["printer"]["status"] == "fail"
    assert checks["printer"]["detail"] == (f"printer offline: cannot connect to {where} "
                                           f"(Connection refused)")


def test_modemmanager_without_the_udev_rule(tmp_path: Path, sim: WeChatSim, printer: str,
                                            no_modemmanager: Path) -> None:
    (no_modemmanager / "812").mkdir()
    (no_modemmanager / "812" / "comm").write_text("ModemManager\n")
    cfg = write_config(tmp_path, sim.url, None, printer)
    _, checks = doc(cfg)
    mm = checks["modemmanager"]
    assert mm["status"] == "fail" and mm["fix"].startswith("sudo hexiao udev install")
    rules = tmp_path / "rules.d"
    rules.mkdir()
    shutil.copy(str(importlib.resources.files("hexiao.udev") / "99-hexiao.rules"), rules)
    _, checks = doc(cfg)
    assert checks["modemmanager"]["status"] == "ok"
    assert checks["modemmanager"]["detail"].startswith(f"ModemManager is running; {rules}")


def test_a_stopped_sim_board_is_told_to_start_not_to_check_a_cable(
        mpy_stage: Path, tmp_path: Path, sim: WeChatSim, printer: str) -> None:
    """A disconnect seen through hostd: state and error agree ("waiting", "device not found",
    never a stale error of an earlier state), and the advice fits a sim board's DIR/tty."""
    board = tmp_path / "board"  # lane() provisions this sim board (and runs it on a cable)
    cables: list[relay.Cable] = []
    with lane(mpy_stage, tmp_path, sim.url, printer, cables=cables) as (cfg, daemon):
        assert daemon is not None
        wait_until(lambda: daemon.device_info(KID)["state"] == "open", "the session")
        # the config names the board's DIR/tty, as for `hexiao sim board` (hostd runs on)
        cfg.write_text(cfg.read_text().replace(cables[0].host_port, str(board / "tty")))
        cables[0].close()  # the device goes away, and its port with it
        wait_until(lambda: daemon.device_info(KID)["error"] == "device not found", "not found")
        info = daemon.device_info(KID)
        assert (info["state"], info["error"]) == ("waiting", "device not found")
        r, checks = doc(cfg)
    assert r.exit_code == 1
    present = checks[f"device {KID}: present"]
    assert present["detail"] == f"not found ({board / 'tty'})"
    assert present["fix"] == (f"the sim board is not running: start it with `hexiao sim board "
                              f"--dir {board}` (hostd connects by itself)")
    assert "cable" not in present["fix"]
    hs = checks[f"device {KID}: handshake"]
    assert hs["detail"] == "hostd: waiting: device not found"


def test_a_lane_error_belongs_to_the_state_it_was_set_in() -> None:
    """DeviceLane.info(): an error is cleared when the state changes, so "open" never sits next
    to "device not found", nor "waiting" next to an earlier port-lock failure."""
    from hexiao.hostd.lanes.lane import DeviceLane

    lane = DeviceLane(KID, KID.encode(), "lane-1", lambda: None, lambda kid: None,
                      engine_factory=lambda: None, macros={})  # type: ignore[arg-type,return-value]
    lane.state, lane.last_error = "waiting", "/dev/ttyACM0: could not lock port"
    assert (lane.info()["state"], lane.info()["error"]) == ("waiting",
                                                            "/dev/ttyACM0: could not lock port")
    lane.state, lane.last_error = "waiting", "device not found"  # the same state, a new error
    assert lane.info()["error"] == "device not found"
    lane.state = "connecting"
    assert lane.info()["error"] == ""
    lane.last_error = "poke refused"
    lane.state = "open"
    assert (lane.info()["state"], lane.info()["error"]) == ("open", "")
    lane.state = "waiting"  # back to an earlier state: its old error does not come back
    assert lane.info()["error"] == ""


def test_a_journal_others_can_read_fails_the_same_rule_as_hostd(tmp_path: Path,
                                                               printer: str) -> None:
    """Issue 17: a 0644 journal (full coupon codes) and a 0755 state folder passed the doctor."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9", None, printer)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (state / "journal.sqlite3").write_bytes(b"")
    (state / "journal.sqlite3").chmod(0o644)
    r, checks = doc(cfg, timeout=1)
    assert r.exit_code != 0
    detail = checks["private files"]["detail"]
    assert checks["private files"]["status"] == "fail"
    assert f"chmod 700 {state}" in detail and f"chmod 600 {state / 'journal.sqlite3'}" in detail
