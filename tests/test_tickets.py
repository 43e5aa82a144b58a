"""Tickets (film, attraction, meeting, boarding) redeem like coupons, and the verdict shows what
the cashier must check within the device's 48-byte line.

Through the engine (hostd/redeem.py) and the card API client against the simulator on loopback
HTTP; its consume_count is the exactly-once proof. The clock is the test's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.lanes import verdicts
from hexiao.hostd.redeem import Engine, LaneConfig
from hexiao.protocol import messages

APP, SECRET = "wx00000000000000a1", "test-secret-a1-0000000000000000"
SHOW, DEPART, MEET = int(T0) + 7200, int(T0) + 3 * 3600, int(T0) + 86_400
LONG = "超长的电影名称" * 6


def china(t: int, fmt: str = "%m-%d %H:%M") -> str:
    return time.strftime(fmt, time.gmtime(t + 8 * 3600))


def seed() -> dict[str, Any]:
    return {
        "apps": [{"appid": APP, "secret": SECRET}],
        "cards": [
            {"card_id": "pMovie", "card_type": "MOVIE_TICKET", "title": "流浪地球3",
             "detail": "IMAX"},
            {"card_id": "pLong", "card_type": "MOVIE_TICKET", "title": LONG, "detail": "x"},
            {"card_id": "pBoard", "card_type": "BOARDING_PASS", "title": "登机牌",
             "from": "PEK", "to": "SHA", "flight": "HX1234", "departure_time": DEPART},
            {"card_id": "pMeet", "card_type": "MEETING_TICKET", "title": "开发者大会",
             "meeting_detail": "A馆"},
            {"card_id": "pScenicDay", "card_type": "SCENIC_TICKET", "title": "西湖游船",
             "ticket_class": "成人票", "date_info": {
                 "type": "DATE_TYPE_FIX_TIME_RANGE", "begin_timestamp": "-1h",
                 "end_timestamp": "+23h"}},
            {"card_id": "pScenicYear", "card_type": "SCENIC_TICKET", "title": "年卡",
             "ticket_class": "成人票", "date_info": {
                 "type": "DATE_TYPE_FIX_TIME_RANGE", "begin_timestamp": "-1d",
                 "end_timestamp": int(T0) + 30 * 86_400}},
            {"card_id": "pOldMovie", "card_type": "MOVIE_TICKET", "title": "昨天的电影",
             "detail": "x", "date_info": {"type": "DATE_TYPE_FIX_TIME_RANGE",
                                          "begin_timestamp": "-3d", "end_timestamp": "-1d"}},
        ],
        "codes": [
            {"code": "710000000001", "card_id": "pMovie", "ticket": {
                "show_time": SHOW, "seat_number": "7排12座", "screening_room": "5号厅"}},
            {"code": "710000000002", "card_id": "pLong", "ticket": {
                "show_time": SHOW, "seat_number": "7排12座", "screening_room": "5号厅"}},
            {"code": "720000000001", "card_id": "pBoard", "ticket": {
                "passenger_name": "张三", "class": "经济舱", "seat": "32A"}},
            {"code": "730000000001", "card_id": "pMeet", "ticket": {
                "begin_time": MEET, "zone": "A区", "entrance": "2号门", "seat_number": "3排5座"}},
            {"code": "740000000001", "card_id": "pScenicDay"},
            {"code": "740000000002", "card_id": "pScenicYear"},
            {"code": "750000000001", "card_id": "pOldMovie"},
            {"code": "710000000003", "card_id": "pMovie"},  # no details set by the issuer
        ]}


@pytest.fixture
def sim(clock: Clock) -> Iterator[WeChatSim]:
    with WeChatSim(seed(), clock=clock) as server:
        yield server


@pytest.fixture
def engine(sim: WeChatSim, tmp_path: Path) -> Iterator[Engine]:
    with Journal(tmp_path / "journal.db") as journal, \
            WeChatCardClient(sim.url, APP, SECRET, sleep=lambda s: None) as client:
        yield Engine(journal, client, LaneConfig(redeemed_here_s=0))


def consumes(sim: WeChatSim, code: str) -> int:
    return int(sim.state.snapshot()["codes"][code]["consume_count"])


def shown(engine: Engine, code: str) -> tuple[str, str]:
    v = engine.redeem(code, T0)
    msg = verdicts.verdict_message(1, v)
    assert messages.decode(messages.encode(msg))["text"] == msg["text"]  # schema-valid
    text = msg["text"]
    assert len(text.encode()) <= verdicts.TEXT_MAX
    assert text.endswith(code[-4:])  # the code's tail always shows
    return v.outcome, text


@pytest.mark.parametrize("code, expected", [
    ("710000000001", f"{china(SHOW)} 7排12座 流浪地球3 5号厅"),
    ("720000000001", f"张三 HX1234 32A {china(DEPART)} PEK-SHA"),
    ("730000000001", f"{china(MEET)} A区 2号门 3排5座 开发者大会"),
    ("740000000001", f"{china(int(T0) - 3600, '%m-%d')} 成人票 西湖游船"),
    ("740000000002", f"至{china(int(T0) + 30 * 86_400, '%m-%d')} 成人票 年卡"),
    ("710000000003", "流浪地球3"),  # no details from the issuer: its title
])
def test_ticket_verdict_shows_what_to_check(sim: WeChatSim, engine: Engine, code: str,
                                            expected: str) -> None:
    outcome, text = shown(engine, code)
    assert outcome == "accepted"
    assert text == fit_line(expected, code)
    assert consumes(sim, code) == 1
    again = engine.redeem(code, T0 + 5)
    assert (again.outcome, again.reason) == ("refused", "already_used")
    assert consumes(sim, code) == 1


def fit_line(body: str, code: str) -> str:
    tail = "…" + code[-4:]
    return f"{verdicts.fit(body, verdicts.TEXT_MAX - len(tail.encode()) - 1).rstrip()} {tail}"


def test_a_long_title_gives_way_time_and_seat_stay(engine: Engine) -> None:
    outcome, text = shown(engine, "710000000002")
    assert outcome == "accepted"
    assert text.startswith(f"{china(SHOW)} 7排12座 超长")
    assert "5号厅" not in text  # cut at the end, on a character boundary
    assert len(text.encode()) <= verdicts.TEXT_MAX


def test_an_expired_ticket_is_refused_and_not_consumed(sim: WeChatSim, engine: Engine) -> None:
    v = engine.redeem("750000000001", T0)
    assert (v.outcome, v.reason) == ("refused", "expired")
    assert consumes(sim, "750000000001") == 0
    assert verdicts.text_of(v).startswith("已过期")


def test_the_journal_keeps_the_ticket_details(engine: Engine) -> None:
    v = engine.redeem("720000000001", T0)
    entry = engine.journal.get(v.entry_id or 0)
    assert entry.detail["card_type"] == "BOARDING_PASS"
    assert entry.detail["value"]["passenger_name"] == "张三"
    assert entry.detail["value"]["flight"] == "HX1234"
