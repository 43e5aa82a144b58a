"""The rp2040 / esp32s3 HALs under the real MicroPython unix port, with stand-in `machine` and
`neopixel` modules that record what the HAL asks of the hardware (the boards cannot run here)."""

from __future__ import annotations

import json

import pytest

# HID 1.11 Appendix B.1, the boot keyboard's report descriptor, as every keyboard uses it
REPORT_DESC = bytes.fromhex(
    "05010906a101050719e029e71500250175019508810295017508810195057501"
    "05081901290591029501750391019506750815002565050719002965" "8100c0")

SCRIPT = r'''
import sys, json
log = []

class Pin:
    IN = 0; PULL_UP = 1
    def __init__(self, n, *a): self.n = n
    def value(self): return 0

class PWM:
    def __init__(self, pin): self.pin = pin.n
    def freq(self, f): log.append(["freq", f])
    def duty_u16(self, d): log.append(["duty", d])

class Timer:
    ONE_SHOT = 0
    def __init__(self, i): self.id = i; self.cb = None
    def init(self, mode, period, callback): log.append(["timer", period]); self.cb = callback
    def deinit(self): self.cb = None

class UART:
    def __init__(self, i, baud, **kw): log.append(["uart", i, baud, kw["tx"].n, kw["rx"].n])
    def readinto(self, b): return None

class WDT:
    def __init__(self, timeout): log.append(["wdt", timeout])
    def feed(self): log.append(["feed"])

class Builtin:
    itf_max = 2; ep_max = 3; desc_dev = b"dev"
    desc_cfg = bytes((9, 2, 75, 0, 2, 1, 0, 0x80, 0x32)) + bytes(66)

class USBDevice:
    BUILTIN_CDC = Builtin()
    def __init__(self): self.sent = []; self.ok = True
    def active(self, on): log.append(["active", on])
    def config(self, dev, cfg, control_xfer_cb, xfer_cb):
        self.cfg = cfg; self.ctl = control_xfer_cb; self.done = xfer_cb
    def submit_xfer(self, ep, data):
        self.sent.append([ep, list(data)])
        if self.ok:
            self.done(ep, 0, len(data))  # completes at once
        return self.ok

class M:
    pass
m = M()
for k, v in dict(Pin=Pin, PWM=PWM, Timer=Timer, UART=UART, WDT=WDT, USBDevice=USBDevice,
                 PWRON_RESET=1, WDT_RESET=3, reset_cause=lambda: 3, idle=lambda: None).items():
    setattr(m, k, v)
sys.modules["machine"] = m

class NeoPixel:
    def __init__(self, pin, n): self.pin = pin.n; self.px = [(0, 0, 0)] * n
    def __setitem__(self, i, v): self.px[i] = v
    def write(self): log.append(["led", self.pin, list(self.px[0])])
np = M(); np.NeoPixel = NeoPixel
sys.modules["neopixel"] = np

from hexiao.firmware import hal_rp2040, hal_esp32s3
out = {}
for mod in (hal_rp2040, hal_esp32s3):
    del log[:]
    b = mod.Board()
    kb = b.kb
    b.key(2, 4); b.key(0, 0)
    kb.usb.ok = False
    b.key(0, 5)  # no host: dropped, not stuck
    busy_after_drop = kb.busy
    b.verdict(1, 2, 3, 3, "host offline")  # warning, amber
    t = b.buzzer.timer
    while t.cb:  # the timer firing, step by step
        cb = t.cb; t.cb = None; cb(t)
    b.verdict(2, 0, 9, 9, "reserved")  # reserved beep / led: silent, off
    b.idle()
    ctl = kb._control
    out[b.name] = {
        "log": log[:], "sent": kb.usb.sent, "busy_after_drop": busy_after_drop,
        "reset": b.reset, "read": b.read(bytearray(8)), "itf": kb.itf, "ep": kb.ep,
        "cfg": list(kb.usb.cfg),
        "report_desc": list(ctl(1, bytes((0x81, 6, 0, 0x22, 2, 0, 63, 0)))),
        "set_idle": ctl(1, bytes((0x21, 0x0A, 0, 0, 2, 0, 0, 0))),
        "other_itf": ctl(1, bytes((0x81, 6, 0, 0x22, 0, 0, 63, 0))),
        "stall": ctl(1, bytes((0xC0, 0x55, 0, 0, 2, 0, 0, 0))),
    }
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def hal(run_mpy, tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("hal") / "hal.py"
    script.write_text(SCRIPT)
    r = run_mpy(script)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def test_usb_descriptor_adds_a_boot_keyboard_after_the_builtin_cdc(hal: dict) -> None:
    for name in ("rp2040", "esp32s3"):
        h = hal[name]
        cfg = bytes(h["cfg"])
        assert len(cfg) == 75 + 25 and cfg[2] | cfg[3] << 8 == 100 and cfg[4] == 3
        assert cfg[75:84] == bytes((9, 4, 2, 0, 1, 3, 1, 1, 0))  # itf 2: HID boot keyboard
        assert cfg[84:93] == bytes((9, 0x21, 0x11, 1, 0, 1, 0x22, 63, 0))
        assert cfg[93:] == bytes((7, 5, 0x83, 3, 8, 0, 5))  # interrupt IN ep 3
        assert (h["itf"], h["ep"]) == (2, 0x83)
        assert bytes(h["report_desc"]) == REPORT_DESC and len(REPORT_DESC) == 63
        assert h["set_idle"] is True and h["other_itf"] is True and h["stall"] is False


def test_keys_become_boot_reports_and_a_dropped_one_does_not_wedge(hal: dict) -> None:
    h = hal["rp2040"]
    assert h["sent"] == [[0x83, [2, 0, 4, 0, 0, 0, 0, 0]], [0x83, [0] * 8],
                         [0x83, [0, 0, 5, 0, 0, 0, 0, 0]]]
    assert h["busy_after_drop"] is False


def test_verdict_plays_the_pattern_and_lights_the_led(hal: dict) -> None:
    for name, uart, led in (("rp2040", ["uart", 0, 9600, 0, 1], 16),
                            ("esp32s3", ["uart", 1, 9600, 17, 18], 48)):
        log = hal[name]["log"]
        assert uart in log and ["wdt", 8000] in log and ["feed"] in log
        steps = [e for e in log if e[0] in ("duty", "timer", "led")]
        # warning: 300 ms on, 100 off, 300 on, then silence; amber; then a reserved verdict
        assert steps == [["duty", 0], ["duty", 32768], ["timer", 300], ["led", led, [64, 24, 0]],
                         ["duty", 0], ["timer", 100], ["duty", 32768], ["timer", 300],
                         ["duty", 0], ["duty", 0], ["led", led, [0, 0, 0]]]
        assert hal[name]["reset"] == "watchdog" and hal[name]["read"] == 0
