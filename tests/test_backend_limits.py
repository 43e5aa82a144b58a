"""Issue 17's backend items: every backend call is bounded, and sub_merchant_id absent = any.

A consume (card API) or use (merchant coupons) whose reply trickles its headers at 1 byte/s,
runs to 300 MB or never ends is given up at the operation's deadline or the reply cap, read as
OutcomeUnknown and settled by a query: accepted once, never sent twice. The misbehaving backend
is a real HTTP server on loopback in front of the real WeChat simulator or the signed merchant
coupon fake: it forwards the consume (so the backend commits it), then answers badly. Times are
liveness bounds (deadline + 5 s), not performance claims.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hexiao.hostd.backends.base import Offline, OutcomeUnknown
from hexiao.hostd.backends.busifavor import BusifavorBackend, BusifavorClient
from hexiao.hostd.backends.factory import SetupError, make_backend
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.config import from_dict
from hexiao.hostd.journal import Journal
from hexiao.hostd.redeem import Engine, LaneConfig
from hexiao.tools.sim.busifavor_fake import BusifavorFake, Coupon, Stock, merchant_identity

DEADLINE_S, TIMEOUT_S = 2.0, 5.0  # the trickle (1 byte/s) never trips the per-read timeout
CAP = 1 << 20
HUGE = 300 << 20
CASH = "287463512093"  # the example seed's 满100减20, NORMAL
SEED = read(EXAMPLE)
APP = SEED["apps"][0]
CONSUME, USE = "/card/code/consume", "/v3/marketing/busifavor/coupons/use"
MODES = ["trickle_headers", "huge_announced", "huge_unannounced", "endless_chunked"]
_HOP = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding",
        "content-encoding", "keep-alive"}


class BadBackend:
    """A loopback HTTP server in front of `upstream`: every request is forwarded and its reply
    relayed, except `target`'s, which is forwarded (the backend acts on it) and then answered
    in `mode`. `sent` counts the bad reply's bytes the client took before it hung up."""

    def __init__(self, upstream: str, target: str, mode: str) -> None:
        self.upstream, self.target, self.mode = upstream, target, mode
        self.sent = 0
        self.hits = 0
        self.stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while True:  # keep-alive: one request after another
                line = f.readline()
                if not line.strip():
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := f.readline()) not in (b"\r\n", b"\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", "0")))
                r = httpx.request(method, self.upstream + target, content=body, headers={
                    k: v for k, v in headers.items() if k not in _HOP})
                if urlsplit(target).path == self.target:
                    self.hits += 1
                    self._misbehave(conn)
                    return
                head = "".join(f"{k}: {v}\r\n" for k, v in r.headers.items()
                               if k.lower() not in _HOP)
                conn.sendall(f"HTTP/1.1 {r.status_code} X\r\n{head}Content-Length: "
                             f"{len(r.content)}\r\n\r\n".encode() + r.content)

    def _misbehave(self, conn: socket.socket) -> None:
        chunk = b"x" * (1 << 16)
        try:
            if self.mode == "trickle_headers":
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                    if self.stop.wait(1.0):
                        return
                    conn.sendall(bytes([byte]))
                return
            head = {"huge_announced": f"Content-Length: {HUGE}\r\n",
                    "huge_unannounced": "Connection: close\r\n",
                    "endless_chunked": "Transfer-Encoding: chunked\r\n"}[self.mode]
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{head}\r\n"
                         .encode())
            if self.mode == "endless_chunked":
                chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            while not self.stop.is_set() and (self.mode == "endless_chunked"
                                               or self.sent < HUGE):
                conn.sendall(chunk)
                self.sent += len(chunk)
        except OSError:
            pass  # the client hung up: what this test wants


def _bounded(run: Any) -> tuple[Any, float, int]:
    """run()'s result, its seconds and the peak memory it allocated."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        out = run()
    finally:
        seconds = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, seconds, peak


def _check_bounds(bad: BadBackend, seconds: float, peak: int) -> None:
    assert seconds < DEADLINE_S + 5, f"the lane was held {seconds:.1f} s"
    if bad.mode != "trickle_headers":
        # hostd hung up after about the cap: the rest sat in socket buffers, or was never sent
        assert bad.sent < CAP + (32 << 20), bad.sent
        assert peak < 8 * CAP, f"peak {peak >> 20} MiB while refusing a long reply"


class Spy:
    """The backend as the engine sees it, recording what consume raised."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.errors = inner, []  # type: list[Exception]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def consume(self, *args: Any, **kw: Any) -> str:
        try:
            return self.inner.consume(*args, **kw)
        except Exception as e:
            self.errors.append(e)
            raise


def _why(mode: str) -> str:
    return f"no complete reply within the {DEADLINE_S:g} s deadline" \
        if mode == "trickle_headers" else f"reply larger than {CAP} bytes"


def _steps(journal: Journal, entry_id: int) -> list[str]:
    return [s.step for s in journal.steps(entry_id)]


# --- the WeChat card API (httpx) -----------------------------------------------------------

@pytest.fixture
def sim() -> Iterator[WeChatSim]:
    with WeChatSim(SEED) as s:
        yield s


def _sim_state(sim: WeChatSim) -> dict[str, Any]:
    return httpx.get(f"{sim.url}/_sim/state").json()


@pytest.mark.parametrize("mode", MODES)
def test_card_api_consume_bounded_then_settled_by_query(sim: WeChatSim, tmp_path: Path,
                                                        mode: str) -> None:
    bad = BadBackend(sim.url, CONSUME, mode)
    try:
        with WeChatCardClient(bad.url, APP["appid"], APP["secret"], timeout_s=TIMEOUT_S,
                              deadline_s=DEADLINE_S, sleep=lambda s: None) as client, \
                Journal(tmp_path / "j.db") as journal:
            spy = Spy(client)
            v, seconds, peak = _bounded(
                lambda: Engine(journal, spy, LaneConfig()).redeem(CASH, time.time()))
            steps = _steps(journal, v.entry_id or 0)
    finally:
        bad.close()
    (err,) = spy.errors
    assert isinstance(err, OutcomeUnknown) and str(err) == f"card/code/consume: {_why(mode)}"
    assert err.settled is (mode != "trickle_headers")  # headers in: the service has decided
    assert (v.outcome, v.reason) == ("accepted", None)  # the query found it consumed
    assert "unknown" in steps and "verify_sent" in steps
    s = _sim_state(sim)
    assert s["codes"][CASH]["consume_count"] == 1 and s["requests"]["card/code/consume"] == 1
    assert bad.hits == 1
    _check_bounds(bad, seconds, peak)


def test_a_read_retries_only_within_the_deadline(sim: WeChatSim) -> None:
    bad = BadBackend(sim.url, "/card/code/get", "trickle_headers")
    try:
        with WeChatCardClient(bad.url, APP["appid"], APP["secret"], timeout_s=TIMEOUT_S,
                              deadline_s=DEADLINE_S, retries=5, sleep=lambda s: None) as c:
            t0 = time.monotonic()
            with pytest.raises(Offline, match=rf"^card/code/get: {_why('trickle_headers')}$"):
                c.get_code(CASH)
            seconds = time.monotonic() - t0
    finally:
        bad.close()
    assert seconds < DEADLINE_S + 5
    assert bad.hits == 1  # the deadline is the operation's: no retry after it


def test_a_consume_whose_token_fetch_runs_out_of_time_is_never_sent(sim: WeChatSim) -> None:
    bad = BadBackend(sim.url, "/cgi-bin/token", "trickle_headers")
    try:
        with WeChatCardClient(bad.url, APP["appid"], APP["secret"], timeout_s=TIMEOUT_S,
                              deadline_s=DEADLINE_S, sleep=lambda s: None) as c, \
                pytest.raises(Offline, match=rf"^token: {_why('trickle_headers')}$"):
            c.consume(CASH)  # the token is fetched within the consume's own deadline
    finally:
        bad.close()
    assert _sim_state(sim)["requests"].get("card/code/consume", 0) == 0  # Offline: not sent


def test_a_reply_within_the_limits_is_untouched(sim: WeChatSim) -> None:
    with WeChatCardClient(sim.url, APP["appid"], APP["secret"], deadline_s=DEADLINE_S,
                          max_reply_bytes=1024) as c:
        assert c.get_code(CASH).status == "NORMAL"  # a few hundred bytes: under 1 KiB
        assert c.get_card(c.get_code(CASH).card_id)["card_type"] == "CASH"


# --- WeChat Pay merchant coupons (wechatpayv3 over requests) -------------------------------

MCHID, APPID, APIV3 = "1900000001", "wx1234567890abcdef", "0123456789abcdef0123456789abcdef"
STOCK, COUPON, OWNER = "1212000000001", "C100000001", "o-alice"


@pytest.fixture(scope="module")
def merchant() -> tuple[str, str, str]:
    return merchant_identity()  # key generation is slow: once


@pytest.fixture
def fake(merchant: tuple[str, str, str]) -> Iterator[BusifavorFake]:
    with BusifavorFake(mchid=MCHID, appids=(APPID,), merchant_public_pem=merchant[1],
                       merchant_serial=merchant[2], apiv3_key=APIV3,
                       stocks=[Stock(STOCK, "满30减5")],
                       coupons=[Coupon(COUPON, STOCK, OWNER)]) as f:
        yield f


@pytest.mark.parametrize("mode", MODES)
def test_merchant_coupon_use_bounded_then_settled_by_query(
        fake: BusifavorFake, merchant: tuple[str, str, str], tmp_path: Path, mode: str) -> None:
    bad = BadBackend(fake.base_url, USE, mode)
    try:
        client = BusifavorClient(mchid=MCHID, appid=APPID, private_key_pem=merchant[0],
                                 cert_serial_no=merchant[2], apiv3_key=APIV3,
                                 base_url=bad.url, timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S,
                                 sleep=lambda s: None)
        spy = Spy(BusifavorBackend(client, stock_id=STOCK, openid_for={COUPON: OWNER}.get))
        with Journal(tmp_path / "j.db") as journal:
            v, seconds, peak = _bounded(lambda: Engine(
                journal, spy, LaneConfig(decrypt="never")).redeem(COUPON, time.time()))
            steps = _steps(journal, v.entry_id or 0)
    finally:
        bad.close()
    (err,) = spy.errors
    assert isinstance(err, OutcomeUnknown) and str(err) == f"use: {_why(mode)}"
    assert err.settled is (mode != "trickle_headers")
    assert (v.outcome, v.reason) == ("accepted", None)
    assert "unknown" in steps and "verify_sent" in steps
    assert len(fake.uses) == 1 and bad.hits == 1  # used once, never sent again
    _check_bounds(bad, seconds, peak)


# --- the factory: config -> clients ----------------------------------------------------------

def test_make_backend_takes_the_deadline_from_the_config(sim: WeChatSim, tmp_path: Path) -> None:
    secret = tmp_path / "wechat.secret"
    secret.write_text(APP["secret"])
    secret.chmod(0o600)
    bad = BadBackend(sim.url, "/card/code/get", "trickle_headers")
    try:
        backend = make_backend(from_dict({"backend": {
            "kind": "wechat_card", "base_url": bad.url, "appid": APP["appid"],
            "secret_file": str(secret), "deadline_s": 1.0, "retries": 0}}))
        client = backend.client()
        with pytest.raises(Offline, match=r"within the 1 s deadline$"):
            client.get_code(CASH)
        client.close()
        backend.close()
    finally:
        bad.close()


def test_make_backend_owns_the_embedded_simulator() -> None:
    backend = make_backend(from_dict({}))  # kind = "sim", no base_url: embedded
    assert backend.sim is not None and backend.url == backend.sim.url
    one, two = backend.client(), backend.client()
    assert one is not two  # one per thread
    assert one.get_code(CASH).status == "NORMAL"
    one.close()
    two.close()
    backend.close()
    with WeChatCardClient(backend.url, APP["appid"], APP["secret"], retries=0) as c, \
            pytest.raises(Offline, match=r"cannot reach the token service"):
        c.get_code(CASH)  # stopped with the backend


def test_make_backend_says_what_to_fix(tmp_path: Path) -> None:
    cfg = from_dict({"backend": {"kind": "wechat_card", "appid": "wx1",
                                 "secret_file": str(tmp_path / "missing.secret")}})
    with pytest.raises(SetupError, match=r"^backend: secret file .*missing\.secret: cannot "):
        make_backend(cfg)


# --- sub_merchant_id absent = any ------------------------------------------------------------

def test_sub_merchant_absent_accepts_any_sub_merchant(sim: WeChatSim, tmp_path: Path) -> None:
    store_card = "901827364519"  # limited to store 401234567 and sub-merchant 12345678
    with WeChatCardClient(sim.url, APP["appid"], APP["secret"]) as client, \
            Journal(tmp_path / "j.db") as journal:
        other = Engine(journal, client, LaneConfig(lane="b", location_id=401234567,
                                                   sub_merchant_id=87654321))
        assert other.redeem(store_card, time.time()).reason == "not_this_merchant"
        v = Engine(journal, client, LaneConfig(lane="a", location_id=401234567)).redeem(
            store_card, time.time())
    assert (v.outcome, v.reason) == ("accepted", None)
    assert _sim_state(sim)["codes"][store_card]["consume_count"] == 1


def _serve_bad(upstream: str, target: str, mode: str, q: Any) -> None:
    bad = BadBackend(upstream, target, mode)
    q.put(bad.url)
    threading.Event().wait()  # until the test terminates this process


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.soak
def test_soak_hostile_backend_replies_keep_memory_flat(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Rounds of every hostile reply against one journal, a new client each time as hostd's
    workers make them: each consume settles by query (consumed once), and the process's resident
    memory after the first round stays flat. The hostile servers run in their own processes, so
    only hostd's side is measured."""
    # pytest keeps every log record of a test, and an "outcome unknown" warning's arguments hold
    # the exception and so its frames: that would be the harness's memory, not hostd's (the same
    # run outside pytest stays flat either way)
    caplog.set_level(logging.ERROR)
    seed = read(EXAMPLE)
    card_id = next(c["card_id"] for c in seed["codes"] if c["code"] == CASH)
    ctx = multiprocessing.get_context("fork")
    rss: list[int] = []
    rounds = 0
    with WeChatSim(seed) as sim, Journal(tmp_path / "j.db") as journal:
        servers = {}
        for mode in MODES:
            q = ctx.Queue()
            proc = ctx.Process(target=_serve_bad, args=(sim.url, CONSUME, mode, q), daemon=True)
            proc.start()
            servers[mode] = (proc, q.get(timeout=30))
        try:
            for rnd in range(12):
                for mode, (_, url) in servers.items():
                    code = f"9{rnd:03d}{MODES.index(mode):08d}"  # a new coupon each time
                    httpx.post(f"{sim.url}/_sim/codes", json={"code": code, "card_id": card_id})
                    with WeChatCardClient(url, APP["appid"], APP["secret"], timeout_s=TIMEOUT_S,
                                          deadline_s=DEADLINE_S, sleep=lambda s: None) as client:
                        t0 = time.monotonic()
                        v = Engine(journal, client, LaneConfig()).redeem(code, time.time())
                        assert time.monotonic() - t0 < DEADLINE_S + 5
                    assert v.outcome == "accepted", v  # settled by the query
                    rounds += 1
                rss.append(_rss_kib())
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.join(10)
        counts = [c["consume_count"] for c in _sim_state(sim)["codes"].values()]
    assert max(counts) <= 1  # never consumed twice
    grown = rss[-1] - rss[0]
    print(f"\nbackend soak: {rounds} hostile replies ({len(MODES)} kinds x 12 rounds; 300 MB "
          f"offered by each huge one); RSS after round 1 {rss[0] // 1024} MiB, after the last "
          f"{rss[-1] // 1024} MiB (grew {grown} KiB); every consume settled by query, at most "
          f"{max(counts)} consume per code")
    assert grown < 16 * 1024, rss
