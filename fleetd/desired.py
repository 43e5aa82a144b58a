"""Headquarters' side of the desired state (docs/fleet-protocol.md, "Desired state"): documents
per scope in PostgreSQL, each store's effective document signed and published retained on its
own topic, and what the stores report back.

Rules this module keeps:
- A scope is `all`, `region:R`, `franchisee:F` or `store:S`. A store's effective document is
  merge(all, region, franchisee, store) (hostd/fleet/desired.py, merge): the narrower scope
  wins, per rules key, per macro, per setting.
- A document is checked with the store's own checks (hostd/fleet/desired.check) before anything
  is stored or sent: an invalid file is refused here with every problem, and a store would
  refuse it the same way.
- A store's version only ever increases: it goes up by one when its effective document changes,
  in the transaction that stores the new scope document (an advisory lock orders concurrent
  applies). The signed document is published only after that commit, retained, QoS 1; a store
  whose publish the broker did not take stays `published IS NULL` and is sent again by the next
  apply (the same version and bytes: a store that has it ignores it).
- reports() is fleetd's consumer hook: the stores' `desired_applied` / `desired_refused` event
  records into desired_reports; idempotent (a batch tried again changes nothing), newest wins.
"""

from __future__ import annotations

import os
import re
import threading
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.fleetd.remote import RemoteFailure, operator_client
from hexiao.hostd.config import ConfigError
from hexiao.hostd.fleet import desired
from psycopg.types.json import Jsonb

SCOPE = re.compile(r"all|(region|franchisee|store):([^\s:]{1,64})")
_LOCK = 0x6465_7369  # "desi": one apply at a time computes versions
EVENTS = ("desired_applied", "desired_refused")


class DesiredFailure(Exception):
    """kind: bad_request, not_found, unavailable (the CLI's exit codes)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def parse_scope(text: str) -> tuple[str, str | None]:
    m = SCOPE.fullmatch(text)
    if m is None:
        raise DesiredFailure("bad_request", f"scope {text!r}: expected all, region:R, "
                                            "franchisee:F or store:S")
    return (m[1], m[2]) if m[1] else ("all", None)


def load_file(path: Path) -> dict[str, Any]:
    """A TOML file of [rules.X], [macros.T], [settings], checked as a store checks it."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DesiredFailure("bad_request", f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DesiredFailure("bad_request", f"{path}: not a TOML file: {e}") from None
    try:
        desired.check(raw, str(path))
    except ConfigError as e:
        raise DesiredFailure("bad_request", "; ".join(e.errors)) from None
    return raw


def set_region(conn: psycopg.Connection, store: str, region: str | None) -> None:
    """A store's region (`hexiao-fleetd add-store --region`); None leaves it as it is."""
    if region is not None:
        conn.execute("UPDATE stores SET region = %s WHERE store = %s", (region, store))


def _stores(conn: psycopg.Connection, scope: str) -> list[tuple[str, str, str | None,
                                                                str | None]]:
    """(store, merchant, region, franchisee) of every store in the scope."""
    kind, value = parse_scope(scope)
    col = {"all": "TRUE", "region": "region = %(v)s", "franchisee": "franchisee = %(v)s",
           "store": "store = %(v)s"}[kind]
    rows = conn.execute(f"SELECT store, merchant, region, franchisee FROM stores WHERE {col} "
                        "ORDER BY store", {"v": value}).fetchall()
    if not rows and kind == "store":
        raise DesiredFailure("not_found", f"no store {value!r} at headquarters (`hexiao fleet "
                                          "stores` lists them)")
    return rows


def _docs(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """The document in force at each scope."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT DISTINCT ON (scope) scope, doc FROM desired_docs ORDER BY scope, id DESC")}


def _effective(docs: dict[str, dict[str, Any]], store: str, region: str | None,
               franchisee: str | None) -> dict[str, Any]:
    scopes = ["all", f"region:{region}" if region else "", f"franchisee:{franchisee}"
              if franchisee else "", f"store:{store}"]
    return desired.merge([docs[s] for s in scopes if s in docs])


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for section in desired.SECTIONS:
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append({"key": f"{section}.{key}", "old": a.get(key), "new": b.get(key)})
    return out


def plan(conn: psycopg.Connection, scope: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What `doc` at `scope` would change, store by store (nothing is written)."""
    docs = _docs(conn)
    docs[scope] = doc
    sent = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT store, version, doc FROM "
                                                     "desired_store")}
    out = []
    for store, merchant, region, franchisee in _stores(conn, scope):
        version, old = sent.get(store, (0, {}))
        changes = _changes(old, _effective(docs, store, region, franchisee))
        out.append({"store": store, "merchant": merchant, "version": version,
                    "next": version + 1 if changes else version, "changes": changes})
    return out


def apply(conn: psycopg.Connection, scope: str, doc: dict[str, Any], author: str,
          publish: Callable[[list[tuple[str, str, int, dict[str, Any]]]], set[str]]
          ) -> list[dict[str, Any]]:
    """Store `doc` at `scope`, give each store whose effective document changed the next
    version, commit, then publish every store of the scope not published yet (publish() returns
    the stores the broker took). Returns the plan with `published` per store."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        steps = plan(conn, scope, doc)
        conn.execute("INSERT INTO desired_docs (scope, doc, author) VALUES (%s, %s, %s)",
                     (scope, Jsonb(doc), author))
        docs = _docs(conn)
        for step, row in zip(steps, _stores(conn, scope), strict=True):
            if step["changes"]:
                conn.execute(
                    "INSERT INTO desired_store (store, version, doc) VALUES (%s, %s, %s) "
                    "ON CONFLICT (store) DO UPDATE SET version = excluded.version, doc = "
                    "excluded.doc, updated = clock_timestamp(), published = NULL",
                    (step["store"], step["next"], Jsonb(_effective(docs, row[0], row[2],
                                                                    row[3]))))
    todo = conn.execute(
        "SELECT d.store, s.merchant, d.version, d.doc FROM desired_store d JOIN stores s "
        "USING (store) WHERE d.published IS NULL AND d.store = ANY(%s) ORDER BY d.store",
        ([s["store"] for s in steps],)).fetchall()
    taken = publish([(r[0], r[1], r[2], r[3]) for r in todo]) if todo else set()
    for store in sorted(taken):
        conn.execute("UPDATE desired_store SET published = clock_timestamp() WHERE store = %s "
                     "AND version = %s", (store, next(r[2] for r in todo if r[0] == store)))
    conn.commit()
    waiting = {r[0] for r in todo} - taken
    for step in steps:
        step["published"] = step["store"] not in waiting
    return steps


def publisher(broker: str, prefix: str, key: Ed25519PrivateKey, key_id: str, author: str,
              timeout: float = 10.0, clock: Callable[[], float] = time.time
              ) -> Callable[[list[tuple[str, str, int, dict[str, Any]]]], set[str]]:
    """publish() for apply(): each store's signed document, retained, QoS 1, on one
    connection; the stores whose PUBLISH the broker acknowledged within `timeout`."""
    def publish(rows: list[tuple[str, str, int, dict[str, Any]]]) -> set[str]:
        try:
            c, host, port = operator_client(broker, f"hq-cfg-{os.urandom(6).hex()}")
        except RemoteFailure as e:
            raise DesiredFailure(e.kind, e.message) from None
        acks: dict[int, int] = {}
        done = threading.Condition()
        c.max_inflight_messages_set(100)

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            with done:
                acks[mid] = rc.value
                done.notify_all()

        c.on_publish = on_publish
        try:
            c.connect(host, port, keepalive=30, clean_start=True)
        except OSError as e:
            raise DesiredFailure("unavailable", f"cannot reach the broker {broker}: "
                                                f"{e.strerror or e} (stored: the next apply "
                                                "sends it)") from None
        c.loop_start()
        mids: dict[int, str] = {}
        try:
            at = round(clock() * 1000)
            for store, merchant, version, doc in rows:
                data = desired.seal(key, desired.Signed(merchant, store, version, at, author,
                                                        key_id, doc))
                info = c.publish(prefix + desired.topic(merchant, store), data, qos=1,
                                 retain=True)
                mids[info.mid] = store
            end = time.monotonic() + timeout
            with done:
                while len(acks.keys() & mids.keys()) < len(mids) and time.monotonic() < end:
                    done.wait(max(0.0, end - time.monotonic()))
        finally:
            c.disconnect()
            c.loop_stop()
        # 0x10 "no matching subscribers" is taken all the same: it is retained for the store
        return {s for mid, s in mids.items() if mid in acks and acks[mid] < 0x80}
    return publish


# -- what the stores report ----------------------------------------------------------------------


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def reports(conn: psycopg.Connection, accepted: list[Any]) -> None:
    """fleetd's consumer hook: desired_applied / desired_refused events into desired_reports."""
    mine = [r for r in accepted if r.payload.get("kind") == "event"
            and r.payload.get("name") in EVENTS and isinstance(r.payload.get("detail"), dict)]
    if not mine:
        return
    with conn.transaction():
        for r in mine:
            p, d = r.payload, r.payload["detail"]
            version = d.get("version") if isinstance(d.get("version"), int) else 0
            if p["name"] == "desired_applied":
                conn.execute(
                    "INSERT INTO desired_reports (store, applied, applied_at) VALUES (%s, %s, "
                    "%s) ON CONFLICT (store) DO UPDATE SET applied = excluded.applied, "
                    "applied_at = excluded.applied_at WHERE desired_reports.applied_at IS NULL "
                    "OR desired_reports.applied_at <= excluded.applied_at",
                    (r.store, version, _ts(p["at"])))
            else:
                conn.execute(
                    "INSERT INTO desired_reports (store, refused_version, refused_reason, "
                    "refused_message, refused_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT "
                    "(store) DO UPDATE SET refused_version = excluded.refused_version, "
                    "refused_reason = excluded.refused_reason, refused_message = "
                    "excluded.refused_message, refused_at = excluded.refused_at WHERE "
                    "desired_reports.refused_at IS NULL OR desired_reports.refused_at <= "
                    "excluded.refused_at",
                    (r.store, version, str(d.get("reason", ""))[:32],
                     str(d.get("message", ""))[:300], _ts(p["at"])))


def status(conn: psycopg.Connection, store: str | None = None) -> list[dict[str, Any]]:
    """Per store: the version headquarters wants, whether it was published, the version the
    store reports running, and its latest refusal."""
    rows = conn.execute(
        "SELECT s.store, coalesce(d.version, 0), d.published IS NOT NULL, "
        "coalesce(r.applied, 0), r.refused_version, r.refused_reason, r.refused_message, "
        "r.refused_at, r.applied_at FROM stores s LEFT JOIN desired_store d USING (store) "
        "LEFT JOIN desired_reports r USING (store) WHERE %(s)s::text IS NULL OR s.store = %(s)s "
        "ORDER BY s.store", {"s": store}).fetchall()
    if store is not None and not rows:
        raise DesiredFailure("not_found", f"no store {store!r} at headquarters (`hexiao fleet "
                                          "stores` lists them)")
    out = []
    for (name, want, published, applied, r_version, reason, message, refused_at,
         applied_at) in rows:
        refused_last = refused_at is not None and (applied_at is None or refused_at > applied_at)
        state = ("none" if want == 0 else "applied" if applied >= want else
                 "refused" if refused_last and r_version == want else
                 "sent" if published else "unpublished")
        out.append({"store": name, "desired": want, "applied": applied, "state": state,
                    "refused": {"version": r_version, "reason": reason, "message": message,
                                "at": refused_at.astimezone().isoformat(timespec="seconds")}
                    if reason else None})
    return out
