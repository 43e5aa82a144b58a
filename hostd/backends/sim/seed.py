"""The seed file of `hexiao sim wechat`: read it, check it, and resolve its times.

A seed is one JSON object (see `seed.example.json`, which documents every key). Every
error names the key that is wrong and says what was expected, e.g.
`cards[2].reduce_cost: expected an integer (fen, 1 yuan = 100) >= 0, got "20"`.
Keys starting with `_` or `$` are comments and are ignored at any level.

Times are Unix seconds or strings relative to the simulator's clock when the seed is (re)loaded:
`"now"`, `"+30d"`, `"-2h"`, `"+90m"`, `"-15s"` — so a seed stays valid whatever day it runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("NORMAL", "CONSUMED", "EXPIRE", "GIFTING", "GIFT_SUCC", "GIFT_TIMEOUT", "DELETE",
          "UNAVAILABLE")
FIX_RANGE, FIX_TERM = "DATE_TYPE_FIX_TIME_RANGE", "DATE_TYPE_FIX_TERM"
DAY = 86_400
DROP_MODES = ("close", "http500", "busy")

_REQUIRED = object()
# card/get puts these next to base_info, under the lower-cased card type (the real field names)
VALUE_FIELDS: dict[str, dict[str, tuple[type, Any]]] = {
    "CASH": {"least_cost": (int, 0), "reduce_cost": (int, _REQUIRED)},
    "DISCOUNT": {"discount": (int, _REQUIRED)},
    "GIFT": {"gift": (str, _REQUIRED)},
    "GROUPON": {"deal_detail": (str, _REQUIRED)},
    "GENERAL_COUPON": {"default_detail": (str, _REQUIRED)},
    "MEMBER_CARD": {"prerogative": (str, _REQUIRED), "supply_bonus": (bool, False),
                    "supply_balance": (bool, False), "bonus_rule": (dict, None)},
    # tickets (特殊票券): the card's own fields; a code's seat, passenger... are in its `ticket`
    "MOVIE_TICKET": {"detail": (str, _REQUIRED)},
    "SCENIC_TICKET": {"ticket_class": (str, ""), "guide_url": (str, "")},
    "MEETING_TICKET": {"meeting_detail": (str, _REQUIRED), "map_url": (str, "")},
    "BOARDING_PASS": {"from": (str, _REQUIRED), "to": (str, _REQUIRED),
                      "flight": (str, _REQUIRED), "departure_time": (int, _REQUIRED),
                      "landing_time": (int, None), "gate": (str, ""),
                      "boarding_time": (int, None), "air_model": (str, "")},
}
# seed times (Unix seconds or "+2h") among the value fields and a code's ticket fields
TIME_FIELDS = frozenset({"departure_time", "landing_time", "boarding_time", "show_time",
                         "begin_time", "end_time"})
# member_card.bonus_rule's fields (all integers >= 0; money in fen)
BONUS_RULE = ("cost_money_unit", "increase_bonus", "max_increase_bonus", "init_increase_bonus",
              "cost_bonus_unit", "reduce_money", "least_money_to_use_bonus", "max_reduce_bonus")
# a code's own ticket details, by card type: what the issuer sets with card/movieticket/
# updateuser, card/meetingticket/updateuser and card/boardingpass/checkin (int: a number)
TICKET_FIELDS: dict[str, dict[str, type]] = {
    "MOVIE_TICKET": {"ticket_class": str, "show_time": int, "duration": int,
                     "screening_room": str, "seat_number": str},
    "MEETING_TICKET": {"begin_time": int, "end_time": int, "zone": str, "entrance": str,
                       "seat_number": str},
    "BOARDING_PASS": {"passenger_name": str, "class": str, "etkt_nbr": str, "seat": str},
    "SCENIC_TICKET": {},
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY}
_RELATIVE = re.compile(r"^([+-])(\d+)([smhd])$")


class SeedError(ValueError):
    """The seed is not usable; the message names the key and what was expected."""


@dataclass(frozen=True)
class App:
    appid: str
    secret: str
    token_daily_quota: int
    api_daily_quota: int | None
    stable_token_daily_quota: int = 500_000
    force_refresh_daily_quota: int = 20


@dataclass(frozen=True)
class Card:
    card_id: str
    appid: str
    card_type: str
    title: str
    brand_name: str
    values: dict[str, Any]
    date_type: str
    begin: int | None  # FIX_TIME_RANGE window, or the optional overall end of a FIX_TERM card
    end: int | None
    fixed_term: int
    fixed_begin_term: int
    location_id_list: list[int]
    sub_merchant_id: int | None
    use_custom_code: bool
    quantity: int
    base_info: dict[str, Any]


@dataclass
class Code:
    code: str
    card_id: str
    state: str
    openid: str
    encrypt_code: str | None
    received_at: int
    outer_str: str | None
    begin_time: int | None = None  # a FIX_TERM card's code may have its own window
    end_time: int | None = None
    bonus: int = 0  # a member card's points (积分) and balance (fen)
    balance: int = 0
    membership_number: str | None = None
    ticket: dict[str, Any] | None = None  # a ticket's own details (TICKET_FIELDS)


@dataclass(frozen=True)
class Behaviour:
    expires_in: int = 7200
    grace_seconds: int = 300
    consumed_check_40099: bool = True
    abnormal_check_40127: bool = True
    can_consume_checks_window: bool = False
    errmsg_rid: bool = True
    encrypt_key: str = "hexiao-sim"


@dataclass
class Drop:
    mode: str = "close"
    count: int = 1  # -1: every consume
    codes: list[str] = field(default_factory=list)  # empty: any code
    delay_ms: float = 0.0


@dataclass
class Scripted:
    path: str
    count: int = 1
    status: int = 200
    body: str = ""


@dataclass
class Faults:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    busy_rate: float = 0.0
    rng_seed: int = 0
    quota_exhausted: list[str] = field(default_factory=list)
    drop_after_commit: Drop | None = None
    script: list[Scripted] = field(default_factory=list)


@dataclass(frozen=True)
class Seed:
    apps: dict[str, App]
    cards: dict[str, Card]
    codes: list[Code]
    behaviour: Behaviour
    faults: Faults


# --- small typed readers: each names the key on failure ---------------------------------------

def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SeedError(f"{where}: expected a JSON object, got {json.dumps(value)[:40]}")
    return value


def _keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed and not key.startswith(("_", "$")):
            raise SeedError(f"{where}.{key}: unknown key; expected one of {sorted(allowed)}"
                            .replace("(root).", ""))


def _get(obj: dict[str, Any], key: str, kind: type, where: str, default: Any = _REQUIRED,
         *, minimum: float | None = None, maximum: float | None = None, what: str = "") -> Any:
    name = f"{where}.{key}".replace("(root).", "")
    if key not in obj or obj[key] is None:
        if default is _REQUIRED:
            raise SeedError(f"{name}: missing; expected {what or _kind_name(kind)}")
        return default
    value = obj[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        raise SeedError(f"{name}: expected {what or _kind_name(kind)}, got {json.dumps(value)}")
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "an object"}[kind]


def when(value: Any, now: float, where: str) -> int:
    """A seed time: Unix seconds, or "now" / "+30d" / "-2h" relative to `now`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if value == "now":
        return int(now)
    m = _RELATIVE.match(value) if isinstance(value, str) else None
    if not m:
        raise SeedError(f'{where}: expected Unix seconds or "now", "+30d", "-2h", "+90m", "-15s"; '
                        f"got {json.dumps(value)}")
    delta = int(m.group(2)) * _UNITS[m.group(3)]
    return int(now) + (delta if m.group(1) == "+" else -delta)


# --- the parts of a seed ----------------------------------------------------------------------

def _app(raw: Any, where: str) -> App:
    obj = _obj(raw, where)
    _keys(obj, {"appid", "secret", "token_daily_quota", "api_daily_quota",
                "stable_token_daily_quota", "force_refresh_daily_quota"}, where)
    return App(appid=_get(obj, "appid", str, where), secret=_get(obj, "secret", str, where),
               token_daily_quota=_get(obj, "token_daily_quota", int, where, 2000, minimum=0),
               api_daily_quota=_get(obj, "api_daily_quota", int, where, None, minimum=0),
               stable_token_daily_quota=_get(obj, "stable_token_daily_quota", int, where,
                                             500_000, minimum=0),
               force_refresh_daily_quota=_get(obj, "force_refresh_daily_quota", int, where, 20,
                                              minimum=0))


_CARD_KEYS = {"card_id", "appid", "card_type", "title", "brand_name", "date_info",
              "location_id_list", "sub_merchant_id", "use_custom_code", "quantity", "base_info"}


def _card(raw: Any, where: str, apps: dict[str, App], now: float) -> Card:
    obj = _obj(raw, where)
    card_type = _get(obj, "card_type", str, where, what=f"one of {sorted(VALUE_FIELDS)}")
    if card_type not in VALUE_FIELDS:
        raise SeedError(f"{where}.card_type: expected one of {sorted(VALUE_FIELDS)}, "
                        f"got {json.dumps(card_type)} (other card types are not simulated)")
    spec = VALUE_FIELDS[card_type]
    _keys(obj, _CARD_KEYS | set(spec), where)
    values: dict[str, Any] = {}
    for key, (kind, default) in spec.items():
        if key in TIME_FIELDS:
            if obj.get(key) is None and default is _REQUIRED:
                raise SeedError(f"{where}.{key}: missing; expected Unix seconds or \"+2h\"")
            values[key] = None if obj.get(key) is None else when(obj[key], now, f"{where}.{key}")
            continue
        what = {"least_cost": "an integer (fen, 1 yuan = 100) >= 0",
                "reduce_cost": "an integer (fen, 1 yuan = 100) >= 0",
                "discount": "an integer percent off, 1..99 (30 means 30% off)"}.get(key, "")
        values[key] = _get(obj, key, kind, where, default, minimum=0 if kind is int else None,
                           what=what)
    if values.get("bonus_rule") is not None:
        values["bonus_rule"] = _bonus_rule(values["bonus_rule"], f"{where}.bonus_rule")
    if card_type == "DISCOUNT" and not 1 <= values["discount"] <= 99:
        raise SeedError(f"{where}.discount: expected an integer percent off, 1..99, "
                        f"got {values['discount']}")
    appid = _get(obj, "appid", str, where, next(iter(apps)))
    if appid not in apps:
        raise SeedError(f"{where}.appid: {json.dumps(appid)} is not one of the seed's apps "
                        f"{sorted(apps)}")
    date = _obj(obj.get("date_info", {"type": FIX_RANGE, "begin_timestamp": "-1d",
                                      "end_timestamp": "+365d"}), f"{where}.date_info")
    dwhere = f"{where}.date_info"
    _keys(date, {"type", "begin_timestamp", "end_timestamp", "fixed_term", "fixed_begin_term"},
          dwhere)
    date_type = _get(date, "type", str, dwhere, what=f"{FIX_RANGE} or {FIX_TERM}")
    begin = end = None
    fixed_term = fixed_begin_term = 0
    if date_type == FIX_RANGE:
        begin = when(date.get("begin_timestamp"), now, f"{dwhere}.begin_timestamp")
        end = when(date.get("end_timestamp"), now, f"{dwhere}.end_timestamp")
        if end < begin:
            raise SeedError(f"{dwhere}.end_timestamp: expected a time after begin_timestamp")
    elif date_type == FIX_TERM:
        fixed_term = _get(date, "fixed_term", int, dwhere, minimum=1,
                          what="an integer number of days >= 1")
        fixed_begin_term = _get(date, "fixed_begin_term", int, dwhere, 0, minimum=0)
        if "end_timestamp" in date:
            end = when(date["end_timestamp"], now, f"{dwhere}.end_timestamp")
    else:
        raise SeedError(f"{dwhere}.type: expected {FIX_RANGE} or {FIX_TERM}, "
                        f"got {json.dumps(date_type)}")
    locations = _get(obj, "location_id_list", list, where, [])
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in locations):
        raise SeedError(f"{where}.location_id_list: expected a list of integer store (poi) ids")
    return Card(
        card_id=_get(obj, "card_id", str, where), appid=appid, card_type=card_type,
        title=_get(obj, "title", str, where), brand_name=_get(obj, "brand_name", str, where, ""),
        values=values, date_type=date_type, begin=begin, end=end, fixed_term=fixed_term,
        fixed_begin_term=fixed_begin_term, location_id_list=locations,
        sub_merchant_id=_get(obj, "sub_merchant_id", int, where, None),
        use_custom_code=_get(obj, "use_custom_code", bool, where, False),
        quantity=_get(obj, "quantity", int, where, 1000, minimum=0),
        base_info=_get(obj, "base_info", dict, where, {}))


def _bonus_rule(raw: dict[str, Any], where: str) -> dict[str, int]:
    _keys(raw, set(BONUS_RULE), where)
    rule = {k: _get(raw, k, int, where, minimum=0, what="an integer >= 0")
            for k in BONUS_RULE if raw.get(k) is not None}
    if rule.get("cost_money_unit") == 0:
        raise SeedError(f"{where}.cost_money_unit: expected fen per unit >= 1, got 0")
    return rule


def ticket_entry(raw: Any, card_type: str, where: str, now: float) -> dict[str, Any]:
    """A code's `ticket` object (also what the ticket update APIs take), times resolved."""
    obj = _obj(raw, where)
    fields = TICKET_FIELDS[card_type]
    _keys(obj, set(fields), where)
    out: dict[str, Any] = {}
    for key, kind in fields.items():
        if obj.get(key) is None:
            continue
        out[key] = when(obj[key], now, f"{where}.{key}") if key in TIME_FIELDS else \
            _get(obj, key, kind, where, minimum=0 if kind is int else None)
    return out


def code_entry(raw: Any, where: str, cards: dict[str, Card], now: float, index: int) -> Code:
    """One `codes[]` entry (also what POST /_sim/codes takes)."""
    obj = _obj(raw, where)
    _keys(obj, {"code", "card_id", "state", "openid", "encrypt_code", "received_at",
                "outer_str", "begin_time", "end_time", "bonus", "balance",
                "membership_number", "ticket"}, where)
    card_id = _get(obj, "card_id", str, where)
    if card_id not in cards:
        raise SeedError(f"{where}.card_id: {json.dumps(card_id)} is not a card in the seed")
    ctype = cards[card_id].card_type
    # (0 is every code's default: POST /_sim/codes merges a code's current fields back in)
    member = {k: obj[k] for k in ("bonus", "balance", "membership_number")
              if obj.get(k) not in (None, 0)}
    if member and ctype != "MEMBER_CARD":
        raise SeedError(f"{where}.{next(iter(member))}: only a MEMBER_CARD's codes have it; "
                        f"{card_id} is {ctype}")
    ticket = None
    if obj.get("ticket") is not None:
        if ctype not in TICKET_FIELDS:
            raise SeedError(f"{where}.ticket: only ticket codes have one "
                            f"({sorted(TICKET_FIELDS)}); {card_id} is {ctype}")
        ticket = ticket_entry(obj["ticket"], ctype, f"{where}.ticket", now)
    state = _get(obj, "state", str, where, "NORMAL", what=f"one of {list(STATES)}")
    if state not in STATES:
        raise SeedError(f"{where}.state: expected one of {list(STATES)}, got {json.dumps(state)}")
    own = {k: when(obj[k], now, f"{where}.{k}") for k in ("begin_time", "end_time")
           if obj.get(k) is not None}
    if own and cards[card_id].date_type != FIX_TERM:
        raise SeedError(f"{where}.{next(iter(own))}: only codes of a {FIX_TERM} card have "
                        f"their own dates; {card_id} has {cards[card_id].date_type}")
    if own.get("end_time", 1 << 62) < own.get("begin_time", 0):
        raise SeedError(f"{where}.end_time: expected a time after begin_time")
    return Code(code=_get(obj, "code", str, where), card_id=card_id, state=state,
                openid=_get(obj, "openid", str, where, f"oHexiaoSimUser{index:014d}"),
                encrypt_code=_get(obj, "encrypt_code", str, where, None),
                received_at=when(obj.get("received_at", "-1d"), now, f"{where}.received_at"),
                outer_str=_get(obj, "outer_str", str, where, None),
                begin_time=own.get("begin_time"), end_time=own.get("end_time"),
                bonus=_get(obj, "bonus", int, where, 0, minimum=0),
                balance=_get(obj, "balance", int, where, 0, minimum=0),
                membership_number=_get(obj, "membership_number", str, where, None),
                ticket=ticket)


def _behaviour(raw: Any) -> Behaviour:
    obj = _obj(raw, "behaviour")
    d = Behaviour()
    _keys(obj, set(d.__dataclass_fields__), "behaviour")
    return Behaviour(
        expires_in=_get(obj, "expires_in", int, "behaviour", d.expires_in, minimum=1),
        grace_seconds=_get(obj, "grace_seconds", int, "behaviour", d.grace_seconds, minimum=0),
        **{k: _get(obj, k, bool, "behaviour", getattr(d, k))
           for k in ("consumed_check_40099", "abnormal_check_40127", "can_consume_checks_window",
                     "errmsg_rid")},
        encrypt_key=_get(obj, "encrypt_key", str, "behaviour", d.encrypt_key))


def faults(raw: Any, base: Faults | None = None, where: str = "faults") -> Faults:
    """Parse a faults object; keys absent keep `base`'s values (the admin endpoint patches)."""
    obj = _obj(raw, where)
    f = base if base is not None else Faults()
    _keys(obj, set(Faults.__dataclass_fields__), where)
    out = Faults(
        latency_ms=_get(obj, "latency_ms", float, where, f.latency_ms, minimum=0),
        jitter_ms=_get(obj, "jitter_ms", float, where, f.jitter_ms, minimum=0),
        busy_rate=_get(obj, "busy_rate", float, where, f.busy_rate, minimum=0, maximum=1,
                       what="a probability 0..1"),
        rng_seed=_get(obj, "rng_seed", int, where, f.rng_seed),
        quota_exhausted=_get(obj, "quota_exhausted", list, where, list(f.quota_exhausted)),
        drop_after_commit=f.drop_after_commit, script=list(f.script))
    if not all(isinstance(p, str) for p in out.quota_exhausted):
        raise SeedError(f'{where}.quota_exhausted: expected a list of API paths such as '
                        f'"cgi-bin/token", "card/code/consume", or "*" for all')
    if "drop_after_commit" in obj:
        raw_drop = obj["drop_after_commit"]
        out.drop_after_commit = None if raw_drop is None else _drop(raw_drop, where)
    if "script" in obj:
        items = _get(obj, "script", list, where)
        out.script = [_scripted(x, f"{where}.script[{i}]") for i, x in enumerate(items)]
    return out


def _drop(raw: Any, where: str) -> Drop:
    w = f"{where}.drop_after_commit"
    obj = _obj(raw, w)
    _keys(obj, {"mode", "count", "codes", "delay_ms"}, w)
    mode = _get(obj, "mode", str, w, "close", what=f"one of {list(DROP_MODES)}")
    if mode not in DROP_MODES:
        raise SeedError(f"{w}.mode: expected one of {list(DROP_MODES)}, got {json.dumps(mode)}")
    codes = _get(obj, "codes", list, w, [])
    return Drop(mode=mode, count=_get(obj, "count", int, w, 1, minimum=-1,
                                      what="an integer >= 1, or -1 for every consume"),
                codes=[str(c) for c in codes],
                delay_ms=_get(obj, "delay_ms", float, w, 0.0, minimum=0))


def _scripted(raw: Any, where: str) -> Scripted:
    obj = _obj(raw, where)
    _keys(obj, {"path", "count", "status", "json", "body"}, where)
    if ("json" in obj) == ("body" in obj):
        raise SeedError(f"{where}: give exactly one of json (an object to send) or body (raw text)")
    body = json.dumps(obj["json"], ensure_ascii=False) if "json" in obj else obj["body"]
    if not isinstance(body, str):
        raise SeedError(f"{where}.body: expected a string")
    return Scripted(path=_get(obj, "path", str, where).strip("/"),
                    count=_get(obj, "count", int, where, 1, minimum=-1),
                    status=_get(obj, "status", int, where, 200, minimum=100, maximum=599),
                    body=body)


def parse(raw: Any, now: float) -> Seed:
    """Check a seed (already JSON-decoded) and resolve its relative times against `now`."""
    obj = _obj(raw, "(root)")
    _keys(obj, {"apps", "cards", "codes", "behaviour", "faults"}, "(root)")
    raw_apps = _get(obj, "apps", list, "(root)", what="a non-empty list of {appid, secret}")
    if not raw_apps:
        raise SeedError("apps: expected a non-empty list of {appid, secret}")
    apps: dict[str, App] = {}
    for i, item in enumerate(raw_apps):
        app = _app(item, f"apps[{i}]")
        if app.appid in apps:
            raise SeedError(f"apps[{i}].appid: {app.appid} appears twice")
        apps[app.appid] = app
    cards: dict[str, Card] = {}
    for i, item in enumerate(_get(obj, "cards", list, "(root)", [])):
        card = _card(item, f"cards[{i}]", apps, now)
        if card.card_id in cards:
            raise SeedError(f"cards[{i}].card_id: {card.card_id} appears twice")
        cards[card.card_id] = card
    codes: list[Code] = []
    seen: set[str] = set()
    for i, item in enumerate(_get(obj, "codes", list, "(root)", [])):
        code = code_entry(item, f"codes[{i}]", cards, now, i)
        if code.code in seen:
            raise SeedError(f"codes[{i}].code: {code.code} appears twice")
        seen.add(code.code)
        codes.append(code)
    return Seed(apps=apps, cards=cards, codes=codes,
                behaviour=_behaviour(obj.get("behaviour", {})),
                faults=faults(obj.get("faults", {})))


def read(path: Path) -> Any:
    """The JSON of a seed file; SeedError (with the file name) if it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SeedError(f"{path}: cannot read ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SeedError(f"{path}: not valid JSON ({e})") from e


EXAMPLE = Path(__file__).with_name("seed.example.json")
