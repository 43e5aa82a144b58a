"""WeChat official-account card API client (card/code/get, consume, decrypt, card/get) over httpx.

Rules this module keeps:
- Errors are typed by errcode, never by errmsg (the real errmsg carries a request id). A reply
  that is not JSON, is truncated, or lacks the fields its call promises is a BackendError.
- Retries only where a repeat cannot change anything: the token fetch, card/code/get,
  card/code/decrypt and card/get, on busy (-1) and transport errors, a bounded number of times.
  Any call, consume included, is repeated once after 40001/42001 with a fresh token: the service
  refused it at authentication, so it did nothing.
- consume is never repeated blindly. When its result cannot be known (reply lost, timeout after
  sending, HTTP error, busy, unreadable reply) it raises OutcomeUnknown; the caller reconciles
  by querying. A connection that was never made raises Offline: nothing was sent.
- The access token is cached and refreshed `refresh_margin_s` before it expires; with a central
  token URL every till shares one token (each new token invalidates the previous one).
- Coupon codes and tokens are never logged; see redeem.tail() for the 4-digit form.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

# httpx logs every request URL at INFO, and the URL carries the access_token (and the secret on
# the token call): keep both transport loggers quiet whatever the application's level
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


class WeChatError(Exception):
    """Base: errcode is the service's, or None for transport and format errors."""

    def __init__(self, message: str, errcode: int | None = None) -> None:
        super().__init__(message)
        self.errcode = errcode


class BackendError(WeChatError):
    """The reply is not what the API sends: not JSON, truncated, HTTP error, missing fields."""


class Offline(WeChatError):
    """The service could not be reached (or kept timing out on a safe call)."""


class Busy(WeChatError):
    """errcode -1, system busy."""


class TokenError(WeChatError):
    """40001/42001/41001 even with a fresh token, or the token could not be fetched."""


class InvalidCode(WeChatError):
    """40056 (unknown code), 40075 (bad encrypt_code), 40073 (unknown card)."""


class AlreadyConsumed(WeChatError):
    """40099."""


class CardUnavailable(WeChatError):
    """40127: deleted, gifting, unavailable or expired."""


class QuotaExceeded(WeChatError):
    """45009."""


class NotInTimeWindow(WeChatError):
    """40079: not valid yet (or past its time)."""


class ApiError(WeChatError):
    """Any other non-zero errcode."""


class OutcomeUnknown(WeChatError):
    """A consume was (or may have been) sent and its result is not known.

    settled: the server finished with the request (it answered or closed the connection), so a
    query now shows the truth; False after our own timeout, when it may still be in flight.
    """

    def __init__(self, message: str, *, settled: bool, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.settled = settled
        self.cause = cause


_ERRCODES: dict[int, type[WeChatError]] = {
    -1: Busy, 40001: TokenError, 42001: TokenError, 41001: TokenError,
    40056: InvalidCode, 40075: InvalidCode, 40073: InvalidCode,
    40099: AlreadyConsumed, 40127: CardUnavailable, 45009: QuotaExceeded, 40079: NotInTimeWindow,
}
_TOKEN_STALE = (40001, 42001)


@dataclass(frozen=True)
class CodeInfo:
    """card/code/get's answer."""

    code: str
    card_id: str
    status: str  # user_card_status; "CONSUMED" when the service answered 40099 instead
    begin_time: int | None
    end_time: int | None
    can_consume: bool
    openid: str | None


class WeChatCardClient:
    def __init__(self, base_url: str, appid: str, secret: str, *,
                 token_url: str | None = None, timeout_s: float = 5.0, retries: int = 2,
                 backoff_s: float = 0.1, refresh_margin_s: float = 300.0,
                 card_cache_s: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)
        self._appid, self._secret, self._token_url = appid, secret, token_url
        self._retries, self._backoff, self._margin = retries, backoff_s, refresh_margin_s
        self._card_ttl, self._clock, self._sleep = card_cache_s, clock, sleep
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expires = 0.0
        self._cards: dict[str, tuple[float, dict[str, Any]]] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WeChatCardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- token -------------------------------------------------------------------------

    def token(self, *, force: bool = False, stale: str | None = None) -> str:
        """The cached token, refetched when near expiry, when forced, or when `stale` is it."""
        with self._lock:
            if stale is not None and stale != self._token:
                force = False  # another thread already replaced the stale token
            if not force and self._token and self._clock() < self._token_expires - self._margin:
                return self._token
            reply = self._safe(self._fetch_token)
            value, expires_in = reply.get("access_token"), reply.get("expires_in")
            if not isinstance(value, str) or not value or not isinstance(expires_in, int):
                raise BackendError("token reply without access_token/expires_in")
            self._token, self._token_expires = value, self._clock() + expires_in
            return value

    def _fetch_token(self) -> dict[str, Any]:
        try:
            if self._token_url:
                return _parse(self._http.get(self._token_url))
            return _parse(self._http.get("/cgi-bin/token", params={
                "grant_type": "client_credential", "appid": self._appid, "secret": self._secret}))
        except httpx.TransportError as e:
            raise Offline(f"token: cannot reach the token service ({type(e).__name__})") from e

    # --- API calls ---------------------------------------------------------------------

    def get_code(self, code: str, card_id: str | None = None, *,
                 check_consume: bool = True) -> CodeInfo:
        body: dict[str, Any] = {"code": code, "check_consume": check_consume}
        if card_id:
            body["card_id"] = card_id
        try:
            r = self._safe(lambda: self._call("card/code/get", body))
        except AlreadyConsumed:
            # seen in the field: check_consume=true answers 40099 for a consumed code
            return CodeInfo(code, card_id or "", "CONSUMED", None, None, False, None)
        card = r.get("card")
        status = r.get("user_card_status")
        if not isinstance(card, dict) or not isinstance(card.get("card_id"), str) \
                or not isinstance(status, str):
            raise BackendError("card/code/get reply without card.card_id/user_card_status")
        begin, end = card.get("begin_time"), card.get("end_time")
        return CodeInfo(code, card["card_id"], status,
                        begin if isinstance(begin, int) else None,
                        end if isinstance(end, int) else None,
                        r.get("can_consume") is True, r.get("openid"))

    def decrypt(self, encrypt_code: str) -> str:
        r = self._safe(lambda: self._call("card/code/decrypt", {"encrypt_code": encrypt_code}))
        code = r.get("code")
        if not isinstance(code, str) or not code:
            raise BackendError("card/code/decrypt reply without code")
        return code

    def get_card(self, card_id: str) -> dict[str, Any]:
        """card/get's `card` object, cached for card_cache_s (cards rarely change)."""
        cached = self._cards.get(card_id)
        if cached and self._clock() < cached[0]:
            return cached[1]
        r = self._safe(lambda: self._call("card/get", {"card_id": card_id}))
        card = r.get("card")
        if not isinstance(card, dict) or not isinstance(card.get("card_type"), str) \
                or not isinstance(card.get(card["card_type"].lower()), dict):
            raise BackendError("card/get reply without card_type and its section")
        self._cards[card_id] = (self._clock() + self._card_ttl, card)
        return card

    def consume(self, code: str, card_id: str | None = None, *,
                request_no: str | None = None) -> str:
        """Consume once; returns the card_id. Repeated only after a token refusal (did nothing).
        request_no: the card API has no idempotency key; it is taken for the backend interface
        (redeem.CardBackend) and not sent: a lost reply is settled by a query instead."""
        body: dict[str, Any] = {"code": code}
        if card_id:
            body["card_id"] = card_id
        try:
            r = self._call("card/code/consume", body, sent_matters=True)
        except Busy as e:
            # the service has been seen to commit and still answer -1: do not assume either way
            raise OutcomeUnknown("consume answered busy", settled=True, cause=e) from e
        except BackendError as e:
            raise OutcomeUnknown("consume reply unreadable", settled=True, cause=e) from e
        card = r.get("card")
        consumed = card.get("card_id") if isinstance(card, dict) else None
        return consumed if isinstance(consumed, str) else (card_id or "")

    def _call(self, path: str, body: dict[str, Any], *, sent_matters: bool = False,
              ) -> dict[str, Any]:
        """One POST with the token; on a stale token, one more with a fresh one."""
        content = json.dumps(body, ensure_ascii=False).encode()
        token = self.token()
        for attempt in (0, 1):
            try:
                reply = self._http.post(f"/{path}", params={"access_token": token},
                                        content=content,
                                        headers={"Content-Type": "application/json"})
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                raise Offline(f"{path}: cannot reach the card API ({type(e).__name__})") from e
            except httpx.TimeoutException as e:
                if sent_matters:
                    raise OutcomeUnknown(f"{path}: timed out after sending", settled=False,
                                         cause=e) from e
                raise Offline(f"{path}: timed out ({type(e).__name__})") from e
            except httpx.TransportError as e:
                if sent_matters:
                    # the server closed or reset the connection: it is done with the request
                    raise OutcomeUnknown(f"{path}: connection lost before the reply",
                                         settled=not isinstance(e, httpx.WriteError),
                                         cause=e) from e
                raise Offline(f"{path}: connection lost ({type(e).__name__})") from e
            try:
                return _parse(reply)
            except TokenError as e:
                if attempt or e.errcode not in _TOKEN_STALE:
                    raise
                token = self.token(force=True, stale=token)
        raise AssertionError("unreachable")

    def _safe(self, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a call that is safe to repeat, retrying busy and transport errors (bounded)."""
        for attempt in range(self._retries + 1):
            try:
                return call()
            except (Busy, Offline):
                if attempt == self._retries:
                    raise
                self._sleep(self._backoff * 2 ** attempt)
        raise AssertionError("unreachable")


def _parse(reply: httpx.Response) -> dict[str, Any]:
    """The JSON object of a reply, or the typed error its errcode names."""
    if reply.status_code != 200:
        raise BackendError(f"HTTP {reply.status_code} from the card API")
    try:
        obj = json.loads(reply.content)
    except (ValueError, UnicodeDecodeError) as e:
        raise BackendError(f"reply is not JSON ({len(reply.content)} bytes)") from e
    if not isinstance(obj, dict):
        raise BackendError("reply is JSON but not an object")
    errcode = obj.get("errcode", 0)  # the token call omits errcode on success
    if not isinstance(errcode, int) or isinstance(errcode, bool):
        raise BackendError("reply has a non-integer errcode")
    if errcode != 0:
        errmsg = obj.get("errmsg")
        kind = _ERRCODES.get(errcode, ApiError)
        raise kind(f"errcode {errcode}: {str(errmsg)[:120]}", errcode)
    return obj
