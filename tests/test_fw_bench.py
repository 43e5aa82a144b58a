"""`hexiao bench-firmware` (tools/bench/firmware.py): the firmware under real MicroPython on the sim
board. The figures are not checked (benchmarks do not fail on slow numbers); the report's shape
and the run's exactness are, and that a wrong result fails the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hexiao.tools.bench import firmware as fw_bench
from hexiao.tools.bench.firmware import main, run


def _check_summary(s: dict, n: int) -> None:
    assert s["n"] == n
    assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]


def test_tiny_run_reports_latency_heap_and_exactness() -> None:
    r = CliRunner().invoke(main, ["--scans", "50", "--every", "10", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["ok"] is True and len(out["load_avg"]) == 3
    lat = out["latency"]
    assert lat["scans"] == 50 and lat["typed_exactly"] is True
    assert lat["hid_fs"] == fw_bench.fs_type(fw_bench.default_dir() or Path("/tmp"))
    _check_summary(lat["first_report"], 50)
    _check_summary(lat["last_report"], 50)
    assert lat["first_report"]["p50_ms"] <= lat["last_report"]["p50_ms"]  # same scans, later
    assert lat["meets_target"] == (lat["last_report"]["p99_ms"] < 10.0)

    h = out["heap"]
    assert h["exact"] == {"products_typed_exactly": True, "coupons_answered_once": True,
                          "counters": True, "exit_status_0": True}
    assert sum(h["mix"].values()) == 50 and set(h["mix"]) == {
        "product", "coupon", "garbage", "overlong"}
    assert h["mix"]["coupon"] > 0 and h["mix"]["garbage"] > 0 and h["mix"]["overlong"] > 0
    assert [s["scans"] for s in h["samples"]] == [0, 10, 20, 30, 40, 50]
    assert h["high_water"] == max(max(s["heap_peak"] for s in h["samples"]), h["final"]["peak"])
    assert h["boot_used"] <= h["high_water"]
    assert h["fits_64k"] == (h["high_water"] <= 65536)
    assert h["fits_48k"] == (h["high_water"] <= 49152)
    assert h["growth"] == h["samples"][0]["heap_free"] - h["samples"][-1]["heap_free"]
    assert h["growth_after_warmup"] == h["samples"][1]["heap_free"] - h["free_end"]
    # the device's own count of what it did, at exit
    app = h["final"]["app"]
    assert app["products"] == h["mix"]["product"] and app["verdicts"] == h["mix"]["coupon"]
    assert app["garbage"] == h["mix"]["garbage"] and app["overlong"] == h["mix"]["overlong"]


def test_a_wrong_result_fails_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # the bench's expectation of "7" made wrong: the firmware's true output no longer matches,
    # so the exactness check is shown able to fail
    monkeypatch.setitem(fw_bench.KEYS, "7", (0, 0x1E))
    r = CliRunner().invoke(main, ["--scans", "20", "--every", "10"])
    assert r.exit_code == 1
    assert "exact: typed False; products_typed_exactly False;" in r.output
    assert r.output.rstrip().endswith("FAILED: a wrong result (see exact)")


def test_a_firmware_that_cannot_start_is_reported() -> None:
    r = CliRunner().invoke(main, ["--scans", "5", "--heap", "8k"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: the firmware never opened its scanner: ")
    assert "MemoryError" in r.output


@pytest.mark.soak
def test_ten_thousand_mixed_scans_exact_and_no_heap_growth(mpy_stage: Path) -> None:
    r = run(10_000, 500, stage=mpy_stage)
    h = r["heap"]
    assert r["ok"] and r["latency"]["typed_exactly"] and all(h["exact"].values())
    assert len(h["samples"]) == 21 and h["final"]["app"]["scans"] > 0
    # Growth is measured from the sample after the first 500 scans: those fill the 12-entry
    # log ring and the link's and app's counters, once. After that heap_free (read after a
    # gc.collect, exact to the 16-byte block) varies only with what is in flight when health
    # is asked (seen: +/- 32..96 B). 256 B (16 blocks) allows that and catches a leak of even
    # one byte per 40 scans.
    assert h["growth_after_warmup"] <= 256, h["samples"]
    assert max(s["heap_free"] for s in h["samples"][1:]) - h["free_end"] <= 256, h["samples"]


def test_progress_is_told_of_every_scan() -> None:
    """Issue 16: `bench-firmware` was silent for 40 s; it now shows a progress bar on a terminal,
    fed by run()'s progress callback with every scan of both parts."""
    seen: list[int] = []
    r = run(20, 10, progress=seen.append)
    assert r["ok"] is True
    assert sum(seen) == fw_bench.total_scans(20) == fw_bench.WARMUP + 40
