"""`hexiao bench`: what the link codec costs, on this host and on the MicroPython unix port.

Host: our build and receive paths timed side by side with the bare primitives they are made of
(cbor2 + hmac + cobs) and with a general COSE library (pycose), on the same realistic messages.
Rounds are interleaved (each round times every path once, in a rotated order) and the best round
counts, so drift and noise hit every path alike. DESIGN.md's bar: ours costs at most 2x bare per
round trip and beats pycose. Bare does none of the spec's checks (COSE headers, CRC, canonical
CBOR, schema); `--steps` times each stage of ours to show which of them costs what.

MicroPython: frames/s of build and parse on the real unix port running staged .mpy
(firmware/bench_device.py), the heap after imports and the run's peak, and the smallest
-X heapsize the codec runs in; a run that does not fit 64 KB is reported, never hidden.
Benchmarks are not tests: nothing here fails on a slow number.
"""

from __future__ import annotations

import gc
import hmac
import itertools
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import cbor2
import click
from cobs import cobs as cobs_c
from hexiao.protocol import codecs, cose, frame, messages
from hexiao.protocol.errors import ProtocolError
from hexiao.tools import micropython

KEY = bytes(range(32))  # a fixed test key; nothing secret
KID = b"HX\x00\x00\x00\x00\x00\x01"
COUNTER = 4242
ALG = cose.ALG_HMAC256
TARGET_RATIO = 2.0  # DESIGN.md "Quality bars": ours <= 2x the bare calls, per round trip
ROUNDS = 5
DEFAULT_SECONDS = 3.0

# realistic traffic: a coupon scan, a verdict in Chinese, a health report, a rule set
MESSAGES: dict[str, dict[str, Any]] = {
    "scan": {"type": "scan", "scan_id": 1234, "symbology": "]Q1", "data": b"287463512093",
             "time_ms": 86_400_123},
    "verdict": {"type": "verdict", "scan_id": 1234, "outcome": 0, "beep": 1, "led": 1,
                "text": "核销成功：满100减20代金券 ¥20.00"},
    "health": {"type": "health", "uptime_ms": 3_600_000_123, "reset_cause": "power_on",
               "firmware": "hexiao-fw 0.1.0", "heap_free": 21_504, "heap_peak": 43_008,
               "link": {1: 3, 11: 0, 12: 0, 64: 18_233, 65: 18_240, 66: 7, 67: 2},  # by number
               "app": {"scans": 9_120, "products": 8_911, "coupons": 209}},
    "rules": {"type": "rules", "version": 3, "default": 0, "rules": [
        {"action": 1, "symbologies": ["]Q1", "]C0"], "min_len": 12, "max_len": 12},
        {"action": 0, "symbologies": ["]E0"], "min_len": 8, "max_len": 13, "check": 1},
        {"action": 1, "symbologies": ["]C0"], "prefix": b"WX", "min_len": 10},
    ]},
}

Fn = Callable[[], object]
PATHS = ("ours", "bare", "pycose")


def _wire(msg: dict[str, Any]) -> bytes:
    return frame.encode(codecs.mac0(KEY, ALG, KID, COUNTER, codecs.encode(msg)))


def _ours(msg: dict[str, Any]) -> tuple[Fn, Fn]:
    def build() -> bytes:
        return frame.encode(codecs.mac0(KEY, ALG, KID, COUNTER, codecs.encode(msg)))

    wire = build()
    deframer = frame.Deframer()  # one per stream, as a receiver keeps it

    def parse() -> dict[str, Any]:
        (item,) = deframer.feed(wire)
        if isinstance(item, ProtocolError):
            raise item
        m = codecs.parse(item)
        m.verify(KEY)
        return codecs.decode(m.payload)

    if parse() != msg:
        raise RuntimeError(f"ours: parse(build(msg)) != msg for {msg['type']}")
    return build, parse


def _bare(msg: dict[str, Any]) -> tuple[Fn, Fn]:
    # the primitives alone: no COSE envelope, CRC, canonical check or schema validation
    wire_map = messages.to_wire(msg)

    def build() -> bytes:
        body = cbor2.dumps(wire_map)
        return cobs_c.encode(body + hmac.digest(KEY, body, "sha256")) + b"\x00"

    wire = build()

    def parse() -> object:
        raw = cobs_c.decode(wire[:-1])
        body = raw[:-32]
        if not hmac.compare_digest(hmac.digest(KEY, body, "sha256"), raw[-32:]):
            raise RuntimeError("bare: MAC mismatch")
        return cbor2.loads(body)

    if parse() != wire_map:
        raise RuntimeError(f"bare: round trip failed for {msg['type']}")
    return build, parse


def _pycose(msg: dict[str, Any]) -> tuple[Fn, Fn] | None:
    # bare with pycose's Mac0Message in place of the hand-made MAC (same headers as ours)
    try:
        from pycose.algorithms import HMAC256
        from pycose.headers import KID as KID_HDR
        from pycose.headers import Algorithm, PartialIV
        from pycose.keys import SymmetricKey
        from pycose.messages import Mac0Message
    except ImportError:
        return None
    wire_map = messages.to_wire(msg)
    key = SymmetricKey(k=KEY)
    piv = cose.piv_bytes(COUNTER)

    def build() -> bytes:
        phdr = {Algorithm: HMAC256, KID_HDR: KID, PartialIV: piv}
        m = Mac0Message(phdr=phdr, uhdr={}, payload=cbor2.dumps(wire_map), key=key)
        return cobs_c.encode(m.encode()) + b"\x00"

    wire = build()

    def parse() -> object:
        # CoseMessage.decode's own steps: cbor2 6 decodes a tag's content immutable (tuple,
        # frozendict), which pycose 1.1.0 rejects (pycose issue #141), hence the list and dict
        tagged = cbor2.loads(cobs_c.decode(wire[:-1]))
        if tagged.tag != Mac0Message.cbor_tag:
            raise RuntimeError("pycose: not a COSE_Mac0")
        prot, unprot, payload, tag = tagged.value
        m = Mac0Message.from_cose_obj([prot, dict(unprot), payload, tag], True)
        m.key = key
        if not m.verify_tag():
            raise RuntimeError("pycose: MAC mismatch")
        return cbor2.loads(m.payload)

    if parse() != wire_map:
        raise RuntimeError(f"pycose: round trip failed for {msg['type']}")
    return build, parse


def _run(fn: Fn, n: int) -> int:
    """ns for n calls of fn."""
    t0 = time.perf_counter_ns()
    for _ in itertools.repeat(None, n):
        fn()
    return time.perf_counter_ns() - t0


def _calibrate(fn: Fn, budget_ns: float) -> int:
    # calls that take about budget_ns, from a sample of at least 5 ms
    n = 1
    while True:
        ns = _run(fn, n)
        if ns >= 5_000_000:
            return max(1, int(budget_ns * n / ns))
        n *= 2


Key = tuple[str, ...]


def _time_all(
    fns: dict[Key, Fn], frames: int | None, seconds: float, rounds: int
) -> tuple[dict[Key, float], dict[Key, int]]:
    """Best-of-rounds ns per call of every fn, and the calls per round, in interleaved rounds."""
    keys = list(fns)
    gc.collect()
    gc.disable()  # as timeit does: a collection landing in one batch would skew that path only
    try:
        if frames:
            counts = dict.fromkeys(keys, frames)
        else:
            per_batch = seconds * 1e9 / (len(keys) * rounds)
            counts = {k: _calibrate(fns[k], per_batch) for k in keys}
        best: dict[Key, float] = {}
        for r in range(rounds):
            k0 = r * len(keys) // rounds  # rotate the order so no path always runs first
            for k in keys[k0:] + keys[:k0]:
                ns = _run(fns[k], counts[k]) / counts[k]
                best[k] = min(ns, best.get(k, ns))
    finally:
        gc.enable()
    return best, counts


def measure_host(frames: int | None, seconds: float, rounds: int) -> dict[str, Any]:
    """Every (path, message, direction) timed side by side, and the summary with the ratios."""
    makers = {"ours": _ours, "bare": _bare, "pycose": _pycose}
    fns: dict[Key, Fn] = {}
    for path, make in makers.items():
        for name, msg in MESSAGES.items():
            pair = make(msg)
            if pair is not None:
                fns[(path, name, "build")] = pair[0]
                fns[(path, name, "parse")] = pair[1]
    best, counts = _time_all(fns, frames, seconds, rounds)
    return _summarize(best, counts, rounds)


def measure_steps(frames: int | None, seconds: float, rounds: int) -> dict[str, Any]:
    """µs of each stage of our two paths, per message, next to the bare primitives: where the
    time goes (public API only, so it stays valid while the protocol code changes)."""
    fns: dict[Key, Fn] = {}
    for name, msg in MESSAGES.items():
        w = messages.to_wire(msg)
        payload = codecs.encode(msg)
        c = codecs.mac0(KEY, ALG, KID, COUNTER, payload)
        wire = frame.encode(c)
        m = codecs.parse(c)
        deframer = frame.Deframer()
        tag = hmac.digest(KEY, payload, "sha256")
        stuffed = cobs_c.encode(payload + tag)
        stages: dict[str, Fn] = {
            "build: messages.encode": lambda msg=msg: codecs.encode(msg),
            "build: cose.mac0": lambda p=payload: codecs.mac0(KEY, ALG, KID, COUNTER, p),
            "build: frame.encode": lambda c=c: frame.encode(c),
            "parse: Deframer.feed": lambda d=deframer, x=wire: d.feed(x),
            "parse: cose.parse": lambda c=c: codecs.parse(c),
            "parse: Mac0.verify": lambda m=m: m.verify(KEY),
            "parse: messages.decode": lambda p=payload: codecs.decode(p),
            "bare: cbor2.dumps": lambda w=w: cbor2.dumps(w),
            "bare: hmac.digest": lambda p=payload: hmac.digest(KEY, p, "sha256"),
            "bare: cobs.encode": lambda x=payload + tag: cobs_c.encode(x),
            "bare: cobs.decode": lambda x=stuffed: cobs_c.decode(x),
            "bare: hmac.compare_digest": lambda t=tag: hmac.compare_digest(t, t),
            "bare: cbor2.loads": lambda p=payload: cbor2.loads(p),
        }
        for stage, fn in stages.items():
            fns[(stage, name)] = fn
    best, _ = _time_all(fns, frames, seconds, rounds)
    out: dict[str, Any] = {}
    for (stage, name), ns in best.items():
        out.setdefault(stage, {})[name] = ns / 1000
    return out


def _summarize(best: dict[Key, float], counts: dict[Key, int], rounds: int) -> dict[str, Any]:
    names = list(MESSAGES)
    paths: dict[str, Any] = {}
    for path in PATHS:
        if (path, names[0], "build") not in best:
            continue
        per = {n: {d + "_us": best[(path, n, d)] / 1000 for d in ("build", "parse")}
               for n in names}
        row: dict[str, Any] = {}
        for d in ("build", "parse"):
            us = sum(per[n][d + "_us"] for n in names) / len(names)  # mean over the messages
            row[d + "_us"] = us
            row[d + "_fps"] = 1e6 / us
        row["roundtrip_us"] = row["build_us"] + row["parse_us"]
        row["roundtrip_fps"] = 1e6 / row["roundtrip_us"]
        row["frames_per_round"] = min(counts[(path, n, d)] for n in names
                                      for d in ("build", "parse"))
        row["per_message"] = per
        paths[path] = row
    ratios: dict[str, dict[str, float]] = {}
    for a, b in (("ours", "bare"), ("pycose", "bare"), ("ours", "pycose")):
        if a in paths and b in paths:
            ratios[f"{a}_{b}"] = {
                k: paths[a][k + "_us"] / paths[b][k + "_us"]
                for k in ("build", "parse", "roundtrip")
            }
    wire = {n: len(_wire(m)) for n, m in MESSAGES.items()}
    rt = ratios["ours_bare"]["roundtrip"]
    return {
        "rounds": rounds, "statistic": "best of rounds; per frame, mean over the messages",
        "messages": {n: {"wire_bytes": wire[n]} for n in names},
        "paths": paths, "ratios": ratios,
        "target": {"ours_bare_roundtrip_max": TARGET_RATIO, "met": rt <= TARGET_RATIO},
    }


# ---- MicroPython -------------------------------------------------------------------------

DEVICE_MODULE = "hexiao.firmware.bench_device"
HEAP_LADDER_KB = (64, 96, 128, 192, 256, 512)
MIN_PROBE_KB = 8  # below this nothing can run; the search for the smallest heap starts here


class DeviceError(click.ClickException):
    pass


def _device(
    staged: Path, heap_kb: int, args: list[str], timeout: float
) -> dict[str, Any] | None:
    """Run the device benchmark; its JSON result, or None on MemoryError (heap too small)."""
    argv, env = micropython.command(DEVICE_MODULE, staged, heap=f"{heap_kb}k", args=args)
    try:
        p = subprocess.run(argv, env=env, cwd=staged, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"MicroPython benchmark timed out after {timeout:.0f} s") from None
    if p.returncode != 0:
        if "MemoryError" in p.stderr or "MemoryError" in p.stdout:
            return None
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise DeviceError(f"MicroPython benchmark failed at {heap_kb}k: " + " | ".join(tail))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise DeviceError(f"MicroPython benchmark printed no result: {p.stdout[-200:]!r}")
    return json.loads(lines[-1])


def _fit_search(staged: Path) -> tuple[int | None, int | None, list[dict[str, Any]]]:
    """(first heap of the ladder that runs, smallest heap in 1 KB steps that runs, tries)."""
    tried: list[dict[str, Any]] = []

    def fits(kb: int) -> bool:
        ok = _device(staged, kb, ["fit", "20"], timeout=60) is not None
        tried.append({"heap_kb": kb, "ok": ok})
        return ok

    lo, first = MIN_PROBE_KB, None
    for kb in HEAP_LADDER_KB:
        if fits(kb):
            first = kb
            break
        lo = kb
    if first is None:
        return None, None, tried
    hi = first
    while hi - lo > 1:  # invariant: lo fails (or is below anything that could), hi runs
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return first, hi, tried


DEVICE_OPS = ("build_scan", "build_verdict", "parse_scan", "parse_verdict")


def measure_mpy(frames: int | None, seconds: float, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hexiao-bench-") as tmp:
        staged = micropython.stage(Path(tmp))
        first, smallest, tried = _fit_search(staged)
        if first is None:
            raise DeviceError("the codec does not run in any heap up to "
                              f"{HEAP_LADDER_KB[-1]} KB under MicroPython")
        args = ["full", str(frames or 0), str(int(seconds * 1000)), str(rounds)]
        # timed at the first ladder heap that fits (64k if it does), not at a tight one where
        # the GC would run on every frame; the full run also needs room for one frame with GC off
        for kb in [k for k in HEAP_LADDER_KB if k >= first]:
            res = _device(staged, kb, args, timeout=120 + seconds * 4)
            tried.append({"heap_kb": kb, "ok": res is not None, "full": True})
            if res is not None:
                res["ops"] = {op: res["ops"][op] for op in DEVICE_OPS}  # MicroPython dict order
                res["same_frames_as_host"] = all(
                    bytes.fromhex(res["wire_hex"][n]) == _wire(MESSAGES[n]) for n in res["wire_hex"]
                )
                res["heap_run_kb"] = kb
                res["heap_min_kb"] = smallest
                res["fits_64k"] = smallest is not None and smallest <= 64
                res["heap_tried"] = tried
                return res
    raise DeviceError("the full MicroPython benchmark ran out of heap at every size")


# ---- report ------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count() or 0,
        "cbor2": version("cbor2"), "cobs": version("cobs"), "pycose": version("pycose"),
    }


_LABEL = {"ours": "ours (hexiao.protocol)", "bare": "bare (cbor2+hmac+cobs)",
          "pycose": "pycose Mac0 (+cbor2+cobs)"}


def _host_table(host: dict[str, Any]) -> list[str]:
    sizes = ", ".join(f"{n} {v['wire_bytes']} B" for n, v in host["messages"].items())
    lines = [
        f"Host codec: µs per frame, best of {host['rounds']} interleaved rounds, mean over the "
        f"messages ({sizes} on the wire)",
        f"  {'path':<27}{'build µs':>9}{'/s':>9}{'parse µs':>10}{'/s':>9}{'trip µs':>9}"
        f"{'trips/s':>9}",
    ]
    for path, row in host["paths"].items():
        lines.append(
            f"  {_LABEL[path]:<27}{row['build_us']:>9.2f}{row['build_fps']:>9.0f}"
            f"{row['parse_us']:>10.2f}{row['parse_fps']:>9.0f}"
            f"{row['roundtrip_us']:>9.2f}{row['roundtrip_fps']:>9.0f}"
        )
    lines.append("  round trip µs per message:")
    for n in host["messages"]:
        trips = [f"{p} {r['per_message'][n]['build_us'] + r['per_message'][n]['parse_us']:.2f}"
                 for p, r in host["paths"].items()]
        lines.append(f"    {n:<8}" + ", ".join(trips))
    for key, ratio in host["ratios"].items():
        a, b = key.split("_")
        lines.append(f"  {a}/{b}: build {ratio['build']:.2f}x, parse {ratio['parse']:.2f}x, "
                     f"round trip {ratio['roundtrip']:.2f}x")
    t = host["target"]
    lines.append(f"  target ours/bare round trip <= {t['ours_bare_roundtrip_max']:.1f}x: "
                 + ("met" if t["met"] else "MISSED"))
    return lines


def _steps_table(steps: dict[str, Any]) -> list[str]:
    names = list(MESSAGES)
    lines = ["Where the time goes: µs per stage (best of rounds)",
             f"  {'stage':<30}" + "".join(f"{n:>9}" for n in names)]
    for stage, per in steps.items():
        lines.append(f"  {stage:<30}" + "".join(f"{per[n]:>9.2f}" for n in names))
    return lines


def _mpy_table(mpy: dict[str, Any]) -> list[str]:
    lines = [f"MicroPython {mpy['micropython']} unix port (this machine's CPU, not a board), "
             f"staged .mpy, -X heapsize={mpy['heap_run_kb']}k",
             f"  {'op':<16}{'µs/frame':>10}{'frames/s':>10}{'bytes allocated/frame':>23}"]
    for name, op in mpy["ops"].items():
        lines.append(f"  {name.replace('_', ' '):<16}{op['us']:>10.1f}{op['fps']:>10.0f}"
                     f"{op['alloc_bytes']:>23}")
    link = mpy.get("heap_after_link_import")
    lines += [
        f"  heap used, bytes of {mpy['heap_total']}: at start {mpy['heap_start']}, after "
        f"importing frame+cose+messages {mpy['heap_after_import']}, live between frames "
        f"{mpy['heap_live']}, peak {mpy['heap_peak']} (live + the most one frame allocates)",
        "  after importing link as well: "
        + (str(link) if link is not None else "MemoryError (does not fit next to the bench)"),
    ]
    lines.append("  device frames byte for byte the host's: "
                 + ("yes" if mpy["same_frames_as_host"] else "NO (the two codecs disagree)"))
    if mpy["fits_64k"]:
        lines.append(f"  fits a 64 KB heap; the smallest heap that runs the codec: "
                     f"{mpy['heap_min_kb']} KB")
    else:
        lines.append(f"  DOES NOT FIT a 64 KB heap: the smallest heap that runs the codec is "
                     f"{mpy['heap_min_kb']} KB")
    if mpy["heap_run_kb"] > max(64, mpy["heap_min_kb"]):
        lines.append(f"  (timed at {mpy['heap_run_kb']}k: the per-frame allocation probe, one "
                     "frame with the GC off, needed more heap)")
    return lines


def _table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"hexiao bench: {m['implementation']} {m['python']} on {m['platform']}, "
        f"{m['cpu_count']} CPUs; cbor2 {m['cbor2']}, cobs {m['cobs']}, pycose {m['pycose']}",
        "", *_host_table(report["host"]),
    ]
    if "steps" in report:
        lines += ["", *_steps_table(report["steps"])]
    if "mpy" in report:
        lines += ["", *_mpy_table(report["mpy"])]
    else:
        lines += ["", "MicroPython: skipped (--no-mpy)"]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=None,
              help=f"Time to spend measuring each part (host, steps, MicroPython); "
                   f"default {DEFAULT_SECONDS:g}.")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames per path and message in each round, instead of --seconds.")
@click.option("--rounds", type=click.IntRange(min=1), default=ROUNDS, show_default=True,
              help="Interleaved rounds; the best one counts.")
@click.option("--steps", is_flag=True, help="Also time each stage of our paths (profiling aid).")
@click.option("--mpy/--no-mpy", default=True, show_default=True,
              help="Also run the device codec on the MicroPython unix port.")
def main(as_json: bool, seconds: float | None, frames: int | None, rounds: int, steps: bool,
         mpy: bool) -> None:
    """Measure the link codec: host paths side by side with the bare primitives and pycose,
    and the device codec's speed and heap on MicroPython."""
    if seconds is not None and frames is not None:
        raise click.UsageError("give --seconds or --frames, not both")
    secs = DEFAULT_SECONDS if seconds is None else seconds
    report: dict[str, Any] = {"machine": _machine(),
                              "host": measure_host(frames, secs, rounds)}
    if steps:
        report["steps"] = measure_steps(frames, secs, rounds)
    if mpy:
        report["mpy"] = measure_mpy(frames, secs, rounds)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(_table(report))


if __name__ == "__main__":
    main()
