"""`hexiao report`: headquarters' reports from fleetd's PostgreSQL (fleetd/reports.py).

Subcommands: redemptions (per day / store / lane / card type / franchisee), settlement (a CSV per
franchisee for a date range), duplicates (one code accepted in two places), points (member
points per store and day), quiet (stores that went silent), alarms. Each prints a table for
people, `--json` or `--csv` for scripts.

Money is integer fen everywhere (JSON and CSV carry `face_value_fen`); tables and CSV also show
yuan, formatted from the integer, never through a float.

Exit status: 0 done; 1 the database cannot be read (one line says which and why); 2 bad options.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import psycopg
from hexiao.fleetd import reports

DSN = "postgresql://postgres@127.0.0.1:5432/hexiao_fleet"


def _dsn(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--dsn", default=DSN, show_default=True, envvar="HEXIAO_FLEETD_DSN",
                        help="fleetd's PostgreSQL database")(f)


def _fmt(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout")(f)
    return click.option("--json", "as_json", is_flag=True, help="JSON on stdout")(f)


def _tz(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--tz", default=reports.TZ, show_default=True,
                        help="the time zone a business day is counted in")(f)


def _date(name: str, dest: str, required: bool = False) -> Callable[..., Any]:
    return click.option(name, dest, type=click.DateTime(["%Y-%m-%d"]), required=required,
                        help="YYYY-MM-DD (inclusive)")


def _query(dsn: str, run: Callable[[psycopg.Connection], Any]) -> Any:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            return run(conn)
    except psycopg.errors.UndefinedTable:
        _fail(f"database {dsn} has no fleetd tables: run `hexiao-fleetd migrate --dsn ...` "
              "or point --dsn at fleetd's database")
    except psycopg.Error as e:
        _fail(f"database {dsn}: {str(e).strip().splitlines()[0]}")


def _fail(message: str) -> None:
    click.echo(f"hexiao report: {message}", err=True)
    sys.exit(1)


def _plain(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.isoformat(timespec="seconds")
    if isinstance(v, dt.date):
        return v.isoformat()
    return v


def _with_yuan(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "face_value_yuan": reports.yuan(r["face_value_fen"])}
            if "face_value_fen" in r else r for r in rows]


def _emit(rows: list[dict[str, Any]], as_json: bool, as_csv: bool, *,
          extra: dict[str, Any] | None = None, empty: str = "nothing to report") -> None:
    rows = [{k: _plain(v) for k, v in r.items()} for r in rows]
    if as_json:
        click.echo(json.dumps({"rows": rows, **(extra or {})}, ensure_ascii=False,
                              default=str, indent=1))
        return
    rows = _with_yuan(rows)
    if as_csv:
        click.echo(_csv(rows), nl=False)
        return
    if not rows:
        click.echo(empty)
        return
    cols = [c for c in rows[0] if c != "face_value_fen"]
    text = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    right = {i for i, c in enumerate(cols) if isinstance(rows[0][c], int) or c.endswith("yuan")}
    for line in ([c.replace("face_value_yuan", "face value (yuan)") for c in cols], *text):
        click.echo("  ".join(s.rjust(w) if i in right else s.ljust(w)
                             for i, (s, w) in enumerate(zip(line, widths, strict=True))).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list | dict):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        w = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) if isinstance(v, list | dict) else v for k, v in r.items()})
    return out.getvalue()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Reports of the chain, from headquarters' database (hexiao-fleetd)."""


@main.command()
@_dsn
@_fmt
@_tz
@click.option("--by", default="day,store", show_default=True,
              help=f"comma-separated, from: {', '.join(reports.DIMENSIONS)}")
@_date("--from", "start")
@_date("--to", "end")
@click.option("--outcome", default="accepted", show_default=True,
              help="only entries with this outcome; 'any' for all")
def redemptions(dsn: str, as_json: bool, as_csv: bool, tz: str, by: str,
                start: dt.datetime | None, end: dt.datetime | None, outcome: str) -> None:
    """Redemptions and their face value, grouped."""
    dims = [b.strip() for b in by.split(",") if b.strip()]
    bad = [d for d in dims if d not in reports.DIMENSIONS]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: choose from "
                                 f"{', '.join(reports.DIMENSIONS)}", param_hint="--by")
    rows = _query(dsn, lambda c: reports.redemptions(
        c, dims, start=start.date() if start else None, end=end.date() if end else None,
        outcome=None if outcome == "any" else outcome, tz=tz))
    _emit(rows, as_json, as_csv, empty="no redemptions in that range")


def _totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        t = out.setdefault(r["franchisee"], {"redemptions": 0, "face_value_fen": 0})
        t["redemptions"] += r["redemptions"]
        t["face_value_fen"] += r["face_value_fen"]
    return out


@main.command()
@_dsn
@_fmt
@_tz
@_date("--from", "start", required=True)
@_date("--to", "end", required=True)
@click.option("--franchisee", default=None, help="only this franchisee's stores")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write settlement-<franchisee>-<from>-<to>.csv per franchisee into DIR")
def settlement(dsn: str, as_json: bool, as_csv: bool, tz: str, start: dt.datetime,
               end: dt.datetime, franchisee: str | None, out_dir: Path | None) -> None:
    """Accepted redemptions per franchisee, store, day and card type, with totals (CSV)."""
    if end < start:
        raise click.BadParameter("--to is before --from", param_hint="--to")
    rows = _query(dsn, lambda c: reports.settlement(c, start.date(), end.date(),
                                                    franchisee=franchisee, tz=tz))
    totals = _totals(rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f, t in totals.items():
            mine = [r for r in rows if r["franchisee"] == f]
            mine.append({"franchisee": f, "store": "TOTAL", "day": "", "card_type": "", **t})
            path = out_dir / f"settlement-{f or 'none'}-{start.date()}-{end.date()}.csv"
            path.write_text(_csv(_with_yuan([{k: _plain(v) for k, v in r.items()}
                                             for r in mine])), encoding="utf-8")
            click.echo(f"{path}: {t['redemptions']} redemptions, "
                       f"{reports.yuan(t['face_value_fen'])} yuan")
        if not totals:
            click.echo("no accepted redemptions in that range: no file written")
        return
    if not as_json:  # the totals close each franchisee's part
        rows = rows + [{"franchisee": f, "store": "TOTAL", "day": "", "card_type": "", **t}
                       for f, t in totals.items()]
    _emit(rows, as_json, as_csv, extra={"totals": totals},
          empty="no accepted redemptions in that range")


@main.command()
@_dsn
@_fmt
@_tz
@_date("--from", "start")
@_date("--to", "end")
def duplicates(dsn: str, as_json: bool, as_csv: bool, tz: str, start: dt.datetime | None,
               end: dt.datetime | None) -> None:
    """Codes accepted in more than one place (by their keyed hash; the code is never here)."""
    rows = _query(dsn, lambda c: reports.duplicates(
        c, start=start.date() if start else None, end=end.date() if end else None, tz=tz))
    _emit(rows, as_json, as_csv, empty="no code was accepted twice")


@main.command()
@_dsn
@_fmt
@_tz
@_date("--from", "start")
@_date("--to", "end")
def points(dsn: str, as_json: bool, as_csv: bool, tz: str, start: dt.datetime | None,
           end: dt.datetime | None) -> None:
    """Member points per store and day: credited, taken back (refunds, voids) and net."""
    rows = _query(dsn, lambda c: reports.points(
        c, start=start.date() if start else None, end=end.date() if end else None, tz=tz))
    _emit(rows, as_json, as_csv, empty="no member points in that range")


@main.command()
@_dsn
@_fmt
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=24.0,
              show_default=True, help="silent for longer than this")
def quiet(dsn: str, as_json: bool, as_csv: bool, hours: float) -> None:
    """Stores that sent nothing for --hours (or never)."""
    rows = _query(dsn, lambda c: reports.quiet(c, hours))
    _emit(rows, as_json, as_csv, empty=f"every store sent something in the last {hours:g} h")


@main.command()
@_dsn
@_fmt
@click.option("--all", "include_cleared", is_flag=True, help="cleared alarms too")
def alarms(dsn: str, as_json: bool, as_csv: bool, include_cleared: bool) -> None:
    """fleetd's alarms: open ones (or --all)."""
    rows = _query(dsn, lambda c: reports.alarms(c, include_cleared=include_cleared))
    _emit(rows, as_json, as_csv, empty="no open alarms")


if __name__ == "__main__":
    main()
