# The end of a stable run (safe.STABLE_MS of running): the crash record cleared (safe.py's
# "in a row") and a firmware on trial confirmed (fw_update's rules). boot.start arms it when
# there is something to end; it wraps the board's idle() until then, then restores it and
# drops itself. Only arm() and its closure stay in the heap while the till sells (a trial boot
# runs with hostd's session in the same few KB as an update); the work at the end is
# stable_end's, loaded then.

from time import ticks_diff, ticks_ms


def arm(board, st, stable_ms, trial):
    t0, idle = ticks_ms(), board.idle

    def stable():
        if ticks_diff(ticks_ms(), t0) >= stable_ms:
            board.idle = idle  # this closure, and with it this module, can go
            from hexiao.firmware import drop, stable_end

            stable_end.end(board, st, trial)
            stable_end = None
            drop("stable_end")
            drop("stable")
        idle()

    board.idle = stable
