"""Headquarters' desired state (docs/fleet-protocol.md, "Desired state"): the wire form and its
checks for both ends, and the store's side that applies it to the lanes.

Rules this module keeps:
- A document is `{rules, macros, settings}` as the config file writes them (check() uses the
  config's own checkers, so a rule or macro headquarters may send is exactly one the TOML file
  may hold). It travels signed with headquarters' Ed25519 key (remote.sign_signed) over the
  store's own `desired` topic, naming the store and a version inside the signed payload.
- Nothing is acted on before it verifies: signature over this store's topic, then the payload's
  merchant/store, then a version newer than the one applied (an older retained document replayed
  is refused), then every section. A refused document changes nothing: the last good one stays.
- The retained document comes again at every (re)connect: the applied version again (the same
  bytes) is no news, neither refused nor reported.
- Applying is host-side only and cannot half-happen: each lane gets its whole new rules,
  settings and macros in one call (lane.reconfigure), computed from the config file's own values
  with the document laid over them, so a section dropped from a later version falls back to the
  file. A rules key that names no lane or device here is ignored (one document serves stores
  with different lanes).
- The last good document (its signed bytes) is kept next to the journal (0600, written to a new
  file then renamed); start() applies it before the broker answers, verified again.
- Applied and refused documents are reported to headquarters as `event` records (lane `@store`,
  `desired_applied` / `desired_refused`) through the outbox; the same refusal of the same bytes
  is reported once, and at most REPORTS_PER_MIN refusals a minute (a flood costs a counter).
- paho's thread only queues (bounded); one worker thread applies, in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hexiao.hostd.config import Config, ConfigError, Device, DeviceSettings, Macro
from hexiao.hostd.config.schema import _SCHEMA, _Bad, _Ctx, _section, _show
from hexiao.hostd.fleet import record, remote
from hexiao.protocol import cbor

log = logging.getLogger("hexiao.fleet.desired")

VERSION = 1
SECTIONS = ("rules", "macros", "settings")
RULE_KEYS = ("rules", "default")
QUEUE = 16                # documents waiting for the worker; beyond it refused (busy)
REPORTS_PER_MIN = 10      # refusals reported to headquarters a minute at most
FILE = "desired.cbor"     # beside the journal


def topic(merchant: str, store: str) -> str:
    return f"{remote.ROOT}{merchant}/{store}/desired"


# -- the document --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """A checked document: rules per lane name or device id (rules, default), macros per card
    type, device settings by key."""
    rules: Mapping[str, tuple[tuple[dict[str, Any], ...], str]]
    macros: Mapping[str, Macro]
    settings: Mapping[str, Any]


def check(raw: Any, where: str = "desired") -> Doc:
    """A raw document (TOML or CBOR decoded) checked with the config file's checkers;
    ConfigError with one line per problem."""
    from hexiao.hostd.config import _macros

    ctx = _Ctx(None)
    ctx.prefix = f"{where}: "
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: expected a table of {', '.join(SECTIONS)}"])
    for key in raw:
        if key not in SECTIONS:
            ctx.bad(str(key), "unknown section; expected " + ", ".join(SECTIONS))
    rules: dict[str, tuple[tuple[dict[str, Any], ...], str]] = {}
    raw_rules = raw.get("rules", {})
    if not isinstance(raw_rules, dict):
        ctx.bad("rules", f"expected a table of [rules.LANE_OR_DEVICE] tables, got "
                         f"{_show(raw_rules)}")
        raw_rules = {}
    device = _SCHEMA[Device]
    for name, entry in raw_rules.items():
        at = f"rules.{name}"
        if not isinstance(entry, dict) or "rules" not in entry or set(entry) - set(RULE_KEYS):
            ctx.bad(at, "expected a table with rules = [...] and optionally default = "
                        '"product"|"coupon"|"ignore"')
            continue
        got = []
        for key, check_ in (("rules", device["rules"]), ("default", device["rules_default"])):
            try:
                got.append(check_(entry.get(key, "product")))  # type: ignore[operator]
            except _Bad as e:
                ctx.bad(f"{at}.{key}", f"expected {e}, got {_show(entry.get(key))}")
        if len(got) == 2:
            rules[str(name)] = (got[0], got[1])
    macros = _macros(raw.get("macros"), ctx)
    settings = _section(raw.get("settings"), DeviceSettings, "settings", ctx).values()
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return Doc(rules, macros, settings)


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Raw documents from the widest scope to the narrowest laid over each other: rules per
    lane/device key and macros per card type replaced whole, settings key by key."""
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for section in SECTIONS:
            if doc.get(section):
                out.setdefault(section, {}).update(doc[section])
    return out


# -- the wire form ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    merchant: str
    store: str
    version: int     # per store, increasing
    at: int          # headquarters' clock, Unix ms (information only)
    by: str          # who applied it
    key: str         # headquarters' key id
    doc: dict[str, Any]


_FIELDS = {"v": int, "merchant": str, "store": str, "version": int, "at": int, "by": str,
           "key": str, "doc": dict}


def seal(key: Ed25519PrivateKey, s: Signed) -> bytes:
    payload = cbor.dumps({"v": VERSION, "merchant": s.merchant, "store": s.store,
                          "version": s.version, "at": s.at, "by": s.by, "key": s.key,
                          "doc": s.doc})
    return remote.sign_signed(key, topic(s.merchant, s.store), payload)


def open_doc(data: bytes, on: str, hq: Ed25519PublicKey, merchant: str, store: str) -> Signed:
    """The document published on `on` (from hexiao/ on) for this store, signature and fields
    checked (not its version or sections); RemoteError names the reason."""
    p = remote.open_for_store(data, on, hq, merchant, store, want_topic=topic(merchant, store),
                              fields=_FIELDS, what="a document", valid=lambda p: p["version"] >= 1)
    return Signed(p["merchant"], p["store"], p["version"], p["at"], p["by"], p["key"], p["doc"])


# -- the store's side ------------------------------------------------------------------------------


class Applier:
    """Applies headquarters' desired state to one hostd's lanes. restore() at start, then
    offer() (paho's thread) for every message on the store's desired topic; start() once,
    stop() once."""

    def __init__(self, cfg: Config, lanes: Mapping[str, Any], hq: Ed25519PublicKey,
                 journal_path: Path, *, clock: Callable[[], float] = time.time) -> None:
        from hexiao.hostd.fleet.outbox import Outbox, Place

        self.cfg, self.lanes, self._hq, self._clock = cfg, lanes, hq, clock
        self.topic = topic(cfg.fleet.merchant, cfg.fleet.store)
        self.path = Path(journal_path).parent / FILE
        self.version, self._digest = 0, b""      # the applied document (0: none)
        self.refused: Counter[str] = Counter()
        self.last_refusal: tuple[str, str] | None = None
        self._said: set[tuple[str, bytes]] = set()
        self._reported: list[float] = []
        self._outbox = Outbox(journal_path, Place(cfg.fleet.merchant, cfg.fleet.store), b"")
        self._jobs: queue.Queue[tuple[str, bytes] | None] = queue.Queue(QUEUE)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hexiao-fleet-desired",
                                        daemon=True)

    def start(self) -> Applier:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._jobs.put(None, timeout=1)
        self._thread.join(5)
        self._outbox.close()

    def offer(self, on: str, data: bytes) -> None:
        try:
            self._jobs.put_nowait((on, data))
        except queue.Full:  # counted only: the outbox is the worker's
            self.refused["busy"] += 1
            log.warning("fleet: desired state refused (busy): the queue of documents is full")

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self.handle(*job)
            except Exception:  # one bad document must not end the worker
                log.exception("fleet: desired state failed")

    def restore(self) -> None:
        """The last good document, verified again and applied (before the broker answers)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("fleet: desired state %s unreadable (%s): the config file's values "
                      "run until headquarters' document arrives", self.path, e.strerror)
            return
        try:
            s = open_doc(data, self.topic, self._hq, self.cfg.fleet.merchant,
                         self.cfg.fleet.store)
            doc = check(s.doc)
        except (remote.RemoteError, ConfigError) as e:
            log.error("fleet: desired state %s not applied: %s", self.path, e)
            return
        with self._lock:
            self._apply(doc)
            self.version, self._digest = s.version, hashlib.sha256(data).digest()
        log.info("fleet: desired state version %d restored from %s", s.version, self.path)

    def handle(self, on: str, data: bytes) -> None:
        digest = hashlib.sha256(data).digest()
        try:
            s = open_doc(data, on, self._hq, self.cfg.fleet.merchant, self.cfg.fleet.store)
        except remote.RemoteError as e:
            self._refuse(e.reason, e.message, data, 0)
            return
        with self._lock:
            if s.version == self.version and digest == self._digest:
                return  # the retained document again, at a reconnect
            if s.version <= self.version:
                self._refuse("replay", f"version {s.version} is not newer than version "
                                       f"{self.version}, applied", data, s.version)
                return
            try:
                doc = check(s.doc)
            except ConfigError as e:
                self._refuse("invalid", "; ".join(e.errors), data, s.version)
                return
            self._apply(doc)
            self._persist(data)
            self.version, self._digest = s.version, digest
        log.info("fleet: desired state version %d applied (by %s, key %s)", s.version,
                 s.by[:64], s.key[:64])
        self._report("desired_applied", {"version": s.version})

    def _apply(self, doc: Doc) -> None:
        macros = {**self.cfg.macros, **doc.macros}
        for dev in self.cfg.devices:
            lane = self.lanes.get(dev.id)
            if lane is None:
                continue
            entry = doc.rules.get(dev.id) or doc.rules.get(dev.lane)
            d = dataclasses.replace(dev, rules=entry[0], rules_default=entry[1]) if entry \
                else dev
            settings = {**(dev.settings.values() if dev.settings else {}), **doc.settings}
            lane.reconfigure(d.rules_message(), settings, dict(macros))

    def _persist(self, data: bytes) -> None:
        from hexiao.hostd.keystore import write_private

        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            write_private(tmp, data)
            os.replace(tmp, self.path)
        except OSError as e:  # applied all the same; a restart runs the file's values first
            tmp.unlink(missing_ok=True)
            log.error("fleet: desired state not saved to %s: %s", self.path, e.strerror)

    def _refuse(self, reason: str, why: str, data: bytes, version: int) -> None:
        self.refused[reason] += 1
        self.last_refusal = (reason, why)
        log.warning("fleet: desired state%s refused (%s): %s",
                    f" version {version}" if version else "", reason, why)
        key = (reason, hashlib.sha256(data).digest())
        now = self._clock()
        self._reported = [t for t in self._reported if t > now - 60]
        if key in self._said or len(self._reported) >= REPORTS_PER_MIN:
            return
        if len(self._said) > 1000:
            self._said.clear()
        self._said.add(key)
        self._reported.append(now)
        self._report("desired_refused", {"version": version, "reason": reason,
                                         "message": why[:300]})

    def _report(self, name: str, detail: dict[str, Any]) -> None:
        detail = {**detail, "applied": self.version}
        try:
            self._outbox.add(record.STORE_LANE, "event", self._clock(),
                             {"name": name, "detail": detail})
        except Exception:  # a disk hiccup: logged; what was applied stays applied
            log.exception("fleet: desired state report not written")
