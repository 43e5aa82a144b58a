"""Points at the till (hostd/members/service.py): a member card scanned on a lane earns the
points of the receipt the tap sees for that lane, and the device is told.

The service over the real pieces (the simulator on loopback HTTP, the journal file, the
redemption engine identifying the card); receipts as the tap hands them over. Then once for
real end to end: hexiao-hostd with [tap] on, the MicroPython device peer on a pty scanning the
member card, a POS printing through the tap with python-escpos, and the device's late info
verdict. The clock is the test's in the service tests; waits are bounded guards (LONG).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_hostd_daemon
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.seed import EXAMPLE
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.lanes import verdicts
from hexiao.hostd.members.service import PointsService, to_fen
from hexiao.hostd.redeem import Engine, Verdict
from hexiao.hostd.tap.receipt import Receipt
from hexiao.hostd.web import app, view
from hexiao.protocol import messages
from test_hostd_daemon import LONG, lane, outcome
from test_hostd_tap import key_file, tap_config, with_tap  # noqa: F401  (key_file: a fixture)
from test_tap_proxy import FakePrinter, pos_print, printer, wait_until  # noqa: F401

SEED: dict[str, Any] = json.loads(Path(EXAMPLE).read_text())
APPID, SECRET = SEED["apps"][0]["appid"], SEED["apps"][0]["secret"]
MEMBER = "829304756182"  # bonus 120; rule: 1 point per 100 fen, at most 500 a sale
OTHER_APP_MEMBER = "829304756199"


def seed() -> dict[str, Any]:
    s = json.loads(json.dumps(SEED))
    s["cards"].append({"card_id": "pOtherMerchantMember", "appid": SEED["apps"][1]["appid"],
                       "card_type": "MEMBER_CARD", "title": "别家会员卡", "prerogative": "x",
                       "supply_bonus": True, "bonus_rule": {"cost_money_unit": 1,
                                                            "increase_bonus": 1}})
    s["codes"].append({"code": OTHER_APP_MEMBER, "card_id": "pOtherMerchantMember"})
    return s


@pytest.fixture
def sim(clock: Clock) -> Iterator[WeChatSim]:
    with WeChatSim(seed(), clock=clock) as server:
        yield server


def client(sim: WeChatSim) -> WeChatCardClient:
    return WeChatCardClient(sim.url, APPID, SECRET, sleep=lambda s: None)


@pytest.fixture
def told() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def service(sim: WeChatSim, tmp_path: Path, clock: Clock,
            told: list[tuple[str, dict[str, Any]]]) -> Iterator[PointsService]:
    svc = PointsService(tmp_path / "journal.db", lambda: client(sim),
                        tell=lambda device, msg: told.append((device, msg)), clock=clock,
                        member_ttl_s=600).start()
    yield svc
    svc.stop()


def scan(sim: WeChatSim, tmp_path: Path, code: str, scan_id: int = 5) -> Verdict:
    with Journal(tmp_path / "journal.db") as journal, client(sim) as c:
        return Engine(journal, c).redeem(code, T0, {"device": "till-1", "scan_id": scan_id,
                                                    "time_ms": 1000 + scan_id})


def receipt(total: str | None, digest: str = "d1", index: int = 0) -> Receipt:
    return Receipt(index=index, lines=["合计: ¥" + (total or "??")], printed=True,
                   total=None if total is None else Decimal(total), digest=digest)


def bonus(sim: WeChatSim) -> tuple[int, int]:
    m = sim.state.snapshot()["codes"][MEMBER]
    return m["bonus"], m["bonus_updates"]


def test_a_member_scanned_earns_the_receipts_points_and_the_device_is_told(
        sim: WeChatSim, tmp_path: Path, service: PointsService,
        told: list[tuple[str, dict[str, Any]]]) -> None:
    v = scan(sim, tmp_path, MEMBER)
    assert (v.outcome, v.card_type) == ("identified", "MEMBER_CARD")
    service.member_scanned("till-1", "lane-1", v)
    service.receipts("lane-1", [receipt("123.45")])
    service.wait_idle()
    assert bonus(sim) == (243, 1)
    [(device, msg)] = told
    assert device == "till-1" and msg["scan_id"] == 5
    assert msg["text"] == "积分 +123 共243 …6182"
    assert messages.OUTCOMES[msg["outcome"]] == "info"
    assert messages.LEDS[msg["led"]] == "green"
    assert messages.decode(messages.encode(msg))["text"] == msg["text"]  # schema-valid
    # the same receipt handed over again (the tap restarted): credited once
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER, 6))
    service.receipts("lane-1", [receipt("123.45")])
    service.wait_idle()
    assert bonus(sim) == (243, 1) and len(told) == 1


def test_no_member_no_points_and_another_lanes_member_is_not_this_sale(
        sim: WeChatSim, tmp_path: Path, service: PointsService,
        told: list[tuple[str, dict[str, Any]]]) -> None:
    service.receipts("lane-1", [receipt("50.00")])
    service.member_scanned("till-2", "lane-2", scan(sim, tmp_path, MEMBER))
    service.receipts("lane-1", [receipt("60.00", "d2")])
    service.wait_idle()
    assert bonus(sim) == (120, 0) and told == []
    assert "lane-2" in service.members  # still waiting for lane-2's receipt


def test_an_unreadable_total_credits_nothing_and_the_member_waits_for_the_real_one(
        sim: WeChatSim, tmp_path: Path, service: PointsService,
        caplog: pytest.LogCaptureFixture) -> None:
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER))
    with caplog.at_level(logging.WARNING, "hexiao.points"):
        service.receipts("lane-1", [receipt(None), receipt("10.005", "d2")])
        service.wait_idle()
    assert bonus(sim) == (120, 0)
    assert sum("total unreadable" in r.getMessage() for r in caplog.records) == 2
    service.receipts("lane-1", [receipt("10.00", "d3")])
    service.wait_idle()
    assert bonus(sim) == (130, 1)


def test_a_member_with_no_receipt_in_time_is_dropped_with_a_log_line(
        sim: WeChatSim, tmp_path: Path, service: PointsService, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER))
    service.wait_idle()
    clock.now += 601
    with caplog.at_level(logging.WARNING, "hexiao.points"):
        service.receipts("lane-1", [receipt("99.00")])
        service.wait_idle()
    assert bonus(sim) == (120, 0)
    assert any("dropped: no receipt within 600 s" in r.getMessage() and "…6182" in
               r.getMessage() and MEMBER not in r.getMessage() for r in caplog.records)
    assert service.members == {}


def test_another_merchants_member_card_is_refused_and_earns_nothing(
        sim: WeChatSim, tmp_path: Path, service: PointsService) -> None:
    v = scan(sim, tmp_path, OTHER_APP_MEMBER)
    assert (v.outcome, v.reason) == ("refused", "invalid_code")
    service.member_scanned("till-1", "lane-1", v)
    service.receipts("lane-1", [receipt("99.00")])
    service.wait_idle()
    assert service.members == {}
    assert sim.state.snapshot()["codes"][OTHER_APP_MEMBER]["bonus_updates"] == 0


def test_a_refund_receipt_takes_the_points_back_once(
        sim: WeChatSim, tmp_path: Path, service: PointsService,
        told: list[tuple[str, dict[str, Any]]]) -> None:
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER, 1))
    service.receipts("lane-1", [receipt("80.00", "sale")])
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER, 2))
    service.receipts("lane-1", [receipt("-80.00", "refund")])
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER, 3))
    service.receipts("lane-1", [receipt("-80.00", "refund")])  # the same refund again
    service.wait_idle()
    assert bonus(sim) == (120, 2)
    assert [m["text"] for _, m in told] == ["积分 +80 共200 …6182", "积分退回 -80 共120 …6182"]


@pytest.mark.parametrize("total, fen", [("32.50", 3250), ("-3.5", -350), ("0", 0),
                                        ("1.234", None), (None, None)])
def test_to_fen(total: str | None, fen: int | None) -> None:
    assert to_fen(None if total is None else Decimal(total)) == fen


def test_the_points_text_fits_the_line_whatever_the_numbers() -> None:
    from hexiao.hostd.members.credit import Result
    from hexiao.hostd.members.ledger import Credit
    from hexiao.hostd.members.service import Member, points_message

    c = Credit(1, "r", "lane-1", MEMBER, "p", 1, 1, "done", "credited", None, 0, 0, 1, 0, 0, {})
    m = Member(MEMBER, "p", "till-1", 9, T0)
    for r in (Result(c, "credited", 10_000_000, 2**31 - 1), Result(c, "unknown"),
              Result(c, "not_credited", why="errcode 40127 " * 5), Result(c, "nothing")):
        text = points_message(m, r)["text"]
        assert len(text.encode()) <= verdicts.TEXT_MAX and text.endswith("…6182")


# --- for real: hostd, the device, the POS printing through the tap ---------------------------

def test_hostd_credits_a_member_from_the_receipt_printed_through_the_tap(
        mpy_stage: Path, tmp_path: Path, printer: FakePrinter,  # noqa: F811
        key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    tap = tap_config(key_file, f"tcp:127.0.0.1:{printer.port}", claim_listen="127.0.0.1:0")
    with WeChatSim(seed()) as real_sim, with_tap(monkeypatch, tap), \
            lane(mpy_stage, tmp_path, real_sim, [MEMBER]) as ln:
        first, = ln.verdicts(1)
        assert outcome(first) == "identified"
        assert test_hostd_daemon.LONG == LONG
        wait_until(lambda: "lane-1" in ln.daemon.points.members)
        port = int(ln.daemon.handlers.status()["tap"]["listening"].rsplit(":", 1)[1])
        pos_print(port, total="32.50")
        _, told = ln.verdicts(2)
        assert told["scan_id"] == first["scan_id"]
        assert outcome(told) == "info" and told["text"] == "积分 +32 共152 …6182"
        m = real_sim.state.snapshot()["codes"][MEMBER]
        assert (m["bonus"], m["bonus_updates"]) == (152, 1)
        # the next receipt, no member scanned: nothing
        pos_print(port, total="20.00")
        wait_until(lambda: ln.daemon.tap.state()["counters"]["receipts"] == 2)
        ln.daemon.points.wait_idle()
        assert real_sim.state.snapshot()["codes"][MEMBER]["bonus_updates"] == 1
        # the customer claims each receipt's QR: the first was credited at the till already
        first_qr, second_qr = (rec.receipts[0].content for rec in sorted(
            ln.daemon.tap.proxy.finished, key=lambda rec: rec.job_ids[:1] or [0])
            if rec.receipts)
        url = f"{ln.daemon.claims.url}/points/claim"

        def claim(qr: str) -> httpx.Response:
            return httpx.post(url, json={"token": qr.rsplit("/", 1)[1], "code": MEMBER,
                                         "card_id": "pHexiaoSimMemberCardxxxxxxxxx"},
                              timeout=LONG)
        assert claim(first_qr).json()["error"] == "already_claimed"
        assert claim(second_qr).json() == {"ok": True, "points": 20, "bonus": 172}
        assert claim(second_qr).status_code == 409
        assert real_sim.state.snapshot()["codes"][MEMBER]["bonus_updates"] == 2
        # status (control and the web page) shows today's points
        points = ln.daemon.handlers.status()["points"]
        assert {k: points[k] for k in ("state", "credited", "receipts", "taken_back", "pending",
                                       "needs_person", "claim_url")} == {
            "state": "on", "credited": 52, "receipts": 2, "taken_back": 0, "pending": 0,
            "needs_person": [], "claim_url": ln.daemon.claims.url}
        snap = view.snapshot(ln.daemon.handlers, refresh_s=2)
        card = snap["points"]
        assert (card["level"], card["credited"], card["receipts"]) == ("ok", 52, 2)
        page = app._env().get_template("live.html").render(s=snap)
        assert "member points today" in page and "52 points · 2 receipts" in page
        # the POS voids the last sale (作废 in the header, no number): its points go back, once
        for _ in range(2):
            pos_print(port, shop="*** 作废 VOID ***", total="20.00")
        wait_until(lambda: ln.daemon.tap.state()["counters"]["receipts"] == 4)
        ln.daemon.points.wait_idle()
        m = real_sim.state.snapshot()["codes"][MEMBER]
        assert (m["bonus"], m["bonus_updates"]) == (152, 3)
        assert ln.daemon.handlers.status()["points"]["taken_back"] == -20


def test_the_status_card_shows_points_that_need_a_person() -> None:
    card = view.points({"state": "on", "credited": 10, "receipts": 1, "taken_back": -4,
                        "pending": 1, "needs_person": [7], "running": True})
    assert (card["level"], card["needs_person"], card["pending"]) == ("warn", [7], 1)
    assert view.points({"state": "on", "running": False})["level"] == "bad"
    assert view.points({})["state"] == "off"


def test_a_restarted_service_finishes_what_a_crash_left(sim: WeChatSim, tmp_path: Path,
                                                        clock: Clock) -> None:
    """hostd died after writing a receipt's credit (planned) and after sending another's add
    (sent, landed): the next start credits the first and settles the second, once each."""
    from hexiao.hostd.members.ledger import Ledger

    with Journal(tmp_path / "journal.db") as journal, client(sim) as c:
        ledger = Ledger(journal)
        ledger.plan("lane-1|crashed-planned", "lane-1", MEMBER, "pHexiaoSimMemberCardxxxxxxxxx",
                    5000, T0)
        sent = ledger.plan("lane-1|crashed-sent", "lane-1", MEMBER,
                           "pHexiaoSimMemberCardxxxxxxxxx", 3000, T0)
        ledger.advance(sent.id, "planned", "sent", T0, points=30, before_bonus=120)
        c.add_bonus(MEMBER, "pHexiaoSimMemberCardxxxxxxxxx", 30, "小票crashed")  # it landed
        ledger.close()
    svc = PointsService(tmp_path / "journal.db", lambda: client(sim), clock=clock).start()
    try:
        svc.wait_idle()
    finally:
        svc.stop()
    assert bonus(sim) == (200, 2)  # 120 + 30 (landed before the crash) + 50, no repeat
    assert sorted(r.outcome for r in svc.results) == ["credited", "credited"]
