# The link codec benchmarked on MicroPython: `micropython -m hexiao.firmware.bench_device MODE
# FRAMES BUDGET_MS ROUNDS`, run by `hexiao bench` (tools/bench/codec.py), which reads the one JSON
# line this prints.
#
# Rules kept here:
# - the measured paths are the device's real ones: build = messages.encode + cose.mac0 +
#   frame.encode; parse = Deframer.push/take + cose.parse + Mac0.verify + messages.decode;
# - every result is checked once before timing, so a broken path is an error, not a fast number;
# - heap figures come from gc.mem_alloc(): the unix port's micropython.mem_peak() never subtracts
#   what the GC sweeps, so it only grows and says nothing about a 64 KB heap;
# - MODE "fit" only runs the paths (gc on) to see whether they fit the -X heapsize; "full" also
#   times them and measures the bytes each one allocates (gc off for one call).
# Nothing but the JSON result goes to stdout; a MemoryError ends the run with a traceback.

import binascii
import gc
import sys
import time

gc.collect()
_HEAP_START = gc.mem_alloc()

from hexiao.protocol import cose, frame, messages  # noqa: E402

gc.collect()
_HEAP_IMPORTED = gc.mem_alloc()

KEY = bytes(range(32))  # a fixed test key; nothing secret
KID = b"HX\x00\x00\x00\x00\x00\x01"
COUNTER = 4242
SCAN = {"type": "scan", "scan_id": 1234, "symbology": "]Q1", "data": b"287463512093",
        "time_ms": 86400123}
VERDICT = {"type": "verdict", "scan_id": 1234, "outcome": 0, "beep": 1, "led": 1,
           "text": "核销成功：满100减20代金券 ¥20.00"}  # the same messages as tools/bench/codec.py


def build(msg):
    payload = messages.encode(msg)
    return frame.encode(cose.mac0(KEY, cose.ALG_HMAC256, KID, COUNTER, payload))


_deframer = frame.Deframer()


def parse(wire):
    out = None
    _deframer.push(wire)
    item = _deframer.take()
    while item is not None:  # as the device's link takes frames: one at a time
        if isinstance(item, Exception):
            raise item
        m = cose.parse(item)
        m.verify(KEY)
        out = messages.decode(m.payload)
        item = _deframer.take()
    return out


def _loop(fn, arg, n):
    t0 = time.ticks_us()
    for _ in range(n):
        fn(arg)
    return time.ticks_diff(time.ticks_us(), t0)


def _alloc(fn, arg):
    # bytes one call allocates (live or garbage): the heap it needs with no GC in between
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        fn(arg)
        return gc.mem_alloc() - before
    finally:
        gc.enable()


def main(argv):
    mode = argv[0] if argv else "full"
    frames = int(argv[1]) if len(argv) > 1 else 0  # 0: as many as the budget allows
    budget_ms = int(argv[2]) if len(argv) > 2 else 2000
    rounds = max(1, int(argv[3]) if len(argv) > 3 else 5)

    # bytes, as a UART read gives them (build() returns a view of its buffer on the device)
    wires = {"scan": bytes(build(SCAN)), "verdict": bytes(build(VERDICT))}
    if parse(wires["scan"]) != SCAN or parse(wires["verdict"]) != VERDICT:
        raise AssertionError("parse(build(msg)) != msg")
    ops = (
        ("build_scan", build, SCAN),
        ("build_verdict", build, VERDICT),
        ("parse_scan", parse, wires["scan"]),
        ("parse_verdict", parse, wires["verdict"]),
    )
    gc.collect()
    live = gc.mem_alloc()
    res = {
        "mode": mode,
        "micropython": "%d.%d.%d" % sys.implementation.version[:3],
        "platform": sys.platform,
        "heap_total": gc.mem_alloc() + gc.mem_free(),
        "heap_start": _HEAP_START,
        "heap_after_import": _HEAP_IMPORTED,
        "heap_live": live,
        "wire_bytes": {"scan": len(wires["scan"]), "verdict": len(wires["verdict"])},
    }
    if mode == "fit":
        for _name, fn, arg in ops:
            _loop(fn, arg, frames or 10)
        res["ok"] = True
        _emit(res)
        return

    alloc = {}
    for name, fn, arg in ops:
        alloc[name] = _alloc(fn, arg)
    counts = {}
    for name, fn, arg in ops:
        if frames:
            counts[name] = frames
        else:  # calibrate: about budget_ms over all ops and rounds
            per = max(1, _loop(fn, arg, 5) // 5)
            counts[name] = max(1, budget_ms * 1000 // (len(ops) * rounds * per))
    best = {}
    for _ in range(rounds):  # interleaved rounds: drift and noise hit every op alike
        for name, fn, arg in ops:
            us = _loop(fn, arg, counts[name]) / counts[name]
            if name not in best or us < best[name]:
                best[name] = us
    res["ops"] = {}
    for name, _fn, _arg in ops:
        us = max(best[name], 0.001)
        res["ops"][name] = {"frames": counts[name], "us": us, "fps": 1e6 / us,
                            "alloc_bytes": alloc[name]}
    res["rounds"] = rounds
    # peak heap of the run: what is live between frames plus the most one frame allocates
    res["heap_peak"] = live + max(alloc.values())
    res["heap_after_link_import"] = _link_import()
    # the host compares these with its own frames: the same bytes on both sides
    res["wire_hex"] = {k: binascii.hexlify(v).decode() for k, v in wires.items()}
    res["ok"] = True
    _emit(res)


def _link_import():
    # the whole protocol (link imports every module): what the firmware pays before its own code
    try:
        import hexiao.protocol.link  # noqa: F401
    except MemoryError:
        return None
    gc.collect()
    return gc.mem_alloc()


def _emit(res):
    import json

    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
