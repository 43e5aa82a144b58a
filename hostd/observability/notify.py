"""systemd `Type=notify` support: READY, STATUS, WATCHDOG pings, STOPPING (sd_notify(3)).

Written here rather than taken from `sdnotify` (PyPI, last release 2017): that one handles '@'
abstract sockets but not WATCHDOG_USEC / WATCHDOG_PID, and swallows every error with a bare
except. The protocol is one datagram of newline-separated assignments to $NOTIFY_SOCKET.

- No NOTIFY_SOCKET (not under systemd, or a test): every call is a no-op returning False.
- A send that fails is logged and returns False: the daemon keeps working; systemd's own
  timeouts (start, watchdog) are what notice a daemon that cannot report.
- WATCHDOG_PID set to another process (the variable leaked to a child): no watchdog here.
- Watchdog pings only while `healthy()` says so: a wedged daemon stops petting the dog and
  systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger("hexiao.notify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self._addr = _address(env.get("NOTIFY_SOCKET", ""))
        self._interval = _watchdog_interval(env, os.getpid() if pid is None else pid)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def watchdog_interval_s(self) -> float | None:
        """Half of WATCHDOG_USEC (the interval sd_watchdog_enabled(3) advises), or None."""
        return self._interval if self.enabled else None

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        if self.watchdog_interval_s() is None:
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def notify(self, *assignments: str) -> bool:
        """Send assignments (KEY=value, one line each) in one datagram."""
        if self._addr is None or not assignments:
            return False
        if any("\n" in a for a in assignments):
            raise ValueError("a notify assignment must be one line")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(assignments).encode(), self._addr)
        except OSError as e:
            log.warning("sd_notify %s failed: %s", assignments[0].split("=")[0], e)
            return False
        return True


def _address(value: str) -> str | bytes | None:
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    if value:
        log.warning("NOTIFY_SOCKET %r is not a unix socket path: not notifying", value)
    return None


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    usec, wpid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if wpid and int(wpid) != pid:
            return None  # meant for another process
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC/WATCHDOG_PID not integers: no watchdog")
        return None
    return value / 2e6 if value > 0 else None


def _status(text: str | None) -> tuple[str, ...]:
    # STATUS is one line: a newline would start another assignment (e.g. a forged READY=1)
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)


class Watchdog:
    """Pings WATCHDOG=1 every interval while healthy() returns True.

    tick() is one check (tests drive it directly); run() loops on `wait(interval)`, which
    returns True to stop (default: the stop event's wait), so a test can pass its own.
    """

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool], *,
                 interval_s: float | None = None,
                 wait: Callable[[float], bool] | None = None) -> None:
        self.notifier, self.healthy = notifier, healthy
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._thread: threading.Thread | None = None
        self.pings = self.missed = 0

    def tick(self) -> bool:
        try:
            ok = bool(self.healthy())
        except Exception:
            log.exception("watchdog: the health check raised; not pinging")
            ok = False
        if not ok:
            self.missed += 1
            log.warning("watchdog: unhealthy, not pinging (%d missed)", self.missed)
            return False
        pinged = self.notifier.watchdog()
        self.pings += pinged
        return pinged

    def run(self) -> None:
        if self.interval_s is None:
            return  # no watchdog configured for this process
        self.tick()
        while not self._wait(self.interval_s):
            self.tick()

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self.run, name="hexiao-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Liveness:
    """A health check for Watchdog: every registered loop must have beaten within max_age_s.

    Loops call beat(name) each turn; the clock is passed in (time.monotonic in the daemon).
    """

    def __init__(self, clock: Callable[[], float], max_age_s: float) -> None:
        self._clock, self.max_age_s = clock, max_age_s
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, name: str) -> None:
        with self._lock:
            self._beats[name] = self._clock()

    def forget(self, name: str) -> None:
        with self._lock:
            self._beats.pop(name, None)

    def stale(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return sorted(n for n, t in self._beats.items() if now - t > self.max_age_s)

    def __call__(self) -> bool:
        late = self.stale()
        if late:
            log.warning("watchdog: loops not beating: %s", ", ".join(late))
        return not late
