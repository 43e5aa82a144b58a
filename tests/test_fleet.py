"""The store-to-headquarters path for real: hostd's journal and outbox (SQLite on disk), its
bridge over MQTT 5 to Mosquitto, hexiao-fleetd into PostgreSQL (tests/fleet_conftest.py).

Every wait is bounded by a hang guard; nothing asserts a duration. Each test has its own topic
prefix, stores and shared-subscription group, and ends the MQTT sessions it opened."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest
from fleet_conftest import Mosquitto, wait_until
from hexiao.fleetd import db
from hexiao.fleetd.consumer import Consumer, Settings
from hexiao.hostd import journal as jr
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.config.types import Fleet
from hexiao.hostd.fleet import record
from hexiao.hostd.fleet.bridge import Bridge, FleetError
from hexiao.hostd.fleet.outbox import Outbox, Place
from hexiao.hostd.redeem import Engine, LaneConfig, Verdict
from paho.mqtt.enums import CallbackAPIVersion

MERCHANT = "m1"


@dataclass
class Store:
    id: str
    key: bytes
    key_file: Path
    journal: Path


@dataclass
class Hq:
    dsn: str
    broker: str
    prefix: str
    group: str
    sessions: list[tuple[str, str]]  # (broker url, client id) to end after the test

    def store(self, tmp: Path, name: str | None = None, franchisee: str = "f1") -> Store:
        sid = name or f"s{secrets.token_hex(4)}"
        key = secrets.token_bytes(32)
        kf = tmp / f"{sid}.key"
        kf.write_text(key.hex())
        kf.chmod(0o600)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            db.add_store(conn, MERCHANT, sid, key, franchisee=franchisee)
        return Store(sid, key, kf, tmp / f"{sid}.sqlite3")

    def bridge(self, s: Store, broker: str | None = None, code_key_file: Path | None = None,
               keepalive_s: int = 30) -> Bridge:
        cfg = Fleet(enabled=True, broker=broker or self.broker, merchant=MERCHANT, store=s.id,
                    key_file=s.key_file, topic_prefix=self.prefix, session_expiry_s=300,
                    code_key_file=code_key_file, keepalive_s=keepalive_s)
        b = Bridge(cfg, s.journal)
        self.sessions.append((cfg.broker, b.client._client_id.decode()))
        return b.start()

    def settings(self, client_id: str, broker: str | None = None) -> Settings:
        url = urlsplit(broker or self.broker)
        self.sessions.append((broker or self.broker, client_id))
        return Settings(broker_host=url.hostname or "", broker_port=url.port or 1883,
                        dsn=self.dsn, group=self.group, topic_prefix=self.prefix,
                        client_id=client_id, session_expiry_s=300)

    def consumer(self, client_id: str | None = None, broker: str | None = None) -> Consumer:
        c = Consumer(self.settings(client_id or f"fd-{secrets.token_hex(4)}", broker)).start()
        wait_until("fleetd to subscribe", c.subscribed.is_set)
        return c

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]

    def count(self, store: str, table: str = "redemptions") -> int:
        return self.rows(f"SELECT count(*) FROM {table} WHERE store = %s", store)[0][0]


def _end_session(broker: str, client_id: str) -> None:
    """Connect once with a clean start and no expiry: the broker forgets the session."""
    url = urlsplit(broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    try:
        c.connect(url.hostname or "", url.port or 1883, clean_start=True)
        c.loop_start()
        time.sleep(0.1)
        c.disconnect()
        c.loop_stop()
    except OSError:
        pass  # a throwaway broker already gone: nothing to clean


@contextlib.contextmanager
def headquarters(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    """A test's own topic prefix and group; the MQTT sessions it opened are ended after it."""
    tag = secrets.token_hex(3)
    h = Hq(fleet_dsn, fleet_broker, f"{fleet_prefix}{tag}/", f"g{tag}", [])
    try:
        yield h
    finally:
        for broker, client_id in h.sessions:
            _end_session(broker, client_id)


@pytest.fixture
def hq(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(fleet_dsn, fleet_broker, fleet_prefix) as h:
        yield h


def _redeem_directly(path: Path, n: int, lane: str = "lane-1", start: int = 0) -> list[int]:
    """n accepted CASH redemptions through the journal's own transitions."""
    ids = []
    with jr.Journal(path) as j:
        for i in range(start, start + n):
            code = f"8{i:011d}"
            e = j.begin(code, lane, time.time(), code=code, origin={"device": "hx-0001"})
            j.advance(e.id, "received", "checked", time.time(),
                      detail={"card_type": "CASH", "card_id": "pcard", "title": "5 off",
                              "value": {"reduce_cost": 500, "least_cost": 0}})
            j.advance(e.id, "checked", "consume_sent", time.time())
            j.advance(e.id, "consume_sent", "done", time.time(), outcome="accepted")
            ids.append(e.id)
    return ids


# ---- the records and the outbox, no servers ------------------------------------------------------

def test_a_record_opens_only_with_its_key_topic_and_version() -> None:
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    keys = {"s1": key, "s2": other}
    t = record.topic("m1", "s1", "lane-1", "event")
    body = {"v": 1, "kind": "event", "merchant": "m1", "store": "s1", "lane": "lane-1",
            "inst": "ab" * 16, "at": 1, "name": "verify_manually"}

    def reason(data: bytes, topic: str = t) -> str:
        with pytest.raises(record.RecordError) as ei:
            record.unseal(data, topic, lambda k: (k, keys[k]) if k in keys else None)
        return ei.value.reason

    good = record.seal(key, "s1", t, 7, record.encode(body))
    assert record.unseal(good, t, lambda k: (k, keys[k]))[1:] == (7, body)
    assert reason(good, t.replace("lane-1", "lane-2")) == "bad_signature"  # aad is the topic
    assert reason(record.seal(other, "s1", t, 7, record.encode(body))) == "bad_signature"
    t2 = record.topic("m1", "s2", "lane-1", "event")
    assert reason(record.seal(other, "s2", t2, 7, record.encode(body))) == "topic_mismatch"
    assert reason(record.seal(key, "s9", t, 7, record.encode(body))) == "unknown_store"
    assert reason(record.seal(key, "s1", t, 7, record.encode({**body, "v": 2}))) == \
        "unknown_version"
    assert reason(record.seal(key, "s1", t, 7, record.encode({**body, "lane": "x"}))) == \
        "topic_mismatch"
    assert reason(record.seal(key, "s1", t, 7, record.encode({**body, "at": "x"}))) == \
        "malformed"
    assert reason(b"\x00garbage") == "malformed"
    assert reason(good, "hexiao/v1/m1/s1/lane-1/nope") == "malformed"


def test_outbox_rows_commit_with_their_journal_step_and_never_hold_the_code(
        tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    box = Outbox(path, Place("m1", "s1"), secrets.token_bytes(32))
    box.install()
    try:
        _redeem_directly(path, 3)
        rows = box.after(0, 100)
        assert [r.seq for r in rows] == [1, 2, 3]
        assert all(b"800000000000" not in r.payload for r in rows)  # tail and hash only
        assert all(r.topic == "hexiao/v1/m1/s1/lane-1/redemption" for r in rows)

        def boom(*a: Any) -> None:
            raise sqlite3.OperationalError("disk full")

        jr.set_step_hook(path, boom)  # the record cannot be written: the step is not either
        with jr.Journal(path) as j:
            e = j.begin("899999999999", "lane-1", time.time(), code="899999999999")
            with pytest.raises(sqlite3.OperationalError):
                j.advance(e.id, "received", "done", time.time(), outcome="refused")
            assert j.get(e.id).state == "received"
        box.install()
        box.delete([1, 2, 3])
        _redeem_directly(path, 1, start=50)
        assert [r.seq for r in box.after(0, 100)] == [4]  # a seq is never used twice
    finally:
        box.uninstall()
        box.close()


def test_a_bridge_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    kf = tmp_path / "k"
    kf.write_text(secrets.token_hex(32))
    kf.chmod(0o644)
    with pytest.raises(FleetError, match="key_file"):
        Bridge(Fleet(enabled=True, merchant="m1", store="s1", key_file=kf), tmp_path / "j")
    kf.chmod(0o600)
    kf.write_text("not hex")
    with pytest.raises(FleetError, match="64 hex digits"):
        Bridge(Fleet(enabled=True, merchant="m1", store="s1", key_file=kf), tmp_path / "j")


# ---- through Mosquitto into PostgreSQL ----------------------------------------------------------

def test_redemptions_from_a_real_journal_reach_postgres_exactly_once(tmp_path: Path,
                                                                     hq: Hq) -> None:
    store = hq.store(tmp_path)
    fleetd = hq.consumer()
    bridge = hq.bridge(store)
    try:
        # the engine against the WeChat simulator: accepted, used before, expired, invalid
        with WeChatSim(read(EXAMPLE)) as sim, jr.Journal(store.journal) as j:
            app = next(iter(sim.state.seed.apps.values()))
            with WeChatCardClient(sim.url, app.appid, app.secret) as client:
                engine = Engine(j, client, LaneConfig("lane-7"))
                verdicts = [engine.redeem(c, time.time()) for c in
                            ("287463512093", "287463512094", "110293847566", "999999999999")]
        assert [v.outcome for v in verdicts] == ["accepted", "refused", "refused", "refused"]
        _redeem_directly(store.journal, 40)
        wait_until("44 redemptions in PostgreSQL", lambda: hq.count(store.id) == 44)
        wait_until("the outbox to empty", lambda: bridge.outbox.depth()[0] == 0)
        with jr.Journal(store.journal) as j:
            journal = {e.id: e for e in j.entries()}
        rows = hq.rows("SELECT entry, outcome, reason, card_type, code_tail, face_value_fen, "
                       "lane FROM redemptions WHERE store = %s ORDER BY entry", store.id)
        assert [r[0] for r in rows] == sorted(journal)
        for entry, outcome, reason, card_type, tail, face, lane in rows:
            e = journal[entry]
            assert (outcome, reason, card_type, tail, lane) == (
                e.outcome, e.reason, e.detail.get("card_type"), (e.code or e.scanned)[-4:],
                e.lane)
            assert face == (e.detail["value"]["reduce_cost"] if outcome == "accepted" else
                            face)
        assert hq.rows("SELECT state FROM store_online WHERE store = %s", store.id) == \
            [("online",)]
        assert fleetd.counts["written"] == 44 and sum(
            fleetd.counts[r] for r in record.REASONS) == 0
    finally:
        bridge.stop()
        fleetd.stop()


def test_broker_down_the_store_keeps_redeeming_and_nothing_is_lost_or_doubled(
        tmp_path: Path, hq: Hq, throwaway_broker: Mosquitto) -> None:
    broker = throwaway_broker
    store = hq.store(tmp_path)
    fleetd = hq.consumer(broker=broker.url)
    bridge = hq.bridge(store, broker=broker.url)
    try:
        _redeem_directly(store.journal, 10)
        wait_until("the first 10 rows", lambda: hq.count(store.id) == 10)
        broker.stop()
        wait_until("the bridge to see the broker gone", lambda: not bridge.connected.is_set())
        _redeem_directly(store.journal, 60, start=10)  # the lanes do not wait for the broker
        wait_until("60 records waiting", lambda: bridge.outbox.depth()[0] == 60)
        assert hq.count(store.id) == 10
        broker.start()
        wait_until("all 70 rows after the broker came back", lambda: hq.count(store.id) == 70)
        wait_until("the outbox to empty", lambda: bridge.outbox.depth()[0] == 0)
        seqs = [r[0] for r in hq.rows("SELECT seq FROM records WHERE store = %s ORDER BY "
                                      "ingest_id", store.id)]
        assert sorted(seqs) == list(range(1, 71))  # none lost, none twice
        entries = [r[0] for r in hq.rows("SELECT entry FROM redemptions WHERE store = %s "
                                         "ORDER BY seq", store.id)]
        assert entries == list(range(1, 71))  # journal order, whatever the arrival order
    finally:
        bridge.stop()
        fleetd.stop()
        broker.stop()


def _raw_publisher(broker: str) -> mqtt.Client:
    url = urlsplit(broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"evil-{secrets.token_hex(3)}",
                    protocol=mqtt.MQTTv5)
    c.connect(url.hostname or "", url.port or 1883)
    c.loop_start()
    return c


def test_forged_misplaced_replayed_malformed_and_future_records_are_counted_never_written(
        tmp_path: Path, hq: Hq) -> None:
    a, b = hq.store(tmp_path), hq.store(tmp_path)
    fleetd = hq.consumer()
    evil = _raw_publisher(hq.broker)
    try:
        inst = secrets.token_hex(16)

        def sealed(key: bytes, signer: str, topic_store: str, seq: int, **over: Any) -> tuple[
                str, bytes]:
            t = record.topic(MERCHANT, topic_store, "lane-1", "event")
            body = {"v": 1, "kind": "event", "merchant": MERCHANT, "store": topic_store,
                    "lane": "lane-1", "inst": inst, "at": 1, "name": "safe_mode", **over}
            return hq.prefix + t, record.seal(key, signer, t, seq, record.encode(body))

        good = sealed(a.key, a.id, a.id, 1)
        sends = [
            good, good,                                            # the second is a replay
            sealed(b.key, a.id, a.id, 2),                          # forged: B's key, A's kid
            sealed(b.key, b.id, a.id, 3),                          # B's record on A's topic
            (hq.prefix + f"hexiao/v1/{MERCHANT}/{a.id}/lane-1/event", b"\xa1\x01garbage"),
            (hq.prefix + f"hexiao/v1/{MERCHANT}/{a.id}/lane-1/nonsense", good[1]),
            sealed(a.key, a.id, a.id, 4, v=2),                     # a version we do not know
        ]
        for topic, data in sends:
            evil.publish(topic, data, qos=1).wait_for_publish(10)
            if data is good[1] and topic == good[0]:
                wait_until("the record before its replay", lambda: hq.rows(
                    "SELECT count(*) FROM records WHERE store = %s", a.id)[0][0] == 1)
        want = {"replay": 1, "bad_signature": 1, "topic_mismatch": 1, "malformed": 2,
                "unknown_version": 1}
        wait_until("every rejection counted", lambda: all(
            fleetd.counts[r] == n for r, n in want.items()))
        counted = dict(hq.rows("SELECT reason, sum(count) FROM rejections WHERE store IN "
                               "(%s, %s, '') GROUP BY reason", a.id, b.id))
        assert counted == want
        assert hq.rows("SELECT seq FROM records WHERE store IN (%s, %s)", a.id, b.id) == [(1,)]
    finally:
        evil.disconnect()
        evil.loop_stop()
        fleetd.stop()


def _redemption(store: str, inst: str, seq: int, entry: int, outcome: str) -> db.Accepted:
    return db.Accepted(store, seq, {
        "v": 1, "kind": "redemption", "merchant": MERCHANT, "store": store, "lane": "lane-1",
        "inst": inst, "at": 1000 + seq, "entry": entry, "step": "done", "outcome": outcome,
        "reason": None, "card_type": "CASH", "card_id": "p", "title": "5 off",
        "value": {"reduce_cost": 500, "least_cost": 0}, "code_tail": "0001",
        "code_hash": bytes(32), "device": None, "received": 1000, "ended": 1000 + seq})


def test_a_batch_written_in_one_pipeline_keeps_order_and_counts_a_copy_as_replay(
        tmp_path: Path, hq: Hq) -> None:
    store, inst = hq.store(tmp_path), secrets.token_hex(16)
    batch = [_redemption(store.id, inst, 1, 1, "accepted"),
             _redemption(store.id, inst, 1, 1, "accepted"),       # a copy in the same batch
             _redemption(store.id, inst, 3, 2, "not_consumed"),   # entry 2's correction ...
             _redemption(store.id, inst, 2, 2, "accepted")]       # ... before its done
    with psycopg.connect(hq.dsn, autocommit=True) as conn:
        assert db.write_batch(conn, batch, []) == {"written": 3, "replay": 1}
        assert db.write_batch(conn, batch[:1], []) == {"replay": 1}  # a later batch's copy
    assert hq.rows("SELECT entry, seq, outcome FROM redemptions WHERE store = %s ORDER BY "
                   "entry", store.id) == [(1, 1, "accepted"), (2, 3, "not_consumed")]
    assert hq.rows("SELECT count(*) FROM records WHERE store = %s", store.id) == [(3,)]


def test_fleetd_asks_the_broker_for_more_than_its_default_20_unacknowledged(
        tmp_path: Path, hq: Hq) -> None:
    """fleetd acknowledges after its commit: with the broker's default in-flight limit (20 in
    Mosquitto) it would see at most 20 records per transaction. The table is locked so that
    nothing commits: what fleetd then holds unacknowledged is what the broker let it have."""
    a = hq.store(tmp_path)
    fleetd = hq.consumer()
    evil = _raw_publisher(hq.broker)
    lock = psycopg.connect(hq.dsn)
    try:
        lock.execute("LOCK TABLE records IN EXCLUSIVE MODE")
        inst = secrets.token_hex(16)
        t = record.topic(MERCHANT, a.id, "lane-1", "event")

        def publish(seq: int) -> None:
            body = {"v": 1, "kind": "event", "merchant": MERCHANT, "store": a.id,
                    "lane": "lane-1", "inst": inst, "at": 1, "name": "safe_mode"}
            evil.publish(hq.prefix + t, record.seal(a.key, a.id, t, seq, record.encode(body)),
                         qos=1)

        publish(1)  # its batch waits on the lock ...
        wait_until("fleetd's first batch to wait on the lock", lambda: hq.rows(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
            "wait_event_type = 'Lock'")[0][0] > 0)
        for seq in range(2, 151):  # ... and the rest arrive and queue, unacknowledged
            publish(seq)
        wait_until("fleetd to hold more than 20 unacknowledged", lambda: fleetd.queued() > 100)
        lock.rollback()
        wait_until("all 150 written", lambda: hq.rows(
            "SELECT count(*) FROM records WHERE store = %s", a.id)[0][0] == 150)
    finally:
        lock.close()
        evil.disconnect()
        evil.loop_stop()
        fleetd.stop()


def test_fleetd_killed_mid_batch_and_restarted_loses_and_doubles_nothing(
        tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path)
    client_id = f"fd-{secrets.token_hex(4)}"
    s = hq.settings(client_id)
    argv = [sys.executable, "-m", "hexiao.fleetd.main", "run", "--dsn", s.dsn, "--broker",
            hq.broker, "--group", s.group, "--topic-prefix", s.topic_prefix, "--client-id",
            client_id]

    def fleetd() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = fleetd()
    bridge = None
    try:
        # records published before fleetd has subscribed get "no matching subscribers" and
        # stay in the outbox until it has: no need to wait for it here
        bridge = hq.bridge(store)
        _redeem_directly(store.journal, 400)
        wait_until("fleetd to be writing", lambda: hq.count(store.id) > 0)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: some rows committed, some not acked
        proc.wait(10)
        got = hq.count(store.id)
        proc = fleetd()
        wait_until("all 400 rows after the restart", lambda: hq.count(store.id) == 400)
        rows = hq.rows("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM records "
                       "WHERE store = %s AND kind = 'redemption'", store.id)
        assert rows == [(400, 400, 1, 400)]
        print(f"fleetd killed with {got} of 400 rows committed")
    finally:
        if bridge is not None:
            bridge.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_hostd_runs_the_bridge_only_when_fleet_is_enabled(tmp_path: Path, hq: Hq) -> None:
    from hexiao.hostd.config import from_dict
    from hexiao.hostd.daemon import Daemon

    store = hq.store(tmp_path)
    base = {"hostd": {"state_dir": str(tmp_path / "state"),
                      "control_socket": str(tmp_path / "run" / "hostd.sock")}}
    alone = Daemon(from_dict(base)).start()  # the default: no broker, no outbox
    try:
        assert alone._fleet is None
        with sqlite3.connect(alone.journal_path) as conn:
            assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'fleet%'"
                                    ).fetchall()
    finally:
        alone.stop()
    fleetd = hq.consumer()
    cfg = from_dict({**base, "fleet": {
        "enabled": True, "broker": hq.broker, "merchant": MERCHANT, "store": store.id,
        "key_file": str(store.key_file), "topic_prefix": hq.prefix, "session_expiry_s": 300}})
    daemon = Daemon(cfg).start()
    hq.sessions.append((hq.broker, daemon._fleet.client._client_id.decode()))
    try:
        _redeem_directly(daemon.journal_path, 3)
        wait_until("3 rows from hostd's journal", lambda: hq.count(store.id) == 3)
        wait_until("the store online", lambda: hq.rows(
            "SELECT state FROM store_online WHERE store = %s", store.id) == [("online",)])
        wait_until("the depth metric at 0", lambda: b"hexiao_fleet_outbox_depth 0.0" in
                   daemon.metrics.render())
        # its metrics loop feeds health and events (hostd/fleet/health.py)
        daemon._verdict_done("hx-9", Verdict("refused", reason="quota"), 0.1)
        daemon.sample_metrics()
        wait_until("the store's health and the quota event", lambda: hq.rows(
            "SELECT kind, lane, coalesce(payload->>'name', '') FROM records WHERE store = %s "
            "AND kind <> 'redemption' ORDER BY seq", store.id) == [
                ("event", "@store", "quota_exhausted"), ("health", "@store", "")])
    finally:
        daemon.stop()
    wait_until("the store offline after a clean stop", lambda: hq.rows(
        "SELECT state FROM store_online WHERE store = %s", store.id) == [("offline",)])
    fleetd.stop()


def test_fleetd_commands_add_a_store_and_say_in_one_line_what_is_wrong(
        tmp_path: Path, fleet_dsn: str) -> None:
    def fleetd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hexiao.fleetd.main", *args],
                              capture_output=True, text=True, timeout=60)

    kf = tmp_path / "k"
    kf.write_text(secrets.token_hex(32))
    kf.chmod(0o644)
    r = fleetd("add-store", "--dsn", fleet_dsn, "--merchant", MERCHANT, "--store", "cli1",
               "--key-file", str(kf))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "--key-file" in r.stderr
    kf.chmod(0o600)
    r = fleetd("add-store", "--dsn", fleet_dsn, "--merchant", MERCHANT, "--store", "cli1",
               "--key-file", str(kf))
    assert r.returncode == 0, r.stderr
    with psycopg.connect(fleet_dsn) as conn:
        assert conn.execute("SELECT key FROM stores WHERE store = 'cli1'").fetchone()[0] == \
            bytes.fromhex(kf.read_text())
    assert fleetd("migrate", "--dsn", fleet_dsn).stdout.strip() == "applied: nothing (up to date)"
    r = fleetd("run", "--dsn", "postgresql://postgres@127.0.0.1:1/none")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot start: database" in r.stderr
    assert fleetd("run", "--broker", "http://x").returncode == 2
