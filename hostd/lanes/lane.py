"""One device on one lane: its port, its host link, and the worker that redeems its scans.

Rules this module keeps:
- the port is (re)opened by a finder (explicit path, or USB match) with exponential backoff; a
  session starts when the device says hello; when it opens, hostd pushes the device's rules
  and settings (config_set), so a replaced or reset device is back in sync at once;
- the port is tied to this device's id: another id's frames are refused and logged with both
  ids (serial_link.PortTie); a device without a key in the keystore is "no key" (with the
  command that provisions it) until its key appears: the keystore is re-read when the device
  talks, so no restart is needed; its port is opened all the same (captures, other ids seen);
- a scan is redeemed once: a scan sent again (after a lost session, SPEC §9.6) gets the
  verdict already given, never a second redemption: from memory while hostd runs, from the
  journal after a restart (the entry keeps device, scan_id and the device's time_ms); a scan
  still being redeemed is not queued twice;
- redemptions run on the lane's worker thread, never on the link thread (a slow backend must not
  stall acks), one at a time and in order; verdicts go out in order with back-pressure: a full
  link queue holds them until an ack makes room;
- an accepted entry's macro keeps one macro_id (journalled): a rescan's "redeemed here" offers
  it again under that id, so a device types the discount at most once; bytes that are not
  printable (control bytes, DEL) are an invalid code, never sent to the backend;
- request() sends a question (health_get, ping, logs_get) and waits for its answer, for the
  control socket; a health answer gets hostd's side of the link beside it ("hostd": replayed
  hellos, other device ids, forged and replayed frames seen on this port);
- a capture (start_capture/stop_capture) records every byte of the link from the moment it
  starts, across reconnects, until stopped or its size cap; alive() says whether the lane's
  threads still run (hostd's watchdog).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from hexiao.hostd.config import Macro
from hexiao.hostd.keystore import KeystoreError
from hexiao.hostd.lanes import verdicts
from hexiao.hostd.lanes.capture import MAX_BYTES, CaptureWriter, record_pair
from hexiao.hostd.lanes.serial_link import EV_FOREIGN, EV_PORT_CLOSED, SerialLink, kid_text
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
                 link_args: dict[str, Any] | None = None, provision: str = "") -> None:
        self.id, self._kid, self.lane = device_id, kid, lane
        self._provision = provision  # the command that gives this device its key
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
        # the state (waiting: no port | connecting | open | no key) and the error that goes
        # with it: an error belongs to the state it was set in (see last_error)
        self._state, self._state_n, self._error = "waiting", 0, ("", 0)
        self.stats = collections.Counter[str]()
        self.last_scan = 0.0  # when the device last sent a scan (clock): a sale under way
        self._scans: queue.Queue[tuple[int, bytes, int, float] | None] = queue.Queue()
        self._answered: collections.OrderedDict[tuple[int, bytes, int],
                                                dict[str, Any] | None] = collections.OrderedDict()
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._replies: dict[str, dict[str, Any]] = {}
        # the device types a macro_id once per boot (it remembers the last few): ids restart
        # from a random point with each hostd, so one after a restart is never taken for old
        self._macro_id = int.from_bytes(os.urandom(4), "big") >> 2
        self._threads: list[threading.Thread] = []
        self._capture: CaptureWriter | None = None  # while capturing
        self._taps: Any = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> DeviceLane:
        for target, name in ((self._connect_loop, "link"), (self._work_loop, "redeem")):
            t = threading.Thread(target=target, name=f"hexiao-{name}-{self.id}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def alive(self) -> bool:
        """Whether the lane's link and redemption threads still run (True before start())."""
        return all(t.is_alive() for t in self._threads)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._capture is not None:
            with contextlib.suppress(LookupError):  # the control socket may stop it first
                self.stop_capture("hostd stopped")
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
            try:  # tied to this device: a session on its port is only ever its own
                link = SerialLink.open(port, self._keystore, self._on_event, device=self._kid,
                                       **self._link_args)
            except (OSError, ValueError) as e:  # serial.SerialException is an OSError
                self.state, self.last_error = "waiting", f"{port}: {e}"
                log.warning("port %s: %s", port, e)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            with self._cond:  # with the taps under the lock: a capture starting now sees
                link.taps = self._taps  # this link, or this link sees its taps
                self._link, self.port, self.state = link, port, "connecting"
            if self._stop.is_set():
                link.close()
                break
            delay = self._backoff[0]
            if not self._has_key():  # no session can open until it is there (PortTie re-reads)
                why = (f"no key for device {self.id} in the keystore: "
                       f"{self._provision or 'provision it (hexiao provision)'}")
                log.warning("device %s: %s", self.id, why)
                with self._cond:
                    self.state, self.last_error = "no key", why
            else:
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

    def _has_key(self) -> bool:
        if self._keystore(self._kid) is not None:
            return True
        reload = getattr(self._keystore, "reload", None)  # provisioned since?
        if reload is not None:
            try:
                reload()
            except (KeystoreError, OSError) as e:
                log.warning("device %s: keystore: %s", self.id, e)
        return self._keystore(self._kid) is not None

    def _alarms(self) -> dict[str, int]:
        # this port's link: replayed hellos, other device ids, forged or replayed frames
        link = self._link
        c = link.counters if link is not None else {}
        return {k: c.get(k, 0) for k in ("hello_replay", "foreign_device", "mac", "replay")}

    def _on_foreign(self, kid: bytes, known: bool, frames: int) -> None:
        # frames naming another device id on this device's port (serial_link.PortTie)
        self.stats["foreign_device"] += frames
        if not kid:
            why = "frames naming many other device ids"
        elif known:
            why = (f"device {kid_text(kid)}, which has a key here, is talking on it: a mis-cabled "
                   f"lane, or someone with {kid_text(kid)}'s key")
        else:
            why = (f"an unknown device id {kid_text(kid)} (no key here) is talking on it: an "
                   f"unprovisioned device, or forged frames")
        why = f"port {self.port} is device {self.id}'s; {why}; refused"
        log.warning("device %s: %s (%d frame(s))", self.id, why, frames)
        with self._cond:
            self.last_error = why

    def _on_event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == EV_FOREIGN:
            self._on_foreign(ev[1], ev[2], ev[3])
            return
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
            self.last_scan = self._clock()
            if repeat:
                self._pump()
            else:
                self.stats["scans"] += 1
                self._scans.put((msg["scan_id"], msg["data"], msg["time_ms"], self._clock()))
        else:
            if t == "health":  # beside the device's own counters, the attacks hostd saw
                msg = {**msg, "hostd": self._alarms()}
            with self._cond:
                self._replies[t] = msg
                self._cond.notify_all()

    def _send(self, msg: dict[str, Any]) -> None:
        with self._cond:
            self._outbox.append(msg)

    def reconfigure(self, rules: dict[str, Any] | None, settings: dict[str, Any],
                    macros: dict[str, Macro]) -> None:
        """New rules, settings and macros (headquarters' desired state, hostd/fleet/desired.py):
        what changed goes to an open session at once; every later session gets them as usual."""
        rules = rules or DEFAULT_RULES
        with self._cond:
            push = []
            if self.state == "open" and rules != self.rules:
                push.append(rules)
            if self.state == "open" and settings and settings != self.settings:
                push.append({"type": "config_set", "values": dict(settings)})
            self.rules, self.settings, self._macros = rules, dict(settings), macros
            self._outbox.extend(push)
        if push:
            self._pump()

    def tell(self, msg: dict[str, Any]) -> None:
        """Send a message nobody asked for (the points a receipt earned: a verdict quoting the
        member card's scan); it waits in the outbox, in order, like the verdicts."""
        self._send(msg)
        self._pump()

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
        if not code or not code.isprintable():  # control bytes, DEL
            v = Verdict("refused", "invalid_code", "")
        else:
            origin = {"device": self.id, "scan_id": scan_id, "time_ms": time_ms}
            now = self._clock()
            v = engine.answer_resend(code, origin, now) or engine.redeem(code, now, origin)
        answer = verdicts.verdict_message(scan_id, v)
        macro = None
        if v.outcome == "accepted":
            # an entry's macro keeps its id (journal): a rescan ("redeemed here") offers it
            # again, and a device that typed it already does not type it twice
            mid = v.macro_id
            if mid is None:
                self._macro_id += 1
                mid = self._macro_id
            macro = verdicts.keys_message(mid, v, self._macros)
            if macro is not None and v.macro_id is None and v.entry_id is not None:
                engine.macro_sent(v.entry_id, mid, self._clock())
        with self._cond:
            self._answered[(scan_id, data, time_ms)] = answer
            self._outbox.append(answer)
            if macro is not None:
                self._outbox.append(macro)
        self.stats[f"verdict_{v.outcome}"] += 1
        self._on_verdict(self.id, v, self._clock() - received)
        self._pump()

    # -- questions from the control socket -----------------------------------------------------

    def busy(self, quiet_s: float) -> str:
        """Why this lane is in a sale ("" when idle): a scan being redeemed or waiting for its
        verdict to leave, or a scan within quiet_s. A firmware update waits for "" (rollout)."""
        with self._cond:
            if not self._scans.empty() or None in self._answered.values():
                return "a scan is being redeemed"
            if self._outbox:
                return "verdicts wait to reach the device"
        ago = self._clock() - self.last_scan
        return f"a scan {ago:.0f} s ago" if ago < quiet_s else ""

    def request(self, msg: dict[str, Any], answer: str, timeout: float = 5.0) -> dict[str, Any]:
        """Send msg and return the device's next `answer` message; TimeoutError if none in
        time, ConnectionError at once if the session it was sent on ends first (the answer
        can no longer come: a device that reset, a cable pulled)."""
        with self._cond:
            link = self._link
            if link is None or not link.is_open():
                raise ConnectionError(f"device {self.id} is not connected ({self.state})")
            self._replies.pop(answer, None)
        self._send(msg)
        self._pump()
        end = time.monotonic() + timeout
        with self._cond:
            while answer not in self._replies:
                if self._link is not link or not link.is_open():
                    raise ConnectionError(f"device {self.id} went away before it answered "
                                          f"{msg['type']} ({self.last_error or self.state})")
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise TimeoutError(f"device {self.id} did not answer {msg['type']} "
                                       f"within {timeout:g} s")
                self._cond.wait(left)
            return self._replies.pop(answer)

    def start_capture(self, path: str, max_bytes: int = MAX_BYTES) -> CaptureWriter:
        """Record the raw link traffic to a new file `path` (0600), at most max_bytes; it
        follows the device across reconnects until stop_capture()."""
        with self._cond:
            old = self._capture
            if old is not None:
                raise FileExistsError(f"device {self.id} is already being captured to "
                                      f"{old.path}" + (" (it stopped: capture.stop ends it)"
                                                       if old.stopped else ""))
            writer = CaptureWriter(path, self._kid, max_bytes)
            self._capture, self._taps = writer, record_pair(writer)
            if self._link is not None:
                self._link.taps = self._taps
        return writer

    def capturing(self, writer: CaptureWriter) -> bool:
        """Whether `writer` is this lane's capture (stopped at its cap or not)."""
        return self._capture is writer

    def stop_capture(self, reason: str, only: CaptureWriter | None = None) -> dict[str, Any]:
        """End the capture (only if it is `only`, when given); `reason` goes into its header.
        LookupError if there is none to end."""
        with self._cond:
            old = self._capture
            if old is None or (only is not None and old is not only):
                raise LookupError(f"device {self.id} is not being captured")
            self._capture = self._taps = None
            if self._link is not None:
                self._link.taps = None
        early = old.stopped  # the cap, before anyone asked
        old.close(reason)
        out: dict[str, Any] = {"device": self.id, "path": old.path, "stopped": True,
                               "bytes": old.size}
        if early:
            out["stopped_early"] = early
        return out

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        if state != self._state:
            self._state, self._state_n = state, self._state_n + 1

    @property
    def last_error(self) -> str:
        """What went wrong in the current state: "" once the state has changed since, so that
        "open" never shows a stale "device not found", nor "waiting" an old lock failure."""
        error, n = self._error
        return error if n == self._state_n else ""

    @last_error.setter
    def last_error(self, error: str) -> None:
        self._error = (error, self._state_n)  # set after the state it explains

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
