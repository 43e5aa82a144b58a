"""Headquarters' side of remote diagnostics (docs/fleet-protocol.md, "Remote diagnostics"):
ask one store over MQTT 5 request/response, and read the fleet's stores and lanes from fleetd's
PostgreSQL.

Rules this module keeps:
- Every request is written to `remote_requests` (who asked, from where, with which key) before
  it is published, and its outcome after; a request that cannot be logged is not sent.
- A request is signed with headquarters' Ed25519 key (hostd/fleet/remote.py, the wire form);
  the answer must be sealed by the store's own key (fleetd's `stores` table) for the response
  topic and name the request's nonce, else it is not believed (`bad_answer`).
- MQTT 5: the response topic and the nonce as correlation data go in the PUBLISH properties (and
  in the signed payload, which is what the store trusts); the subscription to the response
  topic is acknowledged before the request leaves, so a fast answer is never missed.
- `timeout` bounds the exchange; a device.capture's duration (`ms`) is added to it (the store
  answers when the capture ends).
- A failure is a RemoteFailure with a kind the CLI maps to its exit codes and one line that
  says what to do; a store that does not answer in time says whether headquarters saw it
  online.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.hostd.fleet import remote
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from psycopg.types.json import Jsonb


class RemoteFailure(Exception):
    """kind: not_found, unavailable, timeout, refused, bad_request, internal (the CLI's)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class Asker:
    """Who asks: headquarters' key, its id, and the operator's name."""
    key: Ed25519PrivateKey
    key_id: str
    operator: str


def _store(conn: psycopg.Connection, store: str) -> tuple[str, bytes]:
    row = conn.execute("SELECT merchant, key FROM stores WHERE store = %s", (store,)).fetchone()
    if row is None:
        raise RemoteFailure("not_found", f"no store {store!r} at headquarters (`hexiao fleet "
                                         "stores` lists them)")
    return row[0], bytes(row[1])


def _online(conn: psycopg.Connection, store: str) -> str:
    row = conn.execute("SELECT state, updated FROM store_online WHERE store = %s",
                       (store,)).fetchone()
    if row is None:
        return "headquarters has never seen it online"
    return f"headquarters saw it {row[0]} at {row[1].astimezone().isoformat(timespec='seconds')}"


def ask(conn: psycopg.Connection, broker: str, asker: Asker, store: str, cmd: str,
        args: dict[str, Any], *, timeout: float = 5.0, prefix: str = "",
        clock: Callable[[], float] = time.time) -> Any:
    """The store's answer to one command (the local command's data), logged in
    remote_requests; RemoteFailure otherwise."""
    merchant, store_key = _store(conn, store)
    nonce = secrets.token_bytes(16)
    client_id = f"hq-{secrets.token_hex(6)}"
    reply = remote.response_topic(merchant, store, client_id)
    lane = args.get("lane")
    row = conn.execute(
        "INSERT INTO remote_requests (operator, key_id, host, merchant, store, lane, cmd, args, "
        "nonce) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (asker.operator, asker.key_id, socket.gethostname(), merchant, store, lane, cmd,
         Jsonb(args), nonce)).fetchone()
    assert row is not None
    rid = row[0]
    conn.commit()

    def finish(outcome: str, detail: str | None = None) -> None:
        conn.execute("UPDATE remote_requests SET outcome = %s, detail = %s, ended = "
                     "clock_timestamp() WHERE id = %s", (outcome, detail, rid))
        conn.commit()

    req = remote.Request(merchant, store, cmd, args, asker.operator, asker.key_id, nonce,
                         round(clock() * 1000), reply)
    if cmd == "device.capture":  # answered when it ends; the store checks the value
        with contextlib.suppress(TypeError, ValueError):
            timeout += min(float(args.get("ms", 5000)) / 1000, remote.CAPTURE_MAX_S)
    try:
        body = _exchange(broker, prefix, client_id, req, remote.sign_request(asker.key, req),
                         store_key, timeout)
    except RemoteFailure as e:
        if e.kind == "timeout":
            e = RemoteFailure("timeout", f"{e.message}; {_online(conn, store)}")
        finish(e.kind if e.kind in ("timeout", "bad_answer") else "error",
               f"{e.kind}: {e.message}")
        raise e from None
    if "error" in body:
        err = body["error"]
        finish("error", f"{err.get('kind')}: {err.get('message')}")
        raise RemoteFailure(str(err.get("kind")), f"store {store}: {err.get('message')}")
    finish("answered")
    return body["result"]


def operator_client(broker: str, client_id: str) -> tuple[mqtt.Client, str, int]:
    """An MQTT 5 client for an operator's command (`hexiao fleet ...`), with the broker
    credentials of $HEXIAO_FLEET_USERNAME / $HEXIAO_FLEET_PASSWORD, and the host and port to
    connect it to; RemoteFailure bad_request for a broker that is not mqtt[s]://HOST[:PORT]."""
    url = urlsplit(broker)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise RemoteFailure("bad_request", f"--broker: expected mqtt://HOST[:PORT], got "
                                           f"{broker!r}")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if url.scheme == "mqtts":
        c.tls_set()
    if os.environ.get("HEXIAO_FLEET_USERNAME"):
        c.username_pw_set(os.environ["HEXIAO_FLEET_USERNAME"],
                          os.environ.get("HEXIAO_FLEET_PASSWORD"))
    return c, url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883)


def _exchange(broker: str, prefix: str, client_id: str, req: remote.Request, data: bytes,
              store_key: bytes, timeout: float) -> dict[str, Any]:
    c, host, port = operator_client(broker, client_id)
    got: dict[str, Any] = {}
    done, subscribed = threading.Event(), threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr != req.nonce or done.is_set():
            return  # not ours (an old answer on a reused topic cannot be: the topic is new)
        try:
            got.update(remote.open_response(msg.payload, req.reply, req.store, store_key,
                                            req.nonce))
        except remote.RemoteError as e:
            got["bad"] = e.message
        done.set()

    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    end = time.monotonic() + timeout
    try:
        c.connect(host, port, keepalive=30, clean_start=True)
    except OSError as e:
        raise RemoteFailure("unavailable", f"cannot reach the broker {broker}: "
                                           f"{e.strerror or e}") from None
    c.loop_start()
    try:
        c.subscribe(prefix + req.reply, options=SubscribeOptions(qos=1))
        if not subscribed.wait(max(0.0, end - time.monotonic())):
            raise RemoteFailure("timeout", f"the broker {broker} did not take the "
                                           f"subscription within {timeout:g} s")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = prefix + req.reply
        props.CorrelationData = req.nonce
        c.publish(prefix + remote.request_topic(req.merchant, req.store), data, qos=1,
                  properties=props)
        if not done.wait(max(0.0, end - time.monotonic())):
            raise RemoteFailure("timeout", f"store {req.store} did not answer within "
                                           f"{timeout:g} s: it is offline or not answering "
                                           "remote requests")
    finally:
        c.disconnect()
        c.loop_stop()
    if "bad" in got:
        raise RemoteFailure("bad_answer", f"store {req.store}'s answer is not believed: "
                                          f"{got['bad']}")
    return got


# -- the fleet, from PostgreSQL -------------------------------------------------------------------


def _iso(t: datetime | None) -> str | None:
    return t.astimezone().isoformat(timespec="seconds") if t is not None else None


def stores(conn: psycopg.Connection, merchant: str | None = None, state: str | None = None,
           franchisee: str | None = None) -> list[dict[str, Any]]:
    """Every store headquarters knows, with its online state and its lanes' link states."""
    rows = conn.execute(
        "SELECT s.store, s.merchant, s.franchisee, o.state, o.updated, "
        "count(h.lane) FILTER (WHERE h.lane <> '@store'), "
        "count(h.lane) FILTER (WHERE h.lane <> '@store' AND h.state->>'link' = 'open') "
        "FROM stores s LEFT JOIN store_online o USING (store) "
        "LEFT JOIN lane_health h USING (store) "
        "WHERE (%(m)s::text IS NULL OR s.merchant = %(m)s) "
        "AND (%(f)s::text IS NULL OR s.franchisee = %(f)s) "
        "AND (%(st)s::text IS NULL OR coalesce(o.state, 'unknown') = %(st)s) "
        "GROUP BY s.store, s.merchant, s.franchisee, o.state, o.updated ORDER BY s.store",
        {"m": merchant, "f": franchisee, "st": state}).fetchall()
    return [{"store": r[0], "merchant": r[1], "franchisee": r[2], "state": r[3] or "unknown",
             "since": _iso(r[4]), "lanes": r[5], "lanes_open": r[6]} for r in rows]


def lanes(conn: psycopg.Connection, store: str | None = None, merchant: str | None = None,
          link: str | None = None) -> list[dict[str, Any]]:
    """Every lane's latest health record (not the store's own `@store` row)."""
    rows = conn.execute(
        "SELECT h.store, h.lane, h.state, h.seen, h.down_since FROM lane_health h "
        "JOIN stores s USING (store) WHERE h.lane <> '@store' "
        "AND (%(s)s::text IS NULL OR h.store = %(s)s) "
        "AND (%(m)s::text IS NULL OR s.merchant = %(m)s) "
        "AND (%(l)s::text IS NULL OR h.state->>'link' = %(l)s) ORDER BY h.store, h.lane",
        {"s": store, "m": merchant, "l": link}).fetchall()
    return [{"store": r[0], "lane": r[1], "device": r[2].get("device"),
             "link": r[2].get("link"), "firmware": r[2].get("firmware"),
             "board": r[2].get("board"), "desired": r[2].get("desired"), "seen": _iso(r[3]),
             "down_since": _iso(r[4])}
            for r in rows]
