"""hostd's Prometheus metrics (text format), on a private registry per daemon instance.

Rules kept here:
- Every label value is drawn from a closed set (outcome, reason, card type, endpoint, link
  counter names, tap results) or is a validated device id. Anything else becomes "other", so no
  caller can put a coupon code, a token or an errmsg into a label, and cardinality stays bounded.
- Errcodes are labels only within WeChat's errcode range: a 12-digit numeric coupon code passed
  by mistake becomes "other", never a series.
- The HTTP endpoint listens on loopback only: the numbers describe a shop's trade.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from hexiao.hostd.redeem import Outcome, Reason, quota_reset_after
from hexiao.protocol import errors
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

log = logging.getLogger("hexiao.metrics")

OTHER = "other"
NONE = "none"
OUTCOMES = frozenset(Outcome.__args__)  # type: ignore[attr-defined]
REASONS = frozenset(Reason.__args__)  # type: ignore[attr-defined]
CARD_TYPES = frozenset({"CASH", "DISCOUNT", "GIFT", "GROUPON", "GENERAL_COUPON", "MEMBER_CARD",
                        "MOVIE_TICKET", "SCENIC_TICKET", "MEETING_TICKET", "BOARDING_PASS"})
ENDPOINTS = frozenset({"token", "card/code/get", "card/code/consume", "card/code/decrypt",
                       "card/get", "busifavor/use", "busifavor/query"})
TAP_RESULTS = ("passed", "injected", "failed_open")
# how a POS connection to the tap ended (proxy.ConnRecord.end); "error" is a bug caught
TAP_ENDS = frozenset({"closed", "stalled", "printer-refused", "printer-lost", "error"})
TAP_PRINTER = ("unknown", "reachable", "lost")
# the link's counters: its error codes (crc, mac, replay ...) and its events (errors.py)
LINK_ERRORS = frozenset(name for name, _ in errors.CODES)
LINK_EVENTS = frozenset(itertools.takewhile(
    lambda n: n != "unknown", (errors.counter_name(64 + i) for i in range(64)))) | {
    "hello_replay", "foreign_device"}  # the host's alone: link_host.py, serial_link.PortTie
LINK_FRAMES = {"rx_frames": "rx", "tx_frames": "tx"}
MAX_DEVICES = 64  # a shop has a handful of lanes; more means a bug minting device ids

# a 1 s verdict target: fine steps below it, a few above to see how far a slow one went
VERDICT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
BACKEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
_DEVICE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.:-]{0,39}")
_ERRCODE_RANGE = range(-1, 1_000_000)  # WeChat errcodes: -1 and up to six digits


def _pick(value: str | None, allowed: frozenset[str], what: str) -> str:
    if value is None:
        return NONE
    if value in allowed:
        return value
    log.warning("metrics: unknown %s label mapped to %r", what, OTHER)  # never the value itself
    return OTHER


def errcode_label(errcode: int | None) -> str:
    """None: no errcode (transport error, unreadable reply); out of range: "other"."""
    if errcode is None:
        return "transport"
    if isinstance(errcode, bool) or not isinstance(errcode, int) or errcode not in _ERRCODE_RANGE:
        return OTHER
    return str(errcode)


class Metrics:
    """The daemon's metrics. Thread-safe (prometheus_client's values are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._redemptions = Counter(
            "hexiao_redemptions_total", "Redemption verdicts given to the cashier.",
            ["outcome", "reason", "card_type"], registry=r)
        self._verdict = Histogram(
            "hexiao_verdict_latency_seconds", "Time from scan to verdict.",
            ["outcome"], buckets=VERDICT_BUCKETS, registry=r)
        self._backend = Histogram(
            "hexiao_backend_request_duration_seconds", "Backend API call time (retries included).",
            ["endpoint"], buckets=BACKEND_BUCKETS, registry=r)
        self._backend_errors = Counter(
            "hexiao_backend_errors_total", "Failed backend calls by errcode "
            "(transport: none was received).", ["endpoint", "errcode"], registry=r)
        self._frames = Counter(
            "hexiao_link_frames_total", "Link frames by device and direction.",
            ["device", "direction"], registry=r)
        self._link_errors = Counter(
            "hexiao_link_errors_total", "Link frames rejected, by device and error code.",
            ["device", "code"], registry=r)
        self._link_events = Counter(
            "hexiao_link_events_total", "Link events (retransmits, sessions ...) by device.",
            ["device", "event"], registry=r)
        self._devices = Gauge(
            "hexiao_devices_connected", "Devices with an open link.", registry=r)
        self._attention = Gauge(
            "hexiao_journal_attention_entries",
            "Journal entries needing attention (verify manually: consume outcome unknown).",
            registry=r)
        self._quota = Gauge(
            "hexiao_backend_quota_exhausted_until_seconds",
            "Alarm: the backend's daily quota (45009) is used up until this Unix time (midnight "
            "China time); 0 when not seen. No rescan helps before then: alert on > time().",
            registry=r)
        self._token_refused = Counter(
            "hexiao_backend_token_refused_total", "API calls refused for hostd's access token "
            "(40001: invalidated, e.g. another till or process replaced it; 42001: expired).",
            ["errcode"], registry=r)
        self._setup = Counter(
            "hexiao_setup_problems_total", "Alarm: verdicts refused for a setup problem "
            "(token, API errcode, custom-code card ids, journal): call support.",
            registry=r)
        self._tap = Counter(
            "hexiao_tap_receipts_total", "Receipts through the tap by result.",
            ["result"], registry=r)
        for result in TAP_RESULTS:  # present at 0 so rate() works from the first scrape
            self._tap.labels(result)
        self._tap_failopen = Counter(
            "hexiao_tap_failopen_total", "Fail-open events: the tap passed the rest of a "
            "print stream on unchanged after an error.", registry=r)
        self._tap_conns = Counter(
            "hexiao_tap_connections_total", "POS connections to the tap by how they ended.",
            ["end"], registry=r)
        self._tap_up = Gauge(
            "hexiao_tap_listening", "1 while the receipt tap listens for the POS.", registry=r)
        self._tap_printer = Gauge(
            "hexiao_tap_printer_state", "The tap's printer: 1 for its current state "
            "(unknown, reachable, lost).", ["state"], registry=r)
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, int]] = {}  # device -> the link's last absolute counters

    # --- what the daemon calls ---------------------------------------------------------

    def redemption(self, outcome: str, card_type: str | None, seconds: float, *,
                   reason: str | None = None) -> None:
        """One verdict: card_type None when no card was read (refused before card/get)."""
        o = _pick(outcome, OUTCOMES, "outcome")
        self._redemptions.labels(o, _pick(reason, REASONS, "reason"),
                                 _pick(card_type, CARD_TYPES, "card_type")).inc()
        self._verdict.labels(o).observe(seconds)
        if reason == "quota":
            self._quota.set(quota_reset_after(time.time()))
        elif reason == "setup":
            self._setup.inc()

    def token_refused(self, errcode: int) -> None:
        """The API refused hostd's access token (backends' TokenCache.on_refused)."""
        self._token_refused.labels(errcode_label(errcode)).inc()

    def backend_call(self, endpoint: str, seconds: float, errcode: int | None = 0) -> None:
        """One backend call: errcode 0 ok, an int the service's errcode, None no errcode."""
        ep = _pick(endpoint, ENDPOINTS, "endpoint")
        self._backend.labels(ep).observe(seconds)
        if errcode != 0:
            self._backend_errors.labels(ep, errcode_label(errcode)).inc()

    def link_counters(self, device: str, counters: Mapping[str, int]) -> None:
        """A link's absolute counters (Link.counters); counted by their increase since the last
        call. A value below the last one means a new link (reconnect): it counts from zero."""
        if not _DEVICE.fullmatch(device):
            raise ValueError("device id must be 1-40 of [0-9A-Za-z_.:-], starting alphanumeric")
        with self._lock:
            last = self._seen.get(device)
            if last is None:
                if len(self._seen) >= MAX_DEVICES:
                    raise ValueError(f"more than {MAX_DEVICES} devices: forget_device() gone ones")
                last = self._seen[device] = {}
            for name, value in counters.items():
                delta = value - last.get(name, 0)
                delta = value if delta < 0 else delta
                last[name] = value
                if delta:
                    self._link_counter(device, name).inc(delta)

    def _link_counter(self, device: str, name: str) -> Counter:
        if name in LINK_FRAMES:
            return self._frames.labels(device, LINK_FRAMES[name])
        if name in LINK_ERRORS:
            return self._link_errors.labels(device, name)
        return self._link_events.labels(device, _pick(name, LINK_EVENTS, "link counter"))

    def forget_device(self, device: str) -> None:
        """Drop a device's series (it was unplugged for good or renamed)."""
        with self._lock:
            last = self._seen.pop(device, None)
        if last is None:
            return
        for name in last:
            metric, labels = (
                (self._frames, (device, LINK_FRAMES[name])) if name in LINK_FRAMES else
                (self._link_errors, (device, name)) if name in LINK_ERRORS else
                (self._link_events, (device, name if name in LINK_EVENTS else OTHER)))
            metric.remove(*labels)  # a label set never incremented is ignored

    def devices_connected(self, n: int) -> None:
        self._devices.set(n)

    def journal_attention(self, n: int) -> None:
        """Entries in consume_sent/unknown that reconcile could not settle."""
        self._attention.set(n)

    def tap_receipt(self, result: str, n: int = 1) -> None:
        if result not in TAP_RESULTS:
            raise ValueError(f"tap result must be one of {', '.join(TAP_RESULTS)}")
        self._tap.labels(result).inc(n)

    def tap_failopen(self, n: int = 1) -> None:
        self._tap_failopen.inc(n)

    def tap_connection(self, end: str) -> None:
        """A POS connection to the tap ended (closed, stalled, printer-lost ...)."""
        self._tap_conns.labels(_pick(end, TAP_ENDS, "tap end")).inc()

    def tap_state(self, listening: bool, printer: str) -> None:
        """The tap listens or not; its printer is unknown, reachable or lost."""
        if printer not in TAP_PRINTER:
            raise ValueError(f"tap printer state must be one of {', '.join(TAP_PRINTER)}")
        self._tap_up.set(1 if listening else 0)
        for state in TAP_PRINTER:
            self._tap_printer.labels(state).set(1 if state == printer else 0)

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
        return serve(self, host, port)


@dataclass
class MetricsServer:
    httpd: WSGIServer
    thread: threading.Thread

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(metrics: Metrics, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
    """Serve GET /metrics on a loopback address in a daemon thread; port 0 picks a free one."""
    if not is_loopback(host):
        raise ValueError(f"metrics must listen on a loopback address, not {host!r}")
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(httpd, thread)
