"""hexiao-hostd's status page (hostd/web/), for real: a real Daemon with the MicroPython device
peer on a pty cable (test_hostd_daemon's lane), the page served by waitress on loopback, read by
Debian's headless Chromium (tests/browser.py) and over plain HTTP. Every wait is bounded by a
guard; nothing asserts a duration (the time the page took to show a lane offline is printed)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import test_hostd_daemon
from browser import console_errors, screenshot, small_screen, wait_until
from hexiao.hostd.config import Config, ConfigError, Tap, from_dict
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.web import view
from hexiao.hostd.web.app import REFRESH_S, StatusApp
from hexiao.hostd.web.server import DEFAULT_LISTEN, StatusPage, is_loopback, split_listen
from test_hostd_daemon import CASH, KID, LONG, lane, sim  # noqa: F401 (sim: a fixture)

TAP_KEY = bytes(range(32))


@contextmanager
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
           web_listen: str = "127.0.0.1:0", tap: bool = False) -> Iterator[None]:
    """test_hostd_daemon's lane with its config given this web_listen (a free port: other
    test runs on this machine may hold 8780) and, if asked, a receipt tap printing to a file."""
    base = test_hostd_daemon.config

    def config(*args: Any, **kw: Any) -> Config:
        cfg = base(*args, **kw)
        extra: dict[str, Any] = {}
        if tap:
            key = tmp_path / "tap.key"
            key.touch(mode=0o600)
            key.write_text(TAP_KEY.hex() + "\n")
            extra["tap"] = Tap(enabled=True, listen="127.0.0.1:0", key_file=key,
                               printer=f"file:{tmp_path / 'printer.bin'}",
                               content="https://example.invalid/r/{token}")
        return dataclasses.replace(cfg, hostd=dataclasses.replace(cfg.hostd,
                                                                  web_listen=web_listen), **extra)

    monkeypatch.setattr(test_hostd_daemon, "config", config)
    yield


@contextmanager
def daemon_without_device(tmp_path: Path, sim_: Any, web_listen: str,
                          device_id: str = KID) -> Iterator[Daemon]:
    """A real Daemon whose one device is not plugged in (its port does not exist)."""
    (tmp_path / "state").mkdir(mode=0o700, parents=True)
    cfg = test_hostd_daemon.config(tmp_path, sim_, str(tmp_path / "no-such-tty"),
                                   {"id": device_id})
    cfg = dataclasses.replace(cfg, hostd=dataclasses.replace(cfg.hostd, web_listen=web_listen))
    daemon = Daemon(cfg).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def get(host: str, port: int, path: str = "/", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=LONG)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def non_loopback_address() -> str:
    """An address of this machine other than loopback (the route out; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
        except OSError:
            addr = ""
    if not addr or is_loopback(addr):
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        addr = next((a for a in sorted(addrs) if not is_loopback(a)), "")
    if not addr:
        pytest.fail("this machine has no address but loopback: the test cannot check that the "
                    "page is not served elsewhere", pytrace=False)
    return addr


# The live part is replaced every REFRESH_S: the page is read in one script (one consistent DOM),
# never through element handles that a refresh makes stale.
_READ = """
const text = (sel) => { const el = document.querySelector(sel); return el ? el.innerText : ""; };
const cls = (sel) => { const el = document.querySelector(sel); return el ? el.className : ""; };
return {
  cards: [...document.querySelectorAll("article.device")].map((el) => ({
    id: el.dataset.device, presence: el.dataset.presence, cls: el.className,
    name: el.querySelector(".device-id").innerText, badge: el.querySelector(".badge").innerText,
    text: el.innerText})),
  codes: [...document.querySelectorAll("#verdicts tr.verdict td.code")].map((e) => e.innerText),
  results: [...document.querySelectorAll("#verdicts tr.verdict .badge")].map(
    (e) => e.innerText),
  headline: text("#headline"), headline_cls: cls("#headline"),
  attention: text("#attention"), tap: text("#tap"), conn: text("#conn"),
  updated: text("#updated"), injected: document.querySelectorAll("#x").length,
  html: document.documentElement.outerHTML, mark: window.hexiaoMark || null,
};
"""


def read_page(driver: Any) -> dict[str, Any]:
    return driver.execute_script(_READ)


def card(page: dict[str, Any], device_id: str) -> dict[str, Any] | None:
    return next((c for c in page["cards"] if c["id"] == device_id), None)


def presence(device_id: str) -> Callable[[Any], str | None]:
    def read(driver: Any) -> str | None:
        c = card(read_page(driver), device_id)
        return c["presence"] if c is not None else None
    return read


# -- in a real browser ----------------------------------------------------------------------------


def test_the_page_shows_the_lane_its_verdict_and_the_lane_going_offline(
        mpy_stage: Path, tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        browser: Any) -> None:
    with served(monkeypatch, tmp_path, tap=True), lane(mpy_stage, tmp_path, sim, [CASH]) as ln:
        assert ln.verdicts(1)[0]["text"].startswith("核销成功")
        page = ln.daemon.web
        assert page.url is not None and page.loopback
        browser.get(page.url)
        assert browser.title == "hexiao · lane status"
        wait_until(browser, lambda d: presence(KID)(d) == "online", LONG, "the lane online")
        seen = read_page(browser)
        el = card(seen, KID)
        assert el is not None and el["name"] == KID and "ok" in el["cls"].split()
        assert "linkpeer/0.1" in el["text"] and "lane-1" in el["text"]
        assert "1 redeemed" in el["text"]
        # the verdict: its code only as the last 4, anywhere on the page and in its source
        assert seen["codes"] == ["…2093"] and [r.upper() for r in seen["results"]] == ["REDEEMED"]
        assert CASH not in seen["html"] and CASH[:-4] not in seen["html"]
        assert "Nothing waiting" in seen["attention"]
        assert "LISTENING" in seen["tap"].upper() and "REACHABLE" in seen["tap"].upper()
        assert "all 1 device online" in seen["headline"]
        assert "ok" in seen["headline_cls"].split()
        screenshot(browser, tmp_path, "hostd-status.png")
        with small_screen(browser):  # a phone: one column, nothing wider than the screen
            assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
            screenshot(browser, tmp_path, "hostd-status-small.png")

        # the cable pulled: the page shows the lane offline by itself (no reload: the mark stays)
        browser.execute_script("window.hexiaoMark = 'same page'")
        t = time.monotonic()
        ln.cable.close()
        wait_until(browser, lambda d: presence(KID)(d) == "offline", LONG, "the lane offline")
        took = time.monotonic() - t
        seen = read_page(browser)
        assert seen["mark"] == "same page"
        el = card(seen, KID)
        assert el is not None and "bad" in el["cls"].split()
        assert el["badge"].lower() == "offline"
        assert "1 of 1 device not online" in seen["headline"]
        assert "bad" in seen["headline_cls"].split()
        print(f"\nthe page showed the lane offline {took:.1f} s after the cable was pulled "
              f"(it refreshes every {REFRESH_S:.0f} s)")
        screenshot(browser, tmp_path, "hostd-status-offline.png")
        assert console_errors(browser) == []  # no script error, no CSP violation, no 404
        page.stop()  # hostd gone, as the browser sees it: the page says so, keeps the figures
        wait_until(browser, lambda d: "not answering" in read_page(d)["conn"], LONG,
                   "hostd not answering")
        assert card(read_page(browser), KID) is not None


def test_a_device_name_with_html_in_it_is_shown_as_text(tmp_path: Path, sim: Any,  # noqa: F811
                                                        browser: Any) -> None:
    name = "<b id=x>hi</b>"  # a device id may be any 1..16 bytes of text
    with daemon_without_device(tmp_path, sim, "127.0.0.1:0", device_id=name) as daemon:
        assert daemon.web.url is not None
        browser.get(daemon.web.url)
        first = read_page(browser)
        wait_until(browser, lambda d: read_page(d)["updated"] != first["updated"], LONG,
                   "a refresh")  # the live part, replaced from /fragment
        for moment, seen in (("as served", first), ("after a refresh", read_page(browser))):
            el = card(seen, name)
            assert el is not None, moment
            assert el["name"] == name, moment
            assert seen["injected"] == 0, moment  # no element was made of it
            assert "&lt;b id=x&gt;hi&lt;/b&gt;" in seen["html"], moment
            assert el["presence"] == "offline", moment
            assert "device not found" in el["text"], moment


# -- over HTTP --------------------------------------------------------------------------------


def test_the_page_is_served_on_loopback_only_unless_configured(
        tmp_path: Path, sim: Any, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    # the default is loopback, in the dataclass and in an empty config file
    assert from_dict({}).hostd.web_listen == DEFAULT_LISTEN
    assert is_loopback(split_listen(DEFAULT_LISTEN)[0])
    elsewhere = non_loopback_address()
    with daemon_without_device(tmp_path / "a", sim, "127.0.0.1:0") as daemon:
        port = daemon.web.port
        status, headers, body = get("127.0.0.1", port)
        assert status == 200 and b"lane status" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        with pytest.raises(ConnectionRefusedError):
            get(elsewhere, port)
        # a page elsewhere that renames itself to this address (DNS rebinding) gets nothing
        status, _, body = get("127.0.0.1", port, headers={"Host": f"evil.example:{port}"})
        assert status == 421 and b"only to localhost" in body
        assert get("127.0.0.1", port, headers={"Host": f"localhost:{port}"})[0] == 200
    with caplog.at_level(logging.WARNING, "hexiao.web"), \
            daemon_without_device(tmp_path / "b", sim, "0.0.0.0:0") as daemon:
        status, _, body = get(elsewhere, daemon.web.port,
                              headers={"Host": f"till-3.shop.example:{daemon.web.port}"})
    assert status == 200 and b"lane status" in body
    assert any("has no login" in m for m in caplog.messages)


def test_what_the_page_refuses_and_its_json(tmp_path: Path, sim: Any) -> None:  # noqa: F811
    with daemon_without_device(tmp_path, sim, "127.0.0.1:0") as daemon:
        port = daemon.web.port
        status, headers, body = get("127.0.0.1", port, "/status.json")
        assert status == 200 and headers["content-type"] == "application/json"
        data = json.loads(body)
        assert [d["id"] for d in data["devices"]] == [KID]
        assert data["devices"][0]["presence"] == "offline" and data["level"] == "bad"
        assert get("127.0.0.1", port, "/", "POST")[0] == 405
        assert get("127.0.0.1", port, "/static/../daemon.py")[0] == 404
        assert get("127.0.0.1", port, "/static/page.js")[0] == 200
        status, _, body = get("127.0.0.1", port, "/", "HEAD")
        assert status == 200 and body == b""


def test_a_port_in_use_is_logged_and_hostd_runs_without_the_page(
        tmp_path: Path, sim: Any, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    with socket.create_server(("127.0.0.1", 0)) as taken, \
            caplog.at_level(logging.ERROR, "hexiao.web"):
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with daemon_without_device(tmp_path, sim, listen) as daemon:
            assert daemon.web.url is None
            assert daemon.handlers.status()["devices"] == {KID: "waiting"}
    line, = (m for m in caplog.messages if "cannot listen" in m)
    assert listen in line and "web_listen" in line


def test_a_bad_web_listen_is_a_config_error_that_says_what_to_write() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict({"hostd": {"web_listen": "8780"}})
    assert e.value.errors == ['config: hostd.web_listen: expected HOST:PORT, e.g. '
                              '"127.0.0.1:9100", got "8780"']


def test_an_empty_web_listen_serves_no_page(tmp_path: Path, sim: Any) -> None:  # noqa: F811
    with daemon_without_device(tmp_path, sim, "") as daemon:
        assert daemon.web is None


# -- the view, one piece --------------------------------------------------------------------------


class FakeHandlers:
    """ControlHandlers' answers, canned (a unit test of the view and the templates)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def status(self) -> dict[str, Any]:
        return {"pid": 1, "uptime_s": 3725.0, "backend": "wechat_card",
                "tap": {"state": "failed", "error": "127.0.0.1:9100: address in use",
                        "printer": {"target": "usb:0416:5011", "state": "lost",
                                    "error": "<i>gone</i>"}, "counters": {"receipts": 3}}}

    def device_list(self) -> list[dict[str, Any]]:
        return [{"id": "lane-2", "lane": "lane-2", "state": "connecting", "port": "/dev/ttyACM0",
                 "peer": None, "error": "no session yet",
                 "counters": {"crc": 2, "mac": 1, "rx_frames": 9}, "stats": {}, "queued": 0}]

    def journal_list(self, state: list[str] | None = None, limit: int = 50) -> list[dict]:
        if self.fail:
            raise OSError("database is locked")
        e = {"id": 7, "lane": "lane-2", "state": "unknown", "outcome": None, "reason": None,
             "code": "287463512093", "created": "2026-11-25T10:11:12.345+08:00",
             "title": "<script>x()</script>", "card_type": "CASH"}
        return [e]


def test_the_view_cuts_codes_and_keeps_untrusted_text_escaped() -> None:
    snap = view.snapshot(FakeHandlers(), refresh_s=2.0)  # type: ignore[arg-type]
    assert snap["attention"][0]["code"] == "…2093"  # whatever the journal gives
    assert snap["devices"][0]["link"] == {"level": "warn", "rx": 9, "tx": 0, "retransmits": 0,
                                          "noise": 2, "tamper": 1}
    # every device not online: red, whatever else is fine
    assert snap["devices"][0]["presence"] == "connecting" and snap["level"] == "bad"
    assert snap["tap"]["level"] == "bad" and snap["tap"]["printer_level"] == "bad"
    app = StatusApp(FakeHandlers(), loopback_only=True)  # type: ignore[arg-type]
    html = app.env.get_template("page.html").render(s=snap)
    assert "287463512093" not in html and "…2093" in html
    assert "<script>x()" not in html and "&lt;script&gt;x()&lt;/script&gt;" in html
    assert "<i>gone</i>" not in html and "Needs a person" in html
    assert "address in use" in html


def test_a_handler_that_fails_is_a_line_on_the_page_not_a_broken_page() -> None:
    snap = view.snapshot(FakeHandlers(fail=True), refresh_s=2.0)  # type: ignore[arg-type]
    assert snap["level"] == "bad" and snap["devices"][0]["id"] == "lane-2"
    assert snap["problems"] == ["journal: OSError: database is locked",
                                "journal (verify manually): OSError: database is locked"]


def test_stop_ends_the_server_thread() -> None:
    page = StatusPage(FakeHandlers(), "127.0.0.2:0").start()  # type: ignore[arg-type]
    assert page.url is not None and page.loopback
    assert get("127.0.0.2", page.port)[0] == 200  # its own address is a name it answers to
    assert get("127.0.0.2", page.port, headers={"Host": "elsewhere"})[0] == 421
    page.stop()
    with pytest.raises(ConnectionRefusedError):
        get("127.0.0.2", page.port)
