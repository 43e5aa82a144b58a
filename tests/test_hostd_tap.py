"""The receipt tap inside hexiao-hostd, for real: the Daemon with [tap] enabled and the MicroPython
link peer on a pty cable (test_hostd_daemon's lane), a POS printing with python-escpos over
loopback TCP to the tap, a loopback fake printer (test_tap_proxy's), the QR read back from the
printer's bytes by rendering them and decoding with zxing-cpp, and a coupon redeemed by the same
daemon. Then the failures: a printer that is down, a tap that cannot listen or has a bad key;
redemption goes on and `status`, the metrics and `hexiao doctor` say what is wrong.

No timed assertions: waits are bounded guards against hangs (LONG)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_hostd_daemon
from click.testing import CliRunner
from hexiao.hostd.config import Config, Tap, from_dict
from hexiao.hostd.control.client import ControlClient
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.tap import service as tap_service
from hexiao.hostd.tap.inject import remove_blocks, verify_token
from hexiao.hostd.tap.keys import KeyFileError, parse_key, read_key
from hexiao.hostd.tap.service import TapError, TapService, parse_listen
from hexiao.tools.support import ctl, doctor
from prometheus_client.parser import text_string_to_metric_families
from test_hostd_daemon import CASH, lane, outcome, sim  # noqa: F401  (sim: a fixture)
from test_tap_proxy import (
    DLE_EOT_1,
    LONG,
    STATUS,
    FakePrinter,
    decoded_qr,
    pos_print,
    printer,  # noqa: F401  (a fixture)
    receipt_bytes,
    wait_until,
)

KEY = os.urandom(32)
URL = "https://hexiao.example/r/{token}"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "tap.key"
    path.touch(mode=0o600)
    path.write_text(KEY.hex() + "\n")
    return path


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def tap_config(key_file: Path, printer_spec: str, **kw: Any) -> Tap:
    return Tap(**{"enabled": True, "listen": "127.0.0.1:0", "printer": printer_spec,
                  "content": URL, "key_file": key_file, "lane": "lane-1", "idle_timeout_s": 5.0,
                  **kw})


@contextmanager
def with_tap(monkeypatch: pytest.MonkeyPatch, tap: Tap) -> Iterator[None]:
    """test_hostd_daemon's lane, its config given this [tap] and a metrics endpoint."""
    base = test_hostd_daemon.config

    def config(*args: Any, **kw: Any) -> Config:
        cfg = base(*args, **kw)
        return dataclasses.replace(cfg, tap=tap, hostd=dataclasses.replace(
            cfg.hostd, metrics_listen="127.0.0.1:0"))

    monkeypatch.setattr(test_hostd_daemon, "config", config)
    yield


def metrics(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """hostd's metrics endpoint, scraped over HTTP."""
    text = httpx.get(daemon._metrics_server.url, timeout=LONG).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def status_cli(daemon: Daemon, *args: str) -> str:
    r = CliRunner().invoke(ctl.status_main, ["--socket", str(daemon.cfg.hostd.control_socket),
                                             *args])
    assert r.exit_code == 0, r.output
    return r.output


def doctor_tap(daemon: Daemon) -> doctor.Result:
    d = doctor.Doctor(Path("hostd.toml"), timeout=LONG)
    d.hostd(daemon.cfg)
    d.tap(daemon.cfg)
    return d.results[-1]


# ---- hostd prints and redeems -------------------------------------------------------------------

def test_hostd_prints_a_receipt_with_its_qr_and_redeems_a_coupon(
        mpy_stage: Path, tmp_path: Path, sim: Any, printer: FakePrinter,  # noqa: F811
        key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tap = tap_config(key_file, f"tcp:127.0.0.1:{printer.port}")
    with with_tap(monkeypatch, tap), lane(mpy_stage, tmp_path, sim, [CASH]) as ln:
        daemon = ln.daemon
        before = daemon.handlers.status()["tap"]
        port = int(before["listening"].rsplit(":", 1)[1])
        reply = pos_print(port, status=True)
        wait_until(lambda: daemon.handlers.status()["tap"]["counters"]["connections"] == 1)
        wait_until(lambda: any(printer.jobs))  # hostd's probe opened an empty connection too
        job = next(j for j in printer.jobs if j)
        rec, = daemon.tap.proxy.finished
        verdict, = ln.verdicts(1)
        with ControlClient(daemon.cfg.hostd.control_socket, timeout=LONG) as c:
            after = c.call("status")["tap"]
        human, as_json = status_cli(daemon), json.loads(status_cli(daemon, "--json"))
        scraped = metrics(daemon)
        checked = doctor_tap(daemon)
    # the POS's status request was answered through the tap; the receipt printed whole
    assert reply == bytes((STATUS[1],))
    assert remove_blocks(job, rec.injections) == DLE_EOT_1 + receipt_bytes()
    qr, = decoded_qr(job)
    info = verify_token([KEY], qr.rsplit("/", 1)[1])
    assert info.lane == "lane-1" and str(info.total) == "32.50"
    # the same daemon redeemed the coupon
    assert outcome(verdict) == "accepted" and verdict["text"].startswith("核销成功")
    assert sim.state.consumes[CASH] == 1
    # status: before and after, over the control socket and through `hexiao status`
    assert before["state"] == "listening" and before["counters"]["receipts"] == 0
    assert after["printer"] == {"target": f"tcp:127.0.0.1:{printer.port}",
                                "state": "reachable", "error": None}
    assert {k: after["counters"][k] for k in ("connections", "receipts", "injections",
                                             "failopen", "errors")} == {
        "connections": 1, "receipts": 1, "injections": 1, "failopen": 0, "errors": 0}
    assert as_json["tap"]["counters"]["injections"] == 1
    assert "tap:\n  state: listening\n" in human and "    state: reachable\n" in human
    assert KEY.hex() not in human
    # the metrics endpoint hostd already serves
    assert scraped[("hexiao_tap_receipts_total", (("result", "injected"),))] == 1
    assert scraped[("hexiao_tap_receipts_total", (("result", "failed_open"),))] == 0
    assert scraped[("hexiao_tap_connections_total", (("end", "closed"),))] == 1
    assert scraped[("hexiao_tap_listening", ())] == 1
    assert scraped[("hexiao_tap_printer_state", (("state", "reachable"),))] == 1
    assert checked.status == "ok" and "1 QR code(s) added" in checked.detail


def test_a_tap_whose_printer_is_down_does_not_stop_the_coupon(
        mpy_stage: Path, tmp_path: Path, sim: Any, key_file: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    down = closed_port()
    tap = tap_config(key_file, f"tcp:127.0.0.1:{down}", connect_timeout_s=0.1)
    with with_tap(monkeypatch, tap), lane(mpy_stage, tmp_path, sim, [CASH]) as ln:
        daemon = ln.daemon
        port = int(daemon.handlers.status()["tap"]["listening"].rsplit(":", 1)[1])
        pos_print(port)
        wait_until(lambda: daemon.handlers.status()["tap"]["counters"]["connections"] == 1)
        verdict, = ln.verdicts(1)
        st = daemon.handlers.status()["tap"]
        scraped = metrics(daemon)
        checked = doctor_tap(daemon)
    assert outcome(verdict) == "accepted" and sim.state.consumes[CASH] == 1
    assert st["state"] == "listening" and st["printer"]["state"] == "lost"
    assert f"127.0.0.1:{down}" in st["printer"]["error"]
    assert st["counters"]["printer_refused"] == 1 and "printer refused" in st["last_error"]
    assert scraped[("hexiao_tap_connections_total", (("end", "printer-refused"),))] == 1
    assert scraped[("hexiao_tap_printer_state", (("state", "lost"),))] == 1
    assert scraped[("hexiao_tap_printer_state", (("state", "reachable"),))] == 0
    assert checked.status == "warn" and "printer lost" in checked.detail


def test_a_redemption_that_fails_does_not_stop_printing(
        mpy_stage: Path, tmp_path: Path, sim: Any, printer: FakePrinter,  # noqa: F811
        key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def backend_busy(daemon: Daemon) -> None:  # before the device boots and scans
        httpx.post(f"{sim.url}/_sim/faults", json={"busy_rate": 1.0}, timeout=LONG)

    tap = tap_config(key_file, f"tcp:127.0.0.1:{printer.port}")
    with with_tap(monkeypatch, tap), lane(mpy_stage, tmp_path, sim, [CASH],
                                          before_device=backend_busy) as ln:
        verdict, = ln.verdicts(1)  # the backend is busy: no coupon today
        port = int(ln.daemon.handlers.status()["tap"]["listening"].rsplit(":", 1)[1])
        pos_print(port)
        wait_until(lambda: ln.daemon.handlers.status()["tap"]["counters"]["receipts"] == 1)
        wait_until(lambda: any(printer.jobs))
        job = next(j for j in printer.jobs if j)
    assert outcome(verdict) != "accepted" and sim.state.consumes[CASH] == 0
    qr, = decoded_qr(job)  # the receipt printed with its QR all the same
    assert verify_token([KEY], qr.rsplit("/", 1)[1]).lane == "lane-1"


# ---- a tap that cannot start: hostd starts anyway, says why, and keeps trying ------------------

def test_a_tap_that_cannot_listen_is_reported_and_retried(
        tmp_path: Path, sim: Any, key_file: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap_service, "RETRY_EVERY_S", 0.05)
    taken = socket.create_server(("127.0.0.1", 0))
    where = f"127.0.0.1:{taken.getsockname()[1]}"
    (tmp_path / "state").mkdir(mode=0o700)
    cfg = test_hostd_daemon.config(tmp_path, sim, str(tmp_path / "no-such-tty"))
    daemon = Daemon(dataclasses.replace(cfg, tap=tap_config(
        key_file, f"tcp:127.0.0.1:{closed_port()}", listen=where)))
    try:
        daemon.start()  # the tap's failure does not stop hostd
        failed = daemon.handlers.status()["tap"]
        checked = doctor_tap(daemon)
        taken.close()  # the port is free again: the retry takes it
        wait_until(lambda: daemon.handlers.status()["tap"]["state"] == "listening")
        listening = daemon.handlers.status()["tap"]
    finally:
        taken.close()
        daemon.stop()
    assert failed["state"] == "failed" and failed["error"].startswith(f"cannot listen on {where}")
    assert checked.status == "fail" and "not running: cannot listen" in checked.detail
    assert listening["listening"] == where and listening["error"] is None


@pytest.mark.parametrize(("change", "key", "says"), [
    ({"listen": "9100"}, "listen", "HOST:PORT"),
    ({"printer": "tcp:nohost"}, "printer", "tcp:HOST:PORT"),
    ({"profile": "laser-9000"}, "profile", "generic-80"),
    ({"key_file": None}, "key_file", "{token}"),
    ({"key_file": Path("/nonexistent/tap.key")}, "key_file", "cannot read"),
    ({"caption": "{nope}"}, "content", "{token}"),
])
def test_a_setting_the_tap_cannot_use_is_named(key_file: Path, change: dict[str, Any], key: str,
                                               says: str) -> None:
    svc = TapService(dataclasses.replace(tap_config(key_file, "tcp:127.0.0.1:9"), **change))
    with pytest.raises(TapError) as e:
        svc.start()
    assert e.value.key == key and says in str(e.value)
    st = svc.state()
    assert st["state"] == "failed" and st["error"].startswith(f"tap.{key}: ")
    assert st["listening"] is None


def test_a_serial_pos_port_that_is_missing_is_the_machine_not_the_setting(
        tmp_path: Path, key_file: Path) -> None:
    svc = TapService(tap_config(key_file, "tcp:127.0.0.1:9",
                                listen=f"serial:{tmp_path}/ttyNONE"))
    with pytest.raises(TapError, match=f"cannot open serial:{tmp_path}/ttyNONE") as e:
        svc.start()
    assert e.value.key is None and svc.proxy is None and svc.state()["listening"] is None


def test_listen_forms() -> None:
    assert parse_listen("0.0.0.0:9100") == tap_service.Listen("tcp", "0.0.0.0", 9100)
    assert parse_listen("[::1]:0") == tap_service.Listen("tcp", "::1", 0)
    assert parse_listen("pty") == tap_service.Listen("pty")
    assert parse_listen("pty:/run/hexiao/ttyPOS").link == "/run/hexiao/ttyPOS"
    assert parse_listen("serial:/dev/ttyS0@19200") == tap_service.Listen(
        "serial", device="/dev/ttyS0", baud=19200)
    for bad in ("9100", "host:99999", "serial:", "serial:/dev/ttyS0@fast"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_the_config_takes_every_listen_and_printer_form(tmp_path: Path) -> None:
    cfg = from_dict({"tap": {"listen": "pty:/run/hexiao/ttyPOS", "printer": "usb:0416:5011",
                             "stall_timeout_s": 10}})
    assert cfg.tap.listen == "pty:/run/hexiao/ttyPOS" and cfg.tap.stall_timeout_s == 10.0
    with pytest.raises(Exception, match=r"tap.listen: expected HOST:PORT .* got \"nowhere\""):
        from_dict({"tap": {"listen": "nowhere"}})
    with pytest.raises(Exception, match=r"tap.printer: expected .*usb:VID:PID"):
        from_dict({"tap": {"printer": "lpt:1"}})


# ---- the tap key file ---------------------------------------------------------------------------

def test_key_files_hold_hex_or_raw_bytes(tmp_path: Path) -> None:
    raw = bytes(range(200, 232))
    assert parse_key(KEY.hex().encode() + b"\n") == KEY
    assert parse_key(KEY.hex().upper().encode()) == KEY
    assert parse_key(raw) == raw
    for bad, says in [(b"", "not a tap key"), (b"abcd", "16 bytes"),
                      (b"a" * 33, "33 hex digits"), (b"-----BEGIN PRIVATE KEY-----\n", "not a"),
                      (b"\x00\x01" * 5, "10 bytes of binary"), (bytes(range(256)), "256 bytes")]:
        with pytest.raises(KeyFileError, match=says) as e:
            parse_key(bad)
        assert "BEGIN" not in str(e.value)  # never the content


def test_key_files_others_can_read_or_that_are_not_files_are_refused(tmp_path: Path,
                                                                    key_file: Path) -> None:
    assert read_key(key_file) == KEY
    key_file.chmod(0o640)
    with pytest.raises(KeyFileError, match=f"chmod 600 {key_file}") as e:
        read_key(key_file)
    assert KEY.hex() not in str(e.value)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_key(tmp_path)
    big = tmp_path / "big.key"
    big.touch(mode=0o600)
    big.write_text("0" * 4096)
    with pytest.raises(KeyFileError, match="too long to be a key"):
        read_key(big)
