"""What headquarters' page shows, read from fleetd's PostgreSQL (it only reads).

Rules this module keeps:
- stores and lanes come from the same queries as `hexiao fleet stores|lanes` (fleetd/remote.py):
  the page and the CLI never disagree;
- the result is plain JSON-able data: the templates and /status.json render the same dict;
  names, titles and details from stores stay untrusted text, escaped by the templates;
- coupon codes only as their last 4 characters (hostd's page rule, its helper), whatever the
  table holds;
- redemptions per hour: the 24 hours up to the current one, by the redemption's end time,
  `accepted` as redeemed and every other outcome as not redeemed; hours with none are 0. The
  chart draws exactly these figures;
- a lane whose health names no firmware (its device unplugged) shows the last one a health
  record of the last FIRMWARE_DAYS named, marked as last known;
- every item carries a level the page colours: ok, warn, bad, off (unknown).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from hexiao.fleetd import remote
from hexiao.hostd.web.view import OUTCOMES, last4

STORES_SHOWN = 200
ALARMS_SHOWN = 100
REDEMPTIONS_SHOWN = 20
FIRMWARE_DAYS = 7  # how far back a lane's last known firmware is looked for
IN_PROGRESS = ("running", "paused", "halted")  # a rollout not yet done or aborted
STORE_STATE = {"online": "ok", "offline": "bad", "unknown": "off"}
LINK = {"open": ("online", "ok"), "connecting": ("connecting", "warn"),
        "waiting": ("offline", "bad")}
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def when(t: datetime | str | None, tz: ZoneInfo, now: datetime) -> str:
    """A time as the page shows it, in headquarters' zone: the time today, else the date too."""
    if t is None:
        return ""
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    local = t.astimezone(tz)
    return local.strftime("%H:%M:%S" if local.date() == now.astimezone(tz).date()
                          else "%Y-%m-%d %H:%M")


def hourly(conn: psycopg.Connection, now: datetime, tz: ZoneInfo) -> list[dict[str, Any]]:
    """The last 24 hours (the current one last): start, label, redeemed, not redeemed."""
    end = _EPOCH + (now - _EPOCH) // timedelta(hours=1) * timedelta(hours=1) + timedelta(hours=1)
    start = end - timedelta(hours=24)
    counts = {h: (a, o) for h, a, o in conn.execute(
        "SELECT date_bin('1 hour', ended, %s), count(*) FILTER (WHERE outcome = 'accepted'), "
        "count(*) FILTER (WHERE outcome <> 'accepted') FROM redemptions "
        "WHERE ended >= %s AND ended < %s GROUP BY 1", (_EPOCH, start, end))}
    out = []
    for i in range(24):
        h = start + timedelta(hours=i)
        a, o = counts.get(h, (0, 0))
        out.append({"start": h.isoformat(), "label": h.astimezone(tz).strftime("%H:%M"),
                    "redeemed": a, "other": o})
    return out


def _store_level(s: dict[str, Any]) -> str:
    level = STORE_STATE.get(s["state"], "off")
    if level == "ok" and s["lanes_open"] < s["lanes"]:
        return "warn"
    return level


def _alarms(conn: psycopg.Connection, tz: ZoneInfo, now: datetime,
            store: str | None = None) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT kind, store, lane, opened, detail FROM alarms WHERE cleared IS NULL AND "
        "(%(s)s::text IS NULL OR store = %(s)s) ORDER BY opened DESC LIMIT %(n)s",
        {"s": store, "n": ALARMS_SHOWN}).fetchall()
    return [{"kind": k.replace("_", " "), "store": s, "lane": ln, "opened": when(o, tz, now),
             "detail": ", ".join(f"{dk}: {dv}" for dk, dv in sorted((d or {}).items()))}
            for k, s, ln, o, d in rows]


def rollouts(conn: psycopg.Connection, tz: ZoneInfo, now: datetime) -> list[dict[str, Any]]:
    """Rollouts in progress, each stage with its lanes by state."""
    rows = conn.execute(
        "SELECT id, version, stages, stage, state, reason, author, updated FROM rollouts "
        "WHERE state = ANY(%s) ORDER BY created", (list(IN_PROGRESS),)).fetchall()
    lanes: dict[tuple[int, int], dict[str, int]] = {}
    for rid, stage, state, n in conn.execute(
            "SELECT rollout_id, stage, state, count(*) FROM rollout_lanes WHERE rollout_id = "
            "ANY(%s) GROUP BY 1, 2, 3", ([r[0] for r in rows],)):
        lanes.setdefault((rid, stage), {})[state] = n
    out = []
    for rid, version, stages, current, state, reason, author, updated in rows:
        steps = []
        for i, pct in enumerate(stages):
            c = lanes.get((rid, i), {})
            total = sum(c.values())
            steps.append({"percent": pct, "total": total,
                          "done": c.get("done", 0) + c.get("confirmed", 0),
                          "failed": c.get("failed", 0) + c.get("rolled_back", 0),
                          "active": c.get("sent", 0) + c.get("updating", 0),
                          "pending": c.get("pending", 0),
                          "phase": "done" if i < current else "now" if i == current else "next"})
        out.append({"id": rid, "version": version, "state": state, "reason": reason or "",
                    "author": author, "updated": when(updated, tz, now),
                    "level": "ok" if state == "running" else "bad" if state == "halted"
                    else "warn", "stages": steps})
    return out


def _last_firmware(conn: psycopg.Connection, store_id: str) -> dict[str, str]:
    """Each lane's firmware as its last health record that knew it said (a lane whose device is
    unplugged reports none), from the last FIRMWARE_DAYS of records."""
    rows = conn.execute(
        "SELECT DISTINCT ON (lane) lane, payload->'state'->>'firmware' FROM records WHERE "
        "store = %s AND ingested > now() - make_interval(days => %s) AND kind = 'health' AND "
        "payload->'state'->>'firmware' IS NOT NULL ORDER BY lane, ingest_id DESC",
        (store_id, FIRMWARE_DAYS))
    return dict(rows.fetchall())


def overview(conn: psycopg.Connection, now: datetime, tz: ZoneInfo) -> dict[str, Any]:
    """Everything the overview shows, now."""
    stores = remote.stores(conn)
    counts = {k: 0 for k in STORE_STATE}
    for s in stores:
        s["level"] = _store_level(s)
        s["since"] = when(s["since"], tz, now)
        counts[s["state"] if s["state"] in counts else "unknown"] += 1
    order = {"bad": 0, "warn": 1, "off": 2, "ok": 3}
    shown = sorted(stores, key=lambda s: (order[s["level"]], s["store"]))[:STORES_SHOWN]
    hours = hourly(conn, now, tz)
    alarms = _alarms(conn, tz, now)
    if counts["offline"] or alarms:
        level = "bad"
    elif counts["unknown"] or any(s["level"] == "warn" for s in stores):
        level = "warn"
    else:
        level = "ok"
    return {"level": level, "updated": now.astimezone(tz).strftime("%H:%M:%S"),
            "counts": counts, "total": len(stores), "stores": shown,
            "more": len(stores) - len(shown), "hours": hours,
            "redeemed_24h": sum(h["redeemed"] for h in hours),
            "other_24h": sum(h["other"] for h in hours),
            "alarms": alarms, "rollouts": rollouts(conn, tz, now)}


def store(conn: psycopg.Connection, store_id: str, now: datetime,
          tz: ZoneInfo) -> dict[str, Any] | None:
    """One store's page: its state, lanes, open alarms and last redemptions; None if unknown."""
    found = [s for s in remote.stores(conn) if s["store"] == store_id]
    if not found:
        return None
    s = found[0]
    s["level"] = _store_level(s)
    s["since"] = when(s["since"], tz, now)
    lanes, found_lanes = [], remote.lanes(conn, store=store_id)
    known = _last_firmware(conn, store_id) if any(not ln["firmware"] for ln in found_lanes) \
        else {}
    for ln in found_lanes:
        word, level = LINK.get(ln["link"] or "", (str(ln["link"]), "warn"))
        lanes.append({**ln, "presence": word, "level": level, "seen": when(ln["seen"], tz, now),
                      "down_since": when(ln["down_since"], tz, now),
                      "firmware": ln["firmware"] or "", "device": ln["device"] or "",
                      "board": ln["board"] or "",
                      "last_firmware": "" if ln["firmware"] else known.get(ln["lane"], "")})
    rows = conn.execute(
        "SELECT ended, lane, device, outcome, reason, card_type, title, code_tail FROM "
        "redemptions WHERE store = %s ORDER BY ended DESC LIMIT %s",
        (store_id, REDEMPTIONS_SHOWN)).fetchall()
    redemptions = []
    for ended, lane, device, outcome, reason, card_type, title, tail in rows:
        word, level = OUTCOMES.get(outcome, (outcome, "warn"))
        redemptions.append({"time": when(ended, tz, now), "lane": lane, "device": device or "",
                            "result": word, "level": level,
                            "reason": (reason or "").replace("_", " "),
                            "card_type": card_type or "", "title": title or "",
                            "code": last4(tail)})
    return {"store": s, "lanes": lanes, "redemptions": redemptions,
            "alarms": _alarms(conn, tz, now, store_id),
            "updated": now.astimezone(tz).strftime("%H:%M:%S")}
