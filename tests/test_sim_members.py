"""The WeChat simulator's member cards (points, balance, updateuser, userinfo/get) and tickets.

Real HTTP on loopback against an in-process simulator, as tests/test_wechat_sim.py; the clock is
the test's. GET /_sim/state's bonus_updates / bonus_records are what later tests use as the
exactly-once proof for points, so they are checked here against the API's own answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.seed import SeedError, parse
from hexiao.hostd.backends.sim.server import WeChatSim

APP, SECRET = "wx00000000000000a1", "test-secret-a1-0000000000000000"
APP2, SECRET2 = "wx00000000000000b2", "test-secret-b2-0000000000000000"
RULE = {"cost_money_unit": 100, "increase_bonus": 2, "max_increase_bonus": 300}
MEMBER, COUPON, OTHER = "600000000001", "600000000002", "600000000003"
MOVIE, BOARDING, MEETING, SCENIC = "610000000001", "610000000002", "610000000003", "610000000004"
SUSPENDED = "600000000004"


def make_seed() -> dict[str, Any]:
    return {
        "apps": [{"appid": APP, "secret": SECRET}, {"appid": APP2, "secret": SECRET2}],
        "cards": [
            {"card_id": "pMember", "card_type": "MEMBER_CARD", "title": "会员卡",
             "prerogative": "积分", "supply_bonus": True, "bonus_rule": RULE},
            {"card_id": "pCash", "card_type": "CASH", "title": "cash", "reduce_cost": 100},
            {"card_id": "pMember2", "appid": APP2, "card_type": "MEMBER_CARD", "title": "b2",
             "prerogative": "x"},
            {"card_id": "pMovie", "card_type": "MOVIE_TICKET", "title": "流浪地球3",
             "detail": "IMAX"},
            {"card_id": "pBoard", "card_type": "BOARDING_PASS", "title": "登机牌",
             "from": "PEK", "to": "SHA", "flight": "HX1234", "departure_time": "+3h"},
            {"card_id": "pMeet", "card_type": "MEETING_TICKET", "title": "大会",
             "meeting_detail": "A馆"},
            {"card_id": "pScenic", "card_type": "SCENIC_TICKET", "title": "游船",
             "ticket_class": "成人票"},
        ],
        "codes": [
            {"code": MEMBER, "card_id": "pMember", "bonus": 50, "balance": 1000,
             "openid": "oMember"},
            {"code": COUPON, "card_id": "pCash"},
            {"code": OTHER, "card_id": "pMember2"},
            {"code": SUSPENDED, "card_id": "pMember", "state": "UNAVAILABLE"},
            {"code": MOVIE, "card_id": "pMovie",
             "ticket": {"show_time": "+2h", "seat_number": "7排12座", "ticket_class": "3D"}},
            {"code": BOARDING, "card_id": "pBoard"},
            {"code": MEETING, "card_id": "pMeet", "ticket": {"zone": "A区"}},
            {"code": SCENIC, "card_id": "pScenic"},
        ]}


@pytest.fixture
def sim(clock: Clock) -> Iterator[WeChatSim]:
    with WeChatSim(make_seed(), clock=clock) as server:
        yield server


@pytest.fixture
def api(sim: WeChatSim) -> Iterator[Any]:
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        tokens = {}
        for appid, secret in ((APP, SECRET), (APP2, SECRET2)):
            r = http.get("/cgi-bin/token", params={"grant_type": "client_credential",
                                                   "appid": appid, "secret": secret})
            tokens[appid] = r.json()["access_token"]

        def call(path: str, body: dict[str, Any], appid: str = APP) -> dict[str, Any]:
            r = http.post(f"/{path}", params={"access_token": tokens[appid]},
                          content=json.dumps(body, ensure_ascii=False).encode())
            assert r.status_code == 200, r.text
            return r.json()
        yield call


def state(sim: WeChatSim, code: str) -> dict[str, Any]:
    return sim.state.snapshot()["codes"][code]


def test_userinfo_get_shows_points_balance_and_status(api: Any) -> None:
    r = api("card/membercard/userinfo/get", {"card_id": "pMember", "code": MEMBER})
    assert r["errcode"] == 0
    assert (r["bonus"], r["balance"], r["openid"], r["user_card_status"]) == \
        (50, 1000, "oMember", "NORMAL")
    assert r["membership_number"] == MEMBER
    assert api("card/membercard/userinfo/get", {"code": MEMBER})["errcode"] == 41012
    assert api("card/membercard/userinfo/get",
               {"card_id": "pCash", "code": COUPON})["errcode"] == 40071
    assert api("card/membercard/userinfo/get",
               {"card_id": "pMember", "code": OTHER})["errcode"] == 40056  # another merchant
    assert api("card/membercard/userinfo/get", {"card_id": "pMember", "code": "1"})[
        "errcode"] == 40056


def test_add_bonus_adds_every_time_and_keeps_the_record(sim: WeChatSim, api: Any) -> None:
    body = {"card_id": "pMember", "code": MEMBER, "add_bonus": 24, "record_bonus": "小票 r1"}
    first = api("card/membercard/updateuser", body)
    assert (first["errcode"], first["result_bonus"], first["result_balance"],
            first["openid"]) == (0, 74, 1000, "oMember")
    assert api("card/membercard/updateuser", body)["result_bonus"] == 98  # not idempotent
    s = state(sim, MEMBER)
    assert (s["bonus"], s["bonus_updates"], s["bonus_records"]) == (98, 2, ["小票 r1"] * 2)
    # an absolute value, and the balance
    r = api("card/membercard/updateuser", {"card_id": "pMember", "code": MEMBER, "bonus": 10,
                                           "add_balance": -500})
    assert (r["result_bonus"], r["result_balance"]) == (10, 500)
    assert api("card/membercard/userinfo/get", {"card_id": "pMember", "code": MEMBER})[
        "bonus"] == 10


@pytest.mark.parametrize("body, errcode", [
    ({"add_bonus": -11}, 47001),          # would leave the points below 0
    ({"add_balance": -1001}, 47001),
    ({"add_bonus": "5"}, 47001),           # a string
    ({"add_bonus": 1.5}, 47001),
    ({"add_bonus": True}, 47001),
    ({"add_bonus": 5, "record_bonus": 7}, 47001),
])
def test_updateuser_bad_input_changes_nothing(sim: WeChatSim, api: Any, body: dict[str, Any],
                                              errcode: int) -> None:
    api("card/membercard/updateuser", {"card_id": "pMember", "code": MEMBER, "bonus": 10})
    r = api("card/membercard/updateuser", {"card_id": "pMember", "code": MEMBER, **body})
    assert r["errcode"] == errcode
    assert (state(sim, MEMBER)["bonus"], state(sim, MEMBER)["balance"]) == (10, 1000)
    assert state(sim, MEMBER)["bonus_updates"] == 1


def test_updateuser_refuses_other_cards_and_abnormal_codes(sim: WeChatSim, api: Any) -> None:
    add = {"add_bonus": 5}
    assert api("card/membercard/updateuser", {"card_id": "pCash", "code": COUPON, **add})[
        "errcode"] == 40071
    assert api("card/membercard/updateuser", {"code": MEMBER, **add})["errcode"] == 41012
    assert api("card/membercard/updateuser", {"card_id": "pMember", "code": SUSPENDED, **add})[
        "errcode"] == 40127
    assert api("card/membercard/updateuser", {"card_id": "pMember2", "code": OTHER, **add})[
        "errcode"] == 40056  # APP's token, APP2's card
    assert api("card/membercard/updateuser", {"card_id": "pMember2", "code": OTHER, **add},
               appid=APP2)["errcode"] == 0
    assert state(sim, MEMBER)["bonus_updates"] == 0


def test_dropped_reply_after_a_committed_updateuser(sim: WeChatSim, api: Any) -> None:
    sim.state.admin("POST", "/_sim/faults", json.dumps(
        {"drop_after_commit": {"mode": "http500", "count": 1, "codes": [MEMBER]}}).encode())
    with httpx.Client(base_url=sim.url) as http:
        token = http.get("/cgi-bin/token", params={"grant_type": "client_credential",
                                                   "appid": APP, "secret": SECRET}).json()
        r = http.post("/card/membercard/updateuser", params={"access_token": token[
            "access_token"]}, json={"card_id": "pMember", "code": MEMBER, "add_bonus": 7})
    assert r.status_code == 500
    assert state(sim, MEMBER)["bonus"] == 57  # committed, the reply lost
    assert sim.state.snapshot()["dropped_replies"] == 1
    assert api("card/membercard/updateuser", {"card_id": "pMember", "code": MEMBER,
                                              "add_bonus": 1})["result_bonus"] == 58


def test_card_get_shows_bonus_rule_and_ticket_fields(api: Any) -> None:
    card = api("card/get", {"card_id": "pMember"})["card"]["member_card"]
    assert card["bonus_rule"] == RULE and card["supply_bonus"] is True
    board = api("card/get", {"card_id": "pBoard"})["card"]
    assert board["card_type"] == "BOARDING_PASS"
    b = board["boarding_pass"]
    assert (b["from"], b["to"], b["flight"], b["departure_time"]) == \
        ("PEK", "SHA", "HX1234", int(T0) + 3 * 3600)
    assert "landing_time" not in b  # optional and unset: absent, not null
    assert "bonus_rule" not in api("card/get", {"card_id": "pMember2"}, appid=APP2)[
        "card"]["member_card"]


def test_tickets_details_updates_and_consume(sim: WeChatSim, api: Any) -> None:
    got = api("card/code/get", {"code": MOVIE})
    assert got["movie_ticket"] == {"show_time": int(T0) + 7200, "seat_number": "7排12座",
                                   "ticket_class": "3D"}
    assert api("card/code/get", {"code": BOARDING})["boarding_pass"] == {}
    r = api("card/boardingpass/checkin", {"code": BOARDING, "passenger_name": "张三",
                                          "class": "经济舱", "seat": "32A"})
    assert r["errcode"] == 0
    assert api("card/code/get", {"code": BOARDING})["boarding_pass"] == {
        "passenger_name": "张三", "class": "经济舱", "seat": "32A"}
    assert api("card/movieticket/updateuser", {"code": MOVIE, "seat_number": "8排1座"})[
        "errcode"] == 0
    assert api("card/code/get", {"code": MOVIE})["movie_ticket"]["seat_number"] == "8排1座"
    assert api("card/movieticket/updateuser", {"code": BOARDING, "seat_number": "1"})[
        "errcode"] == 40071
    assert api("card/meetingticket/updateuser", {"code": MEETING, "begin_time": "soon"})[
        "errcode"] == 47001
    assert api("card/code/get", {"code": COUPON}).get("movie_ticket") is None
    for code in (MOVIE, SCENIC):  # tickets are consumed like coupons, once
        assert api("card/code/consume", {"code": code})["errcode"] == 0
        assert api("card/code/consume", {"code": code})["errcode"] == 40099
    assert state(sim, MOVIE)["consume_count"] == 1


@pytest.mark.parametrize("change, message", [
    ("s['codes'][1]['bonus'] = 5", "codes[1].bonus: only a MEMBER_CARD's codes have it"),
    ("s['codes'][0]['ticket'] = {}", "codes[0].ticket: only ticket codes have one"),
    ("s['codes'][4]['ticket']['seat'] = '1'", "codes[4].ticket.seat: unknown key"),
    ("s['codes'][4]['ticket']['show_time'] = 'tonight'", "codes[4].ticket.show_time: expected"),
    ("s['codes'][0]['bonus'] = -1", "codes[0].bonus: expected"),
    ("s['cards'][0]['bonus_rule'] = {'per_yuan': 1}", "cards[0].bonus_rule.per_yuan: unknown"),
    ("s['cards'][0]['bonus_rule'] = {'cost_money_unit': 0}",
     "cards[0].bonus_rule.cost_money_unit: expected fen per unit >= 1"),
    ("s['cards'][0]['bonus_rule'] = {'increase_bonus': -2}",
     "cards[0].bonus_rule.increase_bonus: expected an integer >= 0"),
    ("del s['cards'][4]['departure_time']", "cards[4].departure_time: missing"),
    ("del s['cards'][3]['detail']", "cards[3].detail: missing"),
])
def test_seed_errors_name_the_key(change: str, message: str) -> None:
    s = make_seed()
    exec(change)
    with pytest.raises(SeedError) as e:
        parse(s, T0)
    assert message in str(e.value)
