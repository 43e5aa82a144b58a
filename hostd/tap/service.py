"""The receipt tap as one service, assembled from the [tap] config: what hexiao-hostd runs, and
what `hexiao tap serve`, the demo and the proxy benchmark run too.

Rules this module keeps:
- The one assembly of a tap: the POS side (TCP, or a serial port / pty bridged to the proxy by
  pos_serial.py), the printer target (printer.py, printer_usb.py), the printer profile, QR style,
  content and key (keys.py), existing_qr and the timeouts. Callers turn their own input into a
  config.Tap (and at most a resolved profile) and print what comes back; they assemble nothing.
- start() brings the tap up or raises TapError and leaves nothing open; TapError.key names the
  [tap] setting at fault, None when it is the machine (a port taken, a serial port missing).
- The tap shares nothing with redemption but the Metrics object (thread safe): a failure here is
  logged, counted and shown by state(), never raised into hostd's lanes; start_retrying() keeps
  trying while hostd runs (a port freed, a key file's mode fixed). Redemption failing cannot
  stop printing: nothing here waits on it.
- The printer is "reachable" or "lost" from each job's end (it took the job; it refused or was
  lost mid-job) and, when `probe_every_s` is set, from a probe: open and close, nothing written
  (printer.py: open() never writes), at start and then only while not known to be reachable. A
  probe older than the last job's end never overrides it.
- Counts and metrics come from each connection's record, once, as it ends (ConnRecord); then the
  caller's on_finish hook runs. Neither the key nor any receipt content is logged or in state().
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hexiao.hostd.tap.inject import (
    Content,
    Injector,
    PrinterProfile,
    QRStyle,
    load_profile,
)
from hexiao.hostd.tap.keys import KeyFileError, read_key
from hexiao.hostd.tap.printer import Target, parse_target
from hexiao.hostd.tap.proxy import ConnRecord, TapProxy

if TYPE_CHECKING:
    from hexiao.hostd.config.types import Tap
    from hexiao.hostd.observability.metrics import Metrics
    from hexiao.hostd.tap.pos_serial import SerialBridge

log = logging.getLogger("hexiao.tap")

LISTEN_FORMS = "HOST:PORT (e.g. 127.0.0.1:9100), serial:DEVICE[@BAUD] or pty[:LINK]"
RETRY_EVERY_S = 10.0   # start_retrying(): a failed start is tried again this often
SERIAL_BAUD = 9600     # a serial POS port without @BAUD
# what the printer's state is set to by the way a connection ended (others say nothing of it)
_PRINTER_BY_END = {"printer-refused": "lost", "printer-lost": "lost"}


class TapError(Exception):
    """The tap cannot start. `key`: the [tap] setting at fault, None: the machine."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def where(self) -> str:
        """The message as hostd shows it: prefixed with the config key at fault, if any."""
        return f"tap.{self.key}: {self}" if self.key else str(self)


@dataclass(frozen=True)
class Listen:
    """Where the POS prints: kind "tcp" (host, port), "serial" (device, baud) or "pty" (link)."""
    kind: str
    host: str = "127.0.0.1"
    port: int = 0
    device: str = ""
    baud: int = SERIAL_BAUD
    link: str | None = None


def parse_listen(spec: str) -> Listen:
    """`HOST:PORT`, `serial:DEVICE[@BAUD]`, `pty` or `pty:LINK`; ValueError otherwise."""
    kind, _, rest = spec.partition(":")
    if spec == "pty" or kind == "pty":
        return Listen("pty", link=rest or None)
    if kind == "serial":
        dev, at, baud = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not dev or (at and not baud.isdigit()):
            raise ValueError(f"{spec!r}: use serial:DEVICE[@BAUD], e.g. serial:/dev/ttyS0@9600")
        return Listen("serial", device=dev, baud=int(baud) if baud else SERIAL_BAUD)
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"use {LISTEN_FORMS}")
    return Listen("tcp", host.strip("[]"), int(port))


class TapService:
    """The tap from `cfg`; start() / stop(), state(). See the module rules.

    `profile` replaces cfg.profile (a CLI's per-field overrides, resolved by the caller); `key`
    replaces cfg.key_file for a caller that holds the key already (a benchmark)."""

    def __init__(self, cfg: Tap, *, metrics: Metrics | None = None,
                 on_finish: Callable[[ConnRecord], None] | None = None,
                 profile: PrinterProfile | None = None, key: bytes | None = None,
                 probe_every_s: float | None = None, keep: int = 1000) -> None:
        self.cfg, self.metrics, self.on_finish = cfg, metrics, on_finish
        self._profile, self._key = profile, key
        self.probe_every_s, self.keep = probe_every_s, keep
        self.proxy: TapProxy | None = None
        self.bridge: SerialBridge | None = None
        self.target: Target | None = None
        self.where = ""                 # where the POS prints: "host:port" or a tty path
        self.status = "stopped"         # stopped | listening | failed
        self.error: str | None = None   # why the last start failed
        self.counters: Counter[str] = Counter()
        self.last_error: str | None = None  # the last connection's last error, as logged
        self._printer, self._printer_error = "unknown", None  # unknown | reachable | lost
        self._printer_at = 0.0          # monotonic time of the last job's verdict on it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def assemble(self) -> tuple[Listen, Target, Callable[[], Injector]]:
        """Check every setting and build the parts; TapError (with its key) otherwise."""
        c = self.cfg
        try:
            listen = parse_listen(c.listen)
        except ValueError as e:
            raise TapError(str(e), "listen") from None
        try:
            target = parse_target(c.printer, c.printer_timeout_s)
        except ValueError as e:
            raise TapError(str(e), "printer") from None
        try:
            profile = self._profile or load_profile(c.profile)
        except (ValueError, TypeError, OSError) as e:
            raise TapError(str(e), "profile") from None
        key = self._key
        if key is None and c.key_file is not None:
            try:
                key = read_key(c.key_file)
            except KeyFileError as e:
                raise TapError(str(e), "key_file") from None
        try:
            style = QRStyle(c.module, c.align, c.ec, c.caption)
            content = Content(c.content, c.lane, key)
            Injector(profile, style, content, existing_qr=c.existing_qr,
                     void_words=c.void_words)  # checks the rest
        except ValueError as e:
            raise TapError(str(e), "key_file" if "tap key" in str(e) else "content") from None

        def make() -> Injector:
            return Injector(profile, style, content, existing_qr=c.existing_qr,
                            void_words=c.void_words)
        return listen, target, make

    def start(self) -> TapService:
        """Listen (and bridge a serial POS port); TapError if anything cannot be used."""
        try:
            self._start()
        except TapError as e:
            with self._lock:
                self.status, self.error = "failed", e.where()
            self._gauges()
            raise
        return self

    def _start(self) -> None:
        listen, target, make = self.assemble()
        c = self.cfg
        proxy = TapProxy(target, make, (listen.host, listen.port) if listen.kind == "tcp"
                         else ("127.0.0.1", 0), idle_timeout=c.idle_timeout_s,
                         connect_timeout=c.connect_timeout_s, stall_timeout=c.stall_timeout_s,
                         keep=self.keep, on_finish=self._finished)
        try:
            host, port = proxy.start()
        except OSError as e:
            proxy.stop()
            raise TapError(f"cannot listen on {c.listen}: {e.strerror or e}") from None
        where, bridge = f"{host}:{port}", None
        if listen.kind != "tcp":
            from hexiao.hostd.tap.pos_serial import SerialBridge

            try:
                bridge = SerialBridge("pty" if listen.kind == "pty" else listen.device,
                                      (host, port), baud=listen.baud, link=listen.link,
                                      idle_close_s=2 * c.idle_timeout_s).start()
            except (OSError, ValueError) as e:
                proxy.stop()
                raise TapError(f"cannot open {c.listen}: {e}") from None
            where = bridge.path
        with self._lock:  # stop() may have been called meanwhile (start_retrying's thread)
            stopped = self._stop.is_set()
            if not stopped:
                self.proxy, self.bridge, self.target, self.where = proxy, bridge, target, where
                self.status, self.error = "listening", None
        if stopped:
            if bridge is not None:
                bridge.stop()
            proxy.stop()
            raise TapError("the tap was stopped while it started")
        self._gauges()
        log.info("tap listening on %s, printing to %s", where, target.describe())
        if self.probe_every_s is not None:
            self._spawn(self._probe_loop, "tap-probe")

    def start_retrying(self, every_s: float | None = None) -> TapService:
        """start() now; if it fails, log why and try again every `every_s` (RETRY_EVERY_S)
        until stop()."""
        every_s = every_s or RETRY_EVERY_S
        try:
            self.start()
        except TapError as e:
            log.error("tap not started: %s (retrying every %g s; redemption goes on)",
                      e.where(), every_s)
            self._spawn(lambda: self._retry(every_s), "tap-retry")
        return self

    def _retry(self, every_s: float) -> None:
        last = self.error
        while not self._stop.wait(every_s):
            try:
                self.start()
                return
            except TapError as e:
                if e.where() != last:  # a new reason is worth a line; the same one is not
                    log.error("tap not started: %s", e.where())
                    last = e.where()

    def stop(self) -> None:
        """Stop listening; what POS connections sent is flushed to the printer first."""
        self._stop.set()
        with self._lock:
            bridge, proxy = self.bridge, self.proxy
        if bridge is not None:
            bridge.stop()
        if proxy is not None:
            proxy.stop()
        for t in self._threads:
            t.join(5)
        with self._lock:
            if self.status == "listening":
                self.status = "stopped"
        self._gauges()

    def __enter__(self) -> TapService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=f"hexiao-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    @property
    def address(self) -> tuple[str, int]:
        """The proxy's TCP address (behind the bridge, for a serial POS side)."""
        if self.proxy is None:
            raise RuntimeError("the tap is not started")
        return self.proxy.address

    # -- what happened ------------------------------------------------------------------------

    def _finished(self, rec: ConnRecord) -> None:
        """One POS connection ended (in its thread): count it, then the caller's hook."""
        failopen = rec.counters["failopen"] + rec.counters["proxy_failopen"]
        printer = _PRINTER_BY_END.get(rec.end) or ("reachable" if rec.bytes_out else None)
        with self._lock:
            n = self.counters
            n["connections"] += 1
            n["jobs"] += rec.jobs
            n["receipts"] += len(rec.receipts)
            n["injections"] += rec.counters["injected"]
            n["failopen"] += failopen
            n["errors"] += len(rec.errors)
            if rec.end in ("printer-lost", "printer-refused", "stalled", "error"):
                n[rec.end.replace("-", "_")] += 1
            if rec.errors:
                self.last_error = rec.errors[-1]
            if printer is not None:
                self._printer, self._printer_at = printer, time.monotonic()
                self._printer_error = rec.errors[-1] if printer == "lost" and rec.errors \
                    else None
        if self.metrics is not None:
            m = self.metrics
            for rc in rec.receipts:
                m.tap_receipt("injected" if rc.injected else
                              "failed_open" if rc.skipped.startswith("error") else "passed")
            if failopen:
                m.tap_failopen(failopen)
            m.tap_connection(rec.end)
        self._gauges()
        if self.on_finish is not None:
            self.on_finish(rec)

    def probe(self) -> str:
        """Open the printer and close it (nothing is written): "reachable" or "lost"."""
        assert self.target is not None
        started = time.monotonic()
        try:
            self.target.open().close(0.0)
            state, error = "reachable", None
        except OSError as e:
            state, error = "lost", f"{self.target.describe()}: {e.strerror or e}"
        with self._lock:
            if self._printer_at <= started:  # a job that ended meanwhile knows better
                if state != self._printer:
                    (log.info if state == "reachable" else log.warning)(
                        "tap printer %s%s", state, f": {error}" if error else "")
                self._printer, self._printer_error = state, error
        self._gauges()
        return state

    def _probe_loop(self) -> None:
        assert self.probe_every_s is not None
        while not self._stop.is_set():
            if self._printer != "reachable":
                self.probe()
            if self._stop.wait(self.probe_every_s):
                return

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.tap_state(self.status == "listening", self._printer)

    def state(self) -> dict[str, Any]:
        """What hostd's `status` shows of the tap (JSON-able)."""
        with self._lock:
            return {"state": self.status, "listening": self.where or None,
                    "error": self.error,
                    "printer": {"target": self.target.describe() if self.target else
                                self.cfg.printer, "state": self._printer,
                                "error": self._printer_error},
                    "counters": {k: self.counters[k] for k in (
                        "connections", "jobs", "receipts", "injections", "failopen", "errors",
                        "printer_lost", "printer_refused", "stalled")},
                    "last_error": self.last_error}
