# The golden vectors under MicroPython: micropython -m vectors_runner VECTORS_DIR
# Checks every vector as tests/test_vectors.py does, holding one vector at a time: the generator
# writes one vector per line, so each file is streamed line by line (a whole file would not fit
# in the device heap). Prints "ok NAME" or "FAIL NAME: WHY" per vector, then "N passed, M failed".
import gc

# boot as firmware does: one module at a time, collecting in between, so that loading bytecode
# leaves no small holes all over the heap (a 1 KB frame needs a contiguous block)
for _m in ("errors", "cbor", "codec", "crypto", "cobs", "frame", "messages", "cose", "replay"):
    __import__("hexiao.protocol." + _m)
    gc.collect()

import json
import os
import sys
from binascii import hexlify
from binascii import unhexlify as h

from hexiao.protocol import cose, crypto, frame, messages
from hexiao.protocol.check import verify_frame
from hexiao.protocol.errors import ProtocolError

gc.collect()


def same(got, want):
    # the decoded message against the vector's named JSON form (bytes as hex, integer map keys
    # as decimal strings), compared piece by piece: nothing large is built in a small heap
    if isinstance(got, (bytes, bytearray)):
        if not isinstance(want, str) or len(want) != 2 * len(got):
            return False
        for i in range(0, len(got), 32):
            if hexlify(got[i : i + 32]).decode() != want[2 * i : 2 * i + 64]:
                return False
        return True
    if isinstance(got, dict):
        if not isinstance(want, dict) or len(got) != len(want):
            return False
        for k, x in got.items():
            k = str(k)
            if k not in want or not same(x, want[k]):
                return False
        return True
    if isinstance(got, list):
        if not isinstance(want, list) or len(got) != len(want):
            return False
        return all(same(got[i], want[i]) for i in range(len(got)))
    if (got is True or got is False) != (want is True or want is False):
        return False  # True == 1 in Python, not in the vectors
    return got == want


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
        if want is not None and not same(messages.decode(cose.parse(c).payload), want):
            return "decoded message differs"
        return None
    if not v["valid"]:
        return "accepted"
    if not same(msg, v.pop("message")):
        return "message differs"
    kid, n, p = m.kid, m.counter, messages.encode(msg)
    m = msg = None
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
