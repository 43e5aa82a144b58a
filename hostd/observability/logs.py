"""hostd logging: structlog, with secrets and coupon codes redacted; one JSON object per line,
or readable lines for a person at a terminal (format "console"; "auto" picks it for a TTY).

The chain is small processors: contextvars -> level -> UTC timestamp -> exception text ->
redact -> JSON (or the console renderer, coloured unless NO_COLOR is set). Redaction runs
after the exception is formatted, so a traceback is redacted too.
What redact() does, anywhere in the event (nested dicts, lists and tuples included):
- a value under a secret-looking key (access_token, secret, key, device_key, token, password,
  authorization, or any key ending in _token/_secret/_key) becomes "[redacted]";
- a coupon code under a code key (code, scanned, data, encrypt_code, coupon_code) keeps only its
  last 4 characters: "123456789012" -> "********9012" (4 or fewer characters: all masked);
- a string that contains a value registered with register_secret() has it replaced by
  "[redacted]", and `access_token=...`/`secret=...` in URL query strings is masked.
Standard-library loggers (redeem, wechat_card, httpx) go through the same chain when
configure(stdlib=True), and the wechatpayv3 SDK's logger is kept above debug (its debug lines
carry the Authorization header).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"
SECRET_KEYS = frozenset({"access_token", "secret", "key", "device_key", "token", "password",
                         "authorization", "apiv3_key", "private_key"})
SECRET_SUFFIXES = ("_token", "_secret", "_key")
CODE_KEYS = frozenset({"code", "scanned", "data", "encrypt_code", "coupon_code"})
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
_QUERY = re.compile(r"((?:access_token|secret|token)=)[^&\s\"']+", re.I)
_MIN_SUBSTRING = 8  # shorter registered secrets are masked only as whole values

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | bytes) -> None:
    """Mask this value (and its hex form, for bytes) wherever it appears in a log string."""
    forms = [value.hex(), value.hex().upper()] if isinstance(value, bytes) else [value]
    with _secrets_lock:
        _secrets.update(f for f in forms if f)


def clear_secrets() -> None:
    """Forget every registered secret (tests; a reload of the config)."""
    with _secrets_lock:
        _secrets.clear()


def mask_code(value: Any) -> str:
    """A coupon code as logs may show it: all but the last 4 characters as '*'."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes | bytearray) else str(value)
    return "*" * len(text) if len(text) <= 4 else "*" * (len(text) - 4) + text[-4:]


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    return k in SECRET_KEYS or k.endswith(SECRET_SUFFIXES)


def _clean_str(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if text == s:
            return REDACTED
        if len(s) >= _MIN_SUBSTRING and s in text:
            text = text.replace(s, REDACTED)
    return _QUERY.sub(lambda m: m[1] + REDACTED, text)


def _clean(value: Any, secrets: frozenset[str], key: str | None = None) -> Any:
    if key is not None and _is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: _clean(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, secrets) for v in value]
    if key is not None and key.lower() in CODE_KEYS and isinstance(
            value, str | bytes | bytearray | int) and not isinstance(value, bool):
        return mask_code(value)
    if isinstance(value, str):
        return _clean_str(value, secrets)
    return value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: see the module rules."""
    with _secrets_lock:
        secrets = frozenset(_secrets)
    return {k: _clean(v, secrets, str(k)) for k, v in event_dict.items()}


def _chain() -> list[Processor]:
    return [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info, redact]


FORMATS = ("auto", "console", "json")


def _renderer(fmt: str, out: IO[str]) -> Processor:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    tty = hasattr(out, "isatty") and out.isatty()
    if fmt == "json" or (fmt == "auto" and not tty):
        return structlog.processors.JSONRenderer(ensure_ascii=False)
    return structlog.dev.ConsoleRenderer(colors=tty and "NO_COLOR" not in os.environ,
                                         exception_formatter=structlog.dev.plain_traceback)


def configure(level: str = "info", stream: IO[str] | None = None, *,
              stdlib: bool = True, format: str = "json") -> None:
    """Logs at `level` (debug|info|warning|error) to `stream` (default stderr), as JSON lines
    or (format "console", or "auto" on a terminal) readable lines.

    stdlib=True also routes the standard `logging` root through the same chain.
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    out = stream or sys.stderr
    render = _renderer(format, out)
    structlog.configure(
        processors=[*_chain(), render],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    logging.getLogger("wechatpayv3").setLevel(max(LEVELS[level], logging.INFO))
    if not stdlib:
        return
    handler = logging.StreamHandler(out)
    handler.set_name("hexiao-json")
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(),
                           *_chain()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "hexiao-json"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
