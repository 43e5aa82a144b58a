# The firmware's entry point on the sim board:
#
#   micropython -X heapsize=64k -m hexiao.firmware.main cfg=PATH scanner=PATH hid=PATH
#       [state=DIR] [reset=CAUSE] [rto=200] [tries=8] [stable=60000] [crash=1]
#
# cfg is a JSON file {"id": ..., "key": hex} (as linkpeer's). Modules are imported one at a
# time with a collection between, so each lands in a compacted heap; boot-only modules
# (install_check, safe) are dropped once used. On a board, board_main does the same with its
# own HAL. reset= is the reset cause the sim board reports (hal_sim; default power_on);
# stable= the ms of running that clear the crash record (safe.STABLE_MS on a board).
#
# Exit status: 0 the scanner hung up (the sim board's end); 3 the installed firmware is refused
# (install_check); 4 an exception escaped the application: recorded in state=DIR (safe.py), as
# a board records it before it resets; 5 ran in safe mode (safe.py) until the scanner hung up.
# crash= raises in place of running the application, after boot: the sim board's way for tests
# to crash it (boards have no such argument).

import gc

if hasattr(gc, "threshold"):  # see linkpeer: keeps the 64 KB heap unfragmented
    gc.threshold(2048)
import sys

BOARD = "sim"  # this entry point wires the sim board's HAL
PKG = "hexiao.firmware."


def drop(name):
    # forget a boot-only module: sys.modules and its package hold it
    del sys.modules[PKG + name]
    delattr(sys.modules[PKG[:-1]], name)
    gc.collect()


def main(argv):
    a = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        a[k] = v
    st = a.get("state")
    st = st + "/" if st else None  # state file prefix; None: nothing persists
    from hexiao.firmware.install_check import refused

    why = refused(st, BOARD)
    refused = None
    drop("install_check")
    if why:
        sys.stderr.write('{"ev": "refused", "why": "%s"}\n' % why)
        sys.exit(3)  # nothing of this firmware runs
    count = 0
    if st is not None:
        from hexiao.firmware import safe

        count, why = safe.boot(st, a.get("reset", "power_on"))
        if why:
            from hexiao.firmware.hal_sim import Board, emit

            emit({"ev": "safe", "why": why})
            safe.run(Board(a), why)
            sys.exit(5)
        safe = None
        drop("safe")
    from json import load

    with open(a["cfg"]) as f:
        cfg = load(f)
    from binascii import unhexlify

    kid, key = cfg["id"].encode(), unhexlify(cfg["key"])
    cfg = load = None
    gc.collect()
    from hexiao.firmware.hal_sim import Board, emit

    board = Board(a)
    if count:  # crashes in a row so far: a run this long, or a clean end, clears them
        from time import ticks_diff, ticks_ms

        t0, idle, left = ticks_ms(), board.idle, [st + "crash"]
        ms = int(a.get("stable", 60000))

        def stable():
            if left and ticks_diff(ticks_ms(), t0) >= ms:
                import os

                try:  # noqa: SIM105 - no contextlib on the device
                    os.remove(left.pop())
                except OSError:
                    pass
            idle()

        board.idle = stable
    gc.collect()
    from hexiao.firmware.app import App

    gc.collect()
    app = App(board, kid, key, {"rto_ms": int(a.get("rto", 200)),
                                "max_tries": int(a.get("tries", 8)), "queue_max": 4})
    crash = "crash" in a
    a = None
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
        n = 0
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
