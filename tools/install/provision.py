"""`hexiao provision`: give a device its key and lane, record the key on the host, self-test.

    hexiao provision (--sim-dir DIR | --port PORT) --id DEVICE_ID --lane LANE --keystore FILE
                     [--fw-pubkey KEY.pub] [--production] [--config hostd.toml] [--force]
                     [--check] [--json]

Steps: generate a 32-byte key -> write `/config.json` ({"id", "key", "lane"}, the file the
firmware's cfg= reads) to the device as `/config.json.new` -> record the key in the host
keystore (0600) -> rename it to `/config.json` -> the firmware-signing public key (--fw-pubkey,
`hexiao keys generate`'s KEY.pub) as the state file fw_key (64 hex digits: what the device
checks an update over the link against; without it every update is refused) -> with
--production, last, the state file `production`: the firmware turns its REPL off at boot, so
its files change only through signed updates, and `hexiao flash` refuses it (a production
device needs a firmware key: --fw-pubkey, or one it already has) -> self-test -> checklist.
State files live at a board's root, in the sim board's `state/` folder. The key is never
printed. A device that already has /config.json (or an id that already has a key) is refused
unless --force, which replaces the key on both sides. --check runs only the self-test of a
provisioned device (nothing written). hostd's config is not edited: the `[[device]]` entry to
add is printed (a TOML file edited without a TOML writer would lose its comments).

The sim board (--sim-dir, the folder `hexiao flash --sim-dir` installs into) runs its firmware
(hexiao.firmware.main) under MicroPython on a pty for the self-test, with a test scan written to
its scanner and the host's answer shown by its buzzer and LED. The self-test lives in
selftest.py; the device and the checklist both use, in device.py.

Exit codes:
  0  provisioned (or --check), every required check passed
  1  a required self-test check failed (what was written stays written: fix and run --check)
  2  usage error
  3  already provisioned: nothing written (re-run with --force to replace the key)
  4  cannot provision: nothing written (no board, no firmware, bad keystore/config/id/lane)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from hexiao.hostd.config import ConfigError, kid_bytes
from hexiao.hostd.config import load as load_config
from hexiao.hostd.keystore import KEY_LEN, KID_MAX, Keystore, KeystoreError
from hexiao.tools.install import keys
from hexiao.tools.install.device import CONFIG_PATH, Board, Check, Report
from hexiao.tools.install.errors import InstallError
from hexiao.tools.install.flash import PRODUCTION, state_path
from hexiao.tools.install.selftest import SIM_MODULE, TEST_CODE, self_test

EXIT_FAILED, EXIT_PROVISIONED, EXIT_REFUSED = 1, 3, 4


def refused(exit_code: int, message: str) -> InstallError:
    """A refusal of provision's: exit_code is EXIT_PROVISIONED or EXIT_REFUSED."""
    return InstallError(message, exit_code)


def _sim_firmware(root: Path) -> Path | None:
    base = root / "hexiao" / "firmware"
    return next((p for p in (base / "main.mpy", base / "main.py") if p.is_file()), None)


def _check_id(device_id: str, lane: str) -> bytes:
    kid = kid_bytes(device_id)
    if device_id.startswith("hex:") or not kid or len(kid) > KID_MAX:
        raise refused(EXIT_REFUSED, f"--id {device_id!r}: a device id is 1..{KID_MAX} bytes of "
                                    f'text, e.g. "hx-0001" (the firmware sends it as text)')
    if not re.fullmatch(r"[\w.-]{1,32}", lane):
        raise refused(EXIT_REFUSED, f"--lane {lane!r}: a lane name is 1..32 letters, digits, "
                                    f"_ . or -")
    return kid


def provision(board: Board, device_id: str, lane: str, keystore: Path, force: bool,
              fw_key: bytes | None = None, production: bool = False) -> str:
    """Write a new key to the device and the keystore, then the firmware key (fw_key: a raw
    Ed25519 public key) and the production flag if given; returns what was done (no key)."""
    if production and fw_key is None and board.target.read_file(
            state_path(board.target, "fw_key")) is None:
        raise refused(EXIT_REFUSED, "--production needs --fw-pubkey KEY.pub: a production "
                                    "device changes only through signed updates, checked "
                                    "against that key")
    kid = _check_id(device_id, lane)
    try:
        ks = Keystore(keystore, create=True)
    except KeystoreError as e:
        raise refused(EXIT_REFUSED, str(e)) from None
    old = board.read_config()
    how = ("re-run with --force to re-provision: a new key replaces the old one on the device "
           "and in the keystore (restart hostd afterwards)")
    if old is not None and not force:
        what = (f"id {old.get('id')!r}, lane {old.get('lane')!r}" if old
                else "its config.json is unreadable")
        raise refused(EXIT_PROVISIONED, f"the device is already provisioned ({what}); {how}")
    if kid in ks and old is None and not force:
        raise refused(EXIT_PROVISIONED, f"device id {device_id!r} already has a key in "
                                        f"{keystore} (another device with this id?); {how}")
    key = os.urandom(KEY_LEN)
    board.stage(json.dumps({"id": device_id, "key": key.hex(), "lane": lane}).encode())
    try:
        ks.add(kid, key, replace=True)
    except (KeystoreError, ValueError, OSError) as e:
        board.discard()
        raise refused(EXIT_REFUSED, f"cannot record the key in {keystore}: {e}") from None
    board.commit()
    if fw_key is not None:
        _write_state(board, "fw_key", fw_key.hex().encode())
    if production:
        _write_state(board, PRODUCTION, b"1\n")
    return "re-provisioned (new key)" if old is not None or force else "provisioned"


def _write_state(board: Board, name: str, data: bytes) -> None:
    # whole, then renamed over (a power cut leaves the old file or the new one)
    path = state_path(board.target, name)
    if board.sim_dir:
        (board.sim_dir / "state").mkdir(mode=0o700, exist_ok=True)  # as `hexiao sim board`
    board.target.write_file(path + ".new", data)
    board.target.rename(path + ".new", path)


def _fw_key(path: Path | None) -> bytes | None:
    # the raw 32 bytes of a KEY.pub, read before anything is written
    if path is None:
        return None
    try:
        pub = keys.load_public_key(path)
    except keys.KeyFileError as e:
        raise refused(EXIT_REFUSED, f"--fw-pubkey: {e}") from None
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- the self-test ------------------------------------------------------------------------------
# -- hostd's config -----------------------------------------------------------------------------


def _snippet(device_id: str, lane: str, board: Board) -> str:
    if board.sim_dir:
        where = (f"port = {json.dumps(str(board.sim_dir / 'tty'))}  # while `hexiao sim board "
                 f"--dir {board.sim_dir}` runs it")
    else:
        where = f"port = {json.dumps(board.port)}"
        with contextlib.suppress(Exception):
            from serial.tools import list_ports
            serial = next((p.serial_number for p in list_ports.comports()
                           if p.device == board.port and p.serial_number), None)
            if serial:  # survives replug and re-enumeration
                where = f"match = {{ serial = {json.dumps(serial)} }}"
    return f'[[device]]\nid = {json.dumps(device_id)}\n{where}\nlane = {json.dumps(lane)}\n'


def _hostd(config: Path | None, device_id: str, lane: str, keystore: Path | None,
           report: Report) -> tuple[Path, bool]:
    """The keystore to write, and whether hostd's config already lists the device."""
    if config is None:
        if keystore is None:
            raise click.UsageError("give --keystore FILE (or --config with hostd's keystore)")
        return keystore, False
    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise refused(EXIT_REFUSED, "\n".join(e.errors)) from None
    if cfg.lane(lane) is None:
        raise refused(EXIT_REFUSED, f"lane {lane!r} is not a [[lane]] in {config} (lanes: "
                                    f"{', '.join(la.name for la in cfg.lanes)})")
    hostd_ks = Path(cfg.keystore.path or "")
    if keystore is not None and keystore.resolve() != hostd_ks.resolve():
        report.notes.append(f"warning: hostd reads its keys from {hostd_ks}, not {keystore}")
    listed = next((d for d in cfg.devices if d.id == device_id), None)
    if listed is not None:
        report.notes.append(f"hostd's config already lists device {device_id!r} "
                            f"(lane {listed.lane!r})")
    return keystore or hostd_ks, listed is not None


# -- the command --------------------------------------------------------------------------------

_MARK = {"pass": "pass", "fail": "FAIL", "n/a": "n/a ", "skipped": "skip"}


def _print(report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"device": report.device, "lane": report.lane,
                               "target": report.target, "ok": report.ok,
                               "checks": [asdict(c) for c in report.checks],
                               "notes": report.notes, "hostd_config": report.hostd_config},
                              ensure_ascii=False, indent=2))
        return
    click.echo(f"device {report.device} on lane {report.lane} ({report.target}):")
    for c in report.checks:
        click.echo(f"  [{_MARK[c.status]}] {c.name}" + (f": {c.detail}" if c.detail else ""))
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.hostd_config:
        click.echo("add this device to hostd's config (hostd.toml), then restart hostd:")
        click.echo(report.hostd_config.rstrip("\n"))
    need = [c for c in report.checks if c.required]
    passed = sum(c.status == "pass" for c in need)
    click.echo(f"{'PASS' if report.ok else 'FAIL'}: {passed} of {len(need)} required checks "
               f"passed" + ("" if report.ok else "; fix the failures and re-run with --check"))


@click.command("provision", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sim-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The sim board's folder (where `hexiao flash --sim-dir` installed it).")
@click.option("--port", help="Serial port of a USB board (e.g. /dev/ttyACM0).")
@click.option("--id", "device_id", required=True, help='The device id, e.g. "hx-0001".')
@click.option("--lane", required=True, help="The lane the device serves (a [[lane]] name).")
@click.option("--keystore", type=click.Path(dir_okay=False, path_type=Path),
              help="The host keystore [default with --config: hostd's].")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="hostd's config: checks the lane, uses its keystore, says what to add.")
@click.option("--fw-pubkey", type=click.Path(dir_okay=False, path_type=Path),
              help="The firmware-signing public key (KEY.pub) the device checks updates with.")
@click.option("--production", is_flag=True,
              help="Turn the device's REPL off: its files then change only by signed updates.")
@click.option("--force", is_flag=True, help="Re-provision: replace the key on both sides.")
@click.option("--check", is_flag=True, help="Only self-test a provisioned device.")
@click.option("--timeout", type=click.FloatRange(0.5, 600), default=10.0, show_default=True,
              help="Seconds to wait for each answer from the device.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def main(sim_dir: Path | None, port: str | None, device_id: str, lane: str,
         keystore: Path | None, config: Path | None, fw_pubkey: Path | None, production: bool,
         force: bool, check: bool, timeout: float, as_json: bool) -> None:
    """Give a device its key and lane, record the key on this host, and self-test it."""
    if (sim_dir is None) == (port is None):
        raise click.UsageError("give exactly one of --sim-dir DIR or --port PORT")
    report = Report(device_id, lane, f"sim board {sim_dir}" if sim_dir else f"port {port}")
    try:
        ks_path, listed = _hostd(config, device_id, lane, keystore, report)
        fw_key = _fw_key(fw_pubkey)
        if sim_dir is not None and _sim_firmware(sim_dir) is None and sim_dir.is_dir():
            raise refused(EXIT_REFUSED, f"no firmware on the sim board ({sim_dir}/hexiao/"
                                        f"firmware/main.mpy is missing): install it first "
                                        f"with `hexiao flash BUNDLE --sim-dir {sim_dir}`")
        try:
            board = Board(sim_dir, port)
        except InstallError as e:  # no such board: flash's code for it, provision's here
            raise refused(EXIT_REFUSED, e.message) from None
        if check:
            cfg = board.read_config()
            if not cfg or cfg.get("id") != device_id:
                raise refused(EXIT_REFUSED, f"the device is not provisioned as {device_id!r} "
                              f"(its id: {(cfg or {}).get('id')!r}); provision it first")
            report.add("device config", "pass", f"{CONFIG_PATH}: id {device_id!r}, "
                       f"lane {cfg.get('lane')!r}")
        else:
            done = provision(board, device_id, lane, ks_path, force, fw_key, production)
            report.add("device key written", "pass", f"{done}: {CONFIG_PATH} with id and lane"
                       + (" (0600)" if sim_dir else ""))
            report.add("key recorded", "pass", f"{ks_path} (0600)")
            if fw_pubkey is not None:
                report.add("firmware key written", "pass", f"fw_key: updates signed by "
                           f"{fw_pubkey} are accepted")
            else:
                report.notes.append("no --fw-pubkey: the device refuses every firmware update "
                                    "until provisioned with one")
            if production:
                report.add("production", "pass", "REPL off from the next boot; `hexiao flash` "
                           "refuses the device; updates only through hostd")
    except InstallError as e:
        if as_json:
            click.echo(json.dumps({"device": device_id, "ok": False, "refused": e.message,
                                   "exit_code": e.exit_code}, ensure_ascii=False))
        click.echo(f"Error: refused: {e.message}", err=True)
        raise SystemExit(e.exit_code) from None
    if not listed:
        report.hostd_config = _snippet(device_id, lane, board)
    self_test(board, device_id, ks_path, report, timeout)
    _print(report, as_json)
    raise SystemExit(0 if report.ok else EXIT_FAILED)



__all__ = ["CONFIG_PATH", "EXIT_FAILED", "EXIT_PROVISIONED", "EXIT_REFUSED",
           "SIM_MODULE", "TEST_CODE", "Board", "Check", "InstallError", "Report", "main",
           "provision", "refused", "self_test"]


if __name__ == "__main__":
    main()
