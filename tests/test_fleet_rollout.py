"""Staged firmware rollout (issue 14 item 4): headquarters' controller (fleetd/rollout.py) on a
real PostgreSQL database of its own per test, the store's Updater (hostd/fleet/rollout.py) on
the real Mosquitto, and the CLI (tools/fleet_rollout.py).

The stores' records reach the database through db.write_batch, the function fleetd's consumer
commits every record with; the store's side is checked separately with orders that travel over
the broker. Observation periods are 0 s and clocks are passed in: nothing waits for time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_conftest import own_database, wait_until
from hexiao.fleetd import db
from hexiao.fleetd import rollout as hq
from hexiao.hostd.config.types import Fleet
from hexiao.hostd.control.client import ControlError
from hexiao.hostd.fleet import remote
from hexiao.hostd.fleet import rollout as wire
from hexiao.hostd.fleet.outbox import Outbox, Place
from hexiao.protocol import cbor, codec_fast
from hexiao.tools import fleet as fleet_cli
from hexiao.tools.install import keys
from test_fw_update import RESET, board, kit  # noqa: F401 (fixtures: a sim board flashed with v1)
from test_fw_update_hostd import Runner

M = "m1"
SHA = hashlib.sha256(b"image v2").hexdigest()
OFFER = {"digest": bytes.fromhex(SHA), "size": len(b"image v2"), "manifest_size": 3,
         "signature": bytes(64), "board": "sim", "version": "2.0.0", "counter": 5}
BUNDLE = wire.pack_bundle(OFFER, b"image v2")
HQ_KEY = Ed25519PrivateKey.generate()
SIGNER = hq.Signer(HQ_KEY, keys.fingerprint(HQ_KEY.public_key()))


@pytest.fixture
def dsn(fleet_pg_admin: str) -> Iterator[str]:
    """A database of this test's own: at most one rollout runs in a database."""
    with own_database(fleet_pg_admin) as d:
        yield d


class Fleet_:
    """Stores' records written as fleetd's consumer writes them (db.write_batch)."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.seq: dict[str, int] = {}

    def record(self, store: str, lane: str, kind: str, **fields: Any) -> None:
        self.seq[store] = self.seq.get(store, 0) + 1
        p = {"v": 1, "kind": kind, "merchant": M, "store": store, "lane": lane,
             "inst": "i" * 32, "at": int(time.time() * 1000), **fields}
        counts = db.write_batch(self.conn, [db.Accepted(store, self.seq[store], p)], [])
        assert counts["written"] == 1

    def lanes(self, stores: int, per_store: int, on: str = "sim",
              name: str = "s") -> list[tuple[str, str]]:
        out = []
        for s in range(stores):
            store = f"{name}{s:03d}"
            db.add_store(self.conn, M, store, secrets.token_bytes(32))
            for n in range(per_store):
                self.health(store, f"lane-{n}", on=on)
                out.append((store, f"lane-{n}"))
        return out

    def health(self, store: str, lane: str, link: str = "open", on: str = "sim") -> None:
        self.record(store, lane, "health", state={"device": f"{store}-{lane}", "link": link,
                                                  "firmware": "1.0.0", "board": on})

    def event(self, store: str, lane: str, name: str, **detail: Any) -> None:
        self.record(store, lane, "event", name=name, detail=detail)


class Published:
    """What the controller publishes (retained), decoded: orders as the stores verify them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.take = True

    def __call__(self, topic: str, data: bytes) -> bool:
        if self.take:
            self.sent.append((topic, data))
        return self.take

    def orders(self) -> dict[str, wire.Order]:
        out = {}
        for topic, data in self.sent:
            if topic.endswith("/firmware"):
                store = topic.split("/")[-2]
                out[store] = wire.open_order(data, topic, HQ_KEY.public_key(), M, store)
        return out


def rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]


def started(dsn: str, stages: list[int], **kw: Any) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return hq.start(conn, version="2.0.0", sha256=SHA, board="sim", bundle=BUNDLE,
                        stages=stages, author="ops-anna", rng=random.Random(7), **kw)


def test_stage_sizes() -> None:
    assert hq.stage_sizes(50, [2, 20, 100]) == [1, 9, 40]
    assert hq.stage_sizes(1000, [2, 20, 100]) == [20, 180, 800]
    assert hq.stage_sizes(3, [1, 2, 100]) == [1, 1, 1]      # each stage at least one lane
    assert hq.stage_sizes(1, [2, 20, 100]) == [1, 0, 0]
    for bad in ([], [0, 100], [20, 10], [2, 101]):
        with pytest.raises(hq.RolloutError, match="percentages that grow"):
            hq.check_stages(bad)


def test_the_canary_first_and_a_canary_rollback_halts_before_stage_2(dsn: str) -> None:
    f = Fleet_(dsn)
    f.lanes(10, 5)
    f.lanes(1, 2, on="rp2040", name="r")  # another board: never picked
    rid = started(dsn, [2, 20, 100], observe_s=0)
    per_stage = rows(dsn, "SELECT stage, count(*) FROM rollout_lanes GROUP BY 1 ORDER BY 1")
    assert per_stage == [(0, 1), (1, 9), (2, 40)]
    pub = Published()
    c = hq.Controller(dsn, SIGNER, pub)
    said = c.tick()
    assert any("stage 0 (2%) begins" in s for s in said), said
    ((store, lane),) = rows(dsn, "SELECT store, lane FROM rollout_lanes WHERE stage = 0")
    # the bundle before any order, under the merchant's tree; one order: the canary's store
    assert pub.sent[0] == (wire.bundle_topic(M, SHA), BUNDLE)
    orders = pub.orders()
    assert list(orders) == [store]
    assert (orders[store].lanes, orders[store].state, orders[store].rollout) == ((lane,), "run",
                                                                                  rid)
    assert rows(dsn, "SELECT state FROM rollout_lanes WHERE stage = 0") == [("sent",)]
    c.tick()  # nothing new: nothing written again
    assert len(pub.orders()) == 1 and len(pub.sent) == 2

    f.event(store, lane, "fw_started", rollout=rid, device="d1", version="2.0.0")
    c.tick()
    assert rows(dsn, "SELECT state, device FROM rollout_lanes WHERE stage = 0") == [
        ("updating", "d1")]
    f.event(store, lane, "fw_rolled_back", rollout=rid, device="d1", version="2.0.0",
            why="not confirmed after 3 boots: crash")
    said = c.tick()
    state, reason, stage = rows(dsn, "SELECT state, reason, stage FROM rollouts")[0]
    assert (state, stage) == ("halted", 0), said
    assert f"canary lane {store}/{lane} rolled back by itself" in reason and "crash" in reason
    # stage 1 never reached a store: its lanes are pending, and the canary's order says stop
    assert rows(dsn, "SELECT DISTINCT state FROM rollout_lanes WHERE stage > 0") == [
        ("pending",)]
    assert pub.orders()[store].state == "stop" and len(pub.orders()) == 1
    with psycopg.connect(dsn) as conn:
        st = hq.status(conn)
    assert st["state"] == "halted" and st["problems"][0]["state"] == "rolled_back"
    c.stop()


def test_a_healthy_canary_moves_on_and_an_unhealthy_stage_halts(dsn: str) -> None:
    f = Fleet_(dsn)
    f.lanes(5, 4)
    rid = started(dsn, [5, 50, 100], observe_s=0)
    pub = Published()
    c = hq.Controller(dsn, SIGNER, pub)
    c.tick()
    ((store, lane),) = rows(dsn, "SELECT store, lane FROM rollout_lanes WHERE stage = 0")
    f.event(store, lane, "fw_started", rollout=rid, device="d", version="2.0.0")
    f.event(store, lane, "fw_done", rollout=rid, device="d", version="2.0.0", state="trial")
    f.health(store, "lane-x-not-in-rollout", link="open")
    said = c.tick()
    assert any("stage 0 finished" in s for s in said), said
    said = c.tick()  # observed (0 s): no incident since its update: the next stage
    assert any("stage 0 healthy" in s for s in said), said
    said = c.tick()
    assert any("stage 1 (50%) begins" in s for s in said), said
    stage1 = rows(dsn, "SELECT store, lane FROM rollout_lanes WHERE stage = 1")
    assert len(stage1) == 9
    orders = pub.orders()
    for s, ln in stage1:  # every order names its store's lanes of stages 0 and 1
        assert ln in orders[s].lanes and orders[s].state == "run"
    # stage 1 finishes; one of its lanes resets after its update (a health record, link not
    # open) while the rest of the fleet has none: halted, with figures
    for s, ln in stage1:
        f.event(s, ln, "fw_done", rollout=rid, device="d", version="2.0.0", state="trial")
    f.health(*stage1[0], link="connecting")
    c.tick()
    c.tick()
    state, reason = rows(dsn, "SELECT state, reason FROM rollouts")[0]
    assert state == "halted" and "1 incident(s) on 9 updated lane(s)" in reason, reason
    assert {o.state for o in pub.orders().values()} == {"stop"}
    c.stop()


def test_pause_resume_abort_and_one_rollout_at_a_time(dsn: str) -> None:
    f = Fleet_(dsn)
    f.lanes(3, 1)
    rid = started(dsn, [33, 100], observe_s=0)
    pub = Published()
    c = hq.Controller(dsn, SIGNER, pub)
    c.tick()
    (store,) = pub.orders()
    with pytest.raises(hq.RolloutError, match=f"rollout {rid} .* is running: abort it first"):
        started(dsn, [100])
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert hq.set_state(conn, "pause") == {"rollout": rid, "state": "paused"}
        with pytest.raises(hq.RolloutError, match="cannot be paused"):
            hq.set_state(conn, "pause")
        c.tick()
        first = pub.orders()[store]
        assert first.state == "pause"
        pub.take = False  # the broker does not take it: written, published at a later tick
        hq.set_state(conn, "resume")
        c.tick()
        assert rows(dsn, "SELECT count(*) FROM rollout_docs WHERE published IS NULL") == [(1,)]
        pub.take = True
        c.tick()
        again = pub.orders()[store]
        assert again.state == "run" and again.doc > first.doc  # doc numbers only grow
        hq.set_state(conn, "abort", reason="wrong build")
        c.tick()
        assert pub.orders()[store].state == "stop"
        with pytest.raises(hq.RolloutError, match="aborted already"):
            hq.set_state(conn, "abort")
    assert rows(dsn, "SELECT state, reason FROM rollouts") == [("aborted", "wrong build")]
    assert started(dsn, [100]) == rid + 1  # a new one may start now
    c.stop()


def test_start_refusals(dsn: str) -> None:
    with pytest.raises(hq.RolloutError, match="no lanes with a sim board"):
        started(dsn, [2, 100])
    f = Fleet_(dsn)
    f.lanes(1, 1)
    with pytest.raises(hq.RolloutError, match="grow"):
        started(dsn, [50, 20])


def test_status_per_store(dsn: str) -> None:
    f = Fleet_(dsn)
    f.lanes(2, 3)
    rid = started(dsn, [50, 100], observe_s=0)
    c = hq.Controller(dsn, SIGNER, Published())
    c.tick()
    for store, lane in rows(dsn, "SELECT store, lane FROM rollout_lanes WHERE stage = 0"):
        f.event(store, lane, "fw_done", rollout=rid, device="d", version="2.0.0",
                state="trial")
    c.tick()
    with psycopg.connect(dsn) as conn:
        st = hq.status(conn, rid)
    assert [s["lanes"] for s in st["stores"]] == [3, 3]
    assert sum(s.get("done", 0) for s in st["stores"]) == 3
    assert st["by_stage"] == [{"stage": 0, "pct": 50, "lanes": 3, "finished": 3},
                              {"stage": 1, "pct": 100, "lanes": 3, "finished": 0}]
    assert st["stage_done"] is not None
    c.stop()


# -- the store's side, over the real broker ------------------------------------------------------


class Lane:
    """What the Updater reads of a DeviceLane (its name, id, link, firmware, sale, fw_query):
    the lane itself is tested with a device in test_fw_update_hostd.py."""

    def __init__(self, name: str, firmware: str = "1.0.0") -> None:
        self.lane, self.id, self.state = name, f"dev-{name}", "open"
        self.peer = {"firmware": firmware}
        self.sale = ""                      # why it is busy ("" idle)
        self.fw = {"type": "fw_status", "state": 0, "offset": 0}

    def request(self, msg: dict[str, Any], answer: str, timeout: float) -> dict[str, Any]:
        assert msg == {"type": "fw_query"} and answer == "fw_status"
        return self.fw


class Updates:
    """device_update as the Updater calls it: each call waits until released; the most at
    once is kept."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running, self.most = 0, 0
        self.go: dict[str, threading.Event] = {}
        self.fail: dict[str, ControlError] = {}
        self._lock = threading.Lock()

    def __call__(self, device: str, image: str, **offer: Any) -> dict[str, Any]:
        assert Path(image).read_bytes() == b"image v2" and offer["digest"] == SHA
        with self._lock:
            self.calls.append(device)
            self.running += 1
            self.most = max(self.most, self.running)
            go = self.go.setdefault(device, threading.Event())
        try:
            assert go.wait(30)
            if device in self.fail:
                raise self.fail[device]
            return {"device": device, "state": "trial"}
        finally:
            with self._lock:
                self.running -= 1

    def release(self, device: str) -> None:
        with self._lock:
            self.go.setdefault(device, threading.Event()).set()


class Broker:
    """Headquarters' publishing (fleetd's rollout.Publisher, retained, QoS 1), which clears what
    it retained afterwards."""

    def __init__(self, url: str, prefix: str) -> None:
        u = urlsplit(url)
        self.pub = hq.Publisher(u.hostname or "127.0.0.1", u.port or 1883, prefix)
        self.topics: set[str] = set()
        wait_until("the publisher to connect", self.pub.client.is_connected)

    def __call__(self, topic: str, data: bytes) -> bool:
        self.topics.add(topic)
        return self.pub(topic, data)

    def close(self) -> None:
        for t in self.topics:  # an empty retained message removes the retained one
            assert self.pub(t, b"")
        self.pub.close()


@pytest.fixture
def store(tmp_path: Path, fleet_broker: str, fleet_prefix: str) -> Iterator[dict[str, Any]]:
    """Store s1's Responder connection with a Feed on it, two lanes, and headquarters' publisher,
    on a topic prefix of this test's own."""
    lanes = {"lane-0": Lane("lane-0"), "lane-1": Lane("lane-1")}
    updates = Updates()
    with running_store(tmp_path, fleet_broker, fleet_prefix, lambda: list(lanes.values()),
                       updates, lambda dl: dl.sale) as st:
        try:
            yield {**st, "lanes": lanes, "updates": updates}
        finally:
            for ev in list(updates.go.values()):
                ev.set()


@contextlib.contextmanager
def running_store(tmp_path: Path, fleet_broker: str, fleet_prefix: str, lanes: Any,
                  update: Any, busy: Any) -> Iterator[dict[str, Any]]:
    from cryptography.hazmat.primitives import serialization

    prefix = f"{fleet_prefix}{secrets.token_hex(3)}/"
    key_file, pub_file = tmp_path / "store.key", tmp_path / "hq.pub"
    key_file.write_text(secrets.token_hex(32))
    key_file.chmod(0o600)
    pub_file.write_bytes(HQ_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = Fleet(enabled=True, broker=fleet_broker, merchant=M, store="s1", topic_prefix=prefix,
                key_file=key_file, hq_pubkey_file=pub_file)
    responder = remote.Responder(cfg, None)
    state = tmp_path / "state"
    state.mkdir()
    feed = wire.Feed(responder, tmp_path / "journal.sqlite3", state, lanes, update, busy,
                     tick_s=0.05, watch_every_s=0.05)
    responder.start()
    feed.start()
    pub = Broker(fleet_broker, prefix)
    try:
        yield {"feed": feed, "up": feed.updater, "pub": pub,
               "journal": tmp_path / "journal.sqlite3", "state": state, "cfg": cfg}
    finally:
        feed.stop()
        responder.stop()
        pub.close()


def events(journal: Path) -> list[dict[str, Any]]:
    box = Outbox(journal, Place(M, "s1"), b"")
    try:
        return [codec_fast.loads(r.payload) for r in box.after(0, 1000)]
    finally:
        box.close()


def to_hq(f: Fleet_, journal: Path) -> None:
    """The store's outbox into headquarters' database, as the bridge and consumer carry it."""
    box = Outbox(journal, Place(M, "s1"), b"")
    try:
        db.write_batch(f.conn, [db.Accepted("s1", r.seq, codec_fast.loads(r.payload))
                                for r in box.after(0, 1000)], [])  # (seen ones: replays)
    finally:
        box.close()


def test_a_signed_order_updates_idle_lanes_one_at_a_time(dsn: str, store: dict[str, Any]) -> None:
    f = Fleet_(dsn)
    db.add_store(f.conn, M, "s1", secrets.token_bytes(32))
    for name in ("lane-0", "lane-1"):
        f.health("s1", name)
    rid = started(dsn, [100], observe_s=0)
    lanes, up, updates = store["lanes"], store["up"], store["updates"]
    lanes["lane-0"].sale = "a scan 3 s ago"  # in a sale: not updated until idle
    c = hq.Controller(dsn, SIGNER, store["pub"])
    c.tick()  # the bundle and the order, retained, through the broker
    wait_until("lane-1's update to begin", lambda: updates.calls == ["dev-lane-1"])
    assert up.progress.order is not None and up.progress.order.rollout == rid
    assert (store["state"] / f"fw-{SHA}.img").read_bytes() == b"image v2"
    wait_until("lane-0 to be said waiting", lambda: "lane-0" in up.waiting)
    assert up.waiting["lane-0"] == "a scan 3 s ago"
    lanes["lane-0"].sale = ""  # idle now, but lane-1 is updating: one lane at a time
    wait_until("lane-0 to wait for lane-1",
               lambda: "updating already" in up.waiting.get("lane-0", ""))
    assert updates.calls == ["dev-lane-1"]
    updates.release("dev-lane-1")
    wait_until("lane-0's update to begin", lambda: len(updates.calls) == 2)
    updates.release("dev-lane-0")
    wait_until("both lanes done", lambda: {s["state"] for s in up.progress.lanes.values()} ==
               {"done"})
    assert updates.most == 1
    names = [(e["lane"], e["name"]) for e in events(store["journal"])]
    assert names == [("lane-1", "fw_started"), ("lane-1", "fw_done"), ("lane-0", "fw_started"),
                     ("lane-0", "fw_done")]
    # the events reach headquarters: the stage is finished, and the rollout done
    to_hq(f, store["journal"])
    c.tick()
    c.tick()
    assert rows(dsn, "SELECT state FROM rollouts") == [("done",)]
    # a lane on trial is asked again: the device rolled it back by itself later
    lanes["lane-0"].fw = {"type": "fw_status", "state": 7, "offset": 0, "version": "2.0.0",
                          "why": "not confirmed after 3 boots"}
    lanes["lane-1"].fw = {"type": "fw_status", "state": 5, "offset": 0, "version": "2.0.0"}
    wait_until("lane-0 rolled back, lane-1 confirmed", lambda: (
        up.progress.lanes["lane-0"]["state"], up.progress.lanes["lane-1"]["state"]) == (
        "rolled_back", "confirmed"))
    assert events(store["journal"])[-1]["name"] == "fw_rolled_back"
    c.stop()


def _published(store: dict[str, Any], topic: str, data: bytes) -> None:
    assert store["pub"](topic, data)


def test_forged_replayed_and_misdirected_orders_are_refused(store: dict[str, Any]) -> None:
    up, topic = store["up"], wire.order_topic(M, "s1")

    def order(doc: int, **kw: Any) -> wire.Order:
        o = {"merchant": M, "store": "s1", "doc": doc, "rollout": 1, "version": "2.0.0",
             "sha256": SHA, "lanes": ("lane-1",), "parallel": 1, "state": "run", "key": "k",
             "at": 0, **kw}
        return wire.Order(**o)

    def refused(reason: str, data: bytes, on: str = topic) -> None:
        before = up.refused[reason]
        _published(store, on, data)
        wait_until(f"a refusal ({reason})", lambda: up.refused[reason] == before + 1)

    _published(store, topic, wire.sign_order(HQ_KEY, order(10)))
    wait_until("the order to be held", lambda: up.progress.doc == 10)
    refused("bad_signature", wire.sign_order(Ed25519PrivateKey.generate(), order(11)))
    other = order(12, store="s2")  # signed for s2's topic, published on s1's
    refused("bad_signature", wire.sign_order(HQ_KEY, other))
    # signed for s1's topic but naming s2 (headquarters' mistake): refused all the same
    payload = cbor.dumps(other.payload())
    refused("wrong_store", remote.sign_signed(HQ_KEY, topic, payload))
    refused("replay", wire.sign_order(HQ_KEY, order(9)))  # older than the one held
    refused("malformed", b"\x82\x41")
    assert up.progress.doc == 10
    # a bundle that is not the one the order names is refused and not kept
    bad = wire.pack_bundle({**OFFER, "size": 9}, b"image v3!")
    refused("bad_signature", bad, wire.bundle_topic(M, SHA))
    assert json.loads((store["state"] / "rollout.json").read_text())["doc"] == 10


def test_a_restart_resumes_and_a_refused_update_is_reported(tmp_path: Path) -> None:
    from hexiao.hostd.fleet.rollout import Order, Progress, Updater

    state = tmp_path / "state"
    state.mkdir()
    o = Order(M, "s1", 5, 3, "2.0.0", SHA, ("lane-0", "lane-1"), 1, "run", "k", 0)
    p = Progress(state / "rollout.json")
    p.doc, p.order = 5, o
    p.lanes = {"lane-0": {"state": "updating", "device": "dev-lane-0"},
               "lane-1": {"state": "updating", "device": "dev-lane-1"}}
    p.save()
    assert (state / "rollout.json").stat().st_mode & 0o777 == 0o600
    (state / f"fw-{SHA}.img").write_bytes(b"image v2")
    (state / f"fw-{SHA}.offer").write_text(json.dumps(
        {k: v.hex() if isinstance(v, bytes) else v for k, v in OFFER.items()}))
    lanes = [Lane("lane-0", firmware="2.0.0"), Lane("lane-1")]  # lane-0 came back on 2.0.0
    lanes[1].fw = {"type": "fw_status", "state": 6, "offset": 0, "version": "2.0.0",
                   "why": "bad signature"}
    updates = Updates()
    updates.fail["dev-lane-1"] = ControlError("refused", "device refused 2.0.0: bad signature")
    updates.release("dev-lane-1")
    said: list[tuple[str, str, dict[str, Any]]] = []
    u = Updater(M, "s1", HQ_KEY.public_key(), state, lambda: lanes, updates,
                lambda lane, name, d: said.append((lane, name, d)))
    u.step()
    wait_until("lane-1 failed", lambda: u.progress.lanes["lane-1"]["state"] == "failed")
    assert u.progress.lanes["lane-0"]["state"] == "done" and updates.calls == ["dev-lane-1"]
    assert [(ln, n) for ln, n, _ in said] == [("lane-0", "fw_done"), ("lane-1", "fw_started"),
                                              ("lane-1", "fw_failed")]
    assert "bad signature" in said[-1][2]["why"]


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def signed_bundle(tmp_path: Path) -> Path:
    """A small signed bundle (the CLI reads it; no device runs it): built as `hexiao bundle
    build` writes one, without compiling the firmware."""
    from hexiao.tools.install import bundle

    files = {"hexiao/firmware/app.mpy": b"M\x06 not run"}
    manifest = bundle.canonical({
        "format": bundle.FORMAT, "board": "sim", "version": "2.0.0", "counter": 5,
        "built": "2026-12-07T00:00:00Z", "mpy_cross": "test",
        "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                  for n, d in files.items()}})
    out = tmp_path / "fw.tar"
    bundle.write_container(out, manifest, Ed25519PrivateKey.generate().sign(manifest), files)
    return out


def cli(*args: str) -> Any:
    r = CliRunner().invoke(fleet_cli.main, ["rollout", *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def test_the_cli(dsn: str, signed_bundle: Path, tmp_path: Path) -> None:
    from hexiao.tools.install import bundle

    r = cli("status", "--dsn", dsn)
    assert r.exit_code == 4 and "no rollout yet" in r.output and r.output.count("\n") == 1
    r = cli("start", str(signed_bundle), "--dsn", dsn)
    assert r.exit_code == 1 and "no lanes with a sim board" in r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    r = cli("start", str(tmp_path / "none.tar"), "--dsn", dsn)
    assert r.exit_code == 1 and "no bundle" in r.output and r.output.count("\n") == 1
    (tmp_path / "junk.tar").write_text("junk")
    r = cli("start", str(tmp_path / "junk.tar"), "--dsn", dsn)
    assert r.exit_code == 1 and "not a hexiao firmware bundle" in r.output
    unsigned = tmp_path / "unsigned.tar"
    b = bundle.read_bundle(signed_bundle)
    bundle.write_container(unsigned, b.manifest, None, b.files)
    r = cli("start", str(unsigned), "--dsn", dsn)
    assert r.exit_code == 1 and "not signed" in r.output

    f = Fleet_(dsn)
    f.lanes(4, 5)
    r = cli("start", str(signed_bundle), "--canary", "5%", "--then", "50%", "--then", "100%",
            "--dsn", dsn, "--json", "--operator", "ops-anna")
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert (st["state"], st["version"], st["board"], st["stages"]) == ("running", "2.0.0", "sim",
                                                                       [5, 50, 100])
    assert [s["lanes"] for s in st["by_stage"]] == [1, 9, 10] and st["author"] == "ops-anna"
    # what travels is the bundle's image, named by its digest
    (bundle_bytes,) = rows(dsn, "SELECT bundle FROM rollouts")[0]
    offer, image = wire.open_bundle(bytes(bundle_bytes), st["sha256"])
    assert offer["version"] == "2.0.0" and hashlib.sha256(image).hexdigest() == st["sha256"]
    r = cli("start", str(signed_bundle), "--dsn", dsn)
    assert r.exit_code == 1 and f"rollout {st['rollout']} (2.0.0) is running" in r.output
    r = cli("pause", "--dsn", dsn)
    assert r.exit_code == 0 and "paused" in r.output
    r = cli("status", "--dsn", dsn)
    assert r.exit_code == 0 and "stage 0 (5%): 0/1 lane(s) finished" in r.output
    assert "s000: 5 lane(s): pending 5" in r.output
    r = cli("abort", "--dsn", dsn, "--reason", "wrong build")
    assert r.exit_code == 0 and "aborted" in r.output and "reason: wrong build" in r.output
    r = cli("resume", "--dsn", dsn)
    assert r.exit_code == 1 and "cannot be resumed" in r.output


def test_fleetd_reads_headquarters_key_as_hexiao_keys_does(tmp_path: Path) -> None:
    pub = keys.generate(tmp_path / "hq.key")
    assert hq.load_signer(tmp_path / "hq.key").key_id == keys.fingerprint(pub)
    (tmp_path / "hq.key").chmod(0o644)
    with pytest.raises(ValueError, match="accessible by other users"):
        hq.load_signer(tmp_path / "hq.key")


# -- end to end: a planted crashing build on a real sim board ----------------------------------


def planted_build(fw: dict[str, Any], tmp: Path) -> tuple[dict[str, Any], bytes]:
    """A signed 1.1.0 whose application raises as it starts (after boot counted the trial):
    a bad build as the canary gets it."""
    from hexiao.tools import micropython
    from test_fw_update import forged

    src = Path(micropython._source_dir("firmware")) / "app.py"
    text = src.read_text(encoding="utf-8")
    assert text.count("    def run(self):\n") == 1
    bad = tmp / "app.py"
    bad.write_text(text.replace("    def run(self):\n", "    def run(self):\n"
                                "        raise RuntimeError('planted bad build')\n"))
    micropython.compile_device(bad, "hexiao/firmware/app.py", tmp / "app.mpy")
    planted = (tmp / "app.mpy").read_bytes()
    return forged(fw, "1.1.0", 3, files={**fw["files"], "hexiao/firmware/app.mpy": planted})


class Board(Runner):
    """The sim board in `root`, started again after a reset or a crash (exit 4, which a board's
    reset follows): a crash loop on trial is the point here."""

    restart_on = (RESET, 4)


def test_a_canary_with_a_planted_crashing_build_rolls_back_and_the_rollout_halts(
        dsn: str, kit: dict[str, Any], board: Path,  # noqa: F811
        tmp_path: Path, fleet_broker: str, fleet_prefix: str) -> None:
    from hexiao.hostd.control.handlers import ControlHandlers
    from hexiao.hostd.fleet.health import HealthFeed
    from hexiao.hostd.lanes.lane import DeviceLane
    from test_firmware_sim import KID
    from test_fw_update import DEVICE_KEY, installed
    from test_fw_update_hostd import _NoEngine

    offer, img = planted_build(kit, tmp_path)
    runner = Board(board)
    dl = DeviceLane(KID.decode(), KID, "lane-1", lambda: runner.port,
                    lambda kid: DEVICE_KEY if kid == KID else None,
                    engine_factory=_NoEngine, macros={},  # type: ignore[arg-type]
                    backoff=(0.1, 0.5)).start()
    handlers = ControlHandlers({dl.id: dl}, Path("/nonexistent"), None,  # type: ignore[arg-type]
                               reconcile=list, started=time.time(), update_restart_s=180)
    f = Fleet_(dsn)
    f.lanes(3, 3)  # the rest of the fleet: nine lanes in three other stores
    db.add_store(f.conn, M, "s1", secrets.token_bytes(32))
    try:
        wait_until("the board's lane to open", lambda: dl.state == "open", 60)
        with running_store(tmp_path, fleet_broker, fleet_prefix, lambda: [dl],
                           handlers.device_update, lambda lane: lane.busy(60)) as st:
            feed = HealthFeed(st["journal"], Place(M, "s1"))
            feed.sample([dl.info()])  # the lane's health (board sim, 1.0.0) reaches headquarters
            feed.close()
            to_hq(f, st["journal"])
            everyone = sorted(rows(dsn, "SELECT store, lane FROM lane_health WHERE lane <> "
                                        "'@store'"))
            seed = next(i for i in range(1000) if _first(everyone, i) == ("s1", "lane-1"))
            with psycopg.connect(dsn, autocommit=True) as conn:
                rid = hq.start(conn, version="1.1.0", sha256=offer["digest"].hex(), board="sim",
                               bundle=wire.pack_bundle(offer, img), stages=[10, 100],
                               author="ops", observe_s=0, rng=random.Random(seed))
            c = hq.Controller(dsn, SIGNER, st["pub"])
            c.tick()
            up = st["up"]
            wait_until("the canary to come back on its last good firmware", lambda: up.progress
                       .lanes.get("lane-1", {}).get("state") in ("rolled_back", "failed"), 240)
            print("board exits", runner.exits, up.progress.lanes)
            assert up.progress.lanes["lane-1"]["state"] == "rolled_back"
            assert installed(board)["version"] == "1.0.0"
            to_hq(f, st["journal"])
            c.tick()
            state, reason, stage = rows(dsn, "SELECT state, reason, stage FROM rollouts")[0]
            assert (state, stage) == ("halted", 0) and "s1/lane-1 rolled back by itself" in reason
            # stage 2 never began: its nine lanes were never named to their stores
            assert rows(dsn, "SELECT DISTINCT state FROM rollout_lanes WHERE stage = 1") == [
                ("pending",)]
            assert {t for t in st["pub"].topics if t.endswith("/firmware")} == {
                wire.order_topic(M, "s1")}
            assert rid == 1
            c.stop()
    finally:
        dl.close()
        runner.close()


def _first(lanes: list[tuple[str, str]], seed: int) -> tuple[str, str]:
    copy = list(lanes)
    random.Random(seed).shuffle(copy)
    return copy[0]


# -- scale: 1 000 simulated lanes ----------------------------------------------------------------


@pytest.mark.soak
def test_a_thousand_lanes_and_a_bad_build_how_many_got_it_before_the_halt(dsn: str) -> None:
    """100 stores x 10 lanes; every device the build reaches crashes and rolls back. Each store
    does what hostd does with its order (one lane at a time, none after a rollback): per round,
    a store finishes the lane it updates (fw_rolled_back) or starts the next; headquarters
    ticks between rounds."""
    f = Fleet_(dsn)
    f.lanes(100, 10)
    rid = started(dsn, [2, 20, 100], observe_s=0)
    pub = Published()
    c = hq.Controller(dsn, SIGNER, pub)
    busy: dict[str, str] = {}       # store -> the lane it updates
    got: set[tuple[str, str]] = set()
    held: set[str] = set()          # stores that saw a rollback: they start no more lanes
    rounds = 0
    t0 = time.monotonic()
    while rows(dsn, "SELECT state FROM rollouts")[0][0] == "running":
        c.tick()
        rounds += 1
        assert rounds < 50
        for store, order in pub.orders().items():
            if store in busy:
                f.event(store, busy.pop(store), "fw_rolled_back", rollout=rid, device="d",
                        version="2.0.0", why="crash")
                held.add(store)
            todo = [ln for ln in order.lanes if (store, ln) not in got]
            if order.state == "run" and todo and store not in held:  # (hostd holds too)
                busy[store] = todo[0]
                got.add((store, todo[0]))
                f.event(store, todo[0], "fw_started", rollout=rid, device="d", version="2.0.0")
    state, reason, stage = rows(dsn, "SELECT state, reason, stage FROM rollouts")[0]
    canary = rows(dsn, "SELECT count(*), count(DISTINCT store) FROM rollout_lanes WHERE "
                       "stage = 0")[0]
    print(f"\n1000 lanes, canary {canary[0]} lanes in {canary[1]} stores: {len(got)} lanes got the "
          f"bad build before the halt ({rounds} controller ticks, "
          f"{time.monotonic() - t0:.1f} s); {reason}")
    assert (state, stage) == ("halted", 0)
    assert len(got) <= canary[0]  # never a lane beyond the canary
    c.stop()


def test_after_a_rollback_the_store_starts_no_more_lanes(tmp_path: Path) -> None:
    from hexiao.hostd.fleet.rollout import Order, Updater

    state = tmp_path / "state"
    state.mkdir()
    lanes = [Lane("lane-0"), Lane("lane-1")]
    lanes[0].fw = {"type": "fw_status", "state": 7, "offset": 0, "version": "2.0.0",
                   "why": "not confirmed after 3 boots"}
    updates = Updates()
    updates.fail["dev-lane-0"] = ControlError("refused", "device did not install 2.0.0")
    updates.release("dev-lane-0")
    said: list[str] = []
    u = Updater(M, "s1", HQ_KEY.public_key(), state, lambda: lanes, updates,
                lambda lane, name, d: said.append(f"{lane} {name}"))
    o = Order(M, "s1", 1, 3, "2.0.0", SHA, ("lane-0", "lane-1"), 1, "run", "k", 0)
    assert u.on_order(wire.sign_order(HQ_KEY, o), wire.order_topic(M, "s1")) == o
    assert u.on_bundle(BUNDLE, wire.bundle_topic(M, SHA))
    u.step()
    wait_until("lane-0 rolled back", lambda: u.progress.lanes["lane-0"]["state"] ==
               "rolled_back")
    u.step()
    assert said == ["lane-0 fw_started", "lane-0 fw_rolled_back"]
    assert updates.calls == ["dev-lane-0"] and "rolled this build back" in u.waiting["lane-1"]


def test_only_one_fleetd_instance_runs_rollouts(dsn: str) -> None:
    f = Fleet_(dsn)
    f.lanes(1, 2)
    started(dsn, [50, 100])
    first, second = Published(), Published()
    a, b = hq.Controller(dsn, SIGNER, first), hq.Controller(dsn, SIGNER, second)
    assert a.tick() and b.tick() == [] and second.sent == [] and first.sent
    a.stop()  # its connection goes, and the lock with it: the other takes over

    def took_over() -> bool:
        b.tick()
        return b.leader

    wait_until("the other instance to take over", took_over)
    b.stop()


def test_a_lane_in_a_sale_says_why() -> None:
    from hexiao.hostd.lanes.lane import DeviceLane

    now = [1000.0]
    dl = DeviceLane("dev-1", b"dev-1", "lane-1", lambda: None, lambda kid: None,
                    engine_factory=None, macros={}, clock=lambda: now[0])  # type: ignore[arg-type]
    assert dl.busy(60) == ""  # never scanned: idle
    dl._on_message({"type": "scan", "scan_id": 1, "data": b"123456789012", "time_ms": 5})
    assert dl.busy(60) == "a scan is being redeemed"  # (no worker runs here: it stays queued)
    dl._scans.get()
    dl._answered[(1, b"123456789012", 5)] = {"type": "verdict"}  # answered, sent
    now[0] += 30
    assert dl.busy(60) == "a scan 30 s ago"
    now[0] += 31
    assert dl.busy(60) == ""


def test_a_failed_update_in_a_later_stage_counts_against_the_build(dsn: str) -> None:
    f = Fleet_(dsn)
    f.lanes(2, 2)
    rid = started(dsn, [25, 100], observe_s=0)
    c = hq.Controller(dsn, SIGNER, Published())
    c.tick()
    ((store, lane),) = rows(dsn, "SELECT store, lane FROM rollout_lanes WHERE stage = 0")
    f.event(store, lane, "fw_done", rollout=rid, device="d", version="2.0.0", state="trial")
    for _ in range(3):  # finished, observed, next stage begun
        c.tick()
    later = rows(dsn, "SELECT store, lane FROM rollout_lanes WHERE stage = 1 ORDER BY 1, 2")
    assert rows(dsn, "SELECT stage FROM rollouts") == [(1,)] and len(later) == 3
    f.event(*later[0], "fw_failed", rollout=rid, device="d", version="2.0.0", why="timeout",
            kind="timeout")
    for s, ln in later[1:]:
        f.event(s, ln, "fw_done", rollout=rid, device="d", version="2.0.0", state="trial")
    c.tick()  # (not at once: a failure outside the canary waits for the comparison)
    assert rows(dsn, "SELECT state FROM rollouts") == [("running",)]
    c.tick()
    state, reason = rows(dsn, "SELECT state, reason FROM rollouts")[0]
    assert state == "halted" and "1 incident(s) on 3 updated lane(s)" in reason, reason
    c.stop()


def test_an_unreadable_progress_file_does_not_stop_hostd(tmp_path: Path) -> None:
    from hexiao.hostd.fleet.rollout import Progress

    (tmp_path / "rollout.json").write_text("{not json")
    p = Progress(tmp_path / "rollout.json")
    assert (p.doc, p.order, p.lanes) == (0, None, {})


def test_fleetd_run_refuses_a_bad_hq_key_in_one_line(tmp_path: Path) -> None:
    from hexiao.fleetd import main as fleetd_main

    (tmp_path / "hq.key").write_text("not a key")
    (tmp_path / "hq.key").chmod(0o600)
    for key, says in ((tmp_path / "none.key", "cannot read"),
                      (tmp_path / "hq.key", "not an unencrypted PEM Ed25519 signing key")):
        r = CliRunner().invoke(fleetd_main.main, ["run", "--hq-key", str(key), "--dsn",
                                                  "postgresql://127.0.0.1:1/none"])
        assert r.exit_code == 1 and says in r.output and r.output.count("\n") == 1, r.output
