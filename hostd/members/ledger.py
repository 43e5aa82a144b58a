"""The points ledger: write-ahead records of member credits, in the journal's SQLite file.

Rules this module keeps:
- Its own tables (points, points_steps) in the redemption journal's file, written through
  Journal.transaction(): the same file, fsync and writer lock as the consumes; a row and its
  append-only step record are committed together or not at all.
- One row per receipt, ever: `receipt` is unique (the lane and the receipt's digest), so a
  receipt seen twice (a reprint, the tap restarting) never credits twice.
- States: planned -> sent -> done | unknown, and sent -> planned only when a read showed that
  the add did not land (a new attempt). `sent` is written BEFORE card/membercard/updateuser
  goes out, with the member's points read just before (`before`): after a crash or a lost
  reply, the points now tell whether it landed (before + points) or not (before); anything
  else is `unknown` (verify manually), never repeated. Transitions are compare-and-set.
- Time is passed in; nothing here reads a clock. Member codes are kept whole (the journal is
  0600); logs elsewhere show only their last 4 characters.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from hexiao.hostd.journal import Journal, StaleState

State = str  # planned | sent | done | unknown
ACTIVE = ("planned", "sent")
NEXT = {"planned": {"sent", "done"}, "sent": {"done", "unknown", "planned"},
        "unknown": {"done"}, "done": set()}
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS points (
        id INTEGER PRIMARY KEY,
        receipt TEXT NOT NULL UNIQUE,   -- lane|digest: one credit per receipt
        lane TEXT NOT NULL,
        code TEXT NOT NULL,             -- the member card's code
        card_id TEXT NOT NULL,
        total_fen INTEGER NOT NULL,     -- the receipt's total; negative: a refund
        points INTEGER,                 -- signed; fixed when `sent` is written
        state TEXT NOT NULL,
        outcome TEXT,                   -- credited | not_credited | nothing
        reason TEXT,
        before_bonus INTEGER,           -- the member's points read just before the add
        result_bonus INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}')""",
    """CREATE TABLE IF NOT EXISTS points_steps (
        id INTEGER PRIMARY KEY,
        credit INTEGER NOT NULL REFERENCES points(id),
        step TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}')""",
    "CREATE INDEX IF NOT EXISTS points_by_code ON points(code, state)",
    "CREATE TRIGGER IF NOT EXISTS points_steps_no_update BEFORE UPDATE ON points_steps "
    "BEGIN SELECT RAISE(ABORT, 'points steps are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS points_steps_no_delete BEFORE DELETE ON points_steps "
    "BEGIN SELECT RAISE(ABORT, 'points steps are append-only'); END",
]
_COLS = ("id, receipt, lane, code, card_id, total_fen, points, state, outcome, reason, "
         "before_bonus, result_bonus, attempts, created, updated, detail")


class Duplicate(Exception):
    """This receipt already has a credit row: it is never credited twice."""


@dataclass(frozen=True)
class Credit:
    id: int
    receipt: str
    lane: str
    code: str
    card_id: str
    total_fen: int
    points: int | None
    state: str
    outcome: str | None
    reason: str | None
    before_bonus: int | None
    result_bonus: int | None
    attempts: int
    created: float
    updated: float
    detail: dict[str, Any]


class Ledger:
    """The points tables of one journal file. One per thread, like a Journal."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        with journal.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
        self._read = sqlite3.connect(journal.path, check_same_thread=False)

    def close(self) -> None:
        self._read.close()

    # --- writes ------------------------------------------------------------------------

    def plan(self, receipt: str, lane: str, code: str, card_id: str, total_fen: int,
             now: float, detail: dict[str, Any] | None = None) -> Credit:
        """A new credit in `planned`; Duplicate if this receipt has one already."""
        try:
            with self.journal.transaction() as db:
                cur = db.execute(
                    "INSERT INTO points (receipt, lane, code, card_id, total_fen, state, "
                    "created, updated, detail) VALUES (?, ?, ?, ?, ?, 'planned', ?, ?, ?)",
                    (receipt, lane, code, card_id, total_fen, now, now,
                     json.dumps(detail or {}, ensure_ascii=False)))
                cid = cur.lastrowid
                assert cid is not None
                _step(db, cid, "planned", now, {"lane": lane, "total_fen": total_fen})
        except sqlite3.IntegrityError as e:
            raise Duplicate(f"receipt {receipt} already has a credit") from e
        return self.get(cid)

    def advance(self, cid: int, expected: State, state: State, now: float, *,
                step: str | None = None, **fields: Any) -> Credit:
        """Compare-and-set `expected` -> `state`, setting `fields` (points, outcome, reason,
        before_bonus, result_bonus; attempts is counted on `sent`), with a step record."""
        if state not in NEXT[expected]:
            raise ValueError(f"points: {expected} -> {state} is not a transition")
        allowed = {"points", "outcome", "reason", "before_bonus", "result_bonus"}
        if set(fields) - allowed:
            raise ValueError(f"points: cannot set {sorted(set(fields) - allowed)}")
        sets = "".join(f", {k} = ?" for k in fields)
        bump = ", attempts = attempts + 1" if state == "sent" else ""
        with self.journal.transaction() as db:
            cur = db.execute(
                f"UPDATE points SET state = ?, updated = ?{sets}{bump} WHERE id = ? "
                "AND state = ?", (state, now, *fields.values(), cid, expected))
            if cur.rowcount != 1:
                raise StaleState(f"credit {cid} is no longer {expected}")
            _step(db, cid, step or state, now, fields)
        return self.get(cid)

    def note(self, cid: int, step: str, now: float, **detail: Any) -> None:
        with self.journal.transaction() as db:
            _step(db, cid, step, now, detail)

    # --- reads -------------------------------------------------------------------------

    def get(self, cid: int) -> Credit:
        row = self._read.execute(f"SELECT {_COLS} FROM points WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise KeyError(cid)
        return _credit(row)

    def by_receipt(self, receipt: str) -> Credit | None:
        row = self._read.execute(f"SELECT {_COLS} FROM points WHERE receipt = ?",
                                 (receipt,)).fetchone()
        return None if row is None else _credit(row)

    def entries(self, states: tuple[str, ...] | None = None) -> list[Credit]:
        if states is None:
            rows = self._read.execute(f"SELECT {_COLS} FROM points ORDER BY id")
        else:
            rows = self._read.execute(
                f"SELECT {_COLS} FROM points WHERE state IN ({','.join('?' * len(states))}) "
                "ORDER BY id", states)
        return [_credit(r) for r in rows]

    def net_credited(self, code: str, exclude: int | None = None) -> int:
        """Points this journal credited to `code`, less what refunds took back (also those
        whose outcome is not known yet: they may have landed)."""
        row = self._read.execute(
            "SELECT coalesce(sum(points), 0) FROM points WHERE code = ? AND id != ? AND ("
            "(state = 'done' AND outcome = 'credited') OR (state IN ('sent', 'unknown') "
            "AND points < 0))", (code, exclude or -1)).fetchone()
        return int(row[0])

    def steps(self, cid: int) -> list[tuple[str, float, dict[str, Any]]]:
        rows = self._read.execute(
            "SELECT step, at, detail FROM points_steps WHERE credit = ? ORDER BY id", (cid,))
        return [(r[0], r[1], json.loads(r[2])) for r in rows]


def _step(db: sqlite3.Connection, cid: int, step: str, now: float,
          detail: dict[str, Any]) -> None:
    db.execute("INSERT INTO points_steps (credit, step, at, detail) VALUES (?, ?, ?, ?)",
               (cid, step, now, json.dumps(detail, ensure_ascii=False)))


def _credit(row: tuple[Any, ...]) -> Credit:
    return Credit(*row[:15], detail=json.loads(row[15]))
