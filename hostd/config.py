"""hexiao-hostd configuration: one TOML file -> frozen dataclasses, every setting defaulted.

Shape (hostd.example.toml documents every key): [hostd], [backend], [keystore], [[lane]],
[[device]], [tap], [macros.<CARD_TYPE>]. An empty file is a valid config: simulator backend,
one lane "lane-1", no pinned devices, tap off.

Rules this module keeps:
- Every problem is collected and reported together, one line each, as
  `config PATH: dotted.key: expected WHAT, got VALUE`; arrays of tables are indexed from 0
  (`device[1].port`). Unknown keys are errors, with a "did you mean" when one is close.
- Secrets never live in this file: an inline `secret`/`key`/`apiv3_key`/`private_key` is refused;
  the config names a file, and read_secret() refuses one that others can read.
- load() checks shape and values only; files the config names are opened by the parts that use
  them. Relative paths are relative to the config file's folder (systemd runs us in /).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import string
import tomllib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexiao.hostd.keystore import KeystoreError, check_private


class ConfigError(Exception):
    """The config cannot be used; `errors` has one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


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

# ---- the sections ----------------------------------------------------------------------------

BASE_URLS = {"wechat_card": "https://api.weixin.qq.com",
             "wechatpay_busifavor": "https://api.mch.weixin.qq.com", "sim": ""}
CARD_TYPES = ("CASH", "DISCOUNT", "GIFT", "GROUPON", "GENERAL_COUPON", "MEMBER_CARD")
# verdict fields a macro text may use ({reduce_cost_yuan} is reduce_cost in yuan, "12.50")
MACRO_FIELDS = frozenset({"card_id", "title", "code_tail", "reduce_cost", "least_cost",
                          "reduce_cost_yuan", "least_cost_yuan", "discount", "gift"})
# inline secrets refused, and the key that should be used instead
_INLINE = {"secret": "secret_file", "key": "key_file", "apiv3_key": "apiv3_key_file",
           "private_key": "private_key_file"}
_STATE_DIR, _SOCKET = Path("/var/lib/hexiao"), Path("/run/hexiao/hostd.sock")


@dataclass(frozen=True)
class Hostd:
    state_dir: Path = _STATE_DIR
    control_socket: Path = _SOCKET
    journal: Path | None = None      # None in the file: <state_dir>/journal.sqlite3
    log_level: str = "info"
    metrics_listen: str = ""         # "" = no metrics endpoint


@dataclass(frozen=True)
class Backend:
    kind: str = "sim"
    base_url: str = ""               # "" in the file: the kind's default (sim: embedded)
    backup_base_url: str = ""        # wechatpay_busifavor: the backup API domain
    appid: str = ""
    secret_file: Path | None = None
    token_url: str = ""              # a central token service shared by every till
    timeout_s: float = 5.0
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
                "retries": self.retries, "backoff_s": self.backoff_s}

    def card_client_args(self) -> dict[str, Any]:
        """Keyword arguments for wechat_card.WeChatCardClient (reads the secret file)."""
        return {"base_url": self.base_url, "appid": self.appid,
                "secret": read_secret(self.secret_file) if self.secret_file else "",
                "token_url": self.token_url or None, "timeout_s": self.timeout_s,
                "retries": self.retries, "backoff_s": self.backoff_s,
                "refresh_margin_s": self.refresh_margin_s, "card_cache_s": self.card_cache_s}


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

    def engine_config(self) -> Any:
        """This lane as redeem.LaneConfig."""
        from hexiao.hostd.redeem import LaneConfig
        return LaneConfig(self.name, self.decrypt,  # type: ignore[arg-type]
                          frozenset(self.allowed_card_ids) or None, self.location_id,
                          self.sub_merchant_id, self.verify_unknown, self.custom_code_card_ids)


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


def _kid(v: Any) -> str:
    raw = kid_bytes(v) if isinstance(v, str) else None
    if not raw or len(raw) > 16:
        raise _Bad('a device id of 1..16 bytes: text, or "hex:" and hex digits')
    return v


@dataclass(frozen=True)
class DeviceSettings:
    """Pushed to the device (config_set) at every session; absent keys keep its own values."""
    inter_key_ms: int | None = None   # pause between typed keys
    suffix: str | None = None         # after a product: enter | tab | none
    offline_ms: int | None = None     # no verdict this long: the device says "host offline"

    def values(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_ACTIONS = ("product", "coupon", "ignore")  # SPEC §6.7 actions 0, 1, 2


def _rules(v: Any) -> tuple[dict[str, Any], ...]:
    """Classifier rules (SPEC §6.7) in the rules message's wire form."""
    what = ("1..8 rules, each {action = product|coupon|ignore, symbologies = [...] (<= 4 AIM "
            "ids like \"]Q1\"), min_len, max_len (0..65535), prefix (text), check (bool)}")
    if not isinstance(v, list) or not 1 <= len(v) <= 8 or not all(isinstance(r, dict) for r in v):
        raise _Bad(what)
    out = []
    for r in v:
        if r.get("action") not in _ACTIONS or set(r) - {"action", "symbologies", "min_len",
                                                        "max_len", "prefix", "check"}:
            raise _Bad(what)
        rule: dict[str, Any] = {"action": _ACTIONS.index(r["action"])}
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


@dataclass(frozen=True)
class Device:
    id: str = ""
    port: str | None = None           # a device path or pyserial URL, or:
    match: UsbMatch | None = None     # find it by USB serial number (survives replug)
    lane: str = "lane-1"
    rules: tuple[dict[str, Any], ...] = ()  # () = the default rules (hostd/lane.py)
    rules_default: str = "product"    # what a scan no rule matches is
    settings: DeviceSettings | None = None

    def rules_message(self) -> dict[str, Any] | None:
        """The rules message this device gets at every session; None: the default rules."""
        if not self.rules:
            return None
        body = {"default": _ACTIONS.index(self.rules_default), "rules": list(self.rules)}
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


@dataclass(frozen=True)
class Macro:
    items: tuple[str | tuple[int, int], ...] = ()
    delay_ms: int = 20                # POS listeners want <= 50 ms between keys


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

    def lane(self, name: str) -> Lane | None:
        return next((la for la in self.lanes if la.name == name), None)


_POSITIVE = _int(1, 2**63 - 1, "a positive integer")
_HEX4 = (r"[0-9a-fA-F]{4}", '4 hex digits, e.g. "2e8a"')
_LANE_NAME = _str("a lane name (letters, digits, _ . -; up to 32)", r"[\w.-]{1,32}", empty=False)
# how each key is checked; a nested table (device.match) has its class instead of a checker
_SCHEMA: dict[type, dict[str, Check | type]] = {
    Hostd: {"state_dir": _path, "control_socket": _path, "journal": _path,
            "log_level": _choice("debug", "info", "warning", "error"), "metrics_listen": _addr},
    Backend: {"kind": _choice(*BASE_URLS), "base_url": _url, "backup_base_url": _url,
              "appid": _str('an appid, e.g. "wx1234567890abcdef"'), "secret_file": _path,
              "token_url": _url, "timeout_s": _seconds, "retries": _int(0, 10),
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
           "custom_code_card_ids": _str_list},
    UsbMatch: {"serial": _str("the USB serial number", empty=False),
               "vendor": _str(_HEX4[1], _HEX4[0], False),
               "product": _str(_HEX4[1].replace("2e8a", "000a"), _HEX4[0], False)},
    Device: {"id": _kid, "port": _str("a device path or pyserial URL", empty=False),
             "match": UsbMatch, "lane": _LANE_NAME, "rules": _rules,
             "rules_default": _choice(*_ACTIONS), "settings": DeviceSettings},
    DeviceSettings: {"inter_key_ms": _int(0, 1000), "suffix": _choice("enter", "tab", "none"),
                     "offline_ms": _int(200, 30000)},
    Tap: {"enabled": _bool, "listen": _addr,
          "printer": _str("tcp:HOST:PORT, file:PATH or serial:DEVICE[@BAUD]",
                          r"(tcp|file|serial):.+"),
          "profile": _str("a printer profile name or JSON file", empty=False),
          "content": _str(), "caption": _str(), "lane": _LANE_NAME, "key_file": _path,
          "existing_qr": _choice("inject", "skip"), "module": _int(1, 16),
          "align": _choice("left", "center", "right"), "ec": _choice("L", "M", "Q", "H"),
          "idle_timeout_s": _seconds, "connect_timeout_s": _seconds0},
    Macro: {"items": _items, "delay_ms": _int(0, 1000)},
}
_REQUIRED = {Lane: ("name",), Device: ("id",), UsbMatch: ("serial",), Macro: ("items",)}


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


# ---- the loader ----------------------------------------------------------------------------

_SECTIONS = ("hostd", "backend", "keystore", "lane", "device", "tap", "macros")


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


def load(path: str | Path) -> Config:
    """Read and check a config file; ConfigError lists every problem found."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config {path}: no such file (copy hostd.example.toml there and "
                           f"edit it, or give another path)"]) from None
    except OSError as e:
        raise ConfigError([f"config {path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"config {path}: not UTF-8 text (byte {e.start})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(e), re.S)
        where = f"line {m[2]}, column {m[3]}: " if m else ""
        raise ConfigError([f"config {path}: {where}TOML syntax error: "
                           f"{m[1] if m else e}"]) from None
    return from_dict(data, path)


def from_dict(data: Mapping[str, Any], path: Path | None = None) -> Config:
    """Check parsed TOML (a dict) and build the Config; `path` names it in messages."""
    ctx = _Ctx(path)
    for key in data:
        if key not in _SECTIONS:
            ctx.bad(key, "unknown section" + _suggest(key, list(_SECTIONS)))
    hostd: Hostd = _section(data.get("hostd"), Hostd, "hostd", ctx)
    backend: Backend = _section(data.get("backend"), Backend, "backend", ctx)
    keystore: Keystore = _section(data.get("keystore"), Keystore, "keystore", ctx)
    lanes = _array(data.get("lane"), Lane, "lane", ctx) or [Lane()]
    devices = _array(data.get("device"), Device, "device", ctx) or []
    tap: Tap = _section(data.get("tap"), Tap, "tap", ctx)
    macros = _macros(data.get("macros"), ctx)
    _check_backend(backend, data.get("backend") or {}, ctx)
    _check_refs(lanes, devices, tap, ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return Config(
        dataclasses.replace(hostd, journal=hostd.journal or hostd.state_dir / "journal.sqlite3"),
        dataclasses.replace(backend, base_url=backend.base_url or BASE_URLS[backend.kind]),
        Keystore(keystore.path or hostd.state_dir / "keystore.jsonl"),
        tuple(lanes), tuple(devices), tap, macros, path)


def _macros(raw: Any, ctx: _Ctx) -> dict[str, Macro]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        ctx.bad("macros", f"expected a table of [macros.CARD_TYPE] tables, got {_show(raw)}")
        return {}
    out = {}
    for card_type, table in raw.items():
        if card_type not in CARD_TYPES:
            ctx.bad(f"macros.{card_type}",
                    "unknown card type" + _suggest(card_type, list(CARD_TYPES)))
            continue
        out[card_type] = _section(table, Macro, f"macros.{card_type}", ctx)
    return out


def _check_backend(b: Backend, raw: Mapping[str, Any], ctx: _Ctx) -> None:
    if {"settle_after_s", "timeout_s"} & set(raw) and b.settle_after_s <= b.timeout_s:
        ctx.bad("backend.settle_after_s", f"expected more than backend.timeout_s "
                f"({b.timeout_s:g}): a younger consume may still land, got {b.settle_after_s:g}")
    need = {"wechat_card": ("appid",) + (() if b.token_url else ("secret_file",)),
            "wechatpay_busifavor": ("appid", "mchid", "merchant_serial_no",
                                    "private_key_file", "apiv3_key_file")}.get(b.kind, ())
    for name in need:
        if not getattr(b, name):
            ctx.bad(f"backend.{name}", f'required for kind "{b.kind}": '
                    f"expected {_expected(_SCHEMA[Backend][name])}")


def _check_refs(lanes: list[Lane], devices: list[Device], tap: Tap, ctx: _Ctx) -> None:
    names = [la.name for la in lanes]
    for i, name in enumerate(names):
        if name in names[:i]:
            ctx.bad(f"lane[{i}].name", f'"{name}" is already used by lane[{names.index(name)}]')
    ids = [d.id for d in devices]
    for i, d in enumerate(devices):
        if d.id and d.id in ids[:i]:
            ctx.bad(f"device[{i}].id", f'"{d.id}" is already used by device[{ids.index(d.id)}]')
        if (d.port is None) == (d.match is None):
            ctx.bad(f"device[{i}]", "expected exactly one of port or match, got "
                    + ("both" if d.port else "neither"))
        if d.lane not in names:
            ctx.bad(f"device[{i}].lane", f"expected a [[lane]] name ({', '.join(names)}), "
                    f"got {_show(d.lane)}")
    from hexiao.hostd.inject import FIELDS as TAP_FIELDS
    for key in ("content", "caption"):
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(getattr(tap, key)) if f}
        except ValueError as e:
            ctx.bad(f"tap.{key}", f"expected a template, got {_show(getattr(tap, key))} ({e})")
            continue
        if used - TAP_FIELDS:
            ctx.bad(f"tap.{key}", f"expected a template over {', '.join(sorted(TAP_FIELDS))}, "
                    f"got {_show(getattr(tap, key))}")
    if not tap.enabled:
        return
    if not tap.printer:
        ctx.bad("tap.printer", "required when tap.enabled = true: expected "
                "tcp:HOST:PORT, file:PATH or serial:DEVICE[@BAUD]")
    if "{token" in tap.content and tap.key_file is None:
        ctx.bad("tap.key_file", "required when tap.content uses {token}: expected the path of "
                "the tap key file")
    if tap.lane not in names:
        ctx.bad("tap.lane", f"expected a [[lane]] name ({', '.join(names)}), got {_show(tap.lane)}")


__all__ = ["Backend", "Config", "ConfigError", "Device", "Hostd", "Keystore", "Lane", "Macro",
           "Tap", "UsbMatch", "from_dict", "kid_bytes", "load", "read_secret"]
