# The firmware's one boot sequence, on every board: main.py runs sim() on the sim board,
# board_main.py runs refused() and start() on rp2040/esp32s3; then each drops this module, so its
# code is not in the heap while the till sells.
#
# Order: an update over the link finished, rolled back or counted on trial (fw_update; may reset)
# -> the install check (refused(); install_check dropped after) -> the board's HAL (the
# caller's: on a board it starts the watchdog) -> the crash record (safe.boot; dropped after):
# safe mode runs safe.run and never the application -> the provisioned key (a JSON file {"id",
# "key": hex}; none: safe mode, "not provisioned") -> the App, with the board's idle() clearing
# the crash record, and confirming a firmware on trial, after a stable run (stable.py).

import gc
import sys

from hexiao.firmware import drop

TRIAL = False  # this boot runs a firmware on trial (fw_update): start() confirms it
VERSION = None  # the installed firmware's version (its manifest); None: a development build
CUT = None  # the sim board's cut= (fw_update.CUT)


def refused(st, name):
    """Why the installed firmware must not run on board `name` (install_check), or None. First
    an update over the link is finished, rolled back or counted on trial (fw_update: it may
    reset the board)."""
    global TRIAL, VERSION
    from hexiao.firmware import install_check

    why_not = install_check.refused
    if st is not None and _pending(st):
        TRIAL = _update(st, name, why_not)
    why = why_not(st, name)
    VERSION = install_check.VERSION
    why_not = install_check = None
    drop("install_check")
    return why


def _pending(st):
    # an update committed or on trial (fw_update's files; a switch cut short is on trial)
    import os

    for p in ("fwup.go", "fw_trial"):
        try:
            os.stat(st + p)
            return True
        except OSError:
            pass
    return False


def _update(st, name, why_not):
    # a plain boot on trial is counted by fw_trial; fw_update is loaded only when there is
    # more to do: every module's names stay in the heap the application needs
    from hexiao.firmware import fw_trial

    t = fw_trial.trial(st, name, why_not)
    fw_trial = None
    drop("fw_trial")
    if t is None:
        from hexiao.firmware import fw_update

        fw_update.CUT = CUT
        t = fw_update.boot(st, name, why_not)
        fw_update = None
        drop("fw_update")
    return t


def start(board, st, cfg, stable_ms, link_args):
    """(App, crashes so far, None) for `board`; or (None, 0 or crashes, why) for safe mode, which
    the caller runs (safe.run). st: the state file prefix ("" on a board; None: nothing persists,
    no crash record); cfg: the file with the device's key."""
    count = 0
    why = None
    if st is not None:
        from hexiao.firmware import safe

        count, why = safe.boot(st, board.reset)
        safe = None
        drop("safe")
    from json import load

    try:
        with open(cfg) as f:
            c = load(f)
    except OSError:
        c = None
        why = why or "not provisioned (no %s)" % cfg
    if why:
        return None, count, why
    from binascii import unhexlify

    kid, key = c["id"].encode(), unhexlify(c["key"])
    c = load = None
    gc.collect()
    if count or TRIAL:  # a run of stable_ms clears the crashes and confirms a trial
        from hexiao.firmware import stable

        stable.arm(board, st, stable_ms, TRIAL)
        stable = None
    gc.collect()
    from hexiao.firmware import app

    if VERSION:  # the hello and health say which build runs (a rollout checks it)
        app.FIRMWARE = "hexiao-fw " + VERSION
    gc.collect()
    return app.App(board, kid, key, link_args), count, None


def sim(argv):
    """The sim board's boot (main.py): (app, state prefix, crashes so far, crash=); exits 3 if
    the installation is refused, 5 after safe mode (see main.py)."""
    a = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        a[k] = v
    st = a.get("state")
    st = st + "/" if st else None  # state file prefix; None: nothing persists
    global CUT
    CUT = a.get("cut")  # power lost at that step of an update (fw_update.cut; tests only)
    why = refused(st, "sim")
    if why:
        sys.stderr.write('{"ev": "refused", "why": "%s"}\n' % why)
        sys.exit(3)  # nothing of this firmware runs
    from hexiao.firmware.hal_sim import Board, emit

    board = Board(a)
    app, count, why = start(board, st, a.get("cfg", ""), int(a.get("stable", 60000)),
                            {"rto_ms": int(a.get("rto", 200)), "max_tries": int(a.get("tries", 8)),
                             "queue_max": 4})
    if why:
        from hexiao.firmware import safe

        emit({"ev": "safe", "why": why})
        safe.run(board, why)
        sys.exit(5)
    return app, st, count, "crash" in a
