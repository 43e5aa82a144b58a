"""One device on one lane: its port, its host link, and the worker that redeems its scans.

Rules this module keeps:
- the port is (re)opened by a finder (explicit path, or USB match) with exponential backoff; a
  session starts when the device says hello; when it opens, hostd pushes the device's rules
  and settings (config_set), so a replaced or reset device is back in sync at once;
- a scan is redeemed once: a scan sent again (after a lost session, SPEC §9.6) gets the
  verdict already given, never a second redemption: from memory while hostd runs, from the
  journal after a restart (the entry keeps device, scan_id and the device's time_ms); a scan
  still being redeemed is not queued twice;
- redemptions run on the lane's worker thread, never on the link thread (a slow backend must not
  stall acks), one at a time and in order; verdicts go out in order with back-pressure: a full
  link queue holds them until an ack makes room;
- request() sends a question (health_get, ping, logs_get) and waits for its answer, for the
  control socket.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from hexiao.hostd.config import Macro
from hexiao.hostd.lanes import verdicts
from hexiao.hostd.lanes.serial_link import EV_PORT_CLOSED, SerialLink
from hexiao.hostd.redeem import Engine, Verdict
from hexiao.protocol.link import EV_ACKED, EV_CLOSED, EV_EXPIRED, EV_MESSAGE, EV_OPEN

log = logging.getLogger("hexiao.lane")

# SPEC §6.7: EAN/UPC are products; QR and Code 128 of WeChat code lengths are coupons
DEFAULT_RULES = {"type": "rules", "version": 1, "default": 0, "rules": [
    {"action": 0, "symbologies": ["]E0", "]E4"]},  # EAN-13/UPC-A, EAN-8
    {"action": 1, "symbologies": ["]Q1", "]C0", "]Q0", "]d1"], "min_len": 8, "max_len": 512},
]}
_ANSWERED_MAX = 512  # scans remembered for resends


class DeviceLane:
    def __init__(self, device_id: str, kid: bytes, lane: str,
                 find_port: Callable[[], str | None],
                 keystore: Callable[[bytes], bytes | None],
                 engine_factory: Callable[[], Engine], macros: dict[str, Macro], *,
                 on_verdict: Callable[[str, Verdict, float], None] | None = None,
                 rules: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None, clock: Callable[[], float] = time.time,
                 backoff: tuple[float, float] = (0.5, 10.0),
                 link_args: dict[str, Any] | None = None) -> None:
        self.id, self._kid, self.lane = device_id, kid, lane
        self._find_port, self._keystore = find_port, keystore
        self._engine_factory, self._macros = engine_factory, macros
        self._on_verdict = on_verdict or (lambda dev, v, seconds: None)
        self.rules = rules or DEFAULT_RULES
        self.settings = settings or {}  # device config values pushed at every session
        self._clock, self._backoff, self._link_args = clock, backoff, link_args or {}
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._pump_lock = threading.Lock()
        self._link: SerialLink | None = None
        self.port: str | None = None
        self.peer: dict[str, Any] | None = None
        self.state = "waiting"  # waiting (no port) | connecting | open
        self.last_error = ""
        self.stats = collections.Counter[str]()
        self._scans: queue.Queue[tuple[int, bytes, int, float] | None] = queue.Queue()
        self._answered: collections.OrderedDict[tuple[int, bytes, int],
                                                dict[str, Any] | None] = collections.OrderedDict()
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._replies: dict[str, dict[str, Any]] = {}
        # the device types a macro_id once per boot (it remembers the last few): ids restart
        # from a random point with each hostd, so one after a restart is never taken for old
        self._macro_id = int.from_bytes(os.urandom(4), "big") >> 2
        self._threads: list[threading.Thread] = []
        self._capture: Any = None  # a tools.capture.CaptureWriter while capturing
        self._taps: Any = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> DeviceLane:
        for target, name in ((self._connect_loop, "link"), (self._work_loop, "redeem")):
            t = threading.Thread(target=target, name=f"hexiao-{name}-{self.id}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._capture is not None:
            self.capture(None)
        self._scans.put(None)
        with self._cond:
            link = self._link
            self._cond.notify_all()
        if link is not None:
            link.stop()  # the link thread closes the port when run() returns, not us under it
        for t in self._threads:
            t.join(timeout)

    # -- the link -----------------------------------------------------------------------------

    def _connect_loop(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            port = self._find_port()
            if port is None:
                self.state, self.last_error = "waiting", "device not found"
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            try:
                link = SerialLink.open(port, self._keystore, self._on_event, **self._link_args)
            except (OSError, ValueError) as e:  # serial.SerialException is an OSError
                self.state, self.last_error = "waiting", f"{port}: {e}"
                log.warning("port %s: %s", port, e)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            link.taps = self._taps
            with self._cond:
                self._link, self.port, self.state = link, port, "connecting"
            if self._stop.is_set():
                link.close()
                break
            delay = self._backoff[0]
            try:  # the device may still hold a session with a previous hostd: hello now
                link.poke(self._kid)
            except ValueError as e:
                self.last_error = str(e)
                log.warning("device %s: %s", self.id, e)
            link.run()  # until the port fails or close()
            link.close()
            with self._cond:
                self._link, self.peer, self.state = None, None, "waiting"
                self._cond.notify_all()

    def _on_event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == EV_OPEN:
            with self._cond:
                self.peer, self.state = dict(ev[1]), "open"
                self.stats["sessions"] += 1
            log.info("device %s open: firmware %s", self.id, ev[1].get("firmware"))
            self._send(self.rules)
            if self.settings:
                self._send({"type": "config_set", "values": dict(self.settings)})
            self._pump()
        elif kind == EV_MESSAGE:
            self._on_message(ev[1])
        elif kind == EV_ACKED:
            self._pump()
        elif kind == EV_EXPIRED and ev[1].get("type") == "verdict":
            self.stats["verdicts_expired"] += 1  # the device sends the scan again; see rules
        elif kind in (EV_CLOSED, EV_PORT_CLOSED):
            with self._cond:
                self.peer = None
                self.state = "connecting" if kind == EV_CLOSED else "waiting"
                self.last_error = str(ev[1])
                self._cond.notify_all()

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg["type"]
        if t == "scan":
            key = (msg["scan_id"], msg["data"], msg["time_ms"])  # unique across reboots too
            with self._cond:
                if key in self._answered:
                    answer = self._answered[key]
                    self.stats["scans_repeated"] += 1
                    if answer is not None:
                        self._outbox.append(answer)
                    repeat = True
                else:
                    self._answered[key] = None  # being redeemed
                    while len(self._answered) > _ANSWERED_MAX:
                        self._answered.popitem(last=False)
                    repeat = False
            if repeat:
                self._pump()
            else:
                self.stats["scans"] += 1
                self._scans.put((msg["scan_id"], msg["data"], msg["time_ms"], self._clock()))
        else:
            with self._cond:
                self._replies[t] = msg
                self._cond.notify_all()

    def _send(self, msg: dict[str, Any]) -> None:
        with self._cond:
            self._outbox.append(msg)

    def _pump(self) -> None:
        # the link thread (acks) and the worker (verdicts) both pump: one at a time, or both
        # could send the head of the outbox
        with self._pump_lock:
            self._pump_locked()

    def _pump_locked(self) -> None:
        while True:
            with self._cond:
                link = self._link
                if not self._outbox or link is None or not link.is_open():
                    return
                msg = self._outbox[0]
            try:
                sent = link.send(msg)
            except ValueError as e:  # a message the link refuses is a bug here: drop, say so
                log.error("device %s: not sent, invalid %s message: %s", self.id,
                          msg.get("type"), e)
                sent = True
            if not sent:
                return  # an ack makes room and brings us back
            with self._cond:
                self._outbox.popleft()

    # -- redemption ---------------------------------------------------------------------------

    def _work_loop(self) -> None:
        engine = self._engine_factory()
        try:
            while True:
                item = self._scans.get()
                if item is None or self._stop.is_set():
                    return
                self._redeem(engine, *item)
        finally:
            engine.journal.close()
            engine.client.close()

    def _redeem(self, engine: Engine, scan_id: int, data: bytes, time_ms: int,
                received: float) -> None:
        try:
            code = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            code = ""
        if not code or any(ord(c) < 0x20 for c in code):
            v = Verdict("refused", "invalid_code", "")
        else:
            origin = {"device": self.id, "scan_id": scan_id, "time_ms": time_ms}
            now = self._clock()
            v = engine.answer_resend(code, origin, now) or engine.redeem(code, now, origin)
        answer = verdicts.verdict_message(scan_id, v)
        macro = None
        if v.outcome == "accepted":
            self._macro_id += 1
            macro = verdicts.keys_message(self._macro_id, v, self._macros)
        with self._cond:
            self._answered[(scan_id, data, time_ms)] = answer
            self._outbox.append(answer)
            if macro is not None:
                self._outbox.append(macro)
        self.stats[f"verdict_{v.outcome}"] += 1
        self._on_verdict(self.id, v, self._clock() - received)
        self._pump()

    # -- questions from the control socket -----------------------------------------------------

    def request(self, msg: dict[str, Any], answer: str, timeout: float = 5.0) -> dict[str, Any]:
        """Send msg and return the device's next `answer` message; TimeoutError if none."""
        with self._cond:
            if self._link is None or not self._link.is_open():
                raise ConnectionError(f"device {self.id} is not connected ({self.state})")
            self._replies.pop(answer, None)
        self._send(msg)
        self._pump()
        end = time.monotonic() + timeout
        with self._cond:
            while answer not in self._replies:
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise TimeoutError(f"device {self.id} did not answer {msg['type']} "
                                       f"within {timeout:g} s")
                self._cond.wait(left)
            return self._replies.pop(answer)

    def capture(self, path: str | None) -> dict[str, Any]:
        """Start recording the raw link traffic to a new file `path` (0600), or stop (None).
        The recording follows the device across reconnects until stopped."""
        from hexiao.hostd.lanes.capture import CaptureWriter, record_pair

        with self._cond:
            old, link = self._capture, self._link
            if path is not None and old is not None:
                raise FileExistsError(f"device {self.id} is already being captured to "
                                      f"{old.path}")
            if path is None:
                self._capture = self._taps = None
            else:
                writer = CaptureWriter(path, self._kid)
                writer.path = path
                self._capture, self._taps = writer, record_pair(writer)
            if link is not None:
                link.taps = self._taps
        if path is None:
            if old is None:
                raise LookupError(f"device {self.id} is not being captured")
            old.close()
            return {"device": self.id, "path": old.path, "stopped": True}
        return {"device": self.id, "path": path, "started": True}

    def info(self) -> dict[str, Any]:
        with self._cond:
            link = self._link
            peer = None if not self.peer else {
                k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                for k, v in self.peer.items()}
            return {"id": self.id, "lane": self.lane, "state": self.state, "port": self.port,
                    "peer": peer, "error": self.last_error,
                    "counters": link.counters if link is not None else {},
                    "stats": dict(self.stats), "queued": len(self._outbox)}
