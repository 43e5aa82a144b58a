"""`hexiao provision` against the sim board: a folder with the staged firmware, run for real under
MicroPython on a pty. Every wait is bounded; nothing asserts a duration."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hexiao.hostd.keystore import Keystore
from hexiao.tools.install.provision import main
from hexiao.tools.install.selftest import _running_sim
from hexiao.tools.support.ctl_direct import DirectDevice

KID = "hx-0001"


@pytest.fixture
def board(mpy_stage: Path, tmp_path: Path) -> Path:
    """A sim board with firmware installed (the layout `hexiao flash --sim-dir` leaves)."""
    root = tmp_path / "board"
    shutil.copytree(mpy_stage / "hexiao", root / "hexiao")
    return root


def run(board: Path, ks: Path, *extra: str, lane: str = "lane-1") -> Result:
    return CliRunner().invoke(main, ["--sim-dir", str(board), "--id", KID, "--lane", lane,
                                     "--keystore", str(ks), "--timeout", "5", *extra])


def device_key(board: Path) -> str:
    return str(json.loads((board / "config.json").read_text())["key"])


def test_provisioned_sim_board_handshakes_with_the_host_keystore(board: Path,
                                                                 tmp_path: Path) -> None:
    ks = tmp_path / "keys" / "keystore.jsonl"
    r = run(board, ks)
    assert r.exit_code == 0, r.output
    cfg = json.loads((board / "config.json").read_text())
    assert cfg["id"] == KID and cfg["lane"] == "lane-1" and len(bytes.fromhex(cfg["key"])) == 32
    assert Keystore(ks).get(KID.encode()) == bytes.fromhex(cfg["key"])
    assert (board / "config.json").stat().st_mode & 0o777 == 0o600
    assert ks.stat().st_mode & 0o777 == 0o600
    assert not (board / "config.json.new").exists()
    assert cfg["key"] not in r.output and cfg["key"].upper() not in r.output
    for line in ("[pass] device key written: provisioned: /config.json with id and lane (0600)",
                 "[pass] handshake: with the new key; firmware hexiao-fw 0.1.0, board sim",
                 "[pass] rules pushed: default classifier rules acknowledged",
                 "[pass] test beep: the device sounded ok and lit blue",
                 'id = "hx-0001"',
                 "PASS: 7 of 7 required checks passed"):
        assert line in r.output
    assert "[pass] test scan: the scan engine's read of HEXIAO-TEST reached the host" in r.output
    # independently of provision's own self-test: the device boots from what was written and
    # opens a session with the key the host keystore holds
    with _running_sim(board) as (port, _device, _scanner), DirectDevice(port, ks, KID, 10) as dev:
        assert dev.info()["device"] == KID
        assert dev.health()["firmware"] == "hexiao-fw 0.1.0"


def test_json_checklist_has_no_key(board: Path, tmp_path: Path) -> None:
    r = run(board, tmp_path / "ks.jsonl", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["ok"] is True
    status = {c["name"]: (c["status"], c["required"]) for c in doc["checks"]}
    assert status["ping"] == ("pass", True) and status["test beep"] == ("pass", False)
    assert device_key(board) not in r.output


def test_refuses_to_reprovision_without_force_then_force_replaces_the_key(
        board: Path, tmp_path: Path) -> None:
    ks = tmp_path / "ks.jsonl"
    assert run(board, ks).exit_code == 0
    first = device_key(board)
    again = run(board, ks)
    assert again.exit_code == 3
    assert again.output == (
        "Error: refused: the device is already provisioned (id 'hx-0001', lane 'lane-1'); re-run "
        "with --force to re-provision: a new key replaces the old one on the device and in the "
        "keystore (restart hostd afterwards)\n")
    assert device_key(board) == first
    forced = run(board, ks, "--force", lane="lane-2")
    assert forced.exit_code == 0, forced.output
    assert "re-provisioned (new key)" in forced.output
    second = device_key(board)
    assert second != first and Keystore(ks).get(KID.encode()) == bytes.fromhex(second)
    assert json.loads((board / "config.json").read_text())["lane"] == "lane-2"
    assert len(Keystore(ks)) == 1


def test_an_id_with_a_key_already_is_refused(board: Path, tmp_path: Path) -> None:
    ks = tmp_path / "ks.jsonl"
    Keystore(ks, create=True).add(KID.encode(), os.urandom(32))
    r = run(board, ks)
    assert r.exit_code == 3
    assert f"device id 'hx-0001' already has a key in {ks} (another device with this id?)" \
        in r.output
    assert not (board / "config.json").exists()


def test_unsafe_keystore_is_refused_and_nothing_is_written(board: Path, tmp_path: Path) -> None:
    ks = tmp_path / "ks.jsonl"
    ks.write_text("")
    ks.chmod(0o644)
    r = run(board, ks)
    assert r.exit_code == 4
    assert f"Error: refused: {ks}: mode 0644 lets other users read it" in r.output
    assert not (board / "config.json").exists() and not (board / "config.json.new").exists()


def test_no_firmware_on_the_board_is_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    r = run(bare, tmp_path / "ks.jsonl")
    assert r.exit_code == 4
    assert (f"Error: refused: no firmware on the sim board ({bare}/hexiao/firmware/main.mpy is "
            f"missing): install it first with `hexiao flash BUNDLE --sim-dir {bare}`") in r.output
    assert list(bare.iterdir()) == [] and not (tmp_path / "ks.jsonl").exists()


def test_a_device_that_does_not_start_fails_the_checklist(board: Path, tmp_path: Path) -> None:
    (board / "hexiao" / "firmware" / "main.mpy").write_bytes(b"not an mpy file")
    ks = tmp_path / "ks.jsonl"
    r = run(board, ks)
    assert r.exit_code == 1, r.output
    assert "[FAIL] device starts: the firmware did not boot: device exited (1)" in r.output
    assert "[skip] handshake: not run: an earlier check failed" in r.output
    assert "[skip] rules pushed: not run: an earlier check failed" in r.output
    assert "FAIL: 2 of 7 required checks passed" in r.output  # key written and recorded
    assert device_key(board) not in r.output


def test_a_wrong_key_fails_the_check(board: Path, tmp_path: Path) -> None:
    ks = tmp_path / "ks.jsonl"
    assert run(board, ks).exit_code == 0
    Keystore(ks).add(KID.encode(), os.urandom(32), replace=True)  # the host's copy is wrong now
    r = CliRunner().invoke(main, ["--sim-dir", str(board), "--id", KID, "--lane", "lane-1",
                                  "--keystore", str(ks), "--check", "--timeout", "2"])
    assert r.exit_code == 1, r.output
    assert "[pass] device starts" in r.output
    assert ("[FAIL] handshake: no handshake from a device on" in r.output
            and "its frames were refused (mac)" in r.output)
    assert "[skip] ping: not run: an earlier check failed" in r.output
    assert device_key(board) not in r.output


def test_config_names_the_keystore_and_refuses_an_unknown_lane(board: Path,
                                                               tmp_path: Path) -> None:
    toml = tmp_path / "hostd.toml"
    toml.write_text('[keystore]\npath = "ks.jsonl"\n[[lane]]\nname = "front"\n')
    bad = CliRunner().invoke(main, ["--sim-dir", str(board), "--id", KID, "--lane", "back",
                                    "--config", str(toml)])
    assert bad.exit_code == 4
    assert f"Error: refused: lane 'back' is not a [[lane]] in {toml} (lanes: front)" in bad.output
    ok = CliRunner().invoke(main, ["--sim-dir", str(board), "--id", KID, "--lane", "front",
                                   "--config", str(toml)])
    assert ok.exit_code == 0, ok.output
    assert KID.encode() in Keystore(tmp_path / "ks.jsonl")
    assert '[[device]]\nid = "hx-0001"\nport = "' in ok.output and '/tty"' in ok.output


def test_usage_errors(board: Path, tmp_path: Path) -> None:
    both = CliRunner().invoke(main, ["--sim-dir", str(board), "--port", "/dev/null", "--id",
                                     KID, "--lane", "l", "--keystore", "k"])
    assert both.exit_code == 2 and "give exactly one of --sim-dir DIR or --port PORT" in both.output
    hexid = run(board, tmp_path / "ks.jsonl", "--id", "hex:00ff")
    assert hexid.exit_code == 4 and "a device id is 1..16 bytes of text" in hexid.output


def test_fw_pubkey_and_production_are_written_and_flash_then_refuses(board: Path,
                                                                     tmp_path: Path) -> None:
    from hexiao.tools.install import flash, keys

    pub = keys.generate(tmp_path / "sign.key")
    r = run(board, tmp_path / "ks.jsonl", "--fw-pubkey", str(tmp_path / "sign.key.pub"),
            "--production")
    assert r.exit_code == 0, r.output
    assert "[pass] firmware key written: fw_key" in r.output and "[pass] production" in r.output
    state = board / "state"
    assert (state / "fw_key").read_text() == keys._raw(pub).hex()  # what fw_update reads
    assert (state / "production").exists() and state.stat().st_mode & 0o777 == 0o700
    assert not list(state.glob("*.new"))
    # `hexiao flash` refuses it in one line: a good bundle, signed by the device's key
    from hexiao.tools.install import bundle

    good = bundle.build_bundle("sim", "1.0.0", 1, keys.load_private_key(tmp_path / "sign.key"),
                               tmp_path)
    before = sorted(p.relative_to(board) for p in board.rglob("*"))
    f = CliRunner().invoke(flash.main, [str(good), "--pubkey", str(tmp_path / "sign.key.pub"),
                                        "--sim-dir", str(board), "--yes"])
    assert f.exit_code == 27 and f.output.count("\n") == 1, f.output
    assert f.output.startswith("Error: production: the device is in production mode: its files "
                               "change only through signed updates")
    assert sorted(p.relative_to(board) for p in board.rglob("*")) == before  # nothing written


def test_production_without_a_firmware_key_is_refused_and_a_bad_key_file_too(
        board: Path, tmp_path: Path) -> None:
    r = run(board, tmp_path / "ks.jsonl", "--production")
    assert r.exit_code == 4 and r.output.count("\n") == 1, r.output
    assert "--production needs --fw-pubkey KEY.pub" in r.output
    assert not (board / "config.json").exists() and not (board / "state").exists()
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    r = run(board, tmp_path / "ks.jsonl", "--fw-pubkey", str(bad))
    assert r.exit_code == 4 and r.output.startswith("Error: refused: --fw-pubkey: "), r.output
    assert not (board / "config.json").exists()
    r = run(board, tmp_path / "ks.jsonl")  # without one: provisioned, and told so
    assert r.exit_code == 0 and "note: no --fw-pubkey: the device refuses every firmware " \
        "update" in r.output
    assert not (board / "state" / "fw_key").exists()
