# Boot-only: the device's own check of what `hexiao flash` installed, before any of it runs.
# The entry points (main.py, board_main.py) import it, call refused(), then drop the module
# (del sys.modules[...], gc.collect()) so none of this stays in the device's heap.
# Updates over the link are checked before they switch (fw_update, with the device's own
# Ed25519 verifier); this check then holds every boot to the manifest installed.


VERSION = None  # the installed manifest's version, once refused() has read it


def refused(state, board):
    # Built for this board, signed (a signature present), every file the manifest lists there
    # with its size and SHA-256 (a tampered or half-written file), and a security counter not
    # below the highest this device has run (a downgrade). `hexiao flash` checked the Ed25519
    # signature (an update over the link was checked by fw_update, with the device's own
    # verifier); here, at every boot, the firmware is held to the manifest it was installed
    # with: verifying Ed25519 at every boot would cost seconds on a board. Returns why the
    # firmware must not run, or None. No manifest: a development build. state: the folder
    # prefix of the device's state files ("" on a board).
    from json import load

    try:
        with open("hexiao/manifest.json") as f:
            m = load(f)
    except OSError:
        return None
    except ValueError:
        return "its manifest is unreadable"
    global VERSION
    VERSION = m.get("version")
    if m.get("board") != board:
        return "built for board %s, this is a %s board" % (m.get("board"), board)
    try:  # present, not verified: the device has no Ed25519 (the installer verified it)
        with open("hexiao/manifest.sig", "rb") as f:
            if len(f.read(65)) != 64:
                return "unsigned: its manifest.sig is not an Ed25519 signature"
    except OSError:
        return "unsigned: no manifest.sig"
    import hashlib
    from binascii import hexlify

    buf = bytearray(256)
    for name in m["files"]:
        h = hashlib.sha256()
        n = 0
        try:
            with open(name, "rb") as g:
                k = g.readinto(buf)
                while k:
                    h.update(memoryview(buf)[:k])
                    n += k
                    k = g.readinto(buf)
        except OSError:
            return "missing " + name
        want = m["files"][name]
        if n != want["size"] or hexlify(h.digest()).decode() != want["sha256"]:
            return "changed since it was installed: " + name
    if state is not None:
        try:
            with open(state + "fw_counter") as f:
                top = int(f.read())
        except (OSError, ValueError):
            top = 0
        if m["counter"] < top:
            return "downgraded: security counter %d is below %d" % (m["counter"], top)
        if m["counter"] > top and not _on_trial(state):
            with open(state + "fw_counter.new", "w") as f:
                f.write(str(m["counter"]))
            import os

            try:
                os.rename(state + "fw_counter.new", state + "fw_counter")
            except OSError:  # a filesystem whose rename does not replace
                os.remove(state + "fw_counter")
                os.rename(state + "fw_counter.new", state + "fw_counter")
    return None


def _on_trial(state):
    # an update over the link on trial (fw_update): its counter becomes the floor only when it
    # is confirmed, so that a rollback to the previous firmware is no downgrade
    try:
        open(state + "fw_trial").close()
        return True
    except OSError:
        return False
