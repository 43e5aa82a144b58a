"""hostd's fleet bridge: the journal outbox to the broker, over MQTT 5 (paho-mqtt), QoS 1.

Rules this module keeps:
- Off unless `[fleet] enabled = true`; with it off nothing here is imported or started.
- A record leaves the outbox only when the broker's PUBACK says success. "No matching
  subscribers" (0x10) and errors (>= 0x80, e.g. an ACL refusal) keep it, and it is sent again
  after `RETRY_S`: a record nobody was subscribed to is not delivered.
- At most `fleet.window` records are handed to paho at a time (paho keeps them in memory and
  sends them again, in order, after a reconnect); the rest wait on disk. A broker that is down
  for hours costs disk, not memory. After a restart, the outbox is published again from its
  oldest row: headquarters drops what it already has (the record identity).
- One thread owns the outbox's publish state: paho's callbacks only queue what happened, so no
  lock is held across a paho call (paho calls back while holding its own locks). It sleeps
  until a record is put or a PUBACK comes (the outbox's wake event), or IDLE_S: a thousand idle
  bridges in one process cost no polling.
- Persistent session (clean_start = false, session expiry), a retained signed `online` record at
  every connect and a signed `offline` Last Will, so headquarters sees the store drop within
  1.5 x keep-alive.
- Keys come from 0600 files (read_secret) and are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from hexiao.hostd.config.types import ConfigError, Fleet, read_secret
from hexiao.hostd.fleet import record
from hexiao.hostd.fleet.outbox import Outbox, Place
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("hexiao.fleet")
IDLE_S = 0.25        # the outbox is looked at this often when nothing wakes the thread
RETRY_S = 2.0        # a record the broker did not take is sent again after this long
DEPTH_EVERY_S = 1.0  # the depth and age metrics are read this often
SOON_S, SOON_TRIES = 0.002, 50  # a record signalled but not committed yet: looked for again
NO_SUBSCRIBERS = 0x10


class FleetError(Exception):
    """The bridge cannot start; the message says what to fix."""


def read_key(path: Path | None, what: str) -> bytes:
    """A 32-byte key from a 0600 file of 64 hex digits; FleetError naming the key if not."""
    if path is None:
        raise FleetError(f"fleet.{what}: required when fleet.enabled = true")
    try:
        text = read_secret(path)
    except ConfigError as e:
        raise FleetError(f"fleet.{what}: {e}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise FleetError(f"fleet.{what}: {path} must hold 64 hex digits (a 32-byte key); "
                         "make one with: python3 -c 'import secrets; print(secrets.token_hex(32))'")
    return key


class Bridge:
    """Publishes one journal's outbox. start() once, stop() once."""

    def __init__(self, cfg: Fleet, journal_path: Path, *,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not (record.ID.fullmatch(cfg.merchant) and record.ID.fullmatch(cfg.store)):
            raise FleetError("fleet.merchant and fleet.store: required, 1..16 of A-Z a-z 0-9 _ . -")
        self.cfg, self._clock = cfg, clock
        self._key = read_key(cfg.key_file, "key_file")
        code_key = (read_key(cfg.code_key_file, "code_key_file") if cfg.code_key_file
                    else record.derive_code_key(self._key))
        url = urlsplit(cfg.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise FleetError(f"fleet.broker: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], "
                             f"got {cfg.broker!r}")
        self._host, self._port = url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883)
        self.outbox = Outbox(journal_path, Place(cfg.merchant, cfg.store), code_key)
        self.session = self.outbox.next_session()
        self._events: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()  # PUBACKs
        self._pending: dict[int, int] = {}     # paho mid -> seq, owned by the publisher thread
        self._retry: dict[int, float] = {}     # seq -> when to send it again
        self._cursor = 0                       # the highest seq handed to paho
        self._depth_at = 0.0                   # when the depth metrics are read next
        self._wake = self.outbox.wake          # set by new records and by PUBACKs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.published = 0                     # records the broker took (PUBACK success)
        reg = registry or CollectorRegistry()
        self._m_depth = Gauge("hexiao_fleet_outbox_depth", "fleet records waiting in the outbox",
                              registry=reg)
        self._m_age = Gauge("hexiao_fleet_outbox_age_seconds",
                            "age of the oldest fleet record waiting (0: none)", registry=reg)
        self._m_up = Gauge("hexiao_fleet_connected", "1 while connected to the broker",
                           registry=reg)
        self._m_sent = Counter("hexiao_fleet_published", "fleet records the broker took",
                               registry=reg)
        self._m_refused = Counter("hexiao_fleet_refused", "fleet records the broker did not take "
                                  "(kept, sent again)", registry=reg)
        self.client = self._client(cfg)

    def _topic(self, kind: str) -> str:
        return record.topic(self.cfg.merchant, self.cfg.store, record.STORE_LANE, kind)

    def _online(self, state: str) -> bytes:
        t = self._topic("online")
        payload = {"v": record.VERSION, "kind": "online", "merchant": self.cfg.merchant,
                   "store": self.cfg.store, "lane": record.STORE_LANE, "inst": self.outbox.inst,
                   "at": record.ms(self._clock()), "state": state, "session": self.session}
        return record.seal(self._key, self.cfg.store, t, 0, record.encode(payload))

    def _client(self, cfg: Fleet) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hx-{cfg.store}-"
                        f"{self.outbox.inst[:12]}", protocol=mqtt.MQTTv5)
        if cfg.username:
            password = read_secret(cfg.password_file) if cfg.password_file else None
            c.username_pw_set(cfg.username, password)
        if urlsplit(cfg.broker).scheme == "mqtts":
            c.tls_set(ca_certs=str(cfg.tls_ca_file) if cfg.tls_ca_file else None,
                      certfile=str(cfg.tls_cert_file) if cfg.tls_cert_file else None,
                      keyfile=str(cfg.tls_key_file) if cfg.tls_key_file else None,
                      cert_reqs=ssl.CERT_REQUIRED)
        c.max_inflight_messages_set(cfg.window)
        c.reconnect_delay_set(1, 30)
        c.will_set(cfg.topic_prefix + self._topic("online"), self._online("offline"), qos=1,
                   retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        return c

    # --- paho callbacks (its network thread): record what happened, nothing more ---------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            log.warning("fleet: broker %s:%d refused the connection: %s", self._host, self._port,
                        rc)
            return
        self.connected.set()
        self._m_up.set(1)
        log.info("fleet: connected to %s:%d (session present: %s)", self._host, self._port,
                 flags.session_present)
        client.publish(self.cfg.topic_prefix + self._topic("online"), self._online("online"),
                       qos=1, retain=True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any = None) -> None:
        self.connected.clear()
        self._m_up.set(0)
        if not self._stop.is_set():
            log.warning("fleet: disconnected from %s:%d (%s); records wait in the outbox",
                        self._host, self._port, rc)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any,
                    props: Any) -> None:
        self._events.put((mid, rc.value))
        self._wake.event.set()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Bridge:
        self.outbox.install()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        self.client.connect_async(self._host, self._port, keepalive=self.cfg.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="hexiao-fleet", daemon=True)
        self._thread.start()
        log.info("fleet: bridge started for %s/%s (installation %s)", self.cfg.merchant,
                 self.cfg.store, self.outbox.inst)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop publishing; what is not acknowledged stays in the outbox for the next start."""
        self.outbox.uninstall()
        self._stop.set()
        self._wake.event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.connected.is_set():  # a clean stop says so at once (the will is for a crash)
            info = self.client.publish(self.cfg.topic_prefix + self._topic("online"),
                                       self._online("offline"), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the publisher thread ---------------------------------------------------------------

    def _run(self) -> None:
        soon = 0
        while not self._stop.is_set():
            self._wake.event.clear()  # before the step: a record put during it wakes the wait
            try:
                self._step()
            except Exception:  # a disk hiccup must not end the bridge: logged, tried again
                log.exception("fleet: publish step failed")
                self._stop.wait(1.0)
                continue
            # a record put but not seen yet is being committed (the signal comes from inside
            # its transaction): look again in a moment, not after IDLE_S
            if (self._wake.last > self._cursor and soon < SOON_TRIES
                    and len(self._pending) + len(self._retry) < self.cfg.window):
                soon += 1
                self._wake.event.wait(SOON_S)
            else:
                soon = 0
                self._wake.event.wait(IDLE_S)  # a new record, a PUBACK, or the idle timeout

    def _step(self) -> None:
        acked: list[int] = []
        while True:
            try:
                mid, code = self._events.get_nowait()
            except queue.Empty:
                break
            seq = self._pending.pop(mid, None)
            if seq is None:
                continue  # the online record, or a mid from before a restart
            if code >= 0x80 or code == NO_SUBSCRIBERS:
                self._retry[seq] = self._clock() + RETRY_S
                self._m_refused.inc()
                log.warning("fleet: record %d not taken by the broker (reason 0x%02x); it stays "
                            "in the outbox", seq, code)
            else:
                acked.append(seq)
        if acked:
            self.outbox.delete(acked)
            self.published += len(acked)
            self._m_sent.inc(len(acked))
        now = self._clock()
        for seq, when in sorted(self._retry.items()):
            if len(self._pending) >= self.cfg.window or when > now:
                continue
            del self._retry[seq]
            row = self.outbox.get(seq)
            if row is not None:
                self._publish(row.seq, row.topic, row.payload)
        room = self.cfg.window - len(self._pending) - len(self._retry)
        if room > 0:
            for row in self.outbox.after(self._cursor, room):
                self._publish(row.seq, row.topic, row.payload)
                self._cursor = row.seq
        if now >= self._depth_at:
            self._depth_at = now + DEPTH_EVERY_S
            depth, oldest = self.outbox.depth()
            self._m_depth.set(depth)
            self._m_age.set(max(0.0, now - oldest) if oldest is not None else 0.0)

    def _publish(self, seq: int, topic: str, payload: bytes) -> None:
        sealed = record.seal(self._key, self.cfg.store, topic, seq, payload)
        info = self.client.publish(self.cfg.topic_prefix + topic, sealed, qos=1)
        self._pending[info.mid] = seq
