# The firmware's entry point on the sim board:
#
#   micropython -X heapsize=64k -m hexiao.firmware.main cfg=PATH scanner=PATH hid=PATH
#       [state=DIR] [reset=CAUSE] [rto=200] [tries=8] [stable=60000] [crash=1]
#
# cfg is a JSON file {"id": ..., "key": hex} (as linkpeer's). Modules are imported one at a
# time with a collection between, so each lands in a compacted heap; boot-only modules
# (boot, install_check, safe) are dropped once used: this module's own code stays in the
# heap while the app runs (its body is running), so it holds only the run and the crash path.
# On a board, board_main does the same with the same boot.py. reset= is the reset cause the sim
# board reports (hal_sim; default power_on);
# stable= the ms of running that clear the crash record (safe.STABLE_MS on a board).
#
# Exit status: 0 the scanner hung up (the sim board's end); 3 the installed firmware is refused
# (install_check); 4 an exception escaped the application: recorded in state=DIR (safe.py), as
# a board records it before it resets; 5 ran in safe mode (safe.py; or no cfg file: not
# provisioned, as a board without /config.json) until the scanner hung up.
# crash= raises in place of running the application, after boot: the sim board's way for tests
# to crash it (boards have no such argument).

import gc

if hasattr(gc, "threshold"):  # see linkpeer: keeps the 64 KB heap unfragmented
    gc.threshold(2048)
import sys


def main(argv):
    from hexiao.firmware import drop
    from hexiao.firmware.boot import sim

    app, st, count, crash = sim(argv)
    sim = None
    drop("boot")
    from hexiao.firmware.hal_sim import emit

    board = app.b
    app.sample()
    emit({"ev": "boot", "board": board.name, "heap_free": gc.mem_free(), "heap_used": app.peak,
          "crashes": count})
    try:
        if crash:
            raise RuntimeError("crash= argument")
        app.run()
    except Exception as e:  # any of them is a crash
        app = board = None
        gc.collect()
        sys.print_exception(e, sys.stderr)  # stdout is the link
        n, why = 0, None
        if st is not None:
            from hexiao.firmware import safe

            n, why = safe.crashed(st, e)
        emit({"ev": "crash", "why": why or repr(e), "crashes": n})
        sys.exit(4)  # as a board resets
    app.sample()
    emit({"ev": "heap", "free": gc.mem_free(), "peak": app.peak, "app": app.n})
    if count:
        import os

        try:  # noqa: SIM105 - no contextlib on the device
            os.remove(st + "crash")  # a clean end: a stable run
        except OSError:
            pass


main(sys.argv[1:])
