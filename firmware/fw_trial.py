# One more boot of a firmware on trial (fw_update's rules), the common case: counted here so
# that fw_update, larger, is not loaded (every module's names stay in the heap the application
# needs). Boot-only: boot._update imports it and drops it.

import os


def trial(st, name, why_not):
    """One more boot of a firmware on trial that passes its self-test (install_check), within
    fw_update.TRIAL_BOOTS (3): counted (True), as fw_update.boot would; None: anything else is
    fw_update's work (none on trial, a switch cut short, a rollback, a committed update)."""
    try:
        with open(st + "fw_trial") as f:
            p = f.read().split()
    except OSError:
        return None
    try:
        os.stat("hexiao.new/manifest.json")
        return None  # a switch cut short
    except OSError:
        pass
    n = int(p[0]) + 1
    if n > 3 or why_not(st, name):
        return None
    with open(st + "fw_trial.new", "w") as f:  # whole, then renamed: as fw_update.put
        f.write("%d %s %s" % (n, p[1], p[2]))
    try:
        os.rename(st + "fw_trial.new", st + "fw_trial")
    except OSError:  # a filesystem whose rename does not replace
        os.remove(st + "fw_trial")
        os.rename(st + "fw_trial.new", st + "fw_trial")
    with open(st + "fw_last", "w") as f:
        f.write("4 %s on trial, boot %d of 3" % (p[1], n))
    return True
