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


def main(argv):
    a = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        a[k] = v
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
