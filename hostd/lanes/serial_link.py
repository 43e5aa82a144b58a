"""The host end of a device link over a serial port (USB CDC, a pty, or any pyserial URL).

SerialLink owns one pyserial port and one sans-I/O `Link(HOST, ...)`: it reads what the port
has, feeds the link, polls it when its next timeout is due, writes what the link wants to send,
and hands every link event to a callback. Run it on its own thread with start()/close(), or drive
it yourself with step().

Rules kept here:
- every Link call and port write happens under one lock, so send() may be called from any
  thread (including from the callback, which runs on the link thread, outside the lock);
- waiting never overshoots the link's next timeout: a wake pipe interrupts the wait when send()
  moves the timeout earlier or close() is called (on ports without a file descriptor, such as
  pyserial's loop:// or Windows ports, the wait is a short sleep instead);
- a port that fails (device unplugged, pty closed) ends the loop with one EV_PORT_CLOSED event;
  the session's own events (EV_EXPIRED for unconfirmed messages) are not invented here;
- a port opened for one device (open(..., device=kid)) is tied to it: the link gets no key for
  any other device id, so a session there can only be that device's (whose key, if missing,
  is looked for again at most every RELOAD_S: one provisioned while hostd runs is picked up).
  Frames naming another id are refused by the link (`kid`), counted as `foreign_device` and
  reported as EV_FOREIGN, once per id at once and then at most every FOREIGN_REPORT_MS with the
  frames since: whether the id has a key in the keystore (a mis-cabled lane, or someone with
  that device's key) or not (an unprovisioned device, or a forgery: the kid is read before any
  MAC).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import serial
from hexiao.hostd.keystore import KeystoreError
from hexiao.protocol.link import HOST, Link

Event = tuple[Any, ...]
EV_PORT_CLOSED = "port_closed"  # (EV_PORT_CLOSED, reason): the port failed or was closed
# (EV_FOREIGN, kid, known, frames): frames naming a device id this port is not tied to; known:
# that id has a key in the keystore
EV_FOREIGN = "foreign_device"
FOREIGN_REPORT_MS = 60_000
_FOREIGN_IDS = 8  # ids tracked at once (a forger can name any); more are reported as b""
RELOAD_S = 5.0  # the keystore re-read at most this often while the port's device has no key

_READ_MAX = 4096
_IDLE_WAIT_MS = 500  # longest wait with no link timeout pending (bounds close() latency w/o fd)
_SLEEP_NO_FD_S = 0.002


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


def keystore_from(keys: Mapping[bytes, bytes]) -> Callable[[bytes], bytes | None]:
    """A Link keystore (kid -> 32-byte device key or None) over a mapping."""
    return lambda kid: keys.get(bytes(kid))


def kid_text(kid: bytes) -> str:
    """A kid as a config device id: its text ("hx-0001") if that reads back, else "hex:..."."""
    try:
        text = kid.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable() and not text.startswith("hex:"):
        return text
    return "hex:" + kid.hex()


class PortTie:
    """A Link keystore for a port tied to one device: that device's key, nothing for any other
    id, whose frames are counted here (see the module's rules)."""

    def __init__(self, kid: bytes, keystore: Callable[[bytes], bytes | None]) -> None:
        self.kid, self.keystore = bytes(kid), keystore
        self.counters: dict[str, int] = {}  # the link's, once SerialLink has it
        self._pending: dict[bytes, int] = {}  # frames per foreign id since its last report
        self._reported: dict[bytes, int] = {}  # id -> when it was last reported (ms)
        self._reloaded = -RELOAD_S

    def __call__(self, kid: bytes) -> bytes | None:
        kid = bytes(kid)
        if kid == self.kid:
            key = self.keystore(kid)
            return key if key is not None else self._reload(kid)
        self.counters["foreign_device"] = self.counters.get("foreign_device", 0) + 1
        if kid not in self._pending and len(self._pending) >= _FOREIGN_IDS:
            kid = b""
        self._pending[kid] = self._pending.get(kid, 0) + 1
        return None

    def _reload(self, kid: bytes) -> bytes | None:
        # its key may have been provisioned since: re-read the keystore, at most every
        # RELOAD_S, so that a device without a key costs no file read per frame
        reload = getattr(self.keystore, "reload", None)
        now = time.monotonic()
        if reload is None or now - self._reloaded < RELOAD_S:
            return None
        self._reloaded = now
        with contextlib.suppress(KeystoreError, OSError):  # the lane says what is wrong
            reload()
        return self.keystore(kid)

    def report(self, now: int) -> list[Event]:
        """EV_FOREIGN events that are due (under the caller's lock)."""
        out: list[Event] = []
        for kid, n in list(self._pending.items()):
            last = self._reported.get(kid)
            if last is not None and now - last < FOREIGN_REPORT_MS:
                continue
            del self._pending[kid]
            self._reported[kid] = now
            out.append((EV_FOREIGN, kid, bool(kid) and self.keystore(kid) is not None, n))
        if len(self._reported) > 4 * _FOREIGN_IDS:  # forget the oldest reports
            for kid in sorted(self._reported, key=self._reported.__getitem__)[:_FOREIGN_IDS]:
                del self._reported[kid]
        return out


class SerialLink:
    """One host-side link session over one serial port."""

    def __init__(
        self,
        port: serial.SerialBase,
        link: Link,
        on_event: Callable[[Event], None],
        *,
        clock: Callable[[], int] = monotonic_ms,
        tie: PortTie | None = None,
    ) -> None:
        if link.role != HOST:
            raise ValueError("SerialLink drives the host end of a link")
        self.tie = tie  # the link's keystore, when the port is tied to one device
        if tie is not None:
            tie.counters = link.counters
        self.port = port
        self.link = link
        self.on_event = on_event
        self.clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._fd: int | None = port.fileno()
        except (AttributeError, NotImplementedError, ValueError):
            self._fd = None
        self._wake_r, self._wake_w = os.pipe() if self._fd is not None else (-1, -1)
        # (device-to-host, host-to-device) byte taps, e.g. a capture; None: nothing recorded
        self.taps: tuple[Callable[[bytes], Any], Callable[[bytes], Any]] | None = None

    @classmethod
    def open(
        cls,
        url: str,
        keystore: Callable[[bytes], bytes | None],
        on_event: Callable[[Event], None],
        *,
        device: bytes | None = None,
        **link_args: Any,
    ) -> SerialLink:
        """Open `url` (a device path or pyserial URL) raw and non-blocking, with a fresh host
        Link using os.urandom for its nonces; tied to `device` (its kid) if given."""
        tie = PortTie(device, keystore) if device is not None else None
        port = serial.serial_for_url(url, timeout=0, exclusive=True)
        link = Link(HOST, os.urandom, keystore=tie or keystore, **link_args)
        return cls(port, link, on_event, tie=tie)

    # -- application side -------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> bool:
        """Queue an application message on the link; False if its queue is full."""
        with self._lock:
            ok = self.link.send(msg, self.clock())
            self._write()
        self._wake()
        return ok

    def poke(self, kid: bytes) -> None:
        """Ask device `kid` to start a session now (Link.poke); ValueError without its key."""
        with self._lock:
            self.link.poke(kid, self.clock())
            self._write()
        self._wake()

    @property
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self.link.counters)

    def is_open(self) -> bool:
        with self._lock:
            return self.link.is_open()

    # -- the loop -----------------------------------------------------------------------------

    def step(self, max_wait_ms: int = _IDLE_WAIT_MS) -> bool:
        """Wait (at most max_wait_ms, never past the link's next timeout) for bytes, feed them,
        poll, write and deliver events. False once the port has failed or close() was called."""
        if self._stop.is_set():
            return False
        with self._lock:
            due = self.link.next_timeout()
        wait = max_wait_ms if due is None else max(0, min(max_wait_ms, due - self.clock()))
        self._wait(wait / 1000)
        events: list[Event] = []
        try:
            data = self.port.read(_READ_MAX)
            taps = self.taps
            if data and taps is not None:
                taps[0](data)
            with self._lock:
                now = self.clock()
                if data:
                    events.extend(self.link.receive(data, now))
                events.extend(self.link.poll(now))
                self._write()
                if self.tie is not None:
                    events.extend(self.tie.report(now))
        except (serial.SerialException, OSError) as e:
            self._stop.set()
            events.append((EV_PORT_CLOSED, str(e) or type(e).__name__))
        for ev in events:
            self.on_event(ev)
        return not self._stop.is_set()

    def run(self) -> None:
        while self.step():
            pass

    def start(self) -> None:
        """Run the loop on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self.run, name="hexiao-serial-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Make run() return soon; the port stays open for the thread that runs it to close."""
        self._stop.set()
        self._wake()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the loop, wait for the thread, close the port. Idempotent."""
        self._stop.set()
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        with contextlib.suppress(serial.SerialException, OSError):
            self.port.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> SerialLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _write(self) -> None:
        # under the lock
        data = self.link.data_to_send()
        if data:
            taps = self.taps
            if taps is not None:
                taps[1](data)
            self.port.write(data)

    def _wait(self, seconds: float) -> None:
        if self._fd is None:
            time.sleep(min(seconds, _SLEEP_NO_FD_S))
            return
        try:
            ready, _, _ = select.select([self._fd, self._wake_r], [], [], seconds)
        except (OSError, ValueError):  # the port or the wake pipe was closed under us
            return
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 512)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\x01")


class EventLog:
    """A SerialLink's events, recorded on its thread for other threads to look at and wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[tuple[Any, ...]] = []

    def append(self, ev: tuple[Any, ...]) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def of(self, kind: str, type_: str | None = None) -> list[tuple[Any, ...]]:
        """Events of one kind (EV_MESSAGE, EV_ACKED, ...), of one message type if given."""
        with self.cond:
            return [e for e in self.events
                    if e[0] == kind and (type_ is None or e[1]["type"] == type_)]

    def wait(self, pred: Callable[[], Any], timeout: float, what: str,
             alive: Callable[[], bool] = lambda: True) -> Any:
        """pred()'s first true value; TimeoutError after `timeout` s, or at once if not alive()."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred()
                if got:
                    return got
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
                if not alive():
                    raise TimeoutError(f"the peer exited while waiting for {what}")
                self.cond.wait(min(left, 0.2))
