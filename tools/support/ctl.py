"""The support commands that ask hostd over its control socket.

Commands: status; device list|info|ping|health|logs|update; journal list|show|reconcile;
capture.

They ask hostd over its control socket (--socket PATH, else $HEXIAO_SOCKET, else
/run/hexiao/hostd.sock). `device info|ping|health|logs --keystore FILE [--port PORT]` talk to
a device directly instead, for when hostd is stopped (hostd holds the port exclusively while it
runs); without --port they use the only hexiao board on USB (`hexiao device ports`). --json
prints one JSON document (an array for list commands), as hostd or the device gave it;
otherwise render.py prints it for a person, the same way in both modes. Journal codes arrive
redacted from hostd and are printed as given. Direct mode (DirectDevice) lives in
ctl_direct.py and is re-exported here. Errors are one line, `Error: MESSAGE`, on stderr.

Exit codes:
  0  ok
  1  error (bad request, permission refused, hostd internal error, bad keystore, several
     hexiao boards on USB and no --port)
  2  usage error (click)
  3  hostd is not running
  4  not found (unknown device or journal entry; no hexiao board on USB and no --port)
  5  device unavailable (not connected, port busy, no handshake) or timed out
  6  the device refused a firmware update (`device update`: it keeps its last good firmware;
     the message says why)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from hexiao.hostd.control.client import (
    ControlClient,
    ControlError,
    HostdNotRunning,
    default_socket,
)
from hexiao.hostd.lanes.discovery import hexiao_ports
from hexiao.tools.support import render
from hexiao.tools.support.ctl_direct import LEVELS, DirectDevice
from hexiao.tools.support.render import keyvalue, table

EXIT = {"not_running": 3, "not_found": 4, "unavailable": 5, "timeout": 5, "refused": 6}


def _plain(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def emit(result: Any, as_json: bool, kind: str = "", device: str | None = None) -> None:
    """One command's result: JSON as given, or rendered for a person (render.py)."""
    result = _plain(result)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    colour = render.colour_on()
    click.echo(render.render(kind, result, colour, device), color=colour)


def run(fn: Callable[[], Any], as_json: bool, *, show: bool = True, kind: str = "",
        device: str | None = None) -> Any:
    """Print fn()'s result (unless show=False) and return it, or print its ControlError on
    stderr and exit with the documented code."""
    try:
        result = fn()
    except ControlError as e:
        if as_json:
            click.echo(json.dumps({"error": {"kind": e.kind, "message": e.message}}))
        render.error(e.message)
        raise SystemExit(EXIT.get(e.kind, 1)) from None
    if show:
        emit(result, as_json, kind, device)
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
    """hostd's state: version, devices, journal, backend, the receipt tap."""
    run(_ask(sock, timeout, "status"), as_json, kind="status")


# -- device ---------------------------------------------------------------------------------------


@click.group("device", context_settings=CTX)
def device_main() -> None:
    """Devices: list them, and ask one for its info, a ping, its health or its logs."""


def _direct(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--kid", default=None, help="With --port: accept only this device id "
                                                 "(text, or hex).")(f)
    f = click.option("--keystore", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Talk to the device directly (hostd stopped), with "
                                        "the device key from this host keystore.")(f)
    f = click.option("--port", default=None,
                     help="With --keystore: the device's serial port [default: the only "
                          "hexiao board on USB].")(f)
    return click.argument("device", required=False)(_common(f))


def _device(cmd: str, device: str | None, port: str | None, keystore: Path | None,
            kid: str | None, sock: Path | None, timeout: float, as_json: bool,
            direct: Callable[[Any], Any], **args: Any) -> None:
    if port is None and keystore is None:
        if not device:
            raise click.UsageError("name a DEVICE (see `hexiao device list`), or give "
                                   "--keystore FILE to ask the board directly (hostd stopped)")
        ask = _ask(sock, timeout, cmd, device=device, **args)

        def through_hostd() -> Any:
            try:
                return ask()
            except HostdNotRunning as e:
                raise ControlError(e.kind, f"{e.message}; or ask the board directly: add "
                                            "--keystore FILE [--port PORT]") from None
        run(through_hostd, as_json, kind=cmd, device=device)
        return
    if keystore is None:
        raise click.UsageError("--port needs --keystore FILE (the host keystore)")

    def call() -> Any:
        with DirectDevice(port or only_port(), keystore, kid or device, timeout) as dev:
            return direct(dev)
    run(call, as_json, kind=cmd)


def only_port() -> str:
    """The serial port of the only hexiao board on USB (its udev name when it has one); a
    ControlError that lists them, or says there is none, otherwise."""
    found = hexiao_ports()
    if len(found) == 1:
        return found[0].stable or found[0].device
    if not found:
        raise ControlError("not_found", "no hexiao board on USB (`hexiao device ports` lists "
                                        "them): plug one in, or give --port PORT (a sim "
                                        "board's is DIR/tty)")
    names = ", ".join(f"{p.stable or p.device} ({p.board}, serial {p.serial or '-'})"
                      for p in found)
    raise ControlError("bad_request", f"{len(found)} hexiao boards on USB: {names}; say which "
                                      "with --port PORT")


@device_main.command("list", context_settings=CTX)
@_common
def device_list(sock: Path | None, timeout: float, as_json: bool) -> None:
    """Devices hostd knows, connected or not."""
    run(_ask(sock, timeout, "device.list"), as_json, kind="device.list")


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


@device_main.command("update", context_settings=CTX)
@click.argument("device")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--pubkey", type=click.Path(path_type=Path), default=None,
              help="Check the bundle against this key (KEY.pub) before sending it; the device "
                   "checks it against its own key in any case.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=900.0, show_default=True,
              help="Seconds for the whole update (transfer, restart, the device's checks).")
@click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="hostd's control socket [default: $HEXIAO_SOCKET or "
                                 f"{default_socket()}]")
def device_update(device: str, bundle_path: Path, pubkey: Path | None, as_json: bool,
                  timeout: float, sock: Path | None) -> None:
    """Install a signed firmware bundle on a device through hostd and the device's link; the
    device checks the signature, its files and the counter itself, runs it on trial and keeps
    its last good firmware if anything is wrong. Re-run after an interruption: it resumes."""
    import tempfile

    from hexiao.tools.install import bundle
    from hexiao.tools.install.errors import InstallError

    problem = None
    try:
        offer, img = bundle.offer_of(bundle_path, pubkey)
    except InstallError as e:
        problem = f"{e.kind}: {e.message}"
    if problem is not None:
        run(lambda: _raise(ControlError("bad_request", problem)), as_json)
        return
    with tempfile.NamedTemporaryFile(prefix="hexiao-fw-", suffix=".img") as f:
        f.write(img)
        f.flush()
        os.chmod(f.name, 0o644)  # hostd reads it as its own user; an image is public
        run(_ask(sock, timeout, "device.update", device=device, image=f.name,
                 digest=offer["digest"].hex(), size=offer["size"],
                 manifest_size=offer["manifest_size"], signature=offer["signature"].hex(),
                 board=offer["board"], version=offer["version"], counter=offer["counter"]),
            as_json, kind="device.update", device=device)


def _raise(e: Exception) -> Any:
    raise e


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
    ask = _ask(sock, timeout, "journal.list", state=list(states) or None, limit=limit)
    run(lambda: newest_first(ask()), as_json, kind="journal.list")


def newest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Journal rows by id, newest first, a missing reason always null ("-" in the table):
    hostd lists them oldest first, and older journals hold "" for a cleared reason."""
    rows = sorted(rows, key=lambda r: r.get("id") or 0, reverse=True)
    return [{**r, "reason": r.get("reason") or None} if "reason" in r else r for r in rows]


@journal_main.command("show", context_settings=CTX)
@click.argument("entry_id", type=click.IntRange(0, 2**32 - 1))
@_common
def journal_show(entry_id: int, sock: Path | None, timeout: float, as_json: bool) -> None:
    """One journal entry and its steps."""
    run(_ask(sock, timeout, "journal.show", entry_id=entry_id), as_json, kind="journal.show")


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
    frames' structure only (CRC, COBS, COSE headers).

    The capture lasts as long as this command: hostd stops it when the command ends, however
    (Ctrl-C, kill, a dropped SSH session). It also stops at its size cap (64 MiB unless hostd
    is told otherwise); the file's header and the stop's answer then say so."""
    path = str(out.resolve())
    # one connection from start to stop: hostd ends the capture when it closes, so a capture
    # never outlives this process (killed, or its SSH session gone)
    with ControlClient(sock, timeout=timeout) as client:
        # with --json one document: the stop's result
        run(lambda: client.call("capture.start", device=device, path=path), as_json,
            show=not as_json)
        try:
            if client.wait_closed(seconds):
                run(_ended(path), as_json)
        except KeyboardInterrupt:
            pass
        run(lambda: client.call("capture.stop", device=device), as_json)
    if not as_json:
        click.echo(f"read it with: hexiao decode {path} --keystore KEYSTORE", err=True)


def _ended(path: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise ControlError("internal", f"hostd closed the connection, which ends the capture "
                                       f"(hostd stopped?); what it recorded is in {path}")
    return fail


def _add_ports() -> None:
    from hexiao.tools.support.ports import ports

    device_main.add_command(ports)


_add_ports()

__all__ = ["EXIT", "LEVELS", "DirectDevice", "capture_main", "device_main", "emit", "journal_main",
           "keyvalue", "run", "status_main", "table"]
