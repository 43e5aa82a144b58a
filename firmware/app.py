# The device application (docs/architecture.md; SPEC §6.7 rules, §9.6 resent scans), on any board
# HAL (hal_sim, hal_rp2040, hal_esp32s3) that gives: name, reset, rx/tx (None: stdin/stdout),
# scan (a pollable stream), read(buf) -> n (-1: hung up), key(mod, usage), verdict(sid, outcome,
# beep, led, text), note(seq, level, text), load(name) -> bytes|None, save(name, data), idle(),
# pressed() -> True once per press of the button, printer: a stream (.write) or None.
#
# Rules kept here:
# - a product is typed from here, at once, whatever the link is doing (fail-open for sales);
#   only printable ASCII is ever typed: anything else refuses the whole product or macro;
# - a coupon scanned while no session is open gets the local "host offline" verdict and is never
#   sent (the cashier turned it away); one sent but unanswered within offline_ms also gets it,
#   and it is sent again, same scan_id and time_ms, in the next session (§9.6) - whether its
#   message expired or was acknowledged by a host that then died - so that the host can answer
#   it from its journal; that answer shows as a late verdict: its own signal (the warning beep
#   with the verdict's LED: green+warning is only ever a late accept), no slip;
# - nothing is typed unprompted after a late verdict (it could land in the next sale): a macro
#   that follows one is dropped; the cashier's one action is to rescan, which hostd answers
#   "redeemed here" with the same macro_id (typed then, once); nothing is held: a held
#   message is heap a flooded link does not have;
# - a verdict's slip and print jobs go to the board's printer as they arrive (a job's chunks in
#   seq order from 0; a chunk out of order drops the rest of its job); no printer: logged;
# - the button repeats the last verdict (sound, LED, text) for a cashier who missed it;
# - rejected frames are logged as runs, one ring entry per kind with its count (App.rejected):
#   a flood of forged frames or of line noise cannot push everything else out of the ring;
# - one select.poll loop, not asyncio: asyncio's modules cost ~8 KB of a 64 KB heap that the
#   link stack already fills to ~57 KB; a loop turn is short and no call chain is deep;
# - tables are bytes and lists, functions small (a frame over 11 words goes on the heap) but
#   few, and no comprehensions: each function is ~100 B of heap for good (raw code, object);
#   no tuples of strings either: each string in a constant tuple is a 64 B str object, where a
#   short name used as such is a shared qstr (hence the names kept as one text, split when used).

import gc
import select

from hexiao.firmware import drop
from hexiao.firmware.cdc_link import CdcLink
from hexiao.protocol import link as L

FIRMWARE = "hexiao-fw 0.1.0"
MAX_DATA = 512  # SPEC scan data limit; a longer read is dropped whole
# US layout, chars 0x20..0x7e: HID usage | 0x80 when Shift is held (a bytes literal: a hex
# text would stay in the heap beside the table)
US = (b",\x9e\xb4\xa0\xa1\xa2\xa44\xa6\xa7\xa5\xae6-78'\x1e\x1f !\"#$%&\xb33\xb6.\xb7\xb8"
      b"\x9f\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"
      b"\x99\x9a\x9b\x9c\x9d/10\xa3\xad5\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f\x10\x11\x12"
      b"\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\xaf\xb1\xb0\xb5")
SUFFIX = {"enter": 0x28, "tab": 0x2B, "none": 0}
# config name: default (the host may set them: app_config.LIMITS)
CONFIG = {"inter_key_ms": 0, "offline_ms": 3000, "char_ms": 50, "term": 13, "suffix": "enter"}
# before the first rules: what hostd pushes by default (EAN/UPC product, QR/Code 128 coupon);
# a rule's symbologies are one text of 3-character AIM ids, each starting with "]"
DEFAULT_RULES = [0, 0, [[0, "]E0]E4", None, None, None, 0],
                        [1, "]Q1]C0]Q0]d1", 8, 512, None, 0]]]
COUNTERS = ("scans products coupons verdicts offline late rejected ignored garbage overlong"
            " partial macros resent printed")
_LEVELS = 8  # log ring entries


def gs1_ok(d):
    """d is >= 2 ASCII digits ending in their GS1 mod-10 check digit."""
    n = len(d)
    if n < 2:
        return False
    s = 0
    for i in range(n):
        c = d[i] - 48
        if c < 0 or c > 9:
            return False
        if i < n - 1:
            s += c * (3 if (n - i) % 2 == 0 else 1)
    return (10 - s % 10) % 10 == d[n - 1] - 48


def classify(rules, sym, d):
    """0 product, 1 coupon, 2 ignore (SPEC §6.7): the first rule that matches, else the default."""
    n = len(d)
    for r in rules[2]:
        # r = [action, symbologies|None, min_len|None, max_len|None, prefix|None, check]; a
        # 3-character id starting with "]" is in the ids' text only where one of them starts
        if ((r[1] is None or sym in r[1]) and (r[2] is None or n >= r[2])
                and (r[3] is None or n <= r[3]) and (r[4] is None or d.startswith(r[4]))
                and (not r[5] or gs1_ok(d))):
            return r[0]
    return rules[1]


def delay_code(ms):
    return ms if ms < 128 else 128 + ms // 8  # one byte for 0..1000 ms


class App:
    def __init__(self, board, device_id, key, link_args):
        self.b = board
        self.n = dict.fromkeys(COUNTERS.split(), 0)
        self.ring = []
        self.seq = 0
        self.line = bytearray(3 + MAX_DATA)
        self.ln = 0  # bytes in line; -1 while dropping an over-long read
        self.lt = 0  # time of the line's last byte
        self.q = bytearray()  # keystrokes to type: (usage, modifiers); (0, delay code) sets delay
        self.qi = 0
        self.kat = 0  # when the next keystroke is due
        self.kd = 0
        self.sid = 1
        self.wait = []  # [scan_id, offline deadline] of coupons awaiting a verdict
        self.retry = []  # expired scan messages, for the next session
        self.macros = []  # recent macro ids (typed once)
        self.job = None  # [job_id, next seq] of the print job under way
        self.last = None  # the last verdict's (scan_id, outcome, beep, led, text): the button
        self.rj = {}  # runs of rejections in the log ring (App.rejected)
        self.peak = 0
        self.cfg = dict(CONFIG)
        self.rules = DEFAULT_RULES
        self.serve(None, "app_rules")  # rules and config from flash
        self.serve(None, "app_config")
        link_args["hello"] = {"firmware": FIRMWARE, "board": board.name,
                              "reset_cause": board.reset}
        self.cdc = CdcLink(device_id, key, self.on_event, board.rx, board.tx, **link_args)

    def log(self, level, text):
        self.seq += 1
        if len(self.ring) >= _LEVELS:
            self.ring.pop(0)
        # sliced only when too long: a slice is a copy even when nothing is cut, and the ring
        # should keep the log's own text, most often a constant of this module
        if len(text) > 48:
            text = text[:48]
        self.ring.append([self.seq, self.cdc.now() if hasattr(self, "cdc") else 0, level, text])
        self.b.note(self.seq, level, text)

    # -- scanner ----------------------------------------------------------------------------

    def byte(self, c, now):
        ln = self.ln
        self.lt = now
        if c == self.cfg["term"]:
            self.ln = 0
            if ln > 0:
                self.scanned(memoryview(self.line)[:ln], now)  # a view: d is the one copy
        elif ln < 0 or (ln == 0 and c in (10, 13)):
            pass  # dropping an over-long read; or the other half of a CR LF
        elif ln == len(self.line):
            self.ln = -1
            self.count("overlong", 4, "scan over 512 bytes dropped")
        else:
            self.line[ln] = c
            self.ln = ln + 1

    def count(self, name, level=None, text=None):
        self.n[name] += 1
        if text:
            self.log(level, text)

    def scanned(self, line, now):
        if len(line) < 4 or line[0] != 0x5D or not (0x20 < line[1] < 0x7F and
                                                    0x20 < line[2] < 0x7F):
            self.count("garbage", 4, "scan without AIM id")
            return
        sym = bytes(line[:3]).decode()
        d = bytes(line[3:])
        self.n["scans"] += 1
        act = classify(self.rules, sym, d)
        if act == 1:
            return self.coupon(sym, d, now)
        if act != 0:
            self.n["ignored"] += 1
            return
        # a product: typed at once (queued here, typed by tick)
        for c in d:
            if c < 0x20 or c > 0x7E:
                self.count("rejected", 4, "product not ASCII: not typed")
                return
        self.n["products"] += 1
        q = self.q
        q.append(0)
        q.append(delay_code(self.cfg["inter_key_ms"]))
        for c in d:
            u = US[c - 32]
            q.append(u & 0x7F)
            q.append(2 if u & 0x80 else 0)
        if SUFFIX[self.cfg["suffix"]]:
            q.append(SUFFIX[self.cfg["suffix"]])
            q.append(0)

    def coupon(self, sym, d, now):
        self.n["coupons"] += 1
        sid = self.sid
        self.sid = sid + 1
        m = {"type": "scan", "scan_id": sid, "symbology": sym, "data": d, "time_ms": now}
        if self.cdc.link.is_open() and self.cdc.send(m):
            self.wait.append([sid, now + self.cfg["offline_ms"], m])
        else:
            self.offline(sid)

    def offline(self, sid):
        self.n["offline"] += 1
        self.show(sid, 2, 3, 3, "host offline")  # offline, warning beep, amber

    def show(self, sid, outcome, beep, led, text):
        self.last = (sid, outcome, beep, led, text)
        self.b.verdict(sid, outcome, beep, led, text)

    # -- link -------------------------------------------------------------------------------

    def on_event(self, ev):
        # link events, and messages dispatched by type, in one function (each costs heap)
        kind = ev[0]
        if kind == L.EV_MESSAGE:
            msg = ev[1]
            t = msg["type"]
            if t == "verdict":
                self.verdict(msg)
            elif t == "ping":
                self.cdc.send({"type": "pong", "data": msg.get("data", b"")})
            elif t == "keys" and self.last and self.last[2] == 3 and self.last[3] != 3:
                self.log(5, "late macro: rescan")  # warning, not amber: a late verdict's
            elif t != "pong":  # (this device sends no pings) keys, print, rules, config, ...
                self.serve(msg)
        elif kind == L.EV_OPEN:
            self.log(6, "session open")
            while self.retry:
                self.n["resent"] += 1
                self.cdc.send(self.retry.pop(0))
            for w in self.wait:  # delivered to a host that may be gone: ask this one too
                self.n["resent"] += 1
                self.cdc.send(w[2])
        elif kind == L.EV_EXPIRED:
            msg = ev[1]
            if msg["type"] == "scan" and len(self.retry) < 4:
                self.retry.append(msg)
            self.log(4, "expired %s" % msg["type"])
        elif kind == L.EV_REJECTED:
            self.rejected(ev[1], ev[3])
        elif kind == L.EV_CLOSED:
            self.log(5, "closed: %s" % ev[1])
        elif kind == L.EV_NACKED:
            self.log(4, "nacked %s %s" % (ev[1]["type"], ev[2]))

    def rejected(self, code, frames):
        # one log entry per kind of rejection, with its count: line noise (its four codes
        # together; health tells them apart) or one code of tampering. Twenty forged frames
        # would flush the ring otherwise. The entry is renumbered as the newest when it grows,
        # so a host reading logs "since" sees it again; the board hears at 1, 2, 4, 8... frames
        key = "noise" if code in L.NOISE else code
        run = self.rj.get(key)  # [its entry, frames]
        n = 0
        if run is not None and run[0] in self.ring:
            n = run[1]
            self.ring.remove(run[0])
        m = n + frames
        text = "rejected " + key if m == 1 else "rejected %s x%d" % (key, m)
        if m ^ n > n:  # a higher top bit: a power of two was reached
            self.log(4, text)
        else:
            self.seq += 1
            self.ring.append([self.seq, self.cdc.now(), 4, text])
        self.rj[key] = [self.ring[-1], m]

    def verdict(self, msg):
        sid = msg["scan_id"]
        for w in self.wait:
            if w[0] == sid:
                self.wait.remove(w)
                self.n["verdicts"] += 1
                self.show(sid, msg["outcome"], msg["beep"], msg["led"], msg["text"])
                if "slip" in msg:
                    self.serve(msg, "app_jobs")
                return
        # after the local offline verdict (or from an earlier session): its own signal
        for m in self.retry:
            if m["scan_id"] == sid:  # answered: not to be sent again
                self.retry.remove(m)
                break
        self.count("late", 5, "late verdict %d" % sid)
        self.show(sid, msg["outcome"], 3, msg["led"], msg["text"])

    def serve(self, msg, part=None):
        # a host request (or boot's restore from flash: msg None) by an overlay, app_jobs,
        # app_rules, app_config, app_update, app_fwchunk or app_status, loaded for it and
        # dropped before the answer is sent: its code is not in the heap while the till sells,
        # nor while an answer is encoded; an overlay may hand a request on to another one
        # (app_fwchunk <-> app_update: the two together do not fit beside a session)
        if part is None:
            t = msg["type"]
            part = ("app_jobs" if t == "keys" or t == "print" else "app_rules" if t == "rules"
                    else "app_config" if t[:7] == "config_" else "app_fwchunk" if t[:3] == "fw_"
                    else "app_status")  # *_get
        s = __import__("hexiao.firmware." + part, None, None, ("serve",))
        try:
            if msg is None:
                s.restore(self, SUFFIX)
            else:
                msg = s.serve(self, msg, FIRMWARE, SUFFIX)
        finally:
            s = None
            drop(part)
        if type(msg) is tuple:  # (part, msg): handed on to another overlay, this one gone
            return self.serve(msg[1], msg[0])
        if msg is not None:
            self.cdc.send(msg)

    def sample(self):
        gc.collect()
        self.peak = max(self.peak, gc.mem_alloc())

    # -- the loop ---------------------------------------------------------------------------

    def tick(self, now):
        """Type what is due, give offline verdicts that are due, drop a stalled partial read;
        returns the ms until the next of these (None: nothing pending)."""
        q = self.q
        while self.qi < len(q) and now >= self.kat:
            u = q[self.qi]
            m = q[self.qi + 1]
            self.qi += 2
            if u == 0:
                self.kd = m if m < 128 else (m - 128) * 8
                continue
            self.b.key(m, u)
            self.b.key(0, 0)
            self.kat = now + self.kd
        if self.qi and self.qi >= len(q):
            self.q = bytearray()
            self.qi = 0
        for w in self.wait:
            if now >= w[1]:
                self.wait.remove(w)
                self.offline(w[0])
                if self.cdc.link.is_open():  # asked again now (a host that restarted)...
                    self.n["resent"] += 1
                    self.cdc.send(w[2])
                elif len(self.retry) < 4:  # ...or in the next session (see the rules)
                    self.retry.append(w[2])
                break  # the list changed under the loop: the next turn looks again
        if self.ln and now - self.lt >= self.cfg["char_ms"]:
            if self.ln > 0:  # a read cut short is never typed; an over-long one was counted
                self.count("partial", 4, "partial scan dropped")
            self.ln = 0
        # when the next of these is due (one function: each costs heap for good)
        t = self.kat if self.qi < len(self.q) else None
        for w in self.wait:
            t = w[1] if t is None or w[1] < t else t
        if self.ln > 0:
            c = self.lt + self.cfg["char_ms"]
            t = c if t is None else min(t, c)
        return None if t is None else max(0, t - now)

    def run(self):
        """Until the scanner input hangs up (the sim board's way to end)."""
        cdc = self.cdc
        b = self.b
        buf = bytearray(64)
        p = select.poll()
        p.register(b.scan, select.POLLIN)
        p.register(cdc.rx, select.POLLIN)
        up = True  # the CDC port; a host that hangs up leaves the device working offline
        cdc.connect()
        while True:
            now = cdc.now()
            t = self.tick(now)
            lt = cdc.link.next_timeout() if up else None
            if lt is not None:
                t = max(0, lt - now) if t is None else min(t, max(0, lt - now))
            p.poll(100 if t is None else min(t, 100))  # the button: looked at every 100 ms
            if up and not cdc.step(0):
                up = False
                p.unregister(cdc.rx)
                self.log(4, "host port hung up")
            n = b.read(buf)
            if n < 0:
                return
            if b.pressed() and self.last:
                b.verdict(*self.last)
            now = cdc.now()
            for i in range(n):
                self.byte(buf[i], now)
            b.idle()
            self.sample()
