"""The rules of the simulated WeChat card API, without any I/O.

SimState answers one request at a time (`api()`, `admin()`) with a Reply the HTTP layer sends as
is. Time comes from the clock you pass (plus an offset that POST /_sim/clock moves), so tests
expire tokens without sleeping. One lock guards everything: handler threads may call in at once,
and a consume's check-and-commit is atomic, which is what makes the consume counts exact.

What the real service does, as far as public docs and observed replies show, is what this does;
where they are silent the choice is noted here and in the README section:
- Access tokens come from two isolated endpoints. cgi-bin/token (GET): each fetch replaces the
  appid's token, the old one working for `grace_seconds` more; 2000 a day. cgi-bin/stable_token
  (POST JSON): in normal mode the appid's current token while more than `grace_seconds` of it
  remain (then a new one; the old one lives out its own time), so expires_in is what is left;
  10 000 calls a minute (45011), 500 000 a day (45009). force_refresh=true issues a new token
  and the one it replaces keeps working for `grace_seconds` or until the next force refresh,
  whichever comes first (so two forced calls 30 s apart kill a leaked token, as the platform
  documents); forced calls closer than 30 s to the last refresh change nothing; 20 forced calls
  a day (45009, inferred).
- Consume refuses GIFT_TIMEOUT like the other abnormal states (40127), and member cards (40071,
  invalid card type: they are identified, never consumed). card/code/unavailable makes a code
  UNAVAILABLE (a consumed one: 40099; another abnormal one: 40127, inferred).
- An unknown API path answers HTTP 200 with errcode 40066 (invalid url), as the platform does.
- A DATE_TYPE_FIX_TERM card's code has its own window: from received_at plus the terms, or the
  code's own begin_time/end_time from the seed.
- /_sim/tokens/invalidate revokes tokens as a fault: stable_token's normal mode keeps handing
  out a revoked current token (the API refuses it, 40001) until a force refresh replaces it.
- Member cards: card/membercard/userinfo/get and card/membercard/updateuser take only a
  MEMBER_CARD's code (another type: 40071, inferred) with its card_id (41012 without: the
  documents mark it required); updateuser needs a NORMAL code (40127), sets `bonus`/`balance`
  or adds `add_bonus`/`add_balance` (integers, else 47001) and answers result_bonus,
  result_balance and openid; a change that would leave either below 0 is refused with 47001
  (the real errcode is not documented: inferred). add_bonus is NOT idempotent, as on the
  platform: each call adds. Every committed change is kept with its record_bonus text
  (GET /_sim/state: bonus_records) and counts bonus_updates: the exactly-once proof for points.
  drop_after_commit loses updateuser's reply as it does a consume's.
- Tickets (MOVIE_TICKET, SCENIC_TICKET, MEETING_TICKET, BOARDING_PASS) are consumed like
  coupons. card/movieticket/updateuser, card/meetingticket/updateuser and
  card/boardingpass/checkin set a code's own details (seat, show time, passenger...);
  card/code/get returns them under the lower-cased card type (e.g. "movie_ticket": {...}), an
  extension the platform does not document (its card/code/get shows no seat): the merchant who
  issued the ticket knows them; the simulator hands them to hexiao this way.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import hashlib
import hmac
import json
import os
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hexiao.hostd.backends.sim import seed as seedmod
from hexiao.hostd.backends.sim.seed import DAY, FIX_RANGE, Card, Code, Faults, SeedError

# errmsg texts as the real service sends them (before its " rid: ..." request-id suffix)
ERRMSG = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40066: "invalid url",
    40071: "invalid card type",
    40013: "invalid appid",
    40056: "invalid serial code",
    40073: "invalid card id",
    40075: "invalid encrypt code",
    40079: "invalid time",
    40099: "invalid code, this code has consumed.",
    40125: "invalid appsecret",
    40127: "invalid user-card status! Hint: the card was given to user, but may be deleted or "
           "set unavailable !",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    41011: "missing required fields! please check document and request json!",
    41012: "missing card id",
    41013: "missing code",
    42001: "access_token expired",
    43001: "require GET method",
    43002: "require POST method",
    45009: "reach max api daily quota limit",
    45011: "api minute-quota reach limit  mustslower  retry next minute",
    47001: "data format error",
}
API_PATHS = {"cgi-bin/token": "GET", "cgi-bin/stable_token": "POST", "card/code/get": "POST",
             "card/code/consume": "POST", "card/code/decrypt": "POST", "card/get": "POST",
             "card/code/unavailable": "POST", "card/membercard/userinfo/get": "POST",
             "card/membercard/updateuser": "POST", "card/movieticket/updateuser": "POST",
             "card/meetingticket/updateuser": "POST", "card/boardingpass/checkin": "POST"}
# the ticket update APIs: path -> the card type whose codes they take
TICKET_UPDATES = {"card/movieticket/updateuser": "MOVIE_TICKET",
                  "card/meetingticket/updateuser": "MEETING_TICKET",
                  "card/boardingpass/checkin": "BOARDING_PASS"}
TOKEN_PATHS = ("cgi-bin/token", "cgi-bin/stable_token")
ADMIN_PATHS = {"/_sim/state": "GET", "/_sim/faults": "GET POST", "/_sim/reset": "POST",
               "/_sim/clock": "POST", "/_sim/tokens/invalidate": "POST", "/_sim/codes": "POST"}
CONSUMABLE = ("NORMAL",)  # GIFT_TIMEOUT too is refused (40127)
STABLE_PER_MINUTE = 10_000  # stable_token calls per appid and minute (45011 past it)
FORCE_INTERVAL_S = 30  # force refreshes closer than this to the last one change nothing
JSON_TYPE = "application/json; encoding=utf-8"  # sic: the real service's header
BEIJING = 8 * 3600  # daily quotas reset at midnight China time


@dataclass
class Reply:
    """What to send. drop="close": send nothing and close the connection."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    drop: str | None = None
    delay: float = 0.0  # seconds to wait before sending or dropping
    errcode: int | None = None  # for the log line only


def _reply(obj: dict[str, Any], status: int = 200) -> Reply:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return Reply(status=status, body=body, errcode=obj.get("errcode"))


def encrypt_code(key: str, code: str) -> str:
    """The encrypt_code of a code: base64 of AES-128-ECB(PKCS7(code)) under sha256(key)[:16].

    The real scheme is not public; this one is reversible, looks alike (standard base64 with
    + / =) and so trips clients that forget to URL-decode it from a redirect URL.
    """
    pad = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(_aes_key(key)), modes.ECB()).encryptor()
    data = pad.update(code.encode()) + pad.finalize()
    return base64.b64encode(enc.update(data) + enc.finalize()).decode()


def decrypt_code(key: str, encrypted: str) -> str | None:
    try:
        raw = base64.b64decode(encrypted, validate=True)
        dec = Cipher(algorithms.AES(_aes_key(key)), modes.ECB()).decryptor()
        unpad = padding.PKCS7(128).unpadder()
        return (unpad.update(dec.update(raw) + dec.finalize()) + unpad.finalize()).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def _aes_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()[:16]


@dataclass
class _Token:
    appid: str
    expires: float
    stable: bool = False  # from cgi-bin/stable_token (isolated from cgi-bin/token's)
    superseded: float | None = None  # when a newer token replaced it (its grace starts)
    revoked: bool = False


class SimState:
    def __init__(self, raw_seed: Any, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._raw = raw_seed
        self._offset = 0.0
        self._seq = 0
        self._load()  # raises SeedError: a bad seed never starts a server

    def now(self) -> float:
        return self._clock() + self._offset

    def _load(self) -> None:
        self._offset = 0.0
        self.seed = seedmod.parse(self._raw, self.now())
        self.loaded_at = int(self.now())
        self.codes: dict[str, Code] = {c.code: copy.copy(c) for c in self.seed.codes}
        self.consumes: Counter[str] = Counter()  # committed consumes per code: exactly-once proof
        self.attempts: Counter[str] = Counter()  # consume calls that reached a code
        # committed updateuser changes per code: [{at, add_bonus, result_bonus, record_bonus...}]
        self.bonus_log: dict[str, list[dict[str, Any]]] = {}
        self.tokens: dict[str, _Token] = {}
        self._stable: dict[str, str] = {}  # appid -> its current stable token
        self._stable_prev: dict[str, str] = {}  # appid -> the token the last force replaced
        self._last_force: dict[str, float] = {}  # appid -> time of its last force refresh
        self._minute: dict[str, tuple[int, int]] = {}  # appid -> (minute, stable_token calls)
        self.token_refusals: Counter[int] = Counter()  # 40001/42001 answers: tills fighting
        self.requests: Counter[str] = Counter()
        self.dropped = 0
        self._quota: dict[tuple[str, str], tuple[int, int]] = {}  # (appid, path) -> (day, used)
        self._set_faults(copy.deepcopy(self.seed.faults))

    def _set_faults(self, faults: Faults) -> None:
        self.faults = faults
        # separate streams so turning on jitter does not move the busy draws
        self._rng_latency = random.Random(f"{faults.rng_seed}/latency")
        self._rng_busy = random.Random(f"{faults.rng_seed}/busy")

    # --- the API ---------------------------------------------------------------------------

    def delay_for(self, path: str) -> float:
        """Seconds of injected latency for this request (0 for admin and unknown paths)."""
        with self._lock:
            f = self.faults
            if path.strip("/") not in API_PATHS or not (f.latency_ms or f.jitter_ms):
                return 0.0
            jitter = self._rng_latency.uniform(-f.jitter_ms, f.jitter_ms) if f.jitter_ms else 0.0
            return max(0.0, f.latency_ms + jitter) / 1000

    def api(self, method: str, path: str, query: dict[str, str], body: bytes) -> Reply:
        name = path.strip("/")
        with self._lock:
            if name not in API_PATHS:
                self.requests["(unknown)"] += 1
                return self._err(40066)  # HTTP 200, as the platform answers an unknown URL
            self.requests[name] += 1
            scripted = self._scripted(name)
            if scripted is not None:
                return scripted
            if method != API_PATHS[name]:
                return self._err(43001 if API_PATHS[name] == "GET" else 43002)
            if self.faults.busy_rate and self._rng_busy.random() < self.faults.busy_rate:
                return self._err(-1)
            if name == "cgi-bin/token":
                return self._token(query)
            if name == "cgi-bin/stable_token":
                return self._stable_token(body)
            appid = self._auth(query.get("access_token", ""))
            if isinstance(appid, Reply):
                return appid
            if self._over_quota(appid, name):
                return self._err(45009)
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return self._err(47001)
            if not isinstance(req, dict):
                return self._err(47001)
            if name in TICKET_UPDATES:
                return self._ticket_update(appid, req, TICKET_UPDATES[name])
            handler = {"card/code/get": self._code_get, "card/code/consume": self._consume,
                       "card/code/decrypt": self._decrypt, "card/get": self._card_get,
                       "card/code/unavailable": self._unavailable,
                       "card/membercard/userinfo/get": self._userinfo,
                       "card/membercard/updateuser": self._updateuser}[name]
            return handler(appid, req)

    def _err(self, errcode: int) -> Reply:
        msg = ERRMSG[errcode]
        if self.seed.behaviour.errmsg_rid:
            # real replies end with a request id; clients must not match errmsg exactly
            self._seq += 1
            msg += f" rid: {int(self.now()) & 0xFFFFFFFF:08x}-{os.getpid():08x}-{self._seq:08x}"
        return _reply({"errcode": errcode, "errmsg": msg})

    def _scripted(self, name: str) -> Reply | None:
        for s in self.faults.script:
            if s.path == name and s.count != 0:
                if s.count > 0:
                    s.count -= 1
                ctype = JSON_TYPE if s.body.lstrip().startswith("{") else "text/plain"
                return Reply(status=s.status, body=s.body.encode(), content_type=ctype)
        return None

    def _token(self, q: dict[str, str]) -> Reply:
        if q.get("grant_type") != "client_credential":
            return self._err(40002)
        if not q.get("appid"):
            return self._err(41002)
        if not q.get("secret"):
            return self._err(41004)
        app = self.seed.apps.get(q["appid"])
        if app is None:
            return self._err(40013)
        if not hmac.compare_digest(q["secret"].encode(), app.secret.encode()):
            return self._err(40125)
        if self._over_quota(app.appid, "cgi-bin/token", app.token_daily_quota):
            return self._err(45009)
        now, b = self.now(), self.seed.behaviour
        for t in self.tokens.values():
            if t.appid == app.appid and not t.stable and t.superseded is None:
                t.superseded = now  # still valid for grace_seconds, as the real one is
        value = self._issue(app.appid, stable=False)
        return _reply({"access_token": value, "expires_in": b.expires_in})

    def _issue(self, appid: str, *, stable: bool) -> str:
        now = self.now()
        for value, t in list(self.tokens.items()):
            if now > t.expires + DAY:
                del self.tokens[value]  # long dead: from now on it reads as unknown (40001)
        value = secrets.token_urlsafe(102)
        self.tokens[value] = _Token(appid=appid, expires=now + self.seed.behaviour.expires_in,
                                    stable=stable)
        return value

    def _stable_token(self, body: bytes) -> Reply:
        """POST cgi-bin/stable_token {grant_type, appid, secret, force_refresh?}."""
        try:
            req = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return self._err(47001)
        force = req.get("force_refresh", False) if isinstance(req, dict) else None
        if not isinstance(req, dict) or not isinstance(force, bool) or any(
                not isinstance(req.get(k, ""), str) for k in ("grant_type", "appid", "secret")):
            return self._err(47001)
        if req.get("grant_type") != "client_credential":
            return self._err(40002)
        if not req.get("appid"):
            return self._err(41002)
        if not req.get("secret"):
            return self._err(41004)
        app = self.seed.apps.get(req["appid"])
        if app is None:
            return self._err(40013)
        if not hmac.compare_digest(req["secret"].encode(), app.secret.encode()):
            return self._err(40125)
        now, grace = self.now(), self.seed.behaviour.grace_seconds
        minute, calls = self._minute.get(app.appid, (int(now // 60), 0))
        calls = calls if minute == int(now // 60) else 0
        if calls >= STABLE_PER_MINUTE:
            return self._err(45011)
        self._minute[app.appid] = (int(now // 60), calls + 1)
        if self._over_quota(app.appid, "cgi-bin/stable_token", app.stable_token_daily_quota):
            return self._err(45009)
        if force and self._over_quota(app.appid, "stable_token/force",
                                      app.force_refresh_daily_quota):
            return self._err(45009)
        current = self.tokens.get(self._stable.get(app.appid, ""))
        last = self._last_force.get(app.appid)
        if current is not None and force and (last is None or now - last >= FORCE_INTERVAL_S):
            old = self.tokens.get(self._stable_prev.pop(app.appid, ""))
            if old is not None:
                old.revoked = True  # the token the previous force replaced dies now
            current.superseded = now  # works for the grace, or until the next force
            self._stable_prev[app.appid] = self._stable[app.appid]
            self._last_force[app.appid] = now
            current = None
        elif force and current is None:
            self._last_force[app.appid] = now
        if current is None or now >= current.expires - grace:
            self._stable[app.appid] = self._issue(app.appid, stable=True)  # old one lives on
            current = self.tokens[self._stable[app.appid]]
        return _reply({"access_token": self._stable[app.appid],
                       "expires_in": int(current.expires - now)})

    def _auth(self, token: str) -> str | Reply:
        if not token:
            return self._err(41001)
        t = self.tokens.get(token)
        err = 40001 if t is None else self._token_error(t, self.now())
        if err:
            self.token_refusals[err] += 1
            return self._err(err)
        return t.appid  # type: ignore[union-attr]

    def _token_error(self, t: _Token, now: float) -> int | None:
        if t.revoked:
            return 40001
        if now >= t.expires:
            return 42001
        if t.superseded is not None and now >= t.superseded + self.seed.behaviour.grace_seconds:
            return 40001  # "not latest": a newer token replaced it and the grace is over
        return None

    def _over_quota(self, appid: str, name: str, limit: int | None = None) -> bool:
        """Count one call against the daily quota; True (not counted) if it is used up."""
        exhausted = self.faults.quota_exhausted
        if "*" in exhausted or name in exhausted:
            return True
        if limit is None:
            limit = self.seed.apps[appid].api_daily_quota
        day = int((self.now() + BEIJING) // DAY)
        seen_day, used = self._quota.get((appid, name), (day, 0))
        used = used if seen_day == day else 0
        if limit is not None and used >= limit:
            return True
        self._quota[(appid, name)] = (day, used + 1)
        return False

    # --- card/code/* and card/get ----------------------------------------------------------

    def window(self, code: Code, card: Card) -> tuple[int, int]:
        """The code's usable [begin, end]: the card's range, or (FIX_TERM) the code's own:
        received + terms, or the begin_time/end_time the seed gave the code."""
        if card.date_type == FIX_RANGE:
            assert card.begin is not None and card.end is not None
            return card.begin, card.end
        begin = code.received_at + card.fixed_begin_term * DAY
        end = begin + card.fixed_term * DAY - 1
        if card.end is not None:
            end = min(end, card.end)
        return (begin if code.begin_time is None else code.begin_time,
                end if code.end_time is None else code.end_time)

    def status(self, code: Code, card: Card) -> str:
        """user_card_status: the stored state, or EXPIRE once a usable code's window ended."""
        if code.state in CONSUMABLE and self.now() > self.window(code, card)[1]:
            return "EXPIRE"
        return code.state

    def _find(self, appid: str, req: dict[str, Any]) -> tuple[Code, Card] | Reply:
        value, card_id = req.get("code"), req.get("card_id")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not isinstance(card_id, str | None):
            return self._err(47001)
        if not value:
            return self._err(41013)
        code = self.codes.get(value)
        if code is None or self.seed.cards[code.card_id].appid != appid:
            return self._err(40056)
        card = self.seed.cards[code.card_id]
        if card.use_custom_code and not card_id:
            return self._err(41012)  # custom codes are only unique within their card
        if card_id and card_id != code.card_id:
            return self._err(40056)
        return code, card

    def _code_get(self, appid: str, req: dict[str, Any]) -> Reply:
        found = self._find(appid, req)
        if isinstance(found, Reply):
            return found
        code, card = found
        check = req.get("check_consume", True)
        if not isinstance(check, bool):
            return self._err(47001)
        b, status = self.seed.behaviour, self.status(code, card)
        if check and status not in CONSUMABLE:
            if status == "CONSUMED" and b.consumed_check_40099:
                return self._err(40099)
            if status == "GIFT_SUCC":
                return self._err(40056)  # the code now belongs to the friend who took it
            if status != "CONSUMED" and b.abnormal_check_40127:
                return self._err(40127)
        begin, end = self.window(code, card)
        in_window = begin <= self.now() <= end
        out: dict[str, Any] = {
            "errcode": 0, "errmsg": "ok",
            "card": {"card_id": card.card_id, "begin_time": begin, "end_time": end,
                     "code": code.code},
            "openid": code.openid,
            # by default can_consume ignores the date window: clients must check it themselves
            "can_consume": status in CONSUMABLE and (in_window or not b.can_consume_checks_window),
            "user_card_status": status,
        }
        if code.outer_str is not None:
            out["outer_str"] = code.outer_str
        if card.card_type in seedmod.TICKET_FIELDS:
            out[card.card_type.lower()] = dict(code.ticket or {})  # see the module rules
        return _reply(out)

    def _consume(self, appid: str, req: dict[str, Any]) -> Reply:
        found = self._find(appid, req)
        if isinstance(found, Reply):
            return found
        code, card = found
        self.attempts[code.code] += 1
        if card.card_type == "MEMBER_CARD":
            return self._err(40071)  # a member card is identified, never consumed
        status = self.status(code, card)
        if status == "CONSUMED":
            return self._err(40099)
        if status == "GIFT_SUCC":
            return self._err(40056)
        if status not in CONSUMABLE:
            return self._err(40127)  # deleted, gifting, unavailable or expired
        if self.now() < self.window(code, card)[0]:
            return self._err(40079)  # not valid yet
        code.state = "CONSUMED"
        self.consumes[code.code] += 1
        reply = _reply({"errcode": 0, "errmsg": "ok", "card": {"card_id": card.card_id},
                        "openid": code.openid})
        return self._maybe_drop(code.code, reply)

    def _maybe_drop(self, value: str, reply: Reply) -> Reply:
        """The consume is committed; maybe lose its reply, as a network or gateway can."""
        d = self.faults.drop_after_commit
        if d is None or d.count == 0 or (d.codes and value not in d.codes):
            return reply
        if d.count > 0:
            d.count -= 1
        self.dropped += 1
        delay = d.delay_ms / 1000
        if d.mode == "close":
            return Reply(drop="close", delay=delay)
        if d.mode == "http500":
            return Reply(status=500, body=b"<html><body>500 Internal Server Error</body></html>",
                         content_type="text/html", delay=delay)
        busy = self._err(-1)
        busy.delay = delay
        return busy

    # --- member cards and tickets -----------------------------------------------------------

    def _member(self, appid: str, req: dict[str, Any]) -> tuple[Code, Card] | Reply:
        if not req.get("card_id"):
            return self._err(41012)  # documented as required for the membercard APIs
        found = self._find(appid, req)
        if isinstance(found, Reply):
            return found
        if found[1].card_type != "MEMBER_CARD":
            return self._err(40071)
        return found

    def _userinfo(self, appid: str, req: dict[str, Any]) -> Reply:
        """card/membercard/userinfo/get {card_id, code}: the member's points and balance."""
        found = self._member(appid, req)
        if isinstance(found, Reply):
            return found
        code, card = found
        return _reply({"errcode": 0, "errmsg": "ok", "openid": code.openid, "nickname": "",
                       "membership_number": code.membership_number or code.code,
                       "bonus": code.bonus, "balance": code.balance, "sex": "",
                       "user_info": {"common_field_list": [], "custom_field_list": []},
                       "user_card_status": self.status(code, card)})

    def _updateuser(self, appid: str, req: dict[str, Any]) -> Reply:
        """card/membercard/updateuser: set or add points and balance; not idempotent."""
        found = self._member(appid, req)
        if isinstance(found, Reply):
            return found
        code, card = found
        nums = {k: req[k] for k in ("bonus", "add_bonus", "balance", "add_balance")
                if req.get(k) is not None}
        if any(not isinstance(v, int) or isinstance(v, bool) for v in nums.values()) or any(
                not isinstance(req.get(k, ""), str) for k in ("record_bonus", "record_balance")):
            return self._err(47001)
        if self.status(code, card) not in CONSUMABLE:
            return self._err(40127)
        bonus = nums.get("bonus", code.bonus + nums.get("add_bonus", 0))
        balance = nums.get("balance", code.balance + nums.get("add_balance", 0))
        if bonus < 0 or balance < 0:
            return self._err(47001)  # the real errcode is not documented (inferred)
        code.bonus, code.balance = bonus, balance
        if nums:
            self.bonus_log.setdefault(code.code, []).append(
                {"at": self.now(), **nums, "record_bonus": req.get("record_bonus", ""),
                 "result_bonus": bonus, "result_balance": balance})
        reply = _reply({"errcode": 0, "errmsg": "ok", "result_bonus": bonus,
                        "result_balance": balance, "openid": code.openid})
        return self._maybe_drop(code.code, reply)

    def _ticket_update(self, appid: str, req: dict[str, Any], card_type: str) -> Reply:
        """The ticket update APIs: a code's seat, show time, passenger... (TICKET_FIELDS)."""
        found = self._find(appid, req)
        if isinstance(found, Reply):
            return found
        code, card = found
        if card.card_type != card_type:
            return self._err(40071)
        fields = {k: v for k, v in req.items() if k in seedmod.TICKET_FIELDS[card_type]}
        try:
            ticket = seedmod.ticket_entry(fields, card_type, "ticket", self.now())
        except SeedError:
            return self._err(47001)
        code.ticket = {**(code.ticket or {}), **ticket}
        return _reply({"errcode": 0, "errmsg": "ok"})

    def _unavailable(self, appid: str, req: dict[str, Any]) -> Reply:
        """card/code/unavailable {code, card_id?, reason?}: the code can never be used again."""
        if not isinstance(req.get("reason", ""), str):
            return self._err(47001)
        found = self._find(appid, req)
        if isinstance(found, Reply):
            return found
        code, card = found
        status = self.status(code, card)
        if status == "CONSUMED":
            return self._err(40099)
        if status not in CONSUMABLE and status != "GIFT_TIMEOUT":
            return self._err(40127)
        code.state = "UNAVAILABLE"
        return _reply({"errcode": 0, "errmsg": "ok"})

    def _decrypt(self, appid: str, req: dict[str, Any]) -> Reply:
        encrypted = req.get("encrypt_code")
        if not isinstance(encrypted, str) or not encrypted:
            return self._err(41011)
        value = next((c.code for c in self.codes.values() if c.encrypt_code == encrypted), None)
        if value is None:
            value = decrypt_code(self.seed.behaviour.encrypt_key, encrypted)
        code = self.codes.get(value or "")
        if code is None or self.seed.cards[code.card_id].appid != appid:
            return self._err(40075)
        return _reply({"errcode": 0, "errmsg": "ok", "code": code.code})

    def _card_get(self, appid: str, req: dict[str, Any]) -> Reply:
        card_id = req.get("card_id")
        if not isinstance(card_id, str | None):
            return self._err(47001)
        if not card_id:
            return self._err(41012)
        card = self.seed.cards.get(card_id)
        if card is None or card.appid != appid:
            return self._err(40073)
        return _reply({"errcode": 0, "errmsg": "ok", "card": self.render(card)})

    def render(self, card: Card) -> dict[str, Any]:
        """card/get's `card`: {card_type, <type lower-cased>: {base_info, value fields}}."""
        if card.date_type == FIX_RANGE:
            date_info: dict[str, Any] = {"type": card.date_type, "begin_timestamp": card.begin,
                                         "end_timestamp": card.end}
        else:
            date_info = {"type": card.date_type, "fixed_term": card.fixed_term,
                         "fixed_begin_term": card.fixed_begin_term}
            if card.end is not None:
                date_info["end_timestamp"] = card.end
        base: dict[str, Any] = {
            "id": card.card_id, "title": card.title, "brand_name": card.brand_name,
            "code_type": "CODE_TYPE_QRCODE", "color": "Color010", "notice": "", "description": "",
            "date_info": date_info,
            "sku": {"quantity": card.quantity, "total_quantity": card.quantity},
            "location_id_list": card.location_id_list,
            "use_all_locations": not card.location_id_list,
            "use_custom_code": card.use_custom_code, "status": "CARD_STATUS_VERIFY_OK",
            "create_time": self.loaded_at, "update_time": self.loaded_at,
        }
        if card.sub_merchant_id is not None:
            base["sub_merchant_info"] = {"merchant_id": card.sub_merchant_id}
        base.update(card.base_info)
        values = {k: v for k, v in card.values.items() if v is not None}  # optional, unset
        return {"card_type": card.card_type,
                card.card_type.lower(): {"base_info": base, **values}}

    # --- admin (/_sim/...) ---------------------------------------------------------------

    def admin(self, method: str, path: str, body: bytes) -> Reply:
        allowed = ADMIN_PATHS.get(path)
        if allowed is None:
            return _reply({"error": f"no admin endpoint {path}; there are {ADMIN_PATHS}"}, 404)
        if method not in allowed.split():
            return _reply({"error": f"{path} takes {allowed}, not {method}"}, 405)
        try:
            req = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            return _reply({"error": f"body is not JSON: {e}"}, 400)
        if not isinstance(req, dict):
            return _reply({"error": "body must be a JSON object"}, 400)
        with self._lock:
            try:
                return _reply(self._admin(method, path, req))
            except SeedError as e:
                return _reply({"error": str(e)}, 400)

    def _admin(self, method: str, path: str, req: dict[str, Any]) -> dict[str, Any]:
        if path == "/_sim/faults" and method == "POST":
            self._set_faults(seedmod.faults(req, self.faults))
        elif path == "/_sim/reset":
            old = self._raw
            self._raw = req.get("seed", old)
            try:
                self._load()
            except SeedError:
                self._raw = old
                raise
        elif path == "/_sim/clock":
            if set(req) - {"advance", "set"} or len(req) != 1:
                raise SeedError('give {"advance": seconds} or {"set": unix_seconds}')
            key, value = next(iter(req.items()))
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise SeedError(f"clock.{key}: expected a number of seconds")
            self._offset = self._offset + value if key == "advance" else value - self._clock()
        elif path == "/_sim/tokens/invalidate":
            appid = req.get("appid")
            for t in self.tokens.values():
                if appid is None or t.appid == appid:
                    t.revoked = True
        elif path == "/_sim/codes":
            self._upsert_code(req)
        return self._snapshot()

    def _upsert_code(self, req: dict[str, Any]) -> None:
        value = req.get("code")
        old = self.codes.get(value) if isinstance(value, str) else None
        merged = dataclasses.asdict(old) if old else {}
        merged.update(req)
        code = seedmod.code_entry(merged, "codes", self.seed.cards, self.now(), len(self.codes))
        self.codes[code.code] = code

    def snapshot(self) -> dict[str, Any]:
        """GET /_sim/state: no secrets or tokens, but everything a test needs to prove a point."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        now = self.now()
        key = self.seed.behaviour.encrypt_key
        valid = Counter(t.appid for t in self.tokens.values() if self._token_error(t, now) is None)
        day = int((now + BEIJING) // DAY)
        return {
            "now": now,
            "clock_offset": self._offset,
            "apps": {a: {"valid_tokens": valid[a],
                         "token_requests_today": self._used(a, "cgi-bin/token", day),
                         "token_daily_quota": app.token_daily_quota,
                         "stable_token_requests_today": self._used(a, "cgi-bin/stable_token",
                                                                   day),
                         "force_refreshes_today": self._used(a, "stable_token/force", day)}
                     for a, app in self.seed.apps.items()},
            # API calls refused for their token: 40001 (replaced, revoked), 42001 (expired)
            "token_refusals": {str(k): n for k, n in sorted(self.token_refusals.items())},
            "codes": {c.code: {"card_id": c.card_id, "state": c.state,
                               "user_card_status": self.status(c, self.seed.cards[c.card_id]),
                               "openid": c.openid, "consume_count": self.consumes[c.code],
                               "consume_attempts": self.attempts[c.code],
                               "encrypt_code": c.encrypt_code or encrypt_code(key, c.code),
                               **self._member_state(c)}
                      for c in self.codes.values()},
            "requests": dict(self.requests),
            "dropped_replies": self.dropped,
            "faults": dataclasses.asdict(self.faults),
        }

    def _member_state(self, c: Code) -> dict[str, Any]:
        if self.seed.cards[c.card_id].card_type != "MEMBER_CARD":
            return {"ticket": c.ticket} if c.ticket is not None else {}
        log = self.bonus_log.get(c.code, [])
        return {"bonus": c.bonus, "balance": c.balance, "bonus_updates": len(log),
                "bonus_records": [e["record_bonus"] for e in log]}

    def _used(self, appid: str, name: str, day: int) -> int:
        seen_day, used = self._quota.get((appid, name), (day, 0))
        return used if seen_day == day else 0
