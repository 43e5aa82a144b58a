"""`hexiao fleet rollout`: a firmware bundle to the fleet in stages (fleetd/rollout.py;
docs/firmware-update.md, "Staged rollout").

Commands:
  fleet rollout start BUNDLE --canary 2% --then 20% --then 100% [--parallel N]
                              [--observe-minutes M] [--pubkey KEY.pub]
  fleet rollout status [--rollout ID]
  fleet rollout pause|resume|abort [--rollout ID] [--reason TEXT]

These write fleetd's PostgreSQL (--dsn, $HEXIAO_FLEETD_DSN) only; the fleetd instance that runs
rollouts (`hexiao-fleetd run --hq-key ...`) signs and publishes the stores' orders at its next
tick. --json prints one JSON document; a failure is one line on stderr. Exit codes: 0 ok,
1 error (bundle, database, a rollout already running, no lanes), 2 usage, 4 no such rollout.
"""

from __future__ import annotations

import getpass
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from hexiao.hostd.control.client import ControlError
from hexiao.tools import fleet_common as fleet_cli
from hexiao.tools.support import ctl, render

CTX = fleet_cli.CTX


def _pct(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    def one(v: str) -> int:
        try:
            n = float(v.strip().rstrip("%"))
        except ValueError:
            raise click.BadParameter(f"{v!r}: give a percentage of the lanes, e.g. 2%") from None
        if not 0 < n <= 100:
            raise click.BadParameter(f"{v!r}: a percentage from 1 to 100")
        return math.ceil(n)
    return [one(v) for v in value] if isinstance(value, tuple) else one(value)


def _read(bundle_path: Path, pubkey: Path | None) -> tuple[dict[str, Any], bytes, str]:
    """(fw_offer, image, board) of a signed bundle file; ControlError in one line."""
    from hexiao.tools.install import bundle
    from hexiao.tools.install.errors import InstallError

    try:
        offer, img = bundle.offer_of(bundle_path, pubkey)
    except InstallError as e:
        raise ControlError("bad_request", f"{e.kind}: {e.message}") from None
    return offer, img, str(offer["board"])


def _do(dsn: str, fn: Callable[[Any], Any]) -> Callable[[], Any]:
    from hexiao.fleetd import rollout as hq

    def call(conn: Any) -> Any:
        try:
            return fn(conn)
        except hq.RolloutError as e:
            kind = "not_found" if str(e).startswith("no rollout") else "refused_rollout"
            raise ControlError(kind, str(e)) from None
    return fleet_cli.query(dsn, call)


@click.group("rollout", context_settings=CTX)
def rollout_group() -> None:
    """Firmware to the fleet in stages: canary lanes first, halted when they do worse."""


@rollout_group.command("start", context_settings=CTX)
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--canary", default="2%", show_default=True, callback=_pct,
              help="The first stage: this share of the lanes (at least one).")
@click.option("--then", "then", multiple=True, callback=_pct,
              help="A further stage (cumulative share), repeatable [default: 100%].")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Lanes of one store updating at once.")
@click.option("--observe-minutes", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="After a stage's last lane, watch this long before the "
                                      "next stage.")
@click.option("--pubkey", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check the bundle's signature with the devices' firmware key first.")
@click.option("--operator", default=None, help="Who starts it [default: your login name].")
@fleet_cli.db_options
def start_cmd(bundle_path: Path, canary: int, then: list[int], parallel: int,
              observe_minutes: float, pubkey: Path | None, operator: str | None, dsn: str,
              as_json: bool) -> None:
    """Start rolling BUNDLE out (one rollout at a time)."""
    from hexiao.fleetd import rollout as hq
    from hexiao.hostd.fleet import rollout as wire

    stages = [canary, *(then or [100])]

    offer, img, board = ctl.run(lambda: _read(bundle_path, pubkey), as_json, show=False)

    def go(conn: Any) -> Any:
        rid = hq.start(conn, version=str(offer["version"]), sha256=offer["digest"].hex(),
                       board=board, bundle=wire.pack_bundle(offer, img), stages=stages,
                       author=operator or getpass.getuser(), parallel=parallel,
                       observe_s=observe_minutes * 60)
        return hq.status(conn, rid)

    _show(ctl.run(_do(dsn, go), as_json, show=False), as_json)


@rollout_group.command("status", context_settings=CTX)
@click.option("--rollout", "rollout_id", type=int, default=None,
              help="This rollout [default: the running one, else the latest].")
@fleet_cli.db_options
def status_cmd(rollout_id: int | None, dsn: str, as_json: bool) -> None:
    """A rollout's stage, state and progress per store."""
    from hexiao.fleetd import rollout as hq

    _show(ctl.run(_do(dsn, lambda c: hq.status(c, rollout_id)), as_json, show=False), as_json)


def _action(action: str, doc: str) -> None:
    @rollout_group.command(action, context_settings=CTX, help=doc)
    @click.option("--rollout", "rollout_id", type=int, default=None,
                  help="This rollout [default: the running or paused one].")
    @click.option("--reason", default="", help="Why (kept with the rollout).")
    @fleet_cli.db_options
    def cmd(rollout_id: int | None, reason: str, dsn: str, as_json: bool) -> None:
        from hexiao.fleetd import rollout as hq

        def go(conn: Any) -> Any:
            hq.set_state(conn, action, rollout_id, reason)
            return hq.status(conn, rollout_id)

        _show(ctl.run(_do(dsn, go), as_json, show=False), as_json)


_action("pause", "Hold: lanes updating finish, no lane starts.")
_action("resume", "Carry on after a pause.")
_action("abort", "Give up: no lane starts again (lanes updated keep the new firmware).")


def _show(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(st, ensure_ascii=False, indent=2))
        return
    colour = render.colour_on()
    bad = st["state"] in ("halted", "aborted")
    head = click.style(st["state"], fg="red" if bad else "green", bold=True) if colour \
        else st["state"]
    stages = ", ".join(f"{p}%" for p in st["stages"])
    click.echo(f"rollout {st['rollout']}: {st['version']} ({st['board']}) {head}, stage "
               f"{st['stage']} of {len(st['stages'])} ({stages}), started by {st['author']}")
    if st["reason"]:
        click.echo(f"  reason: {st['reason']}")
    for s in st["by_stage"]:
        click.echo(f"  stage {s['stage']} ({s['pct']}%): {s['finished']}/{s['lanes']} lane(s) "
                   "finished")
    for s in st["stores"]:
        counts = ", ".join(f"{k} {s[k]}" for k in ("pending", "sent", "updating", "done",
                                                   "failed", "rolled_back") if s.get(k))
        click.echo(f"  {s['store']}: {s['lanes']} lane(s): {counts}")
    for p in st["problems"]:
        click.echo(f"  ! {p['store']}/{p['lane']} {p['state']}: {p['detail'] or ''}")
