"""`hexiao fleet`: headquarters' view of the fleet and remote diagnostics, and `fleet bench`.

Commands:
  fleet stores [--merchant M] [--franchisee F] [--state online|offline|unknown]
  fleet lanes [--store S] [--merchant M] [--link open|connecting|waiting]
  fleet status --store S
  fleet device list --store S
  fleet device info|health|logs|ping --store S --lane L
  fleet device capture --store S --lane L [--seconds N] [--out FILE]
  fleet bench ...            (tools/bench/fleet.py)

`stores` and `lanes` read fleetd's PostgreSQL (--dsn, $HEXIAO_FLEETD_DSN). `status` and `device`
ask the store's hostd over MQTT 5 (--broker, $HEXIAO_FLEET_BROKER; broker credentials from
$HEXIAO_FLEET_USERNAME and $HEXIAO_FLEET_PASSWORD), signed with headquarters' Ed25519 key
(--key, $HEXIAO_HQ_KEY: a 0600 file from `hexiao keys generate`); every request is logged in
fleetd's database with --operator (default: the login name) before it is sent
(fleetd/remote.py). The answer prints exactly as the local command's (tools/support/render.py);
--json prints the same data as the local command's --json. A failure is one line on stderr.

Exit codes (those of the local commands, tools/support/ctl.py):
  0  ok
  1  error (database, key file, bad request, an answer that is not believed)
  2  usage error
  4  not found (unknown store, lane or device)
  5  the store did not answer in time (offline?), or the device is unavailable
  6  the store refused the request (stale: clocks apart; a command it does not answer)
"""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import psycopg
from hexiao.hostd.control.client import ControlError
from hexiao.hostd.fleet.remote import CAPTURE_MAX_S
from hexiao.tools.fleet_common import CTX
from hexiao.tools.fleet_common import connect as _connect
from hexiao.tools.fleet_common import db_options as _db
from hexiao.tools.fleet_common import query as _query
from hexiao.tools.fleet_config import config_group
from hexiao.tools.fleet_rollout import rollout_group
from hexiao.tools.support import ctl


@click.group(context_settings=CTX)
def main() -> None:
    """Headquarters: the fleet's stores and lanes, remote diagnostics, the bench."""


@main.command("stores", context_settings=CTX)
@click.option("--merchant", default=None, help="Only this merchant's stores.")
@click.option("--franchisee", default=None, help="Only this franchisee's stores.")
@click.option("--state", type=click.Choice(["online", "offline", "unknown"]), default=None,
              help="Only stores in this state.")
@_db
def stores_cmd(merchant: str | None, franchisee: str | None, state: str | None, dsn: str,
               as_json: bool) -> None:
    """Stores headquarters knows: online or not, since when, lanes open."""
    from hexiao.fleetd import remote

    ctl.run(_query(dsn, lambda c: remote.stores(c, merchant, state, franchisee)), as_json)


@main.command("lanes", context_settings=CTX)
@click.option("--store", default=None, help="Only this store's lanes.")
@click.option("--merchant", default=None, help="Only this merchant's lanes.")
@click.option("--link", type=click.Choice(["open", "connecting", "waiting"]), default=None,
              help="Only lanes whose link is in this state.")
@_db
def lanes_cmd(store: str | None, merchant: str | None, link: str | None, dsn: str,
              as_json: bool) -> None:
    """Lanes as their latest health records say: device, link, firmware, down since."""
    from hexiao.fleetd import remote

    ctl.run(_query(dsn, lambda c: remote.lanes(c, store, merchant, link)), as_json)


# -- remote diagnostics ---------------------------------------------------------------------------


def _remote(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--prefix", default="", envvar="HEXIAO_FLEET_PREFIX",
                     help="topic prefix before hexiao/ (a shared broker)")(f)
    f = click.option("--timeout", type=click.FloatRange(0.1, 600), default=5.0,
                     show_default=True, help="Seconds to wait for the store's answer.")(f)
    f = click.option("--operator", default=None,
                     help="Who asks, as logged at headquarters [default: your login name].")(f)
    f = click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="HEXIAO_HQ_KEY", required=True,
                     help="headquarters' Ed25519 key (0600; `hexiao keys generate`) "
                          "[$HEXIAO_HQ_KEY]")(f)
    f = click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
                     envvar="HEXIAO_FLEET_BROKER", help="the fleet's MQTT broker")(f)
    f = _db(f)
    return click.option("--store", required=True, help="The store to ask.")(f)


def _ask(cmd: str, store: str, args: dict[str, Any], dsn: str, broker: str, key_file: Path,
         operator: str | None, timeout: float, prefix: str) -> Callable[[], Any]:
    def call() -> Any:
        from hexiao.fleetd import remote
        from hexiao.tools.install import keys

        try:
            key = keys.load_private_key(key_file)
        except keys.KeyFileError as e:
            raise ControlError("key", str(e)) from None
        asker = remote.Asker(key, keys.fingerprint(key.public_key()),
                             operator or getpass.getuser())
        with _connect(dsn) as conn:
            try:
                return remote.ask(conn, broker, asker, store, cmd, args, timeout=timeout,
                                  prefix=prefix)
            except remote.RemoteFailure as e:
                raise ControlError(e.kind, e.message) from None
            except psycopg.errors.UndefinedTable:
                raise ControlError("db", f"database {dsn} lacks fleetd's latest tables: run "
                                         "`hexiao-fleetd migrate --dsn ...`") from None
            except psycopg.Error as e:
                raise ControlError("db", f"database {dsn}: {str(e).strip().splitlines()[0]} "
                                         "(the request was not sent)") from None
    return call


@main.command("status", context_settings=CTX)
@_remote
def status_cmd(store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
               operator: str | None, timeout: float, prefix: str) -> None:
    """A store's hostd state, as `hexiao status` shows it there."""
    ctl.run(_ask("status", store, {}, dsn, broker, key_file, operator, timeout, prefix),
            as_json, kind="status")


@main.group("device", context_settings=CTX)
def device_group() -> None:
    """Ask a device of a store's lane: health, logs, ping."""


def _lane(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--lane", required=True, help="The lane (or device id) at the store.")(
        _remote(f))


@device_group.command("list", context_settings=CTX)
@_remote
def list_cmd(store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
             operator: str | None, timeout: float, prefix: str) -> None:
    """The store's devices, connected or not, as `hexiao device list` shows them there."""
    ctl.run(_ask("device.list", store, {}, dsn, broker, key_file, operator, timeout, prefix),
            as_json, kind="device.list")


@device_group.command("info", context_settings=CTX)
@_lane
def info_cmd(lane: str, store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
             operator: str | None, timeout: float, prefix: str) -> None:
    """A device's identity, firmware and link state."""
    ctl.run(_ask("device.info", store, {"lane": lane}, dsn, broker, key_file, operator,
                 timeout, prefix), as_json, kind="device.info", device=lane)


@device_group.command("health", context_settings=CTX)
@_lane
def health_cmd(lane: str, store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
               operator: str | None, timeout: float, prefix: str) -> None:
    """A device's uptime, reset cause, heap and link counters."""
    ctl.run(_ask("device.health", store, {"lane": lane}, dsn, broker, key_file, operator,
                 timeout, prefix), as_json, kind="device.health", device=lane)


@device_group.command("logs", context_settings=CTX)
@_lane
@click.option("--since", type=click.IntRange(0, 2**32 - 1), default=None,
              help="First log sequence number to fetch.")
@click.option("--max", "max_", type=click.IntRange(1, 12), default=None,
              help="At most this many entries.")
def logs_cmd(lane: str, store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
             operator: str | None, timeout: float, prefix: str, since: int | None,
             max_: int | None) -> None:
    """A device's recent log entries."""
    args: dict[str, Any] = {"lane": lane}
    if since is not None:
        args["since"] = since
    if max_ is not None:
        args["max"] = max_
    ctl.run(_ask("device.logs", store, args, dsn, broker, key_file, operator, timeout, prefix),
            as_json, kind="device.logs", device=lane)


@device_group.command("ping", context_settings=CTX)
@_lane
def ping_cmd(lane: str, store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
             operator: str | None, timeout: float, prefix: str) -> None:
    """Ping a device over its link, from its store's hostd."""
    ctl.run(_ask("device.ping", store, {"lane": lane}, dsn, broker, key_file, operator,
                 timeout, prefix), as_json, kind="device.ping", device=lane)


@device_group.command("capture", context_settings=CTX)
@_lane
@click.option("--seconds", type=click.FloatRange(0.1, CAPTURE_MAX_S), default=5.0,
              show_default=True, help="How long the store records the link.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the capture file here (0600, never overwritten) for `hexiao decode`; "
                   "without it the capture is decoded and printed (frames' structure only).")
def capture_cmd(lane: str, store: str, dsn: str, as_json: bool, broker: str, key_file: Path,
                operator: str | None, timeout: float, prefix: str, seconds: float,
                out: Path | None) -> None:
    """Record a device's raw link traffic at its store for --seconds (at most 30 s and 256 KiB:
    it comes back in one answer) and write it, or decode it; `hexiao capture` at the store
    records longer. --timeout is added to --seconds."""
    import base64

    fd = None
    if out is not None:  # before asking: a capture is never taken to be thrown away
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            why = "exists: captures never overwrite a file" if isinstance(
                e, FileExistsError) else f"cannot be created: {e.strerror}"
            ctl.run(lambda: _fail(ControlError("bad_request", f"{out} {why}")), as_json)
    ask = _ask("device.capture", store, {"lane": lane, "ms": round(seconds * 1000)}, dsn, broker,
               key_file, operator, timeout, prefix)

    def call() -> Any:
        result = ask()
        if fd is None:
            return result
        data = base64.b64decode(result.pop("capture"))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return {"device": result.pop("device"), "path": str(out.resolve()), **result}

    try:
        result = ctl.run(call, as_json, show=as_json or fd is not None)
    except SystemExit:
        if fd is not None and out is not None:  # nothing came: no empty file left behind
            with contextlib.suppress(OSError):
                os.close(fd)
            out.unlink(missing_ok=True)
        raise
    if fd is not None and not as_json:
        click.echo(f"read it with: hexiao decode {result['path']} --keystore KEYSTORE", err=True)
    elif fd is None and not as_json:
        _decode(base64.b64decode(result["capture"]))


def _decode(data: bytes) -> None:
    """`hexiao decode` of a capture that was not kept (no keys here: structure only)."""
    import tempfile

    from hexiao.tools.support import decode

    with tempfile.TemporaryDirectory(prefix="hexiao-capture-") as folder:
        path = os.path.join(folder, "remote.hxcap")
        Path(path).write_bytes(data)
        click.get_current_context().invoke(decode.main, file=path, keystore=None, key=None,
                                           kid=None, aad="", as_json=False, show_codes=False,
                                           summary_only=False)
    click.echo("keep it with --out FILE (then `hexiao decode FILE --keystore KEYSTORE`)",
               err=True)


def _fail(e: Exception) -> Any:
    raise e


def _add_bench() -> None:
    from hexiao.tools.bench import fleet as bench

    main.add_command(bench.main.commands["bench"])


_add_bench()
main.add_command(config_group)  # fleet config diff|apply|status (desired state)
main.add_command(rollout_group)  # fleet rollout start|status|pause|resume|abort
