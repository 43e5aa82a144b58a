"""The support commands that ask hostd over its control socket.

Commands: status; device list|info|ping|health|logs; journal list|show|reconcile; capture.

They ask hostd over its control socket (--socket PATH, else $HEXIAO_SOCKET, else
/run/hexiao/hostd.sock). `device info|ping|health|logs --port PORT --keystore FILE` talk to a
device directly instead, for when hostd is stopped (hostd holds the port exclusively while it
runs). --json prints one JSON document (an array for list commands); otherwise tables for lists
and "key: value" for objects. Journal codes arrive redacted from hostd and are printed as given.
Direct mode (DirectDevice) lives in ctl_direct.py and is re-exported here.

Exit codes:
  0  ok
  1  error (bad request, permission refused, hostd internal error, bad keystore)
  2  usage error (click)
  3  hostd is not running
  4  not found (unknown device or journal entry)
  5  device unavailable (not connected, port busy, no handshake) or timed out
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from hexiao.hostd.control.client import ControlClient, ControlError, default_socket
from hexiao.tools.support.ctl_direct import LEVELS, DirectDevice

EXIT = {"not_running": 3, "not_found": 4, "unavailable": 5, "timeout": 5}


def _plain(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns, in the order the keys first appear."""
    if not rows:
        return "(none)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [[c.upper() for c in cols], *cells]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def keyvalue(obj: dict[str, Any], indent: str = "") -> str:
    out = []
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.append(f"{indent}{k}:")
            out.append(keyvalue(v, indent + "  "))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{indent}{k}:")
            out.append("\n".join(indent + "  " + ln for ln in table(v).splitlines()))
        else:
            out.append(f"{indent}{k}: {_cell(v)}")
    return "\n".join(out)


def emit(result: Any, as_json: bool) -> None:
    result = _plain(result)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))
    elif isinstance(result, list):
        click.echo(table(result))
    elif isinstance(result, dict):
        click.echo(keyvalue(result))
    else:
        click.echo(_cell(result))


def run(fn: Callable[[], Any], as_json: bool, *, show: bool = True) -> Any:
    """Print fn()'s result (unless show=False) and return it, or print its ControlError on
    stderr and exit with the documented code."""
    try:
        result = fn()
    except ControlError as e:
        if as_json:
            click.echo(json.dumps({"error": {"kind": e.kind, "message": e.message}}))
        click.echo(f"error: {e.message}", err=True)
        raise SystemExit(EXIT.get(e.kind, 1)) from None
    if show:
        emit(result, as_json)
    return result


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)
    f = click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0,
                     show_default=True, help="Seconds to wait for an answer.")(f)
    return click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help=f"hostd's control socket [default: $HEXIAO_SOCKET "
                                           f"or {default_socket()}]")(f)


def _ask(sock: Path | None, timeout: float, cmd: str, **args: Any) -> Callable[[], Any]:
    def call() -> Any:
        with ControlClient(sock, timeout=timeout) as c:
            return c.call(cmd, **args)
    return call


CTX = {"help_option_names": ["-h", "--help"]}


@click.command("status", context_settings=CTX)
@_common
def status_main(sock: Path | None, timeout: float, as_json: bool) -> None:
    """hostd's state: version, devices, journal, backend."""
    run(_ask(sock, timeout, "status"), as_json)


# -- device ---------------------------------------------------------------------------------------


@click.group("device", context_settings=CTX)
def device_main() -> None:
    """Devices: list them, and ask one for its info, a ping, its health or its logs."""


def _direct(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--kid", default=None, help="With --port: accept only this device id "
                                                 "(text, or hex).")(f)
    f = click.option("--keystore", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="With --port: the host keystore with the device key.")(f)
    f = click.option("--port", default=None,
                     help="Talk to the device on this serial port, not through hostd.")(f)
    return click.argument("device", required=False)(_common(f))


def _device(cmd: str, device: str | None, port: str | None, keystore: Path | None,
            kid: str | None, sock: Path | None, timeout: float, as_json: bool,
            direct: Callable[[Any], Any], **args: Any) -> None:
    if port is None:
        if not device:
            raise click.UsageError("name a DEVICE (see `hexiao device list`), or give --port")
        run(_ask(sock, timeout, cmd, device=device, **args), as_json)
        return
    if keystore is None:
        raise click.UsageError("--port needs --keystore FILE (the host keystore)")
    def call() -> Any:
        with DirectDevice(port, keystore, kid, timeout) as dev:
            return direct(dev)
    run(call, as_json)


@device_main.command("list", context_settings=CTX)
@_common
def device_list(sock: Path | None, timeout: float, as_json: bool) -> None:
    """Devices hostd knows, connected or not."""
    run(_ask(sock, timeout, "device.list"), as_json)


@device_main.command("info", context_settings=CTX)
@_direct
def device_info(device: str | None, port: str | None, keystore: Path | None, kid: str | None,
                sock: Path | None, timeout: float, as_json: bool) -> None:
    """A device's identity, firmware and link state."""
    _device("device.info", device, port, keystore, kid, sock, timeout, as_json,
            lambda d: d.info())


@device_main.command("ping", context_settings=CTX)
@_direct
def device_ping(device: str | None, port: str | None, keystore: Path | None, kid: str | None,
                sock: Path | None, timeout: float, as_json: bool) -> None:
    """Ping a device over its link (round trip through the device's firmware)."""
    _device("device.ping", device, port, keystore, kid, sock, timeout, as_json,
            lambda d: d.ping(os.urandom(8)))


@device_main.command("health", context_settings=CTX)
@_direct
def device_health(device: str | None, port: str | None, keystore: Path | None, kid: str | None,
                  sock: Path | None, timeout: float, as_json: bool) -> None:
    """A device's uptime, reset cause, heap and link counters."""
    _device("device.health", device, port, keystore, kid, sock, timeout, as_json,
            lambda d: d.health())


@device_main.command("logs", context_settings=CTX)
@_direct
@click.option("--since", type=click.IntRange(0, 2**32 - 1), default=None,
              help="First log sequence number to fetch.")
@click.option("--max", "max_", type=click.IntRange(1, 12), default=None,
              help="At most this many entries.")
def device_logs(device: str | None, port: str | None, keystore: Path | None, kid: str | None,
                sock: Path | None, timeout: float, as_json: bool, since: int | None,
                max_: int | None) -> None:
    """A device's recent log entries."""
    _device("device.logs", device, port, keystore, kid, sock, timeout, as_json,
            lambda d: d.logs(since, max_), since=since, max=max_)


# -- journal --------------------------------------------------------------------------------------


@click.group("journal", context_settings=CTX)
def journal_main() -> None:
    """The redemption journal: list entries, show one, reconcile unfinished ones."""


@journal_main.command("list", context_settings=CTX)
@click.option("--state", "states", multiple=True, help="Only entries in this state (repeatable).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@_common
def journal_list(states: tuple[str, ...], limit: int, sock: Path | None, timeout: float,
                 as_json: bool) -> None:
    """Recent journal entries, newest first."""
    run(_ask(sock, timeout, "journal.list", state=list(states) or None, limit=limit), as_json)


@journal_main.command("show", context_settings=CTX)
@click.argument("entry_id", type=click.IntRange(0, 2**32 - 1))
@_common
def journal_show(entry_id: int, sock: Path | None, timeout: float, as_json: bool) -> None:
    """One journal entry and its steps."""
    run(_ask(sock, timeout, "journal.show", entry_id=entry_id), as_json)


@journal_main.command("reconcile", context_settings=CTX)
@_common
def journal_reconcile(sock: Path | None, timeout: float, as_json: bool) -> None:
    """Reconcile unfinished entries with the backend now (queries, never a second consume)."""
    run(_ask(sock, timeout, "journal.reconcile"), as_json)



# -- capture --------------------------------------------------------------------------------------

@click.command("capture", context_settings=CTX)
@click.argument("device")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the capture file to create (hostd writes it, 0600, as its own user)")
@click.option("--seconds", type=click.FloatRange(0.1), default=None,
              help="stop after this long [default: until Ctrl-C]")
@_common
def capture_main(device: str, out: Path, seconds: float | None, sock: Path | None,
                 timeout: float, as_json: bool) -> None:
    """Record DEVICE's raw link traffic through hostd; read it with `hexiao decode FILE`.

    Frames are verified and decoded from the session's handshake on: start the capture before
    the device connects (or replug it) to read everything; otherwise the decoder checks the
    frames' structure only (CRC, COBS, COSE headers)."""
    path = str(out.resolve())
    # with --json one document: the stop's result
    run(_ask(sock, timeout, "capture.start", device=device, path=path), as_json,
        show=not as_json)
    try:
        if seconds is None:
            while True:
                time.sleep(3600)
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass
    run(_ask(sock, timeout, "capture.stop", device=device), as_json)
    if not as_json:
        click.echo(f"read it with: hexiao decode {path} --keystore KEYSTORE", err=True)


__all__ = ["EXIT", "LEVELS", "DirectDevice", "capture_main", "device_main", "emit", "journal_main",
           "keyvalue", "run", "status_main", "table"]
