"""Voided sales take their points back, once (hostd/tap/receipt.py finds the void,
hostd/members/service.py links it to the sale, credit.py takes the points back).

The parser over real ESC/POS bytes (python-escpos's Dummy through the Injector); the service
over the real simulator on loopback HTTP and a real journal file, receipts as the tap hands
them over; a crash is a real SIGKILL of tests/points_runner.py at each step of a void.
"""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from escpos.printer import Dummy
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.config import from_dict
from hexiao.hostd.journal import Journal
from hexiao.hostd.members.claim import Claims
from hexiao.hostd.members.credit import Crediter, record_text
from hexiao.hostd.members.ledger import Ledger
from hexiao.hostd.members.service import PointsService
from hexiao.hostd.tap.inject import Injector, make_token
from hexiao.hostd.tap.receipt import VOID_WORDS, Receipt, find_numbers, find_void, void_words
from hexiao.hostd.tap.service import TapService
from test_points_till import APPID, MEMBER, SECRET, bonus, client, scan, seed, service, sim, told  # noqa: F401  (fixtures)
from test_tap_proxy import quiet

CARD = "pHexiaoSimMemberCardxxxxxxxxx"
RUNNER = Path(__file__).with_name("points_runner.py")


# --- the parser ---------------------------------------------------------------------------

def escpos(*lines: str) -> bytes:
    """One receipt as a POS prints it: GB18030 text, then a cut."""
    dummy = quiet(Dummy)
    dummy._raw(b"\x1b@" + "".join(f"{line}\n" for line in lines).encode("gb18030"))
    quiet(dummy.cut)
    return dummy.output


def parsed(data: bytes, **kw: Any) -> Receipt:
    inj = Injector(enabled=False, **kw)
    inj.feed(data, T0)
    inj.close(T0)
    [rc] = inj.receipts
    return rc


def test_a_void_banner_is_found_with_its_numbers_in_the_printed_bytes() -> None:
    rc = parsed(escpos("好又多超市", "流水号: 000125", "*** 作废 ***", "原单号: 000124",
                       "01 可口可乐 330ml  ¥3.50", "合计: ¥-32.50"))
    assert (rc.void, rc.number, rc.void_of, rc.total) == (True, "000125", "000124",
                                                          Decimal("-32.50"))
    assert rc.as_json()["void"] is True


@pytest.mark.parametrize("lines, void", [
    (["Shop", "Receipt No. A1001", "VOIDED", "Cola 3.00", "Total 3.00"], True),
    (["Shop", "x", "Cola 3.00", "VOID TOTAL 3.00"], True),   # on the total's own line
    (["Shop", "x", "Cola 3.00", "合计 3.00", "撤销"], True),  # a banner next to the total
    (["超市", "取消交易", "合计 3.00"], True),
    # a line void (one item off the sale) is no void of the sale, in the head or by the total
    (["Shop", "Cola 3.00", "VOID Cola -3.00", "Tea 2.00", "Total 2.00"], False),
    (["Shop", "Avoid queues: order online", "Total 2.00"], False),  # a word, not VOID
    (["Shop"] + ["Cola 3.00"] * 12 + ["作废", "Milk 1.00"] * 1 + ["Tea"] * 4 + ["合计 9.00"],
     False),  # among the items, far from the head and the total
])
def test_what_counts_as_a_void(lines: list[str], void: bool) -> None:
    assert find_void(lines, void_words(VOID_WORDS)) is void


def test_numbers_of_the_receipt_and_of_the_sale_it_voids() -> None:
    assert find_numbers(["Receipt #A1002", "Orig. Receipt: A1001"]) == ("A1002", "A1001")
    assert find_numbers(["原流水号 12345", "小票号:999"]) == ("999", "12345")
    assert find_numbers(["Keep this receipt for returns"]) == ("", "")


def test_the_void_words_come_from_the_tap_config(tmp_path: Path) -> None:
    key = tmp_path / "tap.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    cfg = from_dict({"tap": {"enabled": True, "printer": "tcp:127.0.0.1:9", "key_file": str(key),
                             "void_words": ["STORNO"]}})
    make = TapService(cfg.tap).assemble()[2]
    inj = make()
    inj.feed(escpos("Shop", "STORNO", "Total 3.00") + escpos("Shop", "VOID", "Total 3.00"), T0)
    inj.close(T0)
    assert [rc.void for rc in inj.receipts] == [True, False]
    with pytest.raises(ValueError, match="void_words"):
        void_words([" "])


# --- the service: a void takes the sale's points back ---------------------------------------

def receipt(total: str, digest: str, *, void: bool = False, number: str = "",
            void_of: str = "") -> Receipt:
    return Receipt(index=0, lines=[f"合计: ¥{total}"], printed=True, total=Decimal(total),
                   digest=digest, void=void, number=number, void_of=void_of)


def sale(svc: PointsService, server: WeChatSim, tmp_path: Path, total: str, digest: str,
         number: str = "", scan_id: int = 1) -> None:
    svc.member_scanned("till-1", "lane-1", scan(server, tmp_path, MEMBER, scan_id))
    svc.receipts("lane-1", [receipt(total, digest, number=number)])


def test_a_void_naming_the_sale_takes_its_points_back_once_however_often_printed(
        sim: WeChatSim, tmp_path: Path, service: PointsService,  # noqa: F811
        told: list[tuple[str, dict[str, Any]]]) -> None:  # noqa: F811
    sale(service, sim, tmp_path, "80.00", "s1", number="000124", scan_id=1)
    sale(service, sim, tmp_path, "30.00", "s2", number="000125", scan_id=2)
    service.wait_idle()
    assert bonus(sim) == (230, 2)
    # a member is tied for the next sale meanwhile: the void is not that sale
    service.member_scanned("till-1", "lane-1", scan(sim, tmp_path, MEMBER, 3))
    service.receipts("lane-1", [receipt("-80.00", "v1", void=True, void_of="000124")])
    service.receipts("lane-1", [receipt("-80.00", "v1", void=True, void_of="000124")])  # replay
    service.receipts("lane-1", [receipt("80.00", "v1-reprint", void=True, void_of="000124")])
    service.wait_idle()
    assert bonus(sim) == (150, 3)
    assert "lane-1" in service.members  # still waiting for its own receipt
    assert told[-1][1]["scan_id"] == 1 and told[-1][1]["text"] == "积分退回 -80 共150 …6182"
    with Journal(tmp_path / "journal.db") as journal:
        ledger = Ledger(journal)
        void = ledger.by_receipt("void|lane-1|s1")
        ledger.close()
    assert void is not None and (void.state, void.outcome, void.points) == ("done", "credited",
                                                                           -80)
    assert record_text(void.receipt) == "作废s1"


def test_a_void_without_a_number_takes_the_lanes_last_sale_of_that_total(
        sim: WeChatSim, tmp_path: Path, service: PointsService, clock: Clock) -> None:  # noqa: F811
    sale(service, sim, tmp_path, "45.00", "s1")
    service.receipts("lane-1", [receipt("-12.00", "v0", void=True)])  # another amount: nothing
    service.receipts("lane-2", [receipt("-45.00", "v0", void=True)])  # another lane: nothing
    service.wait_idle()
    assert bonus(sim) == (165, 1)
    service.receipts("lane-1", [receipt("-45.00", "v1", void=True)])
    service.receipts("lane-1", [receipt("-45.00", "v2", void=True)])  # printed twice
    service.wait_idle()
    assert bonus(sim) == (120, 2)
    # past the window the lane's last sale is not taken back on a guess
    sale(service, sim, tmp_path, "20.00", "s2", scan_id=2)
    service.wait_idle()
    clock.now += service.void_window_s + 1
    service.receipts("lane-1", [receipt("-20.00", "v3", void=True)])
    service.wait_idle()
    assert bonus(sim) == (140, 3)


def test_a_void_of_a_sale_with_no_member_takes_nothing_and_bars_its_qr(
        sim: WeChatSim, tmp_path: Path, service: PointsService,  # noqa: F811
        told: list[tuple[str, dict[str, Any]]], clock: Clock) -> None:  # noqa: F811
    digest = bytes(range(32))
    service.receipts("lane-1", [receipt("25.00", digest.hex(), number="000200")])  # no member
    service.receipts("lane-1", [receipt("-25.00", "v0", void=True, void_of="000200")])
    service.receipts("lane-1", [receipt("-25.00", "v1", void=True)])  # printed again
    service.receipts("lane-1", [receipt("-99.00", "v2", void=True)])  # a sale never seen
    service.wait_idle()
    assert bonus(sim) == (120, 0) and told == []
    with Journal(tmp_path / "journal.db") as journal:
        ledger = Ledger(journal)
        [row] = ledger.entries()
        ledger.close()
    assert (row.receipt, row.state, row.outcome, row.reason, row.code) == (
        f"lane-1|{digest.hex()[:24]}", "done", "nothing", "voided", "")
    # the customer kept the voided receipt and scans its QR: refused, nothing credited
    key = bytes(range(1, 33))
    claims = Claims(tmp_path / "journal.db", lambda: client(sim), [key], clock=clock)
    status, answer = claims.claim({"token": make_token(key, "lane-1", int(clock()),
                                                       Decimal("25.00"), digest),
                                   "card_id": CARD, "code": MEMBER})
    assert (status, answer["error"]) == (410, "voided")
    assert bonus(sim) == (120, 0)


def test_a_void_takes_back_a_claimed_sale_and_passes_over_a_newer_sale_of_another_total(
        sim: WeChatSim, tmp_path: Path, service: PointsService, clock: Clock) -> None:  # noqa: F811
    sale(service, sim, tmp_path, "32.50", "member-sale")  # +32 at the till
    digest = bytes(range(32))
    service.receipts("lane-1", [receipt("20.80", digest.hex())])  # no card shown: QR claimed
    service.receipts("lane-1", [receipt("10.00", "other")])  # the next customer
    service.wait_idle()
    key = bytes(range(1, 33))
    claims = Claims(tmp_path / "journal.db", lambda: client(sim), [key], clock=clock)
    status, answer = claims.claim({"token": make_token(key, "lane-1", int(clock()),
                                                       Decimal("20.80"), digest),
                                   "card_id": CARD, "code": MEMBER})
    assert (status, answer["points"]) == (200, 20) and bonus(sim) == (172, 2)
    service.receipts("lane-1", [receipt("-20.80", "v1", void=True)])  # the claimed sale
    service.receipts("lane-1", [receipt("-32.50", "v2", void=True)])  # the member's sale
    service.wait_idle()
    assert bonus(sim) == (120, 4)


def test_a_void_waits_for_its_sales_credit_and_takes_nothing_from_a_sale_that_earned_none(
        sim: WeChatSim, tmp_path: Path, clock: Clock) -> None:  # noqa: F811
    with Journal(tmp_path / "journal.db") as journal, client(sim) as c:
        ledger = Ledger(journal)
        s = ledger.plan("lane-1|s1", "lane-1", MEMBER, CARD, 5000, T0)
        v = ledger.plan("void|lane-1|s1", "lane-1", MEMBER, CARD, -5000, T0, {"void_of": s.id})
        crediter = Crediter(ledger, c)
        assert crediter.credit(v, T0).outcome == "pending"  # the sale's credit comes first
        out = crediter.reconcile(T0, restart=True)
        assert [(r.outcome, r.points) for r in out] == [("credited", 50), ("credited", -50)]
        small = ledger.plan("lane-1|s2", "lane-1", MEMBER, CARD, 50, T0)  # 0.50: no points
        assert crediter.credit(small, T0).outcome == "nothing"
        v2 = ledger.plan("void|lane-1|s2", "lane-1", MEMBER, CARD, -50, T0,
                         {"void_of": small.id})
        assert crediter.credit(v2, T0).outcome == "nothing"
        ledger.close()
    assert bonus(sim) == (120, 2)


# --- SIGKILL mid-void -----------------------------------------------------------------------

@pytest.mark.parametrize("step", ["planned", "sent", "replied", "done"])
def test_sigkill_at_each_step_of_a_void_then_reconcile_takes_back_exactly_once(
        sim: WeChatSim, tmp_path: Path, step: str) -> None:  # noqa: F811
    path = tmp_path / "journal.db"
    with Journal(path) as journal, client(sim) as c:
        ledger = Ledger(journal)
        s = ledger.plan("lane-1|s1", "lane-1", MEMBER, CARD, 5000, T0)
        assert Crediter(ledger, c).credit(s, T0).outcome == "credited"
        ledger.close()
    assert bonus(sim) == (170, 1)
    p = subprocess.run(
        [sys.executable, str(RUNNER), str(path), sim.url, APPID, SECRET, MEMBER, CARD, "-5000",
         "void|lane-1|s1", str(T0), "--kill-at", step, "--void-of", str(s.id)],
        capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    landed = {"planned": 0, "sent": 0, "replied": 1, "done": 1}[step]
    assert bonus(sim)[1] == 1 + landed
    with Journal(path) as journal, client(sim) as c:
        ledger = Ledger(journal)
        Crediter(ledger, c).reconcile(T0 + 120, restart=True)
        v = ledger.by_receipt("void|lane-1|s1")
        ledger.close()
    assert v is not None and (v.state, v.outcome, v.points) == ("done", "credited", -50)
    assert bonus(sim) == (120, 2)

