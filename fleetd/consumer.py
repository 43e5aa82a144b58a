"""fleetd's consumer: a shared MQTT 5 subscription in, verified records into PostgreSQL.

Rules this module keeps:
- One shared subscription, `$share/<group>/<prefix>hexiao/v1/#`, QoS 1, on a persistent session
  (clean_start = false, a stable client id): several instances split the stores' records, and
  an instance that dies gets its unacknowledged messages again when it returns (or the broker
  hands them to another member of the group).
- Manual acknowledgement: a message is acknowledged (PUBACK) only after the transaction holding
  its row (or its rejection count) has committed. A database error acknowledges nothing; the
  batch is tried again on a new connection.
- Every record is checked by hostd.fleet.record.unseal (docs/fleet-protocol.md, in order);
  a refused one is counted (rejections table and `counts`) and acknowledged: it will never
  become valid. Keys come from the stores table, re-read when an unknown kid arrives.
- paho's callbacks only queue messages; one worker thread owns the database connection.
- After a batch commits, desired.reports() (fleetd/desired.py) files the stores' desired-state
  events; a failure there retries the batch like any database error (both are idempotent).
- The CONNECT asks for RECEIVE_MAX unacknowledged messages (MQTT 5 Receive Maximum): without it
  the broker keeps its own default (mosquitto: 20), and since acknowledgement waits for the
  commit, 20 in flight would cap an instance at 20 records per transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from hexiao.fleetd import db, desired
from hexiao.hostd.fleet import record
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("hexiao.fleetd")
BATCH = 500            # messages per transaction at most
RECEIVE_MAX = 2 * BATCH  # unacknowledged messages the broker may send us (one batch in the
                         # database while the next one gathers)
GATHER_S = 0.02        # how long a batch waits for more messages once it has one
KEY_REFRESH_S = 5.0    # an unknown kid re-reads the stores table at most this often


@dataclass(frozen=True)
class Settings:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    dsn: str = "postgresql://postgres@127.0.0.1:5432/hexiao_fleet"
    group: str = "fleetd"
    topic_prefix: str = ""
    client_id: str = "fleetd-1"
    username: str = ""
    password: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 86400


@dataclass(frozen=True)
class _Msg:
    mid: int
    qos: int
    topic: str
    payload: bytes


class Consumer:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.counts: Counter[str] = Counter()
        self.db_retries = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._q: queue.SimpleQueue[_Msg] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._keys: dict[str, bytes] = {}
        self._keys_read = float("-inf")
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                        protocol=mqtt.MQTTv5, manual_ack=True)
        if s.username:
            c.username_pw_set(s.username, s.password)
        if s.tls:
            c.tls_set(ca_certs=s.tls_ca_file)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        self.client = c

    @property
    def subscription(self) -> str:
        return f"$share/{self.s.group}/{self.s.topic_prefix}{record.ROOT}#"

    # --- paho callbacks ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            log.warning("fleetd: broker refused the connection: %s", rc)
            return
        self.connected.set()
        log.info("fleetd: connected (session present: %s), subscribing %s",
                 flags.session_present, self.subscription)
        client.subscribe(self.subscription, options=SubscribeOptions(qos=1))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any = None) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stop.is_set():
            log.warning("fleetd: disconnected from the broker (%s)", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._q.put(_Msg(msg.mid, msg.qos, msg.topic, bytes(msg.payload)))

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Consumer:
        self._conn = self._connect_db()
        applied = db.migrate(self._conn)
        if applied:
            log.info("fleetd: applied migrations %s", ", ".join(applied))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.s.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAX
        self.client.connect_async(self.s.broker_host, self.s.broker_port,
                                  keepalive=self.s.keepalive_s, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="fleetd-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()
        if self._conn is not None:
            self._conn.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        return self._q.qsize()

    def _connect_db(self) -> psycopg.Connection:
        return psycopg.connect(self.s.dsn, autocommit=True)

    # --- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + GATHER_S
            while len(batch) < BATCH:
                try:
                    batch.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[_Msg]) -> None:
        while not self._stop.is_set():
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect_db()
                accepted, rejected = self._check(batch)
                counts = db.write_batch(self._conn, accepted, rejected)
                desired.reports(self._conn, accepted)  # idempotent: a retried batch is harmless
            except psycopg.Error as e:  # nothing committed, nothing acknowledged: try again
                log.warning("fleetd: database: %s; the batch of %d is tried again", e,
                            len(batch))
                self.db_retries += 1
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                self._stop.wait(1.0)
                continue
            self.counts.update(counts)
            for m in batch:  # committed: now the broker may forget them
                self.client.ack(m.mid, m.qos)
            return

    def _check(self, batch: list[_Msg]) -> tuple[list[db.Accepted], list[db.Rejected]]:
        accepted, rejected = [], []
        prefix = self.s.topic_prefix
        for m in batch:
            name = m.topic[len(prefix):] if m.topic.startswith(prefix) else ""
            claimed = name.split("/")[3] if name.count("/") >= 4 else ""
            try:
                kid, seq, payload = record.unseal(m.payload, name, self._key)
            except record.RecordError as e:
                rejected.append(db.Rejected(e.reason, claimed[:16], str(e)))
                continue
            accepted.append(db.Accepted(kid, seq, payload))
        return accepted, rejected

    def _key(self, kid: str) -> tuple[str, bytes] | None:
        key = self._keys.get(kid)
        if key is None and time.monotonic() - self._keys_read > KEY_REFRESH_S:
            assert self._conn is not None
            self._keys = db.store_keys(self._conn)
            self._keys_read = time.monotonic()
            key = self._keys.get(kid)
        return None if key is None else (kid, key)
