# The firmware's entry point on a board (rp2040, esp32s3). `hexiao bundle build` puts a root
# main.py on the board's flash that runs main("<board>"); MicroPython runs it at every boot.
#
# The boot sequence is boot.py's, as on the sim board (dropped once the app runs: only main() and
# the crash path stay in the heap): the install check -> the board's HAL (starts the 8 s
# watchdog) -> the crash record: safe mode runs safe.run and never the application -> the
# provisioned key from /config.json (`hexiao provision`; none: safe mode, products only) -> the
# application. An exception escaping any of it is recorded (safe.crashed) and the board resets
# (machine.reset): LIMIT of them in a row and the next boot is in safe mode (safe.py).
# A refused installation returns to the REPL: the installer flashes it again over the CDC.
# Production (`hexiao provision --production` wrote the state file "production"): no REPL at
# all, so the board's files change only through signed updates (fw_update): Ctrl-C is link
# data from the first line on, the REPL's terminal is detached where the port has dupterm, safe
# mode does not let Ctrl-C in, and a refused installation halts saying why instead of
# returning to the REPL (docs/firmware-update.md: what each port still allows).

import gc

if hasattr(gc, "threshold"):  # see main.py: keeps the heap unfragmented
    gc.threshold(2048)
import sys

import machine
from hexiao.firmware import drop

PLATFORMS = {"rp2": "rp2040", "esp32": "esp32s3"}  # sys.platform -> the boards built for it
PKG = "hexiao.firmware."


def main(name):
    from hexiao.firmware import repl_off

    prod = repl_off.production("")  # first: from here on the REPL is unreachable
    if PLATFORMS.get(sys.platform, name) != name:  # a bundle for another board copied on
        repl_off.halt(prod, "refused: built for board %s, this is %s\n" % (name, sys.platform))
        return
    from hexiao.firmware import boot

    why = boot.refused("", name)
    if why:
        repl_off.halt(prod, "refused: %s\n" % why)
        return  # to the REPL: nothing of this firmware runs
    repl_off = None
    drop("repl_off")
    board = None
    try:
        __import__(PKG + "hal_" + name)
        board = sys.modules[PKG + "hal_" + name].Board()
        app, _, why = boot.start(board, "", "config.json", 60000,  # safe.STABLE_MS
                                 {"rto_ms": 200, "max_tries": 8, "queue_max": 4})
        boot = None
        drop("boot")
        if why:
            import micropython

            if not prod:  # no link in safe mode: Ctrl-C lets an installer in
                micropython.kbd_intr(3)
            from hexiao.firmware import safe

            safe.run(board, why)
        else:
            app.run()
    except Exception as e:  # any of them is a crash
        crashed(board, e)
    machine.reset()  # after a crash; or an application that ended (it never does on a board)


def crashed(board, e):
    gc.collect()
    from hexiao.firmware import safe

    n, why = safe.crashed("", e)
    if board is not None:
        board.note(0, 2, "crash %d: %s" % (n, why))
    else:
        sys.stderr.write("crash %d: %s\n" % (n, why))
