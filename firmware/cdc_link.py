# The device end of the link over USB CDC: stdin/stdout (a pty on the unix port).
#
# Rules kept here:
# - stdout carries frames and nothing else; diagnostics go elsewhere (stderr on the unix port);
# - reads never block past the next link timeout: select.poll, then one byte at a time while
#   the port is readable, because a FileIO read(n) waits for all n bytes on a blocking fd;
# - time is a growing int of ms since start: ticks_ms() wraps, the Link compares plain ints;
# - imports under CPython too (tests, tools), with a time shim.

import select
import sys
from os import urandom as entropy  # every port the firmware runs on has it

from hexiao.protocol.link import DEVICE, Link

if sys.implementation.name == "micropython":
    from time import ticks_diff, ticks_ms
else:  # CPython (left out of device builds: tools/terse.py)
    from time import monotonic

    def ticks_ms():
        return int(monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

_CHUNK = 128  # bytes read per step at most: poll() and writes interleave with a flood, and
# the copies a read makes on its way through the deframer stay small in a 64 KB heap


class CdcLink:
    """Drive a device Link over a byte stream; handler(event) gets every link event."""

    def __init__(self, device_id, device_key, handler, rx=None, tx=None, **link_args):
        self.link = Link(DEVICE, entropy, device_id=device_id, device_key=device_key, **link_args)
        self.handler = handler
        self.rx = rx or sys.stdin.buffer
        self.tx = tx or sys.stdout.buffer
        self._poller = select.poll()
        self._poller.register(self.rx, select.POLLIN)
        self._one = bytearray(1)
        self._buf = bytearray(_CHUNK)
        self._mv = memoryview(self._buf)  # slicing a view copies nothing
        self._t = ticks_ms()
        self._ms = 0
        self.open = True  # False once the port has hung up

    def now(self):
        t = ticks_ms()
        self._ms += ticks_diff(t, self._t)
        self._t = t
        return self._ms

    def connect(self):
        self._events(self.link.connect(self.now()))

    def send(self, msg):
        """Queue a message; False if the link's queue is full."""
        ok = self.link.send(msg, self.now())
        self._flush()
        return ok

    def step(self, max_wait_ms=1000):
        """Wait for bytes or the next timeout, then feed, poll and write. False on hang-up."""
        link = self.link
        t = link.next_timeout()
        wait = max_wait_ms if t is None else max(0, min(max_wait_ms, t - self.now()))
        if self._poller.poll(wait):
            n = self._read()
            if n:
                self._events(link.receive(bytes(self._mv[:n]), self.now()))
        self._events(link.poll(self.now()))
        return self.open

    def _read(self):
        n = 0
        one = self._one
        try:
            while n < _CHUNK:
                r = self._poller.poll(0)
                if not r:
                    break
                if not self.rx.readinto(one):
                    self.open = False  # end of file: the host side is gone
                    break
                self._buf[n] = one[0]
                n += 1
        except OSError:  # EIO on a pty whose other end closed
            self.open = False
        return n

    def _events(self, events):
        self._flush()
        for ev in events:
            self.handler(ev)
        self._flush()

    def _flush(self):
        data = self.link.data_to_send()
        if data and self.open:
            try:
                self.tx.write(data)
                self.tx.flush()
            except OSError:  # EIO: the host side hung up while we were answering
                self.open = False
