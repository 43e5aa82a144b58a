# The firmware's entry point on a board (rp2040, esp32s3). `hexiao bundle build` puts a root
# main.py on the board's flash that runs main("<board>"); MicroPython runs it at every boot.
#
# Order: the install check (install_check, dropped after) -> the board's HAL (starts the 8 s
# watchdog) -> the crash record (safe.boot): safe mode runs safe.run and never the application
# -> the provisioned key from /config.json (`hexiao provision`; none: safe mode, products only)
# -> the application. An exception escaping any of it is recorded (safe.crashed) and the board
# resets (machine.reset): LIMIT of them in a row and the next boot is in safe mode (safe.py).
# A refused installation returns to the REPL: the installer flashes it again over the CDC.

import gc

if hasattr(gc, "threshold"):  # see main.py: keeps the heap unfragmented
    gc.threshold(2048)
import sys

import machine
from hexiao.firmware import drop

PLATFORMS = {"rp2": "rp2040", "esp32": "esp32s3"}  # sys.platform -> the boards built for it
PKG = "hexiao.firmware."


def main(name):
    if PLATFORMS.get(sys.platform, name) != name:  # a bundle for another board copied on
        sys.stderr.write("refused: built for board %s, this is %s\n" % (name, sys.platform))
        return
    from hexiao.firmware.install_check import refused

    why = refused("", name)
    refused = None
    drop("install_check")
    if why:
        sys.stderr.write("refused: %s\n" % why)
        return  # to the REPL: nothing of this firmware runs
    board = None
    try:
        __import__(PKG + "hal_" + name)
        board = sys.modules[PKG + "hal_" + name].Board()
        start(board)
    except Exception as e:  # any of them is a crash
        crashed(board, e)
    machine.reset()  # after a crash; or an application that ended (it never does on a board)


def start(board):
    from hexiao.firmware import safe

    count, why = safe.boot("", board.reset)
    try:
        with open("config.json") as f:
            from json import load

            cfg = load(f)
    except OSError:
        cfg = None
        why = why or "not provisioned (no config.json)"
    if why:
        import micropython

        micropython.kbd_intr(3)  # no link in safe mode: Ctrl-C lets an installer in
        safe.run(board, why)
        return
    safe = None
    drop("safe")
    from binascii import unhexlify

    kid, key = cfg["id"].encode(), unhexlify(cfg["key"])
    cfg = None
    gc.collect()
    if count:  # crashes in a row so far: a run of safe.STABLE_MS clears them
        from time import ticks_diff, ticks_ms

        t0, idle, left = ticks_ms(), board.idle, ["crash"]

        def stable():
            if left and ticks_diff(ticks_ms(), t0) >= 60000:  # safe.STABLE_MS
                import os

                try:  # noqa: SIM105 - no contextlib on the device
                    os.remove(left.pop())
                except OSError:
                    pass
            idle()

        board.idle = stable
    from hexiao.firmware.app import App

    gc.collect()
    App(board, kid, key, {"rto_ms": 200, "max_tries": 8, "queue_max": 4}).run()


def crashed(board, e):
    gc.collect()
    from hexiao.firmware import safe

    n, why = safe.crashed("", e)
    if board is not None:
        board.note(0, 2, "crash %d: %s" % (n, why))
    else:
        sys.stderr.write("crash %d: %s\n" % (n, why))
