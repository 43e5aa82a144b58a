"""What hostd tells headquarters besides redemptions: lane and store health, and events.

Rules this module keeps:
- Everything goes through Outbox.add(), so health and events wait out a broker outage in the
  journal's file like redemptions do, in order. Nothing here talks to the network.
- hostd calls sample() from its metrics loop with what it already knows (lane.info() of each
  lane, the tap's state); a verdict callback (any lane thread) only notes a quota refusal,
  which the next sample() writes. One lock: sample() may also be called by a test or a command.
- Health of a lane (`lane`) and of the store (`@store`) goes out when what matters changes (the
  link's state, the firmware, the device, the applied desired-state version; lanes open, the
  printer, the outbox growing) and every `period_s` regardless, with counters. Counters alone
  changing is not a change. `desired` is the version of headquarters' desired state the store
  applied (hostd/fleet/desired.py; 0: none yet, the config file's own; None: desired state is
  off), so headquarters sees what runs where.
- Events, each once per episode: `mac_failures` (the host link's `mac` counter grew by
  `mac_burst` or more between two samples: frames signed with a wrong key, someone on the
  cable), `safe_mode` (inferred: the device's port is there but no link session for
  `no_link_s`, which is what a device in safe mode looks like, since it runs no link),
  `printer_lost` (the receipt tap's printer went to lost), `quota_exhausted` (the backend's
  daily quota refused a redemption; once per lane per China day). `verify_manually` is the
  outbox's own (the journal step hook).
- No codes, keys or tokens in any field; a lane name that cannot be a topic is skipped, logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hexiao.hostd.fleet import record
from hexiao.hostd.fleet.outbox import Outbox, Place

log = logging.getLogger("hexiao.fleet")
PERIOD_S = 300.0         # health of every lane and the store at least this often
MAC_BURST = 5            # mac failures between two samples that make an event
NO_LINK_S = 120.0        # port present, no session this long: safe mode (inferred)
OUTBOX_AGE_S = 300.0     # the store's health says so when its oldest record is older
_CHINA = 8 * 3600
# link counters worth sending (rejections by cause, and the link's own events)
_COUNTERS = ("mac", "replay", "crc", "cobs", "cose", "kid", "handshake", "no_session",
             "retransmits", "sessions", "expired", "duplicate")


class HealthFeed:
    def __init__(self, journal_path: Path, place: Place, *,
                 clock: Callable[[], float] = time.time, period_s: float = PERIOD_S,
                 mac_burst: int = MAC_BURST, no_link_s: float = NO_LINK_S) -> None:
        # health carries no codes: the code key is never used by this outbox
        self.outbox = Outbox(journal_path, place, b"")
        self._clock, self._period, self._burst, self._no_link = clock, period_s, mac_burst, \
            no_link_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Any, float]] = {}   # lane -> (what matters, when sent)
        self._mac: dict[str, int] = {}                   # device -> mac counter last seen
        self._no_link_since: dict[str, float] = {}       # device -> first sample without one
        self._safe_said: set[str] = set()
        self._printer = "unknown"
        self._quota: list[tuple[str, str]] = []          # (lane, device) refused by quota
        self._quota_day: dict[str, int] = {}
        self.sent: dict[str, int] = {"health": 0, "event": 0}

    def close(self) -> None:
        with self._lock:
            self.outbox.close()

    def quota_refused(self, lane: str, device: str) -> None:
        """A lane's redemption was refused by the backend's daily quota (any thread)."""
        with self._lock:
            self._quota.append((lane, device))

    def sample(self, lanes: list[dict[str, Any]], tap: dict[str, Any] | None = None,
               desired: int | None = None) -> None:
        with self._lock:
            now = self._clock()
            for info in lanes:
                self._lane(info, now, desired)
            self._printer_event(tap, now)
            self._quota_events(now)
            self._store(lanes, tap, now, desired)

    # --- pieces (under the lock) ------------------------------------------------------------

    def _put(self, lane: str, kind: str, now: float, fields: dict[str, Any]) -> None:
        try:
            self.outbox.add(lane, kind, now, fields)
        except ValueError:  # a lane name that cannot be a topic: config allows more
            log.warning("fleet: lane %r cannot be a fleet topic; its %s is not sent", lane, kind)
            return
        self.sent[kind] += 1

    def _event(self, lane: str, now: float, name: str, detail: dict[str, Any]) -> None:
        log.warning("fleet event %s on %s: %s", name, lane, detail)
        self._put(lane, "event", now, {"name": name, "detail": detail})

    def _health(self, lane: str, now: float, matters: Any, state: dict[str, Any]) -> None:
        last = self._last.get(lane)
        if last is None or last[0] != matters or now - last[1] >= self._period:
            self._put(lane, "health", now, {"state": state})
            self._last[lane] = (matters, now)

    def _lane(self, info: dict[str, Any], now: float, desired: int | None) -> None:
        device, lane = str(info["id"]), str(info["lane"])
        peer = info.get("peer") or {}
        counters = info.get("counters") or {}
        link = str(info.get("state"))
        state = {"device": device, "link": link, "firmware": peer.get("firmware"),
                 "board": peer.get("board"), "port": bool(info.get("port")),
                 "error": str(info.get("error") or "")[:120],
                 "counters": {k: int(counters[k]) for k in _COUNTERS if k in counters},
                 "scans": int((info.get("stats") or {}).get("scans", 0)), "desired": desired}
        self._health(lane, now, (device, link, state["firmware"], desired), state)
        mac = int(counters.get("mac", 0))
        before = self._mac.get(device)
        self._mac[device] = mac
        if before is not None and mac - before >= self._burst:
            self._event(lane, now, "mac_failures", {"device": device, "count": mac - before,
                                                    "total": mac})
        if link == "connecting" and info.get("port"):
            since = self._no_link_since.setdefault(device, now)
            if now - since >= self._no_link and device not in self._safe_said:
                self._safe_said.add(device)
                self._event(lane, now, "safe_mode", {
                    "device": device, "inferred": f"port present, no link for {now - since:.0f} s",
                    "error": state["error"]})
        else:
            self._no_link_since.pop(device, None)
            if link == "open":
                self._safe_said.discard(device)

    def _printer_event(self, tap: dict[str, Any] | None, now: float) -> None:
        printer = ((tap or {}).get("printer") or {})
        state = str(printer.get("state") or "unknown")
        if state == "lost" and self._printer != "lost":
            self._event(record.STORE_LANE, now, "printer_lost", {
                "target": str(printer.get("target") or ""),
                "error": str(printer.get("error") or "")[:120]})
        self._printer = state

    def _quota_events(self, now: float) -> None:
        day = int((now + _CHINA) // 86400)
        for lane, device in self._quota:
            if self._quota_day.get(lane) != day:
                self._quota_day[lane] = day
                self._event(lane, now, "quota_exhausted", {"device": device})
        self._quota.clear()

    def _store(self, lanes: list[dict[str, Any]], tap: dict[str, Any] | None,
               now: float, desired: int | None) -> None:
        depth, oldest = self.outbox.depth()
        age = max(0.0, now - oldest) if oldest is not None else 0.0
        n_open = sum(i.get("state") == "open" for i in lanes)
        state = {"lanes": len(lanes), "lanes_open": n_open, "outbox_depth": depth,
                 "outbox_age_s": int(age), "printer": self._printer,
                 "tap": str((tap or {}).get("state") or "off"), "desired": desired}
        self._health(record.STORE_LANE, now, (len(lanes), n_open, self._printer,
                                              age >= OUTBOX_AGE_S, desired), state)
