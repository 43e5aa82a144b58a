"""The fleet path's faults, each for real: a store process SIGKILLed between its journal commit
and the publish, and between the publish and its acknowledgement; its Last Will; PostgreSQL
restarted under load (a throwaway cluster, never the machine's); a store whose clock is wrong.

The store process is a bridge runner (the real Bridge and journal in a subprocess, below);
nothing asserts a duration: waits are bounded by hang guards, outcomes are asserted."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fleet_conftest import Postgres, create_database, free_port, wait_until
from hexiao.fleetd import reports
from hexiao.fleetd.consumer import Consumer
from hexiao.hostd.fleet.totals import journal_totals
from test_fleet import Hq, Store, _redeem_directly, headquarters
from test_fleet_reports import at, shop


@pytest.fixture
def hq(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(fleet_dsn, fleet_broker, fleet_prefix) as h:
        yield h


# the store side in a process of its own: a real Bridge on a real journal, told what to do
RUNNER = r"""
import sys, threading, time
from pathlib import Path
from hexiao.hostd.config.types import Fleet
from hexiao.hostd.fleet.bridge import Bridge
sys.path.insert(0, sys.argv[8])
from test_fleet import _redeem_directly

journal, key_file, store, broker, prefix, keepalive, mode, tests = sys.argv[1:9]
bridge = Bridge(Fleet(enabled=True, broker=broker, merchant="m1", store=store,
                      key_file=Path(key_file), topic_prefix=prefix, keepalive_s=int(keepalive),
                      session_expiry_s=300), Path(journal))
acked = []
if mode == "publish-no-ack":  # the broker's PUBACKs arrive; the process dies before the delete
    bridge.outbox.delete = acked.extend
bridge.start()
if mode == "live":
    bridge.connected.wait(30)
    print("connected", flush=True)
else:
    _redeem_directly(Path(journal), 50)
    if mode == "publish-no-ack":
        while len(acked) < 50:
            time.sleep(0.01)
    print("committed" if mode == "commit-no-publish" else "acked", len(acked), flush=True)
threading.Event().wait()
"""


def run_store(hq: Hq, store: Store, mode: str, broker: str | None = None,
              keepalive: int = 30) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(store.journal), str(store.key_file), store.id,
         broker or hq.broker, hq.prefix, str(keepalive), mode, str(Path(__file__).parent)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the runner says when it is where the test wants it
    assert line.split()[:1] == [{"live": "connected", "commit-no-publish": "committed",
                                 "publish-no-ack": "acked"}[mode]], line
    with sqlite3.connect(store.journal) as conn:
        inst = conn.execute("SELECT value FROM fleet_meta WHERE key = 'inst'").fetchone()[0]
    hq.sessions.append((broker or hq.broker, f"hx-{store.id}-{inst[:12]}"))
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def outbox_depth(store: Store) -> int:
    with sqlite3.connect(store.journal) as conn:
        return conn.execute("SELECT count(*) FROM fleet_outbox").fetchone()[0]


def exactly_once(hq: Hq, store: Store, n: int) -> None:
    rows = hq.rows("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM records "
                   "WHERE store = %s AND kind = 'redemption'", store.id)
    assert rows == [(n, n, 1, n)]
    assert hq.rows("SELECT entry FROM redemptions WHERE store = %s ORDER BY seq", store.id) == \
        [(i,) for i in range(1, n + 1)]


def test_store_killed_between_journal_commit_and_publish(tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path)
    fleetd = hq.consumer()
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens: nothing can be published
    proc = run_store(hq, store, "commit-no-publish", broker=dead)
    try:
        kill(proc)  # 50 journal steps committed with their records; none published
        assert outbox_depth(store) == 50 and hq.count(store.id) == 0
        bridge = hq.bridge(store)  # hostd again, on the same journal
        try:
            wait_until("the 50 records after the restart", lambda: hq.count(store.id) == 50)
            wait_until("the outbox to empty", lambda: outbox_depth(store) == 0)
        finally:
            bridge.stop()
        exactly_once(hq, store, 50)
    finally:
        proc.kill()
        fleetd.stop()


def test_store_killed_between_publish_and_acknowledgement(tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path)
    fleetd = hq.consumer()
    proc = run_store(hq, store, "publish-no-ack")
    try:
        wait_until("the 50 rows at headquarters", lambda: hq.count(store.id) == 50)
        kill(proc)  # the broker took all 50; the store never deleted them
        assert outbox_depth(store) == 50
        replays = fleetd.counts["replay"]
        bridge = hq.bridge(store)  # publishes all 50 again, from the oldest
        try:
            wait_until("the outbox to empty", lambda: outbox_depth(store) == 0)
            wait_until("the second copies refused", lambda: fleetd.counts["replay"] ==
                       replays + 50)
        finally:
            bridge.stop()
        exactly_once(hq, store, 50)
    finally:
        proc.kill()
        fleetd.stop()


def test_the_last_will_marks_a_killed_store_offline(tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path)
    fleetd = hq.consumer()
    proc = run_store(hq, store, "live", keepalive=2)
    try:
        wait_until("the store online", lambda: hq.rows(
            "SELECT state FROM store_online WHERE store = %s", store.id) == [("online",)])
        killed = time.monotonic()
        kill(proc)
        wait_until("the Last Will's offline", lambda: hq.rows(
            "SELECT state FROM store_online WHERE store = %s", store.id) == [("offline",)])
        print(f"offline at headquarters {time.monotonic() - killed:.2f} s after the kill "
              "(keep-alive 2 s)")
        # the will is the store's own signed record, not the broker's word
        assert hq.rows("SELECT count(*) FROM rejections WHERE store = %s", store.id) == [(0,)]
    finally:
        proc.kill()
        fleetd.stop()


@pytest.fixture
def own_postgres() -> Postgres:
    pg = Postgres().start()
    try:
        yield pg  # type: ignore[misc]
    finally:
        pg.remove()


def test_postgres_restarted_under_load_loses_and_doubles_nothing(
        tmp_path: Path, hq: Hq, own_postgres: Postgres) -> None:
    pg = own_postgres
    dsn = create_database(pg.admin)
    hq_pg = Hq(dsn, hq.broker, hq.prefix + "pg/", hq.group + "pg", hq.sessions)
    store = hq_pg.store(tmp_path)
    fleetd: Consumer = hq_pg.consumer()
    bridge = hq_pg.bridge(store)
    n = 600
    writer = threading.Thread(target=_redeem_directly, args=(store.journal, n))
    try:
        writer.start()
        wait_until("rows arriving", lambda: hq_pg.count(store.id) > 0)
        pg.stop("fast")  # under load: fleetd's connection is cut mid-stream
        wait_until("fleetd to notice", lambda: fleetd.db_retries > 0)
        pg.start()
        writer.join(60)
        wait_until(f"all {n} rows after the restart", lambda: hq_pg.count(store.id) == n)
        exactly_once(hq_pg, store, n)
        print(f"PostgreSQL restarted under load: {fleetd.db_retries} batch retries, "
              f"{fleetd.counts['replay']} replays refused")
    finally:
        writer.join(60)
        bridge.stop()
        fleetd.stop()


def test_a_store_whose_clock_is_wrong_is_ordered_and_settled_by_its_journal(
        tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path, franchisee=f"clock-{os.getpid()}")
    fleetd = hq.consumer()
    bridge = hq.bridge(store)
    try:
        # the clock jumps back two hours, then to next year, then back: journal order stands
        shop(store.journal, [
            (at(5, 10, 0), "700000000001", "CASH", 100, "accepted"),
            (at(5, 8, 0), "700000000002", "CASH", 200, "accepted"),
            (at(5, 9, 0) + 365 * 86400, "700000000003", "CASH", 400, "accepted"),
            (at(4, 23, 0), "700000000004", "CASH", 800, "accepted"),
            (at(5, 11, 0), "700000000005", "CASH", 1600, "refused")])
        wait_until("5 rows", lambda: hq.count(store.id) == 5)
        exactly_once(hq, store, 5)
        # every record was accepted whatever its time said; days are the journal's own
        assert hq.rows("SELECT count(*) FROM rejections WHERE store = %s", store.id) == [(0,)]
        start, end = dt.date(2024, 3, 4), dt.date(2025, 12, 31)
        want = {(d.isoformat(), c): v for (d, c), (_, v) in
                journal_totals(store.journal, start, end).items()}
        with psycopg.connect(hq.dsn, autocommit=True) as conn:
            got = {(r["day"].isoformat(), r["card_type"]): r["face_value_fen"] for r in
                   reports.settlement(conn, start, end, franchisee=f"clock-{os.getpid()}")}
        assert got == want == {("2024-03-04", "CASH"): 800, ("2024-03-05", "CASH"): 300,
                               ("2025-03-05", "CASH"): 400}
    finally:
        bridge.stop()
        fleetd.stop()
