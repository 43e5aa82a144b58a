"""How each config key is checked, and how one raw TOML table becomes its dataclass.

Rules this module keeps:
- A checker takes a raw value and returns the converted value, or raises _Bad("what was
  expected"); the caller adds the key and the value: `dotted.key: expected WHAT, got VALUE`.
- _SCHEMA names every key of every table, so unknown keys are errors (with a "did you mean"
  when one is close) and hostd.example.toml can be tested to document them all.
- An inline secret (`secret`, `key`, `apiv3_key`, `private_key`) is refused with the name of
  the *_file key to use instead.
- Problems are collected in a _Ctx, never raised one at a time; relative paths are made relative
  to the config file's folder.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hexiao.hostd.config.types import (
    ACTIONS,
    BASE_URLS,
    Backend,
    Device,
    DeviceSettings,
    Fleet,
    Hostd,
    Keystore,
    Lane,
    Macro,
    Tap,
    UsbMatch,
    kid_bytes,
)


class _Bad(Exception):
    """A checker's verdict: what was expected (the caller adds the key and the value)."""


Check = Callable[[Any], Any]


# ---- checkers: value -> converted value, or raise _Bad("what was expected") -----------------

def _str(what: str = "a string", pattern: str | None = None, empty: bool = True) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str) or (not empty and not v) or (
                pattern and v and not re.fullmatch(pattern, v)):
            raise _Bad(what)
        return v
    return check


def _number(lo: float, what: str, strict: bool = True) -> Check:
    def check(v: Any) -> float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < lo or (strict and v == lo):
            raise _Bad(what)
        return float(v)
    return check


def _int(lo: int, hi: int, what: str | None = None) -> Check:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _Bad(what or f"an integer {lo}..{hi}")
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _choice(*options: str) -> Check:
    def check(v: Any) -> str:
        if v not in options:
            raise _Bad("one of " + ", ".join(json.dumps(o) for o in options))
        return v
    return check


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _Bad("an array of non-empty strings")
    return tuple(v)


def _path(v: Any) -> Path:
    if not isinstance(v, str) or not v:
        raise _Bad("a file or folder path")
    return Path(v)


_url = _str('an http(s) URL, e.g. "https://api.weixin.qq.com"', r"https?://\S+")
_addr = _str('HOST:PORT, e.g. "127.0.0.1:9100"', r"(\[[0-9a-fA-F:]+\]|[^\s:\[\]]+):\d{1,5}")
_seconds = _number(0, "a number of seconds > 0")
_seconds0 = _number(0, "a number of seconds >= 0", strict=False)

# verdict fields a macro text may use ({reduce_cost_yuan} is reduce_cost in yuan, "12.50")
MACRO_FIELDS = frozenset({"card_id", "title", "code_tail", "reduce_cost", "least_cost",
                          "reduce_cost_yuan", "least_cost_yuan", "discount", "gift"})
# inline secrets refused, and the key that should be used instead
_INLINE = {"secret": "secret_file", "key": "key_file", "apiv3_key": "apiv3_key_file",
           "private_key": "private_key_file"}


def _tap_listen(v: Any) -> str:
    from hexiao.hostd.tap.service import LISTEN_FORMS, parse_listen

    try:
        parse_listen(v if isinstance(v, str) else "")
    except ValueError:
        raise _Bad(LISTEN_FORMS) from None
    return str(v)


def _tap_printer(v: Any) -> str:
    from hexiao.hostd.tap.printer import parse_target

    what = "tcp:HOST:PORT, file:PATH, serial:DEVICE[@BAUD] or usb:VID:PID[:SERIAL]"
    if v == "":
        return v  # no printer: fine while the tap is off (config/__init__ checks it when on)
    if not isinstance(v, str) or not v.startswith(("tcp:", "file:", "serial:", "usb:")):
        raise _Bad(what)
    try:
        parse_target(v)
    except ValueError as e:
        # pyusb missing is the machine's problem, not the file's: the tap says so at start
        if "pyusb" not in str(e):
            raise _Bad(f"{what} ({e})") from None
    return v


def _kid(v: Any) -> str:
    raw = kid_bytes(v) if isinstance(v, str) else None
    if not raw or len(raw) > 16:
        raise _Bad('a device id of 1..16 bytes: text, or "hex:" and hex digits')
    return v


def _rules(v: Any) -> tuple[dict[str, Any], ...]:
    """Classifier rules (SPEC §6.7) in the rules message's wire form."""
    what = ("1..8 rules, each {action = product|coupon|ignore, symbologies = [...] (<= 4 AIM "
            "ids like \"]Q1\"), min_len, max_len (0..65535), prefix (text), check (bool)}")
    if not isinstance(v, list) or not 1 <= len(v) <= 8 or not all(isinstance(r, dict) for r in v):
        raise _Bad(what)
    out = []
    for r in v:
        if r.get("action") not in ACTIONS or set(r) - {"action", "symbologies", "min_len",
                                                        "max_len", "prefix", "check"}:
            raise _Bad(what)
        rule: dict[str, Any] = {"action": ACTIONS.index(r["action"])}
        syms = r.get("symbologies")
        if syms is not None:
            if not (isinstance(syms, list) and len(syms) <= 4 and all(
                    isinstance(x, str) and 1 <= len(x.encode()) <= 4 for x in syms)):
                raise _Bad(what)
            rule["symbologies"] = list(syms)
        for key in ("min_len", "max_len"):
            if key in r:
                rule[key] = _int(0, 65535, what)(r[key])
        if "prefix" in r:
            if not isinstance(r["prefix"], str) or not 1 <= len(r["prefix"].encode()) <= 16:
                raise _Bad(what)
            rule["prefix"] = r["prefix"].encode()
        if "check" in r:
            rule["check"] = int(_bool(r["check"]))
        out.append(rule)
    return tuple(out)


def _macro_fields(text: str) -> None:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise _Bad(f"a valid template ({e})") from None
    if names - MACRO_FIELDS:
        raise _Bad("templates over " + ", ".join(sorted(MACRO_FIELDS)))


def _items(v: Any) -> tuple[str | tuple[int, int], ...]:
    what = ("1..16 items, each a text of 1..48 characters or a [keycode, modifiers] pair "
            "of integers 0..255")
    if not isinstance(v, list) or not 1 <= len(v) <= 16:
        raise _Bad(what)
    out: list[str | tuple[int, int]] = []
    for item in v:
        if isinstance(item, str) and 1 <= len(item) <= 48:
            _macro_fields(item)
            out.append(item)
        elif (isinstance(item, list) and len(item) == 2
              and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 255
                      for n in item)):
            out.append((item[0], item[1]))
        else:
            raise _Bad(what)
    return tuple(out)


_POSITIVE = _int(1, 2**63 - 1, "a positive integer")
_HEX4 = (r"[0-9a-fA-F]{4}", '4 hex digits, e.g. "2e8a"')
_FLEET_ID = "1..16 of A-Z a-z 0-9 _ . -"
_LANE_NAME = _str("a lane name (letters, digits, _ . -; up to 32)", r"[\w.-]{1,32}", empty=False)
# how each key is checked; a nested table (device.match) has its class instead of a checker
_SCHEMA: dict[type, dict[str, Check | type]] = {
    Hostd: {"state_dir": _path, "control_socket": _path, "journal": _path,
            "log_level": _choice("debug", "info", "warning", "error"), "metrics_listen": _addr,
            "web_listen": _addr,
            "capture_max_bytes": _int(1 << 16, 1 << 40, "a number of bytes 65536..2**40")},
    Backend: {"kind": _choice(*BASE_URLS), "base_url": _url, "backup_base_url": _url,
              "appid": _str('an appid, e.g. "wx1234567890abcdef"'), "secret_file": _path,
              "token_url": _url, "token_mode": _choice("stable", "token"),
              "timeout_s": _seconds, "deadline_s": _seconds,
              "max_reply_bytes": _int(1024, 64 << 20, "a number of bytes 1024..67108864"),
              "retries": _int(0, 10),
              "backoff_s": _seconds0, "refresh_margin_s": _seconds0, "card_cache_s": _seconds0,
              "settle_after_s": _seconds, "mchid": _str("a merchant id of digits", r"\d+"),
              "merchant_serial_no": _str("a certificate serial number (hex digits)",
                                         r"[0-9A-Fa-f]+"),
              "private_key_file": _path, "apiv3_key_file": _path,
              "platform_public_key_file": _path,
              "platform_public_key_id": _str("the platform public key's id, e.g. "
                                             '"PUB_KEY_ID_0114232134912410000000000000"'),
              "stock_id": _str("a stock id of digits", r"\d+")},
    Keystore: {"path": _path},
    Lane: {"name": _LANE_NAME, "decrypt": _choice("auto", "always", "never"),
           "allowed_card_ids": _str_list, "location_id": _POSITIVE,
           "sub_merchant_id": _POSITIVE, "verify_unknown": _bool,
           "custom_code_card_ids": _str_list, "redeemed_here_s": _seconds0},
    UsbMatch: {"serial": _str("the USB serial number", empty=False),
               "vendor": _str(_HEX4[1], _HEX4[0], False),
               "product": _str(_HEX4[1].replace("2e8a", "000a"), _HEX4[0], False)},
    Device: {"id": _kid, "port": _str("a device path or pyserial URL", empty=False),
             "match": UsbMatch, "lane": _LANE_NAME, "rules": _rules,
             "rules_default": _choice(*ACTIONS), "settings": DeviceSettings},
    DeviceSettings: {"inter_key_ms": _int(0, 1000), "suffix": _choice("enter", "tab", "none"),
                     "offline_ms": _int(200, 30000)},
    Tap: {"enabled": _bool, "listen": _tap_listen, "printer": _tap_printer,
          "profile": _str("a printer profile name or JSON file", empty=False),
          "content": _str(), "caption": _str(), "lane": _LANE_NAME, "key_file": _path,
          "existing_qr": _choice("inject", "skip"), "module": _int(1, 16),
          "align": _choice("left", "center", "right"), "ec": _choice("L", "M", "Q", "H"),
          "idle_timeout_s": _seconds, "connect_timeout_s": _seconds0,
          "stall_timeout_s": _seconds, "printer_timeout_s": _seconds,
          "member_ttl_s": _seconds, "claim_listen": _addr, "claim_max_age_s": _seconds,
          "void_words": _str_list, "void_window_s": _seconds},
    Macro: {"items": _items, "delay_ms": _int(0, 1000)},
    Fleet: {"enabled": _bool,
            "broker": _str('mqtt://HOST[:PORT] or mqtts://HOST[:PORT]', r"mqtts?://[^\s/]+/?"),
            "merchant": _str(_FLEET_ID, r"[A-Za-z0-9_.-]{1,16}"),
            "store": _str(_FLEET_ID, r"[A-Za-z0-9_.-]{1,16}"),
            "topic_prefix": _str("a topic prefix ending in /, without + # or $",
                                 r"[^+#$\s]*/"),
            "key_file": _path, "code_key_file": _path, "username": _str(),
            "password_file": _path, "tls_ca_file": _path, "tls_cert_file": _path,
            "tls_key_file": _path, "keepalive_s": _int(5, 3600),
            "session_expiry_s": _int(0, 2**32 - 1), "window": _int(1, 1000),
            "hq_pubkey_file": _path},
}
_REQUIRED = {Lane: ("name",), Device: ("id",), UsbMatch: ("serial",), Macro: ("items",)}


class _Ctx:
    def __init__(self, path: Path | None) -> None:
        self.prefix = f"config {path}: " if path else "config: "
        self.base = path.parent if path else Path.cwd()
        self.errors: list[str] = []

    def bad(self, where: str, msg: str) -> None:
        self.errors.append(f"{self.prefix}{where}: {msg}")


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a table"
    text = json.dumps(v, ensure_ascii=False, default=str) if isinstance(v, str | list) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else "; known keys: " + ", ".join(names)


def _expected(check: Check | type) -> str:
    if isinstance(check, type):
        return "a table"
    try:
        check(object())
    except _Bad as e:
        return str(e)
    return "a table"


def _section(raw: Any, cls: type, where: str, ctx: _Ctx) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        ctx.bad(where, f"expected a table, got {_show(raw)}")
        return cls()
    schema = _SCHEMA[cls]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        at = f"{where}.{key}"
        check = schema.get(key)
        if check is None and key in _INLINE:
            ctx.bad(at, "secrets do not belong in the config file: put it in a file only "
                        f"hostd's user can read (chmod 600) and set {where}.{_INLINE[key]}")
        elif check is None:
            ctx.bad(at, "unknown key" + _suggest(key, list(schema)))
        elif isinstance(check, type):
            kwargs[key] = _section(value, check, at, ctx)
        else:
            try:
                got = check(value)
            except _Bad as e:
                ctx.bad(at, f"expected {e}, got {_show(value)}")
                continue
            kwargs[key] = got if not isinstance(got, Path) else ctx.base / got
    for name in _REQUIRED.get(cls, ()):
        if name not in raw:
            ctx.bad(f"{where}.{name}", f"required key missing: expected {_expected(schema[name])}")
    return cls(**kwargs)


def _array(raw: Any, cls: type, name: str, ctx: _Ctx) -> list[Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        ctx.bad(name, f"expected an array of tables ([[{name}]]), got {_show(raw)}")
        return None
    return [_section(t, cls, f"{name}[{i}]", ctx) for i, t in enumerate(raw)]
