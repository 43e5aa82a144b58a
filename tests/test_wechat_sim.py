"""The WeChat card API simulator, over real HTTP on loopback.

Every test talks to a real server (in-process thread, or the `hexiao` console script in a
subprocess) with httpx, and once with wechatpy, a standard third-party WeChat client. Time is a
clock the test moves; nothing sleeps to make a point.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.seed import EXAMPLE, STATES, SeedError, parse
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.sim.state import (
    ERRMSG,
    STABLE_PER_MINUTE,
    SimState,
    encrypt_code,
)
from hexiao.tools.sim import cli as sim_cli
from wechatpy import WeChatClient
from wechatpy.exceptions import WeChatClientException

APP, SECRET = "wx00000000000000a1", "test-secret-a1-0000000000000000"
APP2, SECRET2 = "wx00000000000000b2", "test-secret-b2-0000000000000000"
DAY = 86_400

# card_id -> card_type and value fields, one of each simulated type
CARD_VALUES = {
    "pCash": ("CASH", {"least_cost": 10000, "reduce_cost": 2000}),
    "pDiscount": ("DISCOUNT", {"discount": 20}),
    "pGift": ("GIFT", {"gift": "一杯咖啡"}),
    "pGroupon": ("GROUPON", {"deal_detail": "双人套餐"}),
    "pGeneral": ("GENERAL_COUPON", {"default_detail": "第二杯半价"}),
    "pMember": ("MEMBER_CARD", {"prerogative": "积分", "supply_bonus": True,
                                "supply_balance": False}),
}
STATE_CODE = {state: f"9000000000{i:02d}" for i, state in enumerate(STATES)}  # all on pCash
CODE = STATE_CODE["NORMAL"]


def make_seed(**behaviour: Any) -> dict[str, Any]:
    cards: list[dict[str, Any]] = [
        {"card_id": cid, "card_type": t, "title": f"title of {cid}", **values}
        for cid, (t, values) in CARD_VALUES.items()]
    cards[0]["date_info"] = {"type": "DATE_TYPE_FIX_TIME_RANGE", "begin_timestamp": "-1d",
                             "end_timestamp": "+10d"}
    cards += [
        {"card_id": "pStore", "card_type": "CASH", "title": "one store", "reduce_cost": 100,
         "location_id_list": [401], "sub_merchant_id": 77},
        {"card_id": "pExpired", "card_type": "CASH", "title": "expired", "reduce_cost": 100,
         "date_info": {"type": "DATE_TYPE_FIX_TIME_RANGE", "begin_timestamp": "-9d",
                       "end_timestamp": "-1d"}},
        {"card_id": "pFuture", "card_type": "CASH", "title": "future", "reduce_cost": 100,
         "date_info": {"type": "DATE_TYPE_FIX_TIME_RANGE", "begin_timestamp": "+2d",
                       "end_timestamp": "+9d"}},
        {"card_id": "pTerm", "card_type": "GIFT", "title": "term", "gift": "cake",
         "date_info": {"type": "DATE_TYPE_FIX_TERM", "fixed_begin_term": 1, "fixed_term": 3}},
        {"card_id": "pCustom", "card_type": "CASH", "title": "custom", "reduce_cost": 100,
         "use_custom_code": True},
        {"card_id": "pOtherApp", "appid": APP2, "card_type": "GIFT", "title": "b2", "gift": "x"},
    ]
    codes: list[dict[str, Any]] = [
        {"code": c, "card_id": "pCash", "state": s} for s, c in STATE_CODE.items()]
    codes += [{"code": f"7{i:011d}", "card_id": cid} for i, cid in enumerate(CARD_VALUES)]
    codes += [
        {"code": "800000000001", "card_id": "pExpired"},
        {"code": "800000000002", "card_id": "pFuture"},
        {"code": "800000000003", "card_id": "pTerm", "received_at": "-2d"},
        {"code": "800000000004", "card_id": "pCustom"},
        {"code": "800000000005", "card_id": "pOtherApp"},
        {"code": "800000000006", "card_id": "pCash", "encrypt_code": "SEEDED/enc+code==",
         "openid": "oAlice", "outer_str": "shelf-3"},
    ]
    return {"_comment": "ignored", "apps": [
        {"appid": APP, "secret": SECRET, "token_daily_quota": 5},
        {"appid": APP2, "secret": SECRET2}],
        "behaviour": behaviour, "cards": cards, "codes": codes}


@pytest.fixture
def slept() -> list[float]:
    return []


@pytest.fixture
def sim(clock: Clock, slept: list[float]) -> Iterator[WeChatSim]:
    # sleeps are recorded, not slept: latency is checked by what the server asked for
    with WeChatSim(make_seed(), clock=clock, sleep=slept.append) as server:
        yield server


@pytest.fixture
def http(sim: WeChatSim) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        yield client


def get_token(http: httpx.Client, appid: str = APP, secret: str = SECRET) -> str:
    r = http.get("/cgi-bin/token",
                 params={"grant_type": "client_credential", "appid": appid, "secret": secret})
    assert r.status_code == 200
    return r.json()["access_token"]


def call(http: httpx.Client, path: str, token: str | None, body: Any) -> dict[str, Any]:
    params = {} if token is None else {"access_token": token}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, params=params, content=content)
    assert r.status_code == 200, r.text
    return r.json()


def errcode(reply: dict[str, Any], expected: int) -> None:
    assert reply["errcode"] == expected, reply
    assert reply["errmsg"].startswith(ERRMSG[expected] + " rid: ")


def admin(http: httpx.Client, path: str, body: Any = None) -> dict[str, Any]:
    r = http.post(path, json=body or {}) if body is not None or path != "/_sim/state" \
        else http.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def state(http: httpx.Client) -> dict[str, Any]:
    return http.get("/_sim/state").json()


# --- access tokens -----------------------------------------------------------------------------

def test_token_is_issued_with_expiry_and_works(http: httpx.Client) -> None:
    r = http.get("/cgi-bin/token",
                 params={"grant_type": "client_credential", "appid": APP, "secret": SECRET})
    reply = r.json()
    assert set(reply) == {"access_token", "expires_in"} and reply["expires_in"] == 7200
    assert r.headers["content-type"].startswith("application/json")
    assert call(http, "/card/code/get", reply["access_token"], {"code": CODE})["errcode"] == 0


@pytest.mark.parametrize(("params", "expected"), [
    ({"grant_type": "password", "appid": APP, "secret": SECRET}, 40002),
    ({"grant_type": "client_credential", "secret": SECRET}, 41002),
    ({"grant_type": "client_credential", "appid": APP}, 41004),
    ({"grant_type": "client_credential", "appid": "wxnobody", "secret": SECRET}, 40013),
    ({"grant_type": "client_credential", "appid": APP, "secret": SECRET2}, 40125),
])
def test_token_errors(http: httpx.Client, params: dict[str, str], expected: int) -> None:
    errcode(http.get("/cgi-bin/token", params=params).json(), expected)


def test_token_expires_after_expires_in(http: httpx.Client, clock: Clock) -> None:
    token = get_token(http)
    clock.now += 7199
    assert call(http, "/card/code/get", token, {"code": CODE})["errcode"] == 0
    clock.now += 1
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 42001)


def test_newer_token_invalidates_the_old_one_after_the_grace(http: httpx.Client,
                                                             clock: Clock) -> None:
    old = get_token(http)
    other_app = get_token(http, APP2, SECRET2)
    new = get_token(http)
    clock.now += 299
    assert call(http, "/card/code/get", old, {"code": CODE})["errcode"] == 0
    clock.now += 1
    errcode(call(http, "/card/code/get", old, {"code": CODE}), 40001)
    assert call(http, "/card/code/get", new, {"code": CODE})["errcode"] == 0
    # a token of another appid is not replaced
    assert call(http, "/card/get", other_app, {"card_id": "pOtherApp"})["errcode"] == 0
    assert state(http)["apps"][APP]["valid_tokens"] == 1


def test_tokens_invalidated_now_by_admin(http: httpx.Client) -> None:
    token, other = get_token(http), get_token(http, APP2, SECRET2)
    admin(http, "/_sim/tokens/invalidate", {"appid": APP})
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 40001)
    assert call(http, "/card/get", other, {"card_id": "pOtherApp"})["errcode"] == 0
    admin(http, "/_sim/tokens/invalidate", {})
    errcode(call(http, "/card/get", other, {"card_id": "pOtherApp"}), 40001)
    assert call(http, "/card/code/get", get_token(http), {"code": CODE})["errcode"] == 0


# --- stable_token (getStableAccessToken) -------------------------------------------------------

def stable(http: httpx.Client, force: bool | None = None, appid: str = APP,
           secret: str = SECRET) -> dict[str, Any]:
    body: dict[str, Any] = {"grant_type": "client_credential", "appid": appid, "secret": secret}
    if force is not None:
        body["force_refresh"] = force
    r = http.post("/cgi-bin/stable_token", json=body)
    assert r.status_code == 200
    return r.json()


def works(http: httpx.Client, token: str) -> bool:
    reply = call(http, "/card/code/get", token, {"code": CODE, "check_consume": False})
    assert reply["errcode"] in (0, 40001, 42001), reply
    return reply["errcode"] == 0


def test_stable_token_is_shared_while_valid(http: httpx.Client, clock: Clock) -> None:
    first = stable(http)
    assert set(first) == {"access_token", "expires_in"} and first["expires_in"] == 7200
    clock.now += 1000
    again = stable(http, force=False)  # any number of tills: the same token, what is left of it
    assert again == {"access_token": first["access_token"], "expires_in": 6200}
    # isolated from cgi-bin/token: a fetch there replaces nothing here
    get_token(http)
    clock.now += 6000  # 200 s left, inside the platform's 5 minutes: a new one
    new = stable(http)
    assert new["access_token"] != first["access_token"] and new["expires_in"] == 7200
    assert works(http, first["access_token"]) and works(http, new["access_token"])  # overlap
    clock.now += 200
    assert not works(http, first["access_token"])  # it lived out its own time: 42001
    assert stable(http)["access_token"] == new["access_token"]
    assert state(http)["requests"]["cgi-bin/stable_token"] == 4
    assert state(http)["apps"][APP]["force_refreshes_today"] == 0
    assert state(http)["token_refusals"] == {"42001": 1}


def test_force_refresh_replaces_the_token_at_most_every_30_s(http: httpx.Client,
                                                             clock: Clock) -> None:
    leaked = stable(http)["access_token"]
    second = stable(http, force=True)["access_token"]
    assert second != leaked
    assert works(http, leaked)  # one forced call: the old token still works for a while
    clock.now += 29
    assert stable(http, force=True)["access_token"] == second  # too soon: nothing changes
    assert stable(http)["access_token"] == second
    clock.now += 1
    third = stable(http, force=True)["access_token"]  # 30 s after the first: the leak is dead
    assert third not in (leaked, second)
    assert not works(http, leaked) and works(http, second) and works(http, third)
    clock.now += 300  # the one the last force replaced: gone after the grace
    assert not works(http, second) and works(http, third)
    assert state(http)["token_refusals"] == {"40001": 2}
    assert state(http)["apps"][APP]["force_refreshes_today"] == 3


def test_force_refresh_daily_limit(clock: Clock) -> None:
    seed = make_seed()
    seed["apps"][0]["force_refresh_daily_quota"] = 2
    with WeChatSim(seed, clock=clock) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(2):
            stable(http, force=True)
            clock.now += 30
        errcode(stable(http, force=True), 45009)
        current = stable(http)  # the normal mode is not limited by it
        assert works(http, current["access_token"])
        clock.now = (T0 // DAY + 1) * DAY - 8 * 3600  # midnight China time
        assert stable(http, force=True)["access_token"] != current["access_token"]


def test_revoked_stable_token_is_handed_out_until_a_force_refresh(http: httpx.Client) -> None:
    token = stable(http)["access_token"]
    admin(http, "/_sim/tokens/invalidate", {"appid": APP})  # a fault: the platform kills it
    assert stable(http)["access_token"] == token and not works(http, token)
    fresh = stable(http, force=True)["access_token"]
    assert fresh != token and works(http, fresh)


def test_stable_token_minute_limit(clock: Clock) -> None:
    # the rules without HTTP (state.py): 10 000 calls a minute per appid, then 45011
    sim = SimState(make_seed(), clock)
    body = json.dumps({"grant_type": "client_credential", "appid": APP,
                       "secret": SECRET}).encode()
    clock.now = (T0 // 60 + 1) * 60  # the start of a minute
    for _ in range(STABLE_PER_MINUTE):
        assert json.loads(sim.api("POST", "/cgi-bin/stable_token", {}, body).body)["expires_in"]
    errcode(json.loads(sim.api("POST", "/cgi-bin/stable_token", {}, body).body), 45011)
    clock.now += 60
    assert "access_token" in json.loads(sim.api("POST", "/cgi-bin/stable_token", {}, body).body)


@pytest.mark.parametrize(("body", "expected"), [
    ({"grant_type": "password", "appid": APP, "secret": SECRET}, 40002),
    ({"grant_type": "client_credential", "secret": SECRET}, 41002),
    ({"grant_type": "client_credential", "appid": APP}, 41004),
    ({"grant_type": "client_credential", "appid": "wxnobody", "secret": SECRET}, 40013),
    ({"grant_type": "client_credential", "appid": APP, "secret": SECRET2}, 40125),
    ({"grant_type": "client_credential", "appid": APP, "secret": SECRET,
      "force_refresh": "yes"}, 47001),
    ({"grant_type": "client_credential", "appid": 5, "secret": SECRET}, 47001),
    (b"{bad", 47001), ([1], 47001)])
def test_stable_token_errors(http: httpx.Client, body: Any, expected: int) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    errcode(http.post("/cgi-bin/stable_token", content=content).json(), expected)
    # a GET, or the secret in the query string as for cgi-bin/token: refused
    errcode(http.get("/cgi-bin/stable_token", params={
        "grant_type": "client_credential", "appid": APP, "secret": SECRET}).json(), 43002)
    assert state(http)["apps"][APP]["valid_tokens"] == 0


@pytest.mark.parametrize(("token", "expected"), [(None, 41001), ("", 41001), ("junk", 40001)])
def test_missing_or_unknown_token(http: httpx.Client, token: str | None, expected: int) -> None:
    errcode(call(http, "/card/code/consume", token, {"code": CODE}), expected)
    assert state(http)["codes"][CODE]["consume_attempts"] == 0


def test_token_daily_quota_resets_at_china_midnight(http: httpx.Client, clock: Clock) -> None:
    tokens = [get_token(http) for _ in range(5)]  # the seed's quota is 5 a day
    errcode(http.get("/cgi-bin/token", params={
        "grant_type": "client_credential", "appid": APP, "secret": SECRET}).json(), 45009)
    assert call(http, "/card/code/get", tokens[-1], {"code": CODE})["errcode"] == 0
    assert state(http)["apps"][APP]["token_requests_today"] == 5
    clock.now = (T0 // DAY + 1) * DAY - 8 * 3600  # next midnight in UTC+8
    assert get_token(http)


def test_quota_exhausted_fault(http: httpx.Client) -> None:
    token = get_token(http)
    admin(http, "/_sim/faults", {"quota_exhausted": ["cgi-bin/token"]})
    errcode(http.get("/cgi-bin/token", params={
        "grant_type": "client_credential", "appid": APP, "secret": SECRET}).json(), 45009)
    assert call(http, "/card/code/get", token, {"code": CODE})["errcode"] == 0
    admin(http, "/_sim/faults", {"quota_exhausted": ["*"]})
    errcode(call(http, "/card/code/consume", token, {"code": CODE}), 45009)
    assert state(http)["codes"][CODE]["consume_count"] == 0


def test_api_daily_quota(clock: Clock) -> None:
    seed = make_seed()
    seed["apps"][0]["api_daily_quota"] = 2
    with WeChatSim(seed, clock=clock) as server, httpx.Client(base_url=server.url) as http:
        token = get_token(http)
        for _ in range(2):
            assert call(http, "/card/code/get", token, {"code": CODE})["errcode"] == 0
        errcode(call(http, "/card/code/get", token, {"code": CODE}), 45009)
        assert call(http, "/card/get", token, {"card_id": "pCash"})["errcode"] == 0


# --- requests the API refuses ------------------------------------------------------------------

def test_wrong_method(http: httpx.Client) -> None:
    token = get_token(http)
    errcode(http.get("/card/code/get", params={"access_token": token}).json(), 43002)
    errcode(http.post("/cgi-bin/token", params={"grant_type": "client_credential"}).json(), 43001)


@pytest.mark.parametrize("body", [b"{bad", b"", b"[1]", b"\xff\xfe{}", b'"code"',
                                  b'{"code": ["1"]}', b'{"code": "1", "card_id": 5}',
                                  b'{"code": "900000000000", "check_consume": "yes"}'])
def test_bad_json_body(http: httpx.Client, body: bytes) -> None:
    errcode(call(http, "/card/code/get", get_token(http), body), 47001)


def test_unknown_paths_answer_40066_as_the_platform_does(http: httpx.Client) -> None:
    for r in (http.post("/card/code/unknown", content=b"{}"), http.get("/cgi-bin/nothing"),
              http.post("/card/codes/get", params={"access_token": "x"}, content=b"{}")):
        assert r.status_code == 200
        errcode(r.json(), 40066)
    r = http.get("/_sim/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert http.post("/_sim/state").status_code == 405


@pytest.mark.parametrize(("header", "status"), [
    (b"Transfer-Encoding: chunked", b"411"), (b"Content-Length: 99999999", b"413"),
    (b"Content-Length: many", b"413")])
def test_bodies_without_a_sane_length_are_refused(sim: WeChatSim, header: bytes,
                                                  status: bytes) -> None:
    with socket.create_connection(("127.0.0.1", sim.port)) as s:
        s.sendall(b"POST /card/code/get HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n{}")
        assert s.recv(100).startswith(b"HTTP/1.1 " + status)


# --- card/code/get -----------------------------------------------------------------------------

def test_code_get_normal(http: httpx.Client) -> None:
    reply = call(http, "/card/code/get", get_token(http), {"code": "800000000006"})
    assert reply == {
        "errcode": 0, "errmsg": "ok",
        "card": {"card_id": "pCash", "begin_time": int(T0) - DAY, "end_time": int(T0) + 10 * DAY,
                 "code": "800000000006"},
        "openid": "oAlice", "can_consume": True, "user_card_status": "NORMAL",
        "outer_str": "shelf-3"}


@pytest.mark.parametrize("state_", STATES)
def test_code_get_without_check_reports_every_state(http: httpx.Client, state_: str) -> None:
    reply = call(http, "/card/code/get", get_token(http),
                 {"code": STATE_CODE[state_], "check_consume": False})
    assert reply["errcode"] == 0 and reply["user_card_status"] == state_
    assert reply["can_consume"] is (state_ == "NORMAL")  # a gift that timed out: not either


@pytest.mark.parametrize(("state_", "expected"), [
    ("CONSUMED", 40099), ("GIFTING", 40127), ("DELETE", 40127), ("UNAVAILABLE", 40127),
    ("EXPIRE", 40127), ("GIFT_SUCC", 40056), ("GIFT_TIMEOUT", 40127)])
def test_code_get_with_check_answers_errcodes(http: httpx.Client, state_: str,
                                              expected: int) -> None:
    token = get_token(http)
    errcode(call(http, "/card/code/get", token, {"code": STATE_CODE[state_]}), expected)
    errcode(call(http, "/card/code/get", token,
                 {"code": STATE_CODE[state_], "check_consume": True}), expected)


def test_check_consume_errcodes_can_be_switched_off(clock: Clock) -> None:
    seed = make_seed(consumed_check_40099=False, abnormal_check_40127=False)
    with WeChatSim(seed, clock=clock) as server, httpx.Client(base_url=server.url) as http:
        token = get_token(http)
        for state_ in ("CONSUMED", "GIFTING", "DELETE"):
            reply = call(http, "/card/code/get", token, {"code": STATE_CODE[state_]})
            assert (reply["errcode"], reply["user_card_status"]) == (0, state_)
            assert reply["can_consume"] is False


def test_date_window(http: httpx.Client, clock: Clock) -> None:
    token = get_token(http)
    expired = call(http, "/card/code/get", token, {"code": "800000000001", "check_consume": False})
    assert expired["user_card_status"] == "EXPIRE" and expired["can_consume"] is False
    errcode(call(http, "/card/code/consume", token, {"code": "800000000001"}), 40127)
    future = call(http, "/card/code/get", token, {"code": "800000000002"})
    assert future["user_card_status"] == "NORMAL"
    assert future["card"]["begin_time"] == int(T0) + 2 * DAY
    # can_consume ignores the window by default: the client has to check begin_time itself
    assert future["can_consume"] is True
    errcode(call(http, "/card/code/consume", token, {"code": "800000000002"}), 40079)
    clock.now += 11 * DAY  # past pCash's end: a NORMAL code now reads as expired
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 42001)
    reply = call(http, "/card/code/get", get_token(http), {"code": CODE, "check_consume": False})
    assert reply["user_card_status"] == "EXPIRE"


def test_can_consume_can_follow_the_window(clock: Clock) -> None:
    with WeChatSim(make_seed(can_consume_checks_window=True), clock=clock) as server, \
            httpx.Client(base_url=server.url) as http:
        reply = call(http, "/card/code/get", get_token(http), {"code": "800000000002"})
        assert (reply["user_card_status"], reply["can_consume"]) == ("NORMAL", False)


def test_fixed_term_window_starts_from_receipt(http: httpx.Client) -> None:
    reply = call(http, "/card/code/get", get_token(http), {"code": "800000000003"})
    received = int(T0) - 2 * DAY
    assert reply["card"]["begin_time"] == received + DAY
    assert reply["card"]["end_time"] == received + 4 * DAY - 1


def test_fixed_term_codes_can_have_their_own_dates(clock: Clock) -> None:
    seed = make_seed()
    seed["codes"] += [
        {"code": "800000000007", "card_id": "pTerm", "begin_time": "-3d", "end_time": "-1h"},
        {"code": "800000000008", "card_id": "pTerm", "begin_time": "+1h", "end_time": "+2d"},
        {"code": "800000000009", "card_id": "pTerm", "end_time": int(T0) + 60}]
    with WeChatSim(seed, clock=clock) as server, httpx.Client(base_url=server.url) as http:
        token = get_token(http)
        over = call(http, "/card/code/get", token, {"code": "800000000007", "check_consume": False})
        assert (over["card"]["begin_time"], over["card"]["end_time"]) == \
            (int(T0) - 3 * DAY, int(T0) - 3600)
        assert over["user_card_status"] == "EXPIRE"
        errcode(call(http, "/card/code/consume", token, {"code": "800000000007"}), 40127)
        errcode(call(http, "/card/code/consume", token, {"code": "800000000008"}), 40079)
        # only its end given: it begins as the card's terms say (received -1d, +1 day)
        mine = call(http, "/card/code/get", token, {"code": "800000000009"})
        assert (mine["card"]["begin_time"], mine["card"]["end_time"]) == (int(T0), int(T0) + 60)
        assert call(http, "/card/code/consume", token, {"code": "800000000009"})["errcode"] == 0
        # the same card's other code keeps the window of its own receipt
        other = call(http, "/card/code/get", token, {"code": "800000000003"})
        assert other["card"]["begin_time"] == int(T0) - DAY


# --- card/code/consume -------------------------------------------------------------------------

def test_consume_exactly_once(http: httpx.Client) -> None:
    token = get_token(http)
    assert call(http, "/card/code/consume", token, {"code": "800000000006"}) == {
        "errcode": 0, "errmsg": "ok", "card": {"card_id": "pCash"}, "openid": "oAlice"}
    errcode(call(http, "/card/code/consume", token, {"code": "800000000006"}), 40099)
    reply = call(http, "/card/code/get", token, {"code": "800000000006", "check_consume": False})
    assert reply["user_card_status"] == "CONSUMED"
    entry = state(http)["codes"]["800000000006"]
    assert (entry["consume_count"], entry["consume_attempts"]) == (1, 2)


def test_concurrent_consumes_commit_once(sim: WeChatSim, http: httpx.Client) -> None:
    token, lanes = get_token(http), 16
    start = threading.Barrier(lanes)
    results: list[int] = []

    def lane() -> None:
        with httpx.Client(base_url=sim.url, timeout=10) as own:
            start.wait()
            results.append(call(own, "/card/code/consume", token, {"code": CODE})["errcode"])

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0] + [40099] * (lanes - 1)
    assert state(http)["codes"][CODE]["consume_count"] == 1


@pytest.mark.parametrize(("body", "expected"), [
    ({"code": "123456789012"}, 40056),  # no such code
    ({"code": CODE, "card_id": "pDiscount"}, 40056),  # not this card's code
    ({"code": ""}, 41013),
    ({"code": "800000000004"}, 41012),  # custom code without its card_id
    ({"code": "800000000005"}, 40056),  # another official account's code
    ({"code": STATE_CODE["GIFTING"]}, 40127),
    ({"code": STATE_CODE["DELETE"]}, 40127),
    ({"code": STATE_CODE["UNAVAILABLE"]}, 40127),
    ({"code": STATE_CODE["EXPIRE"]}, 40127),
    ({"code": STATE_CODE["GIFT_SUCC"]}, 40056),
    ({"code": STATE_CODE["CONSUMED"]}, 40099),
    ({"code": STATE_CODE["GIFT_TIMEOUT"]}, 40127),  # the platform refuses a timed-out gift
    ({"code": "700000000005"}, 40071),  # a member card: identified, never consumed
])
def test_consume_refusals_change_nothing(http: httpx.Client, body: dict[str, str],
                                         expected: int) -> None:
    before = state(http)["codes"]
    errcode(call(http, "/card/code/consume", get_token(http), body), expected)
    after = state(http)["codes"]
    assert {c: (e["state"], e["consume_count"]) for c, e in after.items()} == \
        {c: (e["state"], e["consume_count"]) for c, e in before.items()}


def test_consume_accepts_custom_code_with_card_id_and_a_numeric_code(http: httpx.Client) -> None:
    token = get_token(http)
    ok = call(http, "/card/code/consume", token, {"code": "800000000004", "card_id": "pCustom"})
    assert ok["card"] == {"card_id": "pCustom"}
    assert call(http, "/card/code/consume", token, {"code": int(CODE)})["errcode"] == 0


def test_member_card_is_identified_but_never_consumed(http: httpx.Client) -> None:
    token = get_token(http)
    reply = call(http, "/card/code/get", token, {"code": "700000000005"})
    assert (reply["card"]["card_id"], reply["user_card_status"]) == ("pMember", "NORMAL")
    errcode(call(http, "/card/code/consume", token, {"code": "700000000005"}), 40071)
    entry = state(http)["codes"]["700000000005"]
    assert (entry["state"], entry["consume_count"]) == ("NORMAL", 0)


# --- card/code/unavailable ---------------------------------------------------------------------

def test_unavailable_makes_a_code_unusable(http: httpx.Client) -> None:
    token = get_token(http)
    assert call(http, "/card/code/unavailable", token,
                {"code": CODE, "reason": "misprinted"}) == {"errcode": 0, "errmsg": "ok"}
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 40127)
    reply = call(http, "/card/code/get", token, {"code": CODE, "check_consume": False})
    assert (reply["user_card_status"], reply["can_consume"]) == ("UNAVAILABLE", False)
    errcode(call(http, "/card/code/consume", token, {"code": CODE}), 40127)
    assert state(http)["codes"][CODE]["consume_count"] == 0
    # and its refusals: the state each code is in, and the body's form
    errcode(call(http, "/card/code/unavailable", token, {"code": CODE}), 40127)
    errcode(call(http, "/card/code/unavailable", token, {"code": STATE_CODE["CONSUMED"]}), 40099)
    errcode(call(http, "/card/code/unavailable", token, {"code": "123456789012"}), 40056)
    errcode(call(http, "/card/code/unavailable", token, {"code": "800000000004"}), 41012)
    errcode(call(http, "/card/code/unavailable", token, {"code": "800000000006",
                                                         "reason": 5}), 47001)
    errcode(call(http, "/card/code/unavailable", "junk", {"code": "800000000006"}), 40001)
    assert state(http)["codes"]["800000000006"]["state"] == "NORMAL"


# --- card/code/decrypt -------------------------------------------------------------------------

def test_decrypt(http: httpx.Client) -> None:
    token = get_token(http)
    derived = state(http)["codes"][CODE]["encrypt_code"]
    assert derived == encrypt_code("hexiao-sim", CODE)
    assert call(http, "/card/code/decrypt", token, {"encrypt_code": derived})["code"] == CODE
    assert call(http, "/card/code/decrypt", token,
                {"encrypt_code": "SEEDED/enc+code=="})["code"] == "800000000006"
    # still URL-encoded, as it arrives in a redirect URL: the real API refuses it too
    quoted = urllib.parse.quote(derived, safe="")
    assert quoted != derived
    errcode(call(http, "/card/code/decrypt", token, {"encrypt_code": quoted}), 40075)
    errcode(call(http, "/card/code/decrypt", token, {"encrypt_code": "AAAA"}), 40075)
    errcode(call(http, "/card/code/decrypt", token, {}), 41011)
    other = encrypt_code("hexiao-sim", "800000000005")
    errcode(call(http, "/card/code/decrypt", token, {"encrypt_code": other}), 40075)


# --- card/get ----------------------------------------------------------------------------------

@pytest.mark.parametrize("card_id", list(CARD_VALUES))
def test_card_get_value_fields(http: httpx.Client, card_id: str) -> None:
    card_type, values = CARD_VALUES[card_id]
    card = call(http, "/card/get", get_token(http), {"card_id": card_id})["card"]
    assert card["card_type"] == card_type and set(card) == {"card_type", card_type.lower()}
    body = card[card_type.lower()]
    assert {k: body[k] for k in values} == values
    base = body["base_info"]
    assert (base["id"], base["title"], base["use_all_locations"]) == \
        (card_id, f"title of {card_id}", True)
    assert base["date_info"]["type"] == "DATE_TYPE_FIX_TIME_RANGE"


def test_card_get_merchant_restriction_and_fixed_term(http: httpx.Client) -> None:
    token = get_token(http)
    base = call(http, "/card/get", token, {"card_id": "pStore"})["card"]["cash"]["base_info"]
    assert base["location_id_list"] == [401] and base["use_all_locations"] is False
    assert base["sub_merchant_info"] == {"merchant_id": 77}
    gift = call(http, "/card/get", token, {"card_id": "pTerm"})["card"]["gift"]
    assert gift["base_info"]["date_info"] == {"type": "DATE_TYPE_FIX_TERM", "fixed_term": 3,
                                              "fixed_begin_term": 1}
    assert gift["gift"] == "cake"


@pytest.mark.parametrize(("body", "expected"), [
    ({}, 41012), ({"card_id": "pNobody"}, 40073), ({"card_id": "pOtherApp"}, 40073)])
def test_card_get_errors(http: httpx.Client, body: dict[str, str], expected: int) -> None:
    errcode(call(http, "/card/get", get_token(http), body), expected)


# --- fault injection ---------------------------------------------------------------------------

def test_busy_answers_minus_one_and_changes_nothing(http: httpx.Client) -> None:
    token = get_token(http)
    admin(http, "/_sim/faults", {"busy_rate": 1.0})
    errcode(call(http, "/card/code/consume", token, {"code": CODE}), -1)
    errcode(http.get("/cgi-bin/token", params={
        "grant_type": "client_credential", "appid": APP, "secret": SECRET}).json(), -1)
    assert state(http)["codes"][CODE]["consume_count"] == 0
    admin(http, "/_sim/faults", {"busy_rate": 0})
    assert call(http, "/card/code/consume", token, {"code": CODE})["errcode"] == 0


def test_busy_rate_is_a_seeded_random_sequence(http: httpx.Client) -> None:
    token = get_token(http)

    def pattern() -> list[int]:
        admin(http, "/_sim/faults", {"busy_rate": 0.5, "rng_seed": 7})
        return [call(http, "/card/get", token, {"card_id": "pCash"})["errcode"]
                for _ in range(30)]

    first = pattern()
    assert set(first) == {0, -1}
    assert pattern() == first


def test_latency_with_jitter(http: httpx.Client, slept: list[float]) -> None:
    admin(http, "/_sim/faults", {"latency_ms": 200, "jitter_ms": 50, "rng_seed": 3})
    token = get_token(http)
    for _ in range(5):
        call(http, "/card/code/get", token, {"code": CODE})
    state(http)  # admin calls get no latency
    assert len(slept) == 6 and all(0.15 <= s <= 0.25 for s in slept)
    assert len(set(slept)) > 1
    first = list(slept)
    slept.clear()
    admin(http, "/_sim/faults", {"rng_seed": 3})
    get_token(http)
    for _ in range(5):
        call(http, "/card/code/get", token, {"code": CODE})
    assert slept == first


def test_latency_is_real_on_the_wire(clock: Clock) -> None:
    seed = make_seed()
    seed["faults"] = {"latency_ms": 5000}
    # default sleep: the reply really is late, so a short client timeout fires
    with WeChatSim(seed, clock=clock) as server, \
            httpx.Client(base_url=server.url, timeout=0.2) as http, \
            pytest.raises(httpx.ReadTimeout):
        get_token(http)


@pytest.mark.parametrize("mode", ["close", "http500", "busy"])
def test_drop_after_commit(http: httpx.Client, mode: str) -> None:
    token = get_token(http)
    admin(http, "/_sim/faults", {"drop_after_commit": {"mode": mode, "count": 1}})
    if mode == "close":
        with pytest.raises(httpx.RemoteProtocolError):
            http.post("/card/code/consume", params={"access_token": token},
                      json={"code": CODE})
    elif mode == "http500":
        r = http.post("/card/code/consume", params={"access_token": token}, json={"code": CODE})
        assert r.status_code == 500 and r.headers["content-type"] == "text/html"
    else:
        errcode(call(http, "/card/code/consume", token, {"code": CODE}), -1)
    after = state(http)
    assert after["codes"][CODE]["consume_count"] == 1  # the consume happened all the same
    assert after["codes"][CODE]["state"] == "CONSUMED" and after["dropped_replies"] == 1
    # a blind retry is refused; the code was consumed once
    errcode(call(http, "/card/code/consume", token, {"code": CODE}), 40099)
    # count was 1: the next consume's reply arrives
    assert call(http, "/card/code/consume", token, {"code": "800000000006"})["errcode"] == 0
    assert state(http)["codes"][CODE]["consume_count"] == 1


def test_drop_after_commit_only_for_listed_codes(http: httpx.Client, slept: list[float]) -> None:
    token = get_token(http)
    admin(http, "/_sim/faults", {"drop_after_commit": {
        "mode": "close", "count": -1, "codes": ["800000000006"], "delay_ms": 1500}})
    assert call(http, "/card/code/consume", token, {"code": CODE})["errcode"] == 0
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/card/code/consume", params={"access_token": token},
                  json={"code": "800000000006"})
    assert slept == [1.5] and state(http)["dropped_replies"] == 1


def test_scripted_replies_then_normal_service(http: httpx.Client) -> None:
    token = get_token(http)
    admin(http, "/_sim/faults", {"script": [
        {"path": "card/code/get", "body": '{"errcode":0,"errm'},
        {"path": "/card/code/get", "status": 502, "body": "bad gateway"},
        {"path": "card/code/get", "json": {"errcode": 0, "surprise": True}}]})
    first = http.post("/card/code/get", params={"access_token": token}, json={"code": CODE})
    with pytest.raises(json.JSONDecodeError):
        first.json()
    assert http.post("/card/code/get", params={"access_token": token},
                     json={"code": CODE}).status_code == 502
    assert call(http, "/card/code/get", token, {"code": CODE}) == {"errcode": 0, "surprise": True}
    assert call(http, "/card/code/get", token, {"code": CODE})["user_card_status"] == "NORMAL"


# --- admin endpoints ---------------------------------------------------------------------------

def test_faults_patch_and_validation(http: httpx.Client) -> None:
    admin(http, "/_sim/faults", {"latency_ms": 10})
    faults = admin(http, "/_sim/faults", {"busy_rate": 0.25})["faults"]
    assert (faults["latency_ms"], faults["busy_rate"]) == (10, 0.25)
    assert http.get("/_sim/faults").json()["faults"] == faults
    for bad, key in [({"busy_rate": 2}, "faults.busy_rate"), ({"typo": 1}, "faults.typo"),
                     ({"drop_after_commit": {"mode": "explode"}}, "drop_after_commit.mode"),
                     ({"script": [{"path": "x"}]}, "faults.script[0]")]:
        r = http.post("/_sim/faults", json=bad)
        assert r.status_code == 400 and key in r.json()["error"], r.text
    assert http.post("/_sim/faults", content=b"{nope").status_code == 400
    assert http.get("/_sim/faults").json()["faults"] == faults


def test_reset_restores_the_seed(http: httpx.Client, clock: Clock) -> None:
    token = get_token(http)
    call(http, "/card/code/consume", token, {"code": CODE})
    admin(http, "/_sim/faults", {"busy_rate": 1})
    admin(http, "/_sim/clock", {"advance": 3600})
    snap = admin(http, "/_sim/reset", {})
    assert snap["codes"][CODE]["state"] == "NORMAL" and snap["codes"][CODE]["consume_count"] == 0
    assert snap["faults"]["busy_rate"] == 0 and snap["clock_offset"] == 0
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 40001)  # tokens are gone
    new_seed = make_seed()
    new_seed["codes"] = new_seed["codes"][:1]
    assert list(admin(http, "/_sim/reset", {"seed": new_seed})["codes"]) == [STATE_CODE["NORMAL"]]
    r = http.post("/_sim/reset", json={"seed": {"apps": []}})
    assert r.status_code == 400 and "apps" in r.json()["error"]


def test_clock_and_code_upsert(http: httpx.Client) -> None:
    token = get_token(http)
    assert admin(http, "/_sim/clock", {"advance": 7200})["now"] == T0 + 7200
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 42001)
    assert admin(http, "/_sim/clock", {"set": T0})["now"] == T0
    token = get_token(http)
    admin(http, "/_sim/codes", {"code": CODE, "state": "DELETE"})
    errcode(call(http, "/card/code/get", token, {"code": CODE}), 40127)
    admin(http, "/_sim/codes", {"code": "555555555555", "card_id": "pGift"})
    assert call(http, "/card/code/consume", token, {"code": "555555555555"})["errcode"] == 0
    for path, bad in [("/_sim/codes", {"code": "1"}), ("/_sim/codes", {"code": CODE,
                      "state": "LOST"}), ("/_sim/clock", {"advance": "soon"}),
                      ("/_sim/clock", {})]:
        assert http.post(path, json=bad).status_code == 400


# --- seeds -------------------------------------------------------------------------------------

def _broken(change: str) -> dict[str, Any]:
    seed = make_seed()
    exec(change, {"s": seed})  # a one-line edit of a good seed, shown in the test id
    return seed


@pytest.mark.parametrize(("change", "message"), [
    ("s['apps'] = []", "apps: expected a non-empty list"),
    ("s['colour'] = 1", "colour: unknown key"),
    ("s['cards'][0]['card_type'] = 'LUCKY_MONEY'", "cards[0].card_type: expected one of"),
    ("s['cards'][0]['reduce_cost'] = '20'", 'cards[0].reduce_cost: expected an integer (fen'),
    ("del s['cards'][0]['reduce_cost']", "cards[0].reduce_cost: missing"),
    ("s['cards'][1]['discount'] = 100", "cards[1].discount: expected an integer percent off"),
    ("s['cards'][0]['date_info']['end_timestamp'] = 'tomorrow'",
     "cards[0].date_info.end_timestamp: expected Unix seconds or"),
    ("s['cards'][0]['appid'] = 'wxnobody'", "cards[0].appid: \"wxnobody\" is not one of"),
    ("s['codes'][0]['card_id'] = 'pNobody'", "codes[0].card_id: \"pNobody\" is not a card"),
    ("s['codes'][0]['state'] = 'USED'", "codes[0].state: expected one of"),
    ("s['codes'].append(dict(s['codes'][0]))", "appears twice"),
    ("s['behaviour'] = {'expires_in': 0}", "behaviour.expires_in: expected an integer"),
    ("s['faults'] = {'busy_rate': -1}", "faults.busy_rate: expected a probability"),
    ("s['codes'][0]['begin_time'] = 'now'",
     "codes[0].begin_time: only codes of a DATE_TYPE_FIX_TERM card have their own dates"),
    ("s['codes'][16].update(begin_time='now', end_time='-3d')",  # 16: a pTerm code
     "codes[16].end_time: expected a time after begin_time"),
    ("s['codes'][16]['end_time'] = 'soon'", "codes[16].end_time: expected Unix seconds"),
    ("s['apps'][0]['force_refresh_daily_quota'] = -1",
     "apps[0].force_refresh_daily_quota: expected an integer"),
])
def test_seed_errors_name_the_key(change: str, message: str) -> None:
    with pytest.raises(SeedError) as info:
        parse(_broken(change), T0)
    assert message in str(info.value)


def test_example_seed_is_consistent(clock: Clock) -> None:
    seed = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    with WeChatSim(seed, clock=clock) as server, httpx.Client(base_url=server.url) as http:
        app = seed["apps"][0]
        token = get_token(http, app["appid"], app["secret"])
        for card in seed["cards"]:
            if card.get("appid", app["appid"]) == app["appid"]:
                got = call(http, "/card/get", token, {"card_id": card["card_id"]})
                assert got["card"]["card_type"] == card["card_type"]
        for code in seed["codes"]:
            reply = call(http, "/card/code/get", token, {
                "code": code["code"], "card_id": code["card_id"], "check_consume": False})
            assert reply["errcode"] == 0 and reply["card"]["card_id"] == code["card_id"]
            if code.get("state", "NORMAL") != "NORMAL":
                assert reply["user_card_status"] == code["state"]


# --- a standard third-party client: wechatpy ---------------------------------------------------

def test_wechatpy_speaks_to_the_simulator(sim: WeChatSim, http: httpx.Client) -> None:
    class SimClient(WeChatClient):
        # wechatpy 1.8.18 hard-codes https://api.weixin.qq.com in fetch_access_token and in
        # WeChatCard.API_BASE_URL: point both at the simulator, change nothing else
        def __init__(self, base: str) -> None:
            super().__init__(APP, SECRET)
            self.base = base
            self.API_BASE_URL = f"{base}/cgi-bin/"
            self.card.API_BASE_URL = f"{base}/"

        def fetch_access_token(self) -> dict[str, Any]:
            return self._fetch_access_token(url=f"{self.base}/cgi-bin/token", params={
                "grant_type": "client_credential", "appid": self.appid, "secret": self.secret})

    client = SimClient(sim.url)
    got = client.card.get_code(CODE)
    assert (got["user_card_status"], got["card"]["card_id"]) == ("NORMAL", "pCash")
    assert client.card.get("pDiscount")["discount"]["discount"] == 20
    enc = encrypt_code("hexiao-sim", CODE)
    assert client.card.decrypt_code(enc) == CODE
    admin(http, "/_sim/tokens/invalidate", {})  # wechatpy refetches on 40001 and retries
    assert client.card.consume_code(CODE)["card"] == {"card_id": "pCash"}
    with pytest.raises(WeChatClientException) as info:
        client.card.consume_code(CODE)
    assert info.value.errcode == 40099
    after = state(http)
    assert after["apps"][APP]["token_requests_today"] == 2
    assert after["codes"][CODE]["consume_count"] == 1


# --- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_subprocess(tmp_path: Path, signum: int) -> None:
    seed_file = tmp_path / "seed.json"
    seed_file.write_text(json.dumps(make_seed()), encoding="utf-8")
    hexiao = Path(sys.executable).parent / "hexiao"
    proc = subprocess.Popen([str(hexiao), "sim", "wechat", "--port", "0", "--seed",
                             str(seed_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    watchdog = threading.Timer(30, proc.kill)  # a hung simulator fails the test, never hangs it
    watchdog.start()
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        with httpx.Client(base_url=url, timeout=10) as http:
            token = get_token(http)
            assert call(http, "/card/code/consume", token, {"code": CODE})["errcode"] == 0
            assert state(http)["codes"][CODE]["consume_count"] == 1
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "POST /card/code/consume 200 errcode=0" in err and "stopped" in err
    for secret in (SECRET, token, CODE):
        assert secret not in err + out


def test_cli_seed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken("s['codes'][0]['state'] = 'USED'")), encoding="utf-8")
    result = CliRunner().invoke(sim_cli.main, ["wechat", "--seed", str(bad)])
    assert result.exit_code == 2 and "codes[0].state" in result.output
    bad.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(sim_cli.main, ["wechat", "--seed", str(bad)])
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_cli_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(sim_cli.main, ["wechat", "--port", str(port)])
    assert result.exit_code == 1 and "choose another --port" in result.output


def test_log_never_shows_secrets_tokens_or_codes(clock: Clock) -> None:
    log = io.StringIO()
    with WeChatSim(make_seed(), clock=clock, log=log) as server, \
            httpx.Client(base_url=server.url) as http:
        token = get_token(http)
        call(http, "/card/code/consume", token, {"code": CODE})
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            # http.server's "Bad request syntax" error quotes the whole request line
            s.sendall(f"GET /cgi-bin/token?secret={SECRET} junk HTTP/1.1\r\n\r\n".encode())
            assert b"Bad request syntax" in s.recv(1000)
    text = log.getvalue()
    assert "GET /cgi-bin/token 200" in text
    assert "Bad request syntax ('GET /cgi-bin/token?..." in text
    for secret in (SECRET, token, CODE):
        assert secret not in text
