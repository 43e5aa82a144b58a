"""hostd with the WeChat Pay merchant-coupon backend (商家券): config -> Daemon -> the same
redemption engine, against the signed loopback fake over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hexiao.hostd import journal as jr
from hexiao.hostd.config import from_dict
from hexiao.hostd.daemon import Daemon, DaemonError
from hexiao.hostd.redeem import Engine, LaneConfig
from hexiao.tools.sim.busifavor_fake import BusifavorFake, Coupon, Stock, merchant_identity

MCHID, APPID, APIV3 = "1900000001", "wx1234567890abcdef", "0123456789abcdef0123456789abcdef"
MERCHANT = merchant_identity()  # key generation is slow: once per module
STOCK = "1212000000001"


@pytest.fixture
def fake() -> Iterator[BusifavorFake]:
    with BusifavorFake(mchid=MCHID, appids=(APPID,), merchant_public_pem=MERCHANT[1],
                       merchant_serial=MERCHANT[2], apiv3_key=APIV3,
                       stocks=[Stock(STOCK, "满30减5")],
                       coupons=[Coupon("C100000001", STOCK, "o-alice"),
                                Coupon("C100000002", STOCK, "o-bob")]) as f:
        yield f


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def daemon_for(tmp_path: Path, fake: BusifavorFake, key_pem: str = MERCHANT[0]) -> Daemon:
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    cfg = from_dict({
        "hostd": {"state_dir": str(tmp_path / "state"),
                  "control_socket": str(tmp_path / "run" / "hostd.sock")},
        "backend": {"kind": "wechatpay_busifavor", "base_url": fake.base_url, "appid": APPID,
                    "mchid": MCHID, "merchant_serial_no": MERCHANT[2],
                    "private_key_file": str(private(tmp_path / "apiclient_key.pem", key_pem)),
                    "apiv3_key_file": str(private(tmp_path / "apiv3.key", APIV3)),
                    "stock_id": STOCK, "timeout_s": 2.0, "settle_after_s": 5.0},
        "lane": [{"name": "lane-1", "decrypt": "never"}],
    })
    return Daemon(cfg)


def test_hostd_redeems_a_merchant_coupon_through_the_same_engine(tmp_path: Path,
                                                                  fake: BusifavorFake) -> None:
    d = daemon_for(tmp_path, fake).start()
    try:
        with jr.Journal(d.journal_path) as journal:
            engine = Engine(journal, d.backend.client(), LaneConfig(decrypt="never"))
            v = engine.redeem("C100000001", 1.0e9)
            entry = journal.entries()[0]
        assert (v.outcome, v.card_type, v.value) == (
            "accepted", "CASH", {"reduce_cost": 500, "least_cost": 3000})
        # one use, keyed by this installation's journal entry: a retry is the same use
        assert fake.uses == [("C100000001", engine.request_no(entry.id))]
        assert len(engine.request_no(entry.id)) <= 32
    finally:
        d.stop()


def test_a_wrong_merchant_key_stops_hostd_at_start_with_the_reason(
        tmp_path: Path, fake: BusifavorFake) -> None:
    other = merchant_identity()[0]
    d = daemon_for(tmp_path, fake, key_pem=other)
    with pytest.raises(DaemonError, match=r"backend: .*platform certificate.*private_key_file"):
        d.start()
    d.stop()
