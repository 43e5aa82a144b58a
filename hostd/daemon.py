"""hexiao-hostd assembled: config in, lanes, backend, journal, control socket, metrics, systemd.

Rules this module keeps:
- start() brings the parts up in an order where each failure is clear and leaves nothing half
  open: state folder (0700), journal, keystore (0600), backend, reconcile of what a previous run
  left unfinished, then the devices, the control socket, metrics, the receipt tap, and READY=1
  to systemd; the tap alone may fail without stopping start (it is retried, logged and shown
  in `status`): printing and redemption never wait on each other; so may a device without its
  key: its lane shows "no key" (with the provision command) and the other lanes run; and so
  may the status page (hostd/web/: a port in use is logged and hostd runs without it);
- every lane's worker has its own journal connection and backend client (SQLite connections and
  httpx clients are not shared between threads);
- unfinished journal entries are reconciled at start and then every `RECONCILE_EVERY_S`:
  queried, never consumed again (redeem.Engine.reconcile);
- the control socket's commands are hostd/control/handlers.py's, given the lanes and the journal;
  they return plain JSON-able data, with coupon codes only as the journal keeps them (last 4);
- the watchdog is petted only while every lane's threads and the reconcile loop are alive;
- with the tap on and a WeChat card backend, points at the till run (hostd/members/): a member
  card identified on a lane is tied to the receipt the tap sees for that lane (`[tap] lane`),
  credited on the points service's own thread; it reconciles its ledger at start.
- with `[fleet] hq_pubkey_file`, headquarters' desired state (hostd/fleet/desired.py) is laid
  over the config file's rules, settings and macros: the last good document as soon as the
  lanes exist, newer ones as the broker brings them (on the Responder's connection).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from hexiao.hostd import journal as jr
from hexiao.hostd.backends.factory import ConfiguredBackend, SetupError, make_backend
from hexiao.hostd.config import Config
from hexiao.hostd.config.private import provision_hint
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.lanes.discovery import finder
from hexiao.hostd.lanes.lane import DeviceLane
from hexiao.hostd.observability.metrics import Metrics
from hexiao.hostd.observability.notify import Notifier, Watchdog
from hexiao.hostd.redeem import Engine, Verdict

log = logging.getLogger("hexiao.hostd")
RECONCILE_EVERY_S = 60.0
METRICS_EVERY_S = 5.0
TAP_PROBE_EVERY_S = 30.0  # while the tap's printer is not known to be reachable


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
        self.backend: ConfiguredBackend | None = None  # make_backend(), at start
        self._control: Any = None
        self._metrics_server: Any = None
        self.web: Any = None  # the status page (hostd/web/) unless web_listen is ""
        self._watchdog: Watchdog | None = None
        self.tap: Any = None  # the receipt tap (hostd/tap/service.py) when [tap] enabled
        self.points: Any = None  # points at the till (hostd/members/service.py), with the tap
        self.claims: Any = None  # the points claim API (hostd/members/claim.py), if listening
        self._threads: list[threading.Thread] = []
        self._fleet: Any = None  # the fleet bridge (hostd/fleet/), when [fleet] enabled
        self._fleet_health: Any = None  # its HealthFeed (health and events), likewise
        self._remote: Any = None  # answers headquarters (hostd/fleet/remote.py), if configured
        self.desired: Any = None  # headquarters' desired state (hostd/fleet/desired.py), likewise
        self.rollout: Any = None  # headquarters' firmware orders (hostd/fleet/rollout.py), likewise
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
        try:
            self.backend = backend = make_backend(
                self.cfg, self._backend_url, on_token_refused=self.metrics.token_refused)
        except SetupError as e:
            raise DaemonError(str(e)) from e
        if self.cfg.fleet.enabled:  # before reconcile: every step that ends goes to the outbox
            self._start_fleet()
            if self.cfg.fleet.hq_pubkey_file:  # checked now, started with the handlers
                self._make_remote()
        self.reconcile(restart=True)  # no lane runs yet: what is unfinished is a past run's
        for dev in self.cfg.devices:
            lane_cfg = self.cfg.lane(dev.lane)
            assert lane_cfg is not None  # config checks the reference
            self.lanes[dev.id] = DeviceLane(
                dev.id, dev.kid, dev.lane, finder(dev), self.keystore,
                lambda lc=lane_cfg: Engine(jr.Journal(self.journal_path), backend.client(),
                                           lc.engine_config()),
                dict(self.cfg.macros), on_verdict=self._verdict_done, clock=self._clock,
                rules=dev.rules_message(),
                settings=dev.settings.values() if dev.settings else None,
                provision=provision_hint(self.cfg, dev)).start()  # no key: "no key", waits
        if self._remote is not None:  # the last good desired state, before the broker answers
            self._start_desired()
        self._start_control()
        if self._remote is not None:  # it answers from the control handlers
            self._remote.handlers = self.handlers
            self._start_rollout()  # its topics before the connection subscribes
            self._remote.start()
        if self.cfg.hostd.metrics_listen:
            host, _, port = self.cfg.hostd.metrics_listen.rpartition(":")
            self._metrics_server = self.metrics.serve(host.strip("[]"), int(port))
        if self.cfg.tap.enabled:  # its failures are logged and in status; hostd goes on
            from hexiao.hostd.tap.service import TapService

            if self.cfg.backend.kind in ("sim", "wechat_card"):  # updateuser: card API only
                from hexiao.hostd.members.service import PointsService

                self.points = PointsService(
                    self.journal_path, backend.client, tell=self._tell, clock=self._clock,
                    member_ttl_s=self.cfg.tap.member_ttl_s,
                    void_window_s=self.cfg.tap.void_window_s,
                    settle_after_s=self.cfg.backend.settle_after_s).start()
                if self.cfg.tap.claim_listen:
                    self._start_claims(backend)
            self.tap = TapService(self.cfg.tap, metrics=self.metrics,
                                  probe_every_s=TAP_PROBE_EVERY_S,
                                  on_finish=self._tap_finished).start_retrying()
        if self.cfg.hostd.web_listen:  # never raises: a port in use is logged, hostd goes on
            from hexiao.hostd.web.server import StatusPage

            self.web = StatusPage(self.handlers, self.cfg.hostd.web_listen).start()
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
        if self._remote is not None:  # before the lanes: no request waits on a closed lane
            self._remote.stop()
        if self.desired is not None:
            self.desired.stop()
        if self.rollout is not None:  # before the lanes: an update in progress resumes later
            self.rollout.stop()
        if self._control is not None:
            self._control.close()
        if self.web is not None:
            self.web.stop()
        for lane in self.lanes.values():
            lane.close()
        for t in self._threads:
            t.join(5)
        if self._fleet is not None:  # after the lanes: their last steps are in the outbox
            self._fleet_health.close()
            self._fleet.stop()
        if self.tap is not None:
            self.tap.stop()
        if self.claims is not None:
            self.claims.stop()
        if self.points is not None:  # after the tap: its last receipts are handed over
            self.points.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.backend is not None:
            self.backend.close()  # (the embedded simulator, if any)

    def _start_fleet(self) -> None:
        from hexiao.hostd.fleet.bridge import Bridge, FleetError
        from hexiao.hostd.fleet.health import HealthFeed

        try:
            self._fleet = Bridge(self.cfg.fleet, self.journal_path,
                                 registry=self.metrics.registry).start()
        except (FleetError, OSError) as e:
            raise DaemonError(str(e)) from e
        # lane/store health and events into the same outbox, from the metrics loop
        self._fleet_health = HealthFeed(self.journal_path, self._fleet.outbox.place,
                                        clock=self._clock)

    def _make_remote(self) -> None:
        from hexiao.hostd.fleet.bridge import FleetError
        from hexiao.hostd.fleet.remote import Responder

        try:
            self._remote = Responder(self.cfg.fleet, None, registry=self.metrics.registry,
                                     clock=self._clock)
        except (FleetError, OSError) as e:
            raise DaemonError(str(e)) from e

    def _start_desired(self) -> None:
        from hexiao.hostd.fleet.desired import Applier
        from hexiao.hostd.fleet.remote import load_public_key

        assert self.cfg.fleet.hq_pubkey_file is not None  # the responder has read it
        self.desired = Applier(self.cfg, self.lanes, load_public_key(self.cfg.fleet.hq_pubkey_file),
                               self.journal_path, clock=self._clock)
        self.desired.restore()
        self._remote.topics[self.desired.topic] = self.desired.offer  # on its connection
        self.desired.start()

    def _start_rollout(self) -> None:
        from hexiao.hostd.fleet.rollout import QUIET_S, Feed

        def busy(lane: DeviceLane) -> str:  # "in a sale": the lane's own, or a member waiting
            if self.points is not None and lane.lane in self.points.members:
                return "a member waits for the sale's receipt"
            return lane.busy(QUIET_S)

        self.rollout = Feed(self._remote, self.journal_path, self.state_dir,
                            lambda: list(self.lanes.values()), self.handlers.device_update, busy,
                            clock=self._clock).start()

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=f"hexiao-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def healthy(self) -> bool:
        return all(lane.alive() for lane in self.lanes.values()) and all(
            t.is_alive() for t in self._threads if t.name == "hexiao-reconcile")

    # -- reconcile ----------------------------------------------------------------------------

    def reconcile(self, *, restart: bool = False) -> list[Verdict]:
        """Settle unfinished entries; a live lane's own entries are left to it (redeem.owned)."""
        assert self.backend is not None, "start() first"
        with jr.Journal(self.journal_path) as journal, \
                contextlib.closing(self.backend.client()) as client:
            out = Engine(journal, client).reconcile(
                self._clock(), settle_after_s=self.cfg.backend.settle_after_s, restart=restart)
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
        if self._fleet is not None:  # a disk hiccup must not stop the metrics: logged
            try:
                desired = self.desired.version if self.desired is not None else None
                self._fleet_health.sample(infos, self.tap.state() if self.tap else None, desired)
            except Exception:
                log.exception("fleet: health sample failed")

    def _metrics_loop(self) -> None:
        while not self._stop.wait(METRICS_EVERY_S):
            self.sample_metrics()

    def _start_claims(self, backend: ConfiguredBackend) -> None:
        """The points claim API (hostd/members/claim.py): needs the tap key to verify tokens.
        Like the tap, its failure is logged and hostd goes on."""
        from hexiao.hostd.members.claim import Claims, ClaimServer
        from hexiao.hostd.tap.keys import KeyFileError, read_key

        tap = self.cfg.tap
        try:
            if tap.key_file is None:
                raise KeyFileError("tap.key_file is needed to verify receipt tokens")
            claims = Claims(self.journal_path, backend.client, [read_key(tap.key_file)],
                            max_age_s=tap.claim_max_age_s, clock=self._clock)
            self.claims = ClaimServer(claims, tap.claim_listen).start()
        except (KeyFileError, OSError) as e:
            log.error("points claim API not started: tap.claim_listen %s: %s",
                      tap.claim_listen, e)

    def _points_state(self) -> dict[str, Any]:
        """status's points: today's credits, pending, needing a person (members/service.py)."""
        if self.points is None:
            return {"state": "off"}
        claims = self.claims.url if self.claims is not None else ""
        return {"state": "on", **self.points.state(), "claim_url": claims}

    def _tap_finished(self, rec: Any) -> None:
        if self.points is not None:
            self.points.receipts(self.cfg.tap.lane, rec.receipts)

    def _tell(self, device: str, msg: dict[str, Any]) -> None:
        lane = self.lanes.get(device)
        if lane is not None:
            lane.tell(msg)

    def _verdict_done(self, device: str, v: Verdict, seconds: float) -> None:
        self.metrics.redemption(v.outcome, v.card_type, seconds, reason=v.reason)
        if self.points is not None and v.outcome == "identified":
            lane = self.lanes.get(device)
            self.points.member_scanned(device, lane.lane if lane else "", v)
        if self._fleet is not None and v.reason == "quota":
            lane = self.lanes.get(device)
            self._fleet_health.quota_refused(lane.lane if lane else "@store", device)
        log.info("verdict", extra={"device": device, "outcome": v.outcome, "reason": v.reason,
                                   "code": v.code_tail, "seconds": round(seconds, 3)})

    # -- control socket -----------------------------------------------------------------------

    def _start_control(self) -> None:
        from hexiao.hostd.control.handlers import ControlHandlers
        from hexiao.hostd.control.server import ControlServer

        self.handlers = ControlHandlers(
            self.lanes, self.journal_path, self.cfg, reconcile=self.reconcile,
            started=self.started, clock=self._clock,
            capture_max_bytes=self.cfg.hostd.capture_max_bytes,
            tap_state=lambda: self.tap.state() if self.tap is not None else {"state": "off"},
            points_state=self._points_state)
        self._control = ControlServer(str(self.cfg.hostd.control_socket), self.handlers)
        self._control.start()

    def device_info(self, device: str) -> dict[str, Any]:
        """One lane's state, as `hexiao device info` shows it (for callers holding the daemon;
        the control commands are self.handlers')."""
        return self.handlers.device_info(device)

