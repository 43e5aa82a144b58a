"""Records that never arrived (fleetd/gaps.py, the records_missing alarm), with the real
Mosquitto and PostgreSQL: signed records are published with a hole planted in their seqs, as a
broker that dropped messages would leave them. Alarm thresholds are 0 or a fraction of a second
where an alarm must open, an hour where one must not: no test waits for minutes to pass."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from fleet_conftest import free_port, wait_until
from hexiao.fleetd import db, gaps, metrics
from hexiao.fleetd.alarms import Alarms, Thresholds
from hexiao.fleetd.main import main
from hexiao.hostd.fleet import record
from test_fleet import MERCHANT, Hq, Store, _raw_publisher, headquarters

HOUR = Thresholds(gap_s=3600)  # a hole younger than this raises nothing
NOW = Thresholds(gap_s=0)      # any hole raises records_missing at the next check


@pytest.fixture
def hq(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(fleet_dsn, fleet_broker, fleet_prefix) as h:
        yield h


def _body(store: str, inst: str) -> dict[str, Any]:
    return {"v": 1, "kind": "event", "merchant": MERCHANT, "store": store, "lane": "lane-1",
            "inst": inst, "at": 1, "name": "printer_lost"}


class Publisher:
    """Signed event records of one store, published straight to the broker (QoS 1)."""

    def __init__(self, hq: Hq, store: Store) -> None:
        self.hq, self.store, self.client = hq, store, _raw_publisher(hq.broker)

    def send(self, inst: str, *seqs: int) -> None:
        t = record.topic(MERCHANT, self.store.id, "lane-1", "event")
        for seq in seqs:
            sealed = record.seal(self.store.key, self.store.id, t, seq,
                                 record.encode(_body(self.store.id, inst)))
            self.client.publish(self.hq.prefix + t, sealed, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _stored(hq: Hq, store: str, n: int) -> None:
    wait_until(f"{n} records of {store} stored", lambda: hq.count(store, "records") == n)


def _stream(hq: Hq, store: str, inst: str) -> tuple[int, int, bool]:
    """(contiguous_upto, max_seq, a hole is dated) of one installation."""
    [(c, m, since)] = hq.rows("SELECT contiguous_upto, max_seq, gap_since FROM record_streams "
                              "WHERE store = %s AND inst = %s", store, inst)
    return c, m, since is not None


def _mine(store: str, rows: list[tuple[str, str, str]]) -> list[str]:
    return [k for k, s, _ in rows if s == store]


def _detail(hq: Hq, store: str) -> Any:
    [(detail,)] = hq.rows("SELECT detail FROM alarms WHERE kind = 'records_missing' AND store = "
                          "%s AND cleared IS NULL", store)
    return detail


def test_a_planted_hole_opens_records_missing_naming_it_and_the_late_record_clears_it(
        tmp_path: Path, hq: Hq) -> None:
    store, inst = hq.store(tmp_path), secrets.token_hex(16)
    fleetd, pub = hq.consumer(), Publisher(hq, store)
    alarms = Alarms(hq.dsn, Thresholds(gap_s=0.2))
    listen = f"127.0.0.1:{free_port()}"
    metrics.serve(listen, fleetd, alarms)
    try:
        pub.send(inst, 1, 2, 4, 5)  # 3 was "dropped by the broker"
        _stored(hq, store.id, 4)
        assert _stream(hq, store.id, inst) == (2, 5, True)
        opened: list[str] = []
        wait_until("records_missing to open", lambda: bool(
            opened.extend(_mine(store.id, alarms.check()[0])) or opened))
        assert opened == ["records_missing"]
        detail = _detail(hq, store.id)
        assert detail["missing"] == 1
        assert [(i["inst"], i["missing"], i["ranges"]) for i in detail["installations"]] == [
            (inst, 1, [[3, 3]])]
        assert alarms.gaps_open >= 1 and alarms.records_missing >= 1
        text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
        assert f"hexiao_fleetd_records_missing {float(alarms.records_missing)}" in text
        assert f"hexiao_fleetd_gaps_open {float(alarms.gaps_open)}" in text
        assert _mine(store.id, alarms.check()[0]) == []  # still true: not opened twice

        pub.send(inst, 3)  # the late arrival fills the hole
        _stored(hq, store.id, 5)
        assert _stream(hq, store.id, inst) == (5, 5, False)
        opened, cleared = alarms.check()
        assert _mine(store.id, cleared) == ["records_missing"] and _mine(store.id, opened) == []
        assert hq.rows("SELECT count(*) FROM alarms WHERE kind = 'records_missing' AND store = "
                       "%s AND cleared IS NULL", store.id) == [(0,)]
    finally:
        alarms.stop()
        pub.close()
        fleetd.stop()


def test_an_accepted_loss_clears_the_alarm_is_logged_and_a_late_copy_is_still_stored(
        tmp_path: Path, hq: Hq, caplog: pytest.LogCaptureFixture) -> None:
    store, inst = hq.store(tmp_path), secrets.token_hex(16)
    fleetd, pub = hq.consumer(), Publisher(hq, store)
    alarms = Alarms(hq.dsn, NOW)
    cli = CliRunner()
    try:
        pub.send(inst, 1, 3, 4, 7)
        _stored(hq, store.id, 4)
        assert _mine(store.id, alarms.check()[0]) == ["records_missing"]
        assert _detail(hq, store.id)["installations"][0]["ranges"] == [[2, 2], [5, 6]]

        r = cli.invoke(main, ["gaps", "--dsn", hq.dsn, "--store", store.id])
        assert r.exit_code == 0, r.output
        assert f"{store.id} {inst}: 3 missing below seq 7: 2, 5-6" in r.output
        r = cli.invoke(main, ["gaps", "--dsn", hq.dsn, "--store", store.id, "--json"])
        [row] = json.loads(r.output)["rows"]
        assert (row["inst"], row["missing"], row["ranges"]) == (inst, 3, [[2, 2], [5, 6]])

        # a mistake: one line saying what to do, nothing changed
        r = cli.invoke(main, ["gaps", "--dsn", hq.dsn, "--accept", store.id, "f" * 32])
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.output.count("\n") == 1 and "hexiao-fleetd gaps` lists" in r.output

        with caplog.at_level(logging.WARNING, logger="hexiao.fleetd"):
            r = cli.invoke(main, ["gaps", "--dsn", hq.dsn, "--accept", store.id, inst, "--by",
                                  "alice", "--note", "broker session purged"])
        assert r.exit_code == 0, r.output
        assert "accepted as lost: seqs 2, 5-6 (by alice)" in r.output
        assert any("accepted as lost by alice" in m and store.id in m and "2, 5-6" in m
                   for m in caplog.messages)
        assert hq.rows("SELECT first_seq, last_seq, accepted_by, note FROM record_losses WHERE "
                       "store = %s ORDER BY first_seq", store.id) == [
            (2, 2, "alice", "broker session purged"), (5, 6, "alice", "broker session purged")]
        assert _stream(hq, store.id, inst) == (7, 7, False)
        assert _mine(store.id, alarms.check()[1]) == ["records_missing"]
        r = cli.invoke(main, ["gaps", "--dsn", hq.dsn, "--accept", store.id, inst])
        assert r.exit_code == 0 and "no hole to accept" in r.output  # twice: harmless

        pub.send(inst, 5, 8)  # one accepted record turns up after all; the stream goes on
        _stored(hq, store.id, 6)
        assert _stream(hq, store.id, inst) == (8, 8, False)
        assert _mine(store.id, alarms.check()[0]) == []
        r = cli.invoke(main, ["gaps", "--dsn", hq.dsn, "--store", store.id, "--accepted"])
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert len(lines) == 2 and "seqs 5-6: accepted" in lines[1]
        assert "by alice (broker session purged), 1 arrived later" in lines[1]
    finally:
        alarms.stop()
        pub.close()
        fleetd.stop()


def test_out_of_order_arrival_and_a_new_installation_raise_nothing(
        tmp_path: Path, hq: Hq) -> None:
    store, old, new = hq.store(tmp_path), secrets.token_hex(16), secrets.token_hex(16)
    fleetd, pub = hq.consumer(), Publisher(hq, store)
    patient, eager = Alarms(hq.dsn, HOUR), Alarms(hq.dsn, NOW)
    try:
        pub.send(old, 1, 2, 4)
        _stored(hq, store.id, 3)
        assert _stream(hq, store.id, old) == (2, 4, True)  # seen, dated ...
        assert _mine(store.id, patient.check()[0]) == []   # ... and younger than the threshold
        patient.stop()  # hands the evaluation lock to `eager`
        pub.send(old, 3)
        pub.send(new, 1, 2, 3)  # a reinstalled store starts again at 1: no hole
        _stored(hq, store.id, 7)
        assert _stream(hq, store.id, old) == (4, 4, False)
        assert _stream(hq, store.id, new) == (3, 3, False)
        assert _mine(store.id, eager.check()[0]) == []
        with psycopg.connect(hq.dsn, autocommit=True) as conn:
            assert gaps.holes(conn, store=store.id) == []
    finally:
        patient.stop()
        eager.stop()
        pub.close()
        fleetd.stop()


def _event(store: str, inst: str, seq: int) -> db.Accepted:
    return db.Accepted(store, seq, _body(store, inst))


def test_a_batch_out_of_order_and_two_instances_committing_5_before_4_leave_no_hole(
        tmp_path: Path, hq: Hq) -> None:
    """Two fleetd instances write seq 5 and seq 4 at once. Each locks the stream after its
    INSERT; the lock is held here so that both wait, the one with 5 first in the queue: it
    commits before 4 exists for it, and the instance with 4 must then see 5."""
    store, inst = hq.store(tmp_path), secrets.token_hex(16)
    with psycopg.connect(hq.dsn, autocommit=True) as conn:
        db.write_batch(conn, [_event(store.id, inst, s) for s in (3, 1, 2)], [])
    assert _stream(hq, store.id, inst) == (3, 3, False)
    holder = psycopg.connect(hq.dsn)
    errors: list[BaseException] = []

    def write(seq: int) -> None:
        try:
            with psycopg.connect(hq.dsn, autocommit=True) as conn:
                db.write_batch(conn, [_event(store.id, inst, seq)], [])
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    def waiting(n: int) -> bool:
        return hq.rows("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                       "current_database() AND wait_event_type = 'Lock'")[0][0] >= n

    threads = [threading.Thread(target=write, args=(s,)) for s in (5, 4)]
    try:
        holder.execute("SELECT 1 FROM record_streams WHERE store = %s AND inst = %s FOR UPDATE",
                       (store.id, inst))
        threads[0].start()
        wait_until("the instance with seq 5 to wait for the stream", lambda: waiting(1))
        threads[1].start()
        wait_until("the instance with seq 4 to wait behind it", lambda: waiting(2))
    finally:
        holder.rollback()
        holder.close()
        for t in threads:
            t.join(30)
    assert errors == []
    assert _stream(hq, store.id, inst) == (5, 5, False)


def test_the_migration_backfills_streams_from_the_records_already_stored(
        fleet_pg_admin: str) -> None:
    name = f"hexiao_test_{secrets.token_hex(6)}"
    with psycopg.connect(fleet_pg_admin, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = fleet_pg_admin.rsplit("/", 1)[0] + "/" + name
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_migrations (version int PRIMARY KEY, name text "
                         "NOT NULL, applied timestamptz NOT NULL DEFAULT now())")
            for version, file, sql in db.migrations():  # the schema before record_streams
                if version < 4:
                    conn.execute(sql)  # type: ignore[arg-type]
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                 (version, file))
            have = {"a" * 32: (1, 2, 3, 5, 6), "b" * 32: (2, 3), "c" * 32: (1, 2, 3, 4)}
            for inst, seqs in have.items():
                for seq in seqs:
                    conn.execute("INSERT INTO records (store, inst, seq, merchant, lane, kind, "
                                 "at, payload) VALUES ('s1', %s, %s, 'm1', 'lane-1', 'event', "
                                 "now(), '{}')", (inst, seq))
            assert "004_record_streams.sql" in db.migrate(conn)
            streams = conn.execute("SELECT inst, contiguous_upto, max_seq, gap_since IS NOT NULL "
                                   "FROM record_streams ORDER BY inst").fetchall()
            assert streams == [("a" * 32, 3, 6, True), ("b" * 32, 0, 3, True),
                               ("c" * 32, 4, 4, False)]
            found = {h["inst"]: h["ranges"] for h in gaps.holes(conn)}
            assert found == {"a" * 32: [[4, 4]], "b" * 32: [[1, 1]]}
            db.write_batch(conn, [_event("s1", "b" * 32, 1)], [])  # the backfilled stream moves on
            assert [h["inst"] for h in gaps.holes(conn)] == ["a" * 32]
    finally:
        with psycopg.connect(fleet_pg_admin, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
