# A device program for tests and the demo: the link over CDC, then a scripted run of scans.
#
#   micropython -X heapsize=64k -m hexiao.firmware.linkpeer cfg=PATH [scans=N] [alg=5]
#       [rto=200] [tries=8] [codes=PATH]
#   (or id=TEXT key=HEX instead of cfg=PATH; cfg is a JSON file {"id": ..., "key": ...})
#
# codes=PATH: scan the lines of PATH (one code each, as QR ]Q1) instead of N "coupon-N"s.
# stdout is the link and carries nothing but frames; every event is reported on stderr as one
# JSON object per line ({"ev": "verdict", "scan_id": 3, ...}) so tests can check exactly-once
# and in-order delivery. It answers health_get with health; it exits when the host side hangs
# up, after reporting its link counters and heap. Kept small: its code shares the 64 KB heap.

import gc

# collect after every 2 KB allocated, from the first import on: garbage is reclaimed before
# long-lived objects land between its pieces, so the heap stays unfragmented enough for the
# link's larger tables (without this a 64 KB heap may fail a 592-byte allocation with 8 KB free)
if hasattr(gc, "threshold"):  # MicroPython
    gc.threshold(2048)
import sys
from binascii import unhexlify
from json import dumps, load

from hexiao.firmware.cdc_link import CdcLink
from hexiao.protocol import link as L
from hexiao.protocol.errors import counter_number

try:
    from gc import mem_alloc, mem_free
except ImportError:  # CPython has no heap figures to give

    def mem_alloc():
        return 0

    mem_free = mem_alloc

FIRMWARE = "linkpeer/0.1"


def log(ev, **kw):
    kw["ev"] = ev
    sys.stderr.write(dumps(kw) + "\n")


class Peer:
    def __init__(self, scans, codes=None):
        self.next = 1  # the next new scan id (no list of them: every byte of heap counts)
        self.codes = codes  # or the codes to scan, in order
        self.last = len(codes) if codes else scans
        self.retry = []  # scans a closed session did not confirm, for the next session
        self.verdicts = 0
        self.peak = 0
        self.cdc = None

    def sample(self):
        # heap in use between steps, after a collection (which also keeps fragmentation down);
        # micropython.mem_peak() is no use here: it never subtracts what the GC frees
        gc.collect()
        self.peak = max(self.peak, mem_alloc())

    def fill(self):
        cdc = self.cdc
        # one scan in flight and one waiting is enough: each queued message costs heap
        while cdc.link.pending() < 2 and cdc.link.is_open() and (
                self.retry or self.next <= self.last):
            sid = self.retry[0] if self.retry else self.next
            data = self.codes[sid - 1] if self.codes else ("coupon-%d" % sid).encode()
            if not cdc.send({"type": "scan", "scan_id": sid, "symbology": "]Q1",
                             "data": data, "time_ms": cdc.now()}):
                return  # the link's queue is full; acks make room
            if self.retry:
                self.retry.pop(0)
            else:
                self.next += 1

    def on_event(self, ev):
        kind = ev[0]
        msg = ev[1]
        if kind == L.EV_MESSAGE:
            t = msg["type"]
            if t == "verdict":
                self.verdicts += 1
                log("verdict", scan_id=msg["scan_id"], outcome=msg["outcome"], text=msg["text"])
            elif t == "health_get":
                self.sample()
                self.cdc.send({
                    "type": "health", "uptime_ms": self.cdc.now(), "reset_cause": "power_on",
                    "firmware": FIRMWARE, "heap_free": mem_free(), "heap_peak": self.peak,
                    "link": dict((counter_number(k), v) for k, v in self.cdc.link.counters.items()),
                    "app": {"verdicts": self.verdicts}})
            elif t == "ping":
                self.cdc.send({"type": "pong", "data": msg.get("data", b"")})
            elif t == "logs_get":  # this peer keeps no log ring: an empty page
                self.cdc.send({"type": "logs", "entries": [], "next": 0})
            else:
                log("message", type=t)
        elif kind == L.EV_ACKED:
            log("acked", type=msg["type"], scan_id=msg.get("scan_id"))
            self.fill()
        elif kind == L.EV_OPEN:
            log("open", version=msg["version"])
            self.fill()
        elif kind == L.EV_EXPIRED:
            # not known to be delivered: a scan is sent again in the next session (hostd
            # deduplicates by scan id); queued ones were never sent, so order is kept
            if msg["type"] == "scan":
                self.retry.append(msg["scan_id"])
            log("expired", type=msg["type"], scan_id=msg.get("scan_id"))
        elif kind == L.EV_NACKED:
            log("nacked", type=msg["type"], code=ev[2])
        else:  # EV_REJECTED (code), EV_CLOSED (reason)
            log(kind, code=msg)


def main(argv):
    a = {}
    for arg in argv:
        k, _, v = arg.partition("=")
        a[k] = v
    if "cfg" in a:
        with open(a["cfg"]) as f:
            cfg = load(f)
        cfg.update(a)
        a = cfg
    codes = None
    if "codes" in a:
        with open(a["codes"]) as f:
            codes = [line.strip().encode() for line in f if line.strip()]
    peer = Peer(int(a.get("scans", 0)), codes)
    cdc = CdcLink(a["id"].encode(), unhexlify(a["key"]), peer.on_event,
                  hello={"firmware": FIRMWARE, "board": "sim", "reset_cause": "power_on"},
                  alg=int(a.get("alg", 5)), rto_ms=int(a.get("rto", 200)),
                  max_tries=int(a.get("tries", 8)))
    peer.cdc = cdc
    peer.sample()
    log("boot", id=a["id"], firmware=FIRMWARE, heap_free=mem_free())
    a = None
    cdc.connect()
    while cdc.step():
        peer.sample()
    log("counters", link=cdc.link.counters)
    peer.sample()
    log("heap", free=mem_free(), peak=peer.peak)


if __name__ == "__main__":
    main(sys.argv[1:])
