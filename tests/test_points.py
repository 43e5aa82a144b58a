"""Member points credited exactly once (hostd/members/): the rule, the ledger, the crediter.

Over the real pieces: the WeChat simulator on loopback HTTP (GET /_sim/state's bonus and
bonus_updates are the exactly-once proof: add_bonus is not idempotent there, as on the
platform), the ledger in a real journal file, crashes a real SIGKILL of a subprocess
(tests/points_runner.py). The clock is the test's; nothing sleeps to make a point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.members.credit import Crediter, record_text
from hexiao.hostd.members.ledger import Duplicate, Ledger
from hexiao.hostd.members.rule import MAX_POINTS, BonusRule, RuleError, from_card

APP, SECRET = "wx00000000000000a1", "test-secret-a1-0000000000000000"
RULE = {"cost_money_unit": 100, "increase_bonus": 1, "max_increase_bonus": 500}
MEMBER, HUGE, NORULE, SUSPENDED = "820000000001", "820000000002", "820000000003", "820000000004"
RUNNER = Path(__file__).with_name("points_runner.py")


def seed() -> dict[str, Any]:
    member = {"card_type": "MEMBER_CARD", "prerogative": "积分", "supply_bonus": True}
    return {
        "apps": [{"appid": APP, "secret": SECRET}],
        "cards": [
            {"card_id": "pMember", "title": "会员卡", "bonus_rule": RULE, **member},
            {"card_id": "pHuge", "title": "huge", **member,
             "bonus_rule": {"cost_money_unit": 1, "increase_bonus": 1_000_000_000}},
            {"card_id": "pNoRule", "title": "no rule", **member},
        ],
        "codes": [
            {"code": MEMBER, "card_id": "pMember", "bonus": 120},
            {"code": HUGE, "card_id": "pHuge"},
            {"code": NORULE, "card_id": "pNoRule"},
            {"code": SUSPENDED, "card_id": "pMember", "state": "UNAVAILABLE"},
        ]}


@pytest.fixture
def sim(clock: Clock) -> Iterator[WeChatSim]:
    with WeChatSim(seed(), clock=clock) as server:
        yield server


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Journal(tmp_path / "journal.db") as journal:
        ledger = Ledger(journal)
        yield ledger
        ledger.close()


@pytest.fixture
def client(sim: WeChatSim) -> Iterator[WeChatCardClient]:
    with WeChatCardClient(sim.url, APP, SECRET, sleep=lambda s: None) as c:
        yield c


def member(sim: WeChatSim, code: str = MEMBER) -> dict[str, Any]:
    return dict(sim.state.snapshot()["codes"][code])


def faults(sim: WeChatSim, **f: Any) -> None:
    assert httpx.post(f"{sim.url}/_sim/faults", json=f).status_code == 200


def plan(ledger: Ledger, fen: int, receipt: str = "lane-1|aa11bb22cc33", code: str = MEMBER,
         card_id: str = "pMember") -> Any:
    return ledger.plan(receipt, "lane-1", code, card_id, fen, T0)


# --- the rule ---------------------------------------------------------------------------

def test_rule_whole_units_and_the_cap() -> None:
    rule = BonusRule(100, 2, 300)
    assert [rule.points(f) for f in (0, 99, 100, 12_345, 10**9)] == [0, 0, 2, 246, 300]
    assert BonusRule(100, 1).points(10**8) == 10**6  # no cap
    with pytest.raises(RuleError, match="above"):
        BonusRule(1, 1_000_000_000).points(100)  # an overflow is refused, not credited
    with pytest.raises(RuleError):
        rule.points(-1)


@pytest.mark.parametrize("section, error", [
    ({"bonus_rule": {"cost_money_unit": 0, "increase_bonus": 1}}, "cost_money_unit"),
    ({"bonus_rule": {"cost_money_unit": 100, "increase_bonus": -1}}, "may not take points"),
    ({"bonus_rule": {"cost_money_unit": "100", "increase_bonus": 1}}, "expected an integer"),
])
def test_rule_from_a_card_that_cannot_be_used(section: dict[str, Any], error: str) -> None:
    card = {"card_type": "MEMBER_CARD", "member_card": {"supply_bonus": True, **section}}
    with pytest.raises(RuleError, match=error):
        from_card(card)


def test_rule_absent_or_bonus_not_supplied_earns_nothing() -> None:
    assert from_card({"card_type": "MEMBER_CARD", "member_card": {"supply_bonus": True}}) is None
    assert from_card({"card_type": "MEMBER_CARD", "member_card": {
        "supply_bonus": False, "bonus_rule": RULE}}) is None
    assert from_card({"card_type": "CASH", "cash": {}}) is None
    assert MAX_POINTS < 2**31


# --- crediting --------------------------------------------------------------------------

def test_a_receipt_credits_the_cards_points_once(sim: WeChatSim, ledger: Ledger,
                                                 client: WeChatCardClient) -> None:
    r = Crediter(ledger, client).credit(plan(ledger, 12_345), T0)
    assert (r.outcome, r.points, r.bonus) == ("credited", 123, 243)
    m = member(sim)
    assert (m["bonus"], m["bonus_updates"]) == (243, 1)
    assert m["bonus_records"] == [record_text("lane-1|aa11bb22cc33")] == ["小票aa11bb22"]
    assert len(m["bonus_records"][0]) <= 14
    with pytest.raises(Duplicate):  # the same receipt again (a reprint): never twice
        plan(ledger, 12_345)
    c = ledger.get(r.credit.id)
    assert (c.state, c.outcome, c.before_bonus, c.result_bonus, c.attempts) == \
        ("done", "credited", 120, 243, 1)
    assert [s[0] for s in ledger.steps(c.id)] == ["planned", "sent", "done"]


@pytest.mark.parametrize("code, card_id, outcome, why", [
    (HUGE, "pHuge", "not_credited", "rule: "),         # would overflow: nothing credited
    (NORULE, "pNoRule", "nothing", "no bonus rule"),
    (SUSPENDED, "pMember", "not_credited", "card UNAVAILABLE"),
])
def test_nothing_is_sent_for_a_credit_that_cannot_be_right(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient, code: str, card_id: str,
        outcome: str, why: str) -> None:
    r = Crediter(ledger, client).credit(plan(ledger, 5000, code=code, card_id=card_id), T0)
    assert r.outcome == outcome and why in r.why
    assert sim.state.snapshot()["requests"].get("card/membercard/updateuser", 0) == 0
    assert ledger.get(r.credit.id).state == "done"


@pytest.mark.parametrize("mode", ["close", "http500", "busy"])
def test_a_lost_reply_is_settled_by_reading_the_points(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient, mode: str) -> None:
    faults(sim, drop_after_commit={"mode": mode, "count": 1, "codes": [MEMBER]})
    r = Crediter(ledger, client).credit(plan(ledger, 5000), T0)
    assert (r.outcome, r.points, r.bonus) == ("credited", 50, 170)
    assert member(sim)["bonus_updates"] == 1  # landed once, never sent again
    assert [s[0] for s in ledger.steps(r.credit.id)][-1] == "reconciled"


def test_busy_without_committing_is_tried_again_after_a_read(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient) -> None:
    faults(sim, script=[{"path": "card/membercard/updateuser", "count": 1,
                         "json": {"errcode": -1, "errmsg": "system error"}}])
    r = Crediter(ledger, client).credit(plan(ledger, 5000), T0)
    assert (r.outcome, r.bonus) == ("credited", 170)
    assert member(sim)["bonus_updates"] == 1
    steps = [s[0] for s in ledger.steps(r.credit.id)]
    assert steps == ["planned", "sent", "not_landed", "sent", "done"]
    assert ledger.get(r.credit.id).attempts == 2


def test_points_moved_meanwhile_is_verify_manually_never_resent(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient) -> None:
    faults(sim, drop_after_commit={"mode": "close", "count": 1, "codes": [MEMBER]})

    def spend(step: str) -> None:  # the customer spends points while our reply is lost
        if step == "unknown":
            assert httpx.post(f"{sim.url}/_sim/codes",
                              json={"code": MEMBER, "bonus": 7}).status_code == 200

    r = Crediter(ledger, client, hook=spend).credit(plan(ledger, 5000), T0)
    assert r.outcome == "unknown"
    assert member(sim)["bonus_updates"] == 1
    assert ledger.get(r.credit.id).state == "unknown"
    # reconcile leaves it for support: no second add
    assert Crediter(ledger, client).reconcile(T0 + 3600, restart=True) == []
    assert member(sim)["bonus_updates"] == 1


@pytest.mark.parametrize("landed, other", [(False, +50), (True, -50)])
def test_a_read_long_after_the_add_goes_to_a_person_whatever_the_points_say(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient, landed: bool,
        other: int) -> None:
    """hostd died with an add `sent` and came back late; meanwhile another channel moved the
    member's points by exactly the amount. The read alone would say "credited" (ours did not
    land, the mall added 50: the member would be short) or "not landed" (ours landed, 50 were
    spent: a re-send would credit twice). Past TRUST_S neither is guessed."""
    c = plan(ledger, 5000)
    c = ledger.advance(c.id, "planned", "sent", T0, points=50, before_bonus=120)
    if landed:
        client.add_bonus(MEMBER, "pMember", 50, record_text(c.receipt))
    client.add_bonus(MEMBER, "pMember", other, "商城")  # the other channel
    assert member(sim)["bonus"] == (120 if landed else 170)
    crediter = Crediter(ledger, client)
    [r] = crediter.reconcile(T0 + crediter.trust_s + 1, restart=True)
    assert (r.outcome, r.why) == ("unknown", "read too late to tell")
    assert member(sim)["bonus_updates"] == (2 if landed else 1)  # nothing sent again
    assert crediter.reconcile(T0 + 7200, restart=True) == []  # left for the person


def test_a_read_soon_after_the_add_settles_it(sim: WeChatSim, ledger: Ledger,
                                             client: WeChatCardClient) -> None:
    c = plan(ledger, 5000)
    c = ledger.advance(c.id, "planned", "sent", T0, points=50, before_bonus=120)
    client.add_bonus(MEMBER, "pMember", 50, record_text(c.receipt))
    crediter = Crediter(ledger, client)
    [r] = crediter.reconcile(T0 + crediter.trust_s, restart=True)
    assert (r.outcome, r.bonus) == ("credited", 170)


def test_a_token_refused_mid_credit_is_one_credit(sim: WeChatSim, ledger: Ledger,
                                                  client: WeChatCardClient) -> None:
    def revoke(step: str) -> None:
        if step == "sent":
            assert httpx.post(f"{sim.url}/_sim/tokens/invalidate", json={}).status_code == 200

    r = Crediter(ledger, client, hook=revoke).credit(plan(ledger, 5000), T0)
    assert (r.outcome, r.bonus) == ("credited", 170)
    assert member(sim)["bonus_updates"] == 1
    assert sim.state.snapshot()["token_refusals"] == {"40001": 1}


def test_offline_leaves_it_planned_and_reconcile_credits_it(
        sim: WeChatSim, ledger: Ledger) -> None:
    with WeChatCardClient("http://127.0.0.1:9", APP, SECRET, sleep=lambda s: None) as dead:
        r = Crediter(ledger, dead).credit(plan(ledger, 5000), T0)
    assert r.outcome == "pending"
    assert ledger.get(r.credit.id).state == "planned"
    with WeChatCardClient(sim.url, APP, SECRET, sleep=lambda s: None) as live:
        [again] = Crediter(ledger, live).reconcile(T0 + 60)
    assert (again.outcome, again.bonus) == ("credited", 170)
    assert member(sim)["bonus_updates"] == 1


def test_a_refund_takes_back_once_and_never_more_than_was_given(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient) -> None:
    crediter = Crediter(ledger, client)
    assert crediter.credit(plan(ledger, 8000, "lane-1|sale1"), T0).points == 80
    back = crediter.credit(plan(ledger, -3000, "lane-1|refund1"), T0)
    assert (back.outcome, back.points, back.bonus) == ("credited", -30, 170)
    with pytest.raises(Duplicate):
        plan(ledger, -3000, "lane-1|refund1")
    # a larger refund takes back only what is left of what this journal gave
    rest = crediter.credit(plan(ledger, -90_000, "lane-1|refund2"), T0)
    assert (rest.points, rest.bonus) == (-50, 120)
    none = crediter.credit(plan(ledger, -1000, "lane-1|refund3"), T0)
    assert none.outcome == "nothing"
    assert member(sim)["bonus"] == 120 and member(sim)["bonus_updates"] == 3


# --- SIGKILL at every step --------------------------------------------------------------

def run(sim: WeChatSim, journal: Path, receipt: str, kill_at: str | None) -> Any:
    return subprocess.run(
        [sys.executable, str(RUNNER), str(journal), sim.url, APP, SECRET, MEMBER, "pMember",
         "5000", receipt, str(T0), *(["--kill-at", kill_at] if kill_at else [])],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("step", ["planned", "sent", "replied", "done"])
def test_sigkill_at_each_step_then_reconcile_credits_exactly_once(
        sim: WeChatSim, tmp_path: Path, step: str) -> None:
    path = tmp_path / "journal.db"
    p = run(sim, path, f"lane-1|kill-{step}", step)
    assert p.returncode == -9, p.stderr
    landed = {"planned": 0, "sent": 0, "replied": 1, "done": 1}[step]
    assert member(sim)["bonus_updates"] == landed
    with Journal(path) as journal, \
            WeChatCardClient(sim.url, APP, SECRET, sleep=lambda s: None) as client:
        ledger = Ledger(journal)
        out = Crediter(ledger, client).reconcile(T0 + 120, restart=True)
        [c] = ledger.entries()
        ledger.close()
    assert (c.state, c.outcome, c.points) == ("done", "credited", 50)
    assert len(out) == (0 if step == "done" else 1)
    m = member(sim)
    assert (m["bonus"], m["bonus_updates"]) == (170, 1)


def test_runner_without_a_kill_credits(sim: WeChatSim, tmp_path: Path) -> None:
    p = run(sim, tmp_path / "journal.db", "lane-1|plain", None)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"outcome": "credited", "points": 50, "bonus": 170}


def test_two_takers_of_one_row_send_once(sim: WeChatSim, ledger: Ledger,
                                         client: WeChatCardClient) -> None:
    """A claim's thread and the service's reconcile may both pick up one planned row: the
    compare-and-set to `sent` lets one send; the other reads the outcome."""
    c = plan(ledger, 5000)
    first = Crediter(ledger, client).credit(c, T0)
    second = Crediter(ledger, client).credit(c, T0)  # holds the stale `planned` view
    assert (first.outcome, second.outcome) == ("credited", "credited")
    assert second.credit.id == first.credit.id and second.bonus == 170
    assert member(sim)["bonus_updates"] == 1
    assert Crediter(ledger, client).reconcile(T0 + 5) == []  # nothing left to take up


def test_the_summary_counts_todays_credits_pending_and_what_needs_a_person(
        sim: WeChatSim, ledger: Ledger, client: WeChatCardClient, tmp_path: Path) -> None:
    from hexiao.hostd.members.ledger import summary

    assert summary(tmp_path / "none.db", T0)["credited"] == 0  # no journal yet: nothing
    crediter = Crediter(ledger, client)
    crediter.credit(plan(ledger, 5000, "lane-1|a"), T0)  # +50
    crediter.credit(plan(ledger, -5000, "lane-1|refund"), T0)  # -50
    plan(ledger, 3000, "lane-1|waiting")  # pending
    stuck = ledger.advance(plan(ledger, 2000, "lane-1|stuck").id, "planned", "sent", T0,
                           points=20, before_bonus=120)
    ledger.advance(stuck.id, "sent", "unknown", T0, reason="points moved")
    assert summary(ledger.journal.path, T0 - 1) == {
        "credited": 50, "receipts": 1, "taken_back": -50, "pending": 1,
        "needs_person": [stuck.id]}
    assert summary(ledger.journal.path, T0 + 1)["credited"] == 0  # yesterday's
