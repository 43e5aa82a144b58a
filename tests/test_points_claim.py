"""Points claimed from the receipt's QR (hostd/members/claim.py), over real HTTP on loopback:
the claim API against the WeChat simulator, the ledger in a real journal file, tokens made by
the tap's own make_token. Every refusal is checked to credit nothing (bonus_updates).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakeclock import T0, Clock
from hexiao.hostd.backends.sim.state import encrypt_code
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.members.claim import Claims, ClaimServer
from hexiao.hostd.members.ledger import Ledger
from hexiao.hostd.members.service import receipt_key
from hexiao.hostd.tap.inject import make_token
from hexiao.hostd.tap.receipt import Receipt
from test_points_till import APPID, MEMBER, OTHER_APP_MEMBER, SECRET, seed, sim  # noqa: F401

KEY = os.urandom(32)
DIGEST = bytes(range(32))
COUPON, COUPON_CARD = "287463512093", "pHexiaoSimCash100minus20xxxx"
MEMBER_CARD = "pHexiaoSimMemberCardxxxxxxxxx"


def token(total: str | None = "32.50", when: float = T0, digest: bytes = DIGEST,
          key: bytes = KEY) -> str:
    return make_token(key, "lane-1", int(when), None if total is None else Decimal(total),
                      digest)


@pytest.fixture
def api(sim: Any, tmp_path: Path, clock: Clock) -> Iterator[Any]:  # noqa: F811
    def client() -> WeChatCardClient:
        return WeChatCardClient(sim.url, APPID, SECRET, sleep=lambda s: None)

    def serve() -> ClaimServer:
        claims = Claims(tmp_path / "journal.db", client, [KEY], max_age_s=7 * 86_400,
                        clock=clock)
        return ClaimServer(claims, "127.0.0.1:0").start()

    servers = [serve()]

    def post(body: Any, restart: bool = False) -> tuple[int, dict[str, Any]]:
        if restart:  # a new hostd on the same journal
            servers.append(serve())
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{servers[-1].url}/points/claim", content=content, timeout=30)
        return r.status_code, r.json()
    post.url = lambda: servers[-1].url  # type: ignore[attr-defined]
    yield post
    for s in servers:
        s.stop()


def updates(sim: Any, code: str = MEMBER) -> int:  # noqa: F811
    return int(sim.state.snapshot()["codes"][code]["bonus_updates"])


def claim(t: str, **kw: str) -> dict[str, str]:
    return {"token": t, "card_id": MEMBER_CARD, "code": MEMBER, **kw}


def test_a_receipt_is_claimed_once_and_only_once(sim: Any, api: Any) -> None:  # noqa: F811
    assert api(claim(token())) == (200, {"ok": True, "points": 32, "bonus": 152})
    status, answer = api(claim(token()))
    assert (status, answer["error"]) == (409, "already_claimed")
    status, answer = api(claim(token()), restart=True)  # durable: the journal says so
    assert (status, answer["error"]) == (409, "already_claimed")
    assert updates(sim) == 1


def test_claimed_with_the_encrypt_code_the_card_page_gets(sim: Any,  # noqa: F811
                                                          api: Any) -> None:
    enc = encrypt_code(sim.state.seed.behaviour.encrypt_key, MEMBER)
    body = {"token": token(), "card_id": MEMBER_CARD, "encrypt_code": enc}
    assert api(body) == (200, {"ok": True, "points": 32, "bonus": 152})


def test_a_receipt_credited_at_the_till_cannot_be_claimed(sim: Any, api: Any,  # noqa: F811
                                                         tmp_path: Path) -> None:
    rc = Receipt(index=0, digest=DIGEST.hex(), total=Decimal("32.50"), printed=True)
    with Journal(tmp_path / "journal.db") as journal:
        ledger = Ledger(journal)
        ledger.plan(receipt_key("lane-1", rc), "lane-1", MEMBER, MEMBER_CARD, 3250, T0)
        ledger.close()
    status, answer = api(claim(token()))
    assert (status, answer["error"]) == (409, "already_claimed")


@pytest.mark.parametrize("make, error, status", [
    (lambda: token(key=os.urandom(32)), "bad_token", 400),                 # forged
    (lambda: token()[:-3] + ("AAA" if token()[-3:] != "AAA" else "BBB"), "bad_token", 400),
    (lambda: token() + "=", "bad_token", 400),                             # not canonical
    (lambda: token().replace(token()[10], "-" if token()[10] != "-" else "_", 1),
     "bad_token", 400),                                                     # altered
    (lambda: token(when=T0 - 8 * 86_400), "expired", 410),
    (lambda: token(total=None), "no_points", 410),                         # no total read
    (lambda: token(total="-32.50"), "no_points", 410),                     # a refund
    (lambda: "not a token at all", "bad_token", 400),
])
def test_bad_tokens_credit_nothing(sim: Any, api: Any, make: Any, error: str,  # noqa: F811
                                   status: int) -> None:
    got, answer = api(claim(make()))
    assert (got, answer["ok"], answer["error"]) == (status, False, error)
    assert answer["message"]
    assert updates(sim) == 0


@pytest.mark.parametrize("body", [
    {"token": "t", "card_id": MEMBER_CARD, "code": COUPON},   # a coupon, not a member card
    {"token": "t", "card_id": "pOtherMerchantMember", "code": OTHER_APP_MEMBER},
    {"token": "t", "card_id": COUPON_CARD, "code": MEMBER},   # the code with another card
])
def test_not_a_member_card_of_this_merchant(sim: Any, api: Any,  # noqa: F811
                                            body: dict[str, str]) -> None:
    status, answer = api({**body, "token": token()})
    assert (status, answer["error"]) == (403, "not_member")
    assert updates(sim) == 0 and updates(sim, OTHER_APP_MEMBER) == 0
    assert api(claim(token()))[0] == 200  # the receipt is still claimable by a member


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", b"x" * 5000, {"token": "t"},
    {"token": "t", "card_id": MEMBER_CARD, "code": MEMBER, "encrypt_code": "e"},
    {"token": 5, "card_id": MEMBER_CARD, "code": MEMBER},
])
def test_bad_requests_are_400_with_a_message(api: Any, body: Any) -> None:
    status, answer = api(body)
    assert (status, answer["error"]) == (400, "bad_request") and answer["message"]


@pytest.mark.parametrize("mode", ["close", "http500"])
def test_a_dropped_reply_mid_claim_is_one_credit(sim: Any, api: Any, mode: str) -> None:  # noqa: F811
    assert httpx.post(f"{sim.url}/_sim/faults", json={"drop_after_commit": {
        "mode": mode, "count": 1, "codes": [MEMBER]}}).status_code == 200
    assert api(claim(token())) == (200, {"ok": True, "points": 32, "bonus": 152})
    assert updates(sim) == 1


def test_backend_down_is_502_and_credits_nothing(api: Any, sim: Any) -> None:  # noqa: F811
    assert httpx.post(f"{sim.url}/_sim/faults", json={"busy_rate": 1.0}).status_code == 200
    status, answer = api(claim(token()))
    assert (status, answer["error"]) == (502, "backend")
    assert updates(sim) == 0


def test_the_claim_page_escapes_the_token(api: Any) -> None:
    r = httpx.get(f"{api.url()}/points/claim", params={"t": '"><script>x'})
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "&quot;&gt;&lt;script&gt;x" in r.text and '"><script>x' not in r.text
    assert httpx.get(f"{api.url()}/other").status_code == 404
