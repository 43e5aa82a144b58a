"""Headquarters' page in Debian's headless Chromium (tests/browser.py), end to end: a store's
journal and health feed, its bridge over MQTT 5 to Mosquitto, fleetd into PostgreSQL, and the
page served by the real `hexiao-fleetd web` command. An operator logs in through the form; a lane
and then the store go offline and the open page shows it without a reload, within the stores'
keep-alive (the wait's guard; the time it took is printed, never asserted). Screenshots go to
the test's tmp dir and /tmp/hexiao-screens/hq-*.png."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from browser import console_errors, screenshot, small_screen, wait_until
from fleet_conftest import LONG, free_port, own_database
from fleet_conftest import wait_until as wait_for
from hexiao.fleetd.web import auth
from hexiao.hostd.fleet.health import HealthFeed
from hexiao.hostd.fleet.outbox import Place
from test_fleet import MERCHANT, Hq, _redeem_directly, headquarters
from test_fleet_alarms import lane

KEEPALIVE_S = 30  # the stores' fleet.keepalive_s: the page must show an outage within it
REFRESH_S = 2
PASSWORD = "a long operator password"


@pytest.fixture
def own_dsn(fleet_pg_admin: str) -> Iterator[str]:
    """A database of this test's own: the overview shows its store and nothing else's."""
    with own_database(fleet_pg_admin) as dsn:
        yield dsn


@pytest.fixture
def hq(own_dsn: str, fleet_broker: str, fleet_prefix: str) -> Iterator[Hq]:
    with headquarters(own_dsn, fleet_broker, fleet_prefix) as h:
        yield h


@pytest.fixture
def page_url(own_dsn: str) -> Iterator[str]:
    """`hexiao-fleetd web` on a free loopback port, over the test's database."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hexiao.fleetd.main", "web", "--dsn",
                             own_dsn, "--listen", f"127.0.0.1:{port}", "--refresh",
                             str(REFRESH_S)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), f"hexiao-fleetd web did not start: {line!r}"
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(LONG)


def _text(driver: Any, css: str) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    try:
        return driver.find_element("css selector", css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def _rollout_and_alarm(dsn: str, store: str) -> None:
    """A rollout under way on the store's lanes and an open alarm, as fleetd/rollout.py and
    fleetd/alarms.py write them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rid = conn.execute("INSERT INTO rollouts (version, sha256, stages, stage, state, author) "
                           "VALUES ('1.5.1', '00', '{50,100}', 0, 'running', 'hq-browser') "
                           "RETURNING id").fetchone()[0]  # type: ignore[index]
        for lane_, state in (("lane-1", "done"), ("lane-2", "updating")):
            conn.execute("INSERT INTO rollout_lanes (rollout_id, store, lane, stage, state) "
                         "VALUES (%s, %s, %s, 0, %s)", (rid, store, lane_, state))
        conn.execute("INSERT INTO alarms (kind, store, lane, detail) VALUES ('lane_offline', %s, "
                     "'lane-2', '{\"link\": \"waiting\"}')", (store,))


def _log_in(driver: Any) -> None:
    driver.find_element("id", "name").clear()
    driver.find_element("id", "name").send_keys("hq-browser")
    driver.find_element("id", "password").send_keys(PASSWORD)
    driver.find_element("id", "submit").click()
    wait_until(driver, lambda d: d.title == "hexiao · headquarters", LONG, "the overview")


def test_an_operator_logs_in_and_sees_a_lane_and_a_store_go_offline_without_a_reload(
        tmp_path: Path, hq: Hq, page_url: str, browser: Any) -> None:
    with psycopg.connect(hq.dsn, autocommit=True) as conn:
        auth.add_operator(conn, "hq-browser", PASSWORD)
    store = hq.store(tmp_path)
    fleetd = hq.consumer()
    bridge = hq.bridge(store)  # its outbox takes the journal's redemptions from now on
    feed = HealthFeed(store.journal, Place(MERCHANT, store.id))
    lanes = [lane(name="lane-1", device="hx-0001", firmware="1.4.2"),
             lane(name="lane-2", device="hx-0002", firmware="1.5.0")]
    feed.sample(lanes)
    _redeem_directly(store.journal, 12)
    _redeem_directly(store.journal, 5, lane="lane-2", start=100)
    row = f'tr[data-store="{store.id}"] .state'
    try:
        wait_for("the store's redemptions and lanes at headquarters", lambda: hq.count(
            store.id) == 17 and hq.count(store.id, "lane_health") == 3)
        # not logged in: the page is the login form
        browser.get(page_url)
        assert browser.title == "hexiao · log in"
        browser.find_element("id", "name").send_keys("hq-browser")
        browser.find_element("id", "password").send_keys("not the password")
        browser.find_element("id", "submit").click()
        wait_until(browser, lambda d: _text(d, "#login-error"), LONG, "the login refused")
        assert _text(browser, "#login-error") == "wrong name or password"
        refused = console_errors(browser)  # reading the log empties it: later ones are new
        assert len(refused) == 1 and "/login" in refused[0] and "401" in refused[0], refused
        _log_in(browser)
        assert _text(browser, row) == "ONLINE"  # .badge is upper-case by CSS
        assert _text(browser, "#summary strong") == "1 of 1 store online"
        chart = browser.find_element("id", "chart")
        wait_until(browser, lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", chart), LONG,
            "the chart drawn")
        assert "17 redeemed" in (_text(browser, "main h2 .count") or "")
        screenshot(browser, tmp_path, "hq-overview.png")

        # the store's page: both lanes online with their firmware
        browser.get(f"{page_url}store/{store.id}")
        card = '#lanes [data-lane="{}"] .presence'
        assert [_text(browser, card.format(n)) for n in ("lane-1", "lane-2")] == ["ONLINE"] * 2
        assert _text(browser, '#lanes [data-lane="lane-2"] .firmware') == "1.5.0"
        browser.execute_script("window.hexiaoNoReload = 1;")  # gone if the page reloads
        t = time.monotonic()
        feed.sample([lanes[0], lane(name="lane-2", device="hx-0002", state="waiting",
                                    port=None)])
        wait_until(browser, lambda d: _text(d, card.format("lane-2")) == "OFFLINE", KEEPALIVE_S,
                   "lane-2 offline within the keep-alive")
        print(f"\nlane-2 shown offline {time.monotonic() - t:.1f} s after its health changed")
        assert browser.execute_script("return window.hexiaoNoReload") == 1
        assert _text(browser, card.format("lane-1")) == "ONLINE"
        # the unplugged device reports no firmware: the page keeps the last one it knew
        assert _text(browser, '#lanes [data-lane="lane-2"] .firmware') == "1.5.0 (last known)"
        screenshot(browser, tmp_path, "hq-store-lane-offline.png")

        # the overview, with a rollout under way and an open alarm, then the whole store goes
        # (its bridge stops: its offline state)
        _rollout_and_alarm(hq.dsn, store.id)
        browser.get(page_url)
        assert "1 updating" in (_text(browser, "#rollouts") or "")
        assert _text(browser, "#alarm-count") != "0"
        browser.execute_script("window.hexiaoNoReload = 1;")
        t = time.monotonic()
        bridge.stop()
        wait_until(browser, lambda d: _text(d, row) == "OFFLINE", KEEPALIVE_S,
                   "the store offline within the keep-alive")
        print(f"store shown offline {time.monotonic() - t:.1f} s after it stopped")
        assert (_text(browser, "#summary strong"), _text(browser, "#count-offline")) == (
            "0 of 1 store online", "1 OFFLINE")
        assert browser.execute_script("return window.hexiaoNoReload") == 1
        screenshot(browser, tmp_path, "hq-overview-store-offline.png")
        assert console_errors(browser) == []  # no script error, no CSP violation, no 404
        with small_screen(browser):  # on a phone: one column, nothing wider than the screen
            assert browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth")
            screenshot(browser, tmp_path, "hq-overview-phone.png")

        # logging out ends the session: the page is the login form again
        browser.find_element("css selector", "form.logout button").click()
        wait_until(browser, lambda d: d.title == "hexiao · log in", LONG, "the login form")
        browser.get(page_url + "status.json")
        assert "log in first" in browser.page_source
        # an operator removed while their page is open: the page's next refresh goes to /login
        browser.get(page_url)
        _log_in(browser)
        with psycopg.connect(hq.dsn, autocommit=True) as conn:
            auth.remove_operator(conn, "hq-browser")
        wait_until(browser, lambda d: d.title == "hexiao · log in", LONG,
                   "the login form once the operator was removed")
    finally:
        bridge.stop() if bridge.alive() else None
        feed.close()
        fleetd.stop()
