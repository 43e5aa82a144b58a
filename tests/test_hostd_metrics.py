"""hostd metrics (scraped over real HTTP on loopback) and systemd notify (real AF_UNIX sockets)."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakeclock import Clock
from hexiao.hostd.observability import metrics as hm
from hexiao.hostd.observability.metrics import MAX_DEVICES, VERDICT_BUCKETS, Metrics, serve
from hexiao.hostd.observability.notify import Liveness, Notifier, Watchdog
from prometheus_client.parser import text_string_to_metric_families

CODE = "123456789012"  # a coupon code shaped like WeChat's 12-digit ones


# --- metrics -----------------------------------------------------------------------------


@pytest.fixture
def metrics() -> Iterator[tuple[Metrics, hm.MetricsServer]]:
    m = Metrics()
    server = serve(m, "127.0.0.1", 0)
    yield m, server
    server.stop()


def scrape(server: hm.MetricsServer) -> tuple[str, dict[tuple[str, tuple], float]]:
    r = httpx.get(server.url, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    return r.text, samples


def test_redemptions_and_verdict_histogram(metrics):
    m, server = metrics
    m.redemption("accepted", "CASH", 0.3)
    m.redemption("accepted", "CASH", 0.02)
    m.redemption("refused", None, 1.2, reason="already_used")
    text, s = scrape(server)
    assert s[("hexiao_redemptions_total",
              (("card_type", "CASH"), ("outcome", "accepted"), ("reason", "none")))] == 2
    assert s[("hexiao_redemptions_total",
              (("card_type", "none"), ("outcome", "refused"), ("reason", "already_used")))] == 1
    buckets = {dict(k[1])["le"]: v for k, v in s.items()
               if k[0] == "hexiao_verdict_latency_seconds_bucket"
               and dict(k[1])["outcome"] == "accepted"}
    assert [float(le) for le in buckets] == [*VERDICT_BUCKETS, float("inf")]
    assert buckets["0.01"] == 0 and buckets["0.025"] == 1 and buckets["0.25"] == 1
    assert buckets["0.5"] == 2 and buckets["+Inf"] == 2
    assert s[("hexiao_verdict_latency_seconds_count", (("outcome", "accepted"),))] == 2
    assert s[("hexiao_verdict_latency_seconds_sum", (("outcome", "accepted"),))] == \
        pytest.approx(0.32)
    refused = (("le", "1.0"), ("outcome", "refused"))
    assert s[("hexiao_verdict_latency_seconds_bucket", refused)] == 0
    assert "# TYPE hexiao_verdict_latency_seconds histogram" in text


def test_a_coupon_code_never_becomes_a_label(metrics, caplog):
    m, server = metrics
    with caplog.at_level(logging.DEBUG, logger="hexiao.metrics"):
        m.redemption(CODE, CODE, 0.1, reason=CODE)
        m.backend_call(CODE, 0.1, int(CODE))
    text, s = scrape(server)
    assert CODE not in text
    assert s[("hexiao_redemptions_total",
              (("card_type", "other"), ("outcome", "other"), ("reason", "other")))] == 1
    assert s[("hexiao_backend_errors_total", (("endpoint", "other"), ("errcode", "other")))] == 1
    assert CODE not in caplog.text
    assert "metrics: unknown outcome label mapped to 'other'" in caplog.messages


def test_backend_calls_and_errcodes(metrics):
    m, server = metrics
    m.backend_call("card/code/consume", 0.2)
    m.backend_call("card/code/consume", 0.7, -1)
    m.backend_call("card/code/consume", 3.0, None)
    m.backend_call("card/code/get", 0.05, 40099)
    _, s = scrape(server)
    ep = (("endpoint", "card/code/consume"),)
    assert s[("hexiao_backend_request_duration_seconds_count", ep)] == 3
    assert s[("hexiao_backend_request_duration_seconds_bucket", (*ep, ("le", "0.5")))] == 1
    assert s[("hexiao_backend_request_duration_seconds_bucket", (*ep, ("le", "1.0")))] == 2
    errors = {k[1]: v for k, v in s.items() if k[0] == "hexiao_backend_errors_total"}
    assert errors == {
        (("endpoint", "card/code/consume"), ("errcode", "-1")): 1,
        (("endpoint", "card/code/consume"), ("errcode", "transport")): 1,
        (("endpoint", "card/code/get"), ("errcode", "40099")): 1,
    }


def test_link_counters_count_increases_and_survive_a_reconnect(metrics):
    m, server = metrics
    m.link_counters("a1b2c3", {"rx_frames": 10, "tx_frames": 8, "retransmits": 2, "crc": 1,
                               "mac": 1, "replay": 3, "sessions": 1})
    m.link_counters("a1b2c3", {"rx_frames": 15, "tx_frames": 8, "retransmits": 2, "crc": 4,
                               "mac": 1, "replay": 3, "sessions": 1, "new_thing": 2})
    m.link_counters("a1b2c3", {"rx_frames": 4, "sessions": 1})  # a new link: counts from 0
    _, s = scrape(server)
    dev = ("device", "a1b2c3")
    assert s[("hexiao_link_frames_total", (dev, ("direction", "rx")))] == 19
    assert s[("hexiao_link_frames_total", (dev, ("direction", "tx")))] == 8
    assert s[("hexiao_link_errors_total", (("code", "crc"), dev))] == 4
    assert s[("hexiao_link_errors_total", (("code", "mac"), dev))] == 1
    assert s[("hexiao_link_errors_total", (("code", "replay"), dev))] == 3
    assert s[("hexiao_link_events_total", (dev, ("event", "retransmits")))] == 2
    assert s[("hexiao_link_events_total", (dev, ("event", "sessions")))] == 1
    assert s[("hexiao_link_events_total", (dev, ("event", "other")))] == 2
    m.forget_device("a1b2c3")
    text, _ = scrape(server)
    assert "a1b2c3" not in text


@pytest.mark.parametrize("device", ["", "lane 1", "-x", "a" * 41, "é"])
def test_a_device_id_must_be_plain(device):
    with pytest.raises(ValueError) as e:
        Metrics().link_counters(device, {"rx_frames": 1})
    assert str(e.value) == "device id must be 1-40 of [0-9A-Za-z_.:-], starting alphanumeric"


def test_device_count_is_bounded():
    m = Metrics()
    for i in range(MAX_DEVICES):
        m.link_counters(f"dev{i}", {"rx_frames": 1})
    with pytest.raises(ValueError) as e:
        m.link_counters("one-too-many", {"rx_frames": 1})
    assert str(e.value) == "more than 64 devices: forget_device() gone ones"
    m.forget_device("dev0")
    m.link_counters("one-too-many", {"rx_frames": 1})


def test_gauges_and_tap_receipts(metrics):
    m, server = metrics
    _, s = scrape(server)
    assert {s[("hexiao_tap_receipts_total", (("result", r),))] for r in hm.TAP_RESULTS} == {0}
    m.devices_connected(2)
    m.journal_attention(3)
    m.tap_receipt("injected")
    m.tap_receipt("failed_open", 2)
    _, s = scrape(server)
    assert s[("hexiao_devices_connected", ())] == 2
    assert s[("hexiao_journal_attention_entries", ())] == 3
    assert s[("hexiao_tap_receipts_total", (("result", "injected"),))] == 1
    assert s[("hexiao_tap_receipts_total", (("result", "failed_open"),))] == 2
    assert s[("hexiao_tap_receipts_total", (("result", "passed"),))] == 0
    with pytest.raises(ValueError) as e:
        m.tap_receipt("dropped")
    assert str(e.value) == "tap result must be one of passed, injected, failed_open"


def test_each_instance_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.devices_connected(5)
    assert b"hexiao_devices_connected 5.0" in a.render()
    assert b"hexiao_devices_connected 0.0" in b.render()


def test_serves_loopback_only_and_stops():
    with pytest.raises(ValueError) as e:
        serve(Metrics(), "0.0.0.0", 0)
    assert str(e.value) == "metrics must listen on a loopback address, not '0.0.0.0'"
    server = Metrics().serve("127.0.0.1", 0)
    port = server.port
    assert httpx.get(server.url, timeout=10).status_code == 200
    server.stop()
    assert not server.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)


# --- systemd notify ----------------------------------------------------------------------


@pytest.fixture
def path_sock(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    s.settimeout(10)  # a guard against hanging, not a timing check
    yield s, path
    s.close()


@pytest.fixture
def abstract_sock() -> Iterator[tuple[socket.socket, str]]:
    name = f"hexiao-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(10)
    yield s, "@" + name
    s.close()


def env(addr: str, **more: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": addr, **more}


@pytest.mark.parametrize("which", ["path_sock", "abstract_sock"])
def test_notify_sends_each_state(which, request):
    sock, addr = request.getfixturevalue(which)
    n = Notifier(env(addr, WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid())))
    assert n.enabled and n.watchdog_interval_s() == 2.0
    assert n.ready("2 lanes")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 lanes"
    assert n.status("lane-1 offline")
    assert sock.recv(4096) == b"STATUS=lane-1 offline"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_status_cannot_forge_another_assignment(path_sock):
    sock, addr = path_sock
    Notifier(env(addr)).status("lane-1 down\nREADY=1")
    assert sock.recv(4096) == b"STATUS=lane-1 down READY=1"
    with pytest.raises(ValueError) as e:
        Notifier(env(addr)).notify("STATUS=a\nREADY=1")
    assert str(e.value) == "a notify assignment must be one line"


def test_no_notify_socket_is_a_noop():
    n = Notifier({"WATCHDOG_USEC": "4000000"})
    assert not n.enabled
    assert n.watchdog_interval_s() is None
    assert [n.ready("x"), n.status("x"), n.watchdog(), n.stopping()] == [False] * 4


def test_watchdog_pid_of_another_process_means_no_watchdog(path_sock):
    sock, addr = path_sock
    n = Notifier(env(addr, WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid() + 1)))
    assert n.watchdog_interval_s() is None
    assert not n.watchdog()
    n.ready()
    assert sock.recv(4096) == b"READY=1"  # the first datagram: no WATCHDOG=1 went before it
    assert Notifier(env(addr, WATCHDOG_USEC="4000000"), pid=7).watchdog_interval_s() == 2.0


def test_bad_watchdog_usec_and_foreign_socket_are_logged(caplog):
    assert Notifier(env("/x", WATCHDOG_USEC="soon")).watchdog_interval_s() is None
    assert not Notifier(env("vsock:2:1234")).enabled
    assert caplog.messages == [
        "WATCHDOG_USEC/WATCHDOG_PID not integers: no watchdog",
        "NOTIFY_SOCKET 'vsock:2:1234' is not a unix socket path: not notifying"]


def test_a_failed_send_is_logged_not_raised(tmp_path, caplog):
    n = Notifier(env(str(tmp_path / "gone")))
    assert not n.ready()
    assert caplog.messages == ["sd_notify READY failed: [Errno 2] No such file or directory"]


def drain(sock: socket.socket, marker: Notifier) -> list[bytes]:
    """Every datagram queued so far (a STOPPING=1 sent last marks the end)."""
    marker.stopping()
    got = []
    while (d := sock.recv(4096)) != b"STOPPING=1":
        got.append(d)
    return got


def test_watchdog_pings_only_while_healthy(path_sock):
    sock, addr = path_sock
    n = Notifier(env(addr, WATCHDOG_USEC="1000000"))
    health = iter([True, True, False, True, False, False])
    waits: list[float] = []

    def wait(seconds: float) -> bool:  # a fake clock: each call is one interval passing
        waits.append(seconds)
        return len(waits) == 6  # stop after the sixth interval

    dog = Watchdog(n, lambda: next(health), wait=wait)
    dog.run()
    assert waits == [0.5] * 6
    assert drain(sock, n) == [b"WATCHDOG=1"] * 3
    assert (dog.pings, dog.missed) == (3, 3)


def test_a_health_check_that_raises_is_unhealthy(path_sock, caplog):
    sock, addr = path_sock
    n = Notifier(env(addr, WATCHDOG_USEC="1000000"))

    def broken() -> bool:
        raise RuntimeError("journal locked")

    assert not Watchdog(n, broken).tick()
    assert drain(sock, n) == []
    assert "watchdog: the health check raised; not pinging" in caplog.messages


def test_watchdog_without_interval_does_nothing():
    called = []
    dog = Watchdog(Notifier({}), lambda: called.append(1) or True, wait=lambda s: False)
    dog.run()  # would loop forever if it ran
    assert called == []


def test_watchdog_thread_starts_with_a_ping_and_stops(path_sock):
    sock, addr = path_sock
    dog = Watchdog(Notifier(env(addr, WATCHDOG_USEC="7200000000")), lambda: True).start()
    assert sock.recv(4096) == b"WATCHDOG=1"
    dog.stop()
    assert dog._thread is not None and not dog._thread.is_alive()


def test_liveness_needs_every_loop_to_beat(path_sock):
    sock, addr = path_sock
    clock = Clock()
    live = Liveness(clock, max_age_s=5.0)
    dog = Watchdog(Notifier(env(addr, WATCHDOG_USEC="4000000")), live)
    live.beat("serial")
    live.beat("redeem")
    clock.now += 3
    live.beat("serial")
    assert dog.tick()
    clock.now += 3  # redeem last beat 6 s ago: wedged
    assert live.stale() == ["redeem"]
    assert not dog.tick()
    live.forget("redeem")  # its lane was shut down on purpose
    assert dog.tick()
    assert drain(sock, dog.notifier) == [b"WATCHDOG=1"] * 2
