"""`hexiao-fleetd`: headquarters' consumer of the stores' records (udev/hexiao-fleetd.service).

Commands: `run` (the daemon: consumer, alarms every --alarm-every seconds, Prometheus metrics
on --metrics-listen), `migrate` (apply the schema and exit), `add-store` (a store's key,
from a 0600 file of 64 hex digits, into the stores table).

Exit status: 0 stopped cleanly (SIGTERM/SIGINT) or done; 1 could not start or do it (one line
says why: database or broker unreachable, key file unreadable); 2 bad options.
Secrets never on the command line: the broker password and store keys are read from files.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import click
import psycopg
from hexiao.fleetd import db, metrics
from hexiao.fleetd.alarms import Alarms, Thresholds
from hexiao.fleetd.consumer import Consumer, Settings
from hexiao.hostd.fleet.bridge import FleetError, read_key

DSN = "postgresql://postgres@127.0.0.1:5432/hexiao_fleet"
_dsn = click.option("--dsn", default=DSN, show_default=True, envvar="HEXIAO_FLEETD_DSN",
                    help="the PostgreSQL database (libpq URL or key=value string)")


def _fail(message: str) -> None:
    click.echo(f"hexiao-fleetd: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hexiao")
def main() -> None:
    """hexiao headquarters daemon: store records over MQTT 5 into PostgreSQL."""


@main.command()
@_dsn
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
@click.option("--group", default="fleetd", show_default=True,
              help="the shared-subscription group every instance of this fleet joins")
@click.option("--topic-prefix", default="", help="before hexiao/v1/ (as the stores' fleet."
              "topic_prefix)")
@click.option("--client-id", default=None, help="this instance's stable MQTT client id "
              "(default fleetd-<hostname>): its session and unacknowledged messages follow it")
@click.option("--username", default="", help="broker user")
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="the broker password, in a file only fleetd can read")
@click.option("--tls-ca-file", type=click.Path(dir_okay=False), help="mqtts: the CA bundle")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="serve Prometheus metrics here (e.g. 127.0.0.1:9464)")
@click.option("--alarm-every", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="seconds between alarm checks (0: this instance raises none)")
@click.option("--lane-offline-minutes", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="alarm when a lane's link is down this long")
@click.option("--store-offline-minutes", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="alarm when a store is offline this long")
@click.option("--mac-window-minutes", type=click.FloatRange(min=0), default=60.0,
              show_default=True, help="a MAC-failure burst keeps its alarm open this long")
@click.option("--outbox-age-minutes", type=click.FloatRange(min=0), default=5.0,
              show_default=True, help="alarm when a store's oldest unsent record is this old")
def run(dsn: str, broker: str, group: str, topic_prefix: str, client_id: str | None,
        username: str, password_file: Path | None, tls_ca_file: str | None,
        metrics_listen: str | None, alarm_every: float, lane_offline_minutes: float,
        store_offline_minutes: float, mac_window_minutes: float,
        outbox_age_minutes: float) -> None:
    """Consume the stores' records until SIGTERM."""
    url = urlsplit(broker)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise click.BadParameter("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
                                 param_hint="--broker")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    password = None
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            _fail(f"--password-file {password_file}: {e.strerror}")
    s = Settings(broker_host=url.hostname, broker_port=url.port or (
        8883 if url.scheme == "mqtts" else 1883), dsn=dsn, group=group, topic_prefix=topic_prefix,
        client_id=client_id or f"fleetd-{socket.gethostname()}"[:64], username=username,
        password=password, tls=url.scheme == "mqtts", tls_ca_file=tls_ca_file)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics_listen is not None and not metrics_listen.rpartition(":")[2].isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--metrics-listen")
    try:
        consumer = Consumer(s).start()
    except psycopg.Error as e:
        _fail(f"cannot start: database {dsn}: {str(e).strip().splitlines()[0]}")
    alarms = None
    if alarm_every > 0:
        alarms = Alarms(dsn, Thresholds(lane_offline_minutes * 60, store_offline_minutes * 60,
                                        mac_window_minutes * 60, outbox_age_minutes * 60),
                        every_s=alarm_every).start()
    if metrics_listen is not None:
        try:
            metrics.serve(metrics_listen, consumer, alarms)
        except OSError as e:
            consumer.stop()
            _fail(f"--metrics-listen {metrics_listen}: {e.strerror or e}")
    logging.getLogger("hexiao.fleetd").info("fleetd %s: consuming %s", s.client_id,
                                            consumer.subscription)
    while not stop.wait(1.0):
        if not consumer.alive():
            _fail("the writer thread died (see the log above)")
    if alarms is not None:
        alarms.stop()
    consumer.stop()
    logging.getLogger("hexiao.fleetd").info("stopped: %s", dict(consumer.counts))


@main.command()
@_dsn
def migrate(dsn: str) -> None:
    """Apply the schema migrations this database lacks, and exit."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            applied = db.migrate(conn)
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    click.echo("applied: " + (", ".join(applied) or "nothing (up to date)"))


@main.command("add-store")
@_dsn
@click.option("--merchant", required=True)
@click.option("--store", required=True, help="the store id (its fleet.store)")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the store's key file (the same as its fleet.key_file; 0600)")
@click.option("--franchisee", default=None, help="who settles this store's redemptions")
def add_store(dsn: str, merchant: str, store: str, key_file: Path,
              franchisee: str | None) -> None:
    """Let a store's records in (or replace its key)."""
    try:
        key = read_key(key_file, "key_file")
        with psycopg.connect(dsn, autocommit=True) as conn:
            db.migrate(conn)
            db.add_store(conn, merchant, store, key, franchisee)
    except FleetError as e:
        _fail(str(e).replace("fleet.key_file: ", "--key-file: "))
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    click.echo(f"store {store} of {merchant}: key added")


if __name__ == "__main__":
    main()
