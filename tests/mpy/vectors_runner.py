# The golden vectors under MicroPython: micropython -m vectors_runner VECTORS_DIR
# Checks every vector as tests/test_vectors.py does, holding one vector at a time: the generator
# writes one vector per line, so each file is streamed line by line (a whole file would not fit
# in the device heap). Prints "ok NAME" or "FAIL NAME: WHY" per vector, then "N passed, M failed".
import gc
import json
import os
import sys
from binascii import hexlify
from binascii import unhexlify as h

from hexiao.protocol import cose, crypto, frame, messages
from hexiao.protocol.errors import ProtocolError

try:
    from hexiao.protocol.check import verify_frame
except ImportError:
    from hexiao.protocol.link import verify_frame


def js(v):
    # the vectors' named form: bytes as hex strings
    if isinstance(v, bytes):
        return hexlify(v).decode()
    if isinstance(v, list):
        return [js(x) for x in v]
    if isinstance(v, dict):
        return {k: js(x) for k, x in v.items()}
    return v


def canon(v):
    # the named form as one compact string with sorted keys: a string holds the expected message
    # in far less heap than a tree of objects, and leaves no fragments behind
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(k) + ":" + canon(v[k]) for k in sorted(v)) + "}"
    if isinstance(v, list):
        return "[" + ",".join(canon(x) for x in v) + "]"
    return json.dumps(v)


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
        if want is not None and canon(js(messages.decode(cose.parse(c).payload))) != want:
            return "decoded message differs"
        return None
    if not v["valid"]:
        return "accepted"
    if canon(js(msg)) != v.pop("message"):
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
                if v.get("message") is not None:
                    v["message"] = canon(v["message"])
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
