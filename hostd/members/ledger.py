"""The points ledger: write-ahead records of member credits, in the journal's SQLite file.

Rules this module keeps:
- Its own tables (points, points_steps) in the redemption journal's file, written through
  Journal.transaction(): the same file, fsync and writer lock as the consumes; a row and its
  append-only step record are committed together or not at all.
- One row per receipt, ever: `receipt` is unique (the lane and the receipt's digest), so a
  receipt seen twice (a reprint, the tap restarting) never credits twice. A void's row is
  keyed by the sale it takes back ("void|" + the sale's key), so a sale is voided once
  however often its void is printed; detail.void_of names the sale's row.
- States: planned -> sent -> done | unknown, and sent -> planned only when a read showed that
  the add did not land (a new attempt). `sent` is written BEFORE card/membercard/updateuser
  goes out, with the member's points read just before (`before`): after a crash or a lost
  reply, the points now tell whether it landed (before + points) or not (before); anything
  else is `unknown` (verify manually), never repeated. Transitions are compare-and-set.
- A credit that ends `done` and credited calls the file's done hook (set_done_hook: the fleet
  outbox, hostd/fleet/outbox.py) inside the transaction that ends it, so headquarters' points
  record commits with the ledger row or not at all. No hook: nothing is called.
- Time is passed in; nothing here reads a clock. Member codes are kept whole (the journal is
  0600); logs elsewhere show only their last 4 characters.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


DoneHook = Callable[[sqlite3.Connection, "Credit", float], None]
_DONE_HOOKS: dict[str, DoneHook] = {}
_HOOKS_LOCK = threading.Lock()


def set_done_hook(path: str | os.PathLike[str], hook: DoneHook | None) -> None:
    """Register (None: remove) what is called when a credit of this journal file ends credited."""
    with _HOOKS_LOCK:
        if hook is None:
            _DONE_HOOKS.pop(os.path.realpath(path), None)
        else:
            _DONE_HOOKS[os.path.realpath(path)] = hook


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

    def bar(self, receipt: str, lane: str, total_fen: int, now: float, reason: str,
            detail: dict[str, Any] | None = None) -> Credit:
        """A receipt that must never be credited (a sale voided before anyone claimed it): a
        row already `done` (outcome nothing, no member), so a later claim meets Duplicate;
        Duplicate if the receipt has a row already."""
        try:
            with self.journal.transaction() as db:
                cur = db.execute(
                    "INSERT INTO points (receipt, lane, code, card_id, total_fen, state, outcome, "
                    "reason, created, updated, detail) VALUES (?, ?, '', '', ?, 'done', "
                    "'nothing', ?, ?, ?, ?)", (receipt, lane, total_fen, reason, now, now,
                                               json.dumps(detail or {}, ensure_ascii=False)))
                cid = cur.lastrowid
                assert cid is not None
                _step(db, cid, "barred", now, {"reason": reason})
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
            hook = _DONE_HOOKS.get(os.path.realpath(self.journal.path))
            if hook is not None and state == "done":
                done = _credit(db.execute(f"SELECT {_COLS} FROM points WHERE id = ?",
                                          (cid,)).fetchone())
                if done.outcome == "credited" and done.points:
                    hook(db, done, now)
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

    def sale(self, lane: str, *, number: str = "", since: float = 0.0,
             total_fen: int = 0) -> Credit | None:
        """The sale a void takes back: the lane's newest member sale (a positive total, not
        itself a void) whose receipt printed `number`; without a number, the lane's newest one
        of `total_fen` created at `since` or later."""
        where = "lane = ? AND total_fen > 0 AND code != '' AND receipt NOT LIKE 'void|%'"
        args: tuple[Any, ...]
        if number:
            where, args = where + " AND json_extract(detail, '$.number') = ?", (lane, number)
        else:
            where += " AND created >= ? AND total_fen = ?"
            args = (lane, since, total_fen)
        row = self._read.execute(f"SELECT {_COLS} FROM points WHERE {where} ORDER BY id DESC "
                                 "LIMIT 1", args).fetchone()
        return None if row is None else _credit(row)

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


def summary(journal_path: str | Path, since: float) -> dict[str, Any]:
    """What the status shows (any thread; its own read-only connection): points credited and
    taken back since `since` (receipts, net points), credits still pending (planned, sent) and
    those needing a person (unknown: their ids)."""
    out: dict[str, Any] = {"credited": 0, "receipts": 0, "taken_back": 0, "pending": 0,
                           "needs_person": []}
    try:
        db = sqlite3.connect(f"file:{Path(journal_path)}?mode=ro", uri=True)
    except sqlite3.Error:
        return out
    try:
        rows = db.execute(
            "SELECT coalesce(sum(CASE WHEN points > 0 THEN points END), 0), "
            "count(CASE WHEN points > 0 THEN 1 END), "
            "coalesce(sum(CASE WHEN points < 0 THEN points END), 0) FROM points "
            "WHERE state = 'done' AND outcome = 'credited' AND updated >= ?", (since,))
        out["credited"], out["receipts"], out["taken_back"] = rows.fetchone()
        out["pending"] = db.execute("SELECT count(*) FROM points WHERE state IN "
                                    "('planned', 'sent')").fetchone()[0]
        out["needs_person"] = [r[0] for r in db.execute(
            "SELECT id FROM points WHERE state = 'unknown' ORDER BY id")]
    except sqlite3.OperationalError:  # no points table yet: nothing credited
        pass
    finally:
        db.close()
    return out


def _step(db: sqlite3.Connection, cid: int, step: str, now: float,
          detail: dict[str, Any]) -> None:
    db.execute("INSERT INTO points_steps (credit, step, at, detail) VALUES (?, ?, ?, ?)",
               (cid, step, now, json.dumps(detail, ensure_ascii=False)))


def _credit(row: tuple[Any, ...]) -> Credit:
    return Credit(*row[:15], detail=json.loads(row[15]))
