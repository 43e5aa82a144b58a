"""A store's own settlement totals, from its journal: what headquarters' report must equal.

Rules this module keeps:
- The same rule as fleetd/reports.py, applied to the journal instead of PostgreSQL: an entry
  counts once, in state `done` with outcome `accepted` (its latest: a correction replaces it);
  its face value is a CASH card's `reduce_cost` in fen (int), other card types count with 0.
- A day is the entry's `updated` time (its end, the store's clock) in the given time zone; the
  range is inclusive. Money is integer fen, never a float.
- Read-only: it opens the journal, reads, and closes it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from zoneinfo import ZoneInfo

from hexiao.hostd import journal as jr


def face_value_fen(card_type: str | None, value: object) -> int:
    fen = value.get("reduce_cost") if card_type == "CASH" and isinstance(value, dict) else None
    return fen if isinstance(fen, int) and not isinstance(fen, bool) else 0


def journal_totals(path: str | os.PathLike[str], start: dt.date, end: dt.date,
                   tz: str = "Asia/Shanghai") -> dict[tuple[dt.date, str], tuple[int, int]]:
    """{(day, card type or ''): (accepted redemptions, face value in fen)} of one journal."""
    zone = ZoneInfo(tz)
    out: Counter[tuple[dt.date, str]] = Counter()
    fen: Counter[tuple[dt.date, str]] = Counter()
    with jr.Journal(path) as j:
        for e in j.entries(("done",)):
            if e.outcome != "accepted":
                continue
            day = dt.datetime.fromtimestamp(e.updated, zone).date()
            if not start <= day <= end:
                continue
            key = (day, e.detail.get("card_type") or "")
            out[key] += 1
            fen[key] += face_value_fen(e.detail.get("card_type"), e.detail.get("value"))
    return {k: (out[k], fen[k]) for k in sorted(out)}
