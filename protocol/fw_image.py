# The image of a firmware update over the link (SPEC 6.8) and the host's side of its transfer.
# Host-only (never on the device): the device's side is firmware/app_update and fw_update.
#
# Rules kept here:
# - the image is manifest.json's exact bytes, then every file the manifest lists, in sorted
#   name order, each its listed size: the device splits it by the manifest alone; the offer
#   carries the Ed25519 signature over the manifest and the image's SHA-256 (its name, so that
#   an offer of the same image resumes where the device stopped);
# - send() is the transfer through any request/answer path (ask(msg, answer type, timeout)):
#   one chunk in flight, each at the offset the device last said it holds, so a lost chunk or
#   a device that restarted costs nothing but a resend; the device's refusals raise Refused
#   with its own words; a lost connection (ConnectionError, TimeoutError) is the caller's: a
#   later send() of the same image resumes;
# - a device that stops advancing (CHUNK_STALLS answers without progress) is refused, not
#   retried for ever.

import hashlib
import json

CHUNK = 128  # of fw_chunk.data's 768: a chunk is decoded in the few KB the device has left
CHUNK_STALLS = 3
# fw_status states (SPEC 6.8), by number
STATES = ["idle", "receiving", "complete", "installing", "trial", "confirmed", "refused",
          "rolled_back"]


class Refused(Exception):
    """The device refused the update; .why is its reason."""

    def __init__(self, why):
        super().__init__(why)
        self.why = why


def image(manifest, files):
    """The image: manifest bytes, then the listed files in sorted name order."""
    names = sorted(json.loads(manifest)["files"])
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError("the bundle lacks %s, listed in its manifest" % missing[0])
    return bytes(manifest) + b"".join(files[n] for n in names)


def offer(manifest, signature, files):
    """(fw_offer message, image bytes) for a bundle's manifest, signature and files."""
    m = json.loads(manifest)
    img = image(manifest, files)
    return ({"type": "fw_offer", "digest": hashlib.sha256(img).digest(), "size": len(img),
             "manifest_size": len(manifest), "signature": bytes(signature),
             "board": m["board"], "version": m["version"], "counter": m["counter"]}, img)


def _taking(st, digest):
    if st["state"] in (1, 2) and st.get("digest") == digest:
        return
    why = st.get("why") or "the device is %s" % STATES[st["state"]]
    raise Refused(why)


def send(ask, offer_msg, img, timeout=10.0, progress=None):
    """Offer, send the chunks the device lacks, commit. Returns {"resumed_from", "sent",
    "chunks", "why"} (why: the device's fw_result text: it restarts to install); Refused."""
    digest = offer_msg["digest"]
    st = ask(offer_msg, "fw_status", timeout)
    _taking(st, digest)
    start = off = st["offset"]
    seq = stalls = sent = 0
    while off < len(img):
        data = img[off : off + CHUNK]
        st = ask({"type": "fw_chunk", "seq": seq, "offset": off, "data": data}, "fw_status",
                 timeout)
        _taking(st, digest)
        seq += 1
        if st["offset"] > off:
            sent += st["offset"] - off
            stalls = 0
        else:
            stalls += 1
            if stalls >= CHUNK_STALLS:
                raise Refused("the device stopped taking chunks at byte %d" % off)
        off = st["offset"]
        if progress is not None:
            progress(off, len(img))
    r = ask({"type": "fw_commit", "digest": digest}, "fw_result", timeout)
    if not r["ok"]:
        raise Refused(r["why"])
    return {"resumed_from": start, "sent": sent, "chunks": seq, "why": r["why"]}
