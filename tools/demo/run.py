"""`hexiao demo`: a whole scan-mode lane on this machine, shown step by step.

The lane (tools/demo/lane.py): the firmware on the sim board under MicroPython, its link on a pty,
`hexiao-hostd` (a subprocess), the WeChat card API simulator on loopback and a fake POS showing the
keystrokes it receives. Steps: products pass through, a coupon is redeemed with its value (and
typed by the CASH macro), the same coupon is refused as used, an invalid code is refused, a busy
backend is handled, hostd is SIGKILLed mid-redemption and reconciled after restart, a Chinese
receipt is printed through the receipt tap (its text and total as the tap read them, the
printer's bytes: the original intact plus one QR block, the QR read back, its token verified),
counters.
Each step checks what it shows. The link-layer attacks (corrupted, forged, replayed frames) are
not repeated here: tests/test_link.py and tests/test_pty_link.py show them.

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
import re
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import click
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
OUTCOMES = ("accepted", "refused", "offline", "identified", "verify_manually", "info")
SHOP = "好又多超市 (天河店)"
ITEMS = (("可口可乐 330ml ×2", "7.00"), ("康师傅红烧牛肉面", "4.50"), ("农夫山泉 550ml", "2.00"),
         ("鸡蛋 (10枚)", "12.50"))
YUAN = re.compile(r"\d{1,6}\.\d{2}")


class StepFailed(Exception):
    """A step did not see what it should have; the message says what."""


class Narrator:
    """Prose for a person, or one JSON object per line for a machine."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, event: str, text: str = "", /, **fields: Any) -> None:
        if self.as_json:
            click.echo(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str))
        elif text:
            click.echo(text)

    def line(self, text: str) -> None:
        if not self.as_json:
            click.echo(text)

    def title(self, text: str) -> None:
        if not self.as_json:
            click.secho(text, bold=True)


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
                self.say.emit("pos", f"  POS typed from the scans before: {earlier}",
                              typed=earlier)
        if shown != digits + "⏎":
            raise StepFailed(f"product {digits}: the POS received {shown!r}")
        self.say.emit("product", f"  scanner ]E0{digits} → POS typed: {shown}",
                      data=digits, typed=shown)

    def raw(self, line: str) -> None:
        self.lane.scan(line.encode())
        self.raw_scans = True
        self.say.emit("scan", f"  scanner {line} (not checked: a later product step shows "
                      "what it typed)", line=line)

    def coupon(self, code: str, expect: str | None = None, *, wait: bool = True,
               text_has: str | None = None) -> dict[str, Any]:
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
        self.say.emit("verdict", f"  scanner ]Q1…{code[-4:]} → device: {v['outcome']}, "
                      f"{v['led']} LED, {v['beep']} beep: “{v['text']}”", scan_id=sid,
                      code_tail=code[-4:], outcome=v["outcome"], led=v["led"], beep=v["beep"],
                      text=v["text"], consume_count=count)
        if expect is not None and v["outcome"] != expect:
            raise StepFailed(f"scan #{sid} …{code[-4:]}: {v['outcome']} “{v['text']}”, "
                             f"expected {expect}")
        if text_has is not None and text_has not in v["text"]:
            raise StepFailed(f"scan #{sid}: verdict text “{v['text']}” lacks “{text_has}”")
        return v

    def consumed(self, code: str, want: int) -> None:
        n = self.lane.consume_count(code)
        if n is None:
            self.say.line("  (this backend does not show consume counts)")
            return
        if n != want:
            raise StepFailed(f"…{code[-4:]} consumed {n} times at the backend, expected {want}")
        self.say.line(f"  backend: …{code[-4:]} consumed {n} time{'s' * (n != 1)}")

    def busy(self, on: bool) -> None:
        self.lane.faults(busy_rate=1.0 if on else 0.0)
        self.say.emit("fault", f"  simulator: busy {'on' if on else 'off'}"
                      f"{' (every API call answers errcode -1)' if on else ''}",
                      fault="busy", on=on)

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
    r.say.emit("session", f"  device {DEVICE_ID} ({peer.get('firmware')}, board "
               f"{peer.get('board')}) opened a signed session with hostd (pid "
               f"{r.lane.hostd.pid}); hostd pushed its scan rules",
               device=DEVICE_ID, firmware=peer.get("firmware"), board=peer.get("board"),
               heap=r.lane.heap, heap_free=boot.get("heap_free"), hostd_pid=r.lane.hostd.pid)


def step_products(r: Run) -> None:
    for digits in PRODUCTS:
        r.product(digits)
    r.say.line("  products never wait for the host: the device types them itself")


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
    r.say.emit("macro", f"  CASH macro → POS typed: {typed} (its discount key, the amount)",
               typed=typed)
    r.consumed(CASH, 1)


def step_again(r: Run) -> None:
    r.coupon(CASH, "refused", text_has="already used")
    r.consumed(CASH, 1)


def step_invalid(r: Run) -> None:
    r.coupon(UNKNOWN, "refused", text_has="invalid code")


def step_busy(r: Run) -> None:
    if not r.faults_ok:
        r.say.emit("skipped", "  skipped: --backend-url given, no fault injection there",
                   step="busy")
        return
    r.busy(True)
    r.coupon(DISCOUNT, "refused", text_has="busy, scan again")
    r.consumed(DISCOUNT, 0)
    r.busy(False)
    r.say.line("  the cashier scans again:")
    r.coupon(DISCOUNT, "accepted", text_has="20% off")
    r.consumed(DISCOUNT, 1)


def step_kill(r: Run) -> None:
    lane = r.lane
    if not r.faults_ok:
        r.say.emit("skipped", "  skipped: --backend-url given, the consume cannot be held in "
                   "flight there", step="kill")
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
    r.say.emit("kill", f"  scan #{sid} …{GROUPON[-4:]}: the backend committed the consume, its "
               f"reply is held back;\n  journal entry {entry['id']} is '{entry['state']}' → "
               f"SIGKILL hostd (pid {pid})", scan_id=sid, entry=entry["id"],
               journal_state=entry["state"], hostd_pid=pid)
    if entry["state"] != "consume_sent":
        raise StepFailed(f"journal entry {entry['id']} is {entry['state']}, expected "
                         f"consume_sent while the consume is out")
    # reconcile leaves a consume younger than settle_after_s to its lane: let it age first
    time.sleep(max(0.0, SETTLE_AFTER_S - (time.monotonic() - killed)))
    r.restart_hostd()
    shown = r.wait(lambda: _settled(lane, entry["id"]), "the journal entry to settle", hostd=True)
    steps = [s["step"] for s in shown["steps"]]
    count = lane.consume_count(GROUPON)
    r.say.emit("reconciled", f"  hostd restarted (pid {lane.hostd.pid}): entry {entry['id']} "
               f"settled by a query, never a second consume: {shown['outcome']}\n"
               f"  journal: {' → '.join(steps)}; backend consume_count {count}",
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
        r.say.emit("device_verdict", f"  device, scan #{sid}: {v['outcome']}, {v['led']} LED: "
                   f"“{v['text']}”", scan_id=sid, outcome=v["outcome"], led=v["led"],
                   text=v["text"])
    outcomes = [v["outcome"] for v in vs]
    if outcomes not in (["accepted"], ["offline", "accepted"]):
        raise StepFailed(f"scan #{sid}: the device showed {vs}, expected hostd's 'accepted' "
                         f"from the journal (after its own 'host offline' at most)")
    r.say.line("  the device asked again in the new session and hostd answered from its "
               "journal:\n  the cashier sees the coupon redeemed, and it was consumed once")


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
    r.say.emit("tap", f"  POS → tap {pos[0]}:{pos[1]} → printer 127.0.0.1:{printer}; the POS "
               f"asked for status (DLE EOT 1) and got 0x{status.hex() or '--'} back through "
               "the tap", listen=f"{pos[0]}:{pos[1]}", printer=f"127.0.0.1:{printer}",
               status=status.hex(), end=rec.end)
    if status != bytes((PRINTER_STATUS,)):
        raise StepFailed(f"the POS's status request got {status!r} through the tap, expected "
                         f"{bytes((PRINTER_STATUS,))!r}")
    rc = tap_receipt(rec, total)
    r.say.emit("tap_receipt", f"  the tap read receipt {rc.index} ({len(rc.lines)} lines, "
               f"ended by its {rc.end}):\n" + "".join(f"    | {line}\n" for line in rc.lines)
               + f"  total: ¥{rc.total} (from the {rc.totals[-1][0]} line)", index=rc.index,
               lines=rc.lines, total=str(rc.total), totals=[[n, str(v)] for n, v in rc.totals])
    sent = DLE_EOT_1 + data
    (off, n), = tap_bytes(sent, job, rec)
    r.say.emit("tap_bytes", f"  the printer got {len(job)} bytes: all {len(sent)} the POS sent, "
               f"in order, plus one {n}-byte QR block at byte {off}, before the cut",
               sent=len(sent), received=len(job), injections=rec.injections, intact=True)
    content = tap_qr(job, rc)
    r.say.emit("tap_qr", f"  QR, read back from the printer's bytes (GS ( k store data): "
               f"{content}", content=content, source="GS ( k 1 P")
    info = tap_token(tap.key, content, tap.lane, total, t0, t1)
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(info.time))
    r.say.emit("tap_token", f"  its token verifies under the tap key: lane {info.lane}, "
               f"{when}, total {info.total}, receipt digest {info.digest}", valid=True,
               lane=info.lane, time=info.time, total=str(info.total), digest=info.digest)


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
    r.say.emit("counters", "", device_app=app, heap_free=health.get("heap_free"),
               heap_peak=health.get("heap_peak"), hostd_stats=info.get("stats"),
               verify_manually=status["verify_manually"], consumes=consumes,
               hostd_starts=r.lane.hostd_starts)
    r.say.line("  device:  " + "  ".join(f"{k} {v}" for k, v in sorted(app.items())))
    r.say.line("  hostd:   " + "  ".join(f"{k} {v}" for k, v in
                                          sorted((info.get("stats") or {}).items()) if v))
    r.say.line(f"  backend consumes: {consumes}   verify manually: "
               f"{status['verify_manually'] or 'none'}")
    r.say.line(f"  device heap: {health.get('heap_free')} bytes free of {r.lane.heap}")
    if status["verify_manually"]:
        raise StepFailed(f"entries left for manual checking: {status['verify_manually']}")
    if r.faults_ok and any(n != 1 for n in consumes.values()):
        raise StepFailed(f"a code consumed more than once: {consumes}")


Step = tuple[str, str, Callable[[Run], None]]
STEPS: list[Step] = [
    ("session", "the device meets hostd", step_session),
    ("products", "products pass through to the POS", step_products),
    ("coupon", "a coupon redeemed", step_coupon),
    ("again", "the same coupon again", step_again),
    ("invalid", "an invalid code", step_invalid),
    ("busy", "the backend busy", step_busy),
    ("kill", "hostd killed mid-redemption", step_kill),
    ("receipt", "a receipt through the tap", step_receipt),
    ("counters", "what everyone counted", step_counters),
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
    time.sleep(seconds)


def _busy(r: Run, on: bool) -> None:
    if r.faults_ok:
        r.busy(on)
    else:
        r.say.emit("skipped", "  skipped: no fault injection on --backend-url", step="busy")


def _seconds(s: str) -> bool:
    try:
        return 0 <= float(s) <= 600
    except ValueError:
        return False


def _scenario_kill(r: Run) -> None:
    pid = r.lane.kill_hostd()
    r.say.emit("kill", f"  SIGKILL hostd (pid {pid})", hostd_pid=pid)
    time.sleep(SETTLE_AFTER_S)  # in-flight consumes age past settle_after_s: reconciled at start
    r.restart_hostd()
    r.say.emit("restarted", f"  hostd restarted (pid {r.lane.hostd.pid}), session open",
               hostd_pid=r.lane.hostd.pid)


def run(say: Narrator, timeout: float, steps: list[Step] = STEPS,
        backend_url: str | None = None) -> int:
    backend = f"the backend at {backend_url}" if backend_url else "the WeChat simulator"
    say.title(f"hexiao demo: a scan-mode lane — firmware on the sim board (MicroPython, "
              f"{micropython.HEAP} heap), hostd, {backend}, a POS")
    with tempfile.TemporaryDirectory(prefix="hexiao-demo-") as tmp:
        lane = Lane(Path(tmp), timeout, backend_url)
        try:
            try:
                lane.start()
            except (OSError, RuntimeError, ValueError, SetupError, TimeoutError) as e:
                say.emit("error", f"could not set up the lane: {e}", step="setup",
                         message=str(e))
                say.emit("result", "", ok=False)
                return EXIT_SETUP
            say.emit("setup", "", heap=lane.heap, budget=micropython.HEAP,
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
    say.emit("result", "all steps behaved as expected", ok=True)
    return EXIT_OK


def _fail(lane: Lane, say: Narrator, step: str, message: str) -> None:
    other = lane.device.other[-8:] if lane.device else []
    say.emit("error", "", step=step, message=message, device_stderr=other,
             hostd_log=lane.hostd_tail())
    if not say.as_json:
        for line in other:
            click.echo(f"  device| {line}", err=True)
        click.secho(f"FAILED at {step}: {message}", fg="red", err=True)
    say.emit("result", "", ok=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.option("--scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own steps, one per line: product DIGITS | coupon CODE [OUTCOME] | "
                   "scan LINE | wait SECONDS | busy on|off | kill-hostd | receipt [YUAN ...].")
@click.option("--backend-url", help="A WeChat-card-API-compatible server instead of the "
              "built-in simulator (it must know the example seed's appid and codes, as "
              "`hexiao sim wechat` does); fault steps are skipped.")
@click.option("--timeout", default=30.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds any one wait may take before the step fails.")
def main(as_json: bool, scenario: Path | None, backend_url: str | None, timeout: float) -> None:
    """Run a whole lane on this machine and show it working, and surviving faults.

    Exit status: 0 all steps as expected, 1 a step failed, 2 bad options, 3 set-up failed."""
    steps = STEPS
    if scenario is not None:
        try:
            steps = parse_scenario(scenario.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise click.BadParameter(str(e), param_hint="--scenario") from None
    sys.exit(run(Narrator(as_json), timeout, steps, backend_url))


if __name__ == "__main__":
    main()
