# The golden vectors under MicroPython: micropython -m vectors_runner VECTORS_DIR
# Checks every vector as tests/test_vectors.py does, holding one vector at a time: the generator
# writes one vector per line, so each file is streamed line by line (a whole file would not fit
# in the device heap). Prints "ok NAME" or "FAIL NAME: WHY" per vector, then "N passed, M failed".
import gc

gc.threshold(4096)  # collect often: in a 64 KB heap, garbage left lying fragments it

# boot as firmware does: one module at a time, collecting in between, so that loading bytecode
# leaves no small holes all over the heap (a 1 KB frame needs a contiguous block)
for _m in ("errors", "cbor", "crypto", "cobs", "frame", "messages", "cose", "replay"):
    __import__("hexiao.protocol." + _m)
    gc.collect()

import hashlib
import json
import os
import sys
from binascii import hexlify
from binascii import unhexlify as h

from hexiao.protocol import cose, crypto, frame, messages
from hexiao.protocol.check import verify_frame
from hexiao.protocol.errors import ProtocolError

gc.collect()


def _feed(hs, v):
    # a canonical walk of a message in its vectors' JSON form (bytes as hex, map keys as
    # strings), fed to a hash in small pieces: typed and length-prefixed, so that two messages
    # hash alike only if they are alike
    if v is True or v is False or v is None:
        hs.update({True: b"T", False: b"F", None: b"N"}[v])
    elif isinstance(v, int):
        hs.update(b"i%d;" % v)
    elif isinstance(v, (bytes, bytearray)):  # as the vectors write it: its hex, as a string
        hs.update(b"s%d:" % (2 * len(v)))
        for i in range(0, len(v), 32):
            hs.update(hexlify(v[i : i + 32]))
    elif isinstance(v, str):
        b = v.encode()
        hs.update(b"s%d:" % len(b))
        hs.update(b)
    elif isinstance(v, list):
        hs.update(b"l%d:" % len(v))
        for x in v:
            _feed(hs, x)
    else:  # dict
        hs.update(b"m%d:" % len(v))
        keys = {str(k): k for k in v}
        for k in sorted(keys):
            _feed(hs, k)
            _feed(hs, v[keys[k]])


def digest(v):
    hs = hashlib.sha256()
    _feed(hs, v)
    return hs.digest()


def check(v):
    if v["kind"] == "kdf":
        keys = crypto.session_keys(h(v["device_key"]), h(v["host_nonce"]), h(v["device_nonce"]))
        return None if keys == (h(v["d2h_key"]), h(v["h2d_key"])) else "session keys differ"
    # pop the long hex strings as soon as they are bytes: the heap is small
    key, alg, aad, c, w = h(v["key"]), v["alg"], h(v["external_aad"]), h(v.pop("cose")), h(
        v.pop("wire")
    )
    if v["valid"] and frame.decode(w[:-1]) != c:  # checked first, while the heap is emptier
        return "wire does not frame cose"
    try:
        m, msg = verify_frame(w, key, alg, aad, v.get("context", {}).get("seen", ()))
    except ProtocolError as e:
        if v["valid"]:
            return "rejected: " + e.code
        if e.code != v["error"]:
            return f"error {e.code}, not {v['error']}"
        want = v["message"]
        if want is not None and digest(messages.decode(cose.parse(c).payload)) != want:
            return "decoded message differs"
        return None
    if not v["valid"]:
        return "accepted"
    kid, n = m.kid, m.counter
    m = None
    if digest(msg) != v["message"]:
        return "message differs"
    gc.collect()
    p = messages.encode(msg)
    msg = None
    gc.collect()
    if cose.mac0(key, alg, kid, n, p, aad) != c:
        return "re-encoding differs"
    p = None
    if frame.encode(c) != w:
        return "re-framing differs"
    return None


def run(path, fn, counts):
    with open(path, "rb") as f:
        i = 0
        for line in f:
            i += 1
            if not line.startswith(b'{"name"'):
                continue
            name = f"{fn}:{i}"
            try:  # a crash, MemoryError included, fails this vector, not the run
                # a line is one vector and its separator: parse it in place, without copies
                n = len(line) - (2 if line.endswith(b",\n") else 1)
                v = json.loads(memoryview(line)[:n])
                line = None
                if v.get("message") is not None:  # a digest, not a tree, while verifying
                    v["message"] = digest(v["message"])
                gc.collect()
                name = v["name"]
                why = check(v)
            except Exception as e:
                why = f"{type(e).__name__} {e}"
            v = line = None
            gc.collect()
            counts[not why] += 1
            print(f"FAIL {name}: {why}" if why else "ok " + name)


def main(d):
    counts = [0, 0]  # failed, passed
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".json"):
            try:
                run(d + "/" + fn, fn, counts)
            except Exception as e:  # the file could not be read to its end
                counts[0] += 1
                print(f"FAIL {fn}: {type(e).__name__} {e}")
            gc.collect()
    print(f"{counts[1]} passed, {counts[0]} failed")
    return counts[0]


sys.exit(1 if main(sys.argv[1]) else 0)
