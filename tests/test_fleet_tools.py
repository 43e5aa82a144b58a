"""The fleet's tools run for real, small: `hexiao demo --fleet` (two stores, the machine's broker
and PostgreSQL, its report) and a smoke run of `hexiao fleet bench` (figures not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fleet_conftest import free_port


def hexiao(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("hexiao")), *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_fleet_runs_a_chain_and_its_report_matches_the_journals(
        fleet_pg_admin: str, fleet_broker: str) -> None:
    r = hexiao("demo", "--fleet", "--json", "--broker", fleet_broker, "--fleet-dsn",
               fleet_pg_admin)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    settle = {e["store"]: e for e in events if e["event"] == "settlement"}
    assert {s: (e["face_value_fen"], e["match"]) for s, e in settle.items()} == {
        "sh-001": (10000, True), "bj-001": (6000, True)}
    assert [e["outcome"] for e in events if e["event"] == "redeemed"][-1] == "refused"
    assert events[-1] == {"event": "result", "ok": True}


def test_demo_fleet_without_a_broker_says_so_in_one_line(fleet_pg_admin: str) -> None:
    r = hexiao("demo", "--fleet", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "no MQTT broker" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_fleet_bench_smoke(fleet_pg_admin: str, fleet_broker: str) -> None:
    r = hexiao("fleet", "bench", "--lanes", "4", "--seconds", "1", "--workers", "1",
               "--fleetd", "1", "--no-naive", "--no-faults", "--json", "--broker",
               fleet_broker, "--admin-dsn", fleet_pg_admin)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    assert res["lanes"] == 4 and res["committed"] > 0
    assert (res["rows"], res["lost"], res["duplicates"]) == (res["committed"], 0, 0)
