"""One fleetd instance at a time does a periodic round (alarms, rollouts): the shape they share.

Rules this module keeps:
- Leadership is a PostgreSQL session advisory lock (`lock`) on the round's own connection: held
  until that connection goes, so when the leader dies another instance takes over at its next
  round, with no lease to tune.
- A round that loses its database (a restart, a failover) logs one line, drops the connection
  and tries again a period later; the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

import psycopg

log = logging.getLogger("hexiao.fleetd")


class LeaderLoop:
    """Subclasses call leader_conn() at the start of a round and define round()."""

    name = "fleetd-round"

    def __init__(self, dsn: str, lock: int, every_s: float) -> None:
        self.dsn, self._lock, self.every_s = dsn, lock, every_s
        self._conn: psycopg.Connection | None = None
        self.leader = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def leader_conn(self) -> psycopg.Connection | None:
        """This instance's connection if it leads (taking the lead if free), else None."""
        if self._conn is None or self._conn.closed:
            self._conn, self.leader = psycopg.connect(self.dsn, autocommit=True), False
        if not self.leader:
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock,)).fetchone()
            self.leader = bool(row and row[0])
        return self._conn if self.leader else None

    def round(self) -> object:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.round()
            except psycopg.Error as e:  # the database restarting: the next round tries again
                log.warning("%s: not done this round: %s", self.name,
                            str(e).strip().splitlines()[0])
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
