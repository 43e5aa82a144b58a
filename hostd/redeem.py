"""The redemption engine: one scanned code in, one specific verdict out, consumed at most once.

Rules this module keeps:
- Order: journal `received` -> (decrypt) -> card/code/get -> checks -> journal `checked` ->
  journal `consume_sent` -> consume -> journal `done`. Each journal write is committed before
  the network call it announces, so after a crash the journal says whether a consume may have
  been sent. The `hook(step)` is called right after each write (tests pause or kill there).
- Checks are ours, not `can_consume` alone: user_card_status, the date window against `now`,
  and the card's merchant (allowed card ids, store location, sub-merchant) when configured.
  Member cards are identified, never consumed.
- A consume whose result is unknown is never sent again. The entry goes to `unknown` first; a
  read-only query (check_consume=false) then settles it: CONSUMED -> accepted; NORMAL after a
  settled reply -> not consumed (the cashier may scan again, which re-checks); anything else
  stays `unknown` = "verify manually", listed for support, until reconcile() settles it.
- "Verify manually" only when a consume's outcome is truly unknown. Known not to be consumed is
  "not redeemed, scan again" (not_redeemed); a refusal no rescan can fix is "setup problem,
  call support" (setup, with `why` in the verdict and the journal: token, errcode N, custom
  code, journal); the daily quota (45009) is `quota`, and this engine then stops calling the
  API until midnight China time (quota_reset_after).
- A code this journal consumed on this lane within `redeemed_here_s` and scanned again is
  accepted again as `redeemed_here` (its age, value and the macro_id it was typed with), never
  "already used": the cashier may not have heard the first, late, verdict. Nothing is sent.
- reconcile() touches only entries no live worker owns: never one an Engine of this process is
  redeeming (owned()); others only after a restart or once idle `settle_after_s` (their last
  step's time). Entries stopped before `consume_sent` never sent a consume: closed as
  abandoned. Entries in `consume_sent`/`unknown` are queried, never consumed: CONSUMED ->
  accepted; NORMAL -> not_consumed; unreachable -> stay unknown. One whose consume was sent
  less than `settle_after_s` ago is never read as not consumed (it may still land).
- Each journal step carries its own time: the scan's `now` plus the time spent since (a
  monotonic clock), so a slow backend call shows in the journal and in reconcile's ages.
- Logs show a coupon code as its last 4 characters only (tail()).
- Tickets (film, attraction, meeting, boarding) are redeemed like coupons; their verdict value
  holds what the cashier checks: the card's fields (flight, from, to, departure_time...), the
  code's own details when the backend gives them (seat_number, show_time, passenger_name...)
  and the code's window (valid_from, valid_until).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hexiao.hostd import journal as jr
from hexiao.hostd.backends.base import (
    AlreadyConsumed,
    ApiError,
    Busy,
    CardBackend,
    CardUnavailable,
    CodeInfo,
    InvalidCode,
    NotInTimeWindow,
    Offline,
    OutcomeUnknown,
    QuotaExceeded,
    TokenError,
    WeChatError,
)

log = logging.getLogger("hexiao.redeem")

Outcome = Literal["accepted", "refused", "offline", "verify_manually", "identified"]
Reason = Literal["already_used", "expired", "not_yet_valid", "gifting", "deleted",
                 "unavailable", "not_this_merchant", "invalid_code", "busy", "offline",
                 "in_progress", "unknown", "not_redeemed", "setup", "quota", "redeemed_here"]
CONSUMABLE = ("NORMAL",)  # GIFT_TIMEOUT too is refused by consume (the platform, 40127)
_STATUS_REASON: dict[str, Reason] = {
    "CONSUMED": "already_used", "EXPIRE": "expired", "GIFTING": "gifting", "DELETE": "deleted",
    "UNAVAILABLE": "unavailable", "GIFT_SUCC": "invalid_code",  # given away: not theirs now
}
_REASONS = frozenset(Reason.__args__)  # type: ignore[attr-defined]
_PLAIN = re.compile(r"[0-9A-Za-z_-]{1,40}")
_CHINA = 8 * 3600  # WeChat's daily quotas reset at midnight China time (UTC+8, no DST)

# (journal file, scanned text) -> redemptions of it under way in this process: reconcile leaves
# their entries to the worker that owns them
_LIVE: Counter[tuple[str, str]] = Counter()
_LIVE_LOCK = threading.Lock()


def owned(journal_path: str | os.PathLike[str]) -> frozenset[str]:
    """The scanned texts this process's engines are redeeming now on this journal."""
    where = os.path.realpath(journal_path)
    with _LIVE_LOCK:
        return frozenset(s for (p, s), n in _LIVE.items() if p == where and n > 0)


def quota_reset_after(t: float) -> float:
    """The next midnight China time after Unix time t (when a 45009 daily quota resets)."""
    return (int(t + _CHINA) // 86_400 + 1) * 86_400 - _CHINA


def tail(code: str) -> str:
    """A coupon code as logs may show it."""
    return "…" + code[-4:]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: Reason | None = None
    code_tail: str = ""
    entry_id: int | None = None
    card_id: str | None = None
    title: str | None = None
    card_type: str | None = None
    # CASH: reduce_cost, least_cost (fen); DISCOUNT: discount (percent off); GIFT: gift;
    # GROUPON: deal_detail; GENERAL_COUPON: default_detail; MEMBER_CARD: prerogative
    value: dict[str, Any] = field(default_factory=dict)
    why: str = ""  # reason "setup": what support should look at (token, errcode N, ...)
    age_s: float | None = None  # reason "redeemed_here": seconds since this journal consumed it
    macro_id: int | None = None  # the macro id this entry was typed with, if one was sent


@dataclass(frozen=True)
class LaneConfig:
    lane: str = "lane-1"
    # "auto": a scan that is valid base64 of whole AES blocks is an encrypt_code
    decrypt: Literal["auto", "always", "never"] = "auto"
    allowed_card_ids: frozenset[str] | None = None  # None: any card of this appid
    location_id: int | None = None  # this store; refuses cards limited to other stores
    sub_merchant_id: int | None = None  # refuses cards of another sub-merchant
    verify_unknown: bool = True  # query at once after an unknown consume outcome
    # custom-code cards need their card_id with the code (41012): the ones this lane takes
    custom_code_card_ids: tuple[str, ...] = ()
    # a code consumed here scanned again within this many seconds: "redeemed here" (0: off)
    redeemed_here_s: float = 900.0


_VALUE_FIELDS = {"CASH": ("reduce_cost", "least_cost"), "DISCOUNT": ("discount",),
                 "GIFT": ("gift",), "GROUPON": ("deal_detail",),
                 "GENERAL_COUPON": ("default_detail",),
                 "MEMBER_CARD": ("prerogative", "supply_bonus", "supply_balance"),
                 "MOVIE_TICKET": ("detail",), "SCENIC_TICKET": ("ticket_class",),
                 "MEETING_TICKET": ("meeting_detail",),
                 "BOARDING_PASS": ("from", "to", "flight", "departure_time", "boarding_time",
                                   "gate")}
TICKETS = ("MOVIE_TICKET", "SCENIC_TICKET", "MEETING_TICKET", "BOARDING_PASS")


def looks_encrypted(scanned: str) -> bool:
    if _PLAIN.fullmatch(scanned) and len(scanned) < 24:
        return False
    try:
        raw = base64.b64decode(scanned, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) >= 16 and len(raw) % 16 == 0


class Engine:
    """One lane's engine. Give each thread its own Journal connection and client."""

    def __init__(self, journal: jr.Journal, client: CardBackend,
                 config: LaneConfig | None = None,
                 hook: Callable[[str], None] | None = None) -> None:
        self.journal, self.client = journal, client
        self.config = config or LaneConfig()
        self._hook = hook or (lambda step: None)
        # an idempotency key for backends that take one (busifavor use_request_no, at most 32
        # of [0-9A-Za-z_-]): this installation's journal and lane, then the entry id, so a
        # retried use of one entry is one use, and two tills of one merchant never collide
        where = f"{socket.gethostname()}|{journal.path.resolve()}|{self.config.lane}"
        self._request_prefix = "hx" + hashlib.sha256(where.encode()).hexdigest()[:12]
        self._file = os.path.realpath(journal.path)
        self._quota_until = 0.0  # 45009 seen: no API call before this time
        self._t0, self._now = time.monotonic(), 0.0

    def _at(self) -> float:
        """This step's own time: the scan's `now` plus the time spent since."""
        return self._now + (time.monotonic() - self._t0)

    def request_no(self, entry_id: int) -> str:
        return f"{self._request_prefix}-{entry_id}"

    # --- redeem ------------------------------------------------------------------------

    def redeem(self, scanned: str, now: float,
               origin: dict[str, Any] | None = None) -> Verdict:
        self._t0, self._now = time.monotonic(), now
        if not scanned.isprintable():  # control bytes, DEL: no coupon code holds them
            return Verdict("refused", "invalid_code", tail(scanned))
        live = (self._file, scanned)
        with _LIVE_LOCK:  # before the first write: reconcile never sees it unowned
            _LIVE[live] += 1
        try:
            return self._redeem(scanned, now, origin)
        finally:
            with _LIVE_LOCK:
                _LIVE[live] -= 1
                if _LIVE[live] <= 0:
                    del _LIVE[live]

    def _redeem(self, scanned: str, now: float, origin: dict[str, Any] | None) -> Verdict:
        mode = self.config.decrypt
        encrypted = mode == "always" or (mode == "auto" and looks_encrypted(scanned))
        try:
            here = self._redeemed_here(scanned, now, origin)
            if here is not None:
                return here
            # a plain code is known now: the unique index covers it from the first write
            entry = self.journal.begin(scanned, self.config.lane, now,
                                       code=None if encrypted else scanned, origin=origin)
        except jr.InFlight:
            log.info("redeem %s: already in progress", tail(scanned))
            return Verdict("refused", "in_progress", tail(scanned))
        except sqlite3.Error as e:  # disk full, I/O error: nothing written, nothing sent
            log.error("journal write failed before %s: %s", tail(scanned), e)
            return Verdict("refused", "setup", tail(scanned), why="journal")
        self._hook("received")
        try:
            v = self._run(entry.id, scanned, encrypted, now)
        except sqlite3.Error as e:
            return self._journal_failed(entry.id, scanned, e)
        except jr.StaleState:
            # reconcile (another process) settled this entry first: its word stands
            v = self._verdict(self.journal.get(entry.id))
        log.info("redeem %s: %s %s", v.code_tail, v.outcome, v.reason or "")
        return v

    def _redeemed_here(self, scanned: str, now: float,
                       origin: dict[str, Any] | None) -> Verdict | None:
        """A code this lane consumed within redeemed_here_s, scanned again: said so, green."""
        window = self.config.redeemed_here_s
        if window <= 0:
            return None
        entry = self.journal.consumed_here(scanned, self.config.lane, now - window)
        if entry is None:
            return None
        self.journal.note(entry.id, "rescanned", self._at(), **(origin or {}))
        v = self._verdict(entry)
        age = max(0.0, now - entry.updated)
        log.info("redeem %s: redeemed here %.0f s ago (entry %d)", v.code_tail, age, entry.id)
        return Verdict("accepted", "redeemed_here", v.code_tail, entry.id, v.card_id, v.title,
                       v.card_type, v.value, age_s=age, macro_id=v.macro_id)

    def macro_sent(self, entry_id: int, macro_id: int, now: float) -> None:
        """Record the macro id an accepted entry's keys went out with: a rescan that says
        "redeemed here" offers the same id, which a device that typed it will not type again."""
        try:
            self.journal.annotate(entry_id, "macro_sent", now, {"macro_id": macro_id})
        except sqlite3.Error as e:  # the macro still goes; a rescan then offers a new id
            log.error("journal: macro id of entry %d not recorded: %s", entry_id, e)

    def _run(self, eid: int, scanned: str, encrypted: bool, now: float) -> Verdict:
        code = scanned
        if now < self._quota_until:  # no call can succeed before midnight: none is made
            return self._close(eid, "received", "refused", "quota")
        if encrypted:
            self.journal.note(eid, "decrypt_sent", self._at())
            self._hook("decrypt_sent")
            try:
                code = self.client.decrypt(scanned)
                self.journal.set_code(eid, code, self._at())
            except jr.InFlight:
                return self._close(eid, "received", "refused", "in_progress")
            except WeChatError as e:
                return self._refused(eid, "received", e, now)
        self.journal.note(eid, "get_sent", self._at())
        self._hook("get_sent")
        try:
            info = self._get_code(code)
            if info.status == "CONSUMED":
                return self._close(eid, "received", "refused", "already_used")
            card = self.client.get_card(info.card_id)
        except CardUnavailable:
            return self._close(eid, "received", "refused", self._why_unavailable(code))
        except WeChatError as e:
            return self._refused(eid, "received", e, now)
        detail = describe(card)
        if detail["card_type"] in TICKETS:  # what the cashier checks (module rules)
            window = {"valid_from": info.begin_time, "valid_until": info.end_time}
            detail["value"] = {**detail["value"], **{k: v for k, v in window.items() if v},
                               **getattr(info, "ticket", {})}
        refusal = self._check(info, card, now)
        if refusal is not None:
            return self._close(eid, "received", "refused", refusal, detail)
        if detail["card_type"] == "MEMBER_CARD":
            return self._close(eid, "received", "identified", None, detail)
        self.journal.advance(eid, "received", "checked", self._at(), detail=detail)
        self._hook("checked")
        self.journal.advance(eid, "checked", "consume_sent", self._at())
        self._hook("consume_sent")
        try:
            self.client.consume(code, info.card_id, request_no=self.request_no(eid))
        except OutcomeUnknown as e:
            return self._unknown(eid, code, e)
        except AlreadyConsumed:
            return self._close(eid, "consume_sent", "refused", "already_used", detail)
        except CardUnavailable:
            return self._close(eid, "consume_sent", "refused", "unavailable", detail)
        except NotInTimeWindow:
            return self._close(eid, "consume_sent", "refused", "not_yet_valid", detail)
        except WeChatError as e:
            # refused before acting (token, quota, unreachable): nothing was consumed
            return self._refused(eid, "consume_sent", e, now, detail)
        self._hook("consume_replied")
        try:
            return self._close(eid, "consume_sent", "accepted", None, detail)
        except jr.StaleState:
            # reconcile closed it while our consume was out (settle_after_s set too short):
            # the reply is the truth, and the books must show the consume
            entry = self.journal.correct(eid, "accepted", self._at(),
                                         why="consume reply after reconcile")
            log.error("consume %s: accepted after reconcile had closed the entry", tail(code))
            return self._verdict(entry)

    def _refused(self, eid: int, state: str, e: WeChatError, now: float,
                 detail: dict[str, Any] | None = None) -> Verdict:
        """Close an entry whose call failed without touching the code."""
        outcome, reason, why = _refusal(e)
        if reason == "quota":
            self._quota_until = quota_reset_after(now)
            log.error("backend daily quota used up (45009): no calls until %s UTC+8 midnight",
                      time.strftime("%Y-%m-%d", time.gmtime(self._quota_until + _CHINA)))
        elif reason == "setup":
            log.error("backend refused a call: setup problem (%s): %s", why, e)
        return self._close(eid, state, outcome, reason, detail, why=why)

    def _journal_failed(self, eid: int, scanned: str, e: sqlite3.Error) -> Verdict:
        """A journal write failed mid-way. Safe, because each write precedes its network call:
        the last state that did reach the disk says whether a consume may have been sent."""
        log.error("journal write failed for %s: %s", tail(scanned), e)
        try:
            sent = self.journal.get(eid).state in ("consume_sent", "unknown")
        except sqlite3.Error:
            sent = True  # cannot tell: assume the worst
        if sent:
            return Verdict("verify_manually", "unknown", tail(scanned), eid)
        return Verdict("refused", "setup", tail(scanned), eid, why="journal")

    def _get_code(self, code: str) -> CodeInfo:
        try:
            return self.client.get_code(code, check_consume=True)
        except ApiError as e:
            if e.errcode != 41012 or not self.config.custom_code_card_ids:
                raise
        # a custom code is unique only within its card: try the configured ones
        for card_id in self.config.custom_code_card_ids:
            try:
                return self.client.get_code(code, card_id, check_consume=True)
            except InvalidCode:
                continue
        raise InvalidCode("no configured custom-code card has this code", 40056)

    def _check(self, info: CodeInfo, card: dict[str, Any], now: float) -> Reason | None:
        if info.status not in CONSUMABLE:
            return _STATUS_REASON.get(info.status, "unavailable")
        if info.begin_time is not None and now < info.begin_time:
            return "not_yet_valid"
        if info.end_time is not None and now > info.end_time:
            return "expired"
        cfg = self.config
        if cfg.allowed_card_ids is not None and info.card_id not in cfg.allowed_card_ids:
            return "not_this_merchant"
        base = card[card["card_type"].lower()].get("base_info", {})
        stores = base.get("location_id_list") or []
        if cfg.location_id is not None and stores and cfg.location_id not in stores:
            return "not_this_merchant"
        sub = (base.get("sub_merchant_info") or {}).get("merchant_id")
        # sub_merchant_id absent = any sub-merchant of this appid (as the config documents)
        if cfg.sub_merchant_id is not None and sub is not None and sub != cfg.sub_merchant_id:
            return "not_this_merchant"
        return None

    def _why_unavailable(self, code: str) -> Reason:
        """40127 covers deleted, gifting, unavailable and expired: ask which (read-only)."""
        try:
            status = self.client.get_code(code, check_consume=False).status
        except WeChatError:
            return "unavailable"
        return _STATUS_REASON.get(status, "unavailable")

    def _unknown(self, eid: int, code: str, e: OutcomeUnknown) -> Verdict:
        self.journal.advance(eid, "consume_sent", "unknown", self._at(), reason="unknown")
        self._hook("unknown")
        log.warning("consume %s: outcome unknown (%s)", tail(code), e)
        if self.config.verify_unknown:
            cause: Reason = "busy" if isinstance(e.cause, Busy) else \
                "offline" if e.transport else "not_redeemed"
            settled = self._settle(eid, "unknown", code, self._at(),
                                   may_be_in_flight=not e.settled, not_applied=cause)
            if settled is not None:
                return settled
        return self._verdict(self.journal.get(eid))

    def answer_resend(self, scanned: str, origin: dict[str, Any], now: float,
                      window_s: float = 600.0) -> Verdict | None:
        """The verdict already due to this very scan (same device, scan_id and device time),
        if the journal has it: a device sends a scan again when its session ended before the
        verdict arrived (SPEC §9.6), e.g. across a hostd restart. Without this the cashier's own
        coupon would come back "already used". An entry whose consume may have been sent is
        settled by a query first, never consumed again. None: not a resend, redeem it."""
        for entry in self.journal.recent(scanned, now - window_s):
            first = self.journal.steps(entry.id)[0].detail
            if any(first.get(k) != v for k, v in origin.items()):
                continue
            if entry.state in ("consume_sent", "unknown") and entry.code is not None:
                try:
                    v = self._settle(entry.id, entry.state, entry.code, now,
                                     may_be_in_flight=False)
                except jr.StaleState:
                    v = None
                return v or self._verdict(self.journal.get(entry.id))
            if entry.state == "done" and entry.outcome != "abandoned":
                return self._verdict(entry)
            # abandoned (hostd died before any consume) or still received/checked: nothing was
            # consumed, so the scan is redeemed as new
            return None
        return None

    # --- reconcile ---------------------------------------------------------------------

    def reconcile(self, now: float, *, settle_after_s: float = 60.0, restart: bool = False,
                  live: frozenset[str] | None = None) -> list[Verdict]:
        """Settle unfinished entries no live worker owns (after a crash or a lost reply).
        Never consumes.

        live: scanned texts being redeemed now (default: this process's engines, owned());
        they are never touched. An entry stopped before consume_sent is closed after a restart
        (restart=True: no worker runs) or once idle settle_after_s (another process may run
        it). One in consume_sent/unknown is only queried; settle_after_s must exceed the
        client's timeout: a consume sent less long ago may still land, so it is left alone in
        consume_sent and never read as not consumed.
        """
        out: list[Verdict] = []
        busy = owned(self.journal.path) if live is None else live
        for entry in self.journal.entries(jr.ACTIVE):
            if entry.scanned in busy:
                continue  # its worker finishes it
            try:
                steps = self.journal.steps(entry.id)
                if entry.state in ("received", "checked"):
                    idle = now - max((s.at for s in steps), default=entry.updated)
                    if not restart and idle < settle_after_s:
                        continue  # maybe another process's worker: not yet an orphan
                    # consume_sent is written before any consume: none was sent for this one
                    out.append(self._verdict(self.journal.advance(
                        entry.id, entry.state, "done", now, outcome="abandoned",
                        reason="interrupted", step="reconciled")))
                    continue
                if entry.code is None:
                    continue
                sent_at = max((s.at for s in steps if s.step == "consume_sent"),
                              default=entry.updated)
                young = now - sent_at < settle_after_s
                if young and entry.state == "consume_sent":
                    # a live lane may be waiting for this consume's reply: leave it to the lane
                    out.append(self._verdict(entry))
                    continue
                v = self._settle(entry.id, entry.state, entry.code, now, may_be_in_flight=young)
                out.append(v or self._verdict(self.journal.get(entry.id)))
            except jr.StaleState:
                continue  # a lane finished it meanwhile
        return out

    def _settle(self, eid: int, state: str, code: str, now: float, *,
                may_be_in_flight: bool, not_applied: Reason = "not_redeemed") -> Verdict | None:
        """Query a maybe-consumed code; close the entry if the answer is certain."""
        if state == "consume_sent":
            self.journal.advance(eid, "consume_sent", "unknown", now, reason="unknown")
            state = "unknown"
        self.journal.note(eid, "verify_sent", now)
        self._hook("verify_sent")
        try:
            info = self.client.get_code(code, check_consume=False)
        except WeChatError as e:
            log.warning("verify %s: %s", tail(code), type(e).__name__)
            return None
        if info.status == "CONSUMED":
            entry = self.journal.advance(eid, state, "done", now, outcome="accepted",
                                         reason="", step="reconciled")
            return self._verdict(entry)
        if info.status in CONSUMABLE and may_be_in_flight:
            return None  # our consume may still land: wait until it is settled
        # not consumed: the reason says why the consume failed (busy, offline) or the status
        reason = not_applied if info.status in CONSUMABLE else \
            _STATUS_REASON.get(info.status, "unavailable")
        entry = self.journal.advance(eid, state, "done", now, outcome="not_consumed",
                                     reason=reason, step="reconciled")
        return self._verdict(entry)

    # --- helpers -----------------------------------------------------------------------

    def _close(self, eid: int, state: str, outcome: str, reason: str | None,
               detail: dict[str, Any] | None = None, *, why: str = "") -> Verdict:
        if why:
            detail = {**(detail or {}), "why": why}
        entry = self.journal.advance(eid, state, "done", self._at(), outcome=outcome,
                                     reason=reason, detail=detail)
        self._hook("done")
        return self._verdict(entry)

    def _verdict(self, e: jr.Entry) -> Verdict:
        d = e.detail
        code_tail = tail(e.code or e.scanned)
        card = {"card_id": d.get("card_id"), "title": d.get("title"),
                "card_type": d.get("card_type"), "value": d.get("value", {}),
                "why": d.get("why", ""), "macro_id": d.get("macro_id")}
        if e.state != "done":
            return Verdict("verify_manually", "unknown", code_tail, e.id, **card)
        if e.outcome in ("not_consumed", "abandoned"):
            # nothing was consumed; the cashier may scan again (which checks again). Only an
            # unknown consume is "verify manually": interrupted, unknown -> not redeemed
            reason = e.reason if e.reason in _REASONS and e.reason != "unknown" else \
                "not_redeemed"
            return Verdict("refused", reason, code_tail, e.id, **card)  # type: ignore[arg-type]
        reason = e.reason or None
        if e.outcome == "refused" and reason == "unknown":  # journals written before not_redeemed
            reason = "not_redeemed"
        return Verdict(e.outcome, reason, code_tail, e.id, **card)  # type: ignore[arg-type]


def describe(card: dict[str, Any]) -> dict[str, Any]:
    """Title, type and value fields of a card/get `card` object (stored in the journal)."""
    ctype = card["card_type"]
    section = card[ctype.lower()]
    base = section.get("base_info", {})
    value = {k: section[k] for k in _VALUE_FIELDS.get(ctype, ()) if k in section}
    return {"card_id": base.get("id"), "title": base.get("title"), "card_type": ctype,
            "value": value}


def _refusal(e: WeChatError) -> tuple[Outcome, Reason, str]:
    """The verdict (outcome, reason, why) for an error that left the code untouched."""
    if isinstance(e, Offline):
        return "offline", "offline", ""
    if isinstance(e, QuotaExceeded):
        return "refused", "quota", ""
    if isinstance(e, Busy):
        return "refused", "busy", ""
    if isinstance(e, InvalidCode):
        return "refused", "invalid_code", ""
    if isinstance(e, AlreadyConsumed):
        return "refused", "already_used", ""
    if isinstance(e, NotInTimeWindow):
        return "refused", "not_yet_valid", ""
    if isinstance(e, TokenError):
        return "refused", "setup", "token"
    if isinstance(e, ApiError):
        # an errcode we do not expect (bad appid/secret 40013/40125, IP whitelist 40164, API
        # not authorised 48001 ...): scanning again gives the same answer
        why = "custom code" if e.errcode == 41012 else \
            f"errcode {e.errcode}" if e.errcode is not None else "api"
        return "refused", "setup", why
    return "refused", "not_redeemed", ""  # an unreadable reply: nothing consumed, try again
