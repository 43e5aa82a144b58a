# What a stable run ends (stable.arm, once safe.STABLE_MS of running have passed; loaded then
# and dropped after): the crash record cleared (safe.py's "in a row") and a firmware on trial
# confirmed (fw_update's rules).
#
# Confirming: the trial ends first (fw_trial removed), then hexiao.old goes and the trial's
# security counter becomes fw_counter. A power cut in between leaves hexiao.old (fw_update.boot
# removes it) or the old counter (install_check raises it at the next boot), never a trial to
# roll back.

import os


def end(board, st, trial):
    try:  # noqa: SIM105 - no contextlib on the device
        os.remove(st + "crash")
    except OSError:
        pass
    if trial:
        with open(st + "fw_trial") as f:
            p = f.read().split()
        os.remove(st + "fw_trial")
        with open(st + "fw_last", "w") as f:
            f.write("5 %s confirmed" % p[1])
        rm("hexiao.old")
        with open(st + "fw_counter.new", "w") as f:
            f.write(p[2])
        try:
            os.rename(st + "fw_counter.new", st + "fw_counter")
        except OSError:  # a filesystem whose rename does not replace
            os.remove(st + "fw_counter")
            os.rename(st + "fw_counter.new", st + "fw_counter")
        board.note(0, 6, "firmware %s confirmed" % p[1])


def rm(p):
    try:
        if os.stat(p)[0] & 0x4000:
            for n in os.listdir(p):
                rm(p + "/" + n)
            os.rmdir(p)
        else:
            os.remove(p)
    except OSError:
        pass
