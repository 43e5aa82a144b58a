"""WeChat official-account card API client (card/code/get, consume, decrypt, card/get) over httpx.

Rules this module keeps:
- Errors are typed by errcode, never by errmsg (the real errmsg carries a request id). A reply
  that is not JSON, is truncated, or lacks the fields its call promises is a BackendError.
- Every call keeps base.py's transport policy: per-read timeout, a total deadline per operation
  (retries and a token refresh included), a cap on the reply body; the httpx binding below
  reports each socket it uses to the deadline's watchdog (_Network).
- Retries only where a repeat cannot change anything: the token fetch, card/code/get,
  card/code/decrypt and card/get, on busy (-1) and transport errors, a bounded number of times
  within the deadline. Any call, consume included, is repeated once after 40001/42001 with a
  fresh token: the service refused it at authentication, so it did nothing.
- consume is never repeated blindly. When its result cannot be known (reply lost, timeout after
  sending, deadline or reply cap hit, HTTP error, busy, unreadable reply) it raises
  OutcomeUnknown; the caller reconciles by querying. A connection that was never made raises
  Offline: nothing was sent.
- The access token lives in a TokenCache (tokens.py: when to fetch, refusals, force refresh);
  hostd's factory gives every client of one hostd the same cache. Here is only how a token is
  fetched (_fetch_token): stable_token (POST JSON, the secret in the body, never in a URL),
  cgi-bin/token, or the central token_url. A server without stable_token (HTTP 404, or 40066 /
  41001 / 40001 as for an ordinary API) is asked at cgi-bin/token instead, with one warning.
  A client made without a cache gets its own, in `token_mode` ("token" unless told: one client,
  one token; hostd's config default is "stable").
- Coupon codes and tokens are never logged; see redeem.tail() for the 4-digit form.
- Member cards: member_info() (card/membercard/userinfo/get) is a read, retried like
  card/code/get; add_bonus() (card/membercard/updateuser) changes state and is not idempotent
  on the platform: it is never repeated, and an unknown result raises OutcomeUnknown exactly
  as consume does (the caller settles it by reading member_info()).
- A ticket's own details (seat, show time, passenger), when card/code/get carries them under
  the lower-cased card type (the simulator does; hostd/backends/sim/state.py), come back in
  TicketCodeInfo.ticket.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
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
    TokenError,
    TransportFailure,
    WeChatError,
)
from hexiao.hostd.backends.tokens import Mode, TokenCache

# httpx logs every request URL at INFO, and the URL carries the access_token (and the secret on
# the token call): keep both transport loggers quiet whatever the application's level
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)
CARD_API = "the card API"

_ERRCODES: dict[int, type[WeChatError]] = {
    -1: Busy, 40001: TokenError, 42001: TokenError, 41001: TokenError,
    40056: InvalidCode, 40075: InvalidCode, 40073: InvalidCode,
    40099: AlreadyConsumed, 40127: CardUnavailable, 45009: QuotaExceeded, 40079: NotInTimeWindow,
}
_TOKEN_STALE = (40001, 42001)
# what a server answers for stable_token when it has no such API (it asks for a token, as for
# an ordinary call, or says the URL is unknown)
_NO_STABLE = (40066, 41001, 40001)
log = logging.getLogger("hexiao.hostd.backends")
TICKET_SECTIONS = ("movie_ticket", "scenic_ticket", "meeting_ticket", "boarding_pass")


@dataclass(frozen=True)
class TicketCodeInfo(CodeInfo):
    """card/code/get of a ticket: also its own details (seat_number, show_time, ...)."""

    ticket: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberInfo:
    """card/membercard/userinfo/get: the member's points (bonus) and balance (fen)."""

    code: str
    card_id: str
    bonus: int
    balance: int
    status: str
    openid: str | None


class WeChatCardClient:
    """One per thread (its httpx client is); `tokens` may be shared by many (thread-safe).

    transport: for tests and benches; the deadline then holds between exchanges and chunks
    only, as the watchdog sees no sockets of a transport it did not bind."""

    def __init__(self, base_url: str, appid: str, secret: str, *,
                 token_url: str | None = None, timeout_s: float = 5.0, retries: int = 2,
                 backoff_s: float = 0.1, refresh_margin_s: float = 300.0,
                 card_cache_s: float = 600.0, deadline_s: float = 10.0,
                 max_reply_bytes: int = base.MAX_REPLY_BYTES,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None,
                 token_mode: Mode = "token", tokens: TokenCache | None = None) -> None:
        self._limits = Limits(timeout_s, deadline_s, max_reply_bytes)
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)
        if transport is None:
            _bind(self._http)
        self._appid, self._secret, self._token_url = appid, secret, token_url
        self._retries, self._backoff = retries, backoff_s
        self._card_ttl, self._clock, self._sleep = card_cache_s, clock, sleep
        if tokens is None:
            tokens = TokenCache("central" if token_url else token_mode,
                                margin_s=refresh_margin_s, clock=clock)
        self._tokens = tokens
        self._cards: dict[str, tuple[float, dict[str, Any]]] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WeChatCardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- token -------------------------------------------------------------------------

    @property
    def tokens(self) -> TokenCache:
        return self._tokens

    def token(self, *, force: bool = False) -> str:
        """The cached token (fetched when due). force: ask the token endpoint now, in the
        ordinary way: with stable_token that never invalidates anyone's token."""
        with base.deadline(self._limits) as b:
            if force:
                return self._tokens.fresh(self._fetch, b.remaining())
            return self._tokens.get(self._fetch, b.remaining())

    def _fetch(self, force_refresh: bool) -> tuple[str, int]:
        """One token fetch for the cache: (token, expires_in). A force refresh is never
        repeated (each one counts against the platform's 20 a day)."""
        def call() -> dict[str, Any]:
            return self._fetch_token(force_refresh)

        reply = call() if force_refresh else self._safe(call)
        value, expires_in = reply.get("access_token"), reply.get("expires_in")
        if not isinstance(value, str) or not value or not isinstance(expires_in, int) \
                or isinstance(expires_in, bool) or expires_in <= 0:
            raise BackendError("token reply without access_token/expires_in")
        return value, expires_in

    def _fetch_token(self, force_refresh: bool = False) -> dict[str, Any]:
        mode = self._tokens.mode
        try:
            if mode == "stable":
                body = json.dumps({"grant_type": "client_credential", "appid": self._appid,
                                   "secret": self._secret, "force_refresh": force_refresh})
                status, content = self._exchange(
                    "POST", "/cgi-bin/stable_token", "token", content=body.encode(),
                    headers={"Content-Type": "application/json"})
                try:
                    return _parse(status, content)
                except WeChatError as e:
                    if status != 404 and e.errcode not in _NO_STABLE:
                        raise
                    why = "HTTP 404" if status == 404 else f"errcode {e.errcode}"
                log.warning("token: %s has no cgi-bin/stable_token (%s); using cgi-bin/token, "
                            "whose every fetch replaces the token other tills hold",
                            self._http.base_url, why)
                self._tokens.mode = "token"
            if mode == "central":
                return _parse(*self._exchange("GET", self._token_url or "", "token"))
            return _parse(*self._exchange("GET", "/cgi-bin/token", "token", params={
                "grant_type": "client_credential", "appid": self._appid,
                "secret": self._secret}))
        except TransportFailure as f:
            raise base.failure("token", f, sent_matters=False,
                               service="the token service") from f.cause

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
        args = (code, card["card_id"], status, begin if isinstance(begin, int) else None,
                end if isinstance(end, int) else None, r.get("can_consume") is True,
                r.get("openid"))
        ticket = next((r[k] for k in TICKET_SECTIONS if isinstance(r.get(k), dict)), None)
        return CodeInfo(*args) if ticket is None else TicketCodeInfo(*args, ticket=ticket)

    def member_info(self, code: str, card_id: str) -> MemberInfo:
        """A member card's points and balance now (a read: retried on busy and transport)."""
        r = self._safe(lambda: self._call("card/membercard/userinfo/get",
                                          {"card_id": card_id, "code": code}))
        bonus, balance, status = r.get("bonus"), r.get("balance", 0), r.get("user_card_status")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bonus, balance)) \
                or not isinstance(status, str):
            raise BackendError("userinfo/get reply without bonus/balance/user_card_status")
        return MemberInfo(code, card_id, bonus, balance, status, r.get("openid"))

    def add_bonus(self, code: str, card_id: str, add: int, record: str) -> int:
        """card/membercard/updateuser add_bonus once; returns result_bonus. Never repeated:
        an unknown result is OutcomeUnknown (settle it with member_info())."""
        body = {"card_id": card_id, "code": code, "add_bonus": add, "record_bonus": record,
                "notify_optional": {"is_notify_bonus": True}}
        r = self._once("card/membercard/updateuser", body, "updateuser")
        result = r.get("result_bonus")
        if not isinstance(result, int) or isinstance(result, bool):
            raise OutcomeUnknown("updateuser reply without result_bonus", settled=True)
        return result

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
        (base.CardBackend) and not sent: a lost reply is settled by a query instead."""
        body: dict[str, Any] = {"code": code}
        if card_id:
            body["card_id"] = card_id
        r = self._once("card/code/consume", body, "consume")
        card = r.get("card")
        consumed = card.get("card_id") if isinstance(card, dict) else None
        return consumed if isinstance(consumed, str) else (card_id or "")

    def _once(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        """A call that changes state (consume, add_bonus): sent once within the deadline; a
        result that cannot be known is OutcomeUnknown, for the caller to settle by a query."""
        try:
            with base.deadline(self._limits):
                return self._call(path, body, sent_matters=True)
        except Busy as e:
            # the service has been seen to commit and still answer -1: do not assume either way
            raise OutcomeUnknown(f"{what} answered busy", settled=True, cause=e) from e
        except BackendError as e:
            raise OutcomeUnknown(f"{what} reply unreadable", settled=True, cause=e) from e

    def _call(self, path: str, body: dict[str, Any], *, sent_matters: bool = False,
              ) -> dict[str, Any]:
        """One POST with the token; on a stale token, one more with a fresh one."""
        content = json.dumps(body, ensure_ascii=False).encode()
        token = self.token()
        for attempt in (0, 1):
            try:
                reply = self._exchange("POST", f"/{path}", path,
                                       params={"access_token": token}, content=content,
                                       headers={"Content-Type": "application/json"})
            except TransportFailure as f:
                raise base.failure(path, f, sent_matters=sent_matters,
                                   service=CARD_API) from f.cause
            try:
                return _parse(*reply)
            except TokenError as e:
                if attempt or e.errcode not in _TOKEN_STALE:
                    raise
                with base.deadline(self._limits) as b:
                    token = self._tokens.refused(token, e.errcode, self._fetch, b.remaining())
        raise AssertionError("unreachable")

    def _exchange(self, method: str, url: str, what: str, **kw: Any) -> tuple[int, bytes]:
        """One HTTP exchange within the operation's budget: (status, body), or
        TransportFailure. Offline if the deadline left no time to send it."""
        with base.deadline(self._limits) as b:
            b.before_sending(what)
            replied = False
            try:
                with self._http.stream(method, url, timeout=b.timeout(), **kw) as r:
                    replied = True
                    return r.status_code, base.read_capped(
                        r.iter_bytes(), r.headers.get("content-length"), self._limits)
            except httpx.TransportError as e:
                raise base.fail(_kind(e), e, replied=replied) from e
            except httpx.DecodingError as e:  # a Content-Encoding it does not keep to
                raise BackendError(f"{what}: reply cannot be decoded") from e

    def _safe(self, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a call that is safe to repeat, retrying busy and transport errors (bounded by
        count and by the operation's deadline)."""
        with base.deadline(self._limits) as b:
            for attempt in range(self._retries + 1):
                try:
                    return call()
                except (Busy, Offline):
                    if attempt == self._retries or b.expired:
                        raise
                    self._sleep(min(self._backoff * 2 ** attempt, b.remaining()))
        raise AssertionError("unreachable")


def _parse(status: int, content: bytes) -> dict[str, Any]:
    """The JSON object of a reply, or the typed error its errcode names."""
    if status != 200:
        raise BackendError(f"HTTP {status} from the card API")
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError) as e:
        raise BackendError(f"reply is not JSON ({len(content)} bytes)") from e
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


# --- the httpx binding of base.py's deadline ------------------------------------------------

def _kind(e: httpx.TransportError) -> base.Failure:
    if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return "unreached"
    if isinstance(e, httpx.TimeoutException):
        return "timeout"
    return "lost_sending" if isinstance(e, httpx.WriteError) else "lost"


class _Stream(httpcore.NetworkStream):
    """httpcore's stream, telling the current operation which socket it uses (also a pooled
    keep-alive one, at its first read or write in that operation)."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def _adopt(self) -> None:
        base.adopt(self, self._inner.get_extra_info("socket"))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._adopt()
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._adopt()
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        self._adopt()  # the handshake is bounded too
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Network(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None,
                    ) -> httpcore.NetworkStream:
        stream = _Stream(self._inner.connect_tcp(host, port, timeout, local_address,
                                                 socket_options))
        stream._adopt()
        return stream

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bind(client: httpx.Client) -> None:
    """Route the client's connections (direct, and through env proxies) through _Network.
    httpx takes no network backend, so its pools' is wrapped in place (httpx 0.28 pinned; the
    deadline tests fail loudly if a new version moves it)."""
    for t in [client._transport, *(m for m in client._mounts.values() if m is not None)]:
        pool = getattr(t, "_pool", None)
        inner = getattr(pool, "_network_backend", None)
        if inner is None:
            raise RuntimeError(f"cannot bind the deadline to {type(t).__name__}")
        if not isinstance(inner, _Network):
            pool._network_backend = _Network(inner)  # type: ignore[union-attr]
