"""`hexiao-hostd` as a process: one hostd per journal, one line (never a traceback) when it cannot
start, a "stopping" line, readable logs on a terminal and JSON lines otherwise."""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hexiao.hostd.instance import InstanceError, journal_lock
from hexiao.hostd.observability import logs
from hexiao.tools import micropython

LONG = 30.0


def _config(tmp_path: Path, name: str, state: str = "state") -> Path:
    sock = tmp_path / f"{name}.sock"
    cfg = tmp_path / f"{name}.toml"
    # kind = "sim": the embedded simulator, so no server is needed
    cfg.write_text(f'[hostd]\nstate_dir = "{state}"\ncontrol_socket = "{sock}"\n'
                   '[backend]\nkind = "sim"\n')
    return cfg


@contextmanager
def hostd(cfg: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    sock = cfg.with_suffix(".sock")
    proc = subprocess.Popen([micropython.executable("hexiao-hostd"), "--config", str(cfg),
                             *args], stderr=subprocess.PIPE, text=True, cwd=cfg.parent)
    try:
        deadline = time.monotonic() + LONG
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(LONG)


def _run(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([micropython.executable("hexiao-hostd"), "--config", str(cfg)],
                          capture_output=True, text=True, cwd=cfg.parent, timeout=LONG)


def test_a_second_hostd_on_the_same_journal_says_so_in_one_line(tmp_path: Path) -> None:
    first = _config(tmp_path, "first")
    with hostd(first) as proc:
        same = _run(first)  # same socket and journal
        other_socket = _run(_config(tmp_path, "second"))  # its own socket, the same journal
        assert proc.poll() is None  # the first one is untouched
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=LONG)
    for second in (same, other_socket):
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert "Traceback" not in second.stderr
        assert lines[-1].startswith("hexiao-hostd: cannot start: another hexiao-hostd (pid ")
        assert "journal.sqlite3" in lines[-1] and "stop it first" in lines[-1]
    assert proc.returncode == 0
    events = [json.loads(line) for line in err.splitlines()]  # not a terminal: JSON lines
    assert [e["event"] for e in events if e["event"].startswith("stop")] == [
        "stopping (SIGTERM)", "stopped"]


def test_a_hostd_with_its_own_state_starts_beside_another(tmp_path: Path) -> None:
    with hostd(_config(tmp_path, "first")), hostd(_config(tmp_path, "second", "state2")) as p:
        assert p.poll() is None


def test_the_lock_goes_with_a_killed_hostd(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "first")
    with hostd(cfg) as proc:
        proc.kill()
        proc.wait(LONG)
    journal_lock(tmp_path / "state" / "journal.sqlite3").acquire().release()


def test_journal_lock_refuses_a_second_holder_in_one_process(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    held = journal_lock(journal).acquire()
    with pytest.raises(InstanceError, match=rf"pid {os.getpid()}") as e:
        journal_lock(journal).acquire()
    assert e.value.owner == os.getpid()
    held.release()
    journal_lock(journal).acquire().release()


def test_logs_are_readable_on_a_terminal_and_json_otherwise(monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    import logging

    plain = io.StringIO()
    logs.configure("info", plain, format="auto")
    logging.getLogger("hexiao.test").info("hostd started: %d device(s)", 2)
    assert json.loads(plain.getvalue())["event"] == "hostd started: 2 device(s)"

    main, child = pty.openpty()
    tty = os.fdopen(child, "w", closefd=True)
    try:
        for no_color in (False, True):
            if no_color:
                monkeypatch.setenv("NO_COLOR", "1")
            logs.configure("info", tty, format="auto")
            logging.getLogger("hexiao.test").info("verdict", extra={"code": "123456789012"})
            tty.flush()
            out = os.read(main, 65536).decode()
            assert "verdict" in out and not out.lstrip().startswith("{")
            assert "123456789012" not in out and "9012" in out  # redacted as in JSON
            assert ("\x1b[" in out) is not no_color
    finally:
        tty.close()
        os.close(main)
        logs.configure("info")


@pytest.mark.parametrize("what", ["secret", "keystore", "journal", "state_dir"])
def test_one_rule_for_private_files_at_check_config_and_start(tmp_path: Path, what: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    secret = tmp_path / "s"
    secret.write_text("not-a-real-secret")
    secret.chmod(0o600)
    cfg = tmp_path / "hostd.toml"
    cfg.write_text(f'[hostd]\nstate_dir = "{state}"\ncontrol_socket = "{tmp_path / "h.sock"}"\n'
                   '[backend]\nkind = "sim"\nsecret_file = "s"\n')
    loose = {"secret": secret, "keystore": state / "keystore.jsonl",
             "journal": state / "journal.sqlite3", "state_dir": state}[what]
    if not loose.exists():
        loose.write_text("")
    loose.chmod(0o755 if what == "state_dir" else 0o644)
    exe = micropython.executable("hexiao-hostd")
    for args in (["--check-config"], []):
        r = subprocess.run([exe, "--config", str(cfg), *args], capture_output=True, text=True,
                           timeout=LONG, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        fix = f"chmod 700 {state}" if what == "state_dir" else f"chmod 600 {loose}"
        (line,) = r.stderr.strip().splitlines()
        assert fix in line and "lets other users" in line
        if what == "journal":
            assert "it holds full coupon codes" in line
