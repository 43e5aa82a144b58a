# The sim board's boot (firmware/main.py runs it, then drops it): the arguments, the install
# check, the crash record and safe mode, the device config, the board and the App. Its code is
# not needed once the App runs, so it is not in the heap while the till sells.

import gc
import sys

from hexiao.firmware import drop

BOARD = "sim"  # this boot wires the sim board's HAL


def boot(argv):
    """Everything up to running the app; returns (app, state prefix, crashes so far, crash=)."""
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
    return app, st, count, crash
