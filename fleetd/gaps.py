"""Records that never arrived: how far each installation's seqs are contiguous at headquarters.

A store publishes its outbox in seq order, QoS 1, and deletes a row only at the broker's PUBACK,
so the seqs of one (store, inst) reach fleetd without a hole unless the broker lost some (a full
`max_queued_messages` queue, a failover, a purged session). Rules this module keeps:
- record_streams (migration 004) holds, per (store, inst), `contiguous_upto` (every seq up to it
  is stored, or its loss was accepted), `max_seq` and `gap_since` (headquarters' clock).
- advance() runs in write_batch's transaction, once per batch, for the streams the batch wrote:
  it locks their rows (sorted, so two instances cannot deadlock on them) and only then, in a
  later statement with a fresh snapshot, looks at `records` above `contiguous_upto`. So of two
  fleetd instances committing seq 5 and seq 4 at once, the second to lock sees both. It reads
  an index probe per stream (is the seq just above `contiguous_upto` there?) and, only when it
  is, the records above `contiguous_upto`: normally the batch's own; once, when a hole fills,
  those that arrived after it. Never the stream's history.
- gap_since dates the lowest hole: set when a hole appears, restarted when `contiguous_upto`
  moves and a hole remains (the next hole may be younger; an alarm is then late, never false),
  cleared when there is none. Out-of-order arrival heals within seconds; the alarm waits minutes.
- A loss is accepted only by an operator (accept()): its ranges go to record_losses with who and
  why, and `contiguous_upto` moves past them. A late copy is then stored as any other record.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

log = logging.getLogger("hexiao.fleetd")
RANGES = 5  # missing ranges named in an alarm or a listing line (the count says the rest)

# the missing seqs of stream `s` as [first, last] ranges, lowest first (max_seq is stored)
_RANGES = ("SELECT coalesce(jsonb_agg(jsonb_build_array(f, l) ORDER BY f), '[]') FROM (SELECT "
           "prev + 1 AS f, seq - 1 AS l FROM (SELECT r.seq, lag(r.seq, 1, s.contiguous_upto) "
           "OVER (ORDER BY r.seq) AS prev FROM records r WHERE r.store = s.store AND r.inst = "
           "s.inst AND r.seq > s.contiguous_upto AND r.seq <= s.max_seq) x WHERE seq > prev + 1 "
           "ORDER BY f LIMIT {limit}) y")
_MISSING = ("s.max_seq - s.contiguous_upto - (SELECT count(*) FROM records r WHERE r.store = "
            "s.store AND r.inst = s.inst AND r.seq > s.contiguous_upto AND r.seq <= s.max_seq)")
_HOLES = (f"SELECT s.store, s.inst, s.contiguous_upto, s.max_seq, s.gap_since, {_MISSING} AS "
          f"missing, ({_RANGES}) AS ranges FROM record_streams s WHERE s.gap_since <= now() - "
          "make_interval(secs => %(gap)s)")

# alarms.py's condition: one row per store, its holes older than the threshold per installation
ALARM_SQL = ("SELECT store, '', jsonb_build_object('missing', sum(missing), 'installations', "
             "jsonb_agg(jsonb_build_object('inst', inst, 'missing', missing, 'ranges', ranges, "
             "'since', gap_since) ORDER BY inst)) FROM (" + _HOLES.format(limit=RANGES) +
             ") h GROUP BY store")


def advance(conn: psycopg.Connection, tops: dict[tuple[str, str], int]) -> None:
    """Bring the streams of a batch up to date: `tops` is each (store, inst)'s highest seq the
    batch wrote. Call inside the batch's transaction, after its records' INSERTs."""
    if not tops:
        return
    keys = sorted(tops)
    stores, insts = [k[0] for k in keys], [k[1] for k in keys]
    top = [tops[k] for k in keys]
    conn.execute("INSERT INTO record_streams (store, inst) SELECT * FROM unnest(%s::text[], "
                 "%s::text[]) ORDER BY 1, 2 ON CONFLICT DO NOTHING", (stores, insts))
    conn.execute("SELECT 1 FROM record_streams WHERE (store, inst) IN (SELECT * FROM unnest("
                 "%s::text[], %s::text[])) ORDER BY store, inst FOR UPDATE", (stores, insts))
    # a fresh snapshot: every record of these streams another instance committed is visible
    conn.execute(
        "WITH n AS MATERIALIZED (SELECT s.store, s.inst, greatest(s.max_seq, u.top) AS m, CASE "
        "WHEN EXISTS (SELECT 1 FROM records r WHERE r.store = s.store AND r.inst = s.inst AND "
        "r.seq = s.contiguous_upto + 1) THEN s.contiguous_upto + (SELECT count(*) FROM (SELECT "
        "r.seq - row_number() OVER (ORDER BY r.seq) AS d FROM records r WHERE r.store = s.store "
        "AND r.inst = s.inst AND r.seq > s.contiguous_upto) x WHERE d = s.contiguous_upto) "
        "ELSE s.contiguous_upto END AS c FROM record_streams s JOIN unnest(%s::text[], "
        "%s::text[], %s::bigint[]) AS u(store, inst, top) USING (store, inst)) "
        "UPDATE record_streams s SET contiguous_upto = n.c, max_seq = n.m, gap_since = CASE "
        "WHEN n.c >= n.m THEN NULL WHEN s.gap_since IS NULL OR n.c > s.contiguous_upto THEN "
        "clock_timestamp() ELSE s.gap_since END FROM n WHERE s.store = n.store AND "
        "s.inst = n.inst", (stores, insts, top))


def holes(conn: psycopg.Connection, *, store: str | None = None,
          older_than_s: float = 0.0) -> list[dict[str, Any]]:
    """Every stream with a hole (of `store`, at least `older_than_s` old), with its missing
    count and its first RANGES missing ranges."""
    sql = _HOLES.format(limit=RANGES) + (" AND s.store = %(store)s" if store else "") + \
        " ORDER BY s.store, s.inst"
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql, {"gap": older_than_s, "store": store})  # type: ignore[arg-type]
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def totals(conn: psycopg.Connection) -> tuple[int, int]:
    """(streams with a hole, records missing in them), whatever the holes' age."""
    row = conn.execute(f"SELECT count(*), coalesce(sum({_MISSING}), 0) FROM record_streams s "
                       "WHERE s.gap_since IS NOT NULL").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def accept(conn: psycopg.Connection, store: str, inst: str, by: str,
           note: str | None = None) -> list[tuple[int, int]]:
    """Accept a stream's missing records as lost: returns the ranges accepted ([] if it had no
    hole). LookupError if headquarters has no record of that store and installation."""
    with conn.transaction():
        row = conn.execute("SELECT 1 FROM record_streams WHERE store = %s AND inst = %s FOR "
                           "UPDATE", (store, inst)).fetchone()
        if row is None:
            raise LookupError(f"headquarters has no records of store {store} installation "
                              f"{inst}")
        found = conn.execute(  # after the lock: a fresh snapshot (see advance)
            "SELECT (" + _RANGES.format(limit="ALL") + ") FROM record_streams s WHERE store = "
            "%s AND inst = %s", (store, inst)).fetchone()
        ranges = [(int(f), int(last)) for f, last in (found[0] if found else [])]
        for f, last in ranges:
            conn.execute("INSERT INTO record_losses (store, inst, first_seq, last_seq, "
                         "accepted_by, note) VALUES (%s, %s, %s, %s, %s, %s)",
                         (store, inst, f, last, by, note))
        conn.execute("UPDATE record_streams SET contiguous_upto = max_seq, gap_since = NULL "
                     "WHERE store = %s AND inst = %s", (store, inst))
    if ranges:
        log.warning("records accepted as lost by %s: store %s installation %s, seqs %s%s", by,
                    store, inst, describe(ranges), f" ({note})" if note else "")
    return ranges


def losses(conn: psycopg.Connection, *, store: str | None = None) -> list[dict[str, Any]]:
    """The accepted losses, with how many of their records arrived after all."""
    sql = ("SELECT l.store, l.inst, l.first_seq, l.last_seq, l.accepted, l.accepted_by, l.note, "
           "(SELECT count(*) FROM records r WHERE r.store = l.store AND r.inst = l.inst AND "
           "r.seq BETWEEN l.first_seq AND l.last_seq) AS arrived_later FROM record_losses l" +
           (" WHERE l.store = %(store)s" if store else "") + " ORDER BY l.accepted, l.id")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql, {"store": store})  # type: ignore[arg-type]
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def describe(ranges: list[Any]) -> str:
    """[[3, 3], [7, 9]] -> '3, 7-9'."""
    return ", ".join(str(f) if f == last else f"{f}-{last}" for f, last in ranges)
