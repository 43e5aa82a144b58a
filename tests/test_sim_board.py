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
from typing import Any

from hexiao.tools import micropython
from test_fw_update import kit  # noqa: F401

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


def _session(port: str) -> tuple[Any, Any]:
    """A host on the board's link, session open; (link, host)."""
    from hexiao.hostd.lanes.serial_link import SerialLink, keystore_from
    from test_firmware_sim import KID, Host
    from test_fw_update import DEVICE_KEY

    host = Host(lambda scan: None)
    link = SerialLink.open(port, keystore_from({KID: DEVICE_KEY}), host.on_event)
    host.port = link
    link.start()
    try:
        host.wait(lambda: link.is_open(), 10, "the session")
    except BaseException:
        link.close()
        raise
    return link, host


def test_the_board_starts_again_when_the_firmware_resets(kit, tmp_path: Path) -> None:  # noqa: F811
    # an update through the board's link: the firmware resets to install it and again to run
    # it; `hexiao sim board` starts it each time, on a new pty that DIR/tty names
    from hexiao.protocol import fw_image
    from hexiao.tools.install import flash as F
    from test_firmware_sim import KID
    from test_fw_update import DEVICE_KEY, _raw_pub, forged, installed

    root = tmp_path / "board"
    root.mkdir()
    F.flash(kit["v1"], kit["pub"], F.DirTarget(root))
    (root / "state").mkdir(mode=0o700)
    (root / "state" / "fw_key").write_text(_raw_pub(kit["pub"]).hex())
    (root / "config.json").write_text(json.dumps({"id": KID.decode(), "key": DEVICE_KEY.hex()}))
    offer, img = forged(kit, "1.1.0", 3)
    board = _start(root)
    try:
        deadline = time.monotonic() + LONG
        while not (root / "tty").is_symlink():
            assert board.poll() is None and time.monotonic() < deadline, board.communicate()
            time.sleep(0.05)
        first = os.readlink(root / "tty")
        link, host = _session(first)
        try:
            fw_image.send(host.ask, offer, img, timeout=30)
        finally:
            link.close()
        st = None
        deadline = time.monotonic() + 4 * LONG
        while st is None or st.get("version") != "1.1.0":
            assert board.poll() is None and time.monotonic() < deadline, (st, board.poll())
            try:  # as hostd does: the port again, until the board is back and answers
                link, host = _session(os.readlink(root / "tty"))
            except (OSError, TimeoutError, AssertionError):
                time.sleep(0.2)
                continue
            try:
                st = host.ask({"type": "fw_query"}, "fw_status", 10)
            finally:
                link.close()
        assert os.readlink(root / "tty") != first
        assert st["state"] == 4 and st["why"].startswith("on trial"), st  # stable= 60 s
        assert installed(root)["version"] == "1.1.0"
        board.send_signal(signal.SIGINT)
        _, err = board.communicate(timeout=LONG)
    finally:
        if board.poll() is None:
            board.kill()
            board.wait(LONG)
    assert board.returncode == 0, err
    events = [json.loads(line) for line in (root / "events.log").read_text().splitlines()]
    assert [e for e in events if e["ev"] == "reset"] == [{"ev": "reset"}] * 2  # install, run
    assert [e["ev"] for e in events].count("boot") >= 2  # v1, then 1.1.0
