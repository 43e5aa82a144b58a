"""WeChat Pay merchant coupons (商家券, APIv3 busifavor) through the wechatpayv3 SDK (2.0.4).

Two layers:
- BusifavorClient: query a coupon, query a stock, use a coupon; v3 errors ({"code","message"}
  with an HTTP status) mapped onto base.py's error classes.
- BusifavorBackend: the surface redeem.Engine calls (get_code, get_card, consume, decrypt), with
  stock ids in the place of card ids and a stock shaped like a card/get `card` object.

Rules this module keeps:
- The SDK signs requests, downloads and decrypts platform certificates (AEAD_AES_256_GCM) and
  verifies every 2xx reply's signature; a reply that fails verification is not believed.
- The SDK hard-codes the production host and fetches certificates in its constructor, so the
  gateway is replaced before that fetch (_Core); nothing here reaches the network unasked.
- Every exchange keeps base.py's transport policy (per-read timeout, a total deadline per
  operation, a reply cap): _Core.request is the SDK's, sending through a requests session of
  ours (no retries, no redirects) that streams the reply and reports its sockets to the
  deadline's watchdog.
- use is never repeated here. Its use_request_no comes from the caller (the journal entry), so
  the caller may repeat it safely: the service answers the same request with the same result.
  A use whose result cannot be known raises OutcomeUnknown; querying the coupon settles it.
- Coupon codes are never logged (the SDK's debug logger is not given one).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from hexiao.hostd.backends import base
from hexiao.hostd.backends.base import (
    AlreadyConsumed,
    ApiError,
    BackendError,
    Busy,
    CardUnavailable,
    CodeInfo,
    InvalidCode,
    Limits,
    NotInTimeWindow,
    Offline,
    OutcomeUnknown,
    QuotaExceeded,
    TransportFailure,
    WeChatError,
)
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from wechatpayv3 import WeChatPay, WeChatPayType, __version__
from wechatpayv3.core import Core
from wechatpayv3.type import RequestType
from wechatpayv3.utils import build_authorization

PRODUCTION = "https://api.mch.weixin.qq.com"
REQUEST_NO = re.compile(r"[0-9A-Za-z_-]{1,32}")  # the documented use_request_no: string[1,32]
# the card API's user_card_status words, so redeem.Engine's checks read busifavor states as-is
STATE_AS_CARD = {"SENDED": "NORMAL", "USED": "CONSUMED", "EXPIRED": "EXPIRE",
                 "DEACTIVATED": "UNAVAILABLE", "DELETED": "DELETE"}
_V3_ERRORS: dict[str, type[WeChatError]] = {
    "SYSTEM_ERROR": Busy, "FREQUENCY_LIMITED": QuotaExceeded, "RESOURCE_NOT_EXISTS": InvalidCode,
    "INVALID_REQUEST": CardUnavailable,  # use refused for the coupon's state; query says which
}


class _Core(Core):  # type: ignore[misc]
    """The SDK's core with its gateway fixed to ours before the constructor uses it, and its
    requests sent through our session under the transport policy (request())."""

    def __init__(self, gateway: str, *, limits: Limits, **kw: Any) -> None:
        self._hexiao_gateway = gateway.rstrip("/")
        self._hexiao_limits = limits
        super().__init__(**kw)

    def request(self, path: str, method: RequestType = RequestType.GET, data: Any = None,
                skip_verify: bool = False, sign_data: Any = None, files: Any = None,
                cipher_data: bool = False, headers: dict[str, str] | None = None,
                ) -> tuple[int, Any]:
        """Core.request of wechatpayv3 2.0.4 (headers, signing, verifying, its return value)
        for the JSON calls used here, sent by _send(): capped, bounded, never redirected."""
        if files:
            raise BackendError("file uploads are not used by hexiao")
        headers = {**(headers or {}), "Content-Type": "application/json",
                   "Accept": "application/json",
                   "User-Agent": f"wechatpay python sdk v{__version__}"
                                 "(https://github.com/minibear2021/wechatpayv3)"}
        if self._public_key_id or cipher_data:
            headers["Wechatpay-Serial"] = self._public_key_id or \
                hex(self._last_certificate().serial_number)[2:].upper()
        headers["Authorization"] = build_authorization(
            path, method.value, self._mchid, self._cert_serial_no, self._private_key,
            data=sign_data if sign_data else data)
        # the bytes signed are json.dumps(data): send exactly those (requests' json= agrees)
        body = None if data is None else json.dumps(data).encode()
        status, reply_headers, content = self._send(method.value, self._gate_way + path,
                                                    headers, body)
        is_json = "application/json" in reply_headers.get("Content-Type", "")
        text = content.decode("utf-8") if is_json else content
        if 200 <= status < 300 and not skip_verify and \
                not self._verify_signature(reply_headers, text):
            raise Exception("failed to verify the signature")  # the SDK's own words
        return status, text

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
              ) -> tuple[int, Mapping[str, str], bytes]:
        limits = self._hexiao_limits
        with base.deadline(limits) as b:
            replied = False
            try:  # a session (a connection) per request, as the SDK's requests.get/post
                with _session() as s, s.request(
                        method, url, headers=headers, data=body, timeout=b.timeout(),
                        proxies=self._proxy, stream=True, allow_redirects=False) as r:
                    replied = True
                    content = base.read_capped(r.iter_content(1 << 16),
                                               r.headers.get("Content-Length"), limits)
                return r.status_code, r.headers, content
            except requests.RequestException as e:
                raise base.fail(_kind(e), e, replied=replied) from e

    @property
    def _gate_way(self) -> str:
        return self._hexiao_gateway

    @_gate_way.setter
    def _gate_way(self, _value: str) -> None:
        pass  # Core.__init__ assigns the production host; ours stands


@dataclass(frozen=True)
class Coupon:
    code: str
    stock_id: str
    state: str  # SENDED, USED, EXPIRED, DEACTIVATED, DELETED
    begin: int | None  # available_start_time, epoch seconds
    end: int | None  # expire_time
    use_request_no: str | None


@dataclass(frozen=True)
class Used:
    stock_id: str
    openid: str | None
    use_time: str  # wechatpay_use_time


class BusifavorClient:
    def __init__(self, *, mchid: str, appid: str, private_key_pem: str, cert_serial_no: str,
                 apiv3_key: str, base_url: str = PRODUCTION, timeout_s: float = 5.0,
                 platform_public_key_pem: str | None = None,
                 platform_public_key_id: str | None = None, cert_dir: str | None = None,
                 retries: int = 2, backoff_s: float = 0.1, deadline_s: float = 10.0,
                 max_reply_bytes: int = base.MAX_REPLY_BYTES,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Platform key: either the 微信支付公钥 (pem + id) or certificates fetched from
        /v3/certificates at construction (kept in cert_dir when given)."""
        self._limits = Limits(timeout_s, deadline_s, max_reply_bytes)
        try:
            with base.deadline(self._limits):
                core = _Core(base_url, limits=self._limits, mchid=mchid,
                             cert_serial_no=cert_serial_no, private_key=private_key_pem,
                             apiv3_key=apiv3_key, cert_dir=cert_dir, timeout=timeout_s,
                             public_key=platform_public_key_pem,
                             public_key_id=platform_public_key_id)
        except TransportFailure as f:
            raise Offline(f"certificates: cannot reach {base_url} "
                          f"({type(f.cause).__name__})") from f.cause
        except WeChatError:
            raise
        except Exception as e:  # the SDK raises bare Exception for keys and certificates
            raise BackendError(f"wechatpayv3 setup failed: {e}") from e
        # WeChatPay's constructor would build its own Core (and fetch from production)
        pay = WeChatPay.__new__(WeChatPay)
        pay._type, pay._mchid, pay._appid = WeChatPayType.NATIVE, mchid, appid
        pay._notify_url, pay._partner_mode, pay._core = None, False, core
        self._pay, self.appid = pay, appid
        self._retries, self._backoff, self._sleep = retries, backoff_s, sleep

    def query_coupon(self, code: str, openid: str) -> Coupon:
        r = self._safe("coupon", lambda: self._pay.marketing_busifavor_coupon_detail(code, openid))
        state, stock = r.get("coupon_state"), r.get("stock_id")
        if not isinstance(state, str) or not isinstance(stock, str):
            raise BackendError("coupon reply without coupon_state/stock_id")
        no = r.get("use_request_no")
        return Coupon(code, stock, state, _epoch(r.get("available_start_time")),
                      _epoch(r.get("expire_time")), no if isinstance(no, str) else None)

    def query_stock(self, stock_id: str) -> dict[str, Any]:
        r = self._safe("stock", lambda: self._pay.marketing_busifavor_stock_query(stock_id))
        if not isinstance(r.get("stock_type"), str) or not isinstance(r.get("coupon_use_rule"),
                                                                       dict):
            raise BackendError("stock reply without stock_type/coupon_use_rule")
        return r

    def use(self, code: str, request_no: str, *, stock_id: str | None = None,
            openid: str | None = None, now: float | None = None) -> Used:
        """Use once. The same request_no again is the same request (safe to repeat)."""
        if not REQUEST_NO.fullmatch(request_no):
            raise ValueError("use_request_no must be 1-32 of [0-9A-Za-z_-]")
        use_time = dt.datetime.fromtimestamp(time.time() if now is None else now,
                                             dt.timezone(dt.timedelta(hours=8)))
        with base.deadline(self._limits):  # the refusal's query spends the use's time
            try:
                r = self._call("use", lambda: self._pay.marketing_busifavor_coupon_use(
                    code, use_time.isoformat(timespec="seconds"), request_no,
                    stock_id=stock_id, openid=openid), sent_matters=True)
            except (Busy, BackendError) as e:  # (429 is QuotaExceeded: refused before acting)
                # SYSTEM_ERROR may follow a commit; an unverifiable reply is no answer at all
                why = str(e) if isinstance(e, BackendError) else f"use: {e}"  # ours: "use:"
                raise OutcomeUnknown(why, settled=True, cause=e) from e
            except CardUnavailable as e:
                raise self._why_refused(code, openid, e) from e
        stock, when = r.get("stock_id"), r.get("wechatpay_use_time")
        if not isinstance(stock, str) or not isinstance(when, str):
            raise OutcomeUnknown("use: reply without stock_id/wechatpay_use_time", settled=True)
        who = r.get("openid")
        return Used(stock, who if isinstance(who, str) else None, when)

    def _why_refused(self, code: str, openid: str | None, e: CardUnavailable) -> WeChatError:
        """INVALID_REQUEST names no state: ask the coupon which (read-only), when we can."""
        if openid is None:
            return e
        try:
            c = self.query_coupon(code, openid)
        except WeChatError:
            return e
        if c.state == "USED":
            return AlreadyConsumed(f"use refused: coupon already used ({e})")
        if c.state == "SENDED" and c.begin is not None and time.time() < c.begin:
            return NotInTimeWindow(f"use refused: coupon not valid yet ({e})")
        return CardUnavailable(f"use refused: coupon {c.state} ({e})")

    def _call(self, what: str, call: Callable[[], tuple[int, Any]], *,
              sent_matters: bool = False) -> dict[str, Any]:
        with base.deadline(self._limits) as b:
            b.before_sending(what)
            try:
                status, text = call()
            except TransportFailure as f:
                raise base.failure(what, f, sent_matters=sent_matters,
                                   service="WeChat Pay") from f.cause
            except WeChatError:
                raise
            except Exception as e:  # the SDK's bare Exception: signature failed to verify
                raise BackendError(f"{what}: reply refused: {e}") from e
        return _parse(what, status, text)

    def _safe(self, what: str, call: Callable[[], tuple[int, Any]]) -> dict[str, Any]:
        """A read: retried on busy and unreachable, bounded by count and by the deadline."""
        with base.deadline(self._limits) as b:
            for attempt in range(self._retries + 1):
                try:
                    return self._call(what, call)
                except (Busy, Offline):
                    if attempt == self._retries or b.expired:
                        raise
                    self._sleep(min(self._backoff * 2 ** attempt, b.remaining()))
        raise AssertionError("unreachable")


class BusifavorBackend:
    """redeem.Engine's client surface over busifavor. card_id means stock_id here.

    openid_for(code): the coupon's owner when the merchant knows it (from its own send or
    claim records); the coupon query needs it. Without it a check cannot see the state (use
    enforces it) and a lost use reply cannot be settled by query: it stays "verify manually".
    """

    def __init__(self, client: BusifavorClient, *, stock_id: str | None = None,
                 openid_for: Callable[[str], str | None] = lambda code: None) -> None:
        self.client, self._stock, self._openid_for = client, stock_id, openid_for
        self._stocks: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        """Nothing held open between calls (a connection per request, as the SDK does)."""

    def decrypt(self, encrypt_code: str) -> str:
        raise InvalidCode("merchant coupons have no encrypted codes (set decrypt = never)")

    def get_code(self, code: str, card_id: str | None = None, *,
                 check_consume: bool = True) -> CodeInfo:
        openid = self._openid_for(code)
        if openid is None:
            if not check_consume:  # a settling query must not guess
                raise ApiError("coupon query needs the owner's openid, which is not known")
            stock = card_id or self._stock
            if stock is None:
                raise InvalidCode("no stock configured for a coupon of unknown owner")
            return CodeInfo(code, stock, "NORMAL", None, None, True, None)
        c = self.client.query_coupon(code, openid)
        if (card_id or self._stock) not in (None, c.stock_id):
            raise InvalidCode("coupon belongs to another stock")
        status = STATE_AS_CARD.get(c.state, "UNAVAILABLE")
        return CodeInfo(code, c.stock_id, status, c.begin, c.end, status == "NORMAL", openid)

    def get_card(self, card_id: str) -> dict[str, Any]:
        if card_id not in self._stocks:
            self._stocks[card_id] = as_card(card_id, self.client.query_stock(card_id))
        return self._stocks[card_id]

    def consume(self, code: str, card_id: str | None = None, *, request_no: str) -> str:
        used = self.client.use(code, request_no, stock_id=card_id or self._stock,
                               openid=self._openid_for(code))
        return used.stock_id


def as_card(stock_id: str, s: dict[str, Any]) -> dict[str, Any]:
    """A stock as a card/get `card` object: NORMAL -> CASH, DISCOUNT, EXCHANGE -> GIFT."""
    rule, base = s["coupon_use_rule"], {"id": stock_id, "title": s.get("stock_name")}
    kind = s["stock_type"]
    if kind == "NORMAL":
        r = rule.get("fixed_normal_coupon") or {}
        return {"card_type": "CASH", "cash": {
            "base_info": base, "reduce_cost": r.get("discount_amount"),
            "least_cost": r.get("transaction_minimum")}}
    if kind == "DISCOUNT":
        r = rule.get("discount_coupon") or {}
        pct = r.get("discount_percent")  # percent paid (88 = 12% off); the card API: percent off
        return {"card_type": "DISCOUNT", "discount": {"base_info": base,
                "discount": 100 - pct if isinstance(pct, int) else None}}
    r = rule.get("exchange_coupon") or {}
    return {"card_type": "GIFT", "gift": {"base_info": base, "gift": s.get("goods_name"),
            "exchange_price": r.get("exchange_price")}}


def _parse(what: str, status: int, text: Any) -> dict[str, Any]:
    try:
        obj = json.loads(text) if text else {}
    except (ValueError, TypeError) as e:
        raise BackendError(f"{what}: HTTP {status}, reply is not JSON") from e
    if not isinstance(obj, dict):
        raise BackendError(f"{what}: HTTP {status}, reply is JSON but not an object")
    if 200 <= status < 300:
        return obj
    code, message = str(obj.get("code", "")), str(obj.get("message", ""))[:120]
    kind = _V3_ERRORS.get(code, Busy if status >= 500 else ApiError)
    raise kind(f"{status} {code}: {message}")


def _never_connected(e: requests.RequestException) -> bool:
    """A refused or unresolvable connection: the request was never sent."""
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return type(reason).__name__ in ("NewConnectionError", "NameResolutionError")


# --- the requests binding of base.py's deadline ---------------------------------------------

def _kind(e: requests.RequestException) -> base.Failure:
    if isinstance(e, requests.ConnectTimeout) or _never_connected(e):
        return "unreached"
    cause = e.args[0] if e.args else None  # a body read's timeout arrives as ConnectionError
    if isinstance(e, requests.Timeout) or isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return "timeout"
    return "lost"


class _Adopting(HTTPConnection):
    """urllib3's connection, telling the current operation which socket it uses as soon as it
    is connected (before TLS), or when a request starts on a kept-alive one."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        base.adopt(self, sock)
        return sock

    def request(self, *args: Any, **kw: Any) -> None:
        base.adopt(self, self.sock)
        super().request(*args, **kw)


class _AdoptingTLS(_Adopting, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Adopting


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _AdoptingTLS


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):
    """requests' adapter with our pools (no retries: max_retries stays 0, so never a resend)."""

    def init_poolmanager(self, *args: Any, **kw: Any) -> None:
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kw: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kw)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _POOLS  # (SOCKS keeps its own pools)
        return manager


def _session() -> requests.Session:
    s = requests.Session()
    s.mount("http://", _Adapter())
    s.mount("https://", _Adapter())
    return s


def _epoch(value: object) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(dt.datetime.fromisoformat(value).timestamp())
    except ValueError:
        return None
