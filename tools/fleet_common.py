"""What the `hexiao fleet` command modules share (tools/fleet.py, fleet_config.py,
fleet_rollout.py): the options that name fleetd's database and one way to query it, so a database
that is down or not migrated reads the same one line in every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import psycopg
from hexiao.hostd.control.client import ControlError

CTX = {"help_option_names": ["-h", "--help"]}
DSN = "postgresql://postgres@127.0.0.1:5432/hexiao_fleet"


def db_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)
    return click.option("--dsn", default=DSN, show_default=True, envvar="HEXIAO_FLEETD_DSN",
                        help="fleetd's PostgreSQL database")(f)


def connect(dsn: str) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        raise ControlError("unavailable_db", f"database {dsn}: "
                                             f"{str(e).strip().splitlines()[0]}") from None


def query(dsn: str, fn: Callable[[psycopg.Connection], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with connect(dsn) as conn:
            try:
                return fn(conn)
            except psycopg.errors.UndefinedTable:
                raise ControlError("db", f"database {dsn} has no fleetd tables (or not the "
                                         "latest): run `hexiao-fleetd migrate --dsn ...`") from None
            except psycopg.Error as e:
                raise ControlError("db", f"database {dsn}: "
                                         f"{str(e).strip().splitlines()[0]}") from None
    return call
