# A firmware update over the link, while the application runs (SPEC 6.8): an overlay, as
# app_rules, loaded by App.serve for one fw_* message and dropped after. It only stages: the
# image goes to the state folder as it arrives; every check that matters (signature, board,
# counter, each file) and the switch are fw_update's, at the next boot, where the whole heap
# is free for the Ed25519 verifier. This module runs in the ~9 KB the application leaves
# (2.8 KB while loaded, 1.1 KB of it names that stay: tests/test_fw_update.py holds it under
# 3.2 KB), so it refuses only a downgrade, its strings are few, its functions small (each is
# one allocation when it loads), and a chunk is never copied.
#
# Rules kept here:
# - an offer is refused at once only for a counter below this device's floor (fw_counter) or
#   while a firmware is on trial; everything else is checked from the signed manifest at boot;
# - chunks are taken only in order: a chunk at another offset is not written, and every answer
#   says where to resume (a resent or duplicated chunk is harmless; an offer of the same image,
#   by its digest, resumes; another image starts afresh);
# - a commit is taken only for the complete image named by the offer's digest; the device
#   answers fw_result and resets; boot installs it or says why not (fw_last).
# File names and formats: fw_update's header.

import os


def _size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return -1


def serve(app, msg, firmware, suffixes):
    del firmware, suffixes  # the same signature as the other overlays
    st = app.b.state
    if st is None:  # a sim board run without state=: nothing persists
        return {"type": "fw_status", "state": 6, "offset": 0, "why": "no state folder"}
    st = st + "/" if st else st
    t = msg["type"]
    n = _size(st + "fwup.img")
    if t == "fw_offer":
        top = _size(st + "fw_counter")
        if top > 0:
            with open(st + "fw_counter") as f:
                top = int(f.read())
        if msg["counter"] < top or _size(st + "fw_trial") >= 0:
            return {"type": "fw_status", "state": 6, "offset": 0, "why": "downgrade" if
                    msg["counter"] < top else "a firmware is on trial"}
        if _head(st)[:32] != msg["digest"]:  # another image: it starts afresh
            with open(st + "fwup.new", "wb") as f:  # whole, then renamed over
                f.write(msg["digest"])
                f.write(msg["signature"])
                f.write("%d %d %s" % (msg["size"], msg["manifest_size"], msg["version"]))
            open(st + "fwup.img", "wb").close()
            if _size(st + "fwup.hdr") >= 0:  # a filesystem whose rename may not replace
                os.remove(st + "fwup.hdr")
            os.rename(st + "fwup.new", st + "fwup.hdr")
            n = 0
    h = _head(st)
    if t == "fw_chunk" and h and msg["offset"] == n and n + len(msg["data"]) <= int(
            h[96:].split()[0]):
        with open(st + "fwup.img", "ab") as f:
            f.write(msg["data"])
        n += len(msg["data"])
    if t == "fw_commit":
        _commit(app, st, msg, h, n)
        return {"type": "fw_result", "ok": False, "why": "incomplete, or not the image held"}
    if h:
        return {"type": "fw_status", "state": 2 if n == int(h[96:].split()[0]) else 1,
                "offset": n, "digest": h[:32]}
    if _size(st + "fw_last") > 0:  # nothing held: the last outcome (fw_update)
        with open(st + "fw_last") as f:
            h = f.read().split(" ", 2)
        return {"type": "fw_status", "state": int(h[0]), "offset": 0, "version": h[1][:16],
                "why": h[2][:64]}
    return {"type": "fw_status", "state": 0, "offset": 0}


def _head(st):
    # the offer held: digest (32 bytes), signature (64), "size manifest_size version"
    if _size(st + "fwup.hdr") < 0:
        return b""
    with open(st + "fwup.hdr", "rb") as f:
        return f.read()


def _commit(app, st, msg, h, n):
    # the complete image the offer named: the device says so and resets (boot installs it)
    if h[:32] != msg["digest"] or n != int(h[96:].split()[0]):
        return
    open(st + "fwup.go", "w").close()
    app.cdc.send({"type": "fw_result", "ok": True, "why": "restarting to check and install"})
    try:  # a board resets; the sim board exits 6 and its runner starts it again
        import machine

        machine.reset()
    except (ImportError, AttributeError):
        pass
    raise SystemExit(6)
