"""`hexiao-fleetd web` (serve headquarters' page) and `hexiao-fleetd user add|list|remove`
(its operators); fleetd/main.py adds them to its group.

Rules this module keeps:
- a password never on the command line: a hidden prompt asked twice, or `--password-file`
  (a file only its owner can read, as every secret of hexiao);
- a mistake is one line on stderr and exit 1 (2 for bad options, click's); `--json` for
  scripts; the schema is applied first, as `add-store` does, so a new database works at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

import click
import psycopg
from hexiao.fleetd import db
from hexiao.fleetd.web import auth, server
from hexiao.fleetd.web.app import REFRESH_S, SESSION_S, HqApp
from hexiao.hostd.config.types import ConfigError, read_secret

DSN = "postgresql://postgres@127.0.0.1:5432/hexiao_fleet"
_CTX = {"help_option_names": ["-h", "--help"]}
_dsn = click.option("--dsn", default=DSN, show_default=True, envvar="HEXIAO_FLEETD_DSN",
                    help="the PostgreSQL database (libpq URL or key=value string)")


def _fail(message: str) -> NoReturn:
    click.echo(f"hexiao-fleetd: {message}", err=True)
    sys.exit(1)


def _connect(dsn: str) -> psycopg.Connection:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        db.migrate(conn)
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    return conn


@click.group(context_settings=_CTX)
def user() -> None:
    """Operators who may log in to headquarters' page."""


@user.command("add", context_settings=_CTX)
@_dsn
@click.argument("name")
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="read the password from this file (only its owner may read it) "
                   "instead of asking")
def user_add(dsn: str, name: str, password_file: Path | None) -> None:
    """Add operator NAME, or give NAME a new password (which ends their sessions)."""
    try:
        auth.check_name(name)
        if password_file is not None:
            password = read_secret(password_file)
        else:
            password = click.prompt(f"password for {name}", hide_input=True,
                                    confirmation_prompt=True, err=True)
        with _connect(dsn) as conn:
            added = auth.add_operator(conn, name, password)
    except ConfigError as e:
        _fail(f"--password-file: {e}")
    except auth.AuthError as e:
        _fail(str(e))
    except click.Abort:
        _fail("no password given: nothing changed")
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")
    click.echo(f"operator {name}: {'added' if added else 'new password set, sessions ended'}")


@user.command("list", context_settings=_CTX)
@_dsn
@click.option("--json", "as_json", is_flag=True, help="one JSON array, for scripts")
def user_list(dsn: str, as_json: bool) -> None:
    """The operators, when each was added and last logged in."""
    with _connect(dsn) as conn:
        ops = auth.list_operators(conn)
    if as_json:
        click.echo(json.dumps(ops))
        return
    if not ops:
        click.echo("no operators: add one with hexiao-fleetd user add NAME")
    for o in ops:
        click.echo(f"{o['name']:<24} added {o['created']}  last login {o['last_login'] or '-'}")


@user.command("remove", context_settings=_CTX)
@_dsn
@click.argument("name")
def user_remove(dsn: str, name: str) -> None:
    """Remove operator NAME and end their sessions."""
    try:
        with _connect(dsn) as conn:
            auth.remove_operator(conn, name)
    except auth.AuthError as e:
        _fail(str(e))
    click.echo(f"operator {name}: removed, sessions ended")


@click.command(context_settings=_CTX)
@_dsn
@click.option("--listen", default=server.DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="where to serve the page (keep loopback; put a TLS proxy in front)")
@click.option("--trusted-proxy", default=None, metavar="ADDRESS",
              help="the TLS proxy in front, whose X-Forwarded-For/-Proto are believed")
@click.option("--timezone", default="Asia/Shanghai", show_default=True,
              help="headquarters' time zone for the page's times and hours")
@click.option("--session-hours", type=click.FloatRange(min=0.1), default=SESSION_S / 3600,
              show_default=True, help="an operator's session lasts this long")
@click.option("--refresh", type=click.FloatRange(min=1), default=REFRESH_S, show_default=True,
              help="seconds between the page's live updates")
def web(dsn: str, listen: str, trusted_proxy: str | None, timezone: str,
        session_hours: float, refresh: float) -> None:
    """Serve headquarters' status page (operators log in) until SIGTERM."""
    if not listen.rpartition(":")[2].isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        app = HqApp(dsn, tz=timezone, refresh_s=refresh, session_s=session_hours * 3600)
    except (KeyError, ValueError):  # zoneinfo's ZoneInfoNotFoundError is a KeyError
        raise click.BadParameter(f"no time zone {timezone!r} (e.g. Asia/Shanghai, UTC)",
                                 param_hint="--timezone") from None
    with _connect(dsn) as conn:
        if not auth.list_operators(conn):
            logging.getLogger("hexiao.fleetd.web").warning(
                "no operators yet: nobody can log in; add one with hexiao-fleetd user add NAME")
    try:
        srv = server.create(app, listen, trusted_proxy)
    except (OSError, ValueError, OverflowError) as e:
        _fail(f"--listen {listen}: cannot listen: {e}")
    print(f"serving {server.url(srv)}", flush=True)
    server.run(srv)
