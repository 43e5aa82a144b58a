"""busifavor client and backend against the loopback fake, over real HTTP with real signatures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hexiao.hostd.backends.base import (
    AlreadyConsumed,
    ApiError,
    BackendError,
    Busy,
    CardUnavailable,
    InvalidCode,
    Offline,
    OutcomeUnknown,
    QuotaExceeded,
)
from hexiao.hostd.backends.busifavor import BusifavorBackend, BusifavorClient
from hexiao.tools.sim.busifavor_fake import (
    BusifavorFake,
    Coupon,
    Stock,
    merchant_identity,
    new_rsa,
    private_pem,
)

MCHID, APPID, KEY = "1900000001", "wx1234567890abcdef", "0123456789abcdef0123456789abcdef"
MERCHANT = merchant_identity()  # key generation is slow: once per module


def _coupons() -> list[Coupon]:
    now = time.time()
    return [Coupon("C100000001", "S1", "o-alice"),
            Coupon("C100000002", "S1", "o-bob", state="USED", use_request_no="earlier-1"),
            Coupon("C100000003", "S1", "o-carol", state="EXPIRED", end=now - 86400),
            Coupon("C100000004", "S1", "o-dave", state="DEACTIVATED"),
            Coupon("C200000001", "S2", "o-erin")]


OWNERS = {c.code: c.openid for c in _coupons()}


@pytest.fixture
def fake() -> Iterator[BusifavorFake]:
    stocks = [Stock("S1", "满50减5"), Stock("S2", "88折", "DISCOUNT",
                                               {"discount_coupon": {"discount_percent": 88,
                                                                    "transaction_minimum": 0}})]
    with BusifavorFake(mchid=MCHID, appids=(APPID,), merchant_public_pem=MERCHANT[1],
                       merchant_serial=MERCHANT[2], apiv3_key=KEY, stocks=stocks,
                       coupons=_coupons()) as f:
        yield f


def client(fake: BusifavorFake, **kw: object) -> BusifavorClient:
    args: dict[str, object] = dict(mchid=MCHID, appid=APPID, private_key_pem=MERCHANT[0],
                                   cert_serial_no=MERCHANT[2], apiv3_key=KEY,
                                   base_url=fake.base_url, timeout_s=5.0, sleep=lambda s: None)
    args.update(kw)
    return BusifavorClient(**args)  # type: ignore[arg-type]


def test_certificates_downloaded_decrypted_and_used_to_verify(fake: BusifavorFake) -> None:
    c = client(fake).query_coupon("C100000001", "o-alice")  # platform-certificate mode
    assert (c.stock_id, c.state, c.use_request_no) == ("S1", "SENDED", None)
    assert c.begin is not None and c.end == 4102444800


def test_platform_public_key_mode(fake: BusifavorFake) -> None:
    cl = client(fake, platform_public_key_pem=fake.platform_public_pem,
                platform_public_key_id=fake.platform_serial)
    assert cl.query_coupon("C100000002", "o-bob").state == "USED"


def test_use_happy_path_then_query_shows_used(fake: BusifavorFake) -> None:
    cl = client(fake)
    used = cl.use("C100000001", "hexiao-lane-1-7", stock_id="S1", openid="o-alice")
    assert (used.stock_id, used.openid) == ("S1", "o-alice")
    c = cl.query_coupon("C100000001", "o-alice")
    assert (c.state, c.use_request_no) == ("USED", "hexiao-lane-1-7")
    assert fake.uses == [("C100000001", "hexiao-lane-1-7")]


@pytest.mark.parametrize("code,openid,kind,message", [
    ("C100000002", "o-bob", AlreadyConsumed, "use refused: coupon already used "
                                             "(400 INVALID_REQUEST: 券已核销)"),
    ("C100000003", "o-carol", CardUnavailable, "use refused: coupon EXPIRED "
                                               "(400 INVALID_REQUEST: 券已过期)"),
    ("C100000004", "o-dave", CardUnavailable, "use refused: coupon DEACTIVATED "
                                              "(400 INVALID_REQUEST: 券已失效)"),
    ("C100000002", None, CardUnavailable, "400 INVALID_REQUEST: 券已核销"),
    ("C999999999", None, InvalidCode, "404 RESOURCE_NOT_EXISTS: 券不存在或不属于该批次"),
])
def test_use_refusals(fake: BusifavorFake, code: str, openid: str | None,
                      kind: type[Exception], message: str) -> None:
    with pytest.raises(kind) as e:
        client(fake).use(code, "hexiao-lane-1-8", stock_id="S1", openid=openid)
    assert type(e.value) is kind and str(e.value) == message
    assert fake.uses == []


def test_query_not_exists_wrong_stock_wrong_appid(fake: BusifavorFake) -> None:
    cl = client(fake)
    with pytest.raises(InvalidCode, match=r"^404 RESOURCE_NOT_EXISTS: 券不存在$"):
        cl.query_coupon("C999999999", "o-alice")
    with pytest.raises(InvalidCode, match=r"^404 RESOURCE_NOT_EXISTS: 券不存在或不属于该批次$"):
        cl.use("C200000001", "hexiao-lane-1-9", stock_id="S1")
    other = client(fake, appid="wx0000000000000000")
    with pytest.raises(ApiError, match=r"^403 NO_AUTH: appid与商户号无绑定关系$"):
        other.query_coupon("C100000001", "o-alice")
    with pytest.raises(ApiError, match=r"^403 NO_AUTH: appid与商户号无绑定关系$"):
        other.use("C100000001", "hexiao-lane-1-9", stock_id="S1")
    assert fake.uses == []


def test_busy_reads_retried_busy_use_is_unknown_and_429_refused(fake: BusifavorFake) -> None:
    cl = client(fake)
    fake.faults.busy = 2
    assert cl.query_coupon("C100000001", "o-alice").state == "SENDED"  # third try answers
    fake.faults.busy = 3
    with pytest.raises(Busy, match=r"^500 SYSTEM_ERROR: 系统繁忙$"):
        cl.query_coupon("C100000001", "o-alice")
    fake.faults.busy = 1
    with pytest.raises(OutcomeUnknown, match=r"^use: 500 SYSTEM_ERROR: 系统繁忙$") as e:
        cl.use("C100000001", "hexiao-lane-1-10", stock_id="S1")
    assert e.value.settled and isinstance(e.value.cause, Busy)
    fake.faults.limited = 1
    with pytest.raises(QuotaExceeded, match=r"^429 FREQUENCY_LIMITED: 频率超限$"):
        cl.use("C100000001", "hexiao-lane-1-10", stock_id="S1")
    assert fake.uses == []


def test_drop_after_commit_settled_by_query_and_retry_idempotent(fake: BusifavorFake) -> None:
    cl = client(fake)
    fake.faults.drop_after_commit = 1
    with pytest.raises(OutcomeUnknown, match=r"^use: connection lost before the reply$") as e:
        cl.use("C100000001", "hexiao-lane-2-11", stock_id="S1", openid="o-alice")
    assert e.value.settled is True
    assert cl.query_coupon("C100000001", "o-alice").state == "USED"  # settles it: consumed
    again = cl.use("C100000001", "hexiao-lane-2-11", stock_id="S1", openid="o-alice")
    assert again.stock_id == "S1"
    assert fake.uses == [("C100000001", "hexiao-lane-2-11")]  # exactly one use
    with pytest.raises(AlreadyConsumed):  # another request number is another use: refused
        cl.use("C100000001", "hexiao-lane-2-12", stock_id="S1", openid="o-alice")
    assert len(fake.uses) == 1


def test_timeout_after_sending_is_unsettled_and_reads_time_out_offline(
        fake: BusifavorFake) -> None:
    cl = client(fake, timeout_s=0.3, retries=0)
    fake.faults.hold = threading.Event()
    with pytest.raises(OutcomeUnknown, match=r"^use: timed out after sending$") as e:
        cl.use("C100000001", "hexiao-lane-1-12", stock_id="S1")
    assert e.value.settled is False
    with pytest.raises(Offline, match=r"^coupon: timed out \(ReadTimeout\)$"):
        cl.query_coupon("C100000001", "o-alice")
    fake.faults.hold.set()
    fake.faults.hold = None
    # the held use lands after our timeout: a query is the only way to know
    for _ in range(200):
        if fake.uses:
            break
        time.sleep(0.01)
    assert client(fake).query_coupon("C100000001", "o-alice").state == "USED"


def test_backend_down_is_offline_nothing_sent(fake: BusifavorFake) -> None:
    cl = client(fake)
    fake.__exit__(None, None, None)
    with pytest.raises(Offline, match=r"^use: cannot reach WeChat Pay \(ConnectionError\)$"):
        cl.use("C100000001", "hexiao-lane-1-13", stock_id="S1")
    with pytest.raises(Offline, match=r"^certificates: cannot reach http://127\.0\.0\.1:\d+ "):
        client(fake)


def test_unsigned_request_refused_with_sign_error(fake: BusifavorFake) -> None:
    r = httpx.get(fake.base_url + "/v3/marketing/busifavor/stocks/S1")
    assert r.status_code == 401
    assert r.json() == {"code": "SIGN_ERROR", "message": "Authorization头缺失或认证类型错误"}
    bad = client(fake, private_key_pem=private_pem(new_rsa()),
                 platform_public_key_pem=fake.platform_public_pem,
                 platform_public_key_id=fake.platform_serial)
    with pytest.raises(ApiError, match=r"^401 SIGN_ERROR: 错误的签名，验签失败$"):
        bad.query_stock("S1")
    with pytest.raises(ApiError, match=r"^401 SIGN_ERROR: 错误的签名，验签失败$"):
        bad.use("C100000001", "hexiao-lane-1-14", stock_id="S1")
    assert fake.uses == []


def test_reply_signed_by_another_key_is_not_believed(fake: BusifavorFake) -> None:
    cl = client(fake)
    fake.faults.foreign_signer = new_rsa()
    with pytest.raises(BackendError,
                       match=r"^coupon: reply refused: failed to verify the signature$"):
        cl.query_coupon("C100000001", "o-alice")
    with pytest.raises(OutcomeUnknown,
                       match=r"^use: reply refused: failed to verify the signature$") as e:
        cl.use("C100000001", "hexiao-lane-1-15", stock_id="S1")
    assert e.value.settled is True  # the forged "success" may hide a real commit: query it
    assert fake.uses == [("C100000001", "hexiao-lane-1-15")]


def test_request_no_validated_before_sending(fake: BusifavorFake) -> None:
    with pytest.raises(ValueError, match=r"^use_request_no must be 1-32 of \[0-9A-Za-z_-\]$"):
        client(fake).use("C100000001", "x" * 33, stock_id="S1")
    assert fake.uses == []


def test_backend_surface_for_the_engine(fake: BusifavorFake) -> None:
    b = BusifavorBackend(client(fake), stock_id="S1", openid_for=OWNERS.get)
    info = b.get_code("C100000001")
    assert (info.card_id, info.status, info.can_consume, info.openid) == \
        ("S1", "NORMAL", True, "o-alice")
    assert b.get_code("C100000002", check_consume=False).status == "CONSUMED"
    assert b.get_code("C100000003").status == "EXPIRE"
    assert b.get_code("C100000004").status == "UNAVAILABLE"
    with pytest.raises(InvalidCode, match=r"^coupon belongs to another stock$"):
        b.get_code("C200000001")
    assert b.get_card("S1") == {"card_type": "CASH", "cash": {
        "base_info": {"id": "S1", "title": "满50减5"}, "reduce_cost": 500, "least_cost": 3000}}
    assert b.get_card("S2")["discount"]["discount"] == 12  # 88折 = 12 percent off
    assert b.consume("C100000001", "S1", request_no="hexiao-lane-1-16") == "S1"
    with pytest.raises(AlreadyConsumed):
        b.consume("C100000001", "S1", request_no="hexiao-lane-1-17")
    with pytest.raises(InvalidCode, match=r"^merchant coupons have no encrypted codes"):
        b.decrypt("abc")


def test_backend_without_owner_checks_blind_and_never_settles_by_guess(
        fake: BusifavorFake) -> None:
    b = BusifavorBackend(client(fake), stock_id="S1")
    assert b.get_code("C100000002").status == "NORMAL"  # unknown: the use will enforce
    with pytest.raises(CardUnavailable, match=r"^400 INVALID_REQUEST: 券已核销$"):
        b.consume("C100000002", "S1", request_no="hexiao-lane-1-18")
    with pytest.raises(ApiError, match=r"^coupon query needs the owner's openid"):
        b.get_code("C100000002", check_consume=False)
