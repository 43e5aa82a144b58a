# A firmware update over the link, while the application runs (SPEC 6.8): the offer and the
# commit, once per update, an overlay that app_fwchunk hands them on to (App.serve loads each
# alone: the two together did not fit beside hostd's session, 4.5 KB free at 64 KB). It only
# stages: the image goes to the state folder as it arrives; every check that matters
# (signature, board, counter, each file) and the switch are fw_update's, at the next boot,
# where the whole heap is free for the Ed25519 verifier. So it refuses only a downgrade, its
# strings are few, and a status answer is handed back to app_fwchunk as a fw_query.
#
# Rules kept here:
# - an offer is refused at once only for a counter below this device's floor (fw_counter) or
#   while a firmware is on trial; everything else is checked from the signed manifest at boot;
# - an offer of the same image, by its digest, resumes where the device stopped; another image
#   starts afresh (chunks: app_fwchunk, only in order);
# - a commit is taken only for the complete image named by the offer's digest: fwup.go, then
#   app_fwchunk answers fw_result and resets; boot installs it or says why not (fw_last).
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
    try:
        with open(st + "fwup.hdr", "rb") as f:
            h = f.read(32)  # the digest of the offer held
            f.seek(96)  # after the signature: "size manifest_size version"
            size = int(f.read().split()[0])
    except OSError:
        h, size = b"", -1
    if msg["type"] == "fw_commit":
        if h != msg["digest"] or _size(st + "fwup.img") != size:
            return {"type": "fw_result", "ok": False, "why": "incomplete, or not the image held"}
        open(st + "fwup.go", "w").close()
        return ("app_fwchunk", {"type": "fw_query", "go": True})  # it says so and resets
    top = _size(st + "fw_counter")
    if top > 0:
        with open(st + "fw_counter") as f:
            top = int(f.read())
    if msg["counter"] < top or _size(st + "fw_trial") >= 0:
        return {"type": "fw_status", "state": 6, "offset": 0, "why": "downgrade" if
                msg["counter"] < top else "a firmware is on trial"}
    if h != msg["digest"]:  # another image: it starts afresh
        with open(st + "fwup.new", "wb") as f:  # whole, then renamed over
            f.write(msg["digest"])
            f.write(msg["signature"])
            f.write("%d %d %s" % (msg["size"], msg["manifest_size"], msg["version"]))
        open(st + "fwup.img", "wb").close()
        if _size(st + "fwup.hdr") >= 0:  # a filesystem whose rename may not replace
            os.remove(st + "fwup.hdr")
        os.rename(st + "fwup.new", st + "fwup.hdr")
    return ("app_fwchunk", {"type": "fw_query"})  # where to resume: its answer
