"""What every coupon backend shares: the error vocabulary, CodeInfo, the CardBackend protocol the
redemption engine calls, and the one transport policy (timeouts, total deadline, reply cap).

Rules this module keeps:
- Errors are named by what they mean for a coupon (Offline, Busy, OutcomeUnknown...), never by
  the backend or the HTTP library that produced them; a backend module maps its own errors here.
- One budget per backend operation (a client's public call: retries and a token refresh
  included): a total deadline (`deadline_s`) on top of the per-read `timeout_s`, and a cap on a
  reply's body (`max_reply_bytes`). A server trickling headers or streaming without end cannot
  hold a lane, nor hostd's memory, past them.
- The deadline is kept by one watchdog thread that shuts down (shutdown(2), not close) the
  sockets an expired operation uses: a blocked read returns at once, whatever library or TLS
  layer sits on top. Bindings report each socket they touch through adopt().
- How a failed exchange is read is decided here once (failure()), for every binding: nothing
  sent -> Offline; a call that changes state (consume, use) and may have been sent ->
  OutcomeUnknown (never repeated blindly; the engine settles it by a query), `settled` when the
  server is done with it (it answered, or closed the connection after reading the request),
  `transport` when the network failed (the engine reads that, never a library's exception
  type); reads -> Offline, or BackendError for a reply that is not the API's (too large).
- No coupon code, token or secret appears in a message made here.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol


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
    transport: the exchange itself failed (timeout, connection lost, deadline), whatever the
    binding's library: if the consume did not land, the reason is the network ("offline").
    """

    def __init__(self, message: str, *, settled: bool, cause: Exception | None = None,
                 transport: bool = False) -> None:
        super().__init__(message)
        self.settled = settled
        self.cause = cause
        self.transport = transport


@dataclass(frozen=True)
class CodeInfo:
    """card/code/get's answer (a merchant coupon's query, in the same words)."""

    code: str
    card_id: str
    status: str  # user_card_status; "CONSUMED" when the service answered 40099 instead
    begin_time: int | None
    end_time: int | None
    can_consume: bool
    openid: str | None


class CardBackend(Protocol):
    """What the engine needs of a backend: the WeChat card API client (wechat_card.py) and the
    WeChat Pay merchant-coupon backend (busifavor.py) both provide it. One per thread."""

    def decrypt(self, encrypt_code: str) -> str: ...
    def get_code(self, code: str, card_id: str | None = None, *,
                 check_consume: bool = True) -> CodeInfo: ...
    def get_card(self, card_id: str) -> dict[str, Any]: ...
    def consume(self, code: str, card_id: str | None = None, *, request_no: str) -> str: ...
    def close(self) -> None: ...


# --- the transport policy ------------------------------------------------------------------

MAX_REPLY_BYTES = 1 << 20  # the card API's replies are a few hundred bytes; a stock's a few KB


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0       # each connect, read and write
    deadline_s: float = 10.0     # one whole operation: connect, send, headers, body, retries
    max_reply_bytes: int = MAX_REPLY_BYTES

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and self.deadline_s > 0 and self.max_reply_bytes > 0):
            raise ValueError("timeout_s, deadline_s and max_reply_bytes must be positive")


Failure = Literal["unreached", "timeout", "lost", "lost_sending", "too_large", "deadline"]


class TransportFailure(Exception):
    """A binding's neutral account of a failed exchange; failure() says what it means.

    kind: unreached (no connection: nothing sent), timeout (a read or write timed out), lost
    (closed or reset after sending), lost_sending (broke while sending: part may have gone),
    too_large (the reply passed the cap), deadline (the operation's deadline passed).
    replied: the status line and headers had arrived (the server has decided).
    """

    def __init__(self, kind: Failure, cause: Exception, *, replied: bool = False,
                 limits: Limits | None = None) -> None:
        super().__init__(f"{kind}: {type(cause).__name__}")
        self.kind, self.cause, self.replied = kind, cause, replied
        self.limits = limits or Limits()


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"reply larger than {limit} bytes")


class Budget:
    """One operation's deadline and the sockets it has used (dups: shut down, never closed)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.end = time.monotonic() + limits.deadline_s
        self._lock = threading.Lock()
        self._socks: dict[object, socket.socket] = {}
        self._expired = self._done = False

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self.end

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def timeout(self) -> float:
        """The per-read timeout for the next exchange: never past the deadline."""
        return max(0.001, min(self.limits.timeout_s, self.remaining()))

    def before_sending(self, what: str) -> None:
        """Refuse to start an exchange with no time left (nothing is sent: Offline)."""
        if self.expired:
            raise Offline(f"{what}: not sent, the {self.limits.deadline_s:g} s deadline "
                          "has passed")

    def adopt(self, key: object, sock: socket.socket) -> None:
        with self._lock:
            if self._done or key in self._socks:
                return
            try:  # a dup of the descriptor: shutdown reaches the socket even after a TLS wrap
                dup = socket.socket(fileno=os.dup(sock.fileno()))
            except OSError:
                return
            self._socks[key] = dup
            if self._expired:
                _shutdown(dup)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            for s in self._socks.values():
                _shutdown(s)

    def close(self) -> None:
        with self._lock:
            self._done = True
            for s in self._socks.values():
                s.close()
            self._socks.clear()

    @property
    def done(self) -> bool:
        return self._done


def _shutdown(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread for the process: expires each budget at its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Budget]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, b: Budget) -> None:
        with self._cond:
            heapq.heappush(self._heap, (b.end, next(self._seq), b))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hexiao-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is b:  # (usually not: deadlines come in order)
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)[2].expire()


_WATCHDOG = _Watchdog()
_active = threading.local()


@contextlib.contextmanager
def deadline(limits: Limits) -> Iterator[Budget]:
    """This thread's operation budget: a new one, or the enclosing operation's (a token fetch
    inside a consume spends the consume's time)."""
    outer: Budget | None = getattr(_active, "budget", None)
    if outer is not None:
        yield outer
        return
    b = Budget(limits)
    _WATCHDOG.watch(b)
    _active.budget = b
    try:
        yield b
    finally:
        _active.budget = None
        b.close()


def adopt(key: object, sock: socket.socket | None) -> None:
    """A binding's hook on each socket it reads or writes: the current operation may shut it."""
    b: Budget | None = getattr(_active, "budget", None)
    if b is not None and sock is not None:
        b.adopt(key, sock)


def fail(kind: Failure, cause: Exception, *, replied: bool = False) -> TransportFailure:
    """A binding's failed exchange, read against the current budget: past the deadline, any
    failure other than "never connected" is the deadline's doing."""
    b: Budget | None = getattr(_active, "budget", None)
    if b is not None and kind not in ("unreached", "too_large") and b.expired:
        kind = "deadline"
    return TransportFailure(kind, cause, replied=replied, limits=b.limits if b else None)


def read_capped(chunks: Iterable[bytes], declared: str | None, limits: Limits) -> bytes:
    """A reply body, refused (TransportFailure too_large) past the cap: by its Content-Length
    before reading anything, else as soon as the bytes read pass it. The deadline is checked
    between chunks too (a transport the watchdog cannot see, e.g. a test's, is bounded so)."""
    cap = limits.max_reply_bytes
    b: Budget | None = getattr(_active, "budget", None)
    try:
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise _TooLarge(cap)
        body = bytearray()
        for chunk in chunks:
            body += chunk
            if len(body) > cap:
                raise _TooLarge(cap)
            if b is not None and b.expired:
                raise TransportFailure("deadline", TimeoutError("deadline between chunks"),
                                       replied=True, limits=b.limits)
    except _TooLarge as e:
        raise TransportFailure("too_large", e, replied=True, limits=limits) from None
    return bytes(body)


def failure(what: str, f: TransportFailure, *, sent_matters: bool,
            service: str) -> WeChatError:
    """What a failed exchange means for the caller (see the module's rules)."""
    e, name = f.cause, type(f.cause).__name__
    if f.kind == "unreached":
        return Offline(f"{what}: cannot reach {service} ({name})")
    if f.kind == "too_large":  # the server answered: not a network failure
        text = f"{what}: reply larger than {f.limits.max_reply_bytes} bytes"
        return OutcomeUnknown(text, settled=True, cause=e) if sent_matters else BackendError(text)
    if f.kind == "deadline":
        text = f"{what}: no complete reply within the {f.limits.deadline_s:g} s deadline"
        return OutcomeUnknown(text, settled=f.replied, cause=e, transport=True) \
            if sent_matters else Offline(text)
    if f.kind == "timeout":
        if sent_matters:
            return OutcomeUnknown(f"{what}: timed out after sending", settled=False, cause=e,
                                  transport=True)
        return Offline(f"{what}: timed out ({name})")
    if sent_matters:  # the server closed or reset the connection: it is done with the request
        return OutcomeUnknown(f"{what}: connection lost before the reply",
                              settled=f.kind != "lost_sending", cause=e, transport=True)
    return Offline(f"{what}: connection lost ({name})")
