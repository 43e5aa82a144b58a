"""`hexiao device ports`: hexiao boards found by the USB ids of the shipped udev rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hexiao.hostd.lanes import discovery
from hexiao.tools.support.ports import ports
from serial.tools.list_ports_common import ListPortInfo


def _port(device: str, vid: int | None, pid: int | None, serial: str | None) -> ListPortInfo:
    p = ListPortInfo(device, skip_link_detection=True)
    p.vid, p.pid, p.serial_number = vid, pid, serial
    return p


PLUGGED = [_port("/dev/ttyACM1", 0x303A, 0x4001, "E5S3-77"),
           _port("/dev/ttyACM0", 0x2E8A, 0x0005, "E6614C311B4A"),
           _port("/dev/ttyUSB0", 0x0403, 0x6001, "FTDI1"),  # a POS's own serial adapter
           _port("/dev/ttyS0", None, None, None)]


def test_the_boards_are_the_udev_rules_ones() -> None:
    assert discovery.known_boards() == {(0x2E8A, 0x0005): "rp2-dev", (0x303A, 0x4001):
                                        "esp32s3-dev"}


def test_only_hexiao_boards_are_listed_with_their_stable_name(tmp_path: Path) -> None:
    (tmp_path / "E6614C311B4A").touch()  # udev's /dev/hexiao/<serial> link for one of them
    found = discovery.hexiao_ports(PLUGGED, udev_dir=str(tmp_path))
    assert [(p.device, p.board, p.serial, p.stable) for p in found] == [
        ("/dev/ttyACM0", "rp2-dev", "E6614C311B4A", str(tmp_path / "E6614C311B4A")),
        ("/dev/ttyACM1", "esp32s3-dev", "E5S3-77", None)]


def test_the_command_prints_a_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery.list_ports, "comports", lambda: PLUGGED)
    text = CliRunner().invoke(ports, [])
    assert text.exit_code == 0
    lines = text.output.splitlines()
    assert lines[0].split() == ["PORT", "BOARD", "USB", "ID", "SERIAL", "UDEV", "NAME"]
    assert lines[1].startswith("/dev/ttyACM0  rp2-dev") and "2e8a:0005" in lines[1]
    assert len(lines) == 3
    out = json.loads(CliRunner().invoke(ports, ["--json"]).output)
    assert out[1] == {"device": "/dev/ttyACM1", "board": "esp32s3-dev", "vid": "303a",
                      "pid": "4001", "serial": "E5S3-77", "stable": None}


def test_none_plugged_says_what_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery.list_ports, "comports", lambda: PLUGGED[2:])
    r = CliRunner().invoke(ports, [])
    assert r.exit_code == 0 and r.output.startswith("no hexiao board on USB: check the cable")
    assert json.loads(CliRunner().invoke(ports, ["--json"]).output) == []
