"""One receipt's points credited to one member, exactly once (card/membercard/updateuser).

Rules this module keeps:
- Order: ledger `planned` -> member_info (the points now: `before`) -> the amount (the card's
  rule; a refund takes back at most what this journal credited the member, and never more than
  the member has) -> ledger `sent` (before, points) -> add_bonus -> ledger `done`. Each write
  is committed before the call it announces; `hook(step)` runs right after each write (tests
  kill the process there).
- add_bonus is not idempotent, so it is never sent again blindly. A lost or unreadable reply
  (OutcomeUnknown), or a `sent` row found after a crash, is settled by reading member_info:
  before + points -> credited; before -> not landed: a new attempt (only once the request is
  known to be finished: a reply, a closed connection, or `settle_after_s` since it was sent);
  anything else -> `unknown` (verify manually: the card's record shows the receipt's
  record_bonus text), logged, never retried. The read cannot tell our add from another
  channel's (the member spending points in the merchant's mall, another store): the card API
  has no read of the bonus record (userinfo/get gives the total only; the record goes to the
  merchant's event push). So the read is trusted only within TRUST_S of the send, when a
  coincidence of exactly this amount is not to be expected; a `sent` row settled later (hostd
  down a long time) goes to `unknown`, a person, whatever the points say: never a re-send (a
  double credit) nor a "credited" guess. reconcile() settles `sent` rows before it
  credits `planned` ones, so its own credits never blur that check.
- A failure before anything was sent (offline, busy reading the points) leaves the row
  `planned` for reconcile() to take up again; a refusal that no retry fixes (card not
  NORMAL, a rule that cannot be applied, a setup error) closes it `not_credited` with why.
- A void (detail.void_of: the sale's row) takes back what that sale's credit gave, no more
  than this journal's net credits to the member nor the member's points, and no rule is read;
  it waits (pending) while the sale's own credit is not settled, and takes nothing from a
  sale that earned nothing.
- record_bonus names the receipt (14 characters at most, the platform's limit): "小票" (a
  void: "作废") and the receipt digest's first 8 hex digits, so support can match the
  member's card record to the journal row.
- Member codes in logs are their last 4 characters only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hexiao.hostd.backends.base import Offline, OutcomeUnknown, WeChatError
from hexiao.hostd.journal import StaleState
from hexiao.hostd.members.ledger import Credit, Ledger
from hexiao.hostd.members.rule import RuleError, from_card
from hexiao.hostd.redeem import tail

log = logging.getLogger("hexiao.points")
MAX_ATTEMPTS = 3  # add_bonus sent at most this often for one receipt (each one verified)
TRUST_S = 600.0  # a points read this long after the add went out no longer settles it alone


class MemberBackend(Protocol):
    """What crediting needs of the card API client (wechat_card.WeChatCardClient)."""

    def get_card(self, card_id: str) -> dict[str, Any]: ...
    def member_info(self, code: str, card_id: str) -> Any: ...
    def add_bonus(self, code: str, card_id: str, add: int, record: str) -> int: ...


@dataclass(frozen=True)
class Result:
    """What one credit came to: `points` added (negative: taken back), or why not."""
    credit: Credit
    outcome: str  # credited | not_credited | nothing | pending | unknown
    points: int = 0
    bonus: int | None = None  # the member's points after it, when known
    why: str = ""


def record_text(receipt: str) -> str:
    """record_bonus for a receipt (a void's row: the sale it takes back): at most 14
    characters."""
    word = "作废" if receipt.startswith("void|") else "小票"
    return f"{word}{receipt.rpartition('|')[2][:8]}"


class Crediter:
    def __init__(self, ledger: Ledger, client: MemberBackend, *,
                 hook: Callable[[str], None] | None = None, trust_s: float = TRUST_S) -> None:
        self.ledger, self.client, self.trust_s = ledger, client, trust_s
        self._hook = hook or (lambda step: None)

    def credit(self, c: Credit, now: float) -> Result:
        """Take a `planned` credit as far as it goes now."""
        while True:
            try:
                return self._attempt(c, now)
            except _Again as again:
                c = again.credit  # verified not landed: one more attempt (bounded)
            except StaleState:
                return self._result(self.ledger.get(c.id))  # someone else moved it

    def _attempt(self, c: Credit, now: float) -> Result:
        void = c.detail.get("void_of")
        try:
            rule = None if void is not None else from_card(self.client.get_card(c.card_id))
            info = self.client.member_info(c.code, c.card_id)
        except RuleError as e:
            return self._close(c, "planned", now, "not_credited", f"rule: {e}")
        except Offline as e:
            log.warning("points %s: backend unreachable, retried later (%s)", tail(c.code), e)
            return Result(c, "pending", why="offline")
        except WeChatError as e:
            if e.errcode in (None, -1):  # busy or an unreadable reply: nothing sent, retry
                return Result(c, "pending", why=str(e))
            return self._close(c, "planned", now, "not_credited", f"errcode {e.errcode}")
        if info.status != "NORMAL":
            return self._close(c, "planned", now, "not_credited", f"card {info.status}")
        if void is not None:
            sale = self.ledger.get(int(void))
            if sale.state != "done":
                return Result(c, "pending", why="the voided sale's credit is not settled")
            if sale.outcome != "credited" or not sale.points or sale.points < 0:
                return self._close(c, "planned", now, "nothing", "the sale earned no points")
            points = self._taken_back(c, sale.points, info.bonus)
        elif rule is None:
            return self._close(c, "planned", now, "nothing", "card has no bonus rule")
        else:
            try:
                points = self._amount(c, rule.points(abs(c.total_fen)), info.bonus)
            except RuleError as e:
                return self._close(c, "planned", now, "not_credited", f"rule: {e}")
        if points == 0:
            return self._close(c, "planned", now, "nothing", "0 points")
        if c.attempts >= MAX_ATTEMPTS:
            return self._close(c, "planned", now, "not_credited", "too many attempts")
        c = self.ledger.advance(c.id, "planned", "sent", now, points=points,
                                before_bonus=info.bonus)
        self._hook("sent")
        try:
            result = self.client.add_bonus(c.code, c.card_id, points, record_text(c.receipt))
        except OutcomeUnknown as e:
            log.warning("points %s: add_bonus outcome unknown (%s): reading the points",
                        tail(c.code), e)
            self._hook("unknown")
            return self.settle(c, now, in_flight=not e.settled)
        except WeChatError as e:  # refused before acting (token, card state): nothing added
            return self._close(c, "sent", now, "not_credited", _why(e))
        self._hook("replied")
        done = self.ledger.advance(c.id, "sent", "done", now, outcome="credited",
                                   result_bonus=result)
        self._hook("done")
        log.info("points %s: %+d (now %d)", tail(c.code), points, result)
        return self._result(done)

    def _amount(self, c: Credit, points: int, bonus: int) -> int:
        if c.total_fen >= 0:
            return points
        return self._taken_back(c, points, bonus)

    def _taken_back(self, c: Credit, points: int, bonus: int) -> int:
        # a refund or a void takes back what was given here, never more, never below 0 points
        return -min(points, max(0, self.ledger.net_credited(c.code, exclude=c.id)), bonus)

    def settle(self, c: Credit, now: float, *, in_flight: bool = False) -> Result:
        """A `sent` credit whose add may or may not have landed: read the points (never add)."""
        try:
            info = self.client.member_info(c.code, c.card_id)
        except WeChatError as e:
            log.warning("points %s: cannot read the points yet (%s)", tail(c.code), e)
            return Result(c, "pending", why="verify")
        assert c.before_bonus is not None and c.points is not None
        if now - c.updated > self.trust_s:
            log.error("points %s: receipt %s: points %d (were %d, %+d sent) read %.0f s after "
                      "the add: another channel may have moved them; verify manually (the "
                      "card's record shows %s)", tail(c.code), c.receipt, info.bonus,
                      c.before_bonus, c.points, now - c.updated, record_text(c.receipt))
            unknown = self.ledger.advance(c.id, "sent", "unknown", now, result_bonus=info.bonus,
                                          reason="read too late to tell")
            self._hook("unknown_final")
            return self._result(unknown)
        if info.bonus == c.before_bonus + c.points:
            done = self.ledger.advance(c.id, "sent", "done", now, outcome="credited",
                                       result_bonus=info.bonus, step="reconciled")
            self._hook("done")
            return self._result(done)
        if info.bonus == c.before_bonus:
            if in_flight:
                return Result(c, "pending", why="may still land")
            again = self.ledger.advance(c.id, "sent", "planned", now, step="not_landed")
            self._hook("not_landed")
            raise _Again(again)
        log.error("points %s: receipt %s: points were %d, now %d, expected %d: verify manually "
                  "(the card's record shows %s)", tail(c.code), c.receipt, c.before_bonus,
                  info.bonus, c.before_bonus + c.points, record_text(c.receipt))
        unknown = self.ledger.advance(c.id, "sent", "unknown", now, reason="points moved",
                                      result_bonus=info.bonus)
        self._hook("unknown_final")
        return self._result(unknown)

    def reconcile(self, now: float, *, settle_after_s: float = 60.0,
                  restart: bool = False) -> list[Result]:
        """Take up what a crash or a lost reply left: `planned` rows are credited (nothing was
        sent for their current attempt), `sent` rows are settled by a read, never re-sent
        unseen. A row younger than settle_after_s is left to its worker (a claim's thread, or
        an add still in flight), unless restart: no worker runs. Two takers of one row meet
        at the compare-and-set to `sent`: one sends, the other stops."""
        out = []
        # `sent` rows first: their check is the points read before they went out, which a
        # planned row of the same member credited now would move
        rows = self.ledger.entries(("planned", "sent"))
        for c in sorted(rows, key=lambda c: c.state != "sent"):
            if not restart and now - c.updated < settle_after_s:
                continue
            try:
                if c.state == "planned":
                    out.append(self.credit(c, now))
                else:
                    try:
                        out.append(self.settle(c, now))
                    except _Again as again:
                        out.append(self.credit(again.credit, now))
            except StaleState:
                continue
        return out

    def _close(self, c: Credit, state: str, now: float, outcome: str, why: str) -> Result:
        if outcome == "not_credited":
            log.warning("points %s: receipt %s not credited: %s", tail(c.code), c.receipt, why)
        done = self.ledger.advance(c.id, state, "done", now, outcome=outcome, reason=why)
        self._hook("done")
        return self._result(done)

    def _result(self, c: Credit) -> Result:
        if c.state == "done" and c.outcome == "credited":
            return Result(c, "credited", c.points or 0, c.result_bonus)
        if c.state == "done":
            return Result(c, c.outcome or "not_credited", why=c.reason or "")
        if c.state == "unknown":
            return Result(c, "unknown", why=c.reason or "")
        return Result(c, "pending")


class _Again(Exception):
    def __init__(self, credit: Credit) -> None:
        self.credit = credit


def _why(e: WeChatError) -> str:
    return f"errcode {e.errcode}" if e.errcode is not None else type(e).__name__
