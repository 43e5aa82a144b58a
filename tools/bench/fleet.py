"""`hexiao fleet bench`: the store-to-headquarters path at 100, 300 and 1000 lanes, and the naive
design beside it, in the same run. Exit status: 0 done; 1 a server cannot be reached; 2 options.

What runs (nothing mocked but the devices): stores of `--lanes-per-store` lanes (10: a store is
a shop with several tills), each as in production with one real journal (SQLite, WAL,
synchronous=FULL) for all its lanes and one real Bridge (paho, MQTT 5, QoS 1), in worker
processes; a driver per worker redeems at `--rate` per lane, round-robin over its lanes, through
the journal's transitions (4 transactions, the outbox record in the last); `--fleetd`
hexiao-fleetd processes consume with a shared subscription into a fresh PostgreSQL database made
for the run and dropped after it.

Figures (a bench, never a test assertion):
- ingested/s: rows committed at headquarters per second over the run (first to last row);
- p50/p99 latency: the journal's commit of the `done` step (the store's `ended`, same clock)
  to the row's insert at headquarters (`ingested`, clock_timestamp(); the commit follows
  within the batch);
- memory per lane: the workers' RSS growth from setting the lanes up, per lane;
- naive: each lane inserts its redemption straight into PostgreSQL over its own connection;
  lanes that cannot get a connection (max_connections) are counted, their rows are lost;
- the broker: by default one of the bench's own per run (mosquitto from the PATH, a config it
  writes: persistence on, a queue per client deep enough for the run). A broker with
  Mosquitto's default `max_queued_messages` (1000) drops what a subscriber falls further behind
  than its in-flight window plus 1000, after it acknowledged it to the store: an overload run
  then shows `lost` (measured: 2949 of 34640 at 3000/s offered). `--broker URL` uses that one;
- with --remote N: while the fleet reports, headquarters asks `device.health` of a random lane
  N times a second, the whole real path: fleetd/remote.ask (the remote_requests row, a signed
  request on a fresh MQTT 5 connection, the sealed answer checked) to a real Responder per
  store (hq_pubkey_file, its own connection and worker) answering from the simulated lane;
  remote p50/p99/max are ask()'s wall time (what an operator waits for, less the CLI's start),
  failures by kind; the machine's load average at the end is reported beside them;
- with --faults: the largest size again on a broker of its own (the machine's is never
  restarted), with one fleetd SIGKILLed and restarted and the broker
  restarted during the run; then every committed redemption must be at headquarters once.
Journals go to --dir (default /dev/shm: a thousand lanes on one disk would measure the disk, a
store has its own).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import psycopg

MERCHANT = "bench"
STORES_PER_PROCESS = 64
NAIVE_SPARE = 30  # connections the naive design leaves to the server's other users


@dataclass
class Result:
    design: str
    lanes: int
    committed: int = 0
    rows: int = 0
    duplicates: int = 0
    lost: int = 0
    undelivered: int = 0  # still in the stores' outboxes when the run ended (late, not lost)
    ingested_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_per_lane_kib: float = 0.0
    offered_per_s: float = 0.0
    no_connection: int = 0
    processes: int = 0
    remote_asked: int = 0
    remote_failed: dict[str, int] = field(default_factory=dict)
    remote_errors: list[str] = field(default_factory=list)  # the first few, as ask() said
    remote_p50_ms: float = 0.0
    remote_p99_ms: float = 0.0
    remote_max_ms: float = 0.0
    load_avg: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# --- remote diagnostics: the store's answer, headquarters' probes ---------------------------------

class SimLanes:
    """The ControlHandlers a Responder asks (device.list and device.health), for a store whose
    devices are simulated: its lanes are `lane-N`, each device `<store>-lane-N`."""

    def __init__(self, store: str, lanes: int) -> None:
        self.store, self.t0 = store, time.monotonic()
        self.rows = [{"id": f"{store}-lane-{n + 1}", "lane": f"lane-{n + 1}", "state": "open"}
                     for n in range(lanes)]

    def device_list(self) -> list[dict[str, Any]]:
        return self.rows

    def device_health(self, device: str) -> dict[str, Any]:
        return {"type": "health", "uptime_ms": int((time.monotonic() - self.t0) * 1000),
                "reset_cause": "power_on", "firmware": "bench-sim", "heap_free": 81920,
                "link": {}, "app": {"device": device}}


def _probe(dsn: str, broker: str, prefix: str, key: Any, stores: list[tuple[str, int]],
           rate: float, seconds: float, res: Result) -> None:
    """`rate` remote device.health round trips a second for `seconds`, of random lanes; each
    on a thread of a pool (a slow answer does not delay the next ask), wall time measured."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hexiao.fleetd import remote
    from hexiao.tools.install import keys

    asker = remote.Asker(key, keys.fingerprint(key.public_key()), "bench")
    local, lock = threading.local(), threading.Lock()
    times: list[float] = []
    failed: dict[str, int] = {}
    conns: list[psycopg.Connection] = []

    def one(store: str, lane: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = psycopg.connect(dsn, autocommit=True)
            with lock:
                conns.append(local.conn)
        t = time.perf_counter()
        why = None
        try:
            got = remote.ask(local.conn, broker, asker, store, "device.health",
                             {"lane": f"lane-{lane}"}, timeout=10, prefix=prefix)
            if got.get("app", {}).get("device") != f"{store}-lane-{lane}":
                why = "wrong_answer"
        except remote.RemoteFailure as e:
            why = e.kind
            with lock:
                if len(res.remote_errors) < 5:
                    res.remote_errors.append(f"{time.monotonic() - start:.1f} s in: "
                                             f"{e.message}")
        except psycopg.Error:
            why = "db"
        with lock:
            if why is None:
                times.append((time.perf_counter() - t) * 1000)
            else:
                failed[why] = failed.get(why, 0) + 1

    rng = random.Random(7)
    n = max(1, round(rate * seconds))
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe") as pool:
        for i in range(n):
            pause = start + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            store, count = stores[rng.randrange(len(stores))]
            pool.submit(one, store, rng.randrange(count) + 1)
    for c in conns:
        c.close()
    res.remote_asked, res.remote_failed = n, failed
    if times:
        times.sort()
        res.remote_p50_ms = round(times[len(times) // 2], 1)
        res.remote_p99_ms = round(times[min(len(times) - 1, int(len(times) * 0.99))], 1)
        res.remote_max_ms = round(times[-1], 1)


# --- the worker: lanes of one process ------------------------------------------------------------

def _worker(spec: dict[str, Any], ready: Any, go: Any, done: Any, release: Any) -> None:
    import logging

    from hexiao.hostd import journal as jr
    from hexiao.hostd.config.types import Fleet
    from hexiao.hostd.fleet.bridge import Bridge

    logging.disable(logging.WARNING)  # a broker restart makes every lane say so
    folder, naive = Path(spec["dir"]), spec["design"] == "naive"
    ids = [sid for sid, _ in spec["stores"]]
    lanes = [(k, f"lane-{n + 1}") for k, (_, count) in enumerate(spec["stores"])
             for n in range(count)]
    base = _rss_kib()
    journals, bridges, conns, responders = [], [], [], []
    no_conn = 0
    for sid, count in spec["stores"]:
        path = folder / f"{sid}.sqlite3"
        if naive:
            journals.append(jr.Journal(path))
            continue
        kf = folder / f"{sid}.key"
        cfg = Fleet(enabled=True, broker=spec["broker"], merchant=MERCHANT, store=sid,
                    key_file=kf, topic_prefix=spec["prefix"], session_expiry_s=600,
                    keepalive_s=30, hq_pubkey_file=Path(spec["hq_pub"]) if spec["hq_pub"] else None)
        bridges.append(Bridge(cfg, path).start())
        journals.append(jr.Journal(path))
        if spec["hq_pub"]:
            from hexiao.hostd.fleet.remote import Responder

            responders.append(Responder(cfg, SimLanes(sid, count)).start())
    for _ in lanes if naive else ():  # naive: a connection per lane
        try:
            if len(conns) - no_conn >= spec["max_conns"]:
                raise psycopg.OperationalError("capped")
            conns.append(psycopg.connect(spec["dsn"], autocommit=True))
        except psycopg.Error:
            conns.append(None)
            no_conn += 1
    for b in bridges:
        if not b.connected.wait(60):
            raise SystemExit(f"lane {b.cfg.store}: not connected to {spec['broker']} in 60 s")
    for r in responders:
        if not r.subscribed.wait(60):
            raise SystemExit(f"store {r.cfg.store}: remote requests not subscribed in 60 s")
    ready.put({"rss_kib": _rss_kib() - base, "lanes": len(lanes), "no_connection": no_conn})
    go.wait()
    rate = spec["rate"] * len(lanes)
    end = time.monotonic() + spec["seconds"]
    n, i, t = 0, 0, time.monotonic()
    while time.monotonic() < end:
        li = i % len(lanes)
        k, lane = lanes[li]
        j, sid = journals[k], ids[k]
        now = time.time()
        code = f"{li:04d}{i:08d}"
        e = j.begin(code, lane, now, code=code, origin={"device": f"{sid}-{lane}"})
        j.advance(e.id, "received", "checked", time.time(), detail={
            "card_type": "CASH", "card_id": "p", "title": "5 off",
            "value": {"reduce_cost": 500, "least_cost": 0}})
        j.advance(e.id, "checked", "consume_sent", time.time())
        ended = time.time()
        j.advance(e.id, "consume_sent", "done", ended, outcome="accepted")
        if naive and conns[li] is not None:
            with contextlib.suppress(psycopg.Error):
                conns[li].execute("INSERT INTO naive (store, entry, ended) VALUES (%s, %s, "
                                 "to_timestamp(%s))", (sid, e.id, ended))
        n += 1
        i += 1
        t += 1 / rate
        pause = t - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    deadline = time.monotonic() + 120
    for b in bridges:  # drained: every record the broker took (or 120 s in all)
        while b.outbox.depth()[0] and time.monotonic() < deadline:
            time.sleep(0.1)
    done.put({"committed": n, "waiting": sum(b.outbox.depth()[0] for b in bridges)})
    if responders:  # headquarters' last asks are answered before the stores go
        release.wait(300)
    for r in responders:
        r.stop()
    for b in bridges:
        b.stop()
    for j in journals:
        j.close()
    for c in conns:
        if c is not None:
            c.close()


# --- the run ------------------------------------------------------------------------------------

class Fleetd:
    def __init__(self, dsn: str, broker: str, prefix: str, group: str, n: int) -> None:
        self.argv = [[sys.executable, "-m", "hexiao.fleetd.main", "run", "--dsn", dsn,
                      "--broker", broker, "--topic-prefix", prefix, "--group", group,
                      "--client-id", f"{group}-{i}", "--alarm-every", "0"] for i in range(n)]
        self.procs = [self._start(i) for i in range(n)]

    def _start(self, i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv[i], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def kill_and_restart(self, i: int, after_s: float) -> None:
        os.kill(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()
        time.sleep(after_s)
        self.procs[i] = self._start(i)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


class Broker:
    """A mosquitto of the bench's own (for the restart), persistence on like a real one."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(binary, os.X_OK):
            raise click.ClickException("the bench's own broker needs the mosquitto binary "
                                       "(apt-get install mosquitto), or give --broker URL")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {folder}/\n"
                             "max_queued_messages 1000000\n")
        self.binary, self.proc = binary, None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def _database(admin: str) -> str:
    from hexiao.fleetd import db

    name = f"hexiao_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
        conn.execute("CREATE TABLE naive (store text, entry bigint, ended timestamptz NOT NULL, "
                     "ingested timestamptz NOT NULL DEFAULT clock_timestamp(), "
                     "PRIMARY KEY (store, entry))")
    return dsn


def _drop(admin: str, dsn: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")


def run_one(design: str, lanes: int, *, admin: str, broker: str, seconds: float, rate: float,
            workers: int, fleetds: int, folder: Path, faults: bool = False,
            lanes_per_store: int = 10, remote: float = 0.0) -> Result:
    res = Result(design, lanes, offered_per_s=round(rate * lanes, 1))
    dsn = _database(admin)
    tag = secrets.token_hex(3)
    prefix, group = f"bench-{tag}/", f"bench{tag}"
    work = Path(tempfile.mkdtemp(prefix=f"hexiao-fleet-{lanes}-", dir=folder))
    # (store, its lanes): lanes_per_store each, the last one takes what is left
    stores = [(f"b{tag}-{i}", min(lanes_per_store, lanes - i * lanes_per_store))
              for i in range(-(-lanes // lanes_per_store))]
    own_broker = Broker(work) if design == "bridge" and (faults or not broker) else None
    url = own_broker.url if own_broker else broker
    fd: Fleetd | None = None
    procs: list[Any] = []
    hq_key, prober = None, None
    if remote and design == "bridge":  # headquarters' key; the stores get its public half
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        hq_key = Ed25519PrivateKey.generate()
        (work / "hq.pub").write_bytes(hq_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    try:
        if design == "bridge":
            from hexiao.fleetd import db

            with psycopg.connect(dsn, autocommit=True) as conn:
                for sid, _ in stores:
                    key = secrets.token_bytes(32)
                    kf = work / f"{sid}.key"
                    kf.write_text(key.hex())
                    kf.chmod(0o600)
                    db.add_store(conn, MERCHANT, sid, key)
            fd = Fleetd(dsn, url, prefix, group, fleetds)
        ctx = mp.get_context("spawn")
        ready, done, go, release = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        # paho waits with select(): its sockets must stay below fd 1024, and a store holds ~12
        # fds (3 SQLite connections with their WAL files, its socket): so many stores a process
        workers = min(max(workers, -(-len(stores) // STORES_PER_PROCESS)), len(stores))
        # naive: a connection per lane, but never the shared server's last ones (others use it)
        with psycopg.connect(admin, autocommit=True) as conn:
            free = conn.execute("SELECT current_setting('max_connections')::int - count(*) "
                                "FROM pg_stat_activity").fetchone()[0]
        cap = max(0, free - NAIVE_SPARE)
        if design == "naive" and lanes > cap:
            res.notes.append(f"the server has {free} free connections: {cap} lanes connect, "
                             f"{NAIVE_SPARE} are left for others")
        for w in range(workers):
            spec = {"max_conns": -(-cap // workers), "dir": str(work),
                    "stores": stores[w::workers], "design": design, "dsn": dsn,
                    "broker": url, "prefix": prefix, "rate": rate, "seconds": seconds,
                    "hq_pub": str(work / "hq.pub") if hq_key else ""}
            p = ctx.Process(target=_worker, args=(spec, ready, go, done, release),
                            daemon=True)
            p.start()
            procs.append(p)
        res.processes = workers
        setups = [ready.get(timeout=300) for _ in procs]
        res.rss_per_lane_kib = round(sum(s["rss_kib"] for s in setups) / lanes, 1)
        res.no_connection = sum(s["no_connection"] for s in setups)
        go.set()
        if hq_key is not None:
            import threading

            prober = threading.Thread(target=_probe, args=(dsn, url, prefix, hq_key, stores,
                                                           remote, seconds, res), daemon=True)
            prober.start()
        if faults and fd is not None and own_broker is not None:
            time.sleep(seconds / 3)
            fd.kill_and_restart(0, 2.0)
            res.notes.append("fleetd 1 SIGKILLed and restarted 2 s later")
            time.sleep(seconds / 3)
            own_broker.stop()
            time.sleep(2.0)
            own_broker.start()
            res.notes.append("broker stopped for 2 s and restarted")
        finals = [done.get(timeout=seconds + 600) for _ in procs]
        if prober is not None:
            prober.join(120)  # its last asks end within their 10 s timeout
            res.load_avg = [round(x, 2) for x in os.getloadavg()]
        release.set()
        res.committed = sum(f["committed"] for f in finals)
        for p in procs:  # (the naive lanes' connections closed before we connect)
            p.join(120)
        res.undelivered = sum(f.get("waiting", 0) for f in finals)
        table = "naive" if design == "naive" else "redemptions"
        with psycopg.connect(dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 120
            want = res.committed - res.undelivered if design == "bridge" else None
            while want is not None and time.monotonic() < deadline:
                if conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= want:
                    break
                time.sleep(0.2)
            if design == "bridge":
                rows, distinct = conn.execute(
                    "SELECT count(*), count(DISTINCT (store, inst, seq)) FROM records "
                    "WHERE kind = 'redemption'").fetchone()
                res.rows, res.duplicates = rows, rows - distinct
                # per store, seqs 1..n with no gap: nothing lost in the middle either
                gaps = conn.execute("SELECT count(*) FROM (SELECT store, max(seq) - count(*) "
                                    "AS gap FROM records WHERE kind = 'redemption' GROUP BY "
                                    "store) g WHERE gap <> 0").fetchone()[0]
                # still in a store's outbox when the run ended is late, not lost
                res.lost = max(0, res.committed - res.undelivered - distinct) + gaps
                lat = ("SELECT extract(epoch FROM (max(ingested) - min(ingested))), "
                       "percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY "
                       "extract(epoch FROM ingested) * 1000 - (payload->>'ended')::bigint) "
                       "FROM records WHERE kind = 'redemption'")
            else:
                res.rows = conn.execute("SELECT count(*) FROM naive").fetchone()[0]
                res.lost = res.committed - res.rows
                lat = ("SELECT extract(epoch FROM (max(ingested) - min(ingested))), "
                       "percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY "
                       "extract(epoch FROM (ingested - ended)) * 1000) FROM naive")
            span, pct = conn.execute(lat).fetchone()
            if span:
                res.ingested_per_s = round(res.rows / float(span), 1)
            if pct:
                res.p50_ms, res.p99_ms = round(pct[0], 1), round(pct[1], 1)
    finally:
        if procs:
            release.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        if fd is not None:
            fd.stop()
        if own_broker is not None:
            own_broker.stop()
        _drop(admin, dsn)
        shutil.rmtree(work, ignore_errors=True)
    return res


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The store-to-headquarters path (MQTT 5 into PostgreSQL)."""


@main.command()
@click.option("--lanes", default="100,300,1000", show_default=True,
              help="comma-separated lane counts")
@click.option("--lanes-per-store", type=click.IntRange(min=1), default=10, show_default=True,
              help="lanes sharing a store's journal and bridge")
@click.option("--seconds", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="how long each size redeems")
@click.option("--rate", type=click.FloatRange(min=0.01), default=1.2, show_default=True,
              help="redemptions per second per lane offered")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help=f"processes the lanes are spread over (at least one per "
              f"{STORES_PER_PROCESS} stores)")
@click.option("--fleetd", "fleetds", type=click.IntRange(min=1), default=2, show_default=True,
              help="hexiao-fleetd instances sharing the subscription")
@click.option("--broker", default="", help="mqtt://HOST:PORT of a broker to use (default: a "
              "mosquitto of the bench's own per run, configured for it)")
@click.option("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
              show_default=True, help="a database of the server the bench may create "
              "a database on (dropped after each run)")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(
                  tempfile.gettempdir()), show_default=True, help="where the journals go")
@click.option("--naive/--no-naive", default=True, show_default=True,
              help="also run each lane inserting straight into PostgreSQL")
@click.option("--faults/--no-faults", default=True, show_default=True,
              help="also run the largest size through a broker restart and a fleetd kill")
@click.option("--remote", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="remote device.health round trips per second headquarters asks of random "
              "lanes while the fleet reports (0: none)")
@click.option("--json", "as_json", is_flag=True)
def bench(lanes: str, lanes_per_store: int, seconds: float, rate: float, workers: int,
          fleetds: int, broker: str, admin_dsn: str, folder: Path, naive: bool, faults: bool,
          remote: float, as_json: bool) -> None:
    """Simulated stores against the real broker and PostgreSQL; figures per size."""
    try:
        sizes = [int(x) for x in lanes.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("expected numbers like 100,300,1000",
                                 param_hint="--lanes") from None
    url = urlsplit(broker)
    try:
        if broker:
            socket.create_connection((url.hostname or "", url.port or 1883), timeout=3).close()
    except OSError as e:
        click.echo(f"hexiao fleet bench: no broker at {broker}: {e.strerror or e}", err=True)
        sys.exit(1)
    try:
        psycopg.connect(admin_dsn, connect_timeout=5).close()
    except psycopg.Error as e:
        click.echo(f"hexiao fleet bench: database {admin_dsn}: "
                   f"{str(e).strip().splitlines()[0]}", err=True)
        sys.exit(1)
    runs = [("bridge", n, False) for n in sizes]
    runs += [("naive", n, False) for n in sizes] if naive else []
    runs += [("bridge", max(sizes), True)] if faults else []
    results = []
    for design, n, with_faults in runs:
        if not as_json:
            click.echo(f"{design} x {n} lanes{' with faults' if with_faults else ''} ...",
                       err=True)
        r = run_one(design, n, admin=admin_dsn, broker=broker, seconds=seconds, rate=rate,
                    workers=workers, fleetds=fleetds, folder=folder, faults=with_faults,
                    lanes_per_store=lanes_per_store, remote=remote)
        if with_faults:
            r.design = "bridge+faults"
        results.append(r)
        if not as_json:
            _line(r)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in results], indent=1))


def _line(r: Result) -> None:
    click.echo(f"  {r.design:13} {r.lanes:5} lanes: offered {r.offered_per_s:7.1f}/s, "
               f"ingested {r.ingested_per_s:7.1f}/s, p50 {r.p50_ms:7.1f} ms, p99 "
               f"{r.p99_ms:7.1f} ms, {r.rss_per_lane_kib:7.1f} KiB/lane; committed "
               f"{r.committed}, rows {r.rows}, lost {r.lost}, duplicated {r.duplicates}"
               + (f", {r.undelivered} still in outboxes" if r.undelivered else "")
               + (f", {r.no_connection} lanes without a connection" if r.no_connection else "")
               + (f" ({'; '.join(r.notes)})" if r.notes else ""))
    if r.remote_asked:
        failed = sum(r.remote_failed.values())
        click.echo(f"  {'':13} remote device.health: {r.remote_asked} asked, p50 "
                   f"{r.remote_p50_ms:.1f} ms, p99 {r.remote_p99_ms:.1f} ms, max "
                   f"{r.remote_max_ms:.1f} ms, {failed} failed"
                   + (f" ({', '.join(f'{k} {v}' for k, v in r.remote_failed.items())})"
                      if failed else "") + f"; load average {r.load_avg}")
        for e in r.remote_errors:
            click.echo(f"  {'':13}   {e}")


if __name__ == "__main__":
    main()
