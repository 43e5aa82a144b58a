"""`hexiao demo`: a whole scan-mode lane on this machine, shown step by step.

The lane (tools/demo/lane.py): the firmware on the sim board under MicroPython, its link on a pty,
`hexiao-hostd` (a subprocess), the WeChat card API simulator on loopback and a fake POS showing the
keystrokes it receives. Steps: products pass through, a coupon is redeemed with its value (and
typed by the CASH macro), the same coupon scanned again is not used twice, an invalid code is
refused, a busy backend is handled, hostd is SIGKILLed mid-redemption and reconciled after
restart, a Chinese receipt is printed through the receipt tap (its text and total as the tap read
them, the printer's bytes: the original intact plus one QR block, the QR read back, its token
verified), a member earning points (a member card scanned, a receipt printed through hostd's own
tap, the points the card API's userinfo/get shows before and after, the cashier's display), a
second receipt's QR claimed for points through hostd's claim API and a second claim of it
refused, counters.
Each step checks what it shows. The link-layer attacks (corrupted, forged, replayed frames) are
not repeated here: tests/test_link.py and tests/test_pty_link.py show them.

Rules this module keeps:
- The default output is for a shop: what the cashier, the till, the printer and the coupon
  server saw, in plain words, every line at most 80 columns (a Chinese character takes two).
  The engineers' detail (AIM ids, pids, journal steps, ESC/POS commands, counters) is printed
  only with --detail (-v), indented under the line it explains.
- Colour marks verdicts only (green accepted, red refused, yellow offline or check by hand), and
  only on a terminal without NO_COLOR set (present, as hostd's logs read it).
- --json prints one event per line; its events and fields are a script's interface: fields may
  be added, never renamed or removed. Progress lines are for people and never in --json.
- A wait of seconds is announced by a line before it.
- --backend-url may be any card-API server: the demo talks to it only through hostd and never
  calls the simulator's /_sim/* there; what needs the simulator (fault injection, consume
  counts) is said to be not shown, never guessed. --appid and --secret-file are its
  credentials; the secret file is checked as hostd checks its own (0600, ours) and never read
  into the demo's output.

`--scenario FILE`: your own steps, one per line (`#` starts a comment):
    product DIGITS          an EAN/UPC scan (]E0); the POS must show DIGITS then Enter
    coupon CODE [OUTCOME]   a QR scan (]Q1); waits for the device's verdict, checks OUTCOME if given
                            (accepted, refused, offline, identified, verify_manually)
    scan LINE               a raw scanner line with its AIM id, e.g. ]C0ABC-123; not checked
                            (the next product step shows what the POS got from it)
    wait SECONDS            pause
    busy on|off             the simulator answers every API call "system busy" (errcode -1)
    kill-hostd              SIGKILL hostd, restart it, wait for the device's new session
    receipt [YUAN ...]      the POS prints a receipt through the tap (items at these prices, e.g.
                            12.50; default: the demo's four), checked as in the built-in step
Exit status: 0 every step saw what it should; 1 a step did not (the reason is printed); 2 bad
options or scenario file; 3 the lane could not be set up.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import IO, Any

import click
import httpx
from hexiao.hostd.config.types import ConfigError, read_secret
from hexiao.hostd.tap.inject import TokenError, TokenInfo, remove_blocks, verify_token
from hexiao.hostd.tap.proxy import ConnRecord
from hexiao.hostd.tap.receipt import Receipt
from hexiao.tools import micropython
from hexiao.tools.demo.lane import (
    DEVICE_ID,
    DLE_EOT_1,
    PRINTER_STATUS,
    SETTLE_AFTER_S,
    TAP_CONTENT,
    Lane,
    SetupError,
    qr_stored,
    receipt_bytes,
)

EXIT_OK, EXIT_FAILED, EXIT_BAD, EXIT_SETUP = 0, 1, 2, 3
PRODUCTS = ("5901234123457", "4006381333931")
CASH, DISCOUNT, GROUPON, UNKNOWN = "287463512093", "391827364510", "640218375912", "999999999999"
MEMBER, MEMBER_CARD = "829304756182", "pHexiaoSimMemberCardxxxxxxxxx"  # the example seed's
CLAIMED = (("面包", "8.80"), ("牛奶 1L", "12.00"))  # the receipt whose QR is claimed
OUTCOMES = ("accepted", "refused", "offline", "identified", "verify_manually", "info")
SHOP = "好又多超市 (天河店)"
ITEMS = (("可口可乐 330ml ×2", "7.00"), ("康师傅红烧牛肉面", "4.50"), ("农夫山泉 550ml", "2.00"),
         ("鸡蛋 (10枚)", "12.50"))
YUAN = re.compile(r"\d{1,6}\.\d{2}")
APPID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
URL = re.compile(r"https?://\S+")  # as hostd's config checks base_url
WIDTH = 80  # columns of the default output
HOSTD = "the in-store computer"
# a verdict in a shop's words, and its colour on a terminal
SAID = {"accepted": ("accepted", "green"), "refused": ("refused", "red"),
        "offline": ("not checked: offline", "yellow"), "identified": ("recognised", "cyan"),
        "verify_manually": ("check by hand", "yellow"), "info": ("note", None)}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StepFailed(Exception):
    """A step did not see what it should have; the message says what."""


def cells(text: str) -> int:
    """Terminal columns of `text`: East Asian wide characters take two, escapes none."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in ANSI.sub("", text))


def fit(text: str, width: int = WIDTH) -> list[str]:
    """`text`'s lines, each wrapped at spaces to `width` columns; a continuation keeps the
    line's indent plus two. A word wider than the line (a URL in --detail) stays whole."""
    out: list[str] = []
    for line in text.split("\n"):
        if cells(line) <= width:
            out.append(line)
            continue
        body = line.lstrip(" ")
        indent = line[:len(line) - len(body)]
        cur, more = indent, indent + "  "
        for word in body.split(" "):
            if cur.strip() and cells(cur) + 1 + cells(word) > width:
                out.append(cur)
                cur = more + word
            else:
                cur = cur + (" " if cur.strip() else "") + word
        out.append(cur)
    return out


def wants_colour(stream: IO[str]) -> bool:
    """Colour only on a terminal, and not when NO_COLOR is set (https://no-color.org)."""
    return "NO_COLOR" not in os.environ and stream.isatty()


class Narrator:
    """Shop words for a person (with the engineers' detail under them if `detail`), or one
    JSON object per line for a machine."""

    def __init__(self, as_json: bool, detail: bool = False, colour: bool | None = None) -> None:
        self.as_json, self.detail = as_json, detail
        self.colour = wants_colour(sys.stdout) if colour is None else colour

    def _out(self, text: str, tech: str = "") -> None:
        for line in fit(text) if text else []:
            click.echo(line, color=self.colour)
        if self.detail and tech:
            for line in fit(tech):
                click.echo(self.style(line, dim=True), color=self.colour)

    def emit(self, event: str, text: str = "", /, *, tech: str = "", **fields: Any) -> None:
        """An event: its fields in --json, else `text` (and `tech` with --detail)."""
        if self.as_json:
            click.echo(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str))
        else:
            self._out(text, tech)

    def line(self, text: str, tech: str = "") -> None:
        if not self.as_json:
            self._out(text, tech)

    def progress(self, text: str) -> None:
        """Said before a wait of seconds, so that nobody thinks it hangs."""
        if not self.as_json:
            self._out(text + "…")

    def title(self, text: str) -> None:
        if not self.as_json:
            for line in fit(text):
                click.echo(self.style(line, bold=True), color=self.colour)

    def style(self, text: str, fg: str | None = None, **kw: Any) -> str:
        return click.style(text, fg=fg, **kw) if self.colour and (fg or kw) else text

    def outcome(self, outcome: str) -> str:
        """A verdict in a shop's words, coloured on a terminal."""
        said, fg = SAID.get(outcome, (outcome, None))
        return self.style(said, fg, bold=True)


def _tail(code: str) -> str:
    return f"…{code[-4:]}"


def _keys(typed: str) -> str:
    """What the POS received, as a cashier would read it: ⏎ is the Enter key."""
    return typed.replace("⏎", " Enter ").replace("  ", " ").strip()


def _times(n: int) -> str:
    return {0: "not at all", 1: "once", 2: "twice"}.get(n, f"{n} times")


class Run:
    """The lane plus what the steps track: the device numbers coupon scans 1, 2, ..."""

    def __init__(self, lane: Lane, say: Narrator) -> None:
        self.lane, self.say = lane, say
        self.sid = 0
        self.raw_scans = False  # raw scans sent whose POS output is not shown yet
        self.faults_ok = lane.backend_url is None

    def wait(self, pred: Callable[[], Any], what: str, **kw: Any) -> Any:
        try:
            return self.lane.wait(pred, what, **kw)
        except TimeoutError as e:
            raise StepFailed(str(e)) from None

    def product(self, digits: str) -> None:
        self.lane.scan(f"]E0{digits}".encode())
        try:
            shown = self.lane.pos_wait(digits + "⏎", self.raw_scans)
        except TimeoutError as e:
            raise StepFailed(str(e)) from None
        earlier = ""
        if self.raw_scans:  # what raw scans before this one typed, if anything
            earlier, shown = shown[:-len(digits) - 1], shown[-len(digits) - 1:]
            self.raw_scans = False
            if earlier:
                self.say.emit("pos", f"  From the scans before, the till received: "
                              f"{_keys(earlier)}", tech=f"    POS typed: {earlier}",
                              typed=earlier)
        if shown != digits + "⏎":
            raise StepFailed(f"product {digits}: the POS received {shown!r}")
        self.say.emit("product", f"  Product scanned: the till received {digits}, then Enter",
                      tech=f"    scanner ]E0{digits} → HID keystrokes → POS typed: {shown}",
                      data=digits, typed=shown)

    def raw(self, line: str) -> None:
        self.lane.scan(line.encode())
        self.raw_scans = True
        self.say.emit("scan", f"  Scanned {line[3:]} (the next product shows what the till "
                      "got from it)", tech=f"    scanner {line}: not checked", line=line)

    def coupon(self, code: str, expect: str | None = None, *, wait: bool = True,
               text_has: str | None = None, what: str = "Coupon") -> dict[str, Any]:
        self.sid += 1
        sid = self.sid
        self.lane.scan(f"]Q1{code}".encode())
        if not wait:
            return {"scan_id": sid}
        try:
            v = self.lane.verdict(sid)
        except TimeoutError as e:
            raise StepFailed(str(e)) from None
        count = self.lane.consume_count(code)
        self.say.emit("verdict", f"  {what} {_tail(code)} scanned: "
                      f"{self.say.outcome(v['outcome'])}\n    the cashier's display: {v['text']}",
                      tech=f"    scanner ]Q1{_tail(code)} → device, scan #{sid}: "
                      f"{v['outcome']}, {v['led']} LED, {v['beep']} beep",
                      scan_id=sid, code_tail=code[-4:], outcome=v["outcome"], led=v["led"],
                      beep=v["beep"], text=v["text"], consume_count=count)
        if expect is not None and v["outcome"] != expect:
            raise StepFailed(f"scan #{sid} …{code[-4:]}: {v['outcome']} “{v['text']}”, "
                             f"expected {expect}")
        if text_has is not None and text_has not in v["text"]:
            raise StepFailed(f"scan #{sid}: verdict text “{v['text']}” lacks “{text_has}”")
        return v

    def consumed(self, code: str, want: int) -> None:
        n = self.lane.consume_count(code)
        if n is None:
            self.say.line("  (Your coupon server does not say how often a coupon was used.)")
            return
        if n != want:
            raise StepFailed(f"…{code[-4:]} consumed {n} times at the backend, expected {want}")
        self.say.line(f"  The coupon server used it {_times(n)}." if n else
                      "  Nothing was used at the coupon server.",
                      f"    backend: {_tail(code)} consume_count {n}")

    def busy(self, on: bool) -> None:
        self.lane.faults(busy_rate=1.0 if on else 0.0)
        self.say.emit("fault", "  The coupon server is made busy: it answers every request "
                      "“busy”." if on else "  The coupon server is back to normal.",
                      tech=f"    simulator: busy_rate {1.0 if on else 0.0}"
                      f"{' (every API call answers errcode -1)' if on else ''}",
                      fault="busy", on=on)

    def skipped(self, step: str, what: str) -> None:
        self.say.emit("skipped", f"  Not shown with your coupon server: {what} needs the "
                      "built-in simulator.", tech="    (no /_sim/* calls with --backend-url)",
                      step=step)

    def restart_hostd(self) -> dict[str, Any]:
        try:
            self.lane.start_hostd()
        except TimeoutError as e:
            raise StepFailed(str(e)) from None
        try:
            return self.lane.session_open()
        except TimeoutError as e:
            raise StepFailed(str(e)) from None


# -- the built-in steps ---------------------------------------------------------------------


def step_session(r: Run) -> None:
    info = r.wait(r.lane.session_open, "the session")
    boot = r.wait(lambda: r.lane.device.of("boot"), "the device's boot report")[0]
    peer = info.get("peer") or {}
    r.say.emit("session", f"  The hexiao box on the lane is connected to {HOSTD} (hostd),\n"
               "  which told it how to tell products from coupons.",
               tech=f"    device {DEVICE_ID} ({peer.get('firmware')}, board {peer.get('board')})"
               f" opened a signed session with hostd (pid {r.lane.hostd.pid}); hostd pushed "
               f"its scan rules; device heap {boot.get('heap_free')} bytes free of "
               f"{r.lane.heap}",
               device=DEVICE_ID, firmware=peer.get("firmware"), board=peer.get("board"),
               heap=r.lane.heap, heap_free=boot.get("heap_free"), hostd_pid=r.lane.hostd.pid)


def step_products(r: Run) -> None:
    for digits in PRODUCTS:
        r.product(digits)
    r.say.line(f"  Products never wait for {HOSTD}: the box types them itself.")


def step_coupon(r: Run) -> None:
    v = r.coupon(CASH, "accepted", text_has="减¥20.00")
    if (v["led"], v["beep"]) != ("green", "ok"):
        raise StepFailed(f"accepted but shown {v['led']}/{v['beep']}, expected green/ok")
    try:
        typed = r.lane.pos_wait("[F9]20.00⏎")
    except TimeoutError as e:
        raise StepFailed(str(e)) from None
    if typed != "[F9]20.00⏎":
        raise StepFailed(f"the CASH macro typed {typed!r}, expected '[F9]20.00⏎'")
    r.say.emit("macro", "  The box keyed the ¥20.00 discount into the till: F9 (the till's "
               "discount key), 20.00, Enter.",
               tech=f"    CASH macro → POS typed: {typed}", typed=typed)
    r.consumed(CASH, 1)


def step_again(r: Run) -> None:
    # rescanned on this lane: green "本机已核销" (redeemed here) and how long ago, not used again
    r.coupon(CASH, "accepted", text_has="本机已核销", what="The same coupon")
    r.say.line("  It was redeemed on this till moments ago, and the display says so\n"
               "  (本机已核销: already redeemed here); it is not used a second time.")
    r.consumed(CASH, 1)


def step_invalid(r: Run) -> None:
    r.coupon(UNKNOWN, "refused", text_has="invalid code", what="Unknown code")


def step_busy(r: Run) -> None:
    if not r.faults_ok:
        r.skipped("busy", "making the coupon server busy")
        return
    r.busy(True)
    r.coupon(DISCOUNT, "refused", text_has="busy, scan again")
    r.consumed(DISCOUNT, 0)
    r.busy(False)
    r.say.line("  The cashier scans it again:")
    r.coupon(DISCOUNT, "accepted", text_has="20% off")
    r.consumed(DISCOUNT, 1)


def step_kill(r: Run) -> None:
    lane = r.lane
    if not r.faults_ok:
        r.skipped("kill", "holding the coupon server's answer back")
        return
    # the backend commits the consume and holds its reply: hostd is mid-redemption
    lane.faults(drop_after_commit={"mode": "close", "count": 1, "codes": [GROUPON],
                                   "delay_ms": 20000})
    sid = r.coupon(GROUPON, wait=False)["scan_id"]
    r.wait(lambda: lane.consume_count(GROUPON) == 1, "the backend to commit the consume")
    entry = r.wait(lambda: [e for e in lane.ctl("journal.list")
                            if e["code"] == "…" + GROUPON[-4:]], "the journal entry")[-1]
    pid = lane.kill_hostd()
    lane.faults(drop_after_commit=None)
    killed = time.monotonic()
    r.say.emit("kill", f"  Coupon {_tail(GROUPON)} scanned. The coupon server used it, but "
               f"before its answer\n  came back, {HOSTD} was switched off.",
               tech=f"    scan #{sid}: the backend committed the consume, its reply is held "
               f"back;\n    journal entry {entry['id']} is '{entry['state']}' → SIGKILL hostd "
               f"(pid {pid})", scan_id=sid, entry=entry["id"], journal_state=entry["state"],
               hostd_pid=pid)
    if entry["state"] != "consume_sent":
        raise StepFailed(f"journal entry {entry['id']} is {entry['state']}, expected "
                         f"consume_sent while the consume is out")
    # reconcile leaves a consume younger than settle_after_s to its lane: let it age first
    r.say.progress(f"  Switching {HOSTD} back on (a few seconds)")
    time.sleep(max(0.0, SETTLE_AFTER_S - (time.monotonic() - killed)))
    r.restart_hostd()
    shown = r.wait(lambda: _settled(lane, entry["id"]), "the journal entry to settle", hostd=True)
    steps = [s["step"] for s in shown["steps"]]
    count = lane.consume_count(GROUPON)
    r.say.emit("reconciled", f"  Back on, it asked the coupon server what had happened instead "
               f"of using the\n  coupon again: {r.say.outcome(shown['outcome'])}, and used "
               f"{_times(count or 0)}.",
               tech=f"    hostd restarted (pid {lane.hostd.pid}): entry {entry['id']} settled "
               f"by a query, never a second consume: {shown['outcome']}\n    journal: "
               f"{' → '.join(steps)}\n    backend consume_count {count}",
               entry=entry["id"], outcome=shown["outcome"], steps=steps, consume_count=count)
    if shown["outcome"] != "accepted" or count != 1:
        raise StepFailed(f"after the restart: {shown['outcome']}, consume_count {count}; "
                         f"expected accepted, 1")
    # the device asks again in the new session (same scan_id and time): the restarted hostd
    # answers from its journal - in time for the cashier, or as a late verdict after the
    # device's own "host offline"
    vs = r.wait(lambda: [v for v in lane.verdicts(sid) if v["outcome"] != "offline"] and
                lane.verdicts(sid), f"hostd's answer to scan #{sid} on the device")
    for v in vs:
        said = r.say.outcome(v["outcome"])
        r.say.emit("device_verdict", f"  Coupon {_tail(GROUPON)}: {said}\n    the cashier's "
                   f"display: {v['text']}", tech=f"    device, scan #{sid}: {v['outcome']}, "
                   f"{v['led']} LED", scan_id=sid, outcome=v["outcome"], led=v["led"],
                   text=v["text"])
    outcomes = [v["outcome"] for v in vs]
    if outcomes not in (["accepted"], ["offline", "accepted"]):
        raise StepFailed(f"scan #{sid}: the device showed {vs}, expected hostd's 'accepted' "
                         f"from the journal (after its own 'host offline' at most)")
    r.say.line("  The box asked again once the computer was back on; it answered from its own\n"
               "  records: the cashier sees the coupon redeemed, used only once.",
               "    the device resent scan #6 in the new session; hostd answered from its "
               "journal")


def _settled(lane: Lane, entry_id: int) -> dict[str, Any] | None:
    shown = lane.ctl("journal.show", entry_id=entry_id)
    return shown if shown["state"] == "done" else None


def step_receipt(r: Run, items: tuple[tuple[str, str], ...] = ITEMS) -> None:
    total = sum((Decimal(price) for _, price in items), Decimal("0.00"))
    data = receipt_bytes(SHOP, list(items), str(total))
    try:
        tap = r.lane.receipt_tap()
    except OSError as e:
        raise StepFailed(f"the tap could not start: {e}") from None
    assert tap.proxy is not None and tap.printer is not None
    t0 = int(time.time())
    try:
        status, rec, job = tap.print_receipt(data)
    except (OSError, TimeoutError) as e:
        raise StepFailed(f"printing through the tap: {e}") from None
    t1 = int(time.time())
    pos, printer = tap.proxy.address, tap.printer.port
    r.say.emit("tap", "  The till asked if the printer was ready; the answer came through "
               "hexiao.",
               tech=f"    POS → tap {pos[0]}:{pos[1]} → printer 127.0.0.1:{printer}; the POS "
               f"asked for status (DLE EOT 1) and got 0x{status.hex() or '--'} back through "
               "the tap", listen=f"{pos[0]}:{pos[1]}", printer=f"127.0.0.1:{printer}",
               status=status.hex(), end=rec.end)
    if status != bytes((PRINTER_STATUS,)):
        raise StepFailed(f"the POS's status request got {status!r} through the tap, expected "
                         f"{bytes((PRINTER_STATUS,))!r}")
    rc = tap_receipt(rec, total)
    r.say.emit("tap_receipt", "  The till printed its receipt; hexiao read it on the way:\n"
               + "".join(f"    | {line}\n" for line in rc.lines)
               + f"  Total: ¥{rc.total} (from the {rc.totals[-1][0]} line).",
               tech=f"    receipt {rc.index}: {len(rc.lines)} lines, ended by its {rc.end}",
               index=rc.index, lines=rc.lines, total=str(rc.total),
               totals=[[n, str(v)] for n, v in rc.totals])
    sent = DLE_EOT_1 + data
    (off, n), = tap_bytes(sent, job, rec)
    r.say.emit("tap_bytes", "  The printer got the receipt unchanged, with one QR code added "
               "before the cut.",
               tech=f"    the printer got {len(job)} bytes: all {len(sent)} the POS sent, in "
               f"order, plus one {n}-byte QR block at byte {off}, before the cut",
               sent=len(sent), received=len(job), injections=rec.injections, intact=True)
    content = tap_qr(job, rc)
    short = content if len(content) <= 40 else content[:30] + "…"
    r.say.emit("tap_qr", f"  The QR code on the printout opens {short}",
               tech=f"    QR, read back from the printer's bytes (GS ( k store data):\n"
               f"    {content}", content=content, source="GS ( k 1 P")
    info = tap_token(tap.key, content, tap.lane, total, t0, t1)
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(info.time))
    r.say.emit("tap_token", f"  That link is signed for this lane ({info.lane}), this time and "
               f"¥{info.total};\n  the signature checks out.",
               tech=f"    its token verifies under the tap key: lane {info.lane}, {when}, "
               f"total {info.total}, receipt digest {info.digest}", valid=True,
               lane=info.lane, time=info.time, total=str(info.total), digest=info.digest)


def step_points(r: Run) -> None:
    if not r.faults_ok:  # the member card is the example seed's
        r.skipped("points", "a member card")
        return
    r.sid += 1
    sid = r.sid
    before = r.lane.member_info(MEMBER, MEMBER_CARD).bonus
    r.lane.scan(f"]Q1{MEMBER}".encode())
    try:
        v = r.lane.verdict(sid)
    except TimeoutError as e:
        raise StepFailed(str(e)) from None
    r.say.emit("member", f"  Member card {_tail(MEMBER)} scanned: "
               f"{r.say.outcome(v['outcome'])} ({before} points)\n"
               f"    the cashier's display: {v['text']}",
               tech=f"    scanner ]Q1{_tail(MEMBER)} → device, scan #{sid}: {v['outcome']}; "
               "hostd ties the member to lane-1's next receipt", scan_id=sid,
               code_tail=MEMBER[-4:], outcome=v["outcome"], text=v["text"], bonus=before)
    if v["outcome"] != "identified":
        raise StepFailed(f"the member card was {v['outcome']} “{v['text']}”, expected "
                         "identified")
    r.wait(lambda: r.lane.ctl("status")["points"].get("waiting", {}).get("lane-1"),
           "hostd to tie the member to the lane's sale")
    total = sum((Decimal(p) for _, p in ITEMS), Decimal("0.00"))
    earned = _print_points(r, ITEMS, total)
    try:
        told = r.lane.verdict(sid, 2)  # the device's late note for the member's scan
    except TimeoutError as e:
        raise StepFailed(str(e)) from None
    after = r.lane.member_info(MEMBER, MEMBER_CARD).bonus
    r.say.emit("points", f"  The receipt (¥{total}) earned the member {after - before} points: "
               f"{before} → {after}.\n    the cashier's display: {told['text']}",
               tech=f"    card/membercard/updateuser add_bonus {after - before}; "
               f"userinfo/get: bonus {after}", earned=after - before, bonus_before=before,
               bonus_after=after, total=str(total), text=told["text"])
    if after - before != earned or f"+{earned}" not in told["text"]:
        raise StepFailed(f"the member's points went {before} → {after} (display "
                         f"“{told['text']}”), expected +{earned}")
    # another customer's receipt, no card shown: claimed later from its QR
    total = sum((Decimal(p) for _, p in CLAIMED), Decimal("0.00"))
    claim_url = r.lane.ctl("status")["points"].get("claim_url") or ""
    token = _print_points(r, CLAIMED, total, qr=True)
    answers = []
    for n in (1, 2):
        try:
            resp = httpx.post(f"{claim_url}/points/claim", json={
                "token": token, "card_id": MEMBER_CARD, "code": MEMBER}, timeout=r.lane.timeout)
            answers.append((resp.status_code, resp.json()))
        except (httpx.HTTPError, ValueError) as e:
            raise StepFailed(f"claim {n} at {claim_url}: {e}") from None
    (s1, a1), (s2, a2) = answers
    final = r.lane.member_info(MEMBER, MEMBER_CARD).bonus
    r.say.emit("claim", f"  A second receipt (¥{total}) was claimed from its QR code: "
               f"+{a1.get('points')} points ({after} → {final}).",
               tech=f"    POST {claim_url}/points/claim: {s1} {json.dumps(a1)}", status=s1,
               answer=a1, bonus_before=after, bonus_after=final)
    r.say.emit("claim_again", f"  The same QR claimed again: refused ({a2.get('message')}).",
               tech=f"    POST again: {s2} {json.dumps(a2, ensure_ascii=False)}", status=s2,
               answer=a2)
    want = int(total)  # the seed's rule: 1 point a whole yuan
    if (s1, a1.get("points"), final - after) != (200, want, want):
        raise StepFailed(f"the claim answered {s1} {a1}, points {after} → {final}; expected "
                         f"200 and +{want}")
    if (s2, a2.get("error")) != (409, "already_claimed"):
        raise StepFailed(f"the second claim answered {s2} {a2}, expected 409 already_claimed")


def _print_points(r: Run, items: tuple[tuple[str, str], ...], total: Decimal,
                  qr: bool = False) -> Any:
    """Print a receipt through hostd's tap; the points it should earn (the seed's rule: one a
    whole yuan), or with qr, its QR's token."""
    try:
        job = r.lane.print_via_hostd(receipt_bytes(SHOP, list(items), str(total)))
    except (OSError, TimeoutError) as e:
        raise StepFailed(f"printing through hostd's tap: {e}") from None
    if not qr:
        return int(total)
    stored = qr_stored(job)
    prefix = TAP_CONTENT.removesuffix("{token}")
    if len(stored) != 1 or not stored[0].startswith(prefix.encode()):
        raise StepFailed(f"the printer got {len(stored)} QR codes from hostd's tap, "
                         f"expected one {prefix}TOKEN")
    return stored[0].decode().removeprefix(prefix)


def tap_receipt(rec: ConnRecord, total: Decimal) -> Receipt:
    """The one receipt the tap read, with its QR added and the total the POS printed."""
    if len(rec.receipts) != 1:
        raise StepFailed(f"the tap saw {len(rec.receipts)} receipts on the connection "
                         f"({rec.end}), expected one")
    rc = rec.receipts[0]
    if not rc.injected:
        raise StepFailed(f"the tap added no QR to the receipt: {rc.skipped}")
    if rc.total != total:
        raise StepFailed(f"the tap read the total as {rc.total}, the POS printed {total}")
    return rc


def tap_bytes(sent: bytes, job: bytes, rec: ConnRecord) -> list[tuple[int, int]]:
    """One QR block, before the cut, and every byte the POS sent around it, in order."""
    if len(rec.injections) != 1:
        raise StepFailed(f"the tap reports {len(rec.injections)} QR blocks, expected one")
    original = remove_blocks(job, rec.injections)
    if original != sent:
        at = next((i for i, (a, b) in enumerate(zip(original, sent, strict=False)) if a != b),
                  min(len(original), len(sent)))
        raise StepFailed(f"the printer's bytes without the QR block are not what the POS sent "
                         f"({len(original)} vs {len(sent)} bytes, first difference at byte "
                         f"{at})")
    off, n = rec.injections[0]
    if off + n > job.rfind(b"\x1dV"):
        raise StepFailed(f"the QR block (bytes {off}..{off + n}) is not before the cut")
    return rec.injections


def tap_qr(job: bytes, rc: Receipt) -> str:
    """The QR content as the printer will print it: the GS ( k store command's data."""
    stored = qr_stored(job)
    if len(stored) != 1:
        raise StepFailed(f"the printer's bytes hold {len(stored)} QR store commands "
                         f"(GS ( k 1 P), expected one")
    try:
        content = stored[0].decode("utf-8")
    except UnicodeDecodeError:
        raise StepFailed(f"the QR data is not UTF-8: {stored[0]!r}") from None
    if content != rc.content:
        raise StepFailed(f"the printer's QR says {content!r}, the tap says it added "
                         f"{rc.content!r}")
    return content


def tap_token(key: bytes, content: str, lane: str, total: Decimal, t0: int,
              t1: int) -> TokenInfo:
    """The token in the QR's URL verifies under the key and says this lane, time and total."""
    prefix = TAP_CONTENT.removesuffix("{token}")
    if not content.startswith(prefix):
        raise StepFailed(f"the QR {content!r} is not a {prefix}TOKEN link")
    try:
        info = verify_token([key], content.removeprefix(prefix))
    except TokenError as e:
        raise StepFailed(f"the QR's token does not verify: {e}") from None
    if (info.lane, info.total) != (lane, total) or not t0 <= info.time <= t1:
        raise StepFailed(f"the token says lane {info.lane}, total {info.total}, time "
                         f"{info.time}; expected {lane}, {total}, a time in {t0}..{t1}")
    return info


def step_counters(r: Run) -> None:
    health = r.lane.ctl("device.health", device=DEVICE_ID)
    status = r.lane.ctl("status")
    info = r.lane.ctl("device.info", device=DEVICE_ID)
    state = r.lane.sim_state()
    consumes = {c[-4:]: s["consume_count"] for c, s in (state or {}).get("codes", {}).items()
                if s["consume_count"]}
    app = health.get("app", {})
    restarts = r.lane.hostd_starts - 1
    r.say.emit("counters", "", device_app=app, heap_free=health.get("heap_free"),
               heap_peak=health.get("heap_peak"), hostd_stats=info.get("stats"),
               verify_manually=status["verify_manually"], consumes=consumes,
               hostd_starts=r.lane.hostd_starts)
    since = f" since its last start ({restarts} in this demo)" if restarts else ""
    r.say.line(f"  The hexiao box saw {app.get('scans', 0)} scans: {app.get('products', 0)} "
               f"products and {app.get('coupons', 0)} coupons.",
               "    device:  " + "  ".join(f"{k} {v}" for k, v in sorted(app.items())))
    if state is None:
        used = "  Your coupon server does not say how often each coupon was used."
    else:
        used = "  Coupons used at the coupon server: " + (", ".join(
            f"…{c} {_times(n)}" for c, n in consumes.items()) or "none") + "."
    r.say.line(used, f"    hostd counters{since}:\n      " + "  ".join(
        f"{k} {v}" for k, v in sorted((info.get("stats") or {}).items()) if v))
    again = {0: "", 1: f"{HOSTD.capitalize()} was restarted once; "}.get(
        restarts, f"{HOSTD.capitalize()} was restarted {restarts} times; ")
    check = (f"{len(status['verify_manually'])} redemptions need checking by hand"
             if status["verify_manually"] else "nothing needs checking by hand")
    r.say.line(f"  {again}{check}.",
               f"    backend consumes: {consumes if state is not None else 'not shown'}   "
               f"verify manually: {status['verify_manually'] or 'none'}\n"
               f"    device heap: {health.get('heap_free')} bytes free of {r.lane.heap}")
    if status["verify_manually"]:
        raise StepFailed(f"entries left for manual checking: {status['verify_manually']}")
    if r.faults_ok and any(n != 1 for n in consumes.values()):
        raise StepFailed(f"a code consumed more than once: {consumes}")


Step = tuple[str, str, Callable[[Run], None]]
STEPS: list[Step] = [
    ("session", "The hexiao box meets the in-store computer", step_session),
    ("products", "Products go straight to the till", step_products),
    ("coupon", "A coupon is redeemed", step_coupon),
    ("again", "The same coupon, scanned again", step_again),
    ("invalid", "A code that is not a valid coupon", step_invalid),
    ("busy", "The coupon server is busy", step_busy),
    ("kill", "The in-store computer is switched off mid-redemption", step_kill),
    ("receipt", "A receipt gets its QR code", step_receipt),
    ("points", "A member earns points from the receipt", step_points),
    ("counters", "What everyone counted", step_counters),
]


def parse_scenario(text: str) -> list[Step]:
    """Steps from a scenario file (format in the module docstring); ValueError names the line."""
    steps: list[Step] = [STEPS[0]]
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        verb, args = words[0], words[1:]
        fn: Callable[[Run], None]
        if verb == "product" and len(args) == 1 and args[0].isdigit():
            fn = partial(Run.product, digits=args[0])
        elif verb == "coupon" and len(args) in (1, 2) and set(args[1:]) <= set(OUTCOMES):
            fn = partial(_coupon, code=args[0], expect=(args[1:] or [None])[0])
        elif verb == "scan" and len(args) == 1 and args[0].startswith("]") and len(args[0]) > 3:
            fn = partial(Run.raw, line=args[0])
        elif verb == "wait" and len(args) == 1 and _seconds(args[0]):
            fn = partial(_wait, seconds=float(args[0]))
        elif verb == "busy" and args in (["on"], ["off"]):
            fn = partial(_busy, on=args[0] == "on")
        elif verb == "kill-hostd" and not args:
            fn = _scenario_kill
        elif verb == "receipt" and len(args) <= 8 and all(YUAN.fullmatch(a) for a in args):
            fn = partial(step_receipt, items=tuple((f"商品 {i}", a) for i, a in
                                                   enumerate(args, 1)) or ITEMS)
        else:
            raise ValueError(f"line {n}: cannot read {raw.strip()!r}: expected product DIGITS, "
                             "coupon CODE [OUTCOME], scan LINE, wait SECONDS, busy on|off, "
                             "kill-hostd or receipt [YUAN ...]")
        steps.append((f"line {n}", raw.strip(), fn))
    steps.append(STEPS[-1])
    return steps


def _coupon(r: Run, code: str, expect: str | None) -> None:
    r.coupon(code, expect)


def _wait(r: Run, seconds: float) -> None:
    if seconds >= 2:
        r.say.progress(f"  Waiting {seconds:g} s")
    time.sleep(seconds)


def _busy(r: Run, on: bool) -> None:
    if r.faults_ok:
        r.busy(on)
    else:
        r.skipped("busy", "making the coupon server busy")


def _seconds(s: str) -> bool:
    try:
        return 0 <= float(s) <= 600
    except ValueError:
        return False


def _scenario_kill(r: Run) -> None:
    pid = r.lane.kill_hostd()
    r.say.emit("kill", f"  {HOSTD.capitalize()} (hostd) was switched off.",
               tech=f"    SIGKILL hostd (pid {pid})", hostd_pid=pid)
    r.say.progress(f"  Switching {HOSTD} back on (a few seconds)")
    time.sleep(SETTLE_AFTER_S)  # in-flight consumes age past settle_after_s: reconciled at start
    r.restart_hostd()
    r.say.emit("restarted", f"  {HOSTD.capitalize()} is back on and connected to the box.",
               tech=f"    hostd restarted (pid {r.lane.hostd.pid}), session open",
               hostd_pid=r.lane.hostd.pid)


def run(say: Narrator, timeout: float, steps: list[Step] = STEPS,
        backend_url: str | None = None, appid: str | None = None,
        secret_file: Path | None = None) -> int:
    server = f"your coupon server at {backend_url}" if backend_url else \
        "the built-in WeChat simulator"
    say.title("hexiao demo: a whole checkout lane, running on this computer")
    say.line("  On the lane: a scanner, the hexiao box, the till and a receipt printer.\n"
             f"  In the shop: {HOSTD} (hostd).\n  Coupon server: {server}.",
             f"    firmware on the sim board (MicroPython, {micropython.HEAP} heap), hostd, "
             f"{'the backend at ' + backend_url if backend_url else 'the WeChat simulator'}, "
             "a fake POS keyboard sink and printer")
    if backend_url:
        say.line("  With your server the demo cannot show a busy server, a switch-off in the\n"
                 "  middle of a redemption, or how often a coupon was used: those need the\n"
                 "  built-in simulator. The built-in steps scan the example seed's codes\n"
                 "  (--scenario FILE scans your own).")
    with tempfile.TemporaryDirectory(prefix="hexiao-demo-") as tmp:
        lane = Lane(Path(tmp), timeout, backend_url, appid=appid, secret_file=secret_file)
        try:
            say.progress("Setting up the lane: building the firmware and starting everything "
                         "(about 10 s)")
            t0 = time.monotonic()
            try:
                lane.start()
            except (OSError, RuntimeError, ValueError, SetupError, TimeoutError) as e:
                say.emit("error", f"Could not set up the lane: {e}", step="setup",
                         message=str(e))
                say.emit("result", "", ok=False)
                return EXIT_SETUP
            say.emit("setup", "", tech=f"    lane up in {time.monotonic() - t0:.1f} s: "
                     f"firmware compiled with mpy-cross, device pid {lane.device.proc.pid}, "
                     f"hostd pid {lane.hostd.pid}", heap=lane.heap, budget=micropython.HEAP,
                     backend=backend_url or "simulator")
            r = Run(lane, say)
            for i, (name, title, fn) in enumerate(steps, 1):
                say.title(f"[{i}/{len(steps)}] {title}")
                try:
                    fn(r)
                except StepFailed as e:
                    _fail(lane, say, name, str(e))
                    return EXIT_FAILED
                say.emit("step", "", step=name, ok=True)
        finally:
            lane.close()
    say.emit("result", say.style("All steps worked as expected.", "green", bold=True), ok=True)
    return EXIT_OK


def _fail(lane: Lane, say: Narrator, step: str, message: str) -> None:
    other = lane.device.other[-8:] if lane.device else []
    tail = lane.hostd_tail()
    say.emit("error", "", step=step, message=message, device_stderr=other, hostd_log=tail)
    if not say.as_json:
        colour = wants_colour(sys.stderr) if say.colour else False
        if say.detail:
            for line in other:
                click.echo(f"  device| {line}", err=True)
            if tail:
                click.echo(f"  hostd| {tail}", err=True)
        for line in fit(f"FAILED at {step}: {message}"):
            click.echo(click.style(line, fg="red") if colour else line, err=True, color=colour)
        if not say.detail:
            click.echo("  (run it again with --detail to see the device's and hostd's last "
                       "lines)", err=True)
        if lane.backend_url:
            click.echo("  (with --backend-url, the built-in steps need the example seed's "
                       "codes: use --scenario FILE for yours)", err=True)
    say.emit("result", "", ok=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.option("--detail", "-v", is_flag=True,
              help="Also show the engineers' detail: AIM ids, pids, journal steps, ESC/POS "
                   "commands, counters.")
@click.option("--scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own steps, one per line: product DIGITS | coupon CODE [OUTCOME] | "
                   "scan LINE | wait SECONDS | busy on|off | kill-hostd | receipt [YUAN ...].")
@click.option("--backend-url", metavar="URL",
              help="Any WeChat-card-API server instead of the built-in simulator (token, "
                   "card/code/get, card/get, card/code/consume); the steps that need the "
                   "simulator (busy, switch-off, consume counts) are not shown.")
@click.option("--appid", help="The appid hostd uses at --backend-url (default: the example "
              "seed's, as `hexiao sim wechat` knows it).")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file holding that appid's secret, chmod 600, as hostd's secret_file.")
@click.option("--timeout", default=30.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds any one wait may take before the step fails.")
@click.option("--fleet", is_flag=True, help="Instead: a chain of two stores through an MQTT "
              "broker into PostgreSQL, with its settlement report, then headquarters operating it "
              "(tools/demo/fleet.py).")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="--fleet: the MQTT broker.")
@click.option("--fleet-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
              show_default=True, help="--fleet: a PostgreSQL server where the demo may create "
              "its database (dropped at the end unless --keep).")
@click.option("--keep", is_flag=True, help="--fleet: keep the database (for hexiao-fleetd web).")
def main(as_json: bool, detail: bool, scenario: Path | None, backend_url: str | None,
         appid: str | None, secret_file: Path | None, timeout: float, fleet: bool,
         broker: str, fleet_dsn: str, keep: bool) -> None:
    """Run a whole lane on this machine and show it working, and surviving faults.

    Exit status: 0 all steps as expected, 1 a step failed, 2 bad options, 3 set-up failed."""
    if fleet:  # a chain instead of a lane (its own module)
        from hexiao.tools.demo.fleet import run_fleet

        sys.exit(run_fleet(as_json, broker, fleet_dsn, timeout, keep))
    if backend_url is not None and not URL.fullmatch(backend_url):
        raise click.BadParameter(f"{backend_url!r} is not an http(s) URL, e.g. "
                                 "http://127.0.0.1:8080", param_hint="--backend-url")
    if (appid or secret_file) and backend_url is None:
        raise click.UsageError("--appid and --secret-file go with --backend-url (the built-in "
                               "simulator has its own)")
    if (appid is None) != (secret_file is None):
        raise click.UsageError("give both --appid and --secret-file, or neither (the example "
                               "seed's credentials)")
    if appid is not None and not APPID.fullmatch(appid):
        raise click.BadParameter(f"{appid!r}: an appid is letters, digits, _ . - "
                                 "(e.g. wx1234567890abcdef)", param_hint="--appid")
    if secret_file is not None:
        try:
            read_secret(secret_file)  # refused as hostd would refuse it; the text is dropped
        except ConfigError as e:
            raise click.BadParameter(e.errors[0], param_hint="--secret-file") from None
        secret_file = secret_file.absolute()
    steps = STEPS
    if scenario is not None:
        try:
            steps = parse_scenario(scenario.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise click.BadParameter(str(e), param_hint="--scenario") from None
    sys.exit(run(Narrator(as_json, detail), timeout, steps, backend_url, appid, secret_file))


if __name__ == "__main__":
    main()
