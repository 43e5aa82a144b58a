# The production setting on a board (`hexiao provision --production` wrote the state file
# "production"): no REPL, so that the board's files change only through signed updates
# (fw_update). Boot-only, for boards: board_main imports it first and drops it once the
# install check has passed (the sim board has no REPL and never loads it).
#
# Rules kept here:
# - the flag is read before anything else of the firmware runs, and from then on Ctrl-C is
#   data, not an interrupt (mpremote's way in is Ctrl-C then the raw REPL);
# - where the port's REPL is a dupterm stream (a UART, WebREPL) it is detached;
# - a firmware that must not run halts saying why, idle, and never returns to the REPL;
# - what each port still allows is in docs/firmware-update.md (the USB REPL of the rp2 port is
#   its stdio, not a dupterm stream: kbd_intr and never returning are what close it).

import sys


def production(st):
    """True if the device was provisioned for production (the state file "production"): the
    REPL is made unreachable at once (board_main; the sim board has no REPL to close)."""
    import os

    try:
        os.stat(st + "production")
    except OSError:
        return False
    import micropython

    micropython.kbd_intr(-1)  # Ctrl-C is data, not the way in
    try:  # noqa: SIM105 - no contextlib on the device
        os.dupterm(None, 0)  # ports whose REPL is a dupterm stream (a UART, WebREPL)
    except (AttributeError, TypeError, ValueError, OSError):
        pass
    return True


def halt(prod, why):
    """Nothing of this firmware runs: say why, then back to the REPL (an installer reflashes
    over it), or in production stay here, idle, with no REPL (the board's button-reset or
    BOOTSEL is the way out: docs/firmware-update.md)."""
    sys.stderr.write(why)
    while prod:
        import machine

        machine.idle()
