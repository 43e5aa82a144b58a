"""hostd's health and events (hostd/fleet/health.py) and fleetd's alarms and metrics, through
the real outbox, Mosquitto and PostgreSQL. Clocks are passed in; alarm thresholds are set so
that no test waits for minutes to pass."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_conftest import free_port, wait_until
from hexiao.fleetd import metrics
from hexiao.fleetd.alarms import Alarms, Thresholds
from hexiao.hostd import journal as jr
from hexiao.hostd.fleet.health import HealthFeed
from hexiao.hostd.fleet.outbox import Place
from hexiao.protocol import codec_fast
from test_fleet import MERCHANT, Hq, headquarters


@pytest.fixture
def hq(fleet_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(fleet_dsn, fleet_broker, fleet_prefix) as h:
        yield h


def lane(state: str = "open", mac: int = 0, port: str | None = "/dev/hexiao/a",
         firmware: str = "1.0.0", device: str = "hx-1", name: str = "lane-1") -> dict[str, Any]:
    """What DeviceLane.info() answers (the input hostd hands the feed)."""
    return {"id": device, "lane": name, "state": state, "port": port,
            "peer": {"firmware": firmware, "board": "sim"} if state == "open" else None,
            "error": "" if state == "open" else "no hello", "counters": {"mac": mac, "crc": 1},
            "stats": {"scans": 3}, "queued": 0}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def decoded(feed: HealthFeed, after: int = 0) -> list[dict[str, Any]]:
    return [codec_fast.loads(r.payload) for r in feed.outbox.after(after, 1000)]


def test_health_goes_out_on_change_and_periodically_and_each_event_once(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    feed = HealthFeed(tmp_path / "j.sqlite3", Place("m1", "s1"), clock=clock, period_s=60,
                      mac_burst=5, no_link_s=120)
    try:
        tap = {"state": "serving", "printer": {"state": "reachable", "target": "tcp:p:9100"}}
        feed.sample([lane()], tap)
        first = decoded(feed)
        assert [(r["kind"], r["lane"]) for r in first] == [("health", "lane-1"),
                                                           ("health", "@store")]
        assert first[0]["state"]["link"] == "open" and first[0]["state"]["counters"]["mac"] == 0
        assert first[1]["state"]["lanes_open"] == 1
        seen = len(first)

        def new() -> list[dict[str, Any]]:
            nonlocal seen
            rows = decoded(feed)[seen:]
            seen += len(rows)
            return rows

        clock.t += 5
        feed.sample([lane(mac=4)], tap)  # counters alone: no record, 4 < the burst
        assert new() == []
        clock.t += 5
        feed.sample([lane(mac=9)], tap)  # +5 between two samples: a burst
        assert [(r["kind"], r.get("name"), r.get("detail")) for r in new()] == [
            ("event", "mac_failures", {"device": "hx-1", "count": 5, "total": 9})]
        clock.t += 5
        feed.sample([lane(state="connecting", mac=9)], tap)  # link down: lane and store health
        assert [(r["lane"], r["state"].get("link")) for r in new()] == [
            ("lane-1", "connecting"), ("@store", None)]
        for _ in range(3):  # port there, no session for 120 s: safe mode, said once
            clock.t += 61
            feed.sample([lane(state="connecting", mac=9)], tap)
        safe = [r for r in new() if r["kind"] == "event"]
        assert [r["name"] for r in safe] == ["safe_mode"]
        assert "no link" in safe[0]["detail"]["inferred"]
        lost = {"state": "serving", "printer": {"state": "lost", "target": "tcp:p:9100",
                                                "error": "refused"}}
        feed.sample([lane()], lost)
        feed.sample([lane()], lost)
        rows = new()
        assert [r["name"] for r in rows if r["kind"] == "event"] == ["printer_lost"]
        feed.quota_refused("lane-1", "hx-1")
        feed.quota_refused("lane-1", "hx-1")
        feed.sample([lane()], tap)
        clock.t += 86400  # the next China day: the quota is new, so is its exhaustion
        feed.quota_refused("lane-1", "hx-1")
        feed.sample([lane()], tap)
        assert [r["name"] for r in new() if r["kind"] == "event"] == ["quota_exhausted"] * 2
        clock.t += 61
        feed.sample([lane()], tap)  # nothing changed, the period passed: health again
        assert {r["lane"] for r in new() if r["kind"] == "health"} == {"lane-1", "@store"}
        feed.sample([lane(name="bad lane!")], tap)  # cannot be a topic: skipped, not raised
        assert all(r["lane"] != "bad lane!" for r in new())
    finally:
        feed.close()


def test_alarms_open_and_clear_from_what_the_stores_send_and_fleetd_serves_metrics(
        tmp_path: Path, hq: Hq) -> None:
    store = hq.store(tmp_path)
    real = time.time()
    clock = Clock(real)
    feed = HealthFeed(store.journal, Place(MERCHANT, store.id), clock=clock, mac_burst=3)
    # before the bridge runs: these records wait, and the store reports its outbox growing
    feed.sample([lane()])
    clock.t = real + 600
    feed.sample([lane(state="waiting", port=None, mac=0)])
    fleetd = hq.consumer()
    bridge = hq.bridge(store)
    alarms = Alarms(hq.dsn, Thresholds(lane_offline_s=0, store_offline_s=0,
                                       mac_window_s=3600, outbox_age_s=300))
    listen = f"127.0.0.1:{free_port()}"
    metrics.serve(listen, fleetd, alarms)

    def mine(rows: tuple[list[tuple[str, str, str]], ...]) -> set[tuple[str, str]]:
        return {(k, ln) for part in rows for k, s, ln in part if s == store.id}

    try:
        wait_until("the store's outbox age at headquarters", lambda: hq.rows(
            "SELECT state->>'outbox_age_s' FROM lane_health WHERE store = %s AND lane = '@store'",
            store.id) == [("600",)])
        opened, _ = alarms.check()  # the lane down, and 600 s of backlog when it was written
        assert mine((opened,)) == {("lane_offline", "lane-1"), ("outbox_growing", "")}
        feed.sample([lane(state="waiting", port=None, mac=5)])  # +5: a burst; outbox drained
        with jr.Journal(store.journal) as j:  # an entry a person must verify, and the quota
            e = j.begin("877777777777", "lane-1", clock.t, code="877777777777")
            j.advance(e.id, "received", "unknown", clock.t, outcome=None)
        feed.quota_refused("lane-1", "hx-1")
        feed.sample([lane(state="waiting", port=None, mac=5)])
        wait_until("every event at headquarters", lambda: hq.rows(
            "SELECT count(*) FROM records WHERE store = %s AND kind = 'event'",
            store.id) == [(3,)])
        opened, cleared = alarms.check()
        assert mine((opened,)) == {("mac_failures", "lane-1"), ("needs_person", "lane-1"),
                                   ("quota", "lane-1")}
        assert mine((cleared,)) == {("outbox_growing", "")}
        assert alarms.check() == ([], [])  # still true: nothing opens twice
        # the lane comes back, the entry is verified: those clear
        with jr.Journal(store.journal) as j:
            j.advance(e.id, "unknown", "done", clock.t, outcome="accepted")
        clock.t += 5
        feed.sample([lane(mac=5)])
        wait_until("the lane open at headquarters", lambda: hq.rows(
            "SELECT state->>'link' FROM lane_health WHERE store = %s AND lane = 'lane-1'",
            store.id) == [("open",)])
        wait_until("the entry's outcome", lambda: hq.count(store.id) == 1)
        opened, cleared = alarms.check()
        assert mine((cleared,)) == {("lane_offline", "lane-1"), ("needs_person", "lane-1")}
        assert mine((opened,)) == set()
        bridge.stop()  # a clean stop says offline at once
        wait_until("the store offline", lambda: hq.rows(
            "SELECT state FROM store_online WHERE store = %s", store.id) == [("offline",)])
        opened, _ = alarms.check()
        assert mine((opened,)) == {("store_offline", "")}
        assert hq.rows("SELECT count(*) FROM alarms WHERE store = %s AND cleared IS NULL",
                       store.id) == [(3,)]  # mac_failures, quota, store_offline
        text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
        assert 'hexiao_fleetd_alarms_open{kind="store_offline"}' in text
        written = [ln for ln in text.splitlines()
                   if ln.startswith('hexiao_fleetd_records_total{result="written"}')]
        assert written and float(written[0].split()[-1]) == fleetd.counts["written"] > 0
    finally:
        bridge.stop() if bridge.alive() else None
        alarms.stop()
        feed.close()
        fleetd.stop()


def test_only_one_fleetd_instance_evaluates_alarms(hq: Hq) -> None:
    a, b = Alarms(hq.dsn), Alarms(hq.dsn)
    try:
        a.check()
        b.check()
        assert (a.leader, b.leader) == (True, False)
        a.stop()  # its connection goes (the server notices soon after): the other takes over
        wait_until("the other instance to take over", lambda: (b.check(), b.leader)[1])
    finally:
        a.stop()
        b.stop()


def test_the_unit_documents_every_run_option_and_fleetd_reads_them_from_its_environment(
) -> None:
    """udev/hexiao-fleetd.service passes options through its EnvironmentFile: every option of
    `hexiao-fleetd run` is listed there by the variable fleetd really reads."""
    from click.testing import CliRunner
    from hexiao.fleetd.main import main, run

    unit = (Path(__file__).parents[1] / "udev" / "hexiao-fleetd.service").read_text()
    assert "EnvironmentFile=-/etc/hexiao/fleetd.env" in unit
    assert "\nExecStart=hexiao-fleetd run\n" in unit
    for p in run.params:
        if p.name == "help":
            continue
        var = p.envvar or f"HEXIAO_FLEETD_RUN_{(p.name or '').upper()}"
        assert f"#   {var}=" in unit, f"the unit does not document {var} (--{p.name})"
    cli = CliRunner()
    r = cli.invoke(main, ["run"], env={"HEXIAO_FLEETD_RUN_GAP_MINUTES": "-1"})
    assert r.exit_code == 2 and "--gap-minutes" in r.output
    r = cli.invoke(main, ["run"], env={"HEXIAO_FLEETD_RUN_BROKER": "ftp://x"})
    assert r.exit_code == 2 and "--broker" in r.output
