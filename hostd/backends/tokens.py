"""The WeChat access token of one hostd: one cache shared by every lane worker and the reconcile
loop (the factory owns it), so a hostd never replaces its own token.

Rules this module keeps:
- Three ways to get a token (`mode`): "stable" (POST cgi-bin/stable_token, the default for
  hostd): in normal mode every call returns the appid's current token while it is valid, so
  any number of tills share it and none invalidates another; "token" (GET cgi-bin/token): each
  fetch replaces the appid's token for everyone (after a 5-minute overlap), 2000 a day;
  "central": the merchant's own token service (backend.token_url) hands out the shared token.
- A token is refetched `margin_s` before it expires (at most half its lifetime early), and
  when the API refuses it (40001 invalidated / not the latest, 42001 expired): refused() first
  asks again in the ordinary way, which gives the new token when someone else already replaced
  it. Only when stable_token still hands out the refused token is it force-refreshed: at most
  once per FORCE_INTERVAL_S (the platform ignores closer ones) and FORCE_DAILY times a China
  day (its limit); past either the refusal stands (TokenError) and nothing is sent. The force
  limit used up (45009, other tills count too) is a TokenError as well, never the API's daily
  quota: the card API itself still answers.
- A refusal is logged (warning) and counted (`refusals`, and `on_refused(errcode)` for the
  daemon's metrics); the token itself never appears in a log or a message.
- Thread-safe: one lock; a thread waits for another's fetch at most its own operation's time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

from hexiao.hostd.backends.base import Offline, QuotaExceeded, TokenError

log = logging.getLogger("hexiao.hostd.backends")

Mode = Literal["stable", "token", "central"]
MODES: tuple[Mode, ...] = ("stable", "token", "central")
# fetch(force_refresh) -> (access_token, expires_in): one call to the token endpoint
Fetch = Callable[[bool], tuple[str, int]]

FORCE_INTERVAL_S = 30.0  # the platform: force refreshes closer than this are not done
FORCE_DAILY = 20         # the platform: force refreshes per day
_CHINA = 8 * 3600        # the platform's days end at midnight China time
_WHY = {40001: "invalidated or not the latest", 42001: "expired"}


class TokenCache:
    """One hostd's access token. `clock` (monotonic) times the token, `wall` the China day."""

    def __init__(self, mode: Mode = "stable", *, margin_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 on_refused: Callable[[int], None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"token mode must be one of {', '.join(MODES)}")
        self.mode: Mode = mode
        self._margin, self._clock, self._wall = margin_s, clock, wall
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()  # refusals are counted even if a fetch holds _lock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires = 0.0
        self._last_force: float | None = None
        self._forced: tuple[int, int] = (0, 0)  # (China day, force refreshes that day)
        self.fetches = 0          # calls to the token endpoint
        self.force_refreshes = 0  # of which force_refresh=true
        self.refusals: Counter[int] = Counter()  # API answers refusing our token, by errcode

    def get(self, fetch: Fetch, wait_s: float) -> str:
        """The cached token, fetched first if there is none or it is due for refresh."""
        with self._locked(wait_s):
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            return self._fetch(fetch, False)

    def fresh(self, fetch: Fetch, wait_s: float) -> str:
        """Ask the token endpoint now, in the ordinary way (never a force refresh)."""
        with self._locked(wait_s):
            return self._fetch(fetch, False)

    def refused(self, stale: str, errcode: int, fetch: Fetch, wait_s: float) -> str:
        """The API refused `stale` with errcode (40001/42001): a token to try once more, or
        TokenError when no other can be had now."""
        with self._count_lock:
            self.refusals[errcode] += 1
        if self.on_refused is not None:
            self.on_refused(errcode)
        log.warning("access token refused by the API (errcode %d: %s); getting the current one",
                    errcode, _WHY.get(errcode, "refused"))
        with self._locked(wait_s):
            if self._token is not None and self._token != stale \
                    and self._clock() < self._expires:
                return self._token  # another lane replaced it meanwhile
            value = self._fetch(fetch, False)
            if value != stale:
                return value
            if self.mode != "stable":
                raise TokenError(f"the token service still gives the token the API refused "
                                 f"(errcode {errcode})", errcode)
            return self._force(fetch, errcode)

    # --- with the lock held -------------------------------------------------------------

    def _force(self, fetch: Fetch, errcode: int) -> str:
        """stable_token hands out the token the API refused: it is dead; force a new one."""
        now = self._clock()
        if self._last_force is not None and now - self._last_force < FORCE_INTERVAL_S:
            wait = FORCE_INTERVAL_S - (now - self._last_force)
            raise TokenError(f"token refused (errcode {errcode}) right after a force refresh; "
                             f"the next one is allowed in {wait:.0f} s", errcode)
        day = int((self._wall() + _CHINA) // 86_400)
        used = self._forced[1] if self._forced[0] == day else 0
        if used >= FORCE_DAILY:
            raise TokenError(f"token refused (errcode {errcode}) and the {FORCE_DAILY} force "
                             "refreshes of today (China time) are used up", errcode)
        self._last_force, self._forced = now, (day, used + 1)
        log.warning("access token refused although stable_token still gives it: force-refreshing "
                    "(%d of %d today)", used + 1, FORCE_DAILY)
        try:
            return self._fetch(fetch, True)
        except QuotaExceeded as e:  # the platform counts other tills' too: none left today
            self._forced = (day, FORCE_DAILY)
            raise TokenError(f"token refused (errcode {errcode}) and no force refresh is left "
                             f"today ({e})", errcode) from e

    def _fetch(self, fetch: Fetch, force: bool) -> str:
        self.fetches += 1
        self.force_refreshes += force
        value, expires_in = fetch(force)
        now = self._clock()
        self._token, self._expires = value, now + expires_in
        self._refresh_at = now + max(expires_in - self._margin, expires_in / 2)
        return value

    def _locked(self, wait_s: float) -> _Held:
        if not self._lock.acquire(timeout=max(0.001, wait_s)):
            raise Offline("token: another lane's token fetch did not finish in time")
        return _Held(self._lock)


class _Held:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
