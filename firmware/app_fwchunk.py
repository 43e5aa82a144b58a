# The fw_* messages (SPEC 6.8), an overlay (App.serve loads it for one and drops it after):
# fw_chunk and fw_query, which an update sends hundreds of, here; fw_offer and fw_commit, once
# per update, handed on to app_update, which hands its status answers back as a fw_query, so
# that the two are never in the heap together. Before this split app_update (2.8 KB, with a
# 0.6 KB function) was loaded for every chunk beside the chunk's frame buffers: with hostd's
# session open (4.5 KB free at 64 KB) a 500-600 byte block could not be found (MemoryError)
# in about half the updates.
#
# Rules kept here:
# - a chunk is written only at the offset the device holds and within the offered size; every
#   answer says where to resume; with nothing offered the answer is the last outcome (fw_last);
# - a commit app_update took (a fw_query with "go") is answered fw_result, and the device
#   resets: boot checks and installs the image (fw_update).
# File names and formats: fw_update's header.

import os


def _size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return -1


def serve(app, msg, firmware, suffixes):
    del firmware, suffixes  # the same signature as the other overlays
    t = msg["type"]
    if t == "fw_offer" or t == "fw_commit":  # once per update: app_update's, alone
        return ("app_update", msg)
    if "go" in msg:  # app_update took the commit (never from the wire: no such field)
        app.cdc.send({"type": "fw_result", "ok": True, "why": "restarting to check and install"})
        reset()
    st = app.b.state
    if st is None:  # a sim board run without state=: nothing persists
        return {"type": "fw_status", "state": 6, "offset": 0, "why": "no state folder"}
    st = st + "/" if st else st
    n = _size(st + "fwup.img")
    if _size(st + "fwup.hdr") > 0:  # the offer held: digest, signature, "size ..."
        with open(st + "fwup.hdr", "rb") as f:
            h = f.read(32)
            f.seek(96)
            size = int(f.read().split()[0])
        if t == "fw_chunk" and msg["offset"] == n and n + len(msg["data"]) <= size:
            with open(st + "fwup.img", "ab") as f:
                f.write(msg["data"])
            n += len(msg["data"])
        return {"type": "fw_status", "state": 2 if n == size else 1, "offset": n, "digest": h}
    if _size(st + "fw_last") > 0:  # nothing held: the last outcome (fw_update)
        with open(st + "fw_last") as f:
            h = f.read().split(" ", 2)
        return {"type": "fw_status", "state": int(h[0]), "offset": 0, "version": h[1][:16],
                "why": h[2][:64]}
    return {"type": "fw_status", "state": 0, "offset": 0}


def reset():
    # a board resets; the sim board exits 6 and its runner starts it again
    try:
        import machine

        machine.reset()
    except (ImportError, AttributeError):
        pass
    raise SystemExit(6)
