"""`hexiao bench` runs and reports every figure; its MicroPython heap search and device runner
handle out-of-heap, crashing, silent and hanging runs. No timing is asserted: benchmarks only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hexiao.tools.bench import codec as bench
from hexiao.tools.micropython import executable


def _positive(d: dict[str, Any], *keys: str) -> None:
    for k in keys:
        assert isinstance(d[k], (int, float)) and not isinstance(d[k], bool), k
        assert d[k] > 0, (k, d[k])


def _hexiao(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([executable("hexiao"), *args], capture_output=True, text=True,
                          timeout=300)


def test_bench_json_reports_every_figure() -> None:
    p = _hexiao("bench", "--frames", "3", "--rounds", "2", "--steps", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)

    m = report["machine"]
    assert m["python"] and m["implementation"] == "CPython" and m["cbor2"] and m["pycose"]
    _positive(m, "cpu_count")

    host = report["host"]
    assert set(host["paths"]) == {"ours", "bare", "pycose"}
    for row in host["paths"].values():
        _positive(row, "build_us", "build_fps", "parse_us", "parse_fps", "roundtrip_us",
                  "roundtrip_fps")
        assert row["frames_per_round"] == 3
        assert set(row["per_message"]) == set(bench.MESSAGES)
        for per in row["per_message"].values():
            _positive(per, "build_us", "parse_us")
    for name in bench.MESSAGES:
        _positive(host["messages"][name], "wire_bytes")
    assert set(host["ratios"]) == {"ours_bare", "pycose_bare", "ours_pycose"}
    for ratio in host["ratios"].values():
        _positive(ratio, "build", "parse", "roundtrip")
    assert isinstance(host["target"]["met"], bool)
    assert host["target"]["ours_bare_roundtrip_max"] == 2.0

    for per in report["steps"].values():
        assert set(per) == set(bench.MESSAGES)
        _positive(per, *bench.MESSAGES)

    mpy = report["mpy"]
    assert mpy["ok"] is True and mpy["micropython"]
    assert list(mpy["ops"]) == list(bench.DEVICE_OPS)
    for op in mpy["ops"].values():
        _positive(op, "us", "fps", "alloc_bytes")
        assert op["frames"] == 3
    _positive(mpy, "heap_total", "heap_start", "heap_after_import", "heap_live", "heap_peak",
              "heap_run_kb", "heap_min_kb")
    assert mpy["heap_start"] < mpy["heap_after_import"] <= mpy["heap_live"] <= mpy["heap_peak"]
    assert mpy["heap_peak"] <= mpy["heap_total"]
    assert mpy["heap_min_kb"] <= mpy["heap_run_kb"]
    assert mpy["fits_64k"] == (mpy["heap_min_kb"] <= 64)
    _positive(mpy["wire_bytes"], "scan", "verdict")
    assert set(mpy["wire_hex"]) == {"scan", "verdict"}
    assert mpy["same_frames_as_host"] is True  # the device builds the host's bytes exactly
    # the smallest heap is bracketed: it ran there, and 1 KB less did not
    tried = {t["heap_kb"]: t["ok"] for t in mpy["heap_tried"] if not t.get("full")}
    assert tried[mpy["heap_min_kb"]] is True
    assert tried.get(mpy["heap_min_kb"] - 1, False) is False


def test_bench_table_no_mpy() -> None:
    p = _hexiao("bench", "--frames", "2", "--rounds", "1", "--no-mpy")
    assert p.returncode == 0, p.stderr
    for text in ("ours (hexiao.protocol)", "bare (cbor2+hmac+cobs)", "pycose", "ours/bare",
                 "round trip", "MicroPython: skipped"):
        assert text in p.stdout


def test_seconds_and_frames_are_exclusive() -> None:
    p = _hexiao("bench", "--frames", "2", "--seconds", "1", "--no-mpy")
    assert p.returncode == 2
    assert "--seconds or --frames" in p.stderr


# ---- the heap search, with a fake device that runs out of heap below a threshold ----------


def _fake_device(monkeypatch: pytest.MonkeyPatch, needs_kb: int, full_needs_kb: int) -> None:
    def device(staged: Path, heap_kb: int, args: list[str], timeout: float) -> dict | None:
        if heap_kb < (needs_kb if args[0] == "fit" else full_needs_kb):
            return None
        return {"ok": True, "ops": {op: {"us": 1.0} for op in bench.DEVICE_OPS},
                "wire_hex": {"scan": bench._wire(bench.MESSAGES["scan"]).hex()}}

    monkeypatch.setattr(bench, "_device", device)
    monkeypatch.setattr(bench.micropython, "stage", lambda dest: dest)


@pytest.mark.parametrize(("needs", "first"), [(43, 64), (64, 64), (65, 96), (100, 128)])
def test_fit_search_finds_smallest_heap(monkeypatch, needs: int, first: int) -> None:
    _fake_device(monkeypatch, needs, needs)
    got_first, smallest, tried = bench._fit_search(Path("."))
    assert (got_first, smallest) == (first, needs)
    assert {"heap_kb": needs, "ok": True} in tried
    if needs - 1 > bench.MIN_PROBE_KB:
        assert {"heap_kb": needs - 1, "ok": False} in tried


def test_does_not_fit_64k_is_reported(monkeypatch) -> None:
    _fake_device(monkeypatch, 80, 80)
    res = bench.measure_mpy(2, 1.0, 1)
    assert (res["fits_64k"], res["heap_min_kb"], res["heap_run_kb"]) == (False, 80, 96)
    lines = bench._mpy_table({**res, "micropython": "1.29.0", "heap_total": 1, "heap_start": 1,
                              "heap_after_import": 1, "heap_live": 1, "heap_peak": 1,
                              "ops": {op: {"us": 1.0, "fps": 1.0, "alloc_bytes": 1}
                                      for op in bench.DEVICE_OPS}})
    assert any("DOES NOT FIT a 64 KB heap" in ln and "80 KB" in ln for ln in lines)


def test_full_run_moves_up_the_ladder_when_out_of_heap(monkeypatch) -> None:
    _fake_device(monkeypatch, 40, 70)  # fits at 40k, but the GC-off probe needs 70k
    res = bench.measure_mpy(2, 1.0, 1)
    assert (res["fits_64k"], res["heap_min_kb"], res["heap_run_kb"]) == (True, 40, 96)
    assert {"heap_kb": 64, "ok": False, "full": True} in res["heap_tried"]


def test_nothing_fits_is_an_error(monkeypatch) -> None:
    _fake_device(monkeypatch, 10_000, 10_000)
    with pytest.raises(bench.DeviceError, match="does not run in any heap"):
        bench.measure_mpy(2, 1.0, 1)


# ---- the device runner, on real MicroPython with stand-in modules -------------------------


@pytest.fixture
def fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def make(body: str) -> Path:
        (tmp_path / "fakebench.py").write_text(body)
        monkeypatch.setattr(bench, "DEVICE_MODULE", "fakebench")
        return tmp_path

    return make


def test_device_result_is_the_last_json_line(fake_module) -> None:
    staged = fake_module('print("noise")\nprint(\'{"ok": true, "n": 7}\')\n')
    assert bench._device(staged, 64, [], timeout=60) == {"ok": True, "n": 7}


def test_device_memory_error_means_heap_too_small(fake_module) -> None:
    staged = fake_module("x = bytearray(1 << 20)\n")
    assert bench._device(staged, 64, [], timeout=60) is None


def test_device_crash_is_an_error(fake_module) -> None:
    staged = fake_module('raise ValueError("boom")\n')
    with pytest.raises(bench.DeviceError, match="boom"):
        bench._device(staged, 64, [], timeout=60)


def test_device_without_result_is_an_error(fake_module) -> None:
    staged = fake_module('print("no json here")\n')
    with pytest.raises(bench.DeviceError, match="no result"):
        bench._device(staged, 64, [], timeout=60)


def test_device_hang_is_an_error(fake_module) -> None:
    staged = fake_module("while True:\n    pass\n")
    with pytest.raises(bench.DeviceError, match="timed out"):
        bench._device(staged, 64, [], timeout=1)


def test_device_frames_that_differ_from_the_host_are_flagged(monkeypatch) -> None:
    _fake_device(monkeypatch, 40, 40)
    real = bench._device

    def device(staged: Path, heap_kb: int, args: list[str], timeout: float) -> dict | None:
        res = real(staged, heap_kb, args, timeout)
        if res is not None:
            res["wire_hex"] = {"scan": bench._wire(bench.MESSAGES["verdict"]).hex()}
        return res

    monkeypatch.setattr(bench, "_device", device)
    assert bench.measure_mpy(2, 1.0, 1)["same_frames_as_host"] is False
