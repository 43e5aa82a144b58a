"""Staged firmware rollout, headquarters' side (docs/firmware-update.md, "Staged rollout"): the
rollouts and their lanes in PostgreSQL (migration 006), and the controller that moves them on.

Rules this module keeps:
- At most one rollout running or paused: start() checks under a transaction advisory lock, so
  two starts at once cannot both pass, and says which one is.
- start() picks every lane whose latest health names the bundle's board and deals them, in a
  random order, to the stages: stage k holds the first ceil(pct_k % of the lanes), at least one,
  less the lanes of earlier stages. The picks are rows from the start (`rollout_lanes`), so the
  status page shows what each stage will touch before it does.
- Only the controller signs and publishes (Controller.tick, one instance: the holder of a
  session advisory lock, like alarms.py). The CLI only writes the rollout's state (pause,
  resume, abort); the controller makes every store's order say so at its next tick. An order is
  written to `rollout_docs` before it is published (retained, QoS 1) and published again until
  the broker takes it; its doc number only grows (max(last + 1, now in ms)). A merchant's
  bundle is published before any order of that merchant names it.
- Lanes follow the stores' events (fw_started, fw_done, fw_failed, fw_rolled_back in `records`,
  hostd/fleet/rollout.py); the latest event of a lane wins.
- Halts, with the reason in `rollouts.reason`: at once when any lane rolls back, or a canary
  (stage 0) lane fails; else after a stage's last lane finished and `observe_s` passed, when its
  lanes' incident rate since their own fw_done (crash or reset: a health record whose link is
  not open; safe_mode, mac_failures and fw_rolled_back events) exceeds the rest of the fleet's
  (lanes not yet updated, over the same period since the stage began); a failed update counts
  as an incident of its lane. Otherwise the next stage starts; after the last, the rollout is
  done. A halted rollout's orders say `stop`.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.fleetd.leader import LeaderLoop
from hexiao.hostd.fleet import rollout as wire

log = logging.getLogger("hexiao.fleetd.rollout")
_LOCK = 0x6865_7872  # "hexr": the instance that runs rollouts
_START_LOCK = 0x6865_7873  # "hexs": one start() at a time, so at most one rollout is live
LIVE = ("running", "paused")
FINISHED = ("done", "confirmed", "failed", "rolled_back")
INCIDENT_EVENTS = ("safe_mode", "mac_failures", "fw_rolled_back")
_EVENT_STATE = {"fw_started": "updating", "fw_done": "done", "fw_failed": "failed",
                "fw_rolled_back": "rolled_back"}


class RolloutError(Exception):
    """A rollout cannot be started or changed; the message says why, in one line."""


def _one(conn: psycopg.Connection, rollout_id: int | None, states: tuple[str, ...] = ()) -> Any:
    if rollout_id is None:
        row = conn.execute("SELECT id, state FROM rollouts ORDER BY (state = ANY(%s)) DESC, id "
                           "DESC LIMIT 1", (list(states or LIVE),)).fetchone()
    else:
        row = conn.execute("SELECT id, state FROM rollouts WHERE id = %s",
                           (rollout_id,)).fetchone()
    if row is None:
        raise RolloutError("no rollout" + (f" {rollout_id}" if rollout_id is not None else
                                           " yet: start one with `hexiao fleet rollout start`"))
    return row


def stage_sizes(n: int, stages: list[int]) -> list[int]:
    """How many of n lanes each stage adds (cumulative ceil(pct %), at least one)."""
    out, before = [], 0
    for pct in stages:
        upto = min(n, max(before + (1 if before < n else 0), math.ceil(n * pct / 100)))
        out.append(upto - before)
        before = upto
    return out


def check_stages(stages: list[int]) -> None:
    if not stages or any(not 0 < p <= 100 for p in stages) or \
            any(b <= a for a, b in itertools.pairwise(stages)):
        raise RolloutError("stages must be percentages that grow, each 1-100, e.g. --canary 2% "
                           "--then 20% --then 100%")


def start(conn: psycopg.Connection, *, version: str, sha256: str, board: str, bundle: bytes,
          stages: list[int], author: str, parallel: int = 1, observe_s: float = 600.0,
          rng: random.Random | None = None) -> int:
    """A new rollout with its lanes dealt to the stages; RolloutError when it cannot be."""
    check_stages(stages)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_START_LOCK,))  # two starts at once
        live = conn.execute("SELECT id, version, state FROM rollouts WHERE state = ANY(%s)",
                            (list(LIVE),)).fetchone()
        if live is not None:
            raise RolloutError(f"rollout {live[0]} ({live[1]}) is {live[2]}: abort it first "
                               f"(`hexiao fleet rollout abort`)")
        lanes = conn.execute(
            "SELECT h.store, h.lane FROM lane_health h JOIN stores s USING (store) WHERE "
            "h.lane <> '@store' AND h.state->>'board' = %s ORDER BY h.store, h.lane",
            (board,)).fetchall()
        if not lanes:
            raise RolloutError(f"no lanes with a {board} board report to headquarters "
                               "(`hexiao fleet lanes` lists them)")
        row = conn.execute(
            "INSERT INTO rollouts (version, sha256, stages, state, author, board, parallel, "
            "observe_s, bundle) VALUES (%s, %s, %s, 'running', %s, %s, %s, %s, %s) "
            "RETURNING id", (version, sha256, stages, author, board, parallel, observe_s,
                             bundle)).fetchone()
        assert row is not None
        rid = row[0]
        (rng or random.SystemRandom()).shuffle(lanes)
        at = 0
        with conn.cursor() as cur:
            for stage, size in enumerate(stage_sizes(len(lanes), stages)):
                cur.executemany(
                    "INSERT INTO rollout_lanes (rollout_id, store, lane, stage, state) VALUES "
                    "(%s, %s, %s, %s, 'pending')",
                    [(rid, s, ln, stage) for s, ln in lanes[at:at + size]])
                at += size
    log.info("rollout %d started by %s: %s to %d lanes in stages %s", rid, author, version,
             at, stages)
    return int(rid)


def set_state(conn: psycopg.Connection, action: str, rollout_id: int | None = None,
              reason: str = "") -> dict[str, Any]:
    """pause, resume or abort; the controller makes the stores' orders follow."""
    want = {"pause": (("running",), "paused"), "resume": (("paused",), "running"),
            "abort": (LIVE, "aborted")}[action]
    with conn.transaction():
        rid, state = _one(conn, rollout_id)
        if state not in want[0]:
            raise RolloutError(f"rollout {rid} is {state}: it cannot be {action}d" if
                               action != "abort" else f"rollout {rid} is {state} already")
        conn.execute("UPDATE rollouts SET state = %s, reason = coalesce(%s, reason), updated = "
                     "now() WHERE id = %s", (want[1], reason or None, rid))
    log.info("rollout %d %sd%s", rid, action, f": {reason}" if reason else "")
    return {"rollout": rid, "state": want[1]}


def _iso(t: datetime | None) -> str | None:
    return t.astimezone().isoformat(timespec="seconds") if t is not None else None


def status(conn: psycopg.Connection, rollout_id: int | None = None) -> dict[str, Any]:
    """A rollout (the live one, else the latest): its stage and state, and progress per store."""
    rid, _ = _one(conn, rollout_id)
    r = conn.execute("SELECT id, version, sha256, board, stages, stage, state, reason, author, "
                     "created, updated, stage_started, stage_done, observe_s, parallel FROM "
                     "rollouts WHERE id = %s", (rid,)).fetchone()
    assert r is not None
    stores: dict[str, dict[str, Any]] = {}
    for store, stage, state, n in conn.execute(
            "SELECT store, stage, state, count(*) FROM rollout_lanes WHERE rollout_id = %s "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (rid,)):
        s = stores.setdefault(store, {"store": store, "lanes": 0, "first_stage": stage})
        s["lanes"] += n
        s[state] = s.get(state, 0) + n
    problems = [{"store": s, "lane": ln, "state": st, "detail": d} for s, ln, st, d in
                conn.execute("SELECT store, lane, state, detail FROM rollout_lanes WHERE "
                             "rollout_id = %s AND state IN ('failed', 'rolled_back') ORDER BY "
                             "store, lane", (rid,))]
    by_stage = [{"stage": st, "pct": r[4][st], "lanes": n, "finished": f}
                for st, n, f in conn.execute(
                    "SELECT stage, count(*), count(*) FILTER (WHERE state = ANY(%s)) FROM "
                    "rollout_lanes WHERE rollout_id = %s GROUP BY 1 ORDER BY 1",
                    (list(FINISHED), rid))]
    return {"rollout": r[0], "version": r[1], "sha256": r[2], "board": r[3], "stages": r[4],
            "stage": r[5], "state": r[6], "reason": r[7], "author": r[8], "created": _iso(r[9]),
            "updated": _iso(r[10]), "stage_started": _iso(r[11]), "stage_done": _iso(r[12]),
            "observe_s": r[13], "parallel": r[14], "by_stage": by_stage,
            "stores": list(stores.values()), "problems": problems}


# -- the controller -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    key_id: str


class Controller(LeaderLoop):
    """tick() once (tests), or start() a thread that ticks every `every_s`. `publish(topic,
    data)` publishes retained, QoS 1, and returns whether the broker took it."""

    name = "fleetd-rollout"

    def __init__(self, dsn: str, signer: Signer, publish: Callable[[str, bytes], bool], *,
                 every_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        super().__init__(dsn, _LOCK, every_s)
        self.signer, self.publish, self._clock = signer, publish, clock

    def round(self) -> object:
        return self.tick()

    def tick(self) -> list[str]:
        """Move every unfinished rollout on once; what happened, in words (also logged)."""
        conn = self.leader_conn()
        if conn is None:
            return []
        said: list[str] = []
        rows = conn.execute("SELECT id FROM rollouts WHERE state = ANY(%s) OR docs_for NOT "
                            "LIKE 'stop:%%' AND state IN ('halted', 'aborted') ORDER BY id",
                            (list(LIVE),)).fetchall()
        for (rid,) in rows:
            with conn.transaction():
                said += self._one(conn, rid)
            said += self._publish(conn)
        if not rows:
            said += self._publish(conn)
        for line in said:
            log.info("%s", line)
        return said

    def _one(self, conn: psycopg.Connection, rid: int) -> list[str]:
        r = conn.execute("SELECT state, stage, stages, stage_started, stage_done, observe_s, "
                         "docs_for FROM rollouts WHERE id = %s FOR UPDATE", (rid,)).fetchone()
        assert r is not None
        state, stage, stages, started, done, observe_s, docs_for = r
        said = []
        ingest(conn, rid)
        if state == "running":
            now = datetime.fromtimestamp(self._clock(), UTC)
            if started is None:
                conn.execute("UPDATE rollout_lanes SET state = 'sent', updated = now() WHERE "
                             "rollout_id = %s AND stage = %s AND state = 'pending'", (rid, stage))
                conn.execute("UPDATE rollouts SET stage_started = %s, stage_done = NULL, "
                             "updated = now() WHERE id = %s", (now, rid))
                started = now
                said.append(f"rollout {rid}: stage {stage} ({stages[stage]}%) begins")
            why = _halt_now(conn, rid)
            n, finished = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE state = ANY(%s)) FROM rollout_lanes "
                "WHERE rollout_id = %s AND stage = %s", (list(FINISHED), rid, stage)).fetchone()
            if why is None and n == finished and done is None:
                conn.execute("UPDATE rollouts SET stage_done = %s WHERE id = %s", (now, rid))
                said.append(f"rollout {rid}: stage {stage} finished; observing {observe_s:g} s")
            elif why is None and n == finished and (now - done).total_seconds() >= observe_s:
                why = compare(conn, rid, stage, started)
                if why is None and stage + 1 < len(stages):
                    conn.execute("UPDATE rollouts SET stage = stage + 1, stage_started = NULL, "
                                 "stage_done = NULL, updated = now() WHERE id = %s", (rid,))
                    said.append(f"rollout {rid}: stage {stage} healthy; next stage")
                    started = None
                elif why is None:
                    conn.execute("UPDATE rollouts SET state = 'done', updated = now() WHERE "
                                 "id = %s", (rid,))
                    said.append(f"rollout {rid}: done")
            if why is not None:
                conn.execute("UPDATE rollouts SET state = 'halted', reason = %s, updated = now() "
                             "WHERE id = %s", (why, rid))
                said.append(f"rollout {rid}: halted at stage {stage}: {why}")
            state, stage = conn.execute("SELECT state, stage FROM rollouts WHERE id = %s",
                                        (rid,)).fetchone()
        doc_state = {"running": "run", "paused": "pause", "done": "run"}.get(state, "stop")
        if state == "running" and started is None:
            return said  # the next stage's lanes are marked (and its orders written) next tick
        if f"{doc_state}:{stage}" != docs_for:
            said.append(self._write_docs(conn, rid, doc_state, stage))
        return said

    def _write_docs(self, conn: psycopg.Connection, rid: int, doc_state: str,
                    stage: int) -> str:
        version, sha256, parallel = conn.execute(
            "SELECT version, sha256, parallel FROM rollouts WHERE id = %s",
            (rid,)).fetchone()
        now_ms = round(self._clock() * 1000)
        rows = conn.execute(
            "SELECT l.store, s.merchant, array_agg(l.lane ORDER BY l.lane) FILTER (WHERE "
            "l.stage <= %s), d.doc FROM rollout_lanes l JOIN stores s USING (store) LEFT JOIN "
            "rollout_docs d USING (store) WHERE l.rollout_id = %s GROUP BY 1, 2, 4",
            (stage, rid)).fetchall()
        n = 0
        for store, merchant, lanes, last in rows:
            if not lanes:
                continue  # a store this rollout has not reached
            conn.execute("INSERT INTO rollout_bundles (rollout_id, merchant) VALUES (%s, %s) "
                         "ON CONFLICT DO NOTHING", (rid, merchant))
            order = wire.Order(merchant, store, max((last or 0) + 1, now_ms), rid, version,
                               sha256, tuple(lanes), parallel, doc_state, self.signer.key_id,
                               now_ms)
            conn.execute(
                "INSERT INTO rollout_docs (store, merchant, doc, data) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (store) DO UPDATE SET merchant = excluded.merchant, doc = "
                "excluded.doc, data = excluded.data, published = NULL",
                (store, merchant, order.doc, wire.sign_order(self.signer.key, order)))
            n += 1
        conn.execute("UPDATE rollouts SET docs_for = %s WHERE id = %s",
                     (f"{doc_state}:{stage}", rid))
        return f"rollout {rid}: orders '{doc_state}' written for {n} store(s) (stage {stage})"

    def _publish(self, conn: psycopg.Connection) -> list[str]:
        """Bundles first, then orders, each until the broker takes it."""
        said = []
        for rid, merchant, sha256, bundle in conn.execute(
                "SELECT b.rollout_id, b.merchant, r.sha256, r.bundle FROM rollout_bundles b JOIN "
                "rollouts r ON r.id = b.rollout_id WHERE b.published IS NULL").fetchall():
            if self.publish(wire.bundle_topic(merchant, sha256), bytes(bundle)):
                conn.execute("UPDATE rollout_bundles SET published = now() WHERE rollout_id = "
                             "%s AND merchant = %s", (rid, merchant))
        waiting = {m for (m,) in conn.execute(
            "SELECT merchant FROM rollout_bundles WHERE published IS NULL")}
        for store, merchant, doc, data in conn.execute(
                "SELECT store, merchant, doc, data FROM rollout_docs WHERE published IS NULL "
                "ORDER BY store").fetchall():
            if merchant in waiting:
                continue  # its bundle first
            if self.publish(wire.order_topic(merchant, store), bytes(data)):
                conn.execute("UPDATE rollout_docs SET published = now() WHERE store = %s AND "
                             "doc = %s", (store, doc))
            else:
                said.append(f"order for store {store} not taken by the broker; tried again")
        return said


def ingest(conn: psycopg.Connection, rid: int) -> int:
    """The stores' fw_* events of this rollout into rollout_lanes (the latest per lane)."""
    latest: dict[tuple[str, str], tuple[str, str, int, dict[str, Any]]] = {}
    for store, lane, inst, seq, name, detail in conn.execute(
            "SELECT store, lane, inst, seq, payload->>'name', payload->'detail' FROM records "
            "WHERE kind = 'event' AND payload->>'name' = ANY(%s) AND payload->'detail'->>"
            "'rollout' = %s ORDER BY store, inst, seq", (list(_EVENT_STATE), str(rid))):
        latest[(store, lane)] = (name, inst, seq, detail or {})
    n = 0
    for (store, lane), (name, inst, seq, detail) in latest.items():
        state = _EVENT_STATE[name]
        done = name == "fw_done"
        cur = conn.execute(
            "UPDATE rollout_lanes SET state = %s, device = %s, detail = %s, done_inst = CASE "
            "WHEN %s THEN %s ELSE done_inst END, done_seq = CASE WHEN %s THEN %s ELSE done_seq "
            "END, updated = now() WHERE rollout_id = %s AND store = %s AND lane = %s AND "
            "(state <> %s OR done_seq IS DISTINCT FROM CASE WHEN %s THEN %s ELSE done_seq END)",
            (state, detail.get("device"), str(detail.get("why") or detail.get("state") or "")
             or None, done, inst, done, seq, rid, store, lane, state, done, seq))
        n += cur.rowcount
    return n


def _halt_now(conn: psycopg.Connection, rid: int) -> str | None:
    row = conn.execute(
        "SELECT store, lane, state, stage, detail FROM rollout_lanes WHERE rollout_id = %s AND "
        "(state = 'rolled_back' OR (state = 'failed' AND stage = 0)) ORDER BY updated LIMIT 1",
        (rid,)).fetchone()
    if row is None:
        return None
    what = "rolled back by itself" if row[2] == "rolled_back" else "failed to update"
    return (f"{'canary ' if row[3] == 0 else ''}lane {row[0]}/{row[1]} {what}"
            + (f": {row[4]}" if row[4] else ""))


_INCIDENT = ("((r.kind = 'event' AND r.payload->>'name' = ANY(%(ev)s)) OR (r.kind = 'health' "
             "AND r.payload->'state'->>'link' IS DISTINCT FROM 'open'))")


def compare(conn: psycopg.Connection, rid: int, stage: int, since: datetime) -> str | None:
    """Why the stage's lanes look worse than the rest of the fleet, or None."""
    args = {"rid": rid, "stage": stage, "since": since, "ev": list(INCIDENT_EVENTS)}
    lanes, bad = conn.execute(
        "SELECT count(DISTINCT (l.store, l.lane)), count(r.seq) FROM rollout_lanes l LEFT JOIN "
        f"records r ON r.store = l.store AND r.lane = l.lane AND r.inst = l.done_inst AND "
        f"r.seq > l.done_seq AND {_INCIDENT} WHERE l.rollout_id = %(rid)s AND l.stage = "
        "%(stage)s", args).fetchone()
    rest, rest_bad = conn.execute(
        "SELECT count(DISTINCT (h.store, h.lane)), count(r.seq) FROM lane_health h LEFT JOIN "
        f"records r ON r.store = h.store AND r.lane = h.lane AND r.ingested >= %(since)s AND "
        f"{_INCIDENT} WHERE h.lane <> '@store' AND NOT EXISTS (SELECT 1 FROM rollout_lanes l "
        "WHERE l.rollout_id = %(rid)s AND l.stage <= %(stage)s AND l.store = h.store AND "
        "l.lane = h.lane)", args).fetchone()
    failed = conn.execute("SELECT count(*) FROM rollout_lanes WHERE rollout_id = %s AND stage = "
                          "%s AND state = 'failed'", (rid, stage)).fetchone()[0]
    bad += failed  # an update that failed counts against the build too
    rate, rest_rate = bad / max(lanes, 1), rest_bad / max(rest, 1)
    if bad and rate > rest_rate:
        return (f"stage {stage}: {bad} incident(s) on {lanes} updated lane(s) since their update "
                f"({rate:.2f} a lane) against {rest_rate:.2f} a lane on the {rest} others")
    return None


class Publisher:
    """Retained QoS 1 publishing for the Controller, on a connection of its own; a call
    returns whether the broker took the message within `wait_s` (acknowledged with a reason
    code below 0x80)."""

    def __init__(self, host: str, port: int, prefix: str = "", *, username: str = "",
                 password: str | None = None, tls: bool = False, tls_ca_file: str | None = None,
                 wait_s: float = 10.0) -> None:
        import secrets

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.prefix, self.wait_s = prefix, wait_s
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                        client_id=f"fleetd-rollout-{secrets.token_hex(4)}")
        if username:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(ca_certs=tls_ca_file)
        c.reconnect_delay_set(1, 30)
        self._codes: dict[int, int] = {}  # mid -> the PUBACK's reason code (paho's thread)

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            self._codes[mid] = rc.value

        c.on_publish = on_publish
        c.connect_async(host, port, keepalive=30)
        c.loop_start()
        self.client = c

    def __call__(self, topic: str, data: bytes) -> bool:
        if not self.client.is_connected():
            return False
        info = self.client.publish(self.prefix + topic, data, qos=1, retain=True)
        try:
            info.wait_for_publish(self.wait_s)
        except (RuntimeError, ValueError):
            return False
        # acknowledged is not taken: a PUBACK of 0x80 or more is a refusal (an ACL: 135), and
        # paho calls that published too (on_publish runs before the flag is set)
        code = self._codes.pop(info.mid, 0x80)
        return info.is_published() and code < 0x80

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def load_signer(path: str | Any) -> Signer:
    """Headquarters' key from a 0600 PEM file (`hexiao keys generate`); ValueError in words.
    Its id is the `SHA256:` fingerprint `hexiao keys` prints (hostd/keyfiles.py, read as the
    installer reads keys)."""
    from hexiao.hostd import keyfiles

    try:
        key = keyfiles.load_private_key(path)
    except keyfiles.KeyFileError as e:
        raise ValueError(str(e)) from None
    return Signer(key, keyfiles.fingerprint(key.public_key()))
