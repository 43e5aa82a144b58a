"""The rp2040 / esp32s3 HALs under the real MicroPython unix port, with stand-in `machine` and
`neopixel` modules that record what the HAL asks of the hardware (the boards cannot run here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hexiao.tools import micropython
from hexiao.tools.install import bundle, keys
from hexiao.tools.install import flash as F

# HID 1.11 Appendix B.1, the boot keyboard's report descriptor, as every keyboard uses it
REPORT_DESC = bytes.fromhex(
    "05010906a101050719e029e71500250175019508810295017508810195057501"
    "05081901290591029501750391019506750815002565050719002965" "8100c0")

STANDINS = r'''
import io, sys, json
log = []
feed = []  # what the scanner UART reads, chunk by chunk; then None END times, then END raises
END = [0, None]
usbs = []

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

class UART(io.IOBase):  # pollable, as the boards' UART is
    def __init__(self, i, baud, **kw): log.append(["uart", i, baud, kw["tx"].n, kw["rx"].n])
    def ioctl(self, req, arg): return arg & 1 if req == 3 else 0  # always readable
    def readinto(self, b):
        if feed:
            c = feed.pop(0)
            b[:len(c)] = c
            return len(c)
        if END[1] is None or END[0] > 0:
            END[0] -= 1
            return None
        raise END[1]

class WDT:
    def __init__(self, timeout): log.append(["wdt", timeout])
    def feed(self): log.append(["feed"])

class Builtin:
    itf_max = 2; ep_max = 3; desc_dev = b"dev"
    desc_cfg = bytes((9, 2, 75, 0, 2, 1, 0, 0x80, 0x32)) + bytes(66)

class USBDevice:
    BUILTIN_CDC = Builtin()
    def __init__(self): self.sent = []; self.ok = True; usbs.append(self)
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
CAUSE = [3]
def reset():
    log.append(["reset"])
    raise SystemExit(0)  # a board's reset never returns
m = M()
for k, v in dict(Pin=Pin, PWM=PWM, Timer=Timer, UART=UART, WDT=WDT, USBDevice=USBDevice,
                 PWRON_RESET=1, HARD_RESET=2, WDT_RESET=3, SOFT_RESET=5,
                 reset_cause=lambda: CAUSE[0], idle=lambda: None, reset=reset).items():
    setattr(m, k, v)
sys.modules["machine"] = m

class NeoPixel:
    def __init__(self, pin, n): self.pin = pin.n; self.px = [(0, 0, 0)] * n
    def __setitem__(self, i, v): self.px[i] = v
    def write(self): log.append(["led", self.pin, list(self.px[0])])
np = M(); np.NeoPixel = NeoPixel
sys.modules["neopixel"] = np
'''

SCRIPT = STANDINS + r'''
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
    class Btn:  # the button's pin, level by level (0: pressed, to ground)
        def __init__(self, seq): self.seq = list(seq)
        def value(self): return self.seq.pop(0)
    b.button = Btn([1, 0, 0, 1, 0, 1])
    presses = [b.pressed() for _ in range(5)]  # up, press, held, a bounce up and down
    import time
    time.sleep_ms(60)
    presses.append(b.pressed())  # up for 60 ms: released
    b.button = Btn([0])
    presses.append(b.pressed())  # a new press
    ctl = kb._control
    out[b.name] = {"presses": presses, "printer": b.printer,
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


def test_the_button_is_one_press_per_push_bounce_or_not(hal: dict) -> None:
    for name in ("rp2040", "esp32s3"):
        assert hal[name]["presses"] == [False, True, False, False, False, False, True]
        assert hal[name]["printer"] is None  # PRINTER not wired on the reference boards


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


# -- the board entry point (board_main), installed by `hexiao flash` from a real bundle -----------

BOARD_SCRIPT = STANDINS + r"""
cfg = json.load(open("bench.json"))
feed.extend(bytes.fromhex(c) for c in cfg["feed"])
END[0] = 3  # a few empty reads, then the UART fails (a crash) or the run ends (SystemExit)
END[1] = OSError(5) if cfg["end"] == "crash" else SystemExit(0)
CAUSE[0] = cfg["cause"]
try:
    import main  # the root main.py the board runs at boot
finally:
    keys = [r[1][2] for u in usbs for r in u.sent if r[1][2] or r[1][0]]
    json.dump({"log": log, "keys": keys, "modules": sorted(sys.modules)}, open("out.json", "w"))
"""
EAN = b"5901234123457"
EAN_KEYS = [0x27 if c == "0" else 0x1D + int(c) for c in EAN.decode()] + [0x28]
QR = b"]Q1287463512093"
BOARD_HEAP = "160k"
SAFE_WHY = "safe mode: 3 crashes in a row, last: OSError: [Errno 5] EIO"


@pytest.fixture(scope="module")
def boards(tmp_path_factory) -> dict[str, Path]:
    """rp2040 and esp32s3 bundles, built, signed and flashed onto a board folder each."""
    d = tmp_path_factory.mktemp("boards")
    keys.generate(d / "sign.key")
    key = keys.load_private_key(d / "sign.key")
    out = {}
    for name in ("rp2040", "esp32s3"):
        b = bundle.build_bundle(name, "1.0.0", 1, key, d)
        F.flash(b, keys.load_public_key(d / "sign.key.pub"), F.DirTarget.create(d / name, name))
        out[name] = d / name
    out["bundle"] = b  # esp32s3's
    out["pub"] = d / "sign.key.pub"
    return out


def board_copy(boards: dict[str, Path], name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(boards[name], root)
    (root / "config.json").write_text(json.dumps({"id": "till-1", "key": os.urandom(32).hex(),
                                                  "lane": "1"}))
    (root / "board.py").write_text(BOARD_SCRIPT)
    return root


def power(root: Path, scans: list[bytes], end: str = "crash", cause: int = 3) -> dict:
    """One boot of the board in `root`: `scans` arrive on its UART, then it fails or ends."""
    (root / "bench.json").write_text(json.dumps({"feed": [s.hex() for s in scans], "end": end,
                                                 "cause": cause}))
    # the stand-ins and this script are compiled from source in the same heap: more than
    # micropython.HEAP (the boards have ~190 KB and more); the heap is test_firmware_sim's business
    argv, env = micropython.command(root / "board.py", root, heap=BOARD_HEAP)
    r = subprocess.run(argv, env=env, cwd=root, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads((root / "out.json").read_text())
    out["stderr"] = r.stderr
    return out


@pytest.mark.parametrize("name, uart, led", [("rp2040", ["uart", 0, 9600, 0, 1], 16),
                                             ("esp32s3", ["uart", 1, 9600, 17, 18], 48)])
def test_the_flashed_root_main_runs_the_app_on_its_hal(boards, tmp_path: Path, name: str,
                                                        uart: list, led: int) -> None:
    root = board_copy(boards, name, tmp_path)
    assert (root / "main.py").read_text() == bundle.ROOT_MAIN % (name, name)
    out = power(root, [b"]E0" + EAN + b"\r"], cause=1)
    mods = set(out["modules"])
    assert {f"hexiao.firmware.hal_{name}", "hexiao.firmware.app"} <= mods
    assert "hexiao.firmware.install_check" not in mods  # dropped after the boot check
    log = out["log"]
    assert uart in log and ["wdt", 8000] in log and ["feed"] in log
    assert out["keys"] == EAN_KEYS  # the app typed the product through the USB keyboard
    # the UART failing is a crash: recorded (pending: the board resets itself), then reset
    assert log[-1] == ["reset"]
    fw = (root / "crash").read_text().split(" ")[2]
    assert (root / "crash").read_text() == f"1 1 {fw} OSError: [Errno 5] EIO"
    assert "crash 1: OSError: [Errno 5] EIO" in out["stderr"]  # hal note: errors to the console


def test_three_crashes_then_safe_mode_types_products_only(boards, tmp_path: Path) -> None:
    root = board_copy(boards, "rp2040", tmp_path)
    for n in (1, 2, 3):  # rp2040: machine.reset() comes back as a watchdog reset
        out = power(root, [], cause=3 if n > 1 else 1)
        assert out["log"][-1] == ["reset"] and "hexiao.firmware.app" in out["modules"]
        assert (root / "crash").read_text().startswith(f"{n} 1 ")
    out = power(root, [b"]E0" + EAN + b"\r\n", QR + b"\r\n"], end="exit", cause=3)
    assert "hexiao.firmware.app" not in out["modules"]  # nor the link
    assert out["keys"] == EAN_KEYS  # the EAN typed, the QR not
    steps = [e for e in out["log"] if e[0] in ("led", "timer")]
    blue = ["led", 16, [0, 0, 64]]
    # error beep (80 on, 50 off...) and blue at once, then again for the refused QR
    assert steps == 2 * [["timer", 80], blue]
    assert SAFE_WHY in out["stderr"] and "reset" not in str(out["log"])
    out = power(root, [], end="exit", cause=5)  # a soft reset: still safe
    assert "hexiao.firmware.app" not in out["modules"]
    out = power(root, [], cause=1)  # power cycled: the application again
    assert "hexiao.firmware.app" in out["modules"] and out["log"][-1] == ["reset"]
    assert (root / "crash").read_text().startswith("1 1 ")


def test_an_unprovisioned_board_passes_products_in_safe_mode(boards, tmp_path: Path) -> None:
    root = board_copy(boards, "esp32s3", tmp_path)
    (root / "config.json").unlink()
    out = power(root, [b"]E0" + EAN + b"\r", QR + b"\r"], end="exit", cause=1)
    assert "safe mode: not provisioned (no config.json)" in out["stderr"]
    assert out["keys"] == EAN_KEYS and "hexiao.firmware.app" not in out["modules"]
    assert not (root / "crash").exists()


def test_a_tampered_board_installation_stays_at_the_repl(boards, tmp_path: Path) -> None:
    root = board_copy(boards, "rp2040", tmp_path)
    (root / "main.py").write_text((root / "main.py").read_text() + "# edited\n")
    out = power(root, [b"]E0" + EAN + b"\r"], cause=1)
    assert "refused: changed since it was installed: main.py" in out["stderr"]
    assert out["keys"] == [] and "reset" not in str(out["log"])
    assert "hexiao.firmware.hal_rp2040" not in out["modules"]


class CutBeforeBootStub(F.DirTarget):
    """A board unplugged right after the folder commit, before /main.py.new is moved."""

    def rename(self, src: str, dst: str) -> None:
        if src == "/main.py.new":
            raise F.TargetGone("unplugged")
        super().rename(src, dst)


def test_flash_installs_the_boot_stub_and_finishes_it_after_a_cut(boards, tmp_path) -> None:
    root = tmp_path / "esp32s3"
    shutil.copytree(boards["esp32s3"], root)
    pub = keys.load_public_key(boards["pub"])
    stub = (root / "main.py").read_bytes()
    assert F.flash(boards["bundle"], pub, F.DirTarget(root)).action == "up-to-date"
    (root / "main.py").unlink()  # not up to date without it: installed again
    r = F.flash(boards["bundle"], pub, F.DirTarget(root))
    assert r.action == "installed" and (root / "main.py").read_bytes() == stub
    (root / "main.py").write_text("print('an old stub')\n")
    with pytest.raises(F.InstallError, match="lost the device"):
        F.flash(boards["bundle"], pub, CutBeforeBootStub(root))
    assert (root / "main.py.new").read_bytes() == stub and (root / "hexiao.old").is_dir()
    r = F.flash(boards["bundle"], pub, F.DirTarget(root))
    assert r.action == "installed" and (root / "main.py").read_bytes() == stub
    assert sorted(p.name for p in root.iterdir()) == ["board.json", "hexiao", "main.py"]
