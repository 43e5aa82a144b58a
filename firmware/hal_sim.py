# The sim board: the firmware on the MicroPython unix port, for tests and the demo.
#
# - link (the board's USB CDC): stdin/stdout, which carry frames and nothing else;
# - scanner UART: the file named by scanner=PATH (a pty or FIFO a test writes scan lines to);
#   the program ends when it hangs up;
# - HID keyboard: the file named by hid=PATH gets one line per 8-byte boot-keyboard report,
#   `HID <modifiers, 2 hex digits> <first keycode, 2 hex digits>`; every keystroke is a press
#   report then a release report `HID 00 00` (the other report bytes are always 0 here);
# - buzzer, LED and display: one JSON object per line on stderr, like linkpeer's:
#   {"ev": "verdict", "scan_id", "outcome", "beep", "led", "text"} (enum names of SPEC §6.6),
#   and every log entry as {"ev": "log", "seq", "level", "text"};
# - flash: files in state=DIR (none given: nothing persists);
# - printer (the second UART): the file named by printer=PATH gets the ESC/POS bytes; none given:
#   the board has no printer;
# - button: the file named by button=PATH; every byte appended to it is one press.

import os
import select
import sys
from json import dumps

from hexiao.protocol.messages import BEEPS, LEDS, OUTCOMES


class Board:
    name = "sim"
    rx = tx = None  # stdin/stdout

    def __init__(self, a):
        self.reset = a.get("reset", "power_on")
        self.state = a.get("state")
        self.scan = open(a["scanner"], "rb")  # noqa: SIM115 - open for the run
        self.hid = open(a["hid"], "a")  # noqa: SIM115
        self._p = select.poll()
        self._p.register(self.scan, select.POLLIN)
        self._one = bytearray(1)
        self._gone = False
        p = a.get("printer")
        self.printer = open(p, "ab", 0) if p else None  # noqa: SIM115 - unbuffered, for the run
        self.button = a.get("button")
        self._presses = self._size(self.button)  # bytes there before boot are no presses

    def _size(self, path):
        try:
            return os.stat(path)[6] if path else 0
        except OSError:  # not there yet
            return 0

    def pressed(self):
        n = self._size(self.button)
        if n > self._presses:
            self._presses += 1
            return True
        return False

    def read(self, buf):
        """Scanner bytes available now (never waits), up to len(buf); -1 once hung up."""
        n = 0
        one = self._one
        while not self._gone and n < len(buf) and self._p.poll(0):
            try:
                if not self.scan.readinto(one):
                    self._gone = True
                    break
            except OSError:  # EIO: the pty's other end closed
                self._gone = True
                break
            buf[n] = one[0]
            n += 1
        return -1 if self._gone and not n else n

    def key(self, mod, usage):
        self.hid.write("HID %02x %02x\n" % (mod, usage))
        self.hid.flush()

    def verdict(self, sid, outcome, beep, led, text):
        # reserved values show as info/none/off
        emit({"ev": "verdict", "scan_id": sid,
              "outcome": OUTCOMES[outcome] if outcome < len(OUTCOMES) else "info",
              "beep": BEEPS[beep] if beep < len(BEEPS) else "none",
              "led": LEDS[led] if led < len(LEDS) else "off", "text": text})

    def note(self, seq, level, text):
        emit({"ev": "log", "seq": seq, "level": level, "text": text})

    def load(self, name):
        if self.state:
            try:
                with open(self.state + "/" + name, "rb") as f:
                    return f.read()
            except OSError:
                pass
        return None

    def save(self, name, data):
        # atomic: a power cut leaves the old file or the new one, never half of one
        if self.state:
            path = self.state + "/" + name
            with open(path + ".new", "wb") as f:
                f.write(data)
            os.rename(path + ".new", path)

    def idle(self):
        pass  # a real board feeds its watchdog here


def emit(obj):
    sys.stderr.write(dumps(obj) + "\n")
