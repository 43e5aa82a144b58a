"""`hexiao bench-hostd`, run tiny: the report has every figure, and exactly-once holds under it
(the real Daemon, CPython device processes on ptys, the simulator in its own process). No timing
is asserted: a benchmark reports numbers, it does not fail on them."""

from __future__ import annotations

import json

from click.testing import CliRunner
from hexiao.tools.bench import hostd as hostd_bench


def test_a_tiny_run_reports_every_figure_and_consumes_each_code_once() -> None:
    result = CliRunner().invoke(hostd_bench.main, ["--lanes", "2", "--redemptions", "10",
                                                   "--per-lane", "5", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    lat = r["latency"]
    for journal in ("disk", "tmpfs"):
        assert lat[journal]["own"]["n"] == 10
        assert lat[journal]["accepted"] == 10 + hostd_bench.WARMUP  # warm-ups consume too
        assert set(lat[journal]["own"]) == {"n", "p50_ms", "p99_ms", "max_ms"}
        assert r["journal_commit"][journal]["n"] == 50
    assert lat["tmpfs"]["fs"] == "tmpfs"
    # received, get_sent, checked, consume_sent, done: each committed before its network call
    assert lat["journal_commits_per_redemption"] == 5
    load = r["throughput"]
    assert (load["lanes"], load["redemptions"], load["accepted"]) == (2, 10, 10)
    assert load["scan_to_verdict"]["n"] == 10 and load["per_s"] > 0
    assert r["end_to_end"]["scans"] == 10 and r["end_to_end"]["n"] == 9
    once = r["exactly_once"]
    assert once["double_consumes"] == 0
    assert once["consumed"] == once["expected_consumed"] == 2 * (10 + hostd_bench.WARMUP) + 10 + 10
    assert isinstance(r["target_met"], bool) and r["target_p99_ms"] == 5.0


def test_the_printed_report_names_the_target_and_the_verdict_on_it() -> None:
    r = {"python": "3", "cpus": 2, "target_p99_ms": 5.0, "target_met": False,
         "latency": {"journal_commits_per_redemption": 5, **{
             j: {"fs": j, "accepted": 1, "own": {"n": 2, "p50_ms": 4.0, "p99_ms": 6.5,
                                                 "max_ms": 7.0},
                 "http_per_call": {"n": 0}} for j in ("disk", "tmpfs")}},
         "journal_commit": {j: {"n": 1, "p50_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0}
                            for j in ("disk", "tmpfs")},
         "end_to_end": {"scans": 1, "n": 0},
         "throughput": {"lanes": 50, "redemptions": 1000, "accepted": 1000, "seconds": 2.0,
                        "per_s": 500.0, "scan_to_verdict": {"n": 1, "p50_ms": 1.0,
                                                            "p99_ms": 1.0, "max_ms": 1.0},
                        "hostd_cpu_ms_per_redemption": 2.0, "hostd_capacity_per_core_s": 500.0},
         "exactly_once": {"double_consumes": 0, "consumed": 1000, "expected_consumed": 1000}}
    text = hostd_bench.render(r)
    assert "Target: own time p99 <= 5 ms (journal on disk): 6.500 ms -> MISSED" in text
    assert "1000 redemptions in 2.0 s = 500.0 redemptions/s" in text
    assert "hostd CPU per redemption 2.0 ms" in text and "~500.0/s" in text
    assert "(no samples)" in text and "0 double consumes" in text


def test_percentiles_are_nearest_rank_in_ms() -> None:
    xs = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    from hexiao.tools.bench.stats import pct, summary

    assert summary(xs) == {"n": 100, "p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0}
    assert pct([0.002], 99) == 2.0
