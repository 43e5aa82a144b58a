"""Points at the till: a member card scanned on a lane earns the points of that lane's next
receipt, as the receipt tap sees it. No POS change.

Rules this module keeps:
- A member card's "identified" verdict ties the member to its lane's current sale (a later
  scan on that lane replaces it). The lane's next receipt with a readable total credits the
  member once (credit.py: write-ahead, never repeated blindly) and ends the tie; a negative
  total (a refund) takes back, once, at most what this journal credited that member.
- A void the tap recognises (receipt.find_void) takes back, once, what the sale it voids
  earned, whoever is tied to the lane now. The sale is the lane's receipt that printed the
  number the void names (原单号 / Orig. receipt), else, when the void names none, the lane's
  newest receipt of the void's total within `void_window_s` (the last RECENT receipts of each
  lane are remembered; after a restart, the ledger's member sales); no such receipt: nothing,
  logged. The reversal is a ledger row keyed by the sale (ledger.py), so a void printed twice
  takes back once. A voided sale no member was credited for is barred in the ledger, so its
  QR can no longer be claimed (claim.py answers 410 voided).
- A receipt with no member tied to its lane credits nothing. A receipt whose total cannot be
  read credits nothing and is logged; the member stays tied for the sale's real receipt. A
  member with no receipt within `member_ttl_s` is dropped with a log line.
- The tap and the lanes only hand events over (member_scanned(), receipts()); the work runs
  on this service's own thread, with its own journal connection and backend client, so a slow
  backend never holds a lane's worker or the printer.
- The device is told the outcome with a verdict quoting the member card's scan_id (outcome
  info, a message only; SPEC §6.6), its text within the 48-byte line: "积分 +12 共132 …6182".
  A device shows an answer to an already answered scan as a late verdict: no SPEC change.
- reconcile() (at start with restart=True, then every `reconcile_every_s`) takes up what a
  crash or a lost reply left in the ledger.
- Member codes in logs and device texts are their last 4 characters only.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from hexiao.hostd.journal import Journal
from hexiao.hostd.lanes.verdicts import TEXT_MAX, fit
from hexiao.hostd.members.credit import Crediter, Result
from hexiao.hostd.members.ledger import Duplicate, Ledger, summary
from hexiao.hostd.redeem import Verdict, tail
from hexiao.hostd.tap.receipt import Receipt
from hexiao.protocol import messages

log = logging.getLogger("hexiao.points")
MEMBER_TTL_S = 600.0  # a member scanned and no receipt within this: dropped
VOID_WINDOW_S = 1800.0  # a void naming no receipt number: the lane's sale within this
RECENT = 50  # receipts a lane remembers for the voids that name no number
_LED = {"credited": "green", "nothing": "off", "not_credited": "red", "unknown": "amber",
        "pending": "amber"}


@dataclass(frozen=True)
class Member:
    code: str
    card_id: str
    device: str
    scan_id: int
    at: float


def receipt_key(lane: str, rc: Receipt) -> str:
    """One receipt's identity: its lane and the first 12 bytes of its digest, as its QR token
    carries them (so the till and a QR claim credit one row: claim.py), or of the text's
    digest when the tap gave none."""
    digest = rc.digest or hashlib.sha256("\n".join(rc.lines).encode()).hexdigest()
    return f"{lane}|{digest[:24]}"


def to_fen(total: Decimal | None) -> int | None:
    """A receipt total in yuan as fen; None if it is absent or not whole fen."""
    if total is None:
        return None
    fen = total * 100
    return int(fen) if fen == fen.to_integral_value() else None


def points_message(member: Member, r: Result) -> dict[str, Any]:
    """The verdict that tells the cashier what the receipt earned."""
    t = tail(member.code)
    if r.outcome == "credited" and r.points >= 0:
        text = f"积分 +{r.points} 共{r.bonus}"
    elif r.outcome == "credited":
        text = f"积分退回 {r.points} 共{r.bonus}"
    elif r.outcome == "nothing":
        text = "本单无积分 no points"
    elif r.outcome in ("unknown", "pending"):
        text = "积分待核实 points: verify"
    else:
        text = f"积分未加 {r.why}"
    led = _LED.get(r.outcome, "red")
    return {"type": "verdict", "scan_id": member.scan_id,
            "outcome": messages.OUTCOMES.index("info"),
            "beep": messages.BEEPS.index("ok" if r.outcome == "credited" else "none"),
            "led": messages.LEDS.index(led),
            "text": f"{fit(text, TEXT_MAX - len(t.encode()) - 1).rstrip()} {t}"}


class PointsService:
    """See the module rules. start() / stop(); member_scanned() and receipts() hand over."""

    def __init__(self, journal_path: str | Path, client_factory: Callable[[], Any], *,
                 tell: Callable[[str, dict[str, Any]], None] | None = None,
                 member_ttl_s: float = MEMBER_TTL_S, void_window_s: float = VOID_WINDOW_S,
                 settle_after_s: float = 60.0,
                 reconcile_every_s: float = 60.0, clock: Callable[[], float] = time.time,
                 hook: Callable[[str], None] | None = None) -> None:
        self.journal_path, self._client_factory = Path(journal_path), client_factory
        self._tell = tell or (lambda device, msg: None)
        self.member_ttl_s, self.settle_after_s = member_ttl_s, settle_after_s
        self.void_window_s = void_window_s
        self.reconcile_every_s, self._clock, self._hook = reconcile_every_s, clock, hook
        self.members: dict[str, Member] = {}  # lane -> the member of its current sale
        # lane -> its last receipts: (at, number, total fen, receipt key), for voids
        self._recent: dict[str, deque[tuple[float, str, int | None, str]]] = {}
        self.results: list[Result] = []  # what each credit came to (the last 100)
        self._jobs: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ledger: Ledger | None = None
        self._crediter: Crediter | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, restart: bool = True) -> PointsService:
        self._thread = threading.Thread(target=self._run, args=(restart,),
                                        name="hexiao-points", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until every event handed over so far is done (tests, the demo)."""
        done = threading.Event()
        self._jobs.put(("call", done.set))
        if not done.wait(timeout):
            raise TimeoutError("the points service did not finish its work")

    def state(self) -> dict[str, Any]:
        """For `status` and the web page: today's credits (since local midnight), what is
        pending or needs a person (ledger.summary), and the members waiting for a receipt."""
        now = time.localtime(self._clock())
        midnight = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 0, 0, 0, 0, 0, -1))
        return {**summary(self.journal_path, midnight), "running": self.alive(),
                "waiting": {lane: tail(m.code) for lane, m in list(self.members.items())}}

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- hand-overs (any thread) ----------------------------------------------------------

    def member_scanned(self, device: str, lane: str, v: Verdict) -> None:
        """A verdict from a lane: a member card identified there joins that lane's sale."""
        if v.outcome == "identified" and v.card_type == "MEMBER_CARD" and v.entry_id:
            self._jobs.put(("member", (device, lane, v.entry_id, self._clock())))

    def receipts(self, lane: str, receipts: Iterable[Receipt]) -> None:
        """Receipts the tap finished on `lane`'s printer, in printing order."""
        items = [rc for rc in receipts if rc.printed]
        if items:
            self._jobs.put(("receipts", (lane, items, self._clock())))

    # -- the worker -----------------------------------------------------------------------

    def _run(self, restart: bool) -> None:
        client = self._client_factory()
        with Journal(self.journal_path) as journal:
            self._ledger = Ledger(journal)
            self._crediter = Crediter(self._ledger, client, hook=self._hook)
            try:
                self._loop(journal, restart)
            finally:
                self._ledger.close()
                close = getattr(client, "close", None)
                if close is not None:
                    close()

    def _loop(self, journal: Journal, restart: bool) -> None:
        self._reconcile(restart=restart)
        next_reconcile = time.monotonic() + self.reconcile_every_s
        while True:
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                job = ("tick", None)
            if job is None:
                return
            kind, arg = job
            try:
                if kind == "member":
                    self._member(journal, *arg)
                elif kind == "receipts":
                    self._receipts(*arg)
                elif kind == "call":
                    arg()
                self.expire()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self.reconcile_every_s
                    self._reconcile()
            except Exception:  # one bad event must not end points for the day: logged
                log.exception("points: %s failed", kind)

    def _reconcile(self, restart: bool = False) -> None:
        assert self._crediter is not None
        for r in self._crediter.reconcile(self._clock(), settle_after_s=self.settle_after_s,
                                          restart=restart):
            self._keep(r)

    def _member(self, journal: Journal, device: str, lane: str, entry_id: int,
                at: float) -> None:
        entry = journal.get(entry_id)
        origin = journal.steps(entry_id)[0].detail
        code, card_id = entry.code, entry.detail.get("card_id")
        if not code or not card_id or not isinstance(origin.get("scan_id"), int):
            return
        self.members[lane] = Member(code, card_id, device, origin["scan_id"], at)
        log.info("points: member %s on %s, waiting for its receipt", tail(code), lane)

    def expire(self, now: float | None = None) -> list[Member]:
        """Drop members whose receipt did not come within member_ttl_s (each with a line)."""
        now = self._clock() if now is None else now
        gone = [(lane, m) for lane, m in self.members.items()
                if now - m.at > self.member_ttl_s]
        for lane, m in gone:
            del self.members[lane]
            log.warning("points: member %s on %s dropped: no receipt within %g s",
                        tail(m.code), lane, self.member_ttl_s)
        return [m for _, m in gone]

    def _receipts(self, lane: str, items: list[Receipt], at: float) -> None:
        assert self._ledger is not None and self._crediter is not None
        self.expire(at)
        for rc in items:
            if rc.void:
                self._void(lane, rc, at)
                continue
            self._recent.setdefault(lane, deque(maxlen=RECENT)).append(
                (at, rc.number, to_fen(rc.total), receipt_key(lane, rc)))
            member = self.members.get(lane)
            if member is None:
                continue  # no member scanned for this sale: nothing to credit
            fen = to_fen(rc.total)
            if fen is None:
                log.warning("points: receipt %d on %s: total unreadable, nothing credited "
                            "(member %s kept for the next receipt)", rc.index, lane,
                            tail(member.code))
                continue
            if fen == 0:
                continue
            key = receipt_key(lane, rc)
            try:
                credit = self._ledger.plan(key, lane, member.code, member.card_id, fen, at,
                                           {"device": member.device,
                                            "scan_id": member.scan_id, "number": rc.number})
            except Duplicate:
                log.info("points: receipt %s seen again: credited once only", key)
                continue
            if self._hook is not None:
                self._hook("planned")
            del self.members[lane]  # one sale per scan
            result = self._crediter.credit(credit, at)
            self._keep(result)
            self._tell(member.device, points_message(member, result))

    def _void(self, lane: str, rc: Receipt, at: float) -> None:
        assert self._ledger is not None and self._crediter is not None
        key = self._voided(lane, rc, at)
        if key is None:
            log.info("points: void receipt %d on %s (of %s): no such sale, nothing taken back",
                     rc.index, lane, rc.void_of or f"total {rc.total}")
            return
        sale, void_key = self._ledger.by_receipt(key), receipt_key(lane, rc)
        if sale is None:  # nobody was credited for it: its QR must not be claimed now
            try:
                self._ledger.bar(key, lane, abs(to_fen(rc.total) or 0), at, "voided",
                                 {"voided_by": void_key})
                log.info("points: sale %s voided with no member: its QR cannot be claimed", key)
            except Duplicate:
                pass
            return
        if sale.total_fen <= 0 or not sale.code:
            return  # a refund, or a sale barred already
        try:
            credit = self._ledger.plan(f"void|{sale.receipt}", lane, sale.code, sale.card_id,
                                       -sale.total_fen, at,
                                       {"void_of": sale.id, "number": rc.number,
                                        "void_receipt": void_key})
        except Duplicate:
            log.info("points: sale %s voided again: taken back once only", sale.receipt)
            return
        if self._hook is not None:
            self._hook("planned")
        result = self._crediter.credit(credit, at)
        self._keep(result)
        device, scan_id = sale.detail.get("device"), sale.detail.get("scan_id")
        if isinstance(device, str) and isinstance(scan_id, int):  # the sale's own scan
            self._tell(device, points_message(Member(sale.code, sale.card_id, device, scan_id,
                                                     at), result))

    def _voided(self, lane: str, rc: Receipt, at: float) -> str | None:
        """The receipt key of the sale a void voids (module rules), or None."""
        assert self._ledger is not None
        recent = list(self._recent.get(lane, ()))
        if rc.void_of:
            row = self._ledger.sale(lane, number=rc.void_of)
            if row is not None:
                return row.receipt
            return next((k for _, n, _, k in reversed(recent) if n == rc.void_of), None)
        fen = to_fen(rc.total)
        if fen is None or fen == 0:
            return None
        since = at - self.void_window_s
        key = next((k for t, _, f, k in reversed(recent) if t >= since and f == abs(fen)), None)
        if key is None:
            row = self._ledger.sale(lane, since=since, total_fen=abs(fen))
            key = None if row is None else row.receipt
        return key

    def _keep(self, r: Result) -> None:
        self.results.append(r)
        del self.results[:-100]
