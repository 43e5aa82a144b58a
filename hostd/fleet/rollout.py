"""Staged firmware rollout, the store's side (docs/firmware-update.md, "Staged rollout"): the
wire form of headquarters' firmware orders and bundles (both ends use it), and the Updater that
carries an order out on this store's lanes.

Rules this module keeps:
- Nothing is acted on before it verifies. An order is signed by headquarters' Ed25519 key over
  its own topic (remote.sign_signed/open_signed, the one signing rule of hexiao/ctl/v1/), names
  this merchant and store, and carries a doc number that only grows: an order older than the
  one held is refused (`replay`), the same one again (a retained copy at every reconnect) is
  ignored. A bundle is taken only if its SHA-256 is the one the signed order names; the device
  then checks the bundle's own signature, board and counter (fw_update.py) as for any update.
- The update runs through the code `hexiao device update` uses (ControlHandlers.device_update)
  and only on a lane that is idle: its link open, not in a sale (busy() says why not: a scan
  being redeemed or within `quiet_s`, a member waiting for a receipt). At most `parallel` lanes
  of the store at once (the order's, default 1).
- Progress is one JSON file in hostd's state folder (0600, replaced atomically), so a restarted
  hostd resumes: a lane found running the order's version is done, one that was updating is
  tried again (the transfer resumes where it stopped). Each event is in the outbox before the
  file says the step happened: a crash between the two repeats an event, never loses one.
- Progress goes to headquarters as `event` records through the outbox (in order, across
  outages): fw_started, fw_done (version, trial or confirmed), fw_failed (why), fw_rolled_back
  (why: the device went back by itself). A lane done on trial is asked again every
  `watch_every_s` until the device confirms it or rolls it back. After a rollback the store
  starts no more lanes of that order (headquarters halts the rollout on the event anyway).
- Refusals are counted per reason and logged without key material.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hexiao.hostd.fleet.remote import ROOT, RemoteError, open_for_store, sign_signed
from hexiao.protocol import cbor, codec_fast
from hexiao.protocol.errors import ProtocolError

log = logging.getLogger("hexiao.fleet.rollout")
VERSION = 1
STATES = ("run", "pause", "stop")        # an order's state: carry on, hold, give up
QUIET_S = 60.0                           # no scan this long before a lane is updated
OFFER = {"digest": bytes, "size": int, "manifest_size": int, "signature": bytes, "board": str,
         "version": str, "counter": int}
_ORDER = {"v": int, "merchant": str, "store": str, "doc": int, "rollout": int, "version": str,
          "sha256": str, "lanes": list, "parallel": int, "state": str, "key": str, "at": int}
TERMINAL = ("done", "confirmed", "failed", "rolled_back")


def order_topic(merchant: str, store: str) -> str:
    return f"{ROOT}{merchant}/{store}/firmware"


def bundle_topic(merchant: str, sha256: str) -> str:
    return f"{ROOT}{merchant}/fw/{sha256}"


@dataclass(frozen=True)
class Order:
    merchant: str
    store: str
    doc: int            # only grows (headquarters' clock in ms, or one more than the last)
    rollout: int
    version: str
    sha256: str         # hex: the image's digest (fw_image), the bundle's name
    lanes: tuple[str, ...]
    parallel: int
    state: str          # STATES
    key: str            # headquarters' key id
    at: int

    def payload(self) -> dict[str, Any]:
        return {"v": VERSION, "merchant": self.merchant, "store": self.store, "doc": self.doc,
                "rollout": self.rollout, "version": self.version, "sha256": self.sha256,
                "lanes": list(self.lanes), "parallel": self.parallel, "state": self.state,
                "key": self.key, "at": self.at}


def sign_order(key: Ed25519PrivateKey, order: Order) -> bytes:
    return sign_signed(key, order_topic(order.merchant, order.store), cbor.dumps(order.payload()))


def open_order(data: bytes, topic: str, hq: Ed25519PublicKey, merchant: str,
               store: str) -> Order:
    """The order published on `topic` (from hexiao/ctl/v1/ on), signature and fields checked
    (not its doc number: Updater). RemoteError names the reason."""
    p = open_for_store(data, topic, hq, merchant, store, want_topic=order_topic(merchant, store),
                       fields=_ORDER, what="an order", valid=lambda p: (
                           p["state"] in STATES and all(isinstance(x, str) for x in p["lanes"])
                           and 1 <= p["parallel"] <= 64 and len(p["sha256"]) == 64))
    return Order(p["merchant"], p["store"], p["doc"], p["rollout"], p["version"], p["sha256"],
                 tuple(p["lanes"]), p["parallel"], p["state"], p["key"], p["at"])


def running_version(peer: dict[str, Any] | None) -> str | None:
    """The version a device's hello says it runs: "hexiao-fw 1.2.0" -> "1.2.0" (its installed
    manifest's; a development build says the firmware's own)."""
    fw = (peer or {}).get("firmware")
    return fw.rsplit(" ", 1)[-1] if isinstance(fw, str) else None


def pack_bundle(offer: dict[str, Any], image: bytes) -> bytes:
    """A bundle as it travels: the fw_offer's fields and the image (protocol/fw_image.py)."""
    return cbor.dumps({"v": VERSION, "offer": {k: offer[k] for k in OFFER}, "image": image})


def open_bundle(data: bytes, sha256: str) -> tuple[dict[str, Any], bytes]:
    """(offer, image) of a bundle whose image has this SHA-256; RemoteError otherwise."""
    try:
        p = codec_fast.loads(bytes(data))
        offer, image = p["offer"], p["image"]
        if not (isinstance(image, bytes) and all(isinstance(offer.get(k), t)
                                                  for k, t in OFFER.items())):
            raise TypeError
    except (ProtocolError, KeyError, TypeError, AttributeError):
        raise RemoteError("malformed", "not a firmware bundle") from None
    digest = hashlib.sha256(image).hexdigest()
    if digest != sha256 or offer["digest"].hex() != sha256 or len(image) != offer["size"]:
        raise RemoteError("bad_signature", f"the bundle's SHA-256 is {digest[:12]}..., not the "
                                           f"order's {sha256[:12]}...")
    return offer, image


# -- the store's side -----------------------------------------------------------------------------


class Progress:
    """The order held and each lane's state, in one 0600 JSON file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc, self.order, self.lanes = 0, None, {}  # type: ignore[var-annotated]
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            self.doc, self.lanes = int(d["doc"]), dict(d["lanes"])
            self.order = Order(**{**d["order"], "lanes": tuple(d["order"]["lanes"])}) \
                if d.get("order") else None
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:  # hostd starts all the same
            log.error("fleet: %s unreadable (%s): starting with no firmware order; the "
                      "retained order comes again", path, e)
            self.doc, self.order, self.lanes = 0, None, {}

    def save(self) -> None:
        from hexiao.hostd.keystore import write_private

        o = None if self.order is None else {**self.order.payload(), "lanes": list(
            self.order.lanes)}
        if o is not None:
            o.pop("v")
        body = json.dumps({"doc": self.doc, "order": o, "lanes": self.lanes}).encode()
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        write_private(tmp, body)
        os.replace(tmp, self.path)


class Updater:
    """Carries out headquarters' firmware orders for one store. Orders and bundles come
    through put() (Feed: paho's thread), or straight to on_order()/on_bundle()."""

    def __init__(self, merchant: str, store: str, hq: Ed25519PublicKey, state_dir: Path,
                 lanes: Callable[[], list[Any]], update: Callable[..., dict[str, Any]],
                 emit: Callable[[str, str, dict[str, Any]], None], *,
                 busy: Callable[[Any], str] | None = None, quiet_s: float = QUIET_S,
                 tick_s: float = 0.5, watch_every_s: float = 10.0,
                 subscribe: Callable[[str | None], None] | None = None) -> None:
        self.merchant, self.store, self._hq = merchant, store, hq
        self.topic = order_topic(merchant, store)
        self.state_dir = Path(state_dir)
        self._lanes, self._update, self._emit = lanes, update, emit
        self._busy = busy or (lambda lane: "")
        self.quiet_s, self.tick_s, self.watch_every_s = quiet_s, tick_s, watch_every_s
        self._subscribe = subscribe or (lambda topic: None)  # the bundle topic to want, or None
        self.progress = Progress(self.state_dir / "rollout.json")
        self.refused: Counter[str] = Counter()
        self.waiting: dict[str, str] = {}      # lane -> why it is not updated yet
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._watched: dict[str, float] = {}   # lane -> when to ask a trial lane again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        for st in self.progress.lanes.values():  # an update cut by a restart: again
            if st.get("state") == "updating":
                st["state"] = "pending"

    # -- inputs (any thread) ------------------------------------------------------------------

    def image_path(self, sha256: str) -> Path:
        return self.state_dir / f"fw-{sha256}.img"

    def _refuse(self, reason: str, why: str) -> None:
        self.refused[reason] += 1
        log.warning("fleet: firmware order refused (%s): %s", reason, why)

    def put(self, topic: str, data: bytes) -> None:
        """An order or bundle from paho's thread: handled on the Updater's own."""
        self._inbox.put((topic, data))

    def on_order(self, data: bytes, topic: str) -> Order | None:
        """An order as published on `topic` (from hexiao/ctl/v1/ on): taken, or refused and
        counted. Returns the order now held when it changed."""
        try:
            order = open_order(data, topic, self._hq, self.merchant, self.store)
        except RemoteError as e:
            self._refuse(e.reason, e.message)
            return None
        with self._lock:
            held = self.progress.doc
            if order.doc == held:
                return None  # the retained copy again
            if order.doc < held:
                self._refuse("replay", f"order {order.doc} is older than the one held ({held})")
                return None
            prev = self.progress.order
            self.progress.doc, self.progress.order = order.doc, order
            if prev is None or prev.rollout != order.rollout:
                self.progress.lanes = {}
            for lane in order.lanes:
                self.progress.lanes.setdefault(lane, {"state": "pending"})
            self.progress.save()
        log.info("fleet: firmware order %d (rollout %d, %s, %s): lanes %s", order.doc,
                 order.rollout, order.version, order.state, ", ".join(order.lanes) or "none")
        self._want_bundle()
        return order

    def on_bundle(self, data: bytes, topic: str) -> bool:
        order = self.progress.order
        if order is None or topic != bundle_topic(self.merchant, order.sha256):
            return False
        try:
            offer, image = open_bundle(data, order.sha256)
        except RemoteError as e:
            self._refuse(e.reason, e.message)
            return False
        path = self.image_path(order.sha256)
        for old in self.state_dir.glob("fw-*"):  # an earlier rollout's bundle
            if old.stem != path.stem:
                old.unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(image)
        os.replace(tmp, path)
        path.with_suffix(".offer").write_text(json.dumps(
            {k: v.hex() if isinstance(v, bytes) else v for k, v in offer.items()}))
        self._subscribe(None)
        log.info("fleet: firmware %s received (%d bytes)", offer["version"], len(image))
        return True

    def _want_bundle(self) -> None:
        o = self.progress.order
        if o is not None and o.state != "stop" and not self._offer(o):
            self._subscribe(bundle_topic(self.merchant, o.sha256))

    def _offer(self, o: Order) -> dict[str, Any] | None:
        path = self.image_path(o.sha256)
        try:
            offer = json.loads(path.with_suffix(".offer").read_text())
        except (OSError, ValueError):
            return None
        return offer if path.exists() else None

    # -- the work ----------------------------------------------------------------------------

    def start(self) -> Updater:
        self._want_bundle()
        self._thread = threading.Thread(target=self._run, name="hexiao-rollout", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                while not self._inbox.empty():
                    topic, data = self._inbox.get()
                    if topic == self.topic:
                        self.on_order(data, topic)
                    else:
                        self.on_bundle(data, topic)
                self.step()
            except Exception:  # one bad step must not end the rollout: logged, tried again
                log.exception("fleet: rollout step failed")

    def _set(self, lane: str, state: str, **detail: Any) -> None:
        with self._lock:
            rollout = detail.pop("rollout", None)
            held = self.progress.order
            if rollout is not None and (held is None or held.rollout != rollout):
                return  # a newer rollout's order came meanwhile: its lanes start afresh
            self.progress.lanes[lane] = {"state": state, **detail}
            self.progress.save()

    def step(self) -> None:
        """Start what may start now (the worker thread calls it every tick_s)."""
        o = self.progress.order
        if o is None:
            return
        self._running = {n: t for n, t in self._running.items() if t.is_alive()}
        self._watch(o)
        if o.state != "run":
            self.waiting = dict.fromkeys(o.lanes, f"the rollout is {o.state}")
            return
        if any(st.get("state") == "rolled_back" for st in self.progress.lanes.values()):
            # a device went back by itself: no more of this build here until headquarters
            # (which halts the rollout on it) says otherwise with a new order
            self.waiting = dict.fromkeys(o.lanes, "a lane rolled this build back: held")
            return
        offer = self._offer(o)
        if offer is None:
            self.waiting = dict.fromkeys(o.lanes, "waiting for the bundle")
            return
        by_name: dict[str, list[Any]] = {}
        for dl in self._lanes():
            by_name.setdefault(dl.lane, []).append(dl)
        waiting = {}
        for name in o.lanes:
            st = self.progress.lanes.get(name, {}).get("state", "pending")
            if st != "pending" or name in self._running:
                continue
            devices = by_name.get(name)
            if not devices:
                waiting[name] = "no such lane at this store"
                continue
            dl = devices[0]
            if running_version(dl.peer) == o.version:
                self._emit(name, "fw_done", {"rollout": o.rollout, "device": dl.id,
                                             "version": o.version, "state": "already"})
                self._set(name, "done", device=dl.id, version=o.version, already=True)
                continue
            why = "its link is not open" if dl.state != "open" else self._busy(dl)
            if why or len(self._running) >= o.parallel:
                waiting[name] = why or f"{o.parallel} lane(s) of this store updating already"
                continue
            self._emit(name, "fw_started", {"rollout": o.rollout, "device": dl.id,
                                            "version": o.version})
            self._set(name, "updating", device=dl.id)
            t = threading.Thread(target=self._one, args=(o, offer, name, dl), daemon=True,
                                 name=f"hexiao-rollout-{name}")
            self._running[name] = t
            t.start()
        self.waiting = waiting

    def _one(self, o: Order, offer: dict[str, Any], name: str, dl: Any) -> None:
        from hexiao.hostd.control.client import ControlError

        ev = {"rollout": o.rollout, "device": dl.id, "version": o.version}
        try:
            out = self._update(dl.id, image=str(self.image_path(o.sha256)), **offer)
        except ControlError as e:
            st = self._status(dl)
            if st is not None and st.get("state") == 7:
                why = str(st.get("why") or e.message)[:120]
                self._emit(name, "fw_rolled_back", {**ev, "why": why})
                self._set(name, "rolled_back", device=dl.id, why=why, rollout=o.rollout)
            else:
                self._emit(name, "fw_failed", {**ev, "why": e.message[:120], "kind": e.kind})
                self._set(name, "failed", device=dl.id, why=e.message[:120], kind=e.kind,
                          rollout=o.rollout)
            return
        state = str(out.get("state"))
        self._emit(name, "fw_done", {**ev, "state": state})
        self._set(name, "confirmed" if state == "confirmed" else "done", device=dl.id,
                  version=o.version, rollout=o.rollout)

    @staticmethod
    def _status(dl: Any) -> dict[str, Any] | None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            return dl.request({"type": "fw_query"}, "fw_status", 5.0)
        return None

    def _watch(self, o: Order) -> None:
        """A lane on trial: asked again until the device confirms it or rolls it back."""
        now = time.monotonic()
        devices = {dl.lane: dl for dl in self._lanes()}
        for name, st in list(self.progress.lanes.items()):
            if st.get("state") != "done" or st.get("already") or name not in devices:
                continue
            if self._watched.get(name, 0.0) > now:
                continue
            self._watched[name] = now + self.watch_every_s
            fw = self._status(devices[name])
            if fw is None or fw.get("version") != o.version:
                continue
            if fw.get("state") == 5:
                self._set(name, "confirmed", device=st.get("device"), version=o.version)
            elif fw.get("state") == 7:
                why = str(fw.get("why") or "")[:120]
                self._emit(name, "fw_rolled_back", {"rollout": o.rollout,
                                                    "device": st.get("device"),
                                                    "version": o.version, "why": why})
                self._set(name, "rolled_back", device=st.get("device"), why=why)

    def status(self) -> dict[str, Any]:
        o = self.progress.order
        return {"order": None if o is None else o.payload(), "lanes": dict(self.progress.lanes),
                "waiting": dict(self.waiting), "refused": dict(self.refused)}



class Feed:
    """An Updater on the store's Responder connection (remote.py, `topics`): the order topic,
    and a bundle topic while one is wanted; paho's thread only queues. Events go into the
    journal's outbox. Made before the Responder starts; stop() before the outbox's journal."""

    def __init__(self, responder: Any, journal_path: Path, state_dir: Path,
                 lanes: Callable[[], list[Any]], update: Callable[..., dict[str, Any]],
                 busy: Callable[[Any], str], clock: Callable[[], float] = time.time,
                 **kw: Any) -> None:
        from hexiao.hostd.fleet.outbox import Outbox, Place
        from hexiao.hostd.fleet.remote import load_public_key

        cfg = responder.cfg
        self.responder, self._clock, self._prefix = responder, clock, cfg.topic_prefix
        self._outbox = Outbox(journal_path, Place(cfg.merchant, cfg.store), b"")
        self._olock = threading.Lock()
        self._closed = False
        self.updater = Updater(cfg.merchant, cfg.store, load_public_key(cfg.hq_pubkey_file),
                               state_dir, lanes, update, self._emit, busy=busy,
                               subscribe=self._want, **kw)
        self._bundle: str | None = None
        responder.topics[self.updater.topic] = self.updater.put

    def _emit(self, lane: str, name: str, detail: dict[str, Any]) -> None:
        log.info("fleet event %s on %s: %s", name, lane, detail)
        with self._olock:
            if self._closed:  # an update that outlived stop(): the next hostd resumes it
                log.warning("fleet: %s on %s not recorded: hostd is stopping", name, lane)
                return
            self._outbox.add(lane, "event", self._clock(), {"name": name, "detail": detail})

    def _want(self, topic: str | None) -> None:
        topics, client = self.responder.topics, self.responder.client
        if self._bundle is not None and self._bundle != topic:
            topics.pop(self._bundle, None)
            client.unsubscribe(self._prefix + self._bundle)
        if topic is not None and topic != self._bundle:
            topics[topic] = self.updater.put
            client.subscribe(self._prefix + topic, qos=1)  # (queued by paho until connected)
        self._bundle = topic

    def start(self) -> Feed:
        self.updater.start()
        log.info("fleet: taking firmware orders on %s", self.updater.topic)
        return self

    def stop(self) -> None:
        self.updater.stop()
        with self._olock:
            self._closed = True
            self._outbox.close()
