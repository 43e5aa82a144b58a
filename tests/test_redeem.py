"""The redemption engine and the card API client over the real pieces.

The backend is the WeChat simulator over loopback HTTP (its /_sim/state consume_count is the
exactly-once proof), the journal a SQLite file in tmp_path, crashes a real SIGKILL of a
subprocess (tests/redeem_runner.py). Time is a clock the test holds; nothing sleeps to make a
point.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeclock import T0, Clock
from hexiao.hostd.backends.base import (
    ApiError,
    BackendError,
    Busy,
    InvalidCode,
    Offline,
    OutcomeUnknown,
    QuotaExceeded,
    TokenError,
)
from hexiao.hostd.backends.sim.seed import EXAMPLE
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal, JournalCorrupt
from hexiao.hostd.redeem import Engine, LaneConfig, Verdict, looks_encrypted

DAY = 86_400
SEED: dict[str, Any] = json.loads(Path(EXAMPLE).read_text())
APPID, SECRET = SEED["apps"][0]["appid"], SEED["apps"][0]["secret"]
CASH = "287463512093"  # 满100减20, NORMAL
CASH_CARD = "pHexiaoSimCash100minus20xxxx"
RUNNER = Path(__file__).with_name("redeem_runner.py")


@pytest.fixture
def sim(clock: Clock) -> Iterator[WeChatSim]:
    with WeChatSim(SEED, clock=clock) as server:
        yield server


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def client_for(url: str, **kw: Any) -> WeChatCardClient:
    kw.setdefault("sleep", lambda s: None)  # backoff is not what these tests measure
    return WeChatCardClient(url, APPID, SECRET, **kw)


@pytest.fixture
def client(sim: WeChatSim) -> Iterator[WeChatCardClient]:
    with client_for(sim.url) as c:
        yield c


@pytest.fixture
def journal(journal_path: Path) -> Iterator[Journal]:
    with Journal(journal_path) as j:
        yield j


@pytest.fixture
def engine(journal: Journal, client: WeChatCardClient) -> Engine:
    return Engine(journal, client, LaneConfig(location_id=1))


def state(sim: WeChatSim) -> dict[str, Any]:
    return httpx.get(f"{sim.url}/_sim/state").json()


def consumes(sim: WeChatSim, code: str) -> int:
    return state(sim)["codes"][code]["consume_count"]


def faults(sim: WeChatSim, **f: Any) -> None:
    r = httpx.post(f"{sim.url}/_sim/faults", json=f)
    assert r.status_code == 200, r.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- verdicts -----------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "outcome", "card_type", "title", "value"), [
    (CASH, "accepted", "CASH", "满100减20代金券", {"reduce_cost": 2000, "least_cost": 10000}),
    ("391827364510", "accepted", "DISCOUNT", "全场8折券", {"discount": 20}),
    ("512093847561", "accepted", "GIFT", "免费咖啡一杯", {"gift": "中杯美式咖啡一杯"}),
    ("640218375912", "accepted", "GROUPON", "双人下午茶团购券",
     {"deal_detail": "两杯拿铁 + 两块蛋糕"}),
    ("738291046573", "accepted", "GENERAL_COUPON", "会员日优惠券",
     {"default_detail": "会员日任意饮品第二杯半价"}),
    ("829304756182", "identified", "MEMBER_CARD", "核销咖啡会员卡",
     {"prerogative": "会员享积分，生日当月饮品免费一杯", "supply_bonus": True,
      "supply_balance": False}),
    ("150697887340", "accepted", "CASH", "满100减20代金券",  # a gift that timed out: back home
     {"reduce_cost": 2000, "least_cost": 10000}),
])
def test_each_card_type_gets_its_verdict(sim: WeChatSim, engine: Engine, code: str,
                                         outcome: str, card_type: str, title: str,
                                         value: dict[str, Any]) -> None:
    v = engine.redeem(code, T0)
    assert (v.outcome, v.reason, v.card_type, v.title, v.value) == (
        outcome, None, card_type, title, value)
    assert v.code_tail == "…" + code[-4:]
    assert consumes(sim, code) == (1 if outcome == "accepted" else 0)  # members: never
    (entry,) = engine.journal.entries()
    assert (entry.state, entry.outcome) == ("done", outcome)
    steps = [s.step for s in engine.journal.steps(entry.id)]
    if outcome == "accepted":
        assert steps == ["received", "get_sent", "checked", "consume_sent", "done"]
    else:
        assert "consume_sent" not in steps


@pytest.mark.parametrize(("code", "reason", "config"), [
    ("287463512094", "already_used", {}),       # CONSUMED (the service answers 40099)
    ("110293847566", "expired", {}),            # window over: the service says EXPIRE
    ("180900817673", "expired", {}),            # state EXPIRE
    ("120394857617", "not_yet_valid", {}),      # begins in 3 days: our own window check
    ("130495867128", "gifting", {}),            # 40127, then status GIFTING
    ("160798897451", "deleted", {}),
    ("170899807562", "unavailable", {}),
    ("140596877239", "invalid_code", {}),       # given away to a friend: 40056
    ("999999999999", "invalid_code", {}),       # unknown code
    ("901827364519", "not_this_merchant", {"location_id": 1}),
    ("901827364519", "not_this_merchant",  # right store, another sub-merchant configured
     {"location_id": 401234567, "sub_merchant_id": 87654321}),
    (CASH, "not_this_merchant", {"allowed_card_ids": frozenset({"pHexiaoSimGiftCoffeexxxxxxxxx"})}),
    ("CUSTOM-0001", "setup", {}),               # 41012: custom code, no card ids configured
])
def test_each_refusal_says_why_and_consumes_nothing(sim: WeChatSim, journal: Journal,
                                                    client: WeChatCardClient, code: str,
                                                    reason: str, config: dict[str, Any]) -> None:
    before = {c: s["consume_count"] for c, s in state(sim)["codes"].items()}
    v = Engine(journal, client, LaneConfig(**config)).redeem(code, T0)
    assert (v.outcome, v.reason) == ("refused", reason)
    assert {c: s["consume_count"] for c, s in state(sim)["codes"].items()} == before
    (entry,) = journal.entries()
    assert (entry.state, entry.outcome, entry.reason) == ("done", "refused", reason)


def test_store_card_accepted_at_its_own_store_and_sub_merchant(sim: WeChatSim, journal: Journal,
                                                              client: WeChatCardClient) -> None:
    cfg = LaneConfig(location_id=401234567, sub_merchant_id=12345678)
    v = Engine(journal, client, cfg).redeem("901827364519", T0)
    assert (v.outcome, v.value) == ("accepted", {"reduce_cost": 1000, "least_cost": 5000})


def test_our_clock_past_the_window_refuses_even_if_the_service_says_normal(
        sim: WeChatSim, engine: Engine) -> None:
    v = engine.redeem(CASH, T0 + 31 * DAY)  # the card ends at +30d; the service's clock is T0
    assert (v.outcome, v.reason) == ("refused", "expired")
    assert consumes(sim, CASH) == 0


def test_custom_code_with_configured_card_ids(sim: WeChatSim, journal: Journal,
                                              client: WeChatCardClient) -> None:
    cfg = LaneConfig(custom_code_card_ids=(CASH_CARD, "pHexiaoSimCustomCodeCashxxxxx"))
    v = Engine(journal, client, cfg).redeem("CUSTOM-0001", T0)
    assert (v.outcome, v.value) == ("accepted", {"reduce_cost": 500, "least_cost": 0})
    assert consumes(sim, "CUSTOM-0001") == 1


def test_encrypted_code_is_decrypted_first(sim: WeChatSim, engine: Engine) -> None:
    enc = state(sim)["codes"]["391827364510"]["encrypt_code"]
    assert looks_encrypted(enc) and not looks_encrypted(CASH)
    v = engine.redeem(enc, T0)
    assert (v.outcome, v.card_type, v.code_tail) == ("accepted", "DISCOUNT", "…4510")
    (entry,) = engine.journal.entries()
    assert entry.code == "391827364510" and entry.scanned == enc
    assert [s.step for s in engine.journal.steps(entry.id)][:4] == [
        "received", "decrypt_sent", "decrypted", "get_sent"]
    # the plain code scanned again is the same coupon, consumed here
    assert engine.redeem("391827364510", T0).reason == "redeemed_here"
    assert consumes(sim, "391827364510") == 1


def test_unknown_encrypt_code_is_an_invalid_code(sim: WeChatSim, engine: Engine) -> None:
    v = engine.redeem("A" * 43 + "=", T0)  # valid base64 of 32 bytes, no such code
    assert (v.outcome, v.reason) == ("refused", "invalid_code")


# --- busy, lost replies, reconcile -------------------------------------------------------

def test_busy_lookup_is_retried_then_refused_as_busy(sim: WeChatSim, engine: Engine) -> None:
    engine.client.token()  # the token call would be busy too
    faults(sim, busy_rate=1.0)
    v = engine.redeem(CASH, T0)
    assert (v.outcome, v.reason) == ("refused", "busy")
    assert state(sim)["requests"]["card/code/get"] == 3  # 1 + 2 retries, all safe
    assert consumes(sim, CASH) == 0
    faults(sim, busy_rate=0.0)
    assert engine.redeem(CASH, T0).outcome == "accepted"  # the code was released


def test_busy_consume_that_did_nothing_is_verified_and_refused(sim: WeChatSim,
                                                              engine: Engine) -> None:
    faults(sim, script=[{"path": "card/code/consume", "count": 1,
                         "json": {"errcode": -1, "errmsg": "system error"}}])
    v = engine.redeem(CASH, T0)
    assert (v.outcome, v.reason) == ("refused", "busy")
    assert state(sim)["requests"]["card/code/consume"] == 1  # never resent
    (entry,) = engine.journal.entries()
    assert (entry.outcome, [s.step for s in engine.journal.steps(entry.id)][-4:]) == (
        "not_consumed", ["consume_sent", "unknown", "verify_sent", "reconciled"])
    assert engine.redeem(CASH, T0).outcome == "accepted"  # scanned again: checked again
    assert consumes(sim, CASH) == 1


@pytest.mark.parametrize("mode", ["close", "http500", "busy"])
def test_consume_committed_then_reply_lost_is_verified_as_accepted(sim: WeChatSim,
                                                                   engine: Engine,
                                                                   mode: str) -> None:
    faults(sim, drop_after_commit={"mode": mode, "count": 1})
    v = engine.redeem(CASH, T0)
    assert (v.outcome, v.card_type, v.value["reduce_cost"]) == ("accepted", "CASH", 2000)
    s = state(sim)
    assert (s["dropped_replies"], s["codes"][CASH]["consume_count"]) == (1, 1)
    assert s["requests"]["card/code/consume"] == 1


def test_drop_after_commit_unknown_then_reconcile_accepts(sim: WeChatSim, journal: Journal,
                                                          client: WeChatCardClient) -> None:
    engine = Engine(journal, client, LaneConfig(verify_unknown=False))
    faults(sim, drop_after_commit={"mode": "close", "count": 1})
    v = engine.redeem(CASH, T0)
    assert (v.outcome, v.reason, v.title) == ("verify_manually", "unknown", "满100减20代金券")
    (entry,) = journal.entries()
    assert entry.state == "unknown"
    # while unknown, the code is held: a second scan neither consumes nor hears "accepted"
    assert (engine.redeem(CASH, T0).reason, consumes(sim, CASH)) == ("in_progress", 1)
    (done,) = engine.reconcile(T0 + 1)
    assert (done.outcome, done.entry_id, done.value["reduce_cost"]) == ("accepted", entry.id, 2000)
    assert journal.get(entry.id).state == "done"
    assert engine.redeem(CASH, T0).reason == "redeemed_here"  # consumed by this lane
    assert state(sim)["codes"][CASH]["consume_count"] == 1
    assert state(sim)["requests"]["card/code/consume"] == 1


def test_reconcile_waits_for_a_consume_that_may_still_be_in_flight(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    # a crash right after writing consume_sent: the consume never left
    e = journal.begin(CASH, "lane-1", T0, code=CASH)
    journal.advance(e.id, "received", "checked", T0)
    journal.advance(e.id, "checked", "consume_sent", T0)
    engine = Engine(journal, client)
    (v,) = engine.reconcile(T0 + 5, settle_after_s=60)
    assert (v.outcome, journal.get(e.id).state) == ("verify_manually", "consume_sent")
    (v,) = engine.reconcile(T0 + 61, settle_after_s=60)
    assert (v.outcome, journal.get(e.id).outcome) == ("refused", "not_consumed")
    assert consumes(sim, CASH) == 0  # reconcile never consumes
    assert engine.redeem(CASH, T0 + 62).outcome == "accepted"


def test_unsettled_unknown_is_not_read_as_not_consumed_too_soon(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    # a lane whose consume timed out (it may still land) left the entry unknown
    e = journal.begin(CASH, "lane-1", T0, code=CASH)
    journal.advance(e.id, "received", "checked", T0)
    journal.advance(e.id, "checked", "consume_sent", T0)
    journal.advance(e.id, "consume_sent", "unknown", T0)
    engine = Engine(journal, client)
    (v,) = engine.reconcile(T0 + 5, settle_after_s=60)
    assert (v.outcome, journal.get(e.id).state) == ("verify_manually", "unknown")
    (v,) = engine.reconcile(T0 + 60, settle_after_s=60)
    assert (v.outcome, journal.get(e.id).outcome) == ("refused", "not_consumed")


def test_reconcile_during_a_live_consume_leaves_it_to_the_lane(
        sim: WeChatSim, journal_path: Path, client: WeChatCardClient) -> None:
    seen: list[Verdict] = []

    def hook(step: str) -> None:
        if step == "consume_sent":  # another process reconciles right now, same journal
            with Journal(journal_path) as other, client_for(sim.url) as c:
                seen.extend(Engine(other, c).reconcile(T0 + 1, live=frozenset()))
                # hostd's own reconcile: the entry is owned by a live worker, not touched
                assert Engine(other, c).reconcile(T0 + 1, settle_after_s=0) == []

    with Journal(journal_path) as j:
        v = Engine(j, client, hook=hook).redeem(CASH, T0)
        assert [x.outcome for x in seen] == ["verify_manually"]
        assert v.outcome == "accepted"
        assert [s.step for s in j.steps(v.entry_id or 0)][-2:] == ["consume_sent", "done"]
    assert consumes(sim, CASH) == 1


def test_consume_reply_after_a_too_eager_reconcile_corrects_the_record(
        sim: WeChatSim, journal_path: Path, client: WeChatCardClient) -> None:
    def hook(step: str) -> None:
        if step == "consume_sent":  # settle_after_s=0: misconfigured, reads NORMAL as final
            with Journal(journal_path) as other, client_for(sim.url) as c:  # another process
                (early,) = Engine(other, c).reconcile(T0 + 1, settle_after_s=0,
                                                      live=frozenset())
                assert early.outcome == "refused"

    with Journal(journal_path) as j:
        v = Engine(j, client, hook=hook).redeem(CASH, T0)
        assert v.outcome == "accepted"
        (entry,) = j.entries()
        assert (entry.state, entry.outcome) == ("done", "accepted")
        assert [s.step for s in j.steps(entry.id)][-3:] == ["verify_sent", "reconciled",
                                                             "corrected"]
    assert consumes(sim, CASH) == 1


def test_reconcile_with_the_backend_down_keeps_the_entry_for_support(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    faults(sim, drop_after_commit={"mode": "close", "count": 1})
    Engine(journal, client, LaneConfig(verify_unknown=False)).redeem(CASH, T0)
    with client_for(f"http://127.0.0.1:{free_port()}") as down:
        (v,) = Engine(journal, down).reconcile(T0 + 120)
    assert v.outcome == "verify_manually"
    assert [e.state for e in journal.entries()] == ["unknown"]
    (v,) = Engine(journal, client).reconcile(T0 + 120)
    assert v.outcome == "accepted"


def test_reconcile_closes_entries_that_never_sent_a_consume(sim: WeChatSim, journal: Journal,
                                                            client: WeChatCardClient) -> None:
    a = journal.begin(CASH, "lane-1", T0, code=CASH)
    b = journal.begin("391827364510", "lane-1", T0, code="391827364510")
    journal.advance(b.id, "received", "checked", T0)
    assert Engine(journal, client).reconcile(T0 + 5) == []  # idle 5 s: maybe still running
    vs = Engine(journal, client).reconcile(T0, restart=True)  # no worker runs: orphans
    assert [(v.entry_id, v.outcome, v.reason) for v in vs] == [
        (a.id, "refused", "not_redeemed"), (b.id, "refused", "not_redeemed")]
    assert [(e.outcome, e.reason) for e in journal.entries()] == [
        ("abandoned", "interrupted")] * 2
    assert state(sim)["requests"].get("card/code/get", 0) == 0  # nothing needed asking


# --- bad replies, offline, tokens ---------------------------------------------------------

@pytest.mark.parametrize("reply", [
    {"body": "<html>502 Bad Gateway</html>"},
    {"body": '{"errcode":0,"errmsg":"ok","card":{"card_id":"pHexia'},  # truncated
    {"json": {"errcode": 0, "errmsg": "ok"}},  # no card, no user_card_status
    {"json": {"errcode": "0"}},  # errcode of the wrong type
    {"status": 500, "body": "oops"},
])
def test_unreadable_lookup_is_backend_error_and_a_safe_refusal(
        sim: WeChatSim, engine: Engine, client: WeChatCardClient, reply: dict[str, Any]) -> None:
    faults(sim, script=[{"path": "card/code/get", "count": 1, **reply}])
    with pytest.raises(BackendError):
        client.get_code(CASH)
    faults(sim, script=[{"path": "card/code/get", "count": 1, **reply}])
    v = engine.redeem(CASH, T0)
    assert (v.outcome, v.reason) == ("refused", "not_redeemed")  # scan again, not "verify"
    assert consumes(sim, CASH) == 0


def test_unexpected_errcode_is_an_api_error_and_a_safe_refusal(sim: WeChatSim, engine: Engine,
                                                               client: WeChatCardClient) -> None:
    script = [{"path": "card/code/get", "count": 2,
               "json": {"errcode": 61234, "errmsg": "something new"}}]
    faults(sim, script=script)
    with pytest.raises(ApiError) as err:
        client.get_code(CASH)
    assert err.value.errcode == 61234
    v = engine.redeem(CASH, T0)  # the same answer on every rescan: for support
    assert (v.reason, v.why) == ("setup", "errcode 61234")


def test_unreadable_consume_reply_is_outcome_unknown_never_resent(
        sim: WeChatSim, client: WeChatCardClient) -> None:
    faults(sim, script=[{"path": "card/code/consume", "count": 1, "body": "not json"}])
    with pytest.raises(OutcomeUnknown) as err:
        client.consume(CASH)
    assert err.value.settled and isinstance(err.value.cause, BackendError)
    assert state(sim)["requests"]["card/code/consume"] == 1


@pytest.mark.parametrize(("error", "settled"), [
    (httpx.ReadTimeout("read timed out"), False),       # may still be processed
    (httpx.WriteError("broken pipe"), False),           # part of it may have gone out
    (httpx.RemoteProtocolError("server disconnected"), True),
    (httpx.ReadError("connection reset"), True),
])
def test_consume_transport_errors_after_sending_are_unknown(error: Exception,
                                                            settled: bool) -> None:
    # failures the simulator cannot produce on demand, injected under the real httpx client
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cgi-bin/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 7200})
        raise error

    with WeChatCardClient("http://backend.invalid", APPID, SECRET, sleep=lambda s: None,
                          transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(OutcomeUnknown) as err:
            c.consume(CASH)
        assert err.value.settled is settled and err.value.cause is error
        with pytest.raises(Offline):
            c.get_code(CASH)  # the same failure on a safe call: retried, then offline


def test_backend_down_is_offline(journal: Journal) -> None:
    with client_for(f"http://127.0.0.1:{free_port()}") as down:
        with pytest.raises(Offline):
            down.get_code(CASH)
        v = Engine(journal, down).redeem(CASH, T0)
    assert (v.outcome, v.reason) == ("offline", "offline")
    assert journal.entries()[0].state == "done"


def test_slow_consume_times_out_as_unsettled_unknown(sim: WeChatSim, journal: Journal) -> None:
    with client_for(sim.url, timeout_s=0.2) as slow:
        slow.get_code(CASH)  # token and lookup before the backend slows down
        faults(sim, latency_ms=2000)
        with pytest.raises(OutcomeUnknown) as err:
            slow.consume(CASH)
    assert not err.value.settled  # the request may still land: reconcile must wait


def test_stale_token_is_refetched_once(sim: WeChatSim, client: WeChatCardClient) -> None:
    client.get_code(CASH)
    httpx.post(f"{sim.url}/_sim/tokens/invalidate", json={})
    assert client.get_code(CASH).status == "NORMAL"  # 40001 -> one refetch -> ok
    assert state(sim)["apps"][APPID]["token_requests_today"] == 2


def test_token_refreshed_before_expiry_by_the_client_clock(sim: WeChatSim) -> None:
    now = [0.0]
    with client_for(sim.url, clock=lambda: now[0], refresh_margin_s=300) as c:
        first = c.token()
        now[0] = 7200 - 301
        assert c.token() == first
        now[0] = 7200 - 299  # inside the margin: a new one before the old one expires
        assert c.token() != first
    assert state(sim)["apps"][APPID]["token_requests_today"] == 2


def test_bad_secret_is_a_token_error(sim: WeChatSim) -> None:
    with WeChatCardClient(sim.url, APPID, "wrong", sleep=lambda s: None) as c, \
            pytest.raises(ApiError) as err:
        c.get_code(CASH)
    assert err.value.errcode == 40125


def test_central_token_url_is_used_instead_of_the_secret(sim: WeChatSim) -> None:
    central = (f"{sim.url}/cgi-bin/token?grant_type=client_credential"
               f"&appid={APPID}&secret={SECRET}")
    with WeChatCardClient(sim.url, APPID, "no-secret-on-this-till", token_url=central) as c:
        assert c.get_code(CASH).card_id == CASH_CARD


def test_token_endpoint_busy_then_down(sim: WeChatSim) -> None:
    faults(sim, script=[{"path": "cgi-bin/token", "count": 2,
                         "json": {"errcode": -1, "errmsg": "system error"}}])
    with client_for(sim.url) as c:
        assert c.get_code(CASH).status == "NORMAL"  # two busy answers, third try works
    faults(sim, quota_exhausted=["cgi-bin/token"])
    with client_for(sim.url) as c, pytest.raises(QuotaExceeded):
        c.get_code(CASH)


def test_expired_token_42001_mid_call(sim: WeChatSim, clock: Clock) -> None:
    now = [0.0]
    with client_for(sim.url, clock=lambda: now[0]) as c:
        c.get_code(CASH)
        clock.now += 7201  # the service's token expired; our clock did not notice (skew)
        assert c.get_code(CASH).status == "NORMAL"
    with client_for(sim.url, retries=0) as c:
        faults(sim, script=[{"path": "card/code/get", "count": 2,
                             "json": {"errcode": 42001, "errmsg": "access_token expired"}}])
        with pytest.raises(TokenError):
            c.get_code(CASH)  # stale twice: refetched once, then given up


def test_busy_typed_and_invalid_code_typed(sim: WeChatSim, client: WeChatCardClient) -> None:
    faults(sim, busy_rate=1.0)
    with pytest.raises(Busy):
        client.get_code(CASH)
    faults(sim, busy_rate=0.0)
    with pytest.raises(InvalidCode):
        client.decrypt("bm90IGEgcmVhbCBjb2Rl")


# --- concurrency, logs ----------------------------------------------------------------------

def test_same_code_on_many_lanes_at_once_is_consumed_once(sim: WeChatSim,
                                                         journal_path: Path) -> None:
    Journal(journal_path).close()
    faults(sim, latency_ms=5)  # widen the window between check and consume
    lanes = 8
    barrier = threading.Barrier(lanes)
    verdicts: list[Verdict] = []

    def lane(n: int) -> None:
        with Journal(journal_path) as j, client_for(sim.url) as c:
            c.token()
            engine = Engine(j, c, LaneConfig(lane=f"lane-{n}"))
            barrier.wait()
            verdicts.append(engine.redeem(CASH, T0))

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = sorted((v.outcome, v.reason or "") for v in verdicts)
    assert outcomes.count(("accepted", "")) == 1
    assert all(r in ("in_progress", "already_used") for o, r in outcomes if o != "accepted")
    assert consumes(sim, CASH) == 1
    assert state(sim)["codes"][CASH]["consume_attempts"] == 1


def test_logs_never_hold_a_whole_code(sim: WeChatSim, engine: Engine,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    faults(sim, drop_after_commit={"mode": "close", "count": 1})
    engine.redeem(CASH, T0)
    engine.redeem(CASH, T0)
    enc = state(sim)["codes"]["391827364510"]["encrypt_code"]
    engine.redeem(enc, T0)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "…2093" in text
    for secret in (CASH, "391827364510", enc, SECRET):
        assert secret not in text


def test_full_journal_gives_safe_verdicts_and_loses_no_consume(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient,
        caplog: pytest.LogCaptureFixture) -> None:
    codes = [f"6{n:011d}" for n in range(60)]
    for code in codes:
        httpx.post(f"{sim.url}/_sim/codes", json={"code": code, "card_id": CASH_CARD})
    engine = Engine(journal, client)
    engine.redeem(codes[0], T0)
    # the real SQLITE_FULL: no page beyond those the file has now
    pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
    journal._db.execute(f"PRAGMA max_page_count = {pages}")
    verdicts = {code: engine.redeem(code, T0) for code in codes[1:]}
    # nothing sent: a setup problem (the journal); a consume that went out: verify manually
    assert {(v.outcome, v.reason, v.why) for v in verdicts.values()
            if v.outcome != "accepted"} <= {("refused", "setup", "journal"),
                                             ("verify_manually", "unknown", "")}
    assert any(v.outcome != "accepted" for v in verdicts.values())  # the disk did fill up
    assert "database or disk is full" in caplog.text
    journal._db.execute("PRAGMA max_page_count = 1000000")
    engine.reconcile(T0 + 3600)
    recorded = {e.code: e for e in journal.entries()}
    sim_codes = state(sim)["codes"]
    for code in codes:
        if sim_codes[code]["consume_count"]:
            assert recorded[code].outcome == "accepted"  # every consume is on record
        else:
            assert verdicts.get(code, Verdict("accepted")).outcome != "accepted"
        assert sim_codes[code]["consume_attempts"] <= 1


def test_corrupt_journal_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "journal.db"
    bad.write_bytes(b"\x00" * 10_000)
    with pytest.raises(JournalCorrupt):
        Journal(bad)
    assert bad.read_bytes() == b"\x00" * 10_000


# --- crashes ----------------------------------------------------------------------------

def run_lane(journal_path: Path, sim: WeChatSim, code: str, kill_at: str | None,
             *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(RUNNER), str(journal_path), sim.url, APPID, SECRET, code,
            str(T0)]
    if kill_at:
        argv += ["--kill-at", kill_at]
    return subprocess.run(argv + list(extra), capture_output=True, text=True, timeout=60)


def crash_and_recover(journal_path: Path, sim: WeChatSim, code: str, kill_at: str,
                      drop: str | None = None) -> str:
    """Kill a lane at `kill_at`, reconcile as a restarted hostd, scan again; check the books."""
    if drop:
        faults(sim, drop_after_commit={"mode": drop, "count": 1, "codes": [code]})
    before = len(Journal(journal_path).entries()) if journal_path.exists() else 0
    proc = run_lane(journal_path, sim, code, kill_at)
    assert proc.returncode == -9, proc.stderr  # it really died there
    faults(sim, drop_after_commit=None)
    with Journal(journal_path) as j, client_for(sim.url) as c:
        entries = j.entries()
        assert len(entries) == before + 1  # the crashed redemption's record is there
        crashed = entries[-1]
        engine = Engine(j, c)
        engine.reconcile(T0 + 3600)
        crashed = j.get(crashed.id)
        assert crashed.state == "done", crashed  # nothing left unknown with the backend up
        steps = [s.step for s in j.steps(crashed.id)]
        assert steps[0] == "received" and steps[-1] in ("done", "reconciled"), steps
        count = consumes(sim, code)
        assert count == (1 if crashed.outcome == "accepted" else 0), (kill_at, crashed)
        again = engine.redeem(code, T0 + 3600)
        assert again.outcome == ("refused" if count else "accepted"), again
        if count:
            assert again.reason == "already_used"
        assert consumes(sim, code) == 1  # never twice, never lost
        # and never even tried twice: the sim refuses a second commit, so count the attempts
        assert state(sim)["codes"][code]["consume_attempts"] == 1
        assert not j.entries(("received", "checked", "consume_sent", "unknown"))
    return crashed.outcome or ""


@pytest.mark.parametrize(("kill_at", "drop", "outcome"), [
    ("received", None, "abandoned"),
    ("get_sent", None, "abandoned"),
    ("checked", None, "abandoned"),
    ("consume_sent", None, "not_consumed"),     # written, never sent
    ("consume_replied", None, "accepted"),      # consumed, `done` never written
    ("unknown", "close", "accepted"),           # reply lost, killed before verifying
    ("verify_sent", "http500", "accepted"),
    ("done", None, "accepted"),
])
def test_sigkill_at_each_journal_step_then_restart(sim: WeChatSim, journal_path: Path,
                                                   kill_at: str, drop: str | None,
                                                   outcome: str) -> None:
    assert crash_and_recover(journal_path, sim, CASH, kill_at, drop) == outcome


def test_runner_without_a_kill_redeems(sim: WeChatSim, journal_path: Path) -> None:
    proc = run_lane(journal_path, sim, CASH, None)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "accepted"


@pytest.mark.soak
def test_soak_many_sigkills(sim: WeChatSim, journal_path: Path) -> None:
    rng = random.Random(5)
    steps = ["received", "get_sent", "checked", "consume_sent", "consume_replied", "unknown",
             "verify_sent", "done"]
    for n in range(150):
        code = f"5{n:011d}"
        httpx.post(f"{sim.url}/_sim/codes", json={"code": code, "card_id": CASH_CARD})
        kill_at = rng.choice(steps)
        drop = rng.choice(["close", "http500", "busy"]) if kill_at in (
            "unknown", "verify_sent") else None
        crash_and_recover(journal_path, sim, code, kill_at, drop)
    with Journal(journal_path) as j:
        assert len(j.entries()) == 300  # each crash + each rescan
    codes = state(sim)["codes"]
    assert all(codes[f"5{n:011d}"]["consume_count"] == 1 for n in range(150))


# -- a scan the device sends again (SPEC §9.6), across a hostd restart ------------------------

ORIGIN = {"device": "lane-1", "scan_id": 7, "time_ms": 123456}


def test_a_resent_scan_gets_its_own_verdict_back_not_already_used(sim: WeChatSim,
                                                                  engine: Engine) -> None:
    first = engine.redeem(CASH, T0, ORIGIN)
    again = engine.answer_resend(CASH, ORIGIN, T0 + 5)
    assert first.outcome == again.outcome == "accepted" and again.entry_id == first.entry_id
    assert consumes(sim, CASH) == 1
    # the same code from another scan (another scan_id, or after a reboot another time_ms)
    # is not a resend: it is a rescan of a code this lane consumed (said so, never consumed)
    for other in ({**ORIGIN, "scan_id": 8}, {**ORIGIN, "time_ms": 99}):
        assert engine.answer_resend(CASH, other, T0 + 5) is None
    assert engine.redeem(CASH, T0 + 6, {**ORIGIN, "scan_id": 8}).reason == "redeemed_here"
    assert consumes(sim, CASH) == 1
    # and a resend long after is no longer recognised
    assert engine.answer_resend(CASH, ORIGIN, T0 + 3600) is None


def test_a_resend_after_a_crash_mid_consume_is_settled_by_a_query(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    """hostd died after the consume went out (the backend committed it): the device's resend
    is answered by querying, never by consuming again."""
    class Crash(Exception):
        pass

    def hook(step: str) -> None:
        if step == "consume_replied":
            raise Crash

    with pytest.raises(Crash):
        Engine(journal, client, LaneConfig(location_id=1), hook=hook).redeem(CASH, T0, ORIGIN)
    assert journal.entries()[0].state == "consume_sent" and consumes(sim, CASH) == 1
    v = Engine(journal, client, LaneConfig(location_id=1)).answer_resend(CASH, ORIGIN, T0 + 2)
    assert v is not None and v.outcome == "accepted" and consumes(sim, CASH) == 1
    assert journal.entries()[0].state == "done"
