"""Headquarters' status page (fleetd/web/) at the WSGI level, over the real PostgreSQL: login,
sessions, CSRF, the backoff after failed logins, escaping, the chart's figures, the store page,
rollouts, the `user` and `web` commands. Each test module gets its own database (exact counts:
no other test's stores or redemptions in it). The clock is the app's, moved by the test; nothing
waits for time to pass. The browser test is tests/test_fleetd_browser.py."""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from click.testing import CliRunner
from fleet_conftest import LONG, free_port, own_database, wait_until
from hexiao.fleetd import db
from hexiao.fleetd.main import main as fleetd_main
from hexiao.fleetd.web import auth, view
from hexiao.fleetd.web.app import COOKIE, LOGIN_COOKIE, HqApp
from psycopg.types.json import Jsonb

PASSWORD = "correct horse battery"
NOW = datetime(2026, 12, 7, 10, 30, tzinfo=UTC).timestamp()
FLEETD = [sys.executable, "-m", "hexiao.fleetd.main"]


@pytest.fixture(scope="module")
def hq_dsn(fleet_pg_admin: str) -> Iterator[str]:
    """This module's own database with fleetd's schema (migrations 001..007)."""
    with own_database(fleet_pg_admin) as dsn:
        yield dsn


def sql(dsn: str, q: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(q, args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def operator(dsn: str, name: str | None = None) -> str:
    name = name or f"op{secrets.token_hex(3)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        auth.add_operator(conn, name, PASSWORD)
    return name


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Browser:
    """A WSGI client that keeps cookies as a browser does (enough for these tests)."""

    def __init__(self, app: HqApp, address: str = "127.0.0.1", scheme: str = "http") -> None:
        self.app, self.address, self.scheme = app, address, scheme
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                body: bytes | None = None, ctype: str = "application/x-www-form-urlencoded"
                ) -> tuple[int, dict[str, list[str]], str]:
        data = body if body is not None else urlencode(form or {}).encode()
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path.encode().decode("latin-1"),
                   "QUERY_STRING": "", "REMOTE_ADDR": self.address, "wsgi.url_scheme": self.scheme,
                   "wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data)),
                   "CONTENT_TYPE": ctype,
                   "HTTP_COOKIE": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        got: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]]) -> None:
            got["status"], got["headers"] = int(status.split()[0]), headers

        out = b"".join(self.app(environ, start))
        headers: dict[str, list[str]] = {}
        for k, v in got["headers"]:
            headers.setdefault(k.lower(), []).append(v)
        for c in headers.get("set-cookie", []):
            name, _, rest = c.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in c:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return got["status"], headers, out.decode()

    def get(self, path: str) -> tuple[int, dict[str, list[str]], str]:
        return self.request("GET", path)

    def login(self, name: str, password: str = PASSWORD) -> tuple[int, dict[str, list[str]], str]:
        status, _, page = self.get("/login")
        assert status == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf
        return self.request("POST", "/login", {"csrf": csrf[1], "name": name,
                                               "password": password})


def add_store(dsn: str, store: str, state: str | None = "online", merchant: str = "m1") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.add_store(conn, merchant, store, secrets.token_bytes(32), franchisee="f1")
        if state is not None:
            conn.execute("INSERT INTO store_online (store, inst, session, state, at) VALUES "
                         "(%s, 'i1', 1, %s, now()) ON CONFLICT (store) DO UPDATE SET state = "
                         "excluded.state, updated = now()", (store, state))


def lane_health(dsn: str, store: str, lane: str, link: str = "open", firmware: str = "1.4.2",
                device: str = "hx-0001") -> None:
    state = {"device": device, "link": link, "firmware": firmware, "board": "sim"}
    sql(dsn, "INSERT INTO lane_health (store, lane, inst, seq, state, at) VALUES (%s, %s, 'i1', "
        "1, %s, now()) ON CONFLICT (store, lane) DO UPDATE SET state = excluded.state",
        store, lane, Jsonb(state))


def redemption(dsn: str, store: str, entry: int, ended: datetime, outcome: str = "accepted",
               tail: str = "1234", lane: str = "lane-1") -> None:
    sql(dsn, "INSERT INTO redemptions (store, inst, entry, seq, merchant, lane, device, outcome, "
        "reason, card_type, card_id, title, value, code_tail, code_hash, received, ended) VALUES "
        "(%s, 'i1', %s, %s, 'm1', %s, 'hx-0001', %s, NULL, 'CASH', 'pc', '5 off', '{}', %s, "
        "'\\x00', %s, %s)", store, entry, entry, lane, outcome, tail, ended, ended)


@pytest.fixture
def app(hq_dsn: str, monkeypatch: pytest.MonkeyPatch) -> HqApp:
    # a cheaper scrypt for the many logins below (each hash keeps its own parameters);
    # the commands' test keeps the real cost and checks it is what a hash records
    monkeypatch.setattr(auth, "SCRYPT_N", 2**10)
    return HqApp(hq_dsn, tz="Asia/Shanghai", session_s=3600, clock=Clock())


# -- login, sessions, CSRF ----------------------------------------------------------------------


def test_every_page_chart_and_json_needs_a_session(app: HqApp, hq_dsn: str) -> None:
    add_store(hq_dsn, "s-auth")
    b = Browser(app)
    for path in ("/", "/store/s-auth"):
        status, headers, _ = b.get(path)
        assert (status, headers["location"]) == (303, ["/login"]), path
    for path in ("/fragment", "/store/s-auth/fragment", "/status.json", "/chart.svg"):
        status, _, body = b.get(path)
        assert status == 401 and "s-auth" not in body, path
    b.cookies[COOKIE] = secrets.token_urlsafe(32)  # a made-up session opens nothing
    assert b.get("/status.json")[0] == 401 and b.get("/")[0] == 303
    assert b.get("/static/hq.css")[0] == 200 and b.get("/static/page.css")[0] == 200
    assert b.get("/static/../app.py")[0] == 404
    assert b.request("DELETE", "/")[0] == 405


def test_login_sets_a_strict_httponly_cookie_and_logout_needs_the_csrf_token(
        app: HqApp, hq_dsn: str) -> None:
    name = operator(hq_dsn)
    b = Browser(app)
    status, headers, _ = b.login(name)
    assert (status, headers["location"]) == (303, ["/"])
    cookie = next(c for c in headers["set-cookie"] if c.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    token = b.cookies[COOKIE]
    assert sql(hq_dsn, "SELECT count(*) FROM operator_sessions WHERE token_hash = %s",
               token.encode()) == [(0,)]  # only its hash is stored
    status, _, page = b.get("/")
    assert status == 200 and name in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    # a logout without the session's token (another site's form) changes nothing
    assert b.request("POST", "/logout", {"csrf": "forged"})[0] == 403
    assert b.request("POST", "/logout", {})[0] == 403
    assert b.get("/")[0] == 200
    status, headers, _ = b.request("POST", "/logout", {"csrf": csrf[1]})
    assert (status, headers["location"]) == (303, ["/login"])
    b.cookies[COOKIE] = token  # the old cookie, kept by an attacker: dead
    assert b.get("/")[0] == 303 and b.get("/status.json")[0] == 401
    # behind a TLS proxy (https scheme): the cookie is Secure
    _, headers, _ = Browser(app, scheme="https").login(name)
    assert any(c.startswith(COOKIE + "=") and "Secure" in c for c in headers["set-cookie"])


def test_the_login_form_needs_its_own_double_submit_token(app: HqApp, hq_dsn: str) -> None:
    name = operator(hq_dsn)
    b = Browser(app)
    form = {"name": name, "password": PASSWORD}
    status, _, page = b.request("POST", "/login", {**form, "csrf": "x"})  # no cookie
    assert status == 403 and "log in again" in page and COOKIE not in b.cookies
    b.get("/login")
    status, _, _ = b.request("POST", "/login", {**form, "csrf": "not-the-cookie"})
    assert status == 403 and COOKIE not in b.cookies
    assert b.request("POST", "/login", body=b"x" * 5000)[0] == 413
    assert b.request("POST", "/login", body=b"{}", ctype="application/json")[0] == 415


def test_a_wrong_password_or_name_is_refused_alike_and_logged_without_the_password(
        app: HqApp, hq_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    name = operator(hq_dsn)
    caplog.set_level(logging.INFO, "hexiao.fleetd.web")
    wrong = Browser(app, address="10.0.0.7").login(name, "hunter2-is-wrong")
    nobody = Browser(app, address="10.0.0.8").login("nobody", "hunter2-is-wrong")
    for status, headers, page in (wrong, nobody):
        assert status == 401 and "wrong name or password" in page
        assert not any(c.startswith(COOKIE + "=") for c in headers["set-cookie"])
    assert f"login failed for operator '{name}' from 10.0.0.7" in caplog.text
    assert "hunter2" not in caplog.text and PASSWORD not in caplog.text


def test_failed_logins_are_slowed_per_name_and_per_address(app: HqApp, hq_dsn: str) -> None:
    name = operator(hq_dsn)
    clock = app.clock
    assert isinstance(clock, Clock)
    b = Browser(app, address="10.1.0.1")
    for _ in range(auth.FREE_FAILURES):
        assert b.login(name, "wrong password!")[0] == 401
    # blocked now: even the right password is not looked at, from any address
    for who in (b, Browser(app, address="10.1.0.2")):
        status, headers, page = who.login(name)
        assert status == 429 and headers["retry-after"] == ["1"] and "try again in 1 s" in page
    clock.t += 1
    assert b.login(name, "wrong again!!")[0] == 401  # the 4th failure: 2 s now
    status, headers, _ = b.login(name)
    assert status == 429 and headers["retry-after"] == ["2"]
    clock.t += 2
    assert b.login(name)[0] == 303  # a good login clears the count
    assert b.login(name, "wrong password!")[0] == 401
    assert b.login(name)[0] == 303
    # failures an hour apart are forgotten: no block after the third
    for _ in range(auth.FREE_FAILURES - 1):
        assert b.login(name, "wrong password!")[0] == 401
    clock.t += auth.FORGET_S + 1
    assert b.login(name, "wrong password!")[0] == 401
    assert b.login(name)[0] == 303
    # one address trying many names is slowed too
    other = [operator(hq_dsn) for _ in range(2)]
    guesser = Browser(app, address="10.1.0.9")
    for i in range(auth.FREE_FAILURES):
        assert guesser.login(f"guess{i}", "nope nope nope")[0] == 401
    assert guesser.login(other[0])[0] == 429
    assert Browser(app, address="10.1.0.10").login(other[0])[0] == 303


def test_a_session_ends_at_its_expiry_and_when_the_operator_is_removed(
        app: HqApp, hq_dsn: str) -> None:
    name = operator(hq_dsn)
    clock = app.clock
    assert isinstance(clock, Clock)
    b = Browser(app)
    b.login(name)
    clock.t += 3599
    assert b.get("/")[0] == 200
    clock.t += 1
    assert b.get("/")[0] == 303 and b.get("/fragment")[0] == 401
    b.login(name)
    assert b.get("/")[0] == 200
    with psycopg.connect(hq_dsn, autocommit=True) as conn:
        auth.remove_operator(conn, name)
    assert b.get("/")[0] == 303


def test_an_unreachable_database_is_one_line_not_a_traceback() -> None:
    app = HqApp(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", clock=Clock())
    status, _, body = Browser(app).get("/")
    assert status == 503 and body == "headquarters' database does not answer; try again shortly\n"
    assert Browser(app).get("/login")[0] == 200  # the form itself needs no database


def test_a_page_that_fails_is_logged_and_one_line_never_a_traceback(
        app: HqApp, hq_dsn: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    b = Browser(app)
    b.login(operator(hq_dsn))

    def boom(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(view, "overview", boom)
    status, _, body = b.get("/")
    assert status == 500 and body == "the page failed; hexiao-fleetd's log has the reason\n"
    assert "RuntimeError: a bug" in caplog.text  # the traceback goes to the log only


# -- what the pages show ------------------------------------------------------------------------


def test_hostile_store_lane_and_alarm_text_is_shown_as_text(app: HqApp, hq_dsn: str) -> None:
    evil = "<script>alert(1)</script>"
    add_store(hq_dsn, evil, "offline")
    lane_health(hq_dsn, evil, '<img src=x onerror="alert(2)">', link="waiting",
                firmware='"><svg onload=alert(3)>', device="</td><b>x</b>")
    sql(hq_dsn, "INSERT INTO alarms (kind, store, lane, detail) VALUES ('store_offline', %s, "
        "'', %s)", evil, Jsonb({"why": "<iframe src=//evil>"}))
    b = Browser(app)
    b.login(operator(hq_dsn))
    pages = [b.get("/")[2], b.get("/fragment")[2], b.get("/store/" + evil)[2]]
    for page in pages:
        assert "<script>alert" not in page and "<iframe" not in page and "<img src=x" not in page
        assert "<svg onload" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
    assert 'href="/store/%3Cscript%3Ealert%281%29%3C%2Fscript%3E"' in pages[0]
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in pages[2]
    assert "&#34;&gt;&lt;svg onload=alert(3)&gt;" in pages[2]
    assert "&lt;iframe src=//evil&gt;" in pages[0]
    status, _, body = b.get("/store/<no such store>")
    assert status == 404 and body.startswith("no store")
    sql(hq_dsn, "DELETE FROM alarms WHERE store = %s", evil)


def _svg_series(svg: str) -> list[list[int]]:
    """The bar values pygal drew, per series (each bar's <desc class="value">)."""
    parts = re.split(r'<g class="series serie-\d+ color-\d+">', svg)[1:]
    return [[int(v) for v in re.findall(r'<desc class="value">(\d+)</desc>', p)] for p in parts]


def test_the_chart_draws_exactly_the_redemptions_per_hour_of_the_last_24_hours(
        app: HqApp, hq_dsn: str) -> None:
    store = "s-chart"
    add_store(hq_dsn, store)
    now = datetime.fromtimestamp(NOW, UTC)  # 10:30 UTC: the current hour is 10:00..11:00
    times = [now, now - timedelta(minutes=29), now - timedelta(minutes=31),  # 10:00, 10:00, 09:xx
             now - timedelta(hours=5), now - timedelta(hours=5, minutes=1),
             now - timedelta(hours=23, minutes=30),  # 11:00 yesterday: the first bar
             now - timedelta(hours=23, minutes=31),  # 10:59 yesterday: outside
             now + timedelta(hours=1)]  # a store clock ahead: outside
    outcomes = ["accepted", "refused", "accepted", "accepted", "verify_manually", "accepted",
                "accepted", "accepted"]
    for i, (t, o) in enumerate(zip(times, outcomes, strict=True)):
        redemption(hq_dsn, store, 100 + i, t, o)
    # what the table says, hour by hour, computed apart from the page's query
    expect_a, expect_o = [0] * 24, [0] * 24
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    for ended, outcome in sql(hq_dsn, "SELECT ended, outcome FROM redemptions"):
        i = int((ended - start) // timedelta(hours=1))
        if 0 <= i < 24:
            (expect_a if outcome == "accepted" else expect_o)[i] += 1
    assert sum(expect_a) == 4 and sum(expect_o) == 2  # the rows above, nothing else
    b = Browser(app)
    b.login(operator(hq_dsn))
    data = json.loads(b.get("/status.json")[2])
    assert [h["redeemed"] for h in data["hours"]] == expect_a
    assert [h["other"] for h in data["hours"]] == expect_o
    assert data["hours"][-1]["label"] == "18:00"  # 10:00 UTC in Shanghai, the current hour last
    status, headers, svg = b.get("/chart.svg")
    assert status == 200 and headers["content-type"] == ["image/svg+xml"]
    assert headers["content-security-policy"] == ["default-src 'none'; style-src 'unsafe-inline'"]
    assert _svg_series(svg) == [expect_a, expect_o]
    assert "kozea.github.io" not in svg  # pygal's tooltip script is never linked
    page = b.get("/")[2]
    assert "last 24 h: 4 redeemed, 2 not redeemed" in page and 'src="/chart.svg' in page


def test_the_store_page_shows_lanes_firmware_and_codes_as_their_last_4(
        app: HqApp, hq_dsn: str) -> None:
    store = "s-lanes"
    add_store(hq_dsn, store)
    lane_health(hq_dsn, store, "lane-1", "open", firmware="1.4.2", device="hx-0001")
    lane_health(hq_dsn, store, "lane-2", "waiting", firmware="1.3.9", device="hx-0002")
    now = datetime.fromtimestamp(NOW, UTC)
    redemption(hq_dsn, store, 1, now, tail="9876543210")  # a longer tail is still cut
    b = Browser(app)
    b.login(operator(hq_dsn))
    status, _, page = b.get(f"/store/{store}")
    assert status == 200 and 'data-fragment="/store/s-lanes/fragment"' in page
    live = b.get(f"/store/{store}/fragment")[2]
    cards = re.findall(r'<article class="card (\w+)" data-lane="([^"]+)">.*?presence">(\w+)<.*?'
                       r'class="mono firmware">([^<]+)<', live, re.S)
    assert cards == [("ok", "lane-1", "online", "1.4.2"), ("bad", "lane-2", "offline", "1.3.9")]
    assert "…3210" in live and "9876543210" not in live and "1 of 2 lanes online" in live
    overview = json.loads(b.get("/status.json")[2])
    row = next(s for s in overview["stores"] if s["store"] == store)
    assert (row["lanes"], row["lanes_open"], row["level"]) == (2, 1, "warn")


def test_the_overview_counts_stores_and_shows_rollouts_in_progress_by_stage(
        app: HqApp, hq_dsn: str) -> None:
    add_store(hq_dsn, "s-off", "offline")
    add_store(hq_dsn, "s-new", None)
    rid = sql(hq_dsn, "INSERT INTO rollouts (version, sha256, stages, stage, state, author) "
              "VALUES ('1.5.0', 'ab', '{2,20,100}', 1, 'running', 'alice') RETURNING id")[0][0]
    done = sql(hq_dsn, "INSERT INTO rollouts (version, sha256, stages, stage, state) VALUES "
               "('1.4.0', 'cd', '{100}', 0, 'done') RETURNING id")[0][0]
    lanes = [(0, "done"), (0, "confirmed"), (1, "done"), (1, "updating"), (1, "sent"),
             (1, "failed"), (1, "pending")]
    for i, (stage, state) in enumerate(lanes):
        sql(hq_dsn, "INSERT INTO rollout_lanes (rollout_id, store, lane, stage, state) VALUES "
            "(%s, 's-lanes', %s, %s, %s)", rid, f"lane-{i}", stage, state)
    b = Browser(app)
    b.login(operator(hq_dsn))
    o = json.loads(b.get("/status.json")[2])
    counts = dict(sql(hq_dsn, "SELECT coalesce(o.state, 'unknown'), count(*) FROM stores s "
                      "LEFT JOIN store_online o USING (store) GROUP BY 1"))
    assert o["counts"] == {k: counts.get(k, 0) for k in ("online", "offline", "unknown")}
    assert o["counts"]["offline"] >= 1 and o["counts"]["unknown"] >= 1
    order = {"bad": 0, "warn": 1, "off": 2, "ok": 3}  # offline first, then the rest
    levels = [order[s["level"]] for s in o["stores"]]
    assert levels == sorted(levels) and "s-off" in [s["store"] for s in o["stores"]]
    ours = [r for r in o["rollouts"] if r["id"] in (rid, done)]
    assert len(ours) == 1 and ours[0]["version"] == "1.5.0"
    assert [(s["percent"], s["phase"], s["total"], s["done"], s["active"], s["failed"],
             s["pending"]) for s in ours[0]["stages"]] == [
        (2, "done", 2, 2, 0, 0, 0), (20, "now", 5, 1, 2, 1, 1), (100, "next", 0, 0, 0, 0, 0)]
    page = b.get("/fragment")[2]
    assert "firmware 1.5.0" in page and "firmware 1.4.0" not in page
    assert '<progress max="5" value="1">' in page


def test_the_view_cuts_hours_on_the_hour_in_headquarters_zone(hq_dsn: str) -> None:
    from zoneinfo import ZoneInfo
    with psycopg.connect(hq_dsn, autocommit=True) as conn:
        hours = view.hourly(conn, datetime(2026, 1, 1, 0, 0, tzinfo=UTC), ZoneInfo("UTC"))
    assert [h["label"] for h in hours][:2] == ["01:00", "02:00"] and hours[-1]["label"] == "00:00"


# -- the commands ---------------------------------------------------------------------------------


def fleetd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The command in this process (click's runner: a subprocess per call costs a second)."""
    r = CliRunner().invoke(fleetd_main, list(args), input=stdin, env={"NO_COLOR": "1"})
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_user_add_list_remove_and_their_mistakes_in_one_line(hq_dsn: str,
                                                             tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    pw.chmod(0o600)
    r = fleetd("user", "add", "--dsn", hq_dsn, "carol", "--password-file", str(pw))
    assert (r.returncode, r.stdout) == (0, "operator carol: added\n")
    r = fleetd("user", "add", "--dsn", hq_dsn, "dave", stdin="typed at a prompt\n" * 2)
    assert r.returncode == 0 and "typed" not in r.stdout + r.stderr
    app = HqApp(hq_dsn, clock=Clock())
    assert Browser(app).login("carol", "a long enough password")[0] == 303
    assert Browser(app).login("dave", "typed at a prompt")[0] == 303
    assert sql(hq_dsn, "SELECT params, length(salt), length(hash) FROM operators WHERE name = "
               "'carol'") == [(f"scrypt${2**14}$8$1", 16, 32)]
    listed = json.loads(fleetd("user", "list", "--dsn", hq_dsn, "--json").stdout)
    assert {"carol", "dave"} <= {o["name"] for o in listed}
    pw.chmod(0o644)
    for args, says in [
            (("add", "erin", "--password-file", str(pw)), "mode 0644"),
            (("add", "bad name!", "--password-file", str(pw)), "operator name 'bad name!'"),
            (("remove", "nobody-here"), "no operator 'nobody-here'")]:
        r = fleetd("user", *args[:1], "--dsn", hq_dsn, *args[1:])
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.splitlines()) == 1, r
    short = fleetd("user", "add", "--dsn", hq_dsn, "erin", stdin="short\nshort\n")
    assert short.returncode == 1 and "too short" in short.stderr
    assert "Traceback" not in short.stderr
    r = fleetd("user", "remove", "--dsn", hq_dsn, "dave")
    assert r.returncode == 0 and Browser(app).login("dave", "typed at a prompt")[0] == 401
    assert fleetd("user", "-h").returncode == 0 and fleetd("web", "-h").returncode == 0


def test_the_web_command_serves_the_page_and_stops_on_sigterm(hq_dsn: str) -> None:
    r = fleetd("web", "--dsn", hq_dsn, "--listen", "127.0.0.1:0", "--timezone", "Mars/Olympus")
    assert r.returncode == 2 and "no time zone 'Mars/Olympus'" in r.stderr
    port = free_port()
    name = operator(hq_dsn)
    proc = subprocess.Popen([*FLEETD, "web", "--dsn", hq_dsn, "--listen", f"127.0.0.1:{port}",
                             "--trusted-proxy", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"serving http://127.0.0.1:{port}/\n"
        # through a TLS proxy on this machine: the operator's address and https believed
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LONG)
        conn.request("GET", "/login")
        r = conn.getresponse()
        form, login_cookie = r.read().decode(), r.getheader("Set-Cookie", "").split(";")[0]
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert r.status == 200 and csrf and login_cookie.startswith(LOGIN_COOKIE + "=")
        conn.request("POST", "/login", urlencode({"csrf": csrf[1], "name": name,
                                                  "password": PASSWORD}),
                     {"Content-Type": "application/x-www-form-urlencoded",
                      "Cookie": login_cookie, "X-Forwarded-For": "203.0.113.9",
                      "X-Forwarded-Proto": "https"})
        r = conn.getresponse()
        r.read()
        cookies = [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
        assert r.status == 303 and any(c.startswith(COOKIE + "=") and "; Secure" in c
                                       for c in cookies)
        conn.close()
        assert sql(hq_dsn, "SELECT address FROM operator_sessions WHERE operator = %s",
                   name) == [("203.0.113.9",)]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/status.json")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=LONG)
        assert e.value.code == 401
        busy = fleetd("web", "--dsn", hq_dsn, "--listen", f"127.0.0.1:{port}")
        assert busy.returncode == 1 and "cannot listen" in busy.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        wait_until("fleetd web to stop", lambda: proc.poll() is not None)
        proc.communicate()
    assert proc.returncode == 0
