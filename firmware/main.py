# The firmware's entry point on the sim board:
#
#   micropython -X heapsize=64k -m hexiao.firmware.main cfg=PATH scanner=PATH hid=PATH
#       [state=DIR] [rto=200] [tries=8]
#
# cfg is a JSON file {"id": ..., "key": hex} (as linkpeer's). Modules are imported one at a
# time with a collection between, so each lands in a compacted heap. On a board, main.py on
# its filesystem does the same with its own HAL (hal_rp2040 / hal_esp32s3).

import gc

if hasattr(gc, "threshold"):  # see linkpeer: keeps the 64 KB heap unfragmented
    gc.threshold(2048)
import sys

BOARD = "sim"  # this entry point wires the sim board's HAL


def refused(state):
    # The device's own check of what `hexiao flash` installed, before any of it runs: built for
    # this board, signed (a signature present), every file the manifest lists there with its
    # size and SHA-256 (a tampered or half-written file), and a security counter not below the
    # highest this device has run (a downgrade). The installer checked the Ed25519 signature; the
    # device has no Ed25519, so it holds the firmware to the manifest it was installed with.
    # Returns why the firmware must not run, or None. No manifest: a development build.
    from json import load

    try:
        with open("hexiao/manifest.json") as f:
            m = load(f)
    except OSError:
        return None
    except ValueError:
        return "its manifest is unreadable"
    if m.get("board") != BOARD:
        return "built for board %s, this is a %s board" % (m.get("board"), BOARD)
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
    if state:
        try:
            with open(state + "/fw_counter") as f:
                top = int(f.read())
        except (OSError, ValueError):
            top = 0
        if m["counter"] < top:
            return "downgraded: security counter %d is below %d" % (m["counter"], top)
        if m["counter"] > top:
            with open(state + "/fw_counter.new", "w") as f:
                f.write(str(m["counter"]))
            import os

            os.rename(state + "/fw_counter.new", state + "/fw_counter")
    return None


def main(argv):
    a = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        a[k] = v
    why = refused(a.get("state"))
    gc.collect()
    if why:
        sys.stderr.write('{"ev": "refused", "why": "%s"}\n' % why)
        sys.exit(3)  # safe mode: nothing of this firmware runs
    from json import load

    with open(a["cfg"]) as f:
        cfg = load(f)
    from binascii import unhexlify

    kid, key = cfg["id"].encode(), unhexlify(cfg["key"])
    cfg = load = None
    gc.collect()
    from hexiao.firmware.hal_sim import Board, emit

    board = Board(a)
    gc.collect()
    from hexiao.firmware.app import App

    gc.collect()
    app = App(board, kid, key, {"rto_ms": int(a.get("rto", 200)),
                                "max_tries": int(a.get("tries", 8)), "queue_max": 4})
    a = None
    app.sample()
    emit({"ev": "boot", "board": board.name, "heap_free": gc.mem_free(), "heap_used": app.peak})
    app.run()
    app.sample()
    emit({"ev": "heap", "free": gc.mem_free(), "peak": app.peak, "app": app.n})


main(sys.argv[1:])
