"""`hexiao report` against real stores: journals on disk, their bridges through Mosquitto, fleetd
into PostgreSQL, and the reports read back; the settlement must equal the journals to the fen."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from click.testing import CliRunner
from fleet_conftest import wait_until
from hexiao.fleetd import reports
from hexiao.hostd import journal as jr
from hexiao.hostd.fleet.totals import journal_totals
from hexiao.tools import report
from test_fleet import Hq, headquarters


@pytest.fixture
def hq(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(fleet_dsn, fleet_broker, fleet_prefix) as h:
        yield h

CST = ZoneInfo("Asia/Shanghai")


def at(day: int, hh: int, mm: int, ss: int = 0) -> float:
    return dt.datetime(2024, 3, day, hh, mm, ss, tzinfo=CST).timestamp()


CASH = ("CASH", {"reduce_cost": 0, "least_cost": 10000})


def shop(path: Path, items: list[tuple[float, str, str, int, str]], lane: str = "lane-1") -> None:
    """Entries through the journal's own transitions: (time, code, card type, fen, outcome);
    an outcome 'late-accepted' ends not_consumed and is corrected to accepted afterwards."""
    with jr.Journal(path) as j:
        for t, code, card_type, fen, outcome in items:
            value = {"reduce_cost": fen, "least_cost": 10000} if card_type == "CASH" else \
                {"discount": 20} if card_type == "DISCOUNT" else {"gift": "a cup"}
            e = j.begin(code, lane, t - 1, code=code, origin={"device": "hx-0001"})
            j.advance(e.id, "received", "checked", t - 0.5, detail={
                "card_type": card_type, "card_id": "p1", "title": "t", "value": value})
            if outcome == "refused":
                j.advance(e.id, "checked", "done", t, outcome="refused", reason="used")
                continue
            j.advance(e.id, "checked", "consume_sent", t - 0.2)
            first = "not_consumed" if outcome == "late-accepted" else outcome
            j.advance(e.id, "consume_sent", "done", t, outcome=first)
            if outcome == "late-accepted":
                j.correct(e.id, "accepted", t + 2, why="the consume reply arrived late")


def test_settlement_per_franchisee_equals_the_stores_journals_to_the_fen(
        tmp_path: Path, hq: Hq) -> None:
    tag = secrets.token_hex(3)
    fa, fb = f"fa-{tag}", f"fb-{tag}"
    code_key = tmp_path / "code.key"
    code_key.write_text(secrets.token_hex(32))
    code_key.chmod(0o600)
    s1, s2, s3 = hq.store(tmp_path, franchisee=fa), hq.store(tmp_path, franchisee=fa), \
        hq.store(tmp_path, franchisee=fb)
    silent = hq.store(tmp_path, franchisee=fb)  # added, never heard from
    fleetd = hq.consumer()
    bridges = [hq.bridge(s, code_key_file=code_key) for s in (s1, s2, s3)]
    try:
        shop(s1.journal, [
            (at(1, 10, 0), "100000000001", "CASH", 500, "accepted"),
            (at(1, 11, 0), "100000000002", "CASH", 1999, "accepted"),
            (at(1, 12, 0), "100000000003", "CASH", 700, "refused"),
            (at(1, 23, 59, 30), "100000000004", "DISCOUNT", 0, "accepted"),
            (at(2, 0, 0, 30), "100000000005", "CASH", 1, "accepted"),   # the next day (CST)
            (at(2, 9, 0), "100000000006", "CASH", 333, "late-accepted"),
            (at(3, 9, 0), "100000000007", "CASH", 9900, "accepted"),    # out of range
            (at(2, 13, 0), "555555555555", "CASH", 1000, "accepted"),
        ])
        shop(s2.journal, [(at(1, 8, 0) + i * 61, f"2000000{i:05d}", "CASH", 100 + i, "accepted")
                          for i in range(30)] + [
            (at(2, 18, 0), "200000099999", "GIFT", 0, "accepted"),
            (at(2, 19, 0), "200000099998", "CASH", 250, "not_consumed")], lane="lane-2")
        shop(s3.journal, [
            (at(2, 14, 0), "555555555555", "CASH", 1000, "accepted"),  # a code used twice
            (at(2, 15, 0), "300000000001", "CASH", 12345, "accepted")])
        wait_until("every store's entries at headquarters", lambda: (
            hq.count(s1.id), hq.count(s2.id), hq.count(s3.id)) == (8, 32, 2))
        wait_until("the late correction", lambda: hq.rows(
            "SELECT outcome FROM redemptions WHERE store = %s AND code_tail = '0006'",
            s1.id) == [("accepted",)])
        start, end = dt.date(2024, 3, 1), dt.date(2024, 3, 2)

        # the journals' own totals, by franchisee and (day, card type)
        want: dict[str, Counter[tuple[str, str, str]]] = {fa: Counter(), fb: Counter()}
        fen: dict[str, int] = {fa: 0, fb: 0}
        count: dict[str, int] = {fa: 0, fb: 0}
        for s, f in ((s1, fa), (s2, fa), (s3, fb)):
            for (day, card_type), (n, v) in journal_totals(s.journal, start, end).items():
                want[f][(s.id, day.isoformat(), card_type)] += v
                fen[f] += v
                count[f] += n
        assert fen[fa] == 500 + 1999 + 1 + 333 + 1000 + sum(100 + i for i in range(30))
        assert fen[fb] == 1000 + 12345

        with psycopg.connect(hq.dsn, autocommit=True) as conn:
            for f in (fa, fb):
                rows = reports.settlement(conn, start, end, franchisee=f)
                got = {(r["store"], r["day"].isoformat(), r["card_type"]): r["face_value_fen"]
                       for r in rows}
                assert got == {k: v for k, v in want[f].items()}
                assert sum(r["redemptions"] for r in rows) == count[f]
                assert all(isinstance(r["face_value_fen"], int) for r in rows)
            dups = reports.duplicates(conn, start=start, end=end)
            mine = [d for d in dups if {p["store"] for p in d["places"]} & {s1.id, s3.id}]
            assert len(mine) == 1 and mine[0]["code_tail"] == "5555" and mine[0]["times"] == 2
            assert [p["store"] for p in mine[0]["places"]] == [s1.id, s3.id]  # by time
            quiet = {r["store"] for r in reports.quiet(conn, 1.0)}
            assert silent.id in quiet and not quiet & {s1.id, s2.id, s3.id}
            by_lane = reports.redemptions(conn, ["store", "lane", "card_type"], start=start,
                                          end=end)
            assert {(r["lane"], r["card_type"], r["redemptions"]) for r in by_lane
                    if r["store"] == s2.id} == {("lane-2", "CASH", 30), ("lane-2", "GIFT", 1)}

        # the command: CSV per franchisee with a TOTAL line in yuan; JSON in fen
        runner = CliRunner()
        out = runner.invoke(report.main, ["settlement", "--dsn", hq.dsn, "--from", "2024-03-01",
                                          "--to", "2024-03-02", "--out", str(tmp_path / "csv")])
        assert out.exit_code == 0, out.output
        for f in (fa, fb):
            text = (tmp_path / "csv" / f"settlement-{f}-2024-03-01-2024-03-02.csv").read_text()
            lines = list(csv.DictReader(io.StringIO(text)))
            total = lines[-1]
            assert total["store"] == "TOTAL" and int(total["face_value_fen"]) == fen[f]
            assert total["face_value_yuan"] == f"{fen[f] // 100}.{fen[f] % 100:02d}"
            assert sum(int(r["face_value_fen"]) for r in lines[:-1]) == fen[f]
        out = runner.invoke(report.main, ["settlement", "--dsn", hq.dsn, "--from", "2024-03-01",
                                          "--to", "2024-03-02", "--franchisee", fb, "--json"])
        assert json.loads(out.output)["totals"] == {fb: {"redemptions": 2,
                                                         "face_value_fen": 13345}}
        out = runner.invoke(report.main, ["redemptions", "--dsn", hq.dsn, "--by",
                                          "franchisee,card_type", "--from", "2024-03-01"])
        assert out.exit_code == 0 and fa in out.output and "face value (yuan)" in out.output
        out = runner.invoke(report.main, ["duplicates", "--dsn", hq.dsn, "--csv"])
        assert out.exit_code == 0 and "5555" in out.output
    finally:
        for b in bridges:
            b.stop()
        fleetd.stop()


def test_report_says_in_one_line_what_is_wrong(fleet_pg_admin: str) -> None:
    runner = CliRunner()
    out = runner.invoke(report.main, ["quiet", "--dsn", "postgresql://postgres@127.0.0.1:1/x"])
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1
    assert "database" in out.output and "Traceback" not in out.output
    out = runner.invoke(report.main, ["alarms", "--dsn", fleet_pg_admin])  # no fleetd tables
    assert out.exit_code == 1 and "hexiao-fleetd migrate" in out.output
    out = runner.invoke(report.main, ["redemptions", "--by", "weather"])
    assert out.exit_code == 2 and "choose from" in out.output
    out = runner.invoke(report.main, ["settlement", "--from", "2024-03-02", "--to",
                                      "2024-03-01"])
    assert out.exit_code == 2 and "before --from" in out.output
    assert reports.yuan(123456) == "1234.56" and reports.yuan(5) == "0.05"
