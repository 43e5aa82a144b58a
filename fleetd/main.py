"""`hexiao-fleetd`: headquarters' consumer of the stores' records (udev/hexiao-fleetd.service).

Commands: `run` (the daemon: consumer, alarms every --alarm-every seconds, Prometheus metrics
on --metrics-listen), `migrate` (apply the schema and exit), `add-store` (a store's key,
from a 0600 file of 64 hex digits, into the stores table), `gaps` (records that never arrived;
`--accept STORE INST` records their loss as accepted, which clears the records_missing alarm),
`broker-acl` (the broker's per-store Mosquitto acl_file from the stores table; fleetd/acl.py).

`web` and `user add|list|remove`: headquarters' status page and its operators
(fleetd/web/cli.py).

Exit status: 0 stopped cleanly (SIGTERM/SIGINT) or done; 1 could not start or do it (one line
says why: database or broker unreachable, key file unreadable); 2 bad options.
Secrets never on the command line: the broker password and store keys are read from files.
"""

from __future__ import annotations

import getpass
import json
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
from hexiao.fleetd import acl, db, gaps, metrics, rollout
from hexiao.fleetd.alarms import Alarms, Thresholds
from hexiao.fleetd.consumer import Consumer, Settings
from hexiao.fleetd.web import cli as web_cli
from hexiao.hostd.fleet.bridge import FleetError, read_key

DSN = "postgresql://postgres@127.0.0.1:5432/hexiao_fleet"
_dsn = click.option("--dsn", default=DSN, show_default=True, envvar="HEXIAO_FLEETD_DSN",
                    help="the PostgreSQL database (libpq URL or key=value string)")


def _fail(message: str) -> None:
    click.echo(f"hexiao-fleetd: {message}", err=True)
    sys.exit(1)


# every option can also come from the environment (HEXIAO_FLEETD_<COMMAND>_<OPTION>, e.g.
# HEXIAO_FLEETD_RUN_BROKER): the systemd unit's EnvironmentFile sets them
@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": "HEXIAO_FLEETD"})
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
@click.option("--hq-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="HEXIAO_HQ_KEY", help="headquarters' Ed25519 key (0600): this instance "
              "runs firmware rollouts (signs and publishes the stores' orders) [$HEXIAO_HQ_KEY]")
@click.option("--rollout-every", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="seconds between two steps of a firmware rollout (with --hq-key)")
@click.option("--gap-minutes", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="alarm when a store's records have had a hole (a seq missing) this long")
def run(dsn: str, broker: str, group: str, topic_prefix: str, client_id: str | None,
        username: str, password_file: Path | None, tls_ca_file: str | None,
        metrics_listen: str | None, alarm_every: float, lane_offline_minutes: float,
        store_offline_minutes: float, mac_window_minutes: float,
        outbox_age_minutes: float, hq_key: Path | None, rollout_every: float,
        gap_minutes: float) -> None:
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
    rollouts = _rollouts(hq_key, s, dsn, rollout_every) if hq_key is not None else None
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
                                        mac_window_minutes * 60, outbox_age_minutes * 60,
                                        gap_minutes * 60),
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
    if rollouts is not None:
        rollouts.stop()
        rollouts.publish.close()
    consumer.stop()
    logging.getLogger("hexiao.fleetd").info("stopped: %s", dict(consumer.counts))


def _rollouts(key_file: Path, s: Settings, dsn: str, every_s: float) -> rollout.Controller:
    """The rollout controller (fleetd/rollout.py), with its own publishing connection."""
    try:
        signer = rollout.load_signer(key_file)
    except ValueError as e:
        _fail(f"--hq-key: {e}")
    publish = rollout.Publisher(s.broker_host, s.broker_port, s.topic_prefix,
                                username=s.username, password=s.password, tls=s.tls,
                                tls_ca_file=s.tls_ca_file)
    logging.getLogger("hexiao.fleetd").info("fleetd: running firmware rollouts (key %s)",
                                            signer.key_id)
    return rollout.Controller(dsn, signer, publish, every_s=every_s).start()


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
@click.option("--region", default=None, help="the store's region (a desired-state scope)")
def add_store(dsn: str, merchant: str, store: str, key_file: Path,
              franchisee: str | None, region: str | None) -> None:
    """Let a store's records in (or replace its key)."""
    try:
        key = read_key(key_file, "key_file")
        with psycopg.connect(dsn, autocommit=True) as conn:
            db.migrate(conn)
            db.add_store(conn, merchant, store, key, franchisee)
            from hexiao.fleetd import desired
            desired.set_region(conn, store, region)
    except FleetError as e:
        _fail(str(e).replace("fleet.key_file: ", "--key-file: "))
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    click.echo(f"store {store} of {merchant}: key added")


@main.command("gaps")
@_dsn
@click.option("--store", default=None, help="only this store's")
@click.option("--accept", nargs=2, metavar="STORE INST", default=None,
              help="accept this installation's missing records as lost (the alarm clears)")
@click.option("--by", default=None, help="who accepts (default: your login name)")
@click.option("--note", default=None, help="why, kept with the acceptance")
@click.option("--accepted", "show_accepted", is_flag=True,
              help="list the losses accepted so far instead")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout")
def gaps_command(dsn: str, store: str | None, accept: tuple[str, str] | None, by: str | None,
                 note: str | None, show_accepted: bool, as_json: bool) -> None:
    """Records that never arrived: holes in the stores' seqs (or accept one as lost)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            db.migrate(conn)
            if accept is not None:
                who = by or getpass.getuser()
                try:
                    ranges = gaps.accept(conn, accept[0], accept[1], who, note)
                except LookupError as e:
                    _fail(f"{e}; `hexiao-fleetd gaps` lists the installations with holes")
                done = {"store": accept[0], "inst": accept[1], "accepted": ranges, "by": who}
                text = (f"store {accept[0]} installation {accept[1]}: accepted as lost: seqs "
                        f"{gaps.describe(ranges)} (by {who}); the records_missing alarm clears "
                        "at fleetd's next check" if ranges else
                        f"store {accept[0]} installation {accept[1]}: no hole to accept")
                click.echo(json.dumps(done) if as_json else text)
                return
            rows = (gaps.losses(conn, store=store) if show_accepted
                    else gaps.holes(conn, store=store))
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    if as_json:
        click.echo(json.dumps({"rows": rows}, default=str))
    elif not rows:
        click.echo("no accepted losses" if show_accepted else "no holes: every store's records "
                   "are contiguous")
    for r in [] if as_json else rows:
        click.echo(_loss_line(r) if show_accepted else _hole_line(r))


def _hole_line(r: dict[str, object]) -> str:
    ranges = r["ranges"]
    assert isinstance(ranges, list)
    more = " ..." if len(ranges) == gaps.RANGES else ""
    return (f"{r['store']} {r['inst']}: {r['missing']} missing below seq {r['max_seq']}: "
            f"{gaps.describe(ranges)}{more} (since {r['gap_since']:%Y-%m-%d %H:%M:%S %Z})")


def _loss_line(r: dict[str, object]) -> str:
    why = f" ({r['note']})" if r["note"] else ""
    return (f"{r['store']} {r['inst']} seqs {gaps.describe([(r['first_seq'], r['last_seq'])])}:"
            f" accepted {r['accepted']:%Y-%m-%d %H:%M %Z} by {r['accepted_by']}{why}, "
            f"{r['arrived_later']} arrived later")


@main.command("broker-acl")
@_dsn
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the acl_file here (default: stdout)")
@click.option("--prefix", default="", help="the topic prefix before hexiao/ (as the stores' "
              "fleet.topic_prefix; empty in production)")
@click.option("--fleetd-user", default=acl.FLEETD, show_default=True,
              help="fleetd's broker login (its `run --username`)")
@click.option("--operator-user", default=acl.OPERATORS, show_default=True,
              help="the operators' broker login ($HEXIAO_FLEET_USERNAME)")
@click.option("--passwords", "password_file", default=None, metavar="FILE",
              help="also say how to make Mosquitto's password_file FILE for these logins")
def broker_acl(dsn: str, out: Path | None, prefix: str, fleetd_user: str, operator_user: str,
               password_file: str | None) -> None:
    """Write the broker's per-store ACL (a Mosquitto acl_file) from the stores table."""
    users = acl.Users(fleetd_user, operator_user)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = acl.stores(conn)
        text = acl.generate(rows, prefix, users)
    except psycopg.errors.UndefinedTable:
        _fail(f"database {dsn} has no stores table: run `hexiao-fleetd migrate` and "
              "`hexiao-fleetd add-store` first")
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    except acl.AclError as e:
        _fail(str(e))
    if out is None:
        click.echo(text, nl=False)
    else:
        try:
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)  # the broker reads it; it holds no secret
            tmp.replace(out)
        except OSError as e:
            _fail(f"--out {out}: {e.strerror or e}")
    # what follows is for the reader: on stderr when the ACL itself went to stdout
    note = out is None
    if out is not None:
        click.echo(f"wrote {out}: {len(rows)} stores, {users.fleetd} and "
                   f"{users.operators}; point the broker's acl_file at it and reload it "
                   "(Mosquitto: SIGHUP)")
    if password_file is not None:
        click.echo("make the broker's password_file (each command asks for that login's "
                   "password), then set password_file and allow_anonymous false:", err=note)
        for step in acl.password_steps(rows, users, password_file):
            click.echo(f"  {step}", err=note)


# headquarters' status page and its operators (fleetd/web/cli.py)
main.add_command(web_cli.web)
main.add_command(web_cli.user)

if __name__ == "__main__":
    main()
