"""The fleet's tools run for real, small: `hexiao demo --fleet` (two stores, the machine's broker
and PostgreSQL, its report, then headquarters operating them: a remote device health, a config
change applied and reported back), a smoke run of `hexiao fleet bench` (figures not asserted),
and headquarters' page as a systemd unit whose options are the CLI's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from fleet_conftest import drop_database, free_port


def hexiao(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("hexiao")), *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_fleet_runs_a_chain_and_its_report_matches_the_journals(
        fleet_pg_admin: str, fleet_broker: str) -> None:
    r = hexiao("demo", "--fleet", "--json", "--keep", "--broker", fleet_broker, "--fleet-dsn",
               fleet_pg_admin)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kept = [e["dsn"] for e in events if e["event"] == "kept"]
    try:
        assert r.returncode == 0, r.stderr
        # the stores' hostd notices (e.g. its embedded simulator) stay out of the demo's output
        assert "Traceback" not in r.stderr and "simulator" not in r.stderr, r.stderr
        settle = {e["store"]: e for e in events if e["event"] == "settlement"}
        assert {s: (e["face_value_fen"], e["match"]) for s, e in settle.items()} == {
            "sh-001": (10000, True), "bj-001": (6000, True)}
        assert [e["outcome"] for e in events if e["event"] == "redeemed"][-1] == "refused"
        ev = {e["event"]: e for e in events}
        # headquarters operating it: a lane's health answered by its device, over MQTT
        health = ev["remote_health"]
        assert (health["store"], health["lane"]) == ("sh-001", "lane-1")
        assert health["health"]["firmware"] == "linkpeer/0.1"
        assert ev["hq_key"]["key_id"].startswith("SHA256:")
        # a config change for all stores, published, applied and reported back as version 1
        assert ev["config_apply"]["stores"] == {s: {"version": 1, "published": True}
                                                for s in ("sh-001", "bj-001")}
        assert ev["config_applied"] == {"event": "config_applied", "ok": True,
                                        "stores": {"sh-001": 1, "bj-001": 1}}
        assert ev["web"]["command"][:2] == ["hexiao-fleetd", "web"]
        assert [e["event"] for e in events][-3:] == ["offline", "result", "kept"]
        assert ev["result"] == {"event": "result", "ok": True}
        # what headquarters' database says of it (the database --keep kept)
        (dsn,) = kept
        with psycopg.connect(dsn, autocommit=True) as conn:
            asked = conn.execute("SELECT store, lane, cmd, outcome, key_id FROM "
                                 "remote_requests").fetchall()
            applied = conn.execute("SELECT store, applied FROM desired_reports ORDER BY "
                                   "store").fetchall()
        assert asked == [("sh-001", "lane-1", "device.health", "answered",
                          ev["hq_key"]["key_id"])]
        assert applied == [("bj-001", 1), ("sh-001", 1)]
    finally:
        for dsn in kept:
            drop_database(fleet_pg_admin, dsn)


def test_demo_fleet_text_lines_stay_within_80_columns(fleet_pg_admin: str,
                                                      fleet_broker: str) -> None:
    r = hexiao("demo", "--fleet", "--broker", fleet_broker, "--fleet-dsn", fleet_pg_admin)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if len(ln) > 80] == []
    assert any(ln.startswith("  sh-001 lane-1 device health, over MQTT: linkpeer/0.1")
               for ln in lines)
    assert "  reported back: bj-001 runs v1, sh-001 runs v1; their lanes type Tab now" in lines
    assert "hexiao-fleetd web --dsn $D" in r.stdout and "Traceback" not in r.stderr


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


def test_fleet_bench_remote_health_probes_go_the_real_path(fleet_pg_admin: str,
                                                           fleet_broker: str) -> None:
    r = hexiao("fleet", "bench", "--lanes", "3", "--lanes-per-store", "2", "--seconds", "1",
               "--workers", "1", "--fleetd", "1", "--no-naive", "--no-faults", "--remote", "6",
               "--json", "--broker", fleet_broker, "--admin-dsn", fleet_pg_admin)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    # every ask answered by its lane's store (a wrong or missing answer is a failure by kind)
    assert (res["remote_asked"], res["remote_failed"]) == (6, {})
    assert 0 < res["remote_p50_ms"] <= res["remote_p99_ms"] <= res["remote_max_ms"]
    assert len(res["load_avg"]) == 3


def test_the_web_unit_is_shipped_and_documents_every_web_option_fleetd_reads() -> None:
    """udev/hexiao-fleetd-web.service passes options through its EnvironmentFile: every option
    of `hexiao-fleetd web` is listed by the variable it really reads, nothing else is, and the
    unit is in the installed package data beside hexiao-fleetd.service."""
    import re

    from click.testing import CliRunner
    from hexiao.fleetd.main import main
    from hexiao.fleetd.web.cli import web
    from hexiao.tools.install.system import data_file

    unit = data_file("hexiao-fleetd-web.service")
    assert unit == (Path(__file__).parents[1] / "udev" / "hexiao-fleetd-web.service").read_text()
    assert "\nEnvironmentFile=-/etc/hexiao/fleetd-web.env\n" in unit
    assert "\nExecStart=hexiao-fleetd web\n" in unit
    want = {p.envvar or f"HEXIAO_FLEETD_WEB_{(p.name or '').upper()}"
            for p in web.params if p.name != "help"}
    assert set(re.findall(r"^#   (HEXIAO_\w+)=", unit, re.M)) == want
    cli = CliRunner()
    r = cli.invoke(main, ["web"], env={"HEXIAO_FLEETD_WEB_LISTEN": "nowhere"})
    assert r.exit_code == 2 and "--listen" in r.output
    r = cli.invoke(main, ["web"], env={"HEXIAO_FLEETD_WEB_TIMEZONE": "Mars/Olympus"})
    assert r.exit_code == 2 and "--timezone" in r.output
    r = cli.invoke(main, ["web"], env={"HEXIAO_FLEETD_WEB_REFRESH": "0"})
    assert r.exit_code == 2 and "--refresh" in r.output


def test_demo_fleet_device_modules_that_cannot_compile_are_one_line(tmp_path: Path) -> None:
    """The demo stages the devices' modules on a thread; a failure there is the demo's one-line
    failure (exit 1), not a traceback on another thread."""
    from hexiao.tools.demo import fleet_hq

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(fleet_hq.Failed, match="cannot compile the device's modules"):
        fleet_hq.Stager(blocker / "device").get(60)
