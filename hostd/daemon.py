"""hexiao-hostd assembled: config in, lanes, backend, journal, control socket, metrics, systemd.

Rules this module keeps:
- start() brings the parts up in an order where each failure is clear and leaves nothing half
  open: state folder (0700), journal, keystore (0600), backend, reconcile of what a previous run
  left unfinished, then the devices, the control socket, metrics, and READY=1 to systemd;
- every lane's worker has its own journal connection and backend client (SQLite connections and
  httpx clients are not shared between threads);
- unfinished journal entries are reconciled at start and then every `RECONCILE_EVERY_S`:
  queried, never consumed again (redeem.Engine.reconcile);
- the control socket's commands are the methods below (hostd/control/server.py's Handlers); they
  return plain JSON-able data, with coupon codes only as the journal keeps them (last 4 shown);
- the watchdog is petted only while every lane's threads and the reconcile loop are alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from hexiao.hostd import journal as jr
from hexiao.hostd.backends.wechat_card import WeChatCardClient, WeChatError
from hexiao.hostd.config import Config, ConfigError
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.lanes.discovery import finder
from hexiao.hostd.lanes.lane import DeviceLane
from hexiao.hostd.observability.metrics import Metrics
from hexiao.hostd.observability.notify import Notifier, Watchdog
from hexiao.hostd.redeem import Engine, Verdict, tail

log = logging.getLogger("hexiao.hostd")
RECONCILE_EVERY_S = 60.0
METRICS_EVERY_S = 5.0


class DaemonError(Exception):
    """hostd cannot start; the message says what to fix."""


class Daemon:
    def __init__(self, cfg: Config, *, backend_url: str | None = None,
                 clock: Any = time.time, notifier: Notifier | None = None) -> None:
        self.cfg, self._backend_url, self._clock = cfg, backend_url, clock
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.lanes: dict[str, DeviceLane] = {}
        self.started = 0.0
        self._stop = threading.Event()
        self._sim: Any = None
        self._control: Any = None
        self._metrics_server: Any = None
        self._watchdog: Watchdog | None = None
        self._make_client: Any = None  # a backend factory other than the card API client
        self._threads: list[threading.Thread] = []
        h = cfg.hostd
        self.state_dir = Path(h.state_dir)
        self.journal_path = Path(h.journal or self.state_dir / "journal.sqlite3")
        self.keystore_path = Path(cfg.keystore.path or self.state_dir / "keystore.jsonl")

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Daemon:
        self.started = self._clock()
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            jr.Journal(self.journal_path).close()  # creates it, or says why it cannot
            self.keystore = Keystore(self.keystore_path, create=True)
        except (OSError, jr.JournalError, ValueError) as e:
            raise DaemonError(str(e)) from e
        self._client_args = self._backend()
        self.reconcile()
        for dev in self.cfg.devices:
            lane_cfg = self.cfg.lane(dev.lane)
            assert lane_cfg is not None  # config checks the reference
            self.lanes[dev.id] = DeviceLane(
                dev.id, dev.kid, dev.lane, finder(dev), self.keystore,
                lambda lc=lane_cfg: Engine(jr.Journal(self.journal_path), self._client(),
                                           lc.engine_config()),
                dict(self.cfg.macros), on_verdict=self._verdict_done, clock=self._clock,
                rules=dev.rules_message(),
                settings=dev.settings.values() if dev.settings else None).start()
        self._start_control()
        if self.cfg.hostd.metrics_listen:
            host, _, port = self.cfg.hostd.metrics_listen.rpartition(":")
            self._metrics_server = self.metrics.serve(host.strip("[]"), int(port))
        self._spawn(self._reconcile_loop, "reconcile")
        self._spawn(self._metrics_loop, "metrics")
        wd = Watchdog(self.notifier, self.healthy)
        self._watchdog = wd.start() if wd.interval_s is not None else None
        self.notifier.ready(f"serving {len(self.lanes)} device(s)")
        log.info("hostd started: %d device(s), journal %s", len(self.lanes), self.journal_path)
        return self

    def stop(self) -> None:
        self.notifier.stopping()
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._control is not None:
            self._control.close()
        for lane in self.lanes.values():
            lane.close()
        for t in self._threads:
            t.join(5)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._sim is not None:
            self._sim.stop()

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=f"hexiao-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def healthy(self) -> bool:
        return all(t.is_alive() for lane in self.lanes.values() for t in lane._threads) and all(
            t.is_alive() for t in self._threads if t.name == "hexiao-reconcile")

    # -- backend ------------------------------------------------------------------------------

    def _backend(self) -> dict[str, Any]:
        b = self.cfg.backend
        if b.kind == "wechatpay_busifavor":
            return self._busifavor()
        try:
            args = b.card_client_args()
        except ConfigError as e:
            raise DaemonError(f"backend: {e}") from e
        if self._backend_url:
            args["base_url"] = self._backend_url
        elif b.kind == "sim" and not b.base_url:
            from hexiao.hostd.backends.sim.seed import EXAMPLE, read
            from hexiao.hostd.backends.sim.server import WeChatSim

            self._sim = WeChatSim(read(EXAMPLE)).start()
            app = next(iter(self._sim.state.seed.apps.values()))
            args.update(base_url=self._sim.url, appid=app.appid, secret=app.secret)
            log.warning("backend: embedded WeChat simulator at %s (kind = \"sim\")",
                        self._sim.url)
        if not args["base_url"]:
            raise DaemonError("backend.base_url: no backend to talk to")
        return args

    def _busifavor(self) -> dict[str, Any]:
        from hexiao.hostd.backends.busifavor import BusifavorBackend, BusifavorClient

        b = self.cfg.backend
        try:
            args = b.busifavor_args()
        except (ConfigError, OSError) as e:
            raise DaemonError(f"backend: {e}") from e
        if self._backend_url:
            args["base_url"] = self._backend_url
        args["base_url"] = args["base_url"] or "https://api.mch.weixin.qq.com"
        try:  # once now: a wrong key or an unreachable platform says so at start
            BusifavorClient(**args)
        except WeChatError as e:
            raise DaemonError(f"backend: {e} (check backend.mchid, merchant_serial_no, "
                              "private_key_file and apiv3_key_file)") from e
        stock = b.stock_id or None
        self._make_client = lambda: BusifavorBackend(BusifavorClient(**args), stock_id=stock)
        return args

    def _client(self) -> Any:
        """A new backend client for one thread (redeem.CardBackend)."""
        if self._make_client is not None:
            return self._make_client()
        return WeChatCardClient(**self._client_args)

    # -- reconcile ----------------------------------------------------------------------------

    def reconcile(self) -> list[Verdict]:
        with jr.Journal(self.journal_path) as journal, contextlib.closing(self._client()) as client:
            out = Engine(journal, client).reconcile(
                self._clock(), settle_after_s=self.cfg.backend.settle_after_s)
            attention = len(journal.entries(("unknown",)))
        self.metrics.journal_attention(attention)
        if out:
            log.info("reconciled %d unfinished entr%s", len(out), "y" if len(out) == 1 else "ies")
        return out

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(RECONCILE_EVERY_S):
            try:
                self.reconcile()
            except Exception:  # the loop must survive a bad backend hour; logged, retried
                log.exception("reconcile failed")

    def sample_metrics(self) -> None:
        """Link counters and connected devices into the metrics (also done every few seconds)."""
        infos = [lane.info() for lane in self.lanes.values()]
        for info in infos:
            # an id the metrics refuse as a label (ValueError): its counters stay out
            with contextlib.suppress(ValueError):
                self.metrics.link_counters(info["id"], info["counters"])
        self.metrics.devices_connected(sum(i["state"] == "open" for i in infos))

    def _metrics_loop(self) -> None:
        while not self._stop.wait(METRICS_EVERY_S):
            self.sample_metrics()

    def _verdict_done(self, device: str, v: Verdict, seconds: float) -> None:
        self.metrics.redemption(v.outcome, v.card_type, seconds, reason=v.reason)
        log.info("verdict", extra={"device": device, "outcome": v.outcome, "reason": v.reason,
                                   "code": v.code_tail, "seconds": round(seconds, 3)})

    # -- control socket -----------------------------------------------------------------------

    def _start_control(self) -> None:
        from hexiao.hostd.control.server import ControlServer

        self._control = ControlServer(str(self.cfg.hostd.control_socket), self)
        self._control.start()

    def _lane(self, device: str) -> DeviceLane:
        from hexiao.hostd.control.server import ControlError

        lane = self.lanes.get(device)
        if lane is None:
            raise ControlError("not_found", f"no device {device!r}; known: "
                               + (", ".join(sorted(self.lanes)) or "none"))
        return lane

    def _ask(self, device: str, msg: dict[str, Any], answer: str) -> dict[str, Any]:
        from hexiao.hostd.control.server import ControlError

        try:
            reply = self._lane(device).request(msg, answer)
        except ConnectionError as e:
            raise ControlError("unavailable", str(e)) from e
        except TimeoutError as e:
            raise ControlError("timeout", str(e)) from e
        return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in reply.items()}

    def status(self) -> dict[str, Any]:
        with jr.Journal(self.journal_path) as journal:
            attention = [e.id for e in journal.entries(("unknown",))]
        return {"pid": os.getpid(), "uptime_s": round(self._clock() - self.started, 1),
                "backend": self.cfg.backend.kind, "journal": str(self.journal_path),
                "devices": {d: lane.state for d, lane in self.lanes.items()},
                "verify_manually": attention}

    def device_list(self) -> list[dict[str, Any]]:
        return [lane.info() for lane in self.lanes.values()]

    def device_info(self, device: str) -> dict[str, Any]:
        return self._lane(device).info()

    def device_ping(self, device: str) -> dict[str, Any]:
        t = time.monotonic()
        self._ask(device, {"type": "ping", "data": b"hexiao"}, "pong")
        return {"device": device, "rtt_ms": round((time.monotonic() - t) * 1000, 1)}

    def device_health(self, device: str) -> dict[str, Any]:
        return self._ask(device, {"type": "health_get"}, "health")

    def device_logs(self, device: str, since: int | None = None,
                    max: int | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "logs_get"}
        if since is not None:
            msg["since"] = since
        if max is not None:
            msg["max"] = max
        return self._ask(device, msg, "logs")

    def capture_start(self, device: str, path: str) -> dict[str, Any]:
        from hexiao.hostd.control.server import ControlError

        if not os.path.isabs(path):
            raise ControlError("bad_request", f"give an absolute path (hostd's cwd is not "
                                              f"yours): {path}")
        try:
            return self._lane(device).capture(path)
        except FileExistsError as e:
            raise ControlError("bad_request", str(e) if "already" in str(e) else
                               f"{path} exists: captures never overwrite a file") from e
        except OSError as e:
            raise ControlError("bad_request", f"cannot create {path}: {e.strerror} "
                                              f"(hostd writes it as its own user)") from e

    def capture_stop(self, device: str) -> dict[str, Any]:
        from hexiao.hostd.control.server import ControlError

        try:
            return self._lane(device).capture(None)
        except LookupError as e:
            raise ControlError("bad_request", str(e)) from e

    def journal_list(self, state: list[str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with jr.Journal(self.journal_path) as journal:
            entries = journal.entries(state)[-limit:]
        return [_entry(e) for e in entries]

    def journal_show(self, entry_id: int) -> dict[str, Any]:
        from hexiao.hostd.control.server import ControlError

        with jr.Journal(self.journal_path) as journal:
            try:
                e = journal.get(entry_id)
            except KeyError as exc:
                raise ControlError("not_found", f"no journal entry {entry_id}") from exc
            steps = [{"step": s.step, "at": _when(s.at), "detail": s.detail}
                     for s in journal.steps(entry_id)]
        return {**_entry(e), "steps": steps}

    def journal_reconcile(self) -> dict[str, Any]:
        out = self.reconcile()
        return {"settled": [v.entry_id for v in out if v.outcome != "verify_manually"],
                "still_unknown": [v.entry_id for v in out if v.outcome == "verify_manually"]}


def _when(t: float) -> str:
    """A journal time as support reads it: local ISO 8601 to the millisecond, with its offset."""
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _entry(e: jr.Entry) -> dict[str, Any]:
    return {"id": e.id, "lane": e.lane, "state": e.state, "outcome": e.outcome,
            "reason": e.reason, "code": tail(e.code or e.scanned), "created": _when(e.created),
            "updated": _when(e.updated), "title": e.detail.get("title"),
            "card_type": e.detail.get("card_type")}
