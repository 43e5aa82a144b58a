"""Member points at headquarters, for real: a store's points ledger (in its journal file, credits
against the WeChat simulator) writes a signed `points` record with every credit and reversal,
its bridge publishes it through Mosquitto, fleetd stores it in PostgreSQL (migration 008) and
`hexiao report points` sums it per store and day. Waits are bounded guards, never timings."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from fleet_conftest import wait_until
from hexiao.fleetd import db, reports
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.fleet import record
from hexiao.hostd.journal import Journal
from hexiao.hostd.members.credit import Crediter
from hexiao.hostd.members.ledger import Ledger
from hexiao.tools import report
from test_fleet import Hq, headquarters

MEMBER, CARD = "829304756182", "pHexiaoSimMemberCardxxxxxxxxx"  # 120 points; 1 a yuan


@pytest.fixture
def hq(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(fleet_dsn, fleet_broker, fleet_prefix) as h:
        yield h


def credit(ledger: Ledger, client: WeChatCardClient, receipt: str, fen: int,
           detail: dict[str, Any] | None = None) -> Any:
    c = ledger.plan(receipt, "lane-1", MEMBER, CARD, fen, time.time(), detail)
    return Crediter(ledger, client).credit(c, time.time())


def test_credits_and_reversals_reach_headquarters_once_and_the_report_sums_them(
        tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path, f"p{secrets.token_hex(4)}")
    fleetd = hq.consumer()
    bridge = hq.bridge(store)
    try:
        with WeChatSim(read(EXAMPLE)) as sim, Journal(store.journal) as journal:
            app = next(iter(sim.state.seed.apps.values()))
            with WeChatCardClient(sim.url, app.appid, app.secret) as client:
                ledger = Ledger(journal)
                sale = credit(ledger, client, "lane-1|sale", 5000, {"scan_id": 1})
                claim = credit(ledger, client, "lane-1|claimed", 2080, {"via": "claim"})
                small = credit(ledger, client, "lane-1|small", 50)  # 0 points: no record
                void = credit(ledger, client, "void|lane-1|sale", -5000,
                              {"void_of": sale.credit.id})
                ledger.close()
        assert [(r.outcome, r.points) for r in (sale, claim, small, void)] == [
            ("credited", 50), ("credited", 20), ("nothing", 0), ("credited", -50)]
        # each record committed with its ledger row, in the journal's own file
        wait_until("3 points rows in PostgreSQL", lambda: hq.count(store.id, "points") == 3)
        wait_until("the outbox to empty", lambda: bridge.outbox.depth()[0] == 0)
        rows = hq.rows("SELECT entry, lane, receipt, points, total_fen, via, code_tail, "
                       "code_hash, card_id FROM points WHERE store = %s ORDER BY entry",
                       store.id)
        key = record.derive_code_key(store.key)
        assert rows == [
            (sale.credit.id, "lane-1", "lane-1|sale", 50, 5000, "till", "6182",
             record.code_hash(key, MEMBER), CARD),
            (claim.credit.id, "lane-1", "lane-1|claimed", 20, 2080, "claim", "6182",
             record.code_hash(key, MEMBER), CARD),
            (void.credit.id, "lane-1", "void|lane-1|sale", -50, -5000, "void", "6182",
             record.code_hash(key, MEMBER), CARD)]
        assert fleetd.counts["written"] >= 3 and sum(
            fleetd.counts[r] for r in record.REASONS) == 0
        # the records again (the broker redelivering, a store publishing its outbox again):
        # written once, the copies counted as replays
        with psycopg.connect(hq.dsn, autocommit=True) as conn:
            again = [db.Accepted(store.id, seq, payload) for seq, payload in conn.execute(
                "SELECT seq, payload FROM records WHERE store = %s AND kind = 'points'",
                (store.id,))]
            assert db.write_batch(conn, again, [])["replay"] == 3
        assert hq.count(store.id, "points") == 3
        today = dt.datetime.now(dt.UTC).astimezone().date()
        with psycopg.connect(hq.dsn, autocommit=True) as conn:
            mine = [r for r in reports.points(conn, tz="UTC") if r["store"] == store.id]
        assert [{k: r[k] for k in ("receipts", "credited", "taken_back", "net")}
                for r in mine] == [{"receipts": 2, "credited": 70, "taken_back": -50, "net": 20}]
        out = CliRunner().invoke(report.main, ["points", "--dsn", hq.dsn, "--json", "--tz",
                                               "UTC"])
        assert out.exit_code == 0, out.output
        [row] = [r for r in json.loads(out.output)["rows"] if r["store"] == store.id]
        assert (row["credited"], row["taken_back"], row["net"]) == (70, -50, 20)
        assert abs((dt.date.fromisoformat(row["day"]) - today).days) <= 1
        table = CliRunner().invoke(report.main, ["points", "--dsn", hq.dsn, "--from",
                                                 "2001-01-01", "--to", "2001-01-02"])
        assert table.exit_code == 0 and table.output == "no member points in that range\n"
    finally:
        bridge.stop()
        fleetd.stop()


def test_a_points_record_opens_only_whole() -> None:
    """The record's fields are checked like a redemption's: a short code hash is malformed."""
    payload = {"v": 1, "kind": "points", "merchant": "m1", "store": "s1", "lane": "lane-1",
               "inst": "0" * 32, "at": 1, "entry": 1, "receipt": "lane-1|d", "points": 5,
               "total_fen": 500, "card_id": CARD, "via": "till", "code_tail": "6182",
               "code_hash": b"x" * 32, "ended": 1}
    record.check_payload(payload, ("m1", "s1", "lane-1", "points"), 3)
    with pytest.raises(record.RecordError, match="code_hash"):
        record.check_payload({**payload, "code_hash": b"x"}, ("m1", "s1", "lane-1", "points"), 3)
    with pytest.raises(record.RecordError, match="points"):
        record.check_payload({**payload, "points": "5"}, ("m1", "s1", "lane-1", "points"), 3)


def test_the_ledger_row_and_its_record_commit_together(tmp_path: Path) -> None:
    """A hook that fails aborts the credit's end: no `done` without its record."""
    from hexiao.hostd.members import ledger as lg

    path = tmp_path / "journal.db"
    calls: list[int] = []

    def hook(db: sqlite3.Connection, c: Any, now: float) -> None:
        calls.append(c.id)
        raise RuntimeError("disk full")

    with Journal(path) as journal:
        led = Ledger(journal)
        c = led.plan("lane-1|r", "lane-1", MEMBER, CARD, 5000, 1.0)
        c = led.advance(c.id, "planned", "sent", 1.0, points=50, before_bonus=120)
        lg.set_done_hook(path, hook)
        try:
            with pytest.raises(RuntimeError):
                led.advance(c.id, "sent", "done", 2.0, outcome="credited", result_bonus=170)
        finally:
            lg.set_done_hook(path, None)
        assert calls == [c.id] and led.get(c.id).state == "sent"
        led.close()
