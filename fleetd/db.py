"""fleetd's PostgreSQL side (psycopg 3): migrations, store keys, and writing a batch of records.

Rules this module keeps:
- The schema is the SQL files in migrations/ (NNN_name.sql), applied in order at start, each in
  its own transaction, recorded in schema_migrations; an advisory lock makes concurrent starts
  of several fleetd instances apply each one once. A file is never edited once released: a
  change is a new file.
- A record is written once: records' primary key is its identity (store, inst, seq), inserted
  with ON CONFLICT DO NOTHING; a conflict is a replay, counted. A redemption row keeps the
  entry's latest record (highest seq), so a `corrected` outcome replaces its `done`; a lane's
  health row likewise keeps its latest record.
- write_batch() commits the whole batch (records, the rows they update, rejections) in one
  transaction and returns only after the commit: the caller acknowledges after it returns.
  It runs in libpq pipeline mode: every record's INSERT goes out, then their results are read
  (one round trip, not one per record), then the rows they update; statements still run in the
  batch's order, so a record twice in one batch is written once and counted as a replay.
- The same transaction moves each written stream's contiguous seqs on (gaps.advance), so a
  record the broker dropped is noticed without reading `records` per message.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import psycopg
from hexiao.fleetd import gaps
from psycopg.types.json import Jsonb

_MIGRATION = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")
_LOCK = 0x6865_7869  # "hexi": the advisory lock of fleetd's migrations


@dataclass(frozen=True)
class Accepted:
    store: str
    seq: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    reason: str
    store: str            # the store the topic claimed ("" if the topic was not one)
    why: str


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped, in order."""
    out = []
    for f in resources.files("hexiao.fleetd").joinpath("migrations").iterdir():
        m = _MIGRATION.fullmatch(f.name)
        if m:
            out.append((int(m[1]), f.name, f.read_text(encoding="utf-8")))
    return sorted(out)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations this database lacks; returns the names applied."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, "
                     "name text NOT NULL, applied timestamptz NOT NULL DEFAULT now())")
        have = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in have:
                continue
            with conn.transaction():
                conn.execute(sql)  # type: ignore[arg-type]  (a shipped file, not user input)
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                             (version, name))
            applied.append(name)
    return applied


def add_store(conn: psycopg.Connection, merchant: str, store: str, key: bytes,
              franchisee: str | None = None) -> None:
    """Add a store's key, or replace it (a rotated key)."""
    if len(key) != 32:
        raise ValueError("a store key is 32 bytes")
    with conn.transaction():
        conn.execute(
            "INSERT INTO stores (store, merchant, key, franchisee) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (store) DO UPDATE SET merchant = excluded.merchant, key = excluded.key, "
            "franchisee = excluded.franchisee", (store, merchant, key, franchisee))


def store_keys(conn: psycopg.Connection) -> dict[str, bytes]:
    with conn.transaction():
        return {r[0]: bytes(r[1]) for r in conn.execute("SELECT store, key FROM stores")}


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _json(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in payload.items()}


def write_batch(conn: psycopg.Connection, accepted: list[Accepted],
                rejected: list[Rejected]) -> Counter[str]:
    """Write one batch in one transaction; returns counts (written, and reasons of refusals,
    replays included). Raises psycopg errors with nothing committed."""
    counts: Counter[str] = Counter()
    refused = list(rejected)
    with conn.pipeline(), conn.transaction():
        inserted = []
        for rec in accepted:
            p = rec.payload
            if p["kind"] == "online":  # no identity: the store's latest state
                _online(conn, rec)
                counts["online"] += 1
                continue
            inserted.append((rec, conn.execute(
                "INSERT INTO records (store, inst, seq, merchant, lane, kind, at, payload) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING seq",
                (rec.store, p["inst"], rec.seq, p["merchant"], p["lane"], p["kind"],
                 _ts(p["at"]), Jsonb(_json(p))))))
        tops: dict[tuple[str, str], int] = {}  # each stream's highest seq written here
        for rec, cur in inserted:  # the first fetch sends the pipeline and waits for it
            p = rec.payload
            if cur.fetchone() is None:
                refused.append(Rejected("replay", rec.store,
                                        f"record {p['inst']}/{rec.seq} already stored"))
                continue
            counts["written"] += 1
            stream = (rec.store, p["inst"])
            tops[stream] = max(tops.get(stream, 0), rec.seq)
            if p["kind"] == "redemption":
                _redemption(conn, rec)
            elif p["kind"] == "health":
                _health(conn, rec)
        gaps.advance(conn, tops)
        for r in refused:
            counts[r.reason] += 1
            conn.execute(
                "INSERT INTO rejections (reason, store, count, last_why) VALUES (%s, %s, 1, %s) "
                "ON CONFLICT (reason, store) DO UPDATE SET count = rejections.count + 1, "
                "last_at = now(), last_why = excluded.last_why",
                (r.reason, r.store, r.why[:200]))
    return counts


def _redemption(conn: psycopg.Connection, rec: Accepted) -> None:
    p = rec.payload
    face = p["value"].get("reduce_cost") if p["card_type"] == "CASH" else None
    conn.execute(
        "INSERT INTO redemptions (store, inst, entry, seq, merchant, lane, device, outcome, "
        "reason, card_type, card_id, title, value, face_value_fen, code_tail, code_hash, "
        "received, ended) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
        "%s, %s, %s) ON CONFLICT (store, inst, entry) DO UPDATE SET seq = excluded.seq, "
        "outcome = excluded.outcome, reason = excluded.reason, ended = excluded.ended "
        "WHERE redemptions.seq < excluded.seq",
        (rec.store, p["inst"], p["entry"], rec.seq, p["merchant"], p["lane"], p["device"],
         p["outcome"], p["reason"], p["card_type"], p["card_id"], p["title"], Jsonb(p["value"]),
         face if isinstance(face, int) and not isinstance(face, bool) else None, p["code_tail"],
         p["code_hash"], _ts(p["received"]), _ts(p["ended"])))


def _health(conn: psycopg.Connection, rec: Accepted) -> None:
    p = rec.payload
    # a lane's link not open starts its down time on headquarters' clock (the store's may lie)
    down = p["lane"] != "@store" and p["state"].get("link", "open") != "open"
    conn.execute(
        "INSERT INTO lane_health (store, lane, inst, seq, state, at, down_since) VALUES (%s, %s, "
        "%s, %s, %s, %s, CASE WHEN %s THEN clock_timestamp() END) ON CONFLICT (store, lane) DO "
        "UPDATE SET inst = excluded.inst, seq = excluded.seq, state = excluded.state, "
        "at = excluded.at, seen = clock_timestamp(), down_since = CASE WHEN %s THEN "
        "coalesce(lane_health.down_since, clock_timestamp()) END "
        "WHERE lane_health.inst <> excluded.inst OR lane_health.seq < excluded.seq",
        (rec.store, p["lane"], p["inst"], rec.seq, Jsonb(p["state"]), _ts(p["at"]), down, down))


def _online(conn: psycopg.Connection, rec: Accepted) -> None:
    p = rec.payload
    conn.execute(
        "INSERT INTO store_online (store, inst, session, state, at) VALUES (%s, %s, %s, %s, "
        "%s) ON CONFLICT (store) DO UPDATE SET inst = excluded.inst, session = "
        "excluded.session, state = excluded.state, at = excluded.at, updated = now() "
        "WHERE store_online.inst <> excluded.inst OR store_online.session <= excluded.session",
        (rec.store, p["inst"], p["session"], p["state"], _ts(p["at"])))
