"""`hexiao sim board`: run a flashed, provisioned sim board as a device hostd can use.

The sim board's filesystem is a folder (what `hexiao flash --sim-dir` and `hexiao provision
--sim-dir` write): the firmware under `hexiao/`, the device key in `config.json`. This command
runs that firmware (not the checkout's) under the real MicroPython, with its USB CDC link on a
pty whose host end is linked at `<dir>/tty` (the `port` to give hostd), its scanner at the FIFO
`<dir>/scanner` (write `]Q1287463512093\\r\\n` to scan a coupon, `]E05901234123457\\r\\n` a
product), its HID keyboard output in `<dir>/hid.log` (`HID <modifiers> <keycode>` lines, what the
POS would receive), and its buzzer/LED/verdict events as JSON lines in `<dir>/events.log`.

When the firmware resets (exit status 6: a firmware update to install, or the one installed on
trial), the board is started again, as a real board resets, on a new pty that `<dir>/tty` then
names (a board re-enumerates on USB; hostd reopens its port). Before each start, a switch cut
between its renames is recovered as a board's root main.py does (recover_switch).

One board runs per folder (a lock in `<dir>/.board.lock`): a second one would share the scanner
FIFO and swallow scans. Ctrl-C stops it within a few seconds (the firmware sees its scanner and
link hang up, and is killed if it does not end by itself).

Exit status: 0 stopped (Ctrl-C / SIGTERM); 1 the firmware exited by itself, other than to reset
(its last lines are printed); 3 the board cannot be run (not flashed, not provisioned,
MicroPython missing, another board running from the same folder).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import click
from hexiao.hostd.instance import InstanceError, PidLock
from hexiao.tools import micropython
from hexiao.tools.sim import relay

FIRMWARE = "hexiao.firmware.main"
STOP_GRACE_S = 3.0  # then the firmware is killed: a board that ignores the hang-up is stuck
RESET = 6  # the firmware's exit status for a reset it asked for (an update: fw_update.reset)


class Unrunnable(click.ClickException):
    exit_code = 3


def _fifo(path: Path) -> int:
    if path.exists() and not path.is_fifo():
        path.unlink()
    if not path.exists():
        os.mkfifo(path, 0o600)
    # held open for writing by us too: a scan written with `echo > scanner` and closed is not
    # the end of the scanner's input for the firmware
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


@click.command("board", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "board_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="the sim board's filesystem (flashed and provisioned)")
@click.option("--heap", default=micropython.HEAP, show_default=True,
              help="MicroPython heap (the device budget)")
@click.option("--json", "as_json", is_flag=True, help="print the board's paths as JSON")
def board(board_dir: Path, heap: str, as_json: bool) -> None:
    """Run the sim board in DIR until Ctrl-C: link at DIR/tty, scanner FIFO DIR/scanner."""
    board_dir = board_dir.resolve()
    if not (board_dir / "hexiao" / "firmware" / "main.mpy").exists():
        raise Unrunnable(f"{board_dir} has no firmware: run `hexiao flash BUNDLE "
                                   f"--pubkey KEY.pub --sim-dir {board_dir}` first")
    if not (board_dir / "config.json").exists():
        raise Unrunnable(f"{board_dir} is not provisioned: run `hexiao provision "
                                   f"--sim-dir {board_dir} --id ID --lane LANE` first")
    try:
        mpy = micropython.executable("micropython")
    except FileNotFoundError as e:
        raise Unrunnable(str(e)) from e
    lock = PidLock(board_dir / ".board.lock", f"a sim board{{who}} is already running from "
                   f"{board_dir}; stop it first (Ctrl-C in its terminal)")
    try:
        lock.acquire()
    except InstanceError as e:
        raise Unrunnable(str(e)) from e
    scanner, hid, tty = board_dir / "scanner", board_dir / "hid.log", board_dir / "tty"
    state = board_dir / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    hold = _fifo(scanner)
    argv = [mpy, "-X", f"heapsize={heap}", "-m", FIRMWARE, f"cfg={board_dir / 'config.json'}",
            f"scanner={scanner}", f"hid={hid}", f"state={state}"]
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # before the firmware starts: a signal between its start and here would end this process
    # and leave the firmware waiting for its scanner FIFO's writer forever
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cable, device = _power_on(board_dir, argv, tty)
    info = {"port": str(tty), "scanner": str(scanner), "hid": str(hid),
            "events": str(board_dir / "events.log"), "heap": heap}
    click.echo(json.dumps(info) if as_json else
               f"sim board running from {board_dir} (heap {heap}): link {tty}, scanner "
               f"{scanner}, keystrokes {hid}, events {info['events']}; Ctrl-C to stop")
    written = 0
    rc = 0
    try:
        with (board_dir / "events.log").open("a", encoding="utf-8") as log:
            while not stop.wait(0.2):
                for ev in device.events[written:]:
                    log.write(json.dumps(ev, ensure_ascii=False) + "\n")
                written = len(device.events)
                log.flush()
                if device.proc.poll() is None:
                    continue
                device.stop(STOP_GRACE_S)  # its last events are read
                for ev in device.events[written:]:
                    log.write(json.dumps(ev, ensure_ascii=False) + "\n")
                if device.proc.returncode == RESET:  # as a board resets: on a new port
                    cable.close()
                    log.write(json.dumps({"ev": "reset"}) + "\n")
                    log.flush()
                    cable, device = _power_on(board_dir, argv, tty)
                    written = 0
                    continue
                refused = [e["why"] for e in device.events if e.get("ev") == "refused"]
                click.echo("the firmware refused to run: " + refused[0] if refused else
                           "the firmware exited: " + " | ".join(device.other[-6:]), err=True)
                rc = 1
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        cable.close()
        os.close(hold)  # the scanner's end of input: the firmware's loop ends with it
        device.stop(STOP_GRACE_S)
        if tty.is_symlink():
            tty.unlink()
        lock.release()
    if rc == 0:
        click.echo("sim board stopped", err=True)
    raise SystemExit(rc)


def recover_switch(root: Path) -> str | None:
    """What a board's root main.py does before it imports the firmware (bundle.ROOT_MAIN), for
    the sim board, which runs hexiao.firmware.main directly: a switch cut between its two
    renames (fw_update.switch) left no hexiao/; the previous firmware (hexiao.old) is put back,
    or with none, the staged one if it was completely unpacked. fw_update then rolls back (or
    counts a trial boot) and says why. Returns what was renamed, or None."""
    cur = root / "hexiao"
    if cur.exists():
        return None
    for name in ("hexiao.old", "hexiao.new"):
        d = root / name
        if d.is_dir() and (name == "hexiao.old" or (d / "manifest.json").exists()):
            d.rename(cur)
            return name
    return None


def _power_on(root: Path, argv: list[str],
              tty: Path) -> tuple[relay.Cable, relay.DeviceProcess]:
    # the board comes up on a new port (a real board re-enumerates on USB after a reset);
    # <dir>/tty follows it, so hostd, which reopens its port, finds it again
    recover_switch(root)
    cable = relay.Cable().start()
    if tty.is_symlink() or tty.exists():
        tty.unlink()
    tty.symlink_to(cable.host_port)
    # the flashed firmware, by its paths on the board: cwd is the board's root
    device = relay.DeviceProcess(cable, argv, {"MICROPYPATH": ".:.frozen",
                                               "PATH": "/usr/bin:/bin"}, str(root))
    return cable, device
