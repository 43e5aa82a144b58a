"""`hexiao sim board` as an installer runs it: one board per folder, and Ctrl-C stops it promptly
with a word (it used to take 10-12 s, silently, while a second board could start beside it and
swallow scans)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hexiao.tools import micropython

LONG = 30.0
# Ctrl-C must end the board well before the old 10 s wait; generous for a loaded machine
PROMPT_S = 8.0


def _board(mpy_stage: Path, tmp_path: Path) -> Path:
    root = tmp_path / "board"
    shutil.copytree(mpy_stage / "hexiao", root / "hexiao")
    cfg = root / "config.json"
    cfg.touch(mode=0o600)
    cfg.write_text(json.dumps({"id": "hx-0001", "key": os.urandom(32).hex()}))
    return root


def _start(root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([micropython.executable("hexiao"), "sim", "board", "--dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_board_per_folder_and_ctrl_c_stops_it_promptly(mpy_stage: Path,
                                                           tmp_path: Path) -> None:
    root = _board(mpy_stage, tmp_path)
    first = _start(root)
    try:
        deadline = time.monotonic() + LONG
        while not (root / "tty").is_symlink() and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (root / "tty").is_symlink(), first.communicate(timeout=LONG)
        second = subprocess.run([micropython.executable("hexiao"), "sim", "board", "--dir",
                                 str(root)], capture_output=True, text=True, timeout=LONG)
        assert second.returncode == 3
        assert "Traceback" not in second.stderr
        assert f"a sim board (pid {first.pid}) is already running from {root}" in second.stderr
        assert first.poll() is None and (root / "tty").is_symlink()  # untouched
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=PROMPT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(LONG)
    assert first.returncode == 0, err
    assert "sim board stopped" in err and "Traceback" not in err
    assert not (root / "tty").exists()
    again = _start(root)  # the folder is free again
    try:
        deadline = time.monotonic() + LONG
        while not (root / "tty").is_symlink() and again.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert again.poll() is None
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=LONG)


def test_an_unflashed_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([micropython.executable("hexiao"), "sim", "board", "--dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=LONG)
    assert r.returncode == 3 and "has no firmware: run `hexiao flash" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
