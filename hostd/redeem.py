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
- reconcile(): entries stopped before `consume_sent` never sent a consume: closed as abandoned.
  Entries in `consume_sent`/`unknown` are queried, never consumed: CONSUMED -> accepted;
  NORMAL -> not_consumed; unreachable -> stay unknown. An entry younger than `settle_after_s`
  is left alone while in `consume_sent` (a live lane owns it) and never read as not consumed
  (its consume may still land).
- Logs show a coupon code as its last 4 characters only (tail()).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
from hexiao.hostd import journal as jr
from hexiao.hostd.backends.wechat_card import (
    AlreadyConsumed,
    ApiError,
    Busy,
    CardUnavailable,
    CodeInfo,
    InvalidCode,
    NotInTimeWindow,
    Offline,
    OutcomeUnknown,
    QuotaExceeded,
    WeChatCardClient,
    WeChatError,
)

log = logging.getLogger("hexiao.redeem")

Outcome = Literal["accepted", "refused", "offline", "verify_manually", "identified"]
Reason = Literal["already_used", "expired", "not_yet_valid", "gifting", "deleted",
                 "unavailable", "not_this_merchant", "invalid_code", "busy", "offline",
                 "in_progress", "unknown"]
CONSUMABLE = ("NORMAL", "GIFT_TIMEOUT")  # a gift that timed out is back with its owner
_STATUS_REASON: dict[str, Reason] = {
    "CONSUMED": "already_used", "EXPIRE": "expired", "GIFTING": "gifting", "DELETE": "deleted",
    "UNAVAILABLE": "unavailable", "GIFT_SUCC": "invalid_code",  # given away: not theirs now
}
_REASONS = frozenset(Reason.__args__)  # type: ignore[attr-defined]
_PLAIN = re.compile(r"[0-9A-Za-z_-]{1,40}")


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


_VALUE_FIELDS = {"CASH": ("reduce_cost", "least_cost"), "DISCOUNT": ("discount",),
                 "GIFT": ("gift",), "GROUPON": ("deal_detail",),
                 "GENERAL_COUPON": ("default_detail",),
                 "MEMBER_CARD": ("prerogative", "supply_bonus", "supply_balance")}


def looks_encrypted(scanned: str) -> bool:
    if _PLAIN.fullmatch(scanned) and len(scanned) < 24:
        return False
    try:
        raw = base64.b64decode(scanned, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) >= 16 and len(raw) % 16 == 0


class CardBackend(Protocol):
    """What the engine needs of a backend: the WeChat card API client (wechat_card.py) and the
    WeChat Pay merchant-coupon backend (busifavor.py) both provide it."""

    def decrypt(self, encrypt_code: str) -> str: ...
    def get_code(self, code: str, card_id: str | None = None, *,
                 check_consume: bool = True) -> CodeInfo: ...
    def get_card(self, card_id: str) -> dict[str, Any]: ...
    def consume(self, code: str, card_id: str | None = None, *, request_no: str) -> str: ...
    def close(self) -> None: ...


class Engine:
    """One lane's engine. Give each thread its own Journal connection and client."""

    def __init__(self, journal: jr.Journal, client: CardBackend | WeChatCardClient,
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

    def request_no(self, entry_id: int) -> str:
        return f"{self._request_prefix}-{entry_id}"

    # --- redeem ------------------------------------------------------------------------

    def redeem(self, scanned: str, now: float,
               origin: dict[str, Any] | None = None) -> Verdict:
        mode = self.config.decrypt
        encrypted = mode == "always" or (mode == "auto" and looks_encrypted(scanned))
        try:
            # a plain code is known now: the unique index covers it from the first write
            entry = self.journal.begin(scanned, self.config.lane, now,
                                       code=None if encrypted else scanned, origin=origin)
        except jr.InFlight:
            log.info("redeem %s: already in progress", tail(scanned))
            return Verdict("refused", "in_progress", tail(scanned))
        except sqlite3.Error as e:  # disk full, I/O error: nothing written, nothing sent
            log.error("journal write failed before %s: %s", tail(scanned), e)
            return Verdict("refused", "unknown", tail(scanned))
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

    def _run(self, eid: int, scanned: str, encrypted: bool, now: float) -> Verdict:
        code = scanned
        if encrypted:
            self.journal.note(eid, "decrypt_sent", now)
            self._hook("decrypt_sent")
            try:
                code = self.client.decrypt(scanned)
                self.journal.set_code(eid, code, now)
            except jr.InFlight:
                return self._close(eid, "received", now, "refused", "in_progress")
            except WeChatError as e:
                return self._close(eid, "received", now, *_refusal(e))
        self.journal.note(eid, "get_sent", now)
        self._hook("get_sent")
        try:
            info = self._get_code(code)
            if info.status == "CONSUMED":
                return self._close(eid, "received", now, "refused", "already_used")
            card = self.client.get_card(info.card_id)
        except CardUnavailable:
            return self._close(eid, "received", now, "refused", self._why_unavailable(code))
        except WeChatError as e:
            return self._close(eid, "received", now, *_refusal(e))
        detail = describe(card)
        refusal = self._check(info, card, now)
        if refusal is not None:
            return self._close(eid, "received", now, "refused", refusal, detail)
        if detail["card_type"] == "MEMBER_CARD":
            return self._close(eid, "received", now, "identified", None, detail)
        self.journal.advance(eid, "received", "checked", now, detail=detail)
        self._hook("checked")
        self.journal.advance(eid, "checked", "consume_sent", now)
        self._hook("consume_sent")
        try:
            self.client.consume(code, info.card_id, request_no=self.request_no(eid))
        except OutcomeUnknown as e:
            return self._unknown(eid, code, now, e)
        except AlreadyConsumed:
            return self._close(eid, "consume_sent", now, "refused", "already_used", detail)
        except CardUnavailable:
            return self._close(eid, "consume_sent", now, "refused", "unavailable", detail)
        except NotInTimeWindow:
            return self._close(eid, "consume_sent", now, "refused", "not_yet_valid", detail)
        except WeChatError as e:
            # refused before acting (token, quota, unreachable): nothing was consumed
            return self._close(eid, "consume_sent", now, *_refusal(e), detail)
        self._hook("consume_replied")
        try:
            return self._close(eid, "consume_sent", now, "accepted", None, detail)
        except jr.StaleState:
            # reconcile closed it while our consume was out (settle_after_s set too short):
            # the reply is the truth, and the books must show the consume
            entry = self.journal.correct(eid, "accepted", now, why="consume reply after reconcile")
            log.error("consume %s: accepted after reconcile had closed the entry", tail(code))
            return self._verdict(entry)

    def _journal_failed(self, eid: int, scanned: str, e: sqlite3.Error) -> Verdict:
        """A journal write failed mid-way. Safe, because each write precedes its network call:
        the last state that did reach the disk says whether a consume may have been sent."""
        log.error("journal write failed for %s: %s", tail(scanned), e)
        try:
            sent = self.journal.get(eid).state in ("consume_sent", "unknown")
        except sqlite3.Error:
            sent = True  # cannot tell: assume the worst
        return Verdict("verify_manually" if sent else "refused", "unknown", tail(scanned), eid)

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
            return _STATUS_REASON.get(info.status, "unknown")
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
        if sub is not None and sub != cfg.sub_merchant_id:
            return "not_this_merchant"
        return None

    def _why_unavailable(self, code: str) -> Reason:
        """40127 covers deleted, gifting, unavailable and expired: ask which (read-only)."""
        try:
            status = self.client.get_code(code, check_consume=False).status
        except WeChatError:
            return "unavailable"
        return _STATUS_REASON.get(status, "unavailable")

    def _unknown(self, eid: int, code: str, now: float, e: OutcomeUnknown) -> Verdict:
        self.journal.advance(eid, "consume_sent", "unknown", now, reason="unknown")
        self._hook("unknown")
        log.warning("consume %s: outcome unknown (%s)", tail(code), e)
        if self.config.verify_unknown:
            cause: Reason = "busy" if isinstance(e.cause, Busy) else \
                "offline" if isinstance(e.cause, httpx.TransportError) else "unknown"
            settled = self._settle(eid, "unknown", code, now, may_be_in_flight=not e.settled,
                                   not_applied=cause)
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

    def reconcile(self, now: float, *, settle_after_s: float = 60.0) -> list[Verdict]:
        """Settle every unfinished entry (after a crash or a lost reply). Never consumes.

        settle_after_s must exceed the client's timeout: younger entries may still be in flight.
        """
        out: list[Verdict] = []
        for entry in self.journal.entries(jr.ACTIVE):
            try:
                if entry.state in ("received", "checked"):
                    # consume_sent is written before any consume: none was sent for this one
                    out.append(self._verdict(self.journal.advance(
                        entry.id, entry.state, "done", now, outcome="abandoned",
                        reason="interrupted", step="reconciled")))
                    continue
                if entry.code is None:
                    continue
                sent_at = max((s.at for s in self.journal.steps(entry.id)
                               if s.step == "consume_sent"), default=entry.updated)
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
                may_be_in_flight: bool, not_applied: Reason = "unknown") -> Verdict | None:
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
            _STATUS_REASON.get(info.status, "unknown")
        entry = self.journal.advance(eid, state, "done", now, outcome="not_consumed",
                                     reason=reason, step="reconciled")
        return self._verdict(entry)

    # --- helpers -----------------------------------------------------------------------

    def _close(self, eid: int, state: str, now: float, outcome: str, reason: str | None,
               detail: dict[str, Any] | None = None) -> Verdict:
        entry = self.journal.advance(eid, state, "done", now, outcome=outcome, reason=reason,
                                     detail=detail)
        self._hook("done")
        return self._verdict(entry)

    def _verdict(self, e: jr.Entry) -> Verdict:
        d = e.detail
        code_tail = tail(e.code or e.scanned)
        card = {"card_id": d.get("card_id"), "title": d.get("title"),
                "card_type": d.get("card_type"), "value": d.get("value", {})}
        if e.state != "done":
            return Verdict("verify_manually", "unknown", code_tail, e.id, **card)
        if e.outcome in ("not_consumed", "abandoned"):
            # nothing was consumed; the cashier may scan again (which checks again)
            return Verdict("refused", e.reason if e.reason in _REASONS else "unknown",  # type: ignore[arg-type]
                           code_tail, e.id, **card)
        return Verdict(e.outcome, e.reason or None, code_tail, e.id, **card)  # type: ignore[arg-type]


def describe(card: dict[str, Any]) -> dict[str, Any]:
    """Title, type and value fields of a card/get `card` object (stored in the journal)."""
    ctype = card["card_type"]
    section = card[ctype.lower()]
    base = section.get("base_info", {})
    value = {k: section[k] for k in _VALUE_FIELDS.get(ctype, ()) if k in section}
    return {"card_id": base.get("id"), "title": base.get("title"), "card_type": ctype,
            "value": value}


def _refusal(e: WeChatError) -> tuple[Outcome, Reason]:
    """The verdict for an error that left the code untouched."""
    if isinstance(e, Offline):
        return "offline", "offline"
    if isinstance(e, Busy | QuotaExceeded):
        return "refused", "busy"
    if isinstance(e, InvalidCode):
        return "refused", "invalid_code"
    if isinstance(e, AlreadyConsumed):
        return "refused", "already_used"
    if isinstance(e, NotInTimeWindow):
        return "refused", "not_yet_valid"
    return "refused", "unknown"  # token, quota-free API errors, unreadable replies
