# The rp2040 board (Raspberry Pi Pico wiring): scan engine on UART0 (GP0 tx, GP1 rx), buzzer
# on GP15 (PWM), one NeoPixel on GP16, button on GP14 (to ground), USB: built-in CDC (the link,
# sys.stdin/stdout) + HID keyboard (hal_usb). The same surface as hal_sim.Board.

import sys
import time

import machine
import micropython
from hexiao.firmware.hal_usb import Keyboard

# beep (SPEC 6.6: none, ok, error, warning) -> on, off, on, ... durations in 10 ms units
PATTERNS = (b"", b"\x0a", b"\x08\x05\x08\x05\x08", b"\x1e\x0a\x1e")
# led (off, green, red, amber, blue) -> (r, g, b)
COLOURS = ((0, 0, 0), (0, 64, 0), (64, 0, 0), (64, 24, 0), (0, 0, 64))
TONE_HZ = 2700
RESETS = {"PWRON_RESET": "power_on", "WDT_RESET": "watchdog", "HARD_RESET": "hard",
          "SOFT_RESET": "soft", "DEEPSLEEP_RESET": "deepsleep"}


def reset_name(cause):
    for k, v in RESETS.items():
        if getattr(machine, k, None) == cause:
            return v
    return "other"


class Buzzer:
    """Plays a pattern from a one-shot timer: no loop turn waits for a tone to end."""

    def __init__(self, pwm, timer):
        self.pwm = pwm
        self.timer = timer
        self.pat = b""
        self.i = 0

    def play(self, beep):
        self.timer.deinit()
        self.pat = PATTERNS[beep] if beep < len(PATTERNS) else b""
        self.i = 0
        self.step(None)

    def step(self, _t):
        i = self.i
        if i >= len(self.pat):
            self.pwm.duty_u16(0)
            return
        self.pwm.duty_u16(32768 if i % 2 == 0 else 0)  # even steps sound, odd are silence
        self.i = i + 1
        self.timer.init(mode=machine.Timer.ONE_SHOT, period=self.pat[i] * 10,
                        callback=self.step)


class Board:
    name = "rp2040"
    rx = tx = None  # sys.stdin/stdout: the built-in CDC
    PINS = (0, 0, 1, 15, 16, 14, -1)  # uart id, tx, rx, buzzer, led, button, timer id
    PRINTER = None  # (uart id, tx pin, baud) of a thermal printer on a second UART, if wired
    state = ""  # files at the root of the board's flash

    def __init__(self):
        from neopixel import NeoPixel

        p = self.PINS
        micropython.kbd_intr(-1)  # Ctrl-C on the CDC is link data, not an interrupt
        self.reset = reset_name(machine.reset_cause())
        self.scan = machine.UART(p[0], 9600, tx=machine.Pin(p[1]), rx=machine.Pin(p[2]),
                                 rxbuf=1024, timeout=0)
        pwm = machine.PWM(machine.Pin(p[3]))
        pwm.freq(TONE_HZ)
        pwm.duty_u16(0)
        self.buzzer = Buzzer(pwm, machine.Timer(p[6]))
        self.led = NeoPixel(machine.Pin(p[4]), 1)
        self.button = machine.Pin(p[5], machine.Pin.IN, machine.Pin.PULL_UP)
        self._down = 0  # ticks_ms of the last press seen; 0: the button is up
        self.printer = None
        if self.PRINTER:
            u = self.PRINTER
            self.printer = machine.UART(u[0], u[2], tx=machine.Pin(u[1]), txbuf=1024)
        self.kb = Keyboard()
        self.wdt = machine.WDT(timeout=8000)

    def read(self, buf):
        return self.scan.readinto(buf) or 0  # None: nothing waiting

    def key(self, mod, usage):
        self.kb.key(mod, usage)

    def verdict(self, sid, outcome, beep, led, text):
        self.buzzer.play(beep)
        self.led[0] = COLOURS[led] if led < len(COLOURS) else COLOURS[0]
        self.led.write()
        del sid, outcome, text  # no display on this board: the host's screen shows the text

    def note(self, seq, level, text):
        if level <= 3:  # errors also go to the console when one is attached (not the CDC)
            sys.stderr.write("%d %s\n" % (seq, text))

    def pressed(self):
        # True once per press: the pin going low, then staying up for 50 ms (contact bounce)
        if not self.button.value():
            was, self._down = self._down, time.ticks_ms() or 1
            return not was
        if self._down and time.ticks_diff(time.ticks_ms(), self._down) >= 50:
            self._down = 0
        return False

    def load(self, name):
        try:
            with open(self.state + name, "rb") as f:
                return f.read()
        except OSError:
            return None

    def save(self, name, data):
        import os

        with open(self.state + name + ".new", "wb") as f:
            f.write(data)
        try:
            os.rename(self.state + name + ".new", self.state + name)
        except OSError:  # a filesystem whose rename does not replace: the window is small
            os.remove(self.state + name)
            os.rename(self.state + name + ".new", self.state + name)

    def idle(self):
        self.wdt.feed()
