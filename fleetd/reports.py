"""Headquarters' reports over fleetd's PostgreSQL tables (`hexiao report ...` prints them).

Rules this module keeps:
- Money is integer fen (bigint in PostgreSQL, int here), summed in SQL, never a float; yuan()
  formats it for people. A redemption's face value is its CASH card's `reduce_cost`; other card
  types count but carry no face value (a DISCOUNT is worth what the basket was).
- The settlement rule is the stores' own: an entry counts once, with its latest outcome (a
  `corrected` record replaces its `done`), when that outcome is `accepted`. hostd/fleet/
  totals.py applies the same rule to a store's journal, and the two must agree to the fen.
- A day is the entry's end time (`ended`, the store's journal time) in the report's time zone
  (default Asia/Shanghai); a date range is inclusive. Rows are listed in journal order (store,
  installation, seq), never by headquarters' arrival time or the stores' clocks alone.
- Read-only: one transaction per report, nothing written. Dimensions are a fixed list, so no
  caller text becomes SQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

TZ = "Asia/Shanghai"
DIMENSIONS = {"day": "(r.ended AT TIME ZONE %(tz)s)::date", "store": "r.store",
              "lane": "r.lane", "card_type": "coalesce(r.card_type, '')",
              "franchisee": "coalesce(s.franchisee, '')", "outcome": "r.outcome"}


def yuan(fen: int) -> str:
    """Fen as yuan text, exactly: 123456 -> '1234.56'."""
    sign, fen = ("-", -fen) if fen < 0 else ("", fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"


def _rows(conn: psycopg.Connection, sql: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql, args)  # type: ignore[arg-type]  (fixed SQL of this module)
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _range(start: dt.date | None, end: dt.date | None) -> str:
    out = []
    if start is not None:
        out.append("(r.ended AT TIME ZONE %(tz)s)::date >= %(start)s")
    if end is not None:
        out.append("(r.ended AT TIME ZONE %(tz)s)::date <= %(end)s")
    return " AND ".join(out) or "true"


def redemptions(conn: psycopg.Connection, by: list[str], *, start: dt.date | None = None,
                end: dt.date | None = None, outcome: str | None = "accepted",
                tz: str = TZ) -> list[dict[str, Any]]:
    """Counts and face value (fen) grouped by `by` (names of DIMENSIONS, in that order)."""
    unknown = [b for b in by if b not in DIMENSIONS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; choose from "
                         f"{', '.join(DIMENSIONS)}")
    cols = [f"{DIMENSIONS[b]} AS {b}" for b in by]
    group = f"GROUP BY {', '.join(str(i + 1) for i in range(len(by)))} ORDER BY " \
        f"{', '.join(str(i + 1) for i in range(len(by)))}" if by else ""
    sql = (f"SELECT {', '.join([*cols, ''])} count(*) AS redemptions, "
           "coalesce(sum(r.face_value_fen), 0)::bigint AS face_value_fen "
           "FROM redemptions r LEFT JOIN stores s ON s.store = r.store "
           f"WHERE {_range(start, end)} AND (%(outcome)s::text IS NULL OR r.outcome = "
           f"%(outcome)s) {group}")
    return _rows(conn, sql, {"tz": tz, "start": start, "end": end, "outcome": outcome})


def settlement(conn: psycopg.Connection, start: dt.date, end: dt.date, *,
               franchisee: str | None = None, tz: str = TZ) -> list[dict[str, Any]]:
    """Per franchisee, store, day and card type: accepted redemptions and their face value."""
    sql = ("SELECT coalesce(s.franchisee, '') AS franchisee, r.store, "
           "(r.ended AT TIME ZONE %(tz)s)::date AS day, coalesce(r.card_type, '') AS card_type, "
           "count(*) AS redemptions, coalesce(sum(r.face_value_fen), 0)::bigint AS "
           "face_value_fen FROM redemptions r LEFT JOIN stores s ON s.store = r.store "
           f"WHERE r.outcome = 'accepted' AND {_range(start, end)} AND (%(f)s::text IS NULL OR "
           "coalesce(s.franchisee, '') = %(f)s) GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")
    return _rows(conn, sql, {"tz": tz, "start": start, "end": end, "f": franchisee})


def duplicates(conn: psycopg.Connection, *, start: dt.date | None = None,
               end: dt.date | None = None, tz: str = TZ) -> list[dict[str, Any]]:
    """Codes (by keyed hash) accepted by more than one journal entry: where and when each."""
    sql = ("WITH a AS (SELECT r.* FROM redemptions r WHERE r.outcome = 'accepted' AND "
           f"{_range(start, end)}) SELECT encode(code_hash, 'hex') AS code_hash, "
           "min(code_tail) AS code_tail, count(*) AS times, "
           "jsonb_agg(jsonb_build_object('store', store, 'lane', lane, 'entry', entry, "
           "'ended', ended) ORDER BY ended, store, inst, entry) AS places "
           "FROM a GROUP BY code_hash HAVING count(*) > 1 ORDER BY min(ended)")
    return _rows(conn, sql, {"tz": tz, "start": start, "end": end})


def points(conn: psycopg.Connection, *, start: dt.date | None = None,
           end: dt.date | None = None, tz: str = TZ) -> list[dict[str, Any]]:
    """Member points per store and day (the ledger's end time `ended`): points credited,
    taken back (refunds and voids, negative) and net, and the receipts credited."""
    sql = ("SELECT r.store, (r.ended AT TIME ZONE %(tz)s)::date AS day, "
           "count(*) FILTER (WHERE r.points > 0) AS receipts, "
           "coalesce(sum(r.points) FILTER (WHERE r.points > 0), 0)::bigint AS credited, "
           "coalesce(sum(r.points) FILTER (WHERE r.points < 0), 0)::bigint AS taken_back, "
           "coalesce(sum(r.points), 0)::bigint AS net "
           f"FROM points r WHERE {_range(start, end)} GROUP BY 1, 2 ORDER BY 1, 2")
    return _rows(conn, sql, {"tz": tz, "start": start, "end": end})


def quiet(conn: psycopg.Connection, hours: float) -> list[dict[str, Any]]:
    """Stores with no record for `hours` (by headquarters' clock), or never one."""
    sql = ("SELECT s.store, s.merchant, coalesce(s.franchisee, '') AS franchisee, "
           "max(r.ingested) AS last_record, o.state AS online, o.updated AS online_since "
           "FROM stores s LEFT JOIN records r ON r.store = s.store "
           "LEFT JOIN store_online o ON o.store = s.store "
           "GROUP BY s.store, s.merchant, s.franchisee, o.state, o.updated "
           "HAVING max(r.ingested) IS NULL OR "
           "max(r.ingested) < now() - make_interval(secs => %(secs)s) ORDER BY 4 NULLS FIRST, 1")
    return _rows(conn, sql, {"secs": hours * 3600})


def alarms(conn: psycopg.Connection, *, include_cleared: bool = False) -> list[dict[str, Any]]:
    sql = ("SELECT id, kind, store, lane, opened, cleared, detail FROM alarms "
           f"{'' if include_cleared else 'WHERE cleared IS NULL'} ORDER BY opened, id")
    return _rows(conn, sql, {})
