"""Time and heap of the device's Ed25519 verifier (firmware/ed25519.py) on the MicroPython unix
port: `python -m hexiao.tools.bench.ed25519 [--size N] [--runs R] [--json]`.

What it measures, under the real MicroPython with the module compiled as a board gets it
(tools/micropython.compile_device): the heap the imported module holds (gc.mem_alloc after a
collection, before and after the import), the time of SHA-512 over the message alone and of a
whole verify (median of R runs, ticks_us), and the smallest heap (-X heapsize, 1 KB steps) in
which a verify still succeeds: the overlay's real budget, garbage and fragmentation included.
The message is a random manifest-sized text (a sim bundle's manifest.json is ~4 KB), signed by
`cryptography`; every run must verify (exit 1 otherwise): a benchmark with a wrong answer is none.

The RP2040 estimate (docs/firmware-update.md, "The verifier's cost") is arithmetic on these
figures, not a measurement: see that section for the factors and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.tools import micropython

SCRIPT = """import gc, sys, time
from binascii import unhexlify
gc.collect(); a0 = gc.mem_alloc()
from hexiao.firmware import ed25519
gc.collect(); a1 = gc.mem_alloc()
pub = unhexlify(sys.argv[1]); sig = unhexlify(sys.argv[2]); runs = int(sys.argv[3])
f = open("msg.bin", "rb"); msg = f.read(); f.close()
ts = []; th = []
for i in range(runs):
    gc.collect()
    t = time.ticks_us(); h = ed25519.Sha512(); h.update(msg); h.digest()
    th.append(time.ticks_diff(time.ticks_us(), t))
    gc.collect()
    t = time.ticks_us(); ok = ed25519.verify(pub, sig, open("msg.bin", "rb"))
    ts.append(time.ticks_diff(time.ticks_us(), t))
    if not ok:
        print("FAIL"); sys.exit(1)
ts.sort(); th.sort()
print(a1 - a0, th[len(th) // 2], ts[len(ts) // 2])
"""

# the probe: one verify as the device does it, the message read from its file 128 B at a time
PROBE = """import sys
from binascii import unhexlify
from hexiao.firmware import ed25519
if not ed25519.verify(unhexlify(sys.argv[1]), unhexlify(sys.argv[2]), open("msg.bin", "rb")):
    sys.exit(1)
"""


def run(size: int = 4096, runs: int = 5) -> dict[str, object]:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    msg = os.urandom(size // 2).hex().encode()[:size]
    sig = key.sign(msg)
    src = Path(micropython._source_dir("firmware"), "ed25519.py")
    with tempfile.TemporaryDirectory(prefix="hexiao-ed-") as tmp:
        d = Path(tmp)
        (d / "hexiao" / "firmware").mkdir(parents=True)
        for pkg in ("hexiao/__init__.py", "hexiao/firmware/__init__.py"):
            (d / pkg).write_text("")
        micropython.compile_device(src, "hexiao/firmware/ed25519.py",
                                   d / "hexiao" / "firmware" / "ed25519.mpy")
        (d / "msg.bin").write_bytes(msg)
        (d / "bench.py").write_text(SCRIPT)

        (d / "probe.py").write_text(PROBE)

        def go(heap: str, n: int, script: str = "bench.py") -> subprocess.CompletedProcess[str]:
            argv, env = micropython.command(script, d, heap=heap,
                                            args=[pub.hex(), sig.hex(), str(n)])
            return subprocess.run(argv, env=env, cwd=d, capture_output=True, text=True,
                                  timeout=300)

        r = go(micropython.HEAP, runs)
        if r.returncode or "FAIL" in r.stdout:
            raise SystemExit(f"the verifier failed on MicroPython: {r.stdout}{r.stderr}")
        code, sha_us, verify_us = (int(x) for x in r.stdout.split())
        lo, hi = 4, 64  # KB: the smallest heap in which one verify succeeds
        while lo < hi:
            mid = (lo + hi) // 2
            if go(f"{mid}k", 1, "probe.py").returncode == 0:
                hi = mid
            else:
                lo = mid + 1
    return {"message_bytes": size, "module_heap_bytes": code, "sha512_ms": sha_us / 1000,
            "verify_ms": verify_us / 1000, "min_heap_kb": lo, "runs": runs}


def main() -> None:
    args = sys.argv[1:]
    size = int(args[args.index("--size") + 1]) if "--size" in args else 4096
    runs = int(args[args.index("--runs") + 1]) if "--runs" in args else 5
    out = run(size, runs)
    if "--json" in args:
        print(json.dumps(out))
    else:
        print(f"Ed25519 verify of a {size}-byte message on the MicroPython unix port: "
              f"{out['verify_ms']:.1f} ms (SHA-512 alone {out['sha512_ms']:.1f} ms); module "
              f"{out['module_heap_bytes']} B of heap; verifies in a {out['min_heap_kb']} KB heap")


if __name__ == "__main__":
    main()
