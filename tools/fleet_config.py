"""`hexiao fleet config`: headquarters' desired state for the stores (fleetd/desired.py;
docs/fleet-protocol.md, "Desired state").

Commands:
  fleet config diff FILE --scope SCOPE      what would change, store by store (nothing sent)
  fleet config apply FILE --scope SCOPE     store it, sign each store's document, publish it
  fleet config status [--store S]           desired vs applied version per store, refusals

SCOPE: all, region:R, franchisee:F or store:S. FILE: TOML with [rules.LANE_OR_DEVICE]
(rules = [...], default = ...), [macros.CARD_TYPE] and [settings], checked as a store checks it.
`apply` signs with headquarters' Ed25519 key (--key, $HEXIAO_HQ_KEY) and publishes on the broker
(--broker, $HEXIAO_FLEET_BROKER). --json prints one JSON document; a failure is one line on
stderr. Exit codes: 0 ok, 1 error (file, database, key), 2 usage, 4 unknown store, 5 broker
unreachable (the document is stored; the next apply sends it).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import psycopg
from hexiao.hostd.control.client import ControlError
from hexiao.tools import fleet_common as fleet_cli
from hexiao.tools.support import ctl, render

CTX = fleet_cli.CTX


@click.group("config", context_settings=CTX)
def config_group() -> None:
    """Rules, macros and device settings for all stores, a region, a franchisee or a store."""


def _call(dsn: str, fn: Callable[[psycopg.Connection], Any]) -> Callable[[], Any]:
    from hexiao.fleetd.desired import DesiredFailure

    def call() -> Any:
        try:
            return fleet_cli.query(dsn, fn)()
        except DesiredFailure as e:
            raise ControlError(e.kind, e.message) from None
    return call


def _load(file: Path, scope: str) -> dict[str, Any]:
    from hexiao.fleetd import desired

    try:
        desired.parse_scope(scope)
        return desired.load_file(file)
    except desired.DesiredFailure as e:
        raise ControlError(e.kind, e.message) from None


def _show(v: Any) -> str:
    return "(none)" if v is None else json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def _plan_text(steps: list[dict[str, Any]], applied: bool) -> str:
    lines = []
    for s in steps:
        if not s["changes"]:
            lines.append(f"{s['store']}: no change (version {s['version']})"
                         + ("" if s.get("published", True) else "; not published yet"))
            continue
        tail = "" if not applied else ("; published" if s["published"] else
                                       "; NOT published (the next apply sends it)")
        lines.append(f"{s['store']}: version {s['version']} -> {s['next']}{tail}")
        lines += [f"  {c['key']}: {_show(c['old'])} -> {_show(c['new'])}" for c in s["changes"]]
    return "\n".join(lines) or "no store in this scope"


@config_group.command("diff", context_settings=CTX)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scope", required=True, help="all, region:R, franchisee:F or store:S")
@fleet_cli.db_options
def diff_cmd(file: Path, scope: str, dsn: str, as_json: bool) -> None:
    """What FILE at SCOPE would change, store by store; nothing is stored or sent."""
    from hexiao.fleetd import desired

    def fn(conn: psycopg.Connection) -> Any:
        return desired.plan(conn, scope, _load(file, scope))

    steps = ctl.run(_call(dsn, fn), as_json, show=as_json)
    if not as_json:
        click.echo(_plan_text(steps, applied=False))


@config_group.command("apply", context_settings=CTX)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scope", required=True, help="all, region:R, franchisee:F or store:S")
@click.option("--author", default=None, help="Who applies it [default: your login name].")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="HEXIAO_HQ_KEY", required=True,
              help="headquarters' Ed25519 key (0600; `hexiao keys generate`) [$HEXIAO_HQ_KEY]")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              envvar="HEXIAO_FLEET_BROKER", help="the fleet's MQTT broker")
@click.option("--prefix", default="", envvar="HEXIAO_FLEET_PREFIX",
              help="topic prefix before hexiao/ (a shared broker)")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0, show_default=True,
              help="Seconds to wait for the broker to take the documents.")
@fleet_cli.db_options
def apply_cmd(file: Path, scope: str, author: str | None, key_file: Path, broker: str,
              prefix: str, timeout: float, dsn: str, as_json: bool) -> None:
    """Store FILE at SCOPE and publish each changed store's signed document (retained)."""
    from hexiao.fleetd import desired
    from hexiao.tools.install import keys

    def call() -> Any:
        doc = _load(file, scope)
        try:
            key = keys.load_private_key(key_file)
        except keys.KeyFileError as e:
            raise ControlError("key", str(e)) from None
        who = author or getpass.getuser()
        publish = desired.publisher(broker, prefix, key, keys.fingerprint(key.public_key()),
                                    who, timeout)
        return _call(dsn, lambda conn: desired.apply(conn, scope, doc, who, publish))()

    steps = ctl.run(call, as_json, show=as_json)
    if not as_json:
        click.echo(_plan_text(steps, applied=True))
    if any(not s["published"] for s in steps):
        raise SystemExit(ctl.EXIT["unavailable"])


@config_group.command("status", context_settings=CTX)
@click.option("--store", default=None, help="Only this store.")
@fleet_cli.db_options
def status_cmd(store: str | None, dsn: str, as_json: bool) -> None:
    """Per store: the version headquarters wants, the one it runs, and its latest refusal."""
    from hexiao.fleetd import desired

    rows = ctl.run(_call(dsn, lambda c: desired.status(c, store)), as_json, show=as_json)
    if not as_json:
        click.echo(render.table([
            {"store": r["store"], "desired": r["desired"], "applied": r["applied"],
             "state": r["state"],
             "refused": "" if not r["refused"] else
             f"v{r['refused']['version']} {r['refused']['reason']}: {r['refused']['message']}"}
            for r in rows]) if rows else "no stores at headquarters")
