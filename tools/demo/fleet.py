"""`hexiao demo --fleet`: a small chain on this machine, store to headquarters, with its report.

Two stores of two franchisees, each the store side for real (its journal, the redemption engine
against the WeChat simulator both stores share, its fleet bridge), `hexiao-fleetd` (a subprocess)
consuming from the broker it is pointed at into a database it makes on the PostgreSQL server it
is pointed at (dropped at the end; --keep keeps it), the settlement report beside the stores' own
journal totals, which must match to the fen, then headquarters operating the chain (each store's
hexiao-hostd on its journal with a device; a remote `device health` and a config change applied
at every store: tools/demo/fleet_hq.py), and the stores' online state.

Rules this module keeps:
- Only the pieces hexiao ships do the work; the demo drives them and prints what they did.
- Every line at most 80 columns; --json prints one event per line (fields may be added, never
  renamed or removed) and no progress lines.
Exit status: 0 the chain worked, the report matched and the stores applied headquarters' change;
1 it did not (the reason is printed);
3 the broker or PostgreSQL could not be reached or the database not made (one line says which).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import psycopg
from hexiao.fleetd import db, reports
from hexiao.hostd import journal as jr
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.config.types import Fleet
from hexiao.hostd.fleet.bridge import Bridge
from hexiao.hostd.fleet.totals import journal_totals
from hexiao.hostd.redeem import Engine, LaneConfig
from hexiao.tools.demo import fleet_hq

MERCHANT = "hexiao-cafe"
CASH = "pHexiaoSimCash100minus20xxxx"  # the example seed's 20-yuan-off card
# (store, franchisee, lane, codes it scans); the last code of the second was used in the first
STORES = (("sh-001", "east-co", "lane-1", [f"60000000{i:04d}" for i in range(1, 6)]),
          ("bj-001", "north-co", "lane-2", [f"60000000{i:04d}" for i in range(6, 9)]
           + ["600000000001"]))


class Say:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __call__(self, event: str, text: str, **fields: Any) -> None:
        if self.as_json:
            click.echo(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str))
        elif text:
            click.echo(text)


def _fail(say: Say, code: int, text: str) -> int:
    say("error", "", message=text)
    click.echo(f"hexiao demo --fleet: {text}", err=True)
    return code


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_fleet(as_json: bool, broker: str, admin_dsn: str, timeout: float, keep: bool) -> int:
    say = Say(as_json)
    # a record sent before fleetd has subscribed is refused (0x10) and sent again: expected
    logging.getLogger("hexiao.fleet").setLevel(logging.ERROR)
    url = urlsplit(broker)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        return _fail(say, 3, f"--broker {broker!r}: expected mqtt://HOST[:PORT]")
    try:
        socket.create_connection((url.hostname, url.port or 1883), timeout=3).close()
    except OSError as e:
        return _fail(say, 3, f"no MQTT broker at {broker} ({e.strerror or e}); start one "
                     "(apt-get install mosquitto) or give --broker")
    name = f"hexiao_demo_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as e:
        return _fail(say, 3, f"PostgreSQL at {admin_dsn}: {str(e).strip().splitlines()[0]} "
                     "(give --fleet-dsn of a server where the demo may create a database)")
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
    try:
        with tempfile.TemporaryDirectory(prefix="hexiao-fleet-demo-") as tmp:
            return _chain(say, Path(tmp), broker, dsn, timeout)
    except (TimeoutError, fleet_hq.Failed) as e:
        return _fail(say, 1, str(e))
    finally:
        if keep:
            say("kept", f"the database is kept: {dsn}", dsn=dsn)
        else:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _chain(say: Say, tmp: Path, broker: str, dsn: str, timeout: float) -> int:
    prefix = f"demo-{secrets.token_hex(3)}/"
    stager = fleet_hq.Stager(tmp / "device")  # the devices' modules, while the chain redeems
    say("start", f"Two stores: {broker} into PostgreSQL ({dsn.rsplit('/', 1)[1]})",
        broker=broker, database=dsn.rsplit("/", 1)[1])
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
        for store, franchisee, _, _ in STORES:
            key = secrets.token_bytes(32)
            kf = tmp / f"{store}.key"
            kf.write_text(key.hex())
            kf.chmod(0o600)
            db.add_store(conn, MERCHANT, store, key, franchisee)
    raw = read(EXAMPLE)
    raw["codes"] += [{"code": c, "card_id": CASH}
                     for c in sorted({c for *_, codes in STORES for c in codes})]
    fleetd = subprocess.Popen(
        [sys.executable, "-m", "hexiao.fleetd.main", "run", "--dsn", dsn, "--broker", broker,
         "--topic-prefix", prefix, "--group", "demo", "--client-id",
         f"demo-fleetd-{secrets.token_hex(3)}", "--alarm-every", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    say("fleetd", "  headquarters: hexiao-fleetd consuming (shared subscription)",
        pid=fleetd.pid)
    bridges: list[Bridge] = []
    try:
        with WeChatSim(raw) as sim:
            app = next(iter(sim.state.seed.apps.values()))
            for store, franchisee, lane, codes in STORES:
                journal = tmp / f"{store}.sqlite3"
                bridges.append(Bridge(Fleet(
                    enabled=True, broker=broker, merchant=MERCHANT, store=store,
                    key_file=tmp / f"{store}.key", topic_prefix=prefix, session_expiry_s=60),
                    journal).start())
                with jr.Journal(journal) as j, WeChatCardClient(sim.url, app.appid,
                                                               app.secret) as client:
                    engine = Engine(j, client, LaneConfig(lane))
                    for code in codes:
                        v = engine.redeem(code, time.time())
                        off = v.value.get("reduce_cost") if v.outcome == "accepted" else None
                        say("redeemed", f"  {store} ({franchisee}) {lane}: code …{code[-4:]} "
                            f"{v.outcome}" + (f", {reports.yuan(off)} yuan off" if off else "")
                            + (f" ({v.reason})" if v.reason else ""), store=store, lane=lane,
                            code_tail=code[-4:], outcome=v.outcome, reason=v.reason,
                            face_value_fen=off)
            wait_for("every redemption at headquarters", lambda: _rows(dsn) == sum(
                len(c) for *_, c in STORES), timeout)
        for b in bridges:
            b.stop()  # hostd takes the journal over (its bridge resumes the outbox)
        ok = _report(say, tmp, dsn)
        ctx = fleet_hq.Ctx(say, wait_for, tmp, broker, prefix, dsn, timeout, MERCHANT)
        ok &= fleet_hq.operate(ctx, [(s, lane) for s, _, lane, _ in STORES],
                               stager.get(timeout))
        # hostd stopped cleanly: each store said offline at once (a crash: the Last Will)
        wait_for("both stores offline at headquarters",
                 lambda: _offline(dsn) == len(STORES), timeout)
        say("offline", "  both stores stopped: headquarters shows them offline",
            offline=len(STORES))
        say("result", "The report matches the journals; both stores run headquarters' "
            "config." if ok else "The report does NOT match the journals, or a store does "
            "not run headquarters' config.", ok=ok)
        return 0 if ok else 1
    finally:
        for b in bridges:
            if b.alive():
                b.stop()
        fleetd.terminate()
        fleetd.wait(30)


def _rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM redemptions").fetchone()[0]  # type: ignore


def _report(say: Say, tmp: Path, dsn: str) -> bool:
    today = dt.datetime.now(dt.UTC).astimezone().date()
    start, end = today - dt.timedelta(days=1), today + dt.timedelta(days=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = reports.settlement(conn, start, end)
        dups = reports.duplicates(conn)
    say("report", "Settlement (accepted redemptions, face value), from headquarters:")
    ok = True
    for store, franchisee, _, _ in STORES:
        mine = [r for r in rows if r["store"] == store]
        n, fen = sum(r["redemptions"] for r in mine), sum(r["face_value_fen"] for r in mine)
        own = journal_totals(tmp / f"{store}.sqlite3", start, end)
        jn, jfen = sum(v[0] for v in own.values()), sum(v[1] for v in own.values())
        match = (n, fen) == (jn, jfen)
        ok &= match
        say("settlement", f"  {franchisee:9} {store}: {n} redemptions, {reports.yuan(fen)} yuan;"
            f" journal {jn}, {reports.yuan(jfen)} yuan {'= match' if match else '≠ MISMATCH'}",
            franchisee=franchisee, store=store, redemptions=n, face_value_fen=fen,
            journal_redemptions=jn, journal_face_value_fen=jfen, match=match)
    say("duplicates", f"  codes accepted in two places: {len(dups)} (bj-001's try of …0001 "
        "was refused)", count=len(dups))
    return ok


def _offline(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM store_online WHERE state = 'offline'"
                            ).fetchone()[0]  # type: ignore[index]
