"""hexiao-hostd configuration: one TOML file -> frozen dataclasses, every setting defaulted.

Shape (hostd.example.toml documents every key): [hostd], [backend], [keystore], [[lane]],
[[device]], [tap], [macros.<CARD_TYPE>]. An empty file is a valid config: simulator backend,
one lane "lane-1", no pinned devices, tap off.

This module is the public face: load(), from_dict() and the checks that span sections; the
dataclasses live in config_types and the per-key checkers in config_schema (all re-exported
here, so `from hexiao.hostd.config import ...` is the one way in).

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
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hexiao.hostd.config.schema import (
    _SCHEMA,
    MACRO_FIELDS,
    _array,
    _Ctx,
    _expected,
    _section,
    _show,
    _suggest,
)
from hexiao.hostd.config.types import (
    ACTIONS,
    BASE_URLS,
    CARD_TYPES,
    Backend,
    Config,
    ConfigError,
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
    read_secret,
)

_SECTIONS = ("hostd", "backend", "keystore", "lane", "device", "tap", "macros", "fleet")


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
    fleet: Fleet = _section(data.get("fleet"), Fleet, "fleet", ctx)
    macros = _macros(data.get("macros"), ctx)
    _check_backend(backend, data.get("backend") or {}, ctx)
    _check_refs(lanes, devices, tap, ctx)
    for name in ("merchant", "store", "key_file") if fleet.enabled else ():
        if not getattr(fleet, name):
            ctx.bad(f"fleet.{name}", "required when fleet.enabled = true: expected "
                    + _expected(_SCHEMA[Fleet][name]))
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return Config(
        dataclasses.replace(hostd, journal=hostd.journal or hostd.state_dir / "journal.sqlite3"),
        dataclasses.replace(backend, base_url=backend.base_url or BASE_URLS[backend.kind]),
        Keystore(keystore.path or hostd.state_dir / "keystore.jsonl"),
        tuple(lanes), tuple(devices), tap, macros, path, fleet)


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
    from hexiao.hostd.tap.inject import FIELDS as TAP_FIELDS
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


__all__ = ["ACTIONS", "BASE_URLS", "CARD_TYPES", "MACRO_FIELDS", "Backend", "Config",
           "ConfigError", "Device", "DeviceSettings", "Hostd", "Keystore", "Lane", "Macro", "Tap",
           "UsbMatch", "from_dict", "kid_bytes", "load", "read_secret"]
