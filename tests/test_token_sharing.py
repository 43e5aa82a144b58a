"""Many tills on one appid share its access token (issue 16 §2).

Real pieces: hostd's config files, make_backend() (one token cache per hostd, shared by its lane
workers and its reconcile client), the redemption Engine over a real SQLite journal, and the
WeChat simulator over HTTP on loopback. Time is one simulated clock for the simulator, the
tokens and the engines, so a whole day of redemptions runs in seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeclock import T0, Clock
from hexiao.hostd import config
from hexiao.hostd.backends import base
from hexiao.hostd.backends.base import CodeInfo, OutcomeUnknown, TokenError
from hexiao.hostd.backends.factory import ConfiguredBackend, make_backend
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.backends.tokens import FORCE_INTERVAL_S, TokenCache
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.observability.metrics import Metrics
from hexiao.hostd.redeem import Engine, LaneConfig

APP, SECRET = "wx0000000000005a1e", "till-secret-0000000000000000001"
CARD = "pSharedTokenCash"
TILLS, LANES = 3, 2
STEP_S, DAY = 600, 86_400  # one scan per till every 10 minutes, for a day
ROUNDS = DAY // STEP_S


def code(till: int, n: int) -> str:
    return f"6{till}{n:010d}"


def seed(codes: list[str]) -> dict[str, Any]:
    return {"apps": [{"appid": APP, "secret": SECRET}],
            "cards": [{"card_id": CARD, "card_type": "CASH", "title": "满10减2", "reduce_cost": 200,
                       "date_info": {"type": "DATE_TYPE_FIX_TIME_RANGE",
                                     "begin_timestamp": "-1d", "end_timestamp": "+3d"}}],
            "codes": [{"code": c, "card_id": CARD} for c in codes]}


@dataclass
class Till:
    """One hostd: its backend (one token cache), a journal, two lanes and a reconcile client."""

    backend: ConfiguredBackend
    journal: Journal
    lanes: list[Engine]
    reconcile: WeChatCardClient
    metrics: Metrics

    @property
    def tokens(self) -> TokenCache:
        assert self.backend.tokens is not None
        return self.backend.tokens

    def refused_metric(self, errcode: int) -> float:
        for line in self.metrics.render().decode().splitlines():
            if line.startswith(f'hexiao_backend_token_refused_total{{errcode="{errcode}"}} '):
                return float(line.split()[1])
        return 0.0

    def close(self) -> None:
        for e in self.lanes:
            e.client.close()
        self.reconcile.close()
        self.journal.close()
        self.backend.close()


def hostd_config(tmp_path: Path, n: int, url: str, mode: str = "stable") -> config.Config:
    """A till's hostd.toml as an installer writes it (the secret in a 0600 file)."""
    d = tmp_path / f"till{n}"
    d.mkdir(mode=0o700)
    fd = os.open(d / "wechat.secret", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, SECRET.encode() + b"\n")
    os.close(fd)
    (d / "hostd.toml").write_text(
        f'[hostd]\nstate_dir = "{d}"\n[backend]\nkind = "wechat_card"\nbase_url = "{url}"\n'
        f'appid = "{APP}"\nsecret_file = "wechat.secret"\ntoken_mode = "{mode}"\n')
    return config.load(d / "hostd.toml")


@pytest.fixture
def tills(tmp_path: Path, clock: Clock) -> Iterator[tuple[WeChatSim, list[Till]]]:
    codes = [code(t, n) for t in range(TILLS) for n in range(ROUNDS + 40)]
    with WeChatSim(seed(codes), clock=clock) as sim:
        out = []
        for n in range(TILLS):
            metrics = Metrics()
            backend = make_backend(hostd_config(tmp_path, n, sim.url), clock=clock,
                                   on_token_refused=metrics.token_refused)
            journal = Journal(tmp_path / f"till{n}" / "journal.sqlite3")
            lanes = [Engine(journal, backend.client(), LaneConfig(lane=f"lane-{k}"))
                     for k in range(LANES)]
            out.append(Till(backend, journal, lanes, backend.client(), metrics))  # type: ignore
        try:
            yield sim, out
        finally:
            for t in out:
                t.close()


def sim_state(sim: WeChatSim) -> dict[str, Any]:
    return httpx.get(f"{sim.url}/_sim/state").json()


def test_many_tills_share_one_token_for_a_day_then_survive_a_dead_token(
        tills: tuple[WeChatSim, list[Till]], clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    sim, hostds = tills
    held: set[str] = set()
    for r in range(ROUNDS):
        clock.now += STEP_S
        for t, till in enumerate(hostds):
            v = till.lanes[r % LANES].redeem(code(t, r), clock.now)
            assert (v.outcome, v.reason) == ("accepted", None), (r, t, v)
            if r % 6 == 0:  # the reconcile loop's client: the same token as the lanes
                assert till.reconcile.get_code(code(t, r), check_consume=False).status == \
                    "CONSUMED"
            held.add(till.reconcile.token())
    s = sim_state(sim)
    assert s["token_refusals"] == {}  # no till ever invalidated another's token
    assert all(t.tokens.refusals == {} and t.refused_metric(40001) == 0 for t in hostds)
    assert s["requests"].get("cgi-bin/token", 0) == 0
    calls = s["requests"]["cgi-bin/stable_token"]
    # each hostd fetches about once per token lifetime (7200 s, refreshed 300 s early): ~13 a
    # day, where one fetch per scan would be 432; the platform allows 500 000 a day
    assert TILLS <= calls <= TILLS * (DAY // 6900 + 2), calls
    assert sum(t.tokens.force_refreshes for t in hostds) == 0
    assert len(held) <= DAY // 6900 + 2  # the same tokens, shared by all tills
    assert all(c["consume_count"] == 1 for k, c in s["codes"].items() if int(k[-10:]) < ROUNDS)

    # a fault: the platform kills the current token, and stable_token still hands it out
    httpx.post(f"{sim.url}/_sim/tokens/invalidate", json={"appid": APP})
    caplog.set_level(logging.WARNING, logger="hexiao.hostd.backends")
    for t, till in enumerate(hostds):
        v = till.lanes[0].redeem(code(t, ROUNDS), clock.now)
        assert (v.outcome, v.reason) == ("accepted", None)
    # one till force-refreshed; the others found its new token in the ordinary way
    assert sum(t.tokens.force_refreshes for t in hostds) == 1
    assert sim_state(sim)["apps"][APP]["force_refreshes_today"] == 1
    assert all(t.tokens.refusals == {40001: 1} and t.refused_metric(40001) == 1 for t in hostds)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("refused by the API (errcode 40001" in w for w in warnings) == TILLS
    assert sum("force-refreshing" in w for w in warnings) == 1
    tokens = {t.reconcile.token() for t in hostds}
    assert len(tokens) == 1 and not any(tok in w for w in warnings for tok in tokens | held)


def test_a_token_refused_again_and_again_is_force_refreshed_at_most_every_30_s(
        tills: tuple[WeChatSim, list[Till]], clock: Clock) -> None:
    sim, hostds = tills
    for t, till in enumerate(hostds):
        assert till.lanes[0].redeem(code(t, 0), clock.now).outcome == "accepted"
    # the card API refuses every token (40001) for a while: a storm no refresh can end
    httpx.post(f"{sim.url}/_sim/faults", json={"script": [{
        "path": "card/code/get", "count": -1,
        "json": {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"}}]})
    start, forced_at = clock.now, [[] for _ in hostds]  # type: list[list[float]]
    for r in range(1, 20):  # every 5 s for 95 s, on every till
        clock.now += 5
        for t, till in enumerate(hostds):
            before = till.tokens.force_refreshes
            v = till.lanes[r % LANES].redeem(code(t, r), clock.now)
            assert (v.outcome, v.reason, v.why) == ("refused", "setup", "token")
            forced_at[t] += [clock.now] * (till.tokens.force_refreshes - before)
    for times in forced_at:
        assert 1 <= len(times) <= 1 + (clock.now - start) // FORCE_INTERVAL_S
        assert all(b - a >= FORCE_INTERVAL_S for a, b in pairwise(times))
    s = sim_state(sim)
    assert s["apps"][APP]["force_refreshes_today"] == sum(map(len, forced_at)) <= 20
    assert all(c["consume_count"] == 0 for k, c in s["codes"].items() if int(k[-10:]) >= 1)
    # the storm over: the next scan works without another force refresh
    httpx.post(f"{sim.url}/_sim/faults", json={"script": []})
    clock.now += 5
    total = sum(t.tokens.force_refreshes for t in hostds)
    for t, till in enumerate(hostds):
        assert till.lanes[0].redeem(code(t, 30), clock.now).outcome == "accepted"
    assert sum(t.tokens.force_refreshes for t in hostds) == total


def test_one_hostd_never_replaces_its_own_token(tmp_path: Path, clock: Clock) -> None:
    # the legacy cgi-bin/token mode: every fetch replaces the appid's token, so a hostd whose
    # lanes each fetched their own would invalidate itself; one cache per hostd fetches once
    with WeChatSim(seed([code(0, n) for n in range(6)]), clock=clock) as sim:
        backend = make_backend(hostd_config(tmp_path, 0, sim.url, mode="token"), clock=clock)
        clients = [backend.client() for _ in range(3)]
        try:
            for n, c in enumerate(clients):
                assert c.get_code(code(0, n)).status == "NORMAL"
            assert len({c.token() for c in clients}) == 1
            clock.now += 400  # past the 300 s overlap an extra fetch would have left
            for n, c in enumerate(clients):
                assert c.get_code(code(0, n)).status == "NORMAL"
            s = sim_state(sim)
            assert s["apps"][APP]["token_requests_today"] == 1 and s["token_refusals"] == {}
        finally:
            for c in clients:
                c.close()
            backend.close()


def test_a_server_without_stable_token_is_asked_at_cgi_bin_token(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    # a card-API server without stable_token answers as for any unknown API (40066, 404) or
    # asks for a token (41001); hostd then uses cgi-bin/token, and says so once
    answers = [httpx.Response(200, json={"errcode": 40066, "errmsg": "invalid url"}),
               httpx.Response(404, text="not found"),
               httpx.Response(200, json={"errcode": 41001, "errmsg": "access_token missing"})]
    for answer in answers:
        paths: list[str] = []

        def handler(request: httpx.Request, answer: httpx.Response = answer,
                    paths: list[str] = paths) -> httpx.Response:
            paths.append(request.url.path)
            if request.url.path == "/cgi-bin/stable_token":
                return answer
            assert request.url.path == "/cgi-bin/token"
            return httpx.Response(200, json={"access_token": "plain", "expires_in": 7200})

        caplog.clear()
        with WeChatCardClient("http://backend.invalid", APP, SECRET, token_mode="stable",
                              transport=httpx.MockTransport(handler)) as c:
            assert c.token() == "plain" and c.tokens.mode == "token"
            assert c.token(force=True) == "plain"
        assert paths == ["/cgi-bin/stable_token", "/cgi-bin/token", "/cgi-bin/token"]
        assert sum("has no cgi-bin/stable_token" in r.getMessage() for r in caplog.records) == 1
    # a real refusal of the credentials is not read as "no stable_token"
    with WeChatCardClient("http://backend.invalid", APP, SECRET, token_mode="stable",
                          transport=httpx.MockTransport(lambda r: httpx.Response(200, json={
                              "errcode": 40125, "errmsg": "invalid appsecret"}))) as c, \
            pytest.raises(Exception) as err:
        c.token()
    assert getattr(err.value, "errcode", None) == 40125 and c.tokens.mode == "stable"


def test_the_secret_travels_in_the_body_never_in_a_url(clock: Clock) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"access_token": "tok", "expires_in": 7200})

    with WeChatCardClient("http://backend.invalid", APP, SECRET, token_mode="stable",
                          transport=httpx.MockTransport(handler)) as c:
        c.token()
    (req,) = seen
    assert req.method == "POST" and SECRET not in str(req.url)
    assert b'"force_refresh": false' in req.content and SECRET.encode() in req.content


def test_force_refresh_limits_are_kept_by_the_cache() -> None:
    now = [T0]
    cache = TokenCache("stable", clock=lambda: now[0], wall=lambda: now[0])
    current, calls = ["t0"], []  # a platform whose every token the API refuses

    def fetch(force: bool) -> tuple[str, int]:
        calls.append(force)
        if force:
            current[0] = f"t{len(calls)}"
        return current[0], 7200

    assert cache.get(fetch, 1) == "t0"
    assert cache.refused("t0", 40001, fetch, 1) != "t0"  # ordinary fetch, then one force
    assert calls == [False, False, True]
    now[0] += 10
    with pytest.raises(TokenError, match="next one is allowed in 20 s"):
        cache.refused(current[0], 40001, fetch, 1)
    assert calls[-1] is False  # asked in the ordinary way only
    for _ in range(19):  # 20 a day in all
        now[0] += FORCE_INTERVAL_S
        cache.refused(current[0], 40001, fetch, 1)
    now[0] += FORCE_INTERVAL_S
    with pytest.raises(TokenError, match="20 force refreshes of today"):
        cache.refused(current[0], 40001, fetch, 1)
    assert cache.force_refreshes == 20 == calls.count(True) and cache.refusals == {40001: 22}
    now[0] += DAY  # a new day (China time): force refreshes again
    assert cache.refused(current[0], 40001, fetch, 1) == current[0] and calls[-1] is True


def test_a_token_service_that_repeats_a_refused_token_is_a_token_error() -> None:
    for mode in ("central", "token"):
        cache = TokenCache(mode, clock=lambda: T0)  # type: ignore[arg-type]
        cache.get(lambda force: ("same", 7200), 1)
        if mode == "central":
            with pytest.raises(TokenError, match="still gives the token the API refused"):
                cache.refused("same", 40001, lambda force: ("same", 7200), 1)
        else:  # cgi-bin/token: every fetch is a new token
            assert cache.refused("same", 42001, lambda force: ("new", 7200), 1) == "new"
        assert cache.force_refreshes == 0


class _LostUse:
    """A backend whose consume fails in its transport, as busifavor's (requests) does: the
    cause is no httpx error. For the engine's reading of base.py's verdict only."""

    def __init__(self, failure: OutcomeUnknown) -> None:
        self.failure = failure

    def get_code(self, code: str, card_id: str | None = None, *,
                 check_consume: bool = True) -> CodeInfo:
        return CodeInfo(code, CARD, "NORMAL", int(T0) - 60, int(T0) + 60, True, "o1")

    def get_card(self, card_id: str) -> dict[str, Any]:
        return {"card_type": "CASH", "cash": {"base_info": {"id": CARD, "title": "t"},
                                              "reduce_cost": 200}}

    def decrypt(self, encrypt_code: str) -> str:
        raise AssertionError("not encrypted")

    def consume(self, code: str, card_id: str | None = None, *, request_no: str) -> str:
        raise self.failure

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("kind", "reason"), [("lost", "offline"), ("deadline", "offline"),
                                              ("too_large", "not_redeemed")])
def test_a_use_lost_in_any_transport_reads_as_offline(tmp_path: Path, kind: str,
                                                      reason: str) -> None:
    class Lost(Exception):  # not an httpx error: requests', or any other library's
        pass

    # (deadline: the headers had come, so the server was done with it: settled)
    lost = base.TransportFailure(kind, Lost(), replied=kind == "deadline")  # type: ignore[arg-type]
    failure = base.failure("use", lost, sent_matters=True, service="WeChat Pay")
    assert isinstance(failure, OutcomeUnknown) and failure.transport is (reason == "offline")
    with Journal(tmp_path / "j.sqlite3") as journal:
        engine = Engine(journal, _LostUse(failure))
        v = engine.redeem(code(0, 1), T0)
    # the query after it shows NORMAL: not redeemed, and why (the network, or a bad reply)
    assert (v.outcome, v.reason) == ("refused", reason)
