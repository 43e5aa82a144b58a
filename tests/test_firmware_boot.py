"""The device's own check at boot of what `hexiao flash` installed (firmware/main.py): a file
changed since it was installed, a missing file or a downgraded security counter keeps the whole
firmware from running. Real bundle, real flash onto the sim board's folder, real MicroPython."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from hexiao.tools import micropython
from hexiao.tools.install import bundle, keys
from hexiao.tools.install import flash as F
from test_firmware_sim import sim


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("bundles")
    keys.generate(d / "sign.key")
    key = keys.load_private_key(d / "sign.key")
    return {"v2": bundle.build_bundle("sim", "1.0.0", 2, key, d),
            "v1": bundle.build_bundle("sim", "0.9.0", 1, key, d),
            "pub": keys.load_public_key(d / "sign.key.pub")}


def flashed(bundles: dict[str, object], board: Path, which: str = "v2") -> Path:
    board.mkdir(exist_ok=True)
    F.flash(bundles[which], bundles["pub"], F.DirTarget(board))  # type: ignore[arg-type]
    return board


def boot(board: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed firmware until it stops: it refuses at once, or (stdin closed, no
    scanner) comes up and ends; stderr has its events."""
    (board / "cfg.json").write_text(json.dumps({"id": "till-1", "key": os.urandom(32).hex()}))
    argv, env = micropython.command("hexiao.firmware.main", board,
                                    heap=micropython.HEAP,
                                    args=["cfg=cfg.json", "scanner=/dev/null",
                                          f"hid={board}/hid.log", f"state={state}"])
    # stdout is the link (frames: binary), stderr the events
    return subprocess.run(argv, env=env, cwd=board, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60)


def events(r: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    out = []
    for line in r.stderr.splitlines():
        with contextlib.suppress(ValueError):  # a traceback line, say
            out.append(json.loads(line))
    return out


def test_an_intact_installation_boots_and_records_its_counter(bundles, tmp_path: Path) -> None:
    board, state = flashed(bundles, tmp_path / "board"), tmp_path / "state"
    state.mkdir()
    r = boot(board, state)
    assert [e["ev"] for e in events(r)][:1] == ["boot"], r.stderr
    assert (state / "fw_counter").read_text() == "2"


@pytest.mark.parametrize("change", ["tamper", "truncate", "remove"])
def test_a_file_changed_since_install_keeps_the_firmware_from_running(
        bundles, tmp_path: Path, change: str) -> None:
    board, state = flashed(bundles, tmp_path / "board"), tmp_path / "state"
    state.mkdir()
    victim = board / "hexiao" / "protocol" / "link.mpy"
    data = victim.read_bytes()
    if change == "tamper":
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif change == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    r = boot(board, state)
    why = ("missing " if change == "remove" else "changed since it was installed: ")
    assert r.returncode == 3, r.stderr
    assert events(r) == [{"ev": "refused", "why": why + "hexiao/protocol/link.mpy"}]


def test_a_downgrade_is_refused_by_the_device_itself(bundles, tmp_path: Path) -> None:
    """The installer refuses a downgrade; should an older firmware be copied on anyway (by
    hand, or an installer that skips the check), the device does not run it."""
    board, state = flashed(bundles, tmp_path / "board"), tmp_path / "state"
    state.mkdir()
    assert boot(board, state).returncode == 0  # counter 2 recorded
    old = flashed(bundles, tmp_path / "old", "v1")
    # the v1 installation copied over the v2 one, manifest included
    os.rename(board / "hexiao", tmp_path / "v2-files")
    os.rename(old / "hexiao", board / "hexiao")
    r = boot(board, state)
    assert r.returncode == 3
    assert events(r) == [{"ev": "refused", "why": "downgraded: security counter 1 is below 2"}]


def test_a_development_build_without_a_manifest_runs(mpy_stage: Path, tmp_path: Path) -> None:
    with sim(mpy_stage, tmp_path) as s:
        s.device.wait_for(lambda ev: [e for e in ev if e["ev"] == "boot"], 30)


def test_a_wrong_board_or_unsigned_installation_is_refused(bundles, tmp_path: Path) -> None:
    board, state = flashed(bundles, tmp_path / "board"), tmp_path / "state"
    state.mkdir()
    manifest = board / "hexiao" / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(good.replace(b'"board":"sim"', b'"board":"rp2040"'))
    r = boot(board, state)
    assert r.returncode == 3
    assert events(r) == [{"ev": "refused", "why": "built for board rp2040, this is a sim board"}]
    manifest.write_bytes(good)
    (board / "hexiao" / "manifest.sig").unlink()
    r = boot(board, state)
    assert r.returncode == 3
    assert events(r) == [{"ev": "refused", "why": "unsigned: no manifest.sig"}]
