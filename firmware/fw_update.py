# Firmware updates over the link, the device's side at boot (SPEC 6.8; app_update stages them
# while the application runs). Boot-only, like install_check: boot.refused() imports it before
# anything else of the firmware runs, and drops it after.
#
# Rules kept here:
# - nothing is switched before the device itself has checked the staged image: the Ed25519
#   signature of its manifest with the device's firmware key (state file fw_key, 64 hex digits,
#   written at provisioning), the board, the security counter against the highest this device
#   has confirmed (fw_counter: a downgrade is refused), and every file's size and SHA-256; the
#   check runs here, at boot, because the verifier needs ~16 KB of heap the running
#   application does not have (docs/firmware-update.md);
# - the previous firmware is kept (hexiao.old) until the new one is confirmed: a run of
#   stable_ms on trial (boot.confirm, which needs none of this module); it is restored by itself
#   (rollback) when the new one fails its self-test (the install check refuses it) or is not
#   confirmed within TRIAL_BOOTS boots (a crash loop, or power cut again and again);
# - every step survives power loss: the staged image stays until the switch is done, a staging
#   folder cut short is redone from it, and a switch cut short (fw_trial is written first) is
#   rolled back to the last good firmware, which says why (cut between the two renames, the
#   root main.py puts hexiao.old back before anything imports the firmware);
# - fw_counter is raised only when the new firmware is confirmed, so that a rollback to the
#   previous one is not taken for a downgrade;
# - the outcome is kept for the host in fw_last: "<state> <version> <why>" (fw_status, SPEC 6.8).
#
# Files (st: the state folder prefix; the firmware folders are the board's root):
#   st fwup.img    the image as received: manifest.json, then its files in sorted name order
#   st fwup.hdr    the offer: digest (32 bytes), signature (64), "<size> <manifest_size> <version>"
#   st fwup.go     the host committed: install at the next boot
#   st fw_trial    "<boots> <version> <counter>": the new firmware is on trial (boot.confirm
#                  ends it: hexiao.old goes, the counter becomes fw_counter)
#   st fw_last     the last outcome (state numbers of SPEC 6.8)
#   hexiao.new/ hexiao/ hexiao.old/   staged, running, previous firmware

import os

CUR = "hexiao"
NEW = "hexiao.new"
OLD = "hexiao.old"
TRIAL_BOOTS = 3
# fw_status states (SPEC 6.8)
IDLE = 0
RECEIVING = 1
COMPLETE = 2
INSTALLING = 3
TRIAL = 4
CONFIRMED = 5
REFUSED = 6
ROLLED_BACK = 7


def exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def rm(p):
    # a file or a whole tree; missing is fine
    try:
        mode = os.stat(p)[0]
    except OSError:
        return
    if mode & 0x4000:
        for n in os.listdir(p):
            rm(p + "/" + n)
        os.rmdir(p)
    else:
        os.remove(p)


def put(path, text):
    # written whole, then renamed over: a power cut leaves the old text or the new
    with open(path + ".new", "w") as f:
        f.write(text)
    try:
        os.rename(path + ".new", path)
    except OSError:  # a filesystem whose rename does not replace
        os.remove(path)
        os.rename(path + ".new", path)


def get(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def last(st, state, version, why):
    put(st + "fw_last", "%d %s %s" % (state, version or "-", why[:64]))


def header(st):
    """The staged offer as [digest hex, size, manifest_size, sig hex, version], or None."""
    from binascii import hexlify

    try:
        with open(st + "fwup.hdr", "rb") as f:
            h = f.read()
    except OSError:
        return None
    p = h[96:].decode().split()
    return [hexlify(h[:32]).decode(), int(p[0]), int(p[1]), hexlify(h[32:96]).decode(), p[2]]


def drop_staging(st):
    for n in ("fwup.go", "fwup.img", "fwup.hdr"):
        rm(st + n)


def reset():
    # a board resets; the sim board exits with 6, and its runner starts it again
    try:
        import machine

        machine.reset()
    except (ImportError, AttributeError):
        pass
    import sys

    sys.exit(6)


def check(st, board):
    """Why the staged image must not be installed, or None: signature, board, counter, sizes.
    Returns (why, manifest)."""
    from json import loads

    h = header(st)
    if h is None:
        return "nothing staged", None
    try:
        size = os.stat(st + "fwup.img")[6]
    except OSError:
        size = -1
    if size != h[1]:
        return "incomplete: %d of %d bytes" % (max(size, 0), h[1]), None
    k = get(st + "fw_key")
    if k is None:
        return "no firmware key provisioned (fw_key)", None
    from binascii import unhexlify

    from hexiao.firmware import ed25519

    with open(st + "fwup.img", "rb") as f:
        ok = ed25519.verify(unhexlify(k.strip()), unhexlify(h[3]), f, h[2])
        if not ok:
            return "bad signature: not signed by this device's firmware key", None
        f.seek(0)
        raw = f.read(h[2])
    ed25519 = None
    try:
        m = loads(raw)
    except ValueError:
        return "its signed manifest is unreadable", None
    raw = None
    if m.get("board") != board:
        return "built for board %s, this is a %s board" % (m.get("board"), board), m
    top = get(st + "fw_counter")
    top = int(top) if top else 0
    if m["counter"] < top:
        return "downgrade: security counter %d is below %d" % (m["counter"], top), m
    n = h[2]
    for name in m["files"]:
        n += m["files"][name]["size"]
        if not (name.startswith("hexiao/") or name == "main.py") or ".." in name:
            return "unexpected file %s" % name[:40], m
    if n != h[1]:
        return "the image is not its manifest's files", m
    return None, m


def unpack(st, h, m):
    """The image's files into hexiao.new (main.py beside its place), each checked against its
    SHA-256 as it is written; the manifest and its signature last. Returns why not, or None."""
    import hashlib
    from binascii import hexlify, unhexlify

    rm(NEW)
    os.mkdir(NEW)
    buf = bytearray(512)
    with open(st + "fwup.img", "rb") as f:
        f.seek(h[2])
        for name in sorted(m["files"]):
            e = m["files"][name]
            if name == "main.py":
                path = "main.py.new"
            else:
                path = NEW + name[6:]
                mkdirs(path)
            d = hashlib.sha256()
            left = e["size"]
            with open(path, "wb") as g:
                while left:
                    k = f.readinto(memoryview(buf)[:min(left, 512)])
                    if not k:
                        return "the image ends inside " + name
                    d.update(memoryview(buf)[:k])
                    g.write(memoryview(buf)[:k])
                    left -= k
            if hexlify(d.digest()).decode() != e["sha256"]:
                return "changed since it was signed: " + name
            cut("unpack")
        f.seek(0)
        with open(NEW + "/manifest.sig", "wb") as g:
            g.write(unhexlify(h[3]))
        with open(NEW + "/manifest.json.new", "wb") as g:
            left = h[2]
            while left:
                k = f.readinto(memoryview(buf)[:min(left, 512)])
                g.write(memoryview(buf)[:k])
                left -= k
    os.rename(NEW + "/manifest.json.new", NEW + "/manifest.json")  # complete
    return None


def mkdirs(path):
    p = ""
    for s in path.split("/")[:-1]:
        p = p + "/" + s if p else s
        if not exists(p):
            os.mkdir(p)


def switch(st):
    # hexiao -> hexiao.old, hexiao.new -> hexiao, main.py.new -> main.py. A power cut between
    # the renames leaves no hexiao/ to import: the board's root main.py (the sim board's
    # runner: board.recover_switch) renames hexiao.old back first, and boot() rolls back
    if exists(NEW + "/manifest.json"):
        cut("switch")
        if exists(CUR):
            if exists(OLD):  # an interrupted switch already kept one
                rm(CUR)
            else:
                os.rename(CUR, OLD)
        cut("renamed")
        os.rename(NEW, CUR)
    if exists("main.py.new"):
        try:
            os.rename("main.py.new", "main.py")
        except OSError:
            os.remove("main.py")
            os.rename("main.py.new", "main.py")
    drop_staging(st)


def rollback(st, version, why):
    # the previous firmware back in place; then a reset boots it. The failed one is renamed
    # aside first, not removed in place: a power cut then leaves no hexiao/ (the boot's first
    # step puts hexiao.old back), never a half-removed one
    if exists(OLD):
        if exists(CUR):
            rm(NEW)
            os.rename(CUR, NEW)
            cut("rollback")
        os.rename(OLD, CUR)
    rm(NEW)
    rm(st + "fw_trial")
    last(st, ROLLED_BACK, version, "rolled back: " + why)


def boot(st, board, refused):
    """At boot, before the install check: finish or start a committed update, count a trial
    boot, roll back a trial that failed. Returns True if this boot runs a firmware on trial.
    May reset the board (the new or the restored firmware then boots from the start).
    refused(st, board): install_check's verdict on the firmware in place."""
    t = get(st + "fw_trial")
    if t is not None:
        boots, version, counter = t.split()
        if exists(NEW + "/manifest.json"):  # power was lost mid-switch: the last good one
            rm("main.py.new")
            drop_staging(st)
            rollback(st, version, "power lost while switching")
            reset()
        boots = int(boots) + 1
        why = refused(st, board)  # the self-test: the new firmware's files, as installed
        if why:
            rollback(st, version, "self-test failed: " + why)
            reset()
        if boots > TRIAL_BOOTS:
            from hexiao.firmware import safe

            rec = safe.read(st)
            rollback(st, version, "not confirmed after %d boots (last crash: %s)" % (
                TRIAL_BOOTS, rec[3][:24] if rec else "none"))
            reset()
        put(st + "fw_trial", "%d %s %s" % (boots, version, counter))
        last(st, TRIAL, version, "on trial, boot %d of %d" % (boots, TRIAL_BOOTS))
        return True
    if not exists(st + "fwup.go"):
        return False
    rm(OLD)  # no trial: one left by a confirmation cut short is no firmware to go back to
    m = None
    try:  # whatever the staged files hold, this boot ends (no crash loop on a bad image)
        h = header(st)
        why, m = check(st, board)
        if why is None:
            why = unpack(st, h, m)
    except Exception as e:  # a malformed manifest or header, a full filesystem
        why = "cannot install: %s %s" % (type(e).__name__, e)
    try:
        version = m["version"][:16] if m else header(st)[4]
    except Exception:
        version = "-"
    if why:
        rm(NEW)
        rm("main.py.new")
        drop_staging(st)
        last(st, REFUSED, version, why)
        reset()  # the firmware in place runs on, in a heap without the verifier's leftovers
    # first: a power cut from here on rolls back
    put(st + "fw_trial", "0 %s %d" % (version, m["counter"]))
    last(st, INSTALLING, version, "switching")
    switch(st)
    reset()


CUT = None  # the sim board's cut= argument: power lost at that step (tests; boards have none)


def cut(step):
    if step == CUT:
        import sys

        sys.exit(9)
