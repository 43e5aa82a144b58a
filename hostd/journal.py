"""Write-ahead redemption journal: one SQLite file on disk, shared by every lane of a host.

Rules this module keeps:
- WAL mode, synchronous=FULL: a write that returned is on disk (fsync'd) before the caller goes
  on to the network call it announces. Every change is one transaction: the entry's state and an
  append-only step record are written together or not at all.
- States: received -> checked -> consume_sent -> done(outcome) | unknown (verify manually).
  `done` is final; `unknown` only goes to `done`. A transition is compare-and-set on the state the
  caller saw, so two writers (a lane and `reconcile`) cannot both finish one entry.
- One active redemption per code: a partial unique index over the non-final states makes a second
  scan (same lane or another process) fail with InFlight instead of starting a second consume.
  `unknown` counts as active: a code whose consume may have happened is not redeemed again until
  it is reconciled.
- A file that is not a readable journal raises JournalCorrupt naming the file; it is never
  deleted, rewritten or "repaired" here.
- Time is passed in (Unix seconds); nothing here reads a clock. Each step keeps the time the
  caller gives it (its own, not the scan's); an entry's `updated` is its last state change.
- An empty reason clears it (NULL): a row has a reason or none, never "".
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
State = Literal["received", "checked", "consume_sent", "unknown", "done"]
ACTIVE: tuple[State, ...] = ("received", "checked", "consume_sent", "unknown")
# where each state may go next; done is final
NEXT: dict[str, frozenset[str]] = {
    "received": frozenset({"checked", "done", "unknown"}),
    "checked": frozenset({"consume_sent", "done"}),
    "consume_sent": frozenset({"done", "unknown"}),
    "unknown": frozenset({"done"}),
    "done": frozenset(),
}
_ACTIVE_SQL = "state IN ('received','checked','consume_sent','unknown')"
_RECENT_INDEX = ("CREATE INDEX IF NOT EXISTS scanned_by_time "
                 "ON redemptions(scanned, created)")
# consumed_here() runs for every scan: by code as well as by scanned text
_CODE_INDEX = "CREATE INDEX IF NOT EXISTS code_by_time ON redemptions(code, updated)"
_SCHEMA = [  # statement by statement: executescript would commit our transaction
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE redemptions (
        id INTEGER PRIMARY KEY,
        scanned TEXT NOT NULL,          -- what the scanner read (may be an encrypt_code)
        code TEXT,                      -- the card code, once known
        lane TEXT NOT NULL,
        state TEXT NOT NULL,
        outcome TEXT,
        reason TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}')""",
    f"CREATE UNIQUE INDEX one_active_code ON redemptions(code) WHERE {_ACTIVE_SQL}",
    f"CREATE UNIQUE INDEX one_active_scan ON redemptions(scanned) WHERE {_ACTIVE_SQL}",
    """CREATE TABLE steps (
        id INTEGER PRIMARY KEY,
        redemption INTEGER NOT NULL REFERENCES redemptions(id),
        step TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}')""",
    "CREATE INDEX steps_by_redemption ON steps(redemption)",
    # append-only: the record of what was sent is never rewritten
    "CREATE TRIGGER steps_no_update BEFORE UPDATE ON steps "
    "BEGIN SELECT RAISE(ABORT, 'steps are append-only'); END",
    "CREATE TRIGGER steps_no_delete BEFORE DELETE ON steps "
    "BEGIN SELECT RAISE(ABORT, 'steps are append-only'); END",
]


class JournalError(Exception):
    """Base of the journal's errors."""


class JournalCorrupt(JournalError):
    """The file is not a readable hexiao journal. It has been left exactly as it was."""


class InFlight(JournalError):
    """The code (or scanned value) already has an active redemption."""


class StaleState(JournalError):
    """The entry is no longer in the state the caller expected (someone else moved it)."""


@dataclass(frozen=True)
class Entry:
    id: int
    scanned: str
    code: str | None
    lane: str
    state: str
    outcome: str | None
    reason: str | None
    created: float
    updated: float
    detail: dict[str, Any]


@dataclass(frozen=True)
class Step:
    step: str
    at: float
    detail: dict[str, Any]


# One writer at a time per journal file within this process. SQLite serialises writers anyway,
# but a connection that finds the write lock taken waits in its busy handler's sleeps (1, 2, 5
# ... 100 ms): with 20 lanes that turned milliseconds of work into seconds of queueing. A
# Python lock hands the turn over at once; other processes still meet SQLite's busy timeout.
_WRITERS: dict[str, threading.Lock] = {}
_WRITERS_GUARD = threading.Lock()


def _writer_lock(path: Path) -> threading.Lock:
    with _WRITERS_GUARD:
        return _WRITERS.setdefault(os.path.realpath(path), threading.Lock())


# A part that reports finished entries (the fleet outbox, hostd/fleet/outbox.py) registers a
# hook per journal file; every Journal on that file calls it inside the transaction of a step
# that ends or suspends an entry (done, unknown, corrected), with the connection and the entry
# as written, so its own row commits with the step or not at all. A hook that raises aborts
# the step. No hook (the default): nothing is called.
StepHook = Callable[[sqlite3.Connection, "Entry", str, float], None]
_STEP_HOOKS: dict[str, StepHook] = {}


def set_step_hook(path: str | os.PathLike[str], hook: StepHook | None) -> None:
    """Register (or with None, remove) the step hook of the journal file at `path`."""
    with _WRITERS_GUARD:
        if hook is None:
            _STEP_HOOKS.pop(os.path.realpath(path), None)
        else:
            _STEP_HOOKS[os.path.realpath(path)] = hook


class Journal:
    """One connection to the journal file. Use one per thread (like one per lane)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # 0600 from the start: the journal holds whole coupon codes
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        # autocommit mode; transactions are explicit (BEGIN IMMEDIATE) below
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._writer = _writer_lock(self.path)
        self._hook_key = os.path.realpath(self.path)
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise JournalCorrupt(
                f"{self.path}: not a readable hexiao journal ({e}). The file was left untouched; "
                "move it aside (keep it for support) and start hostd again to create a new one"
            ) from e

    def _open(self) -> None:
        # read before any pragma that writes, so a foreign file is refused as found
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        if tables and "schema_version" not in tables:
            raise sqlite3.DatabaseError("an SQLite file, but not a journal (no schema_version)")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx():
            if "schema_version" not in {r[0] for r in self._db.execute(
                    "SELECT name FROM sqlite_master")}:
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {row and row[0]}, this hostd reads {SCHEMA_VERSION}")
        with self._tx():  # recent() runs for every scan: an index, not a walk of the journal
            self._db.execute(_RECENT_INDEX)
            self._db.execute(_CODE_INDEX)

    @contextmanager
    def _tx(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: no upgrade deadlock between lanes
        with self._writer:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (SQLITE_FULL): do not mask them
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on this connection, for parts that keep their own tables in the
        journal's file (the fleet outbox): committed when the block ends, rolled back if it
        raises."""
        with self._tx():
            yield self._db

    def _report(self, entry_id: int, step: str, now: float) -> None:
        hook = _STEP_HOOKS.get(self._hook_key)
        if hook is not None:  # inside the caller's transaction (set_step_hook)
            row = self._db.execute(f"SELECT {_COLS} FROM redemptions WHERE id = ?",
                                   (entry_id,)).fetchone()
            hook(self._db, _entry(row), step, now)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes ------------------------------------------------------------------------

    def begin(self, scanned: str, lane: str, now: float, *, code: str | None = None,
              origin: dict[str, Any] | None = None) -> Entry:
        """A new entry in `received`. InFlight if the code/scan already has an active one.
        `origin` (device, scan_id, time_ms) is kept in the first step: a scan the device sends
        again after a hostd restart is recognised by it (Engine.answer_resend)."""
        try:
            with self._tx():
                cur = self._db.execute(
                    "INSERT INTO redemptions (scanned, code, lane, state, created, updated) "
                    "VALUES (?, ?, ?, 'received', ?, ?)", (scanned, code, lane, now, now))
                rid = cur.lastrowid
                assert rid is not None
                self._step(rid, "received", now, {"lane": lane, **(origin or {})})
        except sqlite3.IntegrityError as e:
            raise InFlight("this code already has a redemption in progress") from e
        return self.get(rid)

    def note(self, entry_id: int, step: str, now: float, **detail: Any) -> None:
        """Append a step record without changing state (e.g. 'get_sent' before a query)."""
        with self._tx():
            self._step(entry_id, step, now, detail)

    def set_code(self, entry_id: int, code: str, now: float) -> None:
        """Record the decrypted code. InFlight if that code is already being redeemed."""
        try:
            with self._tx():
                self._db.execute("UPDATE redemptions SET code = ?, updated = ? WHERE id = ?",
                                 (code, now, entry_id))
                self._step(entry_id, "decrypted", now, {})
        except sqlite3.IntegrityError as e:
            raise InFlight("this code already has a redemption in progress") from e

    def advance(self, entry_id: int, expected: str, state: State, now: float, *,
                outcome: str | None = None, reason: str | None = None,
                detail: dict[str, Any] | None = None, step: str | None = None) -> Entry:
        """Move from `expected` to `state` (merging `detail`), with its step record, atomically."""
        if state not in NEXT[expected]:
            raise ValueError(f"journal: {expected} -> {state} is not a transition")
        with self._tx():
            row = self._db.execute("SELECT detail FROM redemptions WHERE id = ? AND state = ?",
                                   (entry_id, expected)).fetchone()
            if row is None:
                raise StaleState(f"entry {entry_id} is no longer {expected}")
            merged = {**json.loads(row[0]), **(detail or {})}
            self._db.execute(
                "UPDATE redemptions SET state = ?, outcome = coalesce(?, outcome), "
                "reason = nullif(coalesce(?, reason), ''), updated = ?, detail = ? WHERE id = ?",
                (state, outcome, reason, now, json.dumps(merged, ensure_ascii=False), entry_id))
            step_detail = {k: v for k, v in (("outcome", outcome), ("reason", reason)) if v}
            self._step(entry_id, step or state, now, step_detail)
            if state in ("done", "unknown"):
                self._report(entry_id, step or state, now)
        return self.get(entry_id)

    def annotate(self, entry_id: int, step: str, now: float, detail: dict[str, Any]) -> None:
        """Merge `detail` into an entry (any state) with a step record; state unchanged."""
        with self._tx():
            row = self._db.execute("SELECT detail FROM redemptions WHERE id = ?",
                                   (entry_id,)).fetchone()
            if row is None:
                raise KeyError(entry_id)
            merged = {**json.loads(row[0]), **detail}
            self._db.execute("UPDATE redemptions SET detail = ? WHERE id = ?",
                             (json.dumps(merged, ensure_ascii=False), entry_id))
            self._step(entry_id, step, now, detail)

    def correct(self, entry_id: int, outcome: str, now: float, *, why: str) -> Entry:
        """Change a `done` entry's outcome when the truth arrives late (with a step saying why).

        Only for a lane whose consume reply arrived after reconcile had already closed the entry:
        the reply is the truth, and losing it would lose a consume from the books.
        """
        with self._tx():
            cur = self._db.execute(
                "UPDATE redemptions SET outcome = ?, reason = NULL, updated = ? "
                "WHERE id = ? AND state = 'done'", (outcome, now, entry_id))
            if cur.rowcount != 1:
                raise StaleState(f"entry {entry_id} is not done")
            self._step(entry_id, "corrected", now, {"outcome": outcome, "why": why})
            self._report(entry_id, "corrected", now)
        return self.get(entry_id)

    def _step(self, entry_id: int, step: str, now: float, detail: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO steps (redemption, step, at, detail) VALUES (?, ?, ?, ?)",
                         (entry_id, step, now, json.dumps(detail, ensure_ascii=False)))

    # --- reads -------------------------------------------------------------------------

    def get(self, entry_id: int) -> Entry:
        row = self._db.execute(f"SELECT {_COLS} FROM redemptions WHERE id = ?",
                               (entry_id,)).fetchone()
        if row is None:
            raise KeyError(entry_id)
        return _entry(row)

    def entries(self, states: Iterable[str] | None = None) -> list[Entry]:
        if states is None:
            rows = self._db.execute(f"SELECT {_COLS} FROM redemptions ORDER BY id")
        else:
            wanted = list(states)
            marks = ",".join("?" * len(wanted))
            rows = self._db.execute(
                f"SELECT {_COLS} FROM redemptions WHERE state IN ({marks}) ORDER BY id", wanted)
        return [_entry(r) for r in rows]

    def recent(self, scanned: str, since: float) -> list[Entry]:
        """Entries for this scanned text created at or after `since`, newest first."""
        rows = self._db.execute(
            f"SELECT {_COLS} FROM redemptions WHERE scanned = ? AND created >= ? "
            "ORDER BY id DESC", (scanned, since))
        return [_entry(r) for r in rows]

    def consumed_here(self, scanned: str, lane: str, since: float) -> Entry | None:
        """The newest entry of this lane, accepted at or after `since`, whose scanned text or
        code is `scanned`; None if there is none."""
        row = self._db.execute(
            f"SELECT {_COLS} FROM redemptions WHERE id IN ("
            "SELECT id FROM redemptions WHERE scanned = ? UNION "
            "SELECT id FROM redemptions WHERE code = ?) AND lane = ? AND state = 'done' "
            "AND outcome = 'accepted' AND updated >= ? ORDER BY id DESC LIMIT 1",
            (scanned, scanned, lane, since)).fetchone()
        return None if row is None else _entry(row)

    def latest(self, states: Iterable[str] | None = None, limit: int = 50) -> list[Entry]:
        """The newest `limit` entries (in these states), newest first."""
        where, args = "", [*(states or ())]
        if states is not None:
            where = f"WHERE state IN ({','.join('?' * len(args))}) "
        rows = self._db.execute(
            f"SELECT {_COLS} FROM redemptions {where}ORDER BY id DESC LIMIT ?", [*args, limit])
        return [_entry(r) for r in rows]

    def steps(self, entry_id: int) -> list[Step]:
        rows = self._db.execute(
            "SELECT step, at, detail FROM steps WHERE redemption = ? ORDER BY id", (entry_id,))
        return [Step(r[0], r[1], json.loads(r[2])) for r in rows]


_COLS = "id, scanned, code, lane, state, outcome, reason, created, updated, detail"


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(*row[:9], detail=json.loads(row[9]))
