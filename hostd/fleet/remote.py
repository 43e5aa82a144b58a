"""Remote diagnostics (docs/fleet-protocol.md, "Remote diagnostics"): headquarters asks a store's
hostd over MQTT 5 request/response; the wire form for both ends, and the store's Responder.

Rules this module keeps:
- Both ends use this module: headquarters builds requests (sign_request) and opens answers
  (open_response, fleetd/remote.py); the store opens requests (open_request) and seals answers.
- Only headquarters can ask: a request is signed with headquarters' Ed25519 key; a store holds
  only the public half (`fleet.hq_pubkey_file`), so a stolen store PC cannot ask anything of any
  store, its own included. The signature covers the request topic, so a request moved to
  another store's topic fails, and the payload names its store (checked too).
- Replays are refused: a request is accepted only within WINDOW_S of the store's clock, never
  dated before this Responder started (a nonce seen by the previous process is not known to this
  one), and its nonce only once (kept for the window, at most MAX_NONCES).
- Read-only: COMMANDS is the whole list (status and device diagnostics); they run through
  hostd's own ControlHandlers with the control socket's argument checks, so the answer is the
  data the local command gets, as JSON text inside the signed answer.
- An answer is sealed with the store's key (record.seal, the topic as aad) on a topic under the
  store's own tree, so the store's broker ACL stays "publish only under hexiao/.../M/S/".
- Refusals are counted per reason and logged without key material; a request whose signature
  did not verify is never answered (no oracle for forgers); a verified one that is stale or
  asks for an unknown command gets a signed refusal the operator can read.
- One worker thread runs requests in order from a bounded queue (paho's thread only queues):
  a flood costs a counter, never memory or the lanes' time.
- device.capture is bounded for a message: at most CAPTURE_MAX_S seconds and CAPTURE_MAX_BYTES
  of capture file (the lane's CaptureWriter enforces the cap and says so in the file), recorded
  into a private temporary folder and removed once answered; it waits on a thread of its own,
  so the worker keeps answering meanwhile, and hostd stopping ends it early (still answered).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hexiao.hostd import keyfiles
from hexiao.hostd.fleet import record
from hexiao.protocol import cbor, codec_fast, codecs
from hexiao.protocol.errors import ProtocolError

log = logging.getLogger("hexiao.fleet.remote")

ROOT = "hexiao/ctl/v1/"   # beside hexiao/v1/: fleetd's record subscription never sees these
VERSION = 1
WINDOW_S = 30.0           # a request older or newer than this (store clock) is stale
MAX_NONCES = 10_000       # nonces remembered at once; beyond it requests are refused (busy)
QUEUE = 16                # requests waiting for the worker; beyond it refused (busy)
DOMAIN = b"hexiao-ctl-v1\x00"
COMMANDS = ("status", "device.list", "device.info", "device.ping", "device.health",
            "device.logs", "device.capture")
CAPTURE_MAX_S = 30.0               # a remote capture's longest; the asker waits this long too
CAPTURE_MAX_BYTES = 256 * 1024     # its file, sent whole in one answer (base64 in the JSON)
REASONS = ("malformed", "bad_signature", "wrong_store", "stale", "replay", "command", "busy")
_ANSWERED_REFUSALS = ("stale", "command")  # verified, and worth the operator's reading


class RemoteError(Exception):
    """A request (or answer) that cannot be accepted; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def request_topic(merchant: str, store: str) -> str:
    return f"{ROOT}{merchant}/{store}/request"


def response_topic(merchant: str, store: str, client: str) -> str:
    return f"{ROOT}{merchant}/{store}/response/{client}"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Headquarters' public key (PEM, as `hexiao keys generate` writes KEY.pub); ValueError."""
    try:
        return keyfiles.load_public_key(path)
    except keyfiles.KeyFileError as e:
        raise ValueError(f"fleet.hq_pubkey_file: {e} (make the pair at headquarters with: "
                         "hexiao keys generate --out hq.key)") from None


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    merchant: str
    store: str
    cmd: str
    args: dict[str, Any]
    by: str          # who asked (the operator), as headquarters signed it
    key: str         # headquarters' key id (fingerprint)
    nonce: bytes
    at: int          # headquarters' clock, Unix ms
    reply: str       # the response topic from hexiao/ctl/v1/ on


def sign_signed(key: Ed25519PrivateKey, topic: str, payload: bytes) -> bytes:
    """Any headquarters document for `topic` (from hexiao/ctl/v1/ on): CBOR [payload, Ed25519
    signature over DOMAIN, the topic and the payload]. Requests and orders alike."""
    return cbor.dumps([payload, key.sign(DOMAIN + topic.encode() + b"\x00" + payload)])


def open_signed(data: bytes, topic: str, hq: Ed25519PublicKey) -> bytes:
    """The payload of a document sign_signed() made for `topic`, its signature checked;
    RemoteError malformed or bad_signature. The caller checks the payload's fields."""
    try:
        outer = codec_fast.loads(bytes(data))
        payload, sig = outer
        if not (isinstance(payload, bytes) and isinstance(sig, bytes) and len(sig) == 64):
            raise ValueError
    except (ProtocolError, ValueError, TypeError):
        raise RemoteError("malformed", "not a signed document") from None
    try:
        hq.verify(sig, DOMAIN + topic.encode() + b"\x00" + payload)
    except InvalidSignature:
        raise RemoteError("bad_signature", "not signed by headquarters' key") from None
    return payload


def open_for_store(data: bytes, on: str, hq: Ed25519PublicKey, merchant: str, store: str, *,
                   want_topic: str, fields: dict[str, type], what: str,
                   valid: Callable[[dict[str, Any]], bool] = lambda p: True) -> dict[str, Any]:
    """The payload (a CBOR map) of a headquarters document published on `on` for this store:
    the signature, the topic (`want_topic`), the fields' types (`fields`, with "v" == VERSION
    and `valid`) and the store it names checked, in that order. RemoteError names the reason;
    `what` ("a request", "an order", ...) is how a refusal names the document."""
    payload = open_signed(data, on, hq)
    if on != want_topic:
        raise RemoteError("wrong_store", f"published on {on}, not this store's topic")
    try:
        p = codec_fast.loads(payload)
    except ProtocolError:
        raise RemoteError("malformed", "the payload is not CBOR of the profile") from None
    if not isinstance(p, dict) or any(
            not isinstance(p.get(k), t) or (t is int and isinstance(p.get(k), bool))
            for k, t in fields.items()) or p["v"] != VERSION or not valid(p):
        raise RemoteError("malformed", "a field is missing or of the wrong type")
    if (p["merchant"], p["store"]) != (merchant, store):
        raise RemoteError("wrong_store", f"{what} for store {p['store'][:16]!r}")
    return p


def sign_request(key: Ed25519PrivateKey, req: Request) -> bytes:
    payload = cbor.dumps({"v": VERSION, "merchant": req.merchant, "store": req.store,
                          "cmd": req.cmd, "args": req.args, "by": req.by, "key": req.key,
                          "nonce": req.nonce, "at": req.at, "reply": req.reply})
    return sign_signed(key, request_topic(req.merchant, req.store), payload)


_FIELDS = {"v": int, "merchant": str, "store": str, "cmd": str, "args": dict, "by": str,
           "key": str, "nonce": bytes, "at": int, "reply": str}


def open_request(data: bytes, topic: str, hq: Ed25519PublicKey, merchant: str,
                 store: str) -> Request:
    """The request published on `topic` (from hexiao/ctl/v1/ on) for this store, its signature
    and fields checked (not its time or nonce: Guard). RemoteError names the reason."""
    p = open_for_store(data, topic, hq, merchant, store, want_topic=request_topic(merchant, store),
                       fields=_FIELDS, what="a request", valid=lambda p: len(p["nonce"]) == 16)
    if not p["reply"].startswith(f"{ROOT}{merchant}/{store}/response/"):
        raise RemoteError("malformed", "the response topic is not under this store's tree")
    return Request(p["merchant"], p["store"], p["cmd"], p["args"], p["by"], p["key"],
                   p["nonce"], p["at"], p["reply"])


class Guard:
    """The time window and the nonces seen (see the module's rules)."""

    def __init__(self, started_ms: int, window_s: float = WINDOW_S,
                 max_nonces: int = MAX_NONCES) -> None:
        self.started_ms, self.window_ms, self.max = started_ms, int(window_s * 1000), max_nonces
        self._seen: dict[bytes, int] = {}  # nonce -> until when it is remembered (ms)

    def check(self, nonce: bytes, at: int, now: int) -> None:
        if abs(now - at) > self.window_ms:
            raise RemoteError("stale", f"dated {(at - now) / 1000:+.0f} s from the store's "
                                       f"clock (more than {self.window_ms // 1000} s): set "
                                       "both clocks right (NTP)")
        if at < self.started_ms:
            raise RemoteError("stale", "dated before this hostd started: ask again")
        if len(self._seen) >= self.max // 2:  # forget what the window refuses anyway
            self._seen = {n: t for n, t in self._seen.items() if t >= now}
        if nonce in self._seen:
            raise RemoteError("replay", "this request was answered already")
        if len(self._seen) >= self.max:
            raise RemoteError("busy", "too many requests in the window")
        self._seen[nonce] = at + 2 * self.window_ms  # past it, the window refuses it anyway


# -- answers --------------------------------------------------------------------------------------


def seal_response(key: bytes, store: str, reply: str, nonce: bytes, at: int,
                  result: Any = None, error: tuple[str, str] | None = None) -> bytes:
    body: dict[str, Any] = {"v": VERSION, "store": store, "nonce": nonce, "at": at}
    if error is None:
        body["result"] = json.dumps(result, ensure_ascii=False)
    else:
        body["error"] = {"kind": error[0], "message": error[1]}
    return record.seal(key, store, reply, 0, cbor.dumps(body))


def open_response(data: bytes, reply: str, store: str, key: bytes,
                  nonce: bytes) -> dict[str, Any]:
    """An answer's body ({"result": ...} or {"error": {kind, message}}), checked: sealed by
    `store` with its key for `reply`, answering `nonce`. RemoteError otherwise."""
    try:
        m = codecs.parse(bytes(data))
    except (ProtocolError, ValueError, IndexError, TypeError):
        raise RemoteError("malformed", "not a sealed answer") from None
    if m.kid != store.encode():
        raise RemoteError("wrong_store", "the answer is signed by another store")
    try:
        m.verify(key, reply.encode())
        body = codec_fast.loads(m.payload)
    except ProtocolError:
        raise RemoteError("bad_signature", "the answer's MAC does not verify") from None
    if not isinstance(body, dict) or body.get("nonce") != nonce or body.get("store") != store:
        raise RemoteError("malformed", "the answer is not for this request")
    if "error" in body:
        return {"error": body["error"]}
    return {"result": json.loads(body["result"])}


# -- the store's side -----------------------------------------------------------------------------


def _device_for(handlers: Any, lane: str) -> str:
    """The device of a hostd lane (its name), or the device of that id."""
    from hexiao.hostd.control.client import ControlError

    rows = handlers.device_list()
    ids = [r["id"] for r in rows if r.get("id") == lane] or \
        [r["id"] for r in rows if r.get("lane") == lane]
    if len(ids) == 1:
        return str(ids[0])
    if not ids:
        raise ControlError("not_found", f"no lane or device {lane!r} at this store; known: "
                           + (", ".join(sorted({str(r.get('lane')) for r in rows})) or "none"))
    raise ControlError("bad_request", f"lane {lane!r} has devices {', '.join(ids)}: give "
                                      "one of them as --lane")


def run_command(handlers: Any, cmd: str, args: dict[str, Any]) -> Any:
    """One remote command through hostd's handlers, with the control socket's checks."""
    from hexiao.hostd.control.client import ControlError
    from hexiao.hostd.control.commands import check_args

    args = dict(args)
    if cmd.startswith("device.") and cmd != "device.list":
        lane = args.pop("lane", None)
        if not isinstance(lane, str):
            raise ControlError("bad_request", f"{cmd}: a lane is required")
        args["device"] = _device_for(handlers, lane)
    return getattr(handlers, cmd.replace(".", "_"))(**check_args(cmd, args))


class RemoteCapture:
    """A device.capture in progress: the lane's capture into a private temporary folder."""

    def __init__(self, handlers: Any, args: dict[str, Any]) -> None:
        import tempfile

        from hexiao.hostd.control.client import ControlError
        from hexiao.hostd.control.commands import check_args

        args = dict(args)
        lane, ms = args.pop("lane", None), args.pop("ms", 5000)  # CBOR here has no floats
        if args:
            raise ControlError("bad_request", f"device.capture: unexpected argument "
                                              f"{sorted(args)[0][:64]!r}")
        if not isinstance(lane, str):
            raise ControlError("bad_request", "device.capture: a lane is required")
        if isinstance(ms, bool) or not isinstance(ms, int) or \
                not 0 < ms <= CAPTURE_MAX_S * 1000:
            raise ControlError("bad_request", f"device.capture: argument 'ms' must be a "
                                              f"duration in ms up to {CAPTURE_MAX_S * 1000:.0f}")
        self.device, self.seconds = _device_for(handlers, lane), ms / 1000
        self.folder = tempfile.mkdtemp(prefix="hexiao-remote-capture-")  # 0700
        path = os.path.join(self.folder, f"{self.device}.hxcap")
        try:
            check_args("capture.start", {"device": self.device, "path": path})
            self.lane = handlers.lanes[self.device]
            self.writer = self.lane.start_capture(path, CAPTURE_MAX_BYTES)
        except BaseException as e:  # nothing recorded: nothing left behind
            self._remove()
            if isinstance(e, OSError):  # FileExistsError: the lane is being captured already
                raise ControlError("bad_request", str(e) if isinstance(e, FileExistsError)
                                   else f"cannot record a capture: {e.strerror}") from e
            raise

    def finish(self, reason: str) -> dict[str, Any]:
        """End it (`reason` into the file's header) and give the file, base64, with its size."""
        import base64

        try:
            with contextlib.suppress(LookupError):  # stopped already (hostd stopping)
                self.lane.stop_capture(reason, only=self.writer)
            data = Path(self.writer.path).read_bytes()
        finally:
            self._remove()
        out: dict[str, Any] = {"device": self.device, "seconds": self.seconds,
                               "bytes": len(data), "max_bytes": CAPTURE_MAX_BYTES}
        if self.writer.stopped and self.writer.stopped != reason:
            out["stopped_early"] = self.writer.stopped
        return {**out, "capture": base64.b64encode(data).decode("ascii")}

    def _remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


class Responder:
    """Answers headquarters' requests for one store from hostd's ControlHandlers; its own MQTT
    connection (the bridge's stays about the outbox). start() once, stop() once."""

    def __init__(self, cfg: Any, handlers: Any, *, registry: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        import paho.mqtt.client as mqtt
        from hexiao.hostd.config.types import read_secret
        from hexiao.hostd.fleet.bridge import FleetError, read_key
        from paho.mqtt.enums import CallbackAPIVersion
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter as PCounter

        try:
            self._hq = load_public_key(cfg.hq_pubkey_file)
        except ValueError as e:
            raise FleetError(str(e)) from None
        self.cfg, self.handlers, self._clock = cfg, handlers, clock
        self._key = read_key(cfg.key_file, "key_file")
        self.topic = request_topic(cfg.merchant, cfg.store)
        self.guard = Guard(record.ms(clock()))
        self.refused: Counter[str] = Counter()
        self.answered = 0
        self._jobs: queue.Queue[tuple[str, bytes] | None] = queue.Queue(QUEUE)
        self._stopping = threading.Event()  # ends captures in progress early
        self._m = PCounter("hexiao_fleet_remote_refused", "remote requests refused, by reason",
                           ["reason"], registry=registry or CollectorRegistry())
        url = urlsplit(cfg.broker)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        self.subscribed = threading.Event()
        # more of this store's signed topics (from hexiao/ on) on this connection, set before
        # start(): topic -> handler(topic, data), called on paho's thread (it must only queue)
        self.topics: dict[str, Callable[[str, bytes], None]] = {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                        client_id=f"hx-{cfg.store}-rq-{os.urandom(4).hex()}")
        if cfg.username:
            c.username_pw_set(cfg.username, read_secret(cfg.password_file)
                              if cfg.password_file else None)
        if url.scheme == "mqtts":
            import ssl
            c.tls_set(ca_certs=str(cfg.tls_ca_file) if cfg.tls_ca_file else None,
                      certfile=str(cfg.tls_cert_file) if cfg.tls_cert_file else None,
                      keyfile=str(cfg.tls_key_file) if cfg.tls_key_file else None,
                      cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        self.client = c
        self._thread = threading.Thread(target=self._run, name="hexiao-fleet-remote",
                                        daemon=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if not rc.is_failure:
            from paho.mqtt.subscribeoptions import SubscribeOptions
            client.subscribe([(self.cfg.topic_prefix + t, SubscribeOptions(qos=1))
                              for t in (self.topic, *self.topics)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        other = self.topics.get(msg.topic[len(self.cfg.topic_prefix):])
        if other is not None:
            other(msg.topic[len(self.cfg.topic_prefix):], bytes(msg.payload))
            return
        try:
            self._jobs.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self._refuse("busy", "the request queue is full")

    def start(self) -> Responder:
        # a fresh session: requests sent while this store was away are stale anyway
        self.client.connect_async(self._host, self._port, keepalive=self.cfg.keepalive_s,
                                  clean_start=True)
        self.client.loop_start()
        self._thread.start()
        log.info("fleet: answering headquarters' requests on %s", self.topic)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._jobs.put(None, timeout=1)
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    def _refuse(self, reason: str, why: str) -> None:
        self.refused[reason] += 1
        self._m.labels(reason).inc()
        log.warning("fleet: remote request refused (%s): %s", reason, why)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self.handle(*job)
            except Exception:  # one bad request must not end the responder
                log.exception("fleet: remote request failed")

    def handle(self, topic: str, data: bytes) -> None:
        from hexiao.hostd.control.client import ControlError

        prefix = self.cfg.topic_prefix
        rel = topic[len(prefix):] if topic.startswith(prefix) else topic
        try:
            req = open_request(data, rel, self._hq, self.cfg.merchant, self.cfg.store)
        except RemoteError as e:
            self._refuse(e.reason, e.message)
            return
        now = record.ms(self._clock())
        try:
            if req.cmd not in COMMANDS:
                raise RemoteError("command", f"{req.cmd[:32]!r} is not answered remotely; "
                                             f"these are: {', '.join(COMMANDS)}")
            self.guard.check(req.nonce, req.at, now)
        except RemoteError as e:
            self._refuse(e.reason, f"{e.message} (asked by {req.by[:64]!r})")
            if e.reason in _ANSWERED_REFUSALS:
                self._answer(req, now, error=("refused", e.message))
            return
        log.info("fleet: %s asked by %s (key %s)", req.cmd, req.by[:64], req.key[:64])
        try:
            if req.cmd == "device.capture":
                cap = RemoteCapture(self.handlers, req.args)
                threading.Thread(target=self._captured, args=(req, cap), daemon=True,
                                 name="hexiao-fleet-capture").start()
                return
            result = run_command(self.handlers, req.cmd, req.args)
        except ControlError as e:
            self._answer(req, now, error=(e.kind, e.message))
        except TypeError as e:  # args the handler does not take
            self._answer(req, now, error=("bad_request", str(e)))
        else:
            self._answer(req, now, result=result)
            self.answered += 1

    def _captured(self, req: Request, cap: RemoteCapture) -> None:
        stopping = self._stopping.wait(cap.seconds)
        try:
            result = cap.finish("hostd stopped" if stopping else
                                f"{cap.seconds:g} s asked remotely by {req.by[:64]}")
        except OSError as e:
            self._answer(req, record.ms(self._clock()),
                         error=("internal", f"cannot read the capture back: {e.strerror}"))
            return
        self._answer(req, record.ms(self._clock()), result=result)
        self.answered += 1

    def _answer(self, req: Request, now: int, result: Any = None,
                error: tuple[str, str] | None = None) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        sealed = seal_response(self._key, self.cfg.store, req.reply, req.nonce,
                               record.ms(self._clock()), result, error)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = req.nonce
        self.client.publish(self.cfg.topic_prefix + req.reply, sealed, qos=1, properties=props)
