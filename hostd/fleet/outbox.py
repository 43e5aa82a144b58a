"""The fleet outbox: records to publish, in the journal's own SQLite file.

Rules this module keeps:
- A redemption record is written by the journal's step hook (journal.set_step_hook) inside the
  transaction of the step it reports: the journal step and its record commit together or not at
  all. An entry that goes to `unknown` writes a `verify_manually` event the same way. A member
  credit or reversal that ends credited writes a `points` record the same way (the points
  ledger's done hook, members/ledger.set_done_hook).
- seq is SQLite AUTOINCREMENT: never reused, even after every row is deleted, so a record's
  identity (store, installation, seq) is unique for the life of the journal file. The
  installation id is made once, with the tables, and kept in fleet_meta.
- Payloads are stored unsealed (CBOR); the bridge seals each with its seq when it publishes.
  The full code is never stored here: only its last 4 characters and its keyed hash.
- Rows leave only through delete(), which the bridge calls for records the broker acknowledged.
- Putting a record signals the file's Wake (wake_for): the bridge sleeps until then.
- Tables are created if missing; a journal without them is an ordinary journal.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any

from hexiao.hostd import journal as jr
from hexiao.hostd.fleet import record
from hexiao.hostd.members import ledger

_TABLES = (
    "CREATE TABLE IF NOT EXISTS fleet_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS fleet_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,            -- from hexiao/v1/ on
        payload BLOB NOT NULL,          -- deterministic CBOR, sealed when published
        created REAL NOT NULL)""",
)


class Wake:
    """A journal file's records being put, for the bridge to wait on instead of polling."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.last = 0  # the highest seq put (maybe not committed yet) in this process

    def put(self, seq: int) -> None:
        self.last = max(self.last, seq)
        self.event.set()


_WAKE: dict[str, Wake] = {}
_WAKE_LOCK = threading.Lock()


def wake_for(path: str | os.PathLike[str]) -> Wake:
    """The Wake of a journal file, shared by every Outbox of this process on it."""
    with _WAKE_LOCK:
        return _WAKE.setdefault(os.path.realpath(path), Wake())


@dataclass(frozen=True)
class Place:
    merchant: str
    store: str


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    payload: bytes
    created: float


class Outbox:
    """The outbox of one journal file. One per thread, like a Journal (it holds one)."""

    def __init__(self, journal_path: str | os.PathLike[str], place: Place,
                 code_key: bytes) -> None:
        self.place, self._code_key = place, code_key
        self.journal = jr.Journal(journal_path)
        with self.journal.transaction() as db:
            for statement in _TABLES:
                db.execute(statement)
            inst = db.execute("SELECT value FROM fleet_meta WHERE key = 'inst'").fetchone()
            if inst is None:
                inst = (secrets.token_hex(16),)
                db.execute("INSERT INTO fleet_meta VALUES ('inst', ?)", inst)
        self.inst: str = inst[0]
        self.wake = wake_for(self.journal.path)
        # reads on a connection of their own (WAL: they never wait for a writer)
        self._read = sqlite3.connect(self.journal.path, isolation_level=None,
                                     check_same_thread=False)

    def close(self) -> None:
        self._read.close()
        self.journal.close()

    # --- writes --------------------------------------------------------------------------------

    def install(self) -> None:
        """From now on, every Journal on this file reports its finished entries here, and its
        points ledger its credits."""
        jr.set_step_hook(self.journal.path, self.on_step)
        ledger.set_done_hook(self.journal.path, self.on_points)

    def uninstall(self) -> None:
        jr.set_step_hook(self.journal.path, None)
        ledger.set_done_hook(self.journal.path, None)

    def on_step(self, db: sqlite3.Connection, entry: jr.Entry, step: str, now: float) -> None:
        """The journal's step hook: runs inside the step's transaction, on its connection."""
        if entry.state == "unknown":
            self._put(db, entry.lane, "event", now, {"name": "verify_manually",
                                                     "entry": entry.id})
            return
        if entry.state != "done":
            return
        first = db.execute("SELECT detail FROM steps WHERE redemption = ? ORDER BY id LIMIT 1",
                           (entry.id,)).fetchone()
        device = json.loads(first[0]).get("device") if first else None
        d = entry.detail
        code = entry.code or entry.scanned
        self._put(db, entry.lane, "redemption", now, {
            "entry": entry.id, "step": "corrected" if step == "corrected" else "done",
            "outcome": entry.outcome or "", "reason": entry.reason or None,
            "card_type": d.get("card_type"), "card_id": d.get("card_id"),
            "title": d.get("title"), "value": record.plain(d.get("value") or {}),
            "code_tail": code[-4:], "code_hash": record.code_hash(self._code_key, code),
            "device": device if isinstance(device, str) else None,
            "received": record.ms(entry.created), "ended": record.ms(entry.updated)})

    def on_points(self, db: sqlite3.Connection, credit: Any, now: float) -> None:
        """The points ledger's hook (members/ledger.set_done_hook): a credit or reversal that
        ended credited, inside the transaction that ended it."""
        via = credit.detail.get("via") or ("void" if "void_of" in credit.detail else
                                           "refund" if credit.total_fen < 0 else "till")
        self._put(db, credit.lane, "points", now, {
            "entry": credit.id, "receipt": credit.receipt, "points": credit.points or 0,
            "total_fen": credit.total_fen, "card_id": credit.card_id, "via": via,
            "code_tail": credit.code[-4:], "code_hash": record.code_hash(self._code_key,
                                                                         credit.code),
            "ended": record.ms(credit.updated)})

    def add(self, lane: str, kind: str, now: float, fields: dict[str, Any]) -> int:
        """An event or health record in its own transaction; returns its seq."""
        with self.journal.transaction() as db:
            return self._put(db, lane, kind, now, fields)

    def _put(self, db: sqlite3.Connection, lane: str, kind: str, now: float,
             fields: dict[str, Any]) -> int:
        p = self.place
        payload = {"v": record.VERSION, "kind": kind, "merchant": p.merchant, "store": p.store,
                   "lane": lane, "inst": self.inst, "at": record.ms(now), **record.plain(fields)}
        if kind in record.HASHED:  # bytes survive plain() only when put back after it
            payload["code_hash"] = fields["code_hash"]
        cur = db.execute("INSERT INTO fleet_outbox (topic, payload, created) VALUES (?, ?, ?)",
                         (record.topic(p.merchant, p.store, lane, kind), record.encode(payload),
                          now))
        assert cur.lastrowid is not None
        self.wake.put(cur.lastrowid)  # (before the commit: the bridge looks again shortly)
        return cur.lastrowid

    def delete(self, seqs: list[int]) -> None:
        if seqs:
            with self.journal.transaction() as db:
                db.executemany("DELETE FROM fleet_outbox WHERE seq = ?", [(s,) for s in seqs])

    def next_session(self) -> int:
        """Counts the bridge's starts (the `online` record's session)."""
        with self.journal.transaction() as db:
            row = db.execute("SELECT value FROM fleet_meta WHERE key = 'session'").fetchone()
            n = int(row[0]) + 1 if row else 1
            db.execute("INSERT OR REPLACE INTO fleet_meta VALUES ('session', ?)", (str(n),))
        return n

    # --- reads ---------------------------------------------------------------------------------

    def after(self, seq: int, limit: int) -> list[Row]:
        rows = self._read.execute(
            "SELECT seq, topic, payload, created FROM fleet_outbox WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (seq, limit))
        return [Row(*r) for r in rows]

    def get(self, seq: int) -> Row | None:
        r = self._read.execute(
            "SELECT seq, topic, payload, created FROM fleet_outbox WHERE seq = ?",
            (seq,)).fetchone()
        return None if r is None else Row(*r)

    def depth(self) -> tuple[int, float | None]:
        """(rows waiting, created time of the oldest or None)."""
        n, oldest = self._read.execute(
            "SELECT count(*), min(created) FROM fleet_outbox").fetchone()
        return n, oldest
