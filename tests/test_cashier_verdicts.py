"""The cashier is never misled (issue 16 section 1, issue 17): what the verdict SAYS.

Over the real pieces: the WeChat simulator on loopback HTTP (its consume_count is the
exactly-once proof), the journal a SQLite file in tmp_path, lanes as real threads. A rescan of a
code this lane consumed is green "redeemed here"; "verify manually" only for an unknown consume;
setup problems and the daily quota say so (journal, metric); reconcile never takes a live
lane's entry; each journal step keeps its own time; `hexiao journal list` is newest first.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.seed import EXAMPLE
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.config import Macro
from hexiao.hostd.journal import Journal
from hexiao.hostd.lanes import verdicts
from hexiao.hostd.observability.metrics import Metrics
from hexiao.hostd.redeem import Engine, LaneConfig, Verdict, quota_reset_after
from hexiao.tools.support import ctl

SEED: dict[str, Any] = json.loads(Path(EXAMPLE).read_text())
APPID, SECRET = SEED["apps"][0]["appid"], SEED["apps"][0]["secret"]
CASH, CASH_CARD = "287463512093", "pHexiaoSimCash100minus20xxxx"
ORIGIN = {"device": "till-1", "scan_id": 7, "time_ms": 123456}


@pytest.fixture
def sim(clock: Clock) -> Iterator[WeChatSim]:
    with WeChatSim(SEED, clock=clock) as server:
        yield server


def client_for(url: str, secret: str = SECRET) -> WeChatCardClient:
    return WeChatCardClient(url, APPID, secret, sleep=lambda s: None)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.db") as j:
        yield j


@pytest.fixture
def client(sim: WeChatSim) -> Iterator[WeChatCardClient]:
    with client_for(sim.url) as c:
        yield c


def state(sim: WeChatSim) -> dict[str, Any]:
    return httpx.get(f"{sim.url}/_sim/state").json()


def faults(sim: WeChatSim, **f: Any) -> None:
    assert httpx.post(f"{sim.url}/_sim/faults", json=f).status_code == 200


def new_codes(sim: WeChatSim, prefix: str, n: int) -> list[str]:
    codes = [f"{prefix}{i:011d}" for i in range(n)]
    for code in codes:
        r = httpx.post(f"{sim.url}/_sim/codes", json={"code": code, "card_id": CASH_CARD})
        assert r.status_code == 200, r.text
    return codes


# --- a rescan of a code this lane consumed ---------------------------------------------------

def test_rescan_on_the_same_lane_is_green_redeemed_here_with_its_value_and_macro(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    engine = Engine(journal, client)
    first = engine.redeem(CASH, T0, ORIGIN)
    assert first.outcome == "accepted" and first.macro_id is None
    engine.macro_sent(first.entry_id or 0, 4242, T0 + 1)  # the lane typed it with macro 4242
    again = engine.redeem(CASH, T0 + 40, {**ORIGIN, "scan_id": 8})
    assert (again.outcome, again.reason, again.entry_id, again.macro_id) == (
        "accepted", "redeemed_here", first.entry_id, 4242)
    assert again.value == {"reduce_cost": 2000, "least_cost": 10000}
    assert again.age_s is not None and 39 <= again.age_s <= 41
    msg = verdicts.verdict_message(8, again)
    assert (msg["outcome"], msg["beep"], msg["led"]) == (0, 1, 1)  # accepted, ok, green
    assert msg["text"] == "本机已核销 40秒前 减¥20.00 …2093"
    assert len(msg["text"].encode()) <= verdicts.TEXT_MAX
    # the discount is offered again under the same macro id: a device that typed it skips it
    keys = verdicts.keys_message(4242, again, {"CASH": Macro(items=("{reduce_cost_yuan}",))})
    assert keys is not None and (keys["macro_id"], keys["items"]) == (4242, ["20.00"])
    # the rescan is on the record, and nothing was consumed twice nor a second entry begun
    assert [s.step for s in journal.steps(first.entry_id or 0)][-2:] == ["macro_sent",
                                                                        "rescanned"]
    assert len(journal.entries()) == 1
    assert state(sim)["codes"][CASH]["consume_count"] == 1
    assert state(sim)["requests"]["card/code/consume"] == 1


def test_another_lane_or_after_the_window_is_already_used(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    Engine(journal, client, LaneConfig(lane="lane-1", redeemed_here_s=900)).redeem(CASH, T0)
    other = Engine(journal, client, LaneConfig(lane="lane-2"))
    assert other.redeem(CASH, T0 + 5).reason == "already_used"
    late = Engine(journal, client, LaneConfig(lane="lane-1", redeemed_here_s=900))
    assert late.redeem(CASH, T0 + 901).reason == "already_used"
    off = Engine(journal, client, LaneConfig(lane="lane-1", redeemed_here_s=0))
    assert off.redeem(CASH, T0 + 5).reason == "already_used"
    assert state(sim)["codes"][CASH]["consume_count"] == 1


# --- "verify manually" only when a consume's outcome is unknown ------------------------------

def test_consume_http500_without_commit_is_not_redeemed_scan_again(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    faults(sim, script=[{"path": "card/code/consume", "count": 1, "status": 500,
                         "body": "oops"}])
    v = Engine(journal, client).redeem(CASH, T0)
    assert (v.outcome, v.reason) == ("refused", "not_redeemed")
    assert "verify" not in verdicts.text_of(v) and "请重扫" in verdicts.text_of(v)
    (entry,) = journal.entries()
    assert (entry.outcome, entry.reason) == ("not_consumed", "not_redeemed")
    assert state(sim)["codes"][CASH]["consume_count"] == 0
    assert Engine(journal, client).redeem(CASH, T0 + 1).outcome == "accepted"


def test_a_code_with_a_del_byte_is_invalid_and_nothing_is_sent(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    v = Engine(journal, client).redeem("2874635\x7f12093", T0)
    assert (v.outcome, v.reason) == ("refused", "invalid_code")
    assert journal.entries() == [] and state(sim)["requests"] == {}


def test_setup_problems_say_call_support_with_the_reason_journalled_and_counted(
        sim: WeChatSim, journal: Journal) -> None:
    metrics = Metrics()
    with client_for(sim.url, secret="wrong-secret") as bad:
        token = Engine(journal, bad, LaneConfig(lane="a")).redeem(CASH, T0)
    with client_for(sim.url) as good:
        custom = Engine(journal, good, LaneConfig(lane="b")).redeem("CUSTOM-0001", T0)
    for v in (token, custom):
        metrics.redemption(v.outcome, v.card_type, 0.1, reason=v.reason)
    # every token request refused (40125 invalid appsecret); a custom code with no card ids
    assert [(v.outcome, v.reason, v.why) for v in (token, custom)] == [
        ("refused", "setup", "errcode 40125"), ("refused", "setup", "custom code")]
    assert [verdicts.text_of(v) for v in (token, custom)] == [
        "配置错误 call support: errcode 40125 …2093",
        "配置错误 call support: custom code …0001"]
    assert [(e.reason, e.detail["why"]) for e in journal.entries()] == [
        ("setup", "errcode 40125"), ("setup", "custom code")]
    text = metrics.render().decode()
    assert "hexiao_setup_problems_total 2.0" in text
    assert 'hexiao_redemptions_total{card_type="none",outcome="refused",reason="setup"} 2.0' \
        in text
    assert state(sim)["codes"][CASH]["consume_count"] == 0


def test_only_an_unknown_consume_reads_verify_manually() -> None:
    for reason in ("not_redeemed", "unknown", "setup", "quota", "busy", "invalid_code", None):
        text = verdicts.text_of(Verdict("refused", reason, "…2093"))  # type: ignore[arg-type]
        assert "verify manually" not in text and len(text.encode()) <= verdicts.TEXT_MAX
    unknown = verdicts.verdict_message(1, Verdict("verify_manually", "unknown", "…2093"))
    assert "verify manually" in unknown["text"] and (unknown["beep"], unknown["led"]) == (3, 3)


def test_an_entry_settled_not_consumed_by_reconcile_reads_scan_again(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    # a busy consume that did nothing, left for reconcile (verify_unknown off)
    faults(sim, script=[{"path": "card/code/consume", "count": 1,
                         "json": {"errcode": -1, "errmsg": "system error"}}])
    engine = Engine(journal, client, LaneConfig(verify_unknown=False))
    assert engine.redeem(CASH, T0, ORIGIN).outcome == "verify_manually"  # truly unknown now
    (v,) = engine.reconcile(T0 + 120)
    assert (v.outcome, v.reason) == ("refused", "not_redeemed")
    # the device's resend of that scan hears the same: not redeemed, never "verify manually"
    again = engine.answer_resend(CASH, ORIGIN, T0 + 121)
    assert again is not None and (again.outcome, again.reason) == ("refused", "not_redeemed")
    assert "verify" not in verdicts.text_of(again)


# --- the daily quota ---------------------------------------------------------------------------

def test_quota_is_said_alarmed_and_the_api_left_alone_until_china_midnight(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    client.token()
    faults(sim, quota_exhausted=["card/code/get"])
    engine = Engine(journal, client)
    v = engine.redeem(CASH, T0)
    assert (v.outcome, v.reason) == ("refused", "quota")
    assert "0:00" in verdicts.text_of(v) and "scan again" not in verdicts.text_of(v)
    calls = dict(state(sim)["requests"])
    for i in range(5):  # the cashier tries again and again: the API is not hammered
        assert engine.redeem(CASH, T0 + 60 * i).reason == "quota"
    assert state(sim)["requests"] == calls
    metrics = Metrics()
    metrics.redemption(v.outcome, None, 0.1, reason=v.reason)
    until = float(next(line.split()[1] for line in metrics.render().decode().splitlines()
                       if line.startswith("hexiao_backend_quota_exhausted_until_seconds ")))
    assert until > T0  # the alarm: exhausted until a time still to come (wall clock)
    midnight = quota_reset_after(T0)
    assert (midnight + 8 * 3600) % 86_400 == 0 and 0 < midnight - T0 <= 86_400
    faults(sim, quota_exhausted=[])
    assert engine.redeem(CASH, midnight - 1).reason == "quota"
    assert engine.redeem(CASH, midnight + 1).outcome == "accepted"


# --- reconcile against live redemptions --------------------------------------------------------

def test_reconcile_raced_against_three_live_lanes_abandons_nothing(
        sim: WeChatSim, tmp_path: Path) -> None:
    # the settings that hurt most: reconcile every few ms, settle_after_s=0, not a restart
    path = tmp_path / "journal.db"
    Journal(path).close()
    faults(sim, latency_ms=15)  # each backend call takes a while: the windows overlap
    lanes = [new_codes(sim, f"{7 + n}", 8) for n in range(3)]
    got: list[Verdict] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def lane(n: int, codes: list[str]) -> None:
        try:
            with Journal(path) as j, client_for(sim.url) as c:
                engine = Engine(j, c, LaneConfig(lane=f"lane-{n}"))
                for code in codes:
                    got.append(engine.redeem(code, T0))
        except BaseException as e:  # pragma: no cover - shown by the assert below
            errors.append(e)

    def reconciler() -> None:
        with Journal(path) as j, client_for(sim.url) as c:
            while not stop.is_set():
                Engine(j, c).reconcile(T0 + 1, settle_after_s=0)
                rounds.append(1)

    rounds: list[int] = []
    r = threading.Thread(target=reconciler)
    r.start()
    threads = [threading.Thread(target=lane, args=(n, codes)) for n, codes in enumerate(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    r.join(60)
    assert not errors and len(rounds) > 3  # it really ran alongside
    assert [v.outcome for v in got] == ["accepted"] * 24
    with Journal(path) as j:
        assert {(e.state, e.outcome) for e in j.entries()} == {("done", "accepted")}
        assert not any(s.step == "reconciled" for e in j.entries() for s in j.steps(e.id))
    counts = state(sim)["codes"]
    assert all(counts[c]["consume_count"] == 1 for codes in lanes for c in codes)


def test_reconcile_after_a_restart_takes_the_orphans_at_once(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    e = journal.begin(CASH, "lane-1", T0, code=CASH)  # a worker died right after this
    assert Engine(journal, client).reconcile(T0 + 1) == []  # maybe alive elsewhere: left
    (v,) = Engine(journal, client).reconcile(T0 + 1, restart=True)
    assert (v.entry_id, v.outcome, v.reason) == (e.id, "refused", "not_redeemed")
    assert Engine(journal, client).redeem(CASH, T0 + 2).outcome == "accepted"  # code free


# --- journal times and the listing -------------------------------------------------------------

def test_each_journal_step_keeps_its_own_time(sim: WeChatSim, journal: Journal,
                                              client: WeChatCardClient) -> None:
    client.token()
    faults(sim, latency_ms=50)  # each of get, card/get, consume takes at least 50 ms
    v = Engine(journal, client).redeem(CASH, T0)
    steps = journal.steps(v.entry_id or 0)
    at = {s.step: s.at for s in steps}
    assert [s.step for s in steps] == ["received", "get_sent", "checked", "consume_sent", "done"]
    assert at["received"] == T0
    # by construction (the simulator sleeps), never a performance claim
    assert at["checked"] - at["get_sent"] >= 0.05  # code/get and card/get were in between
    assert at["done"] - at["consume_sent"] >= 0.05  # the consume
    assert [s.at for s in steps] == sorted(s.at for s in steps)
    assert journal.get(v.entry_id or 0).updated == at["done"]


def test_journal_list_is_newest_first_and_a_missing_reason_is_always_a_dash(
        sim: WeChatSim, journal: Journal, client: WeChatCardClient) -> None:
    faults(sim, drop_after_commit={"mode": "close", "count": 1})
    Engine(journal, client, LaneConfig(verify_unknown=False)).redeem(CASH, T0)
    Engine(journal, client).reconcile(T0 + 120)  # accepted by reconcile: its reason cleared
    Engine(journal, client).redeem("999999999999", T0 + 121)
    assert [e.reason for e in journal.entries()] == [None, "invalid_code"]  # NULL, never ""
    assert [e.id for e in journal.latest(limit=5)] == [2, 1]
    rows = [{"id": 1, "reason": ""}, {"id": 3, "reason": None}, {"id": 2, "reason": "expired"}]
    listed = ctl.newest_first(rows)
    assert [r["id"] for r in listed] == [3, 2, 1]
    table = ctl.table(listed).splitlines()
    assert [line.split()[-1] for line in table[1:]] == ["-", "expired", "-"]
