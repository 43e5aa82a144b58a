"""hexiao-hostd settings as frozen dataclasses, every one defaulted (config.py builds them).

Rules this module keeps:
- A default here is the default of the config file: an empty file gives Config().
- Secrets never live in these classes: they hold the path of a file, and read_secret() reads it
  only when a client is built, refusing a file others can read.
- No checking here: values arrive checked by config_schema; the helpers (kid, rules_message,
  *_args) only reshape them for the parts that use them.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexiao.hostd.keystore import KeystoreError, check_private
from hexiao.hostd.tap.receipt import VOID_WORDS


class ConfigError(Exception):
    """The config cannot be used; `errors` has one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


BASE_URLS = {"wechat_card": "https://api.weixin.qq.com",
             "wechatpay_busifavor": "https://api.mch.weixin.qq.com", "sim": ""}
CARD_TYPES = ("CASH", "DISCOUNT", "GIFT", "GROUPON", "GENERAL_COUPON", "MEMBER_CARD")
_STATE_DIR, _SOCKET = Path("/var/lib/hexiao"), Path("/run/hexiao/hostd.sock")
# SPEC §6.7 actions 0, 1, 2, by name
ACTIONS = ("product", "coupon", "ignore")


@dataclass(frozen=True)
class Hostd:
    state_dir: Path = _STATE_DIR
    control_socket: Path = _SOCKET
    journal: Path | None = None      # None in the file: <state_dir>/journal.sqlite3
    log_level: str = "info"
    metrics_listen: str = ""         # "" = no metrics endpoint
    web_listen: str = "127.0.0.1:8780"  # the status page (hostd/web/); "" = no page
    capture_max_bytes: int = 64 << 20  # a link capture stops here (hexiao capture)


@dataclass(frozen=True)
class Backend:
    kind: str = "sim"
    base_url: str = ""               # "" in the file: the kind's default (sim: embedded)
    backup_base_url: str = ""        # wechatpay_busifavor: the backup API domain
    appid: str = ""
    secret_file: Path | None = None
    token_url: str = ""              # a central token service shared by every till
    token_mode: str = "stable"       # stable_token (tills share one token) or "token"
    timeout_s: float = 5.0
    deadline_s: float = 10.0         # one backend operation in all (retries included)
    max_reply_bytes: int = 1 << 20   # a longer reply is refused (a consume's is then unknown)
    retries: int = 2
    backoff_s: float = 0.1
    refresh_margin_s: float = 300.0
    card_cache_s: float = 600.0
    settle_after_s: float = 60.0
    mchid: str = ""
    merchant_serial_no: str = ""
    private_key_file: Path | None = None
    apiv3_key_file: Path | None = None
    platform_public_key_file: Path | None = None  # busifavor: the 微信支付公钥 (PEM), or none:
    platform_public_key_id: str = ""              # platform certificates are downloaded
    stock_id: str = ""               # busifavor: the stock a coupon of unknown owner is used from

    def busifavor_args(self) -> dict[str, Any]:
        """Keyword arguments for busifavor.BusifavorClient (reads the key files)."""
        pub = self.platform_public_key_file
        assert self.private_key_file is not None and self.apiv3_key_file is not None
        return {"mchid": self.mchid, "appid": self.appid,
                "private_key_pem": read_secret(self.private_key_file),
                "cert_serial_no": self.merchant_serial_no,
                "apiv3_key": read_secret(self.apiv3_key_file),
                "base_url": self.base_url, "timeout_s": self.timeout_s,
                "platform_public_key_pem": pub.read_text() if pub else None,
                "platform_public_key_id": self.platform_public_key_id or None,
                "retries": self.retries, "backoff_s": self.backoff_s,
                "deadline_s": self.deadline_s, "max_reply_bytes": self.max_reply_bytes}

    def card_client_args(self) -> dict[str, Any]:
        """Keyword arguments for wechat_card.WeChatCardClient (reads the secret file)."""
        return {"base_url": self.base_url, "appid": self.appid,
                "secret": read_secret(self.secret_file) if self.secret_file else "",
                "token_url": self.token_url or None, "token_mode": self.token_mode,
                "timeout_s": self.timeout_s,
                "retries": self.retries, "backoff_s": self.backoff_s,
                "refresh_margin_s": self.refresh_margin_s, "card_cache_s": self.card_cache_s,
                "deadline_s": self.deadline_s, "max_reply_bytes": self.max_reply_bytes}


@dataclass(frozen=True)
class Keystore:
    path: Path | None = None         # None in the file: <state_dir>/keystore.jsonl


@dataclass(frozen=True)
class Lane:
    name: str = "lane-1"
    decrypt: str = "auto"
    allowed_card_ids: tuple[str, ...] = ()  # empty = any card of the appid
    location_id: int | None = None
    sub_merchant_id: int | None = None
    verify_unknown: bool = True
    custom_code_card_ids: tuple[str, ...] = ()
    redeemed_here_s: float = 900.0  # a code consumed here, rescanned: "redeemed here" (0: off)

    def engine_config(self) -> Any:
        """This lane as redeem.LaneConfig."""
        from hexiao.hostd.redeem import LaneConfig
        return LaneConfig(self.name, self.decrypt,  # type: ignore[arg-type]
                          frozenset(self.allowed_card_ids) or None, self.location_id,
                          self.sub_merchant_id, self.verify_unknown, self.custom_code_card_ids,
                          self.redeemed_here_s)


@dataclass(frozen=True)
class UsbMatch:
    serial: str = ""
    vendor: str | None = None
    product: str | None = None


def kid_bytes(text: str) -> bytes | None:
    """The link kid for a config device id ("hx-0001" or "hex:0a1b..."); None if malformed."""
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError:
            return None
    return text.encode("utf-8")


@dataclass(frozen=True)
class DeviceSettings:
    """Pushed to the device (config_set) at every session; absent keys keep its own values."""
    inter_key_ms: int | None = None   # pause between typed keys
    suffix: str | None = None         # after a product: enter | tab | none
    offline_ms: int | None = None     # no verdict this long: the device says "host offline"

    def values(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Device:
    id: str = ""
    port: str | None = None           # a device path or pyserial URL, or:
    match: UsbMatch | None = None     # find it by USB serial number (survives replug)
    lane: str = "lane-1"
    rules: tuple[dict[str, Any], ...] = ()  # () = the default rules (hostd/lanes/lane.py)
    rules_default: str = "product"    # what a scan no rule matches is
    settings: DeviceSettings | None = None

    def rules_message(self) -> dict[str, Any] | None:
        """The rules message this device gets at every session; None: the default rules."""
        if not self.rules:
            return None
        body = {"default": ACTIONS.index(self.rules_default), "rules": list(self.rules)}
        # the version says "changed" to the device: a checksum of the rules themselves
        version = zlib.crc32(repr(sorted(body.items())).encode()) & 0xFFFFFFFF
        return {"type": "rules", "version": version, **body}

    @property
    def kid(self) -> bytes:
        kid = kid_bytes(self.id)
        assert kid is not None  # checked at load
        return kid


@dataclass(frozen=True)
class Tap:
    enabled: bool = False
    listen: str = "127.0.0.1:9100"
    printer: str = ""
    profile: str = "generic-80"
    content: str = "{token}"
    caption: str = ""
    lane: str = "lane-1"
    key_file: Path | None = None
    existing_qr: str = "inject"
    module: int = 6
    align: str = "center"
    ec: str = "M"
    idle_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    stall_timeout_s: float = 30.0     # POS silent mid-command: pass on what it sent, close
    printer_timeout_s: float = 30.0   # connect/write bound: a printer stuck longer is lost
    member_ttl_s: float = 600.0       # a member card scanned, no receipt within this: dropped
    claim_listen: str = ""            # the points claim API (hostd/members/claim.py); "" = off
    claim_max_age_s: float = 7 * 86_400.0  # a receipt older than this cannot be claimed
    void_words: tuple[str, ...] = VOID_WORDS  # a receipt voiding a sale (hostd/tap/receipt.py)
    void_window_s: float = 1800.0     # a void without the sale's number: the lane's last sale


@dataclass(frozen=True)
class Macro:
    items: tuple[str | tuple[int, int], ...] = ()
    delay_ms: int = 20                # POS listeners want <= 50 ms between keys


@dataclass(frozen=True)
class Fleet:
    """The store-to-headquarters bridge (hostd/fleet/, docs/fleet-protocol.md); off by default."""
    enabled: bool = False
    broker: str = "mqtt://127.0.0.1:1883"   # mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)
    merchant: str = ""                # required when enabled; 1..16 of A-Z a-z 0-9 _ . -
    store: str = ""                   # required when enabled; also the signing key's id
    topic_prefix: str = ""            # before hexiao/v1/ (a shared broker); "" in production
    key_file: Path | None = None      # the store's signing key (64 hex digits, 0600): required
    code_key_file: Path | None = None  # merchant-wide key for code hashes; None: from key_file
    username: str = ""                # broker credentials (per store)
    password_file: Path | None = None
    tls_ca_file: Path | None = None   # mqtts: the CA bundle (None: the system's)
    tls_cert_file: Path | None = None  # mqtts: a client certificate, if the broker wants one
    tls_key_file: Path | None = None
    keepalive_s: int = 30             # the broker publishes the offline will after 1.5x this
    session_expiry_s: int = 604800    # the broker keeps this store's session a week offline
    window: int = 100                 # records handed to the broker unacknowledged at most
    hq_pubkey_file: Path | None = None  # headquarters' Ed25519 public key (PEM): remote
                                      # diagnostics answered (hostd/fleet/responder.py)


@dataclass(frozen=True)
class Config:
    hostd: Hostd = field(default_factory=Hostd)
    backend: Backend = field(default_factory=Backend)
    keystore: Keystore = field(default_factory=Keystore)
    lanes: tuple[Lane, ...] = (Lane(),)
    devices: tuple[Device, ...] = ()
    tap: Tap = field(default_factory=Tap)
    macros: Mapping[str, Macro] = field(default_factory=dict)
    source: Path | None = None
    fleet: Fleet = field(default_factory=Fleet)

    def lane(self, name: str) -> Lane | None:
        return next((la for la in self.lanes if la.name == name), None)


def read_secret(path: Path) -> str:
    """A secret file's text, stripped; refuses files others can read (ConfigError)."""
    try:
        check_private(path)
        text = path.read_text(encoding="utf-8").strip()
    except KeystoreError as e:
        raise ConfigError([str(e)]) from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError([f"secret file {path}: cannot read: {why}"]) from None
    if not text:
        raise ConfigError([f"secret file {path}: is empty"])
    return text
