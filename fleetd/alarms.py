"""fleetd's alarms: conditions over the stores' records, kept in the `alarms` table.

Rules this module keeps:
- An alarm is a row (kind, store, lane) open while its condition holds and cleared (the time
  set, the row kept) when it stops; one open row per (kind, store, lane) (a partial unique
  index). Opening and clearing each write one log line; open alarms are a metric by kind.
- Conditions are SQL over what fleetd already stores; times are headquarters' clock (a
  store's clock may be wrong), except where a store reports an age it measured itself:
  - lane_offline: a lane's link not open for `lane_offline_s` (lane_health.down_since);
  - store_offline: the store's retained state `offline` (its Last Will, or a stop) for
    `store_offline_s`;
  - mac_failures: a `mac_failures` event from the lane within `mac_window_s`;
  - outbox_growing: the store's last health says its oldest outbox record is `outbox_age_s`
    old or more (it arrives behind the backlog it reports; an outage shows as store_offline);
  - needs_person: `verify_manually` events whose entry has no later redemption record;
  - quota: a `quota_exhausted` event since the last midnight China time (when quotas reset);
  - records_missing: an installation's seqs have had a hole below the highest stored for
    `gap_s` (gaps.py: record_streams.gap_since); the detail names the first missing ranges.
    It clears when the hole fills (a late arrival) or an operator accepts the loss.
- Several fleetd instances may run: only the one holding a session advisory lock evaluates;
  another takes over when its connection goes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hexiao.fleetd import gaps
from hexiao.fleetd.leader import LeaderLoop
from psycopg.types.json import Jsonb

log = logging.getLogger("hexiao.fleetd")
_LOCK = 0x6865_7861  # "hexa": the instance that evaluates alarms
KINDS = ("lane_offline", "store_offline", "mac_failures", "outbox_growing", "needs_person",
         "quota", "records_missing")


@dataclass(frozen=True)
class Thresholds:
    lane_offline_s: float = 600.0
    store_offline_s: float = 600.0
    mac_window_s: float = 3600.0
    outbox_age_s: float = 300.0
    gap_s: float = 300.0


_SQL = {
    "lane_offline": "SELECT store, lane, jsonb_build_object('since', down_since, 'device', "
                    "state->>'device', 'link', state->>'link') FROM lane_health WHERE lane <> "
                    "'@store' AND down_since <= now() - make_interval(secs => %(lane)s)",
    "store_offline": "SELECT store, '', jsonb_build_object('since', updated, 'session', session) "
                     "FROM store_online WHERE state = 'offline' AND updated <= now() - "
                     "make_interval(secs => %(store)s)",
    "mac_failures": "SELECT store, lane, jsonb_build_object('events', count(*), 'failures', "
                    "sum((payload->'detail'->>'count')::bigint), 'last', max(ingested)) "
                    "FROM records WHERE kind = 'event' AND payload->>'name' = 'mac_failures' "
                    "AND ingested > now() - make_interval(secs => %(mac)s) GROUP BY 1, 2",
    "outbox_growing": "SELECT store, '', jsonb_build_object('age_s', state->'outbox_age_s', "
                      "'depth', state->'outbox_depth') FROM lane_health WHERE lane = '@store' "
                      "AND (state->>'outbox_age_s')::float >= %(outbox)s",
    "needs_person": "SELECT e.store, e.lane, jsonb_build_object('entries', jsonb_agg("
                    "(e.payload->>'entry')::bigint ORDER BY e.seq)) FROM records e WHERE "
                    "e.kind = 'event' AND e.payload->>'name' = 'verify_manually' AND NOT EXISTS "
                    "(SELECT 1 FROM redemptions r WHERE r.store = e.store AND r.inst = e.inst "
                    "AND r.entry = (e.payload->>'entry')::bigint AND r.seq > e.seq) "
                    "GROUP BY 1, 2",
    "quota": "SELECT store, lane, jsonb_build_object('last', max(ingested)) FROM records "
             "WHERE kind = 'event' AND payload->>'name' = 'quota_exhausted' AND ingested >= "
             "(date_trunc('day', now() AT TIME ZONE 'Asia/Shanghai') AT TIME ZONE "
             "'Asia/Shanghai') GROUP BY 1, 2",
    "records_missing": gaps.ALARM_SQL,
}


class Alarms(LeaderLoop):
    """check() once (tests, a cron), or start() a thread that checks every `every_s`."""

    name = "fleetd-alarms"

    def __init__(self, dsn: str, thresholds: Thresholds = Thresholds(), *,
                 every_s: float = 30.0) -> None:
        super().__init__(dsn, _LOCK, every_s)
        self.t = thresholds
        self.open: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.raised = 0
        self.gaps_open = self.records_missing = 0  # holes of any age, as of the last check

    def round(self) -> object:
        return self.check()

    def check(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        """Evaluate every condition once: (opened, cleared) as (kind, store, lane). Nothing if
        another instance holds the evaluation lock."""
        conn = self.leader_conn()
        if conn is None:
            return [], []
        args = {"lane": self.t.lane_offline_s, "store": self.t.store_offline_s,
                "mac": self.t.mac_window_s, "outbox": self.t.outbox_age_s,
                "gap": self.t.gap_s}
        opened, cleared = [], []
        with conn.transaction():
            now_true: dict[tuple[str, str, str], Any] = {}
            for kind, sql in _SQL.items():
                for store, lane, detail in conn.execute(sql, args):  # type: ignore[arg-type]
                    now_true[(kind, store, lane)] = detail
            was = {(k, s, ln): i for i, k, s, ln in conn.execute(
                "SELECT id, kind, store, lane FROM alarms WHERE cleared IS NULL")}
            for key, detail in now_true.items():
                if key in was:
                    conn.execute("UPDATE alarms SET detail = %s WHERE id = %s",
                                 (Jsonb(detail), was[key]))
                else:
                    conn.execute("INSERT INTO alarms (kind, store, lane, detail) VALUES (%s, %s, "
                                 "%s, %s)", (*key, Jsonb(detail)))
                    opened.append(key)
            for key, i in was.items():
                if key not in now_true:
                    conn.execute("UPDATE alarms SET cleared = now() WHERE id = %s", (i,))
                    cleared.append(key)
        for kind, store, lane in opened:
            log.warning("alarm %s: store %s%s: %s", kind, store, f" lane {lane}" if lane else "",
                        now_true[(kind, store, lane)])
        for kind, store, lane in cleared:
            log.info("alarm %s cleared: store %s%s", kind, store, f" lane {lane}" if lane else "")
        self.raised += len(opened)
        self.gaps_open, self.records_missing = gaps.totals(conn)
        self.open = dict.fromkeys(KINDS, 0)
        for kind, _, _ in now_true:
            self.open[kind] += 1
        return opened, cleared
