"""How the support commands print for a person: one rendering for hostd's answers and for a
device's direct answers (`--port`), so `hexiao device ...` reads the same either way.

Rules this module keeps:
- --json is never rendered here: scripts get the data as hostd or the device gave it;
- values as a person reads them: booleans yes/no, nothing (None, "", [], {}) as "-", bytes as
  hex, link counters by name (protocol.errors.counter_name: a device sends numbers), device
  logs as timestamped lines with level names, nested data as indented blocks, never JSON;
- table rows at most WIDTH columns: the widest cells are elided with "…" (the full value is in
  --json); widths count East Asian wide characters (a coupon title in Chinese) as two;
- colour only on a terminal and never with NO_COLOR set (https://no-color.org): verdict
  outcomes accepted green, refused red, verify_manually yellow;
- a failure is one line on stderr, `Error: MESSAGE`, the prefix click gives usage errors.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Callable
from typing import Any, TextIO

import click
from hexiao.protocol.errors import counter_name

WIDTH = 100
LEVELS = ("emergency", "alert", "critical", "error", "warning", "notice", "info", "debug")
OUTCOME_COLOURS = {"accepted": "green", "refused": "red", "verify_manually": "yellow"}
# free text, elided first when a row is too wide (ids, states and times stay whole longer)
ELASTIC = ("error", "title", "reason", "detail", "event", "port", "firmware")

Style = Callable[[str], str]


# -- colour and errors ----------------------------------------------------------------------------


def colour_on(stream: TextIO | None = None) -> bool:
    """Whether to colour what goes to `stream` (stdout): a terminal, and NO_COLOR unset."""
    if os.environ.get("NO_COLOR"):  # any non-empty value, as no-color.org says
        return False
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real stream
        return False


def outcome_style(colour: bool) -> Style | None:
    """A verdict outcome in its colour, when colouring."""
    if not colour:
        return None
    return lambda text: click.style(text, fg=OUTCOME_COLOURS.get(text.strip()))


def error(message: str) -> None:
    """The CLI's one error line, on stderr."""
    click.echo(f"Error: {message}", err=True)


# -- values ---------------------------------------------------------------------------------------


def empty(v: Any) -> bool:
    return v is None or (isinstance(v, str | bytes | list | tuple | dict) and not v)


def cell(v: Any) -> str:
    """One value on one line."""
    if empty(v):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    if isinstance(v, dict):
        return ", ".join(f"{k} {cell(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return ", ".join(cell(x) for x in v)
    return str(v)


def width(text: str) -> int:
    """Columns `text` takes on a terminal (wide CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def elide(text: str, cols: int) -> str:
    """text cut to `cols` columns, "…" marking the cut."""
    if width(text) <= cols:
        return text
    out, used = "", 0
    for c in text:
        w = width(c)
        if used + w > cols - 1:
            break
        out, used = out + c, used + w
    return out + "…"


def _pad(text: str, cols: int) -> str:
    return text + " " * (cols - width(text))


# -- tables and key: value blocks -----------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str] | None = None,
          styles: dict[str, Style] | None = None, max_width: int = WIDTH) -> str:
    """Aligned columns (all keys in order of appearance unless `columns`), each row at most
    max_width columns; `styles` colours a column's cells after they are aligned."""
    if not rows:
        return "(none)"
    cols = list(columns or [])
    if not cols:
        for r in rows:
            cols += [k for k in r if k not in cols]
    heads = [c.upper() for c in cols]
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(width(h), *(width(row[i]) for row in cells)) for i, h in enumerate(heads)]
    # shrink the widest free-text column, then the widest of all, one column at a time, until
    # the row fits (a header stays whole)
    floors = [max(width(h), 4) for h in heads]
    while sum(widths) + 2 * (len(widths) - 1) > max_width:
        over = [j for j in range(len(cols)) if widths[j] > floors[j]]
        if not over:
            break
        soft = [j for j in over if cols[j] in ELASTIC] or over
        widths[max(soft, key=lambda j: widths[j])] -= 1
    styles = styles or {}
    lines = []
    for n, line in enumerate([heads, *cells]):
        parts = []
        for i, text in enumerate(line):
            text = _pad(elide(text, widths[i]), widths[i])
            style = styles.get(cols[i]) if n else None
            parts.append(style(text) if style else text)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def keyvalue(obj: dict[str, Any], indent: str = "",
             styles: dict[str, Style] | None = None) -> str:
    """`key: value` lines; dicts as indented blocks, lists of dicts as indented tables."""
    out = []
    styles = styles or {}
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.append(f"{indent}{k}:")
            out.append(keyvalue(v, indent + "  "))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{indent}{k}:")
            rows = table(v, max_width=WIDTH - len(indent) - 2)
            out.append("\n".join(indent + "  " + ln for ln in rows.splitlines()))
        else:
            text = cell(v)
            style = styles.get(k)
            out.append(f"{indent}{k}: {style(text) if style else text}")
    return "\n".join(out)


def generic(result: Any) -> str:
    if isinstance(result, list):
        return table(result)
    if isinstance(result, dict):
        return keyvalue(result)
    return cell(result)


# -- what the device commands answer, from hostd or directly --------------------------------------


def named_counters(counters: dict[Any, Any]) -> dict[str, Any]:
    """Link counters by name: a device's health sends numbers (as JSON keys through hostd)."""
    out = {}
    for k, v in counters.items():
        key = str(k)
        out[counter_name(int(key)) if key.isdigit() else key] = v
    return out


def device_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """hostd's device.list as one short row per device (the whole answer is in --json)."""
    out = []
    for r in rows:
        if "state" not in r or "id" not in r:
            out.append(r)  # not hostd's lane info: shown as it is
            continue
        peer, stats = r.get("peer") or {}, r.get("stats") or {}
        out.append({"device": r["id"], "lane": r.get("lane"), "state": r["state"],
                    "port": r.get("port"), "firmware": peer.get("firmware"),
                    "scans": stats.get("scans", 0), "error": r.get("error")})
    return out


def device_info(d: dict[str, Any]) -> dict[str, Any]:
    """One layout for a device's info: hostd's lane info, or a direct handshake."""
    if "state" in d and "id" in d:  # through hostd
        peer = d.get("peer") or {}
        out: dict[str, Any] = {"device": d["id"], "lane": d.get("lane"), "state": d["state"],
                               "port": d.get("port"), "error": d.get("error")}
        out.update({k: v for k, v in peer.items() if k != "kid"})
        out["link"] = d.get("counters") or {}
        out["hostd"] = {**(d.get("stats") or {}), "queued": d.get("queued", 0)}
        return out
    info = dict(d)
    if info.pop("connected", None):  # a direct handshake: the same first lines as hostd's
        info = {"device": info.pop("device", None), "state": "open (direct)",
                "port": info.pop("port", None), **info}
    return info


def health(d: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    h = {k: v for k, v in d.items() if k != "type"}
    if device and "device" not in h:
        h = {"device": device, **h}
    if isinstance(h.get("uptime_ms"), int):
        h = {("uptime" if k == "uptime_ms" else k): (uptime(v) if k == "uptime_ms" else v)
             for k, v in h.items()}
    if isinstance(h.get("link"), dict):
        h["link"] = named_counters(h["link"])
    return h


def uptime(ms: int) -> str:
    s, ms = divmod(int(ms), 1000)
    m, s = divmod(s, 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}.{ms:03d}"


def log_lines(d: dict[str, Any]) -> str:
    """A device's log entries, one line each: sequence, the device's uptime, level, event."""
    lines = []
    for e in d.get("entries") or []:
        if isinstance(e, dict):
            seq, t, level, event = e.get("seq"), e.get("uptime_ms"), e.get("level"), e.get("event")
        else:  # hostd passes the device's [seq, uptime_ms, level, event] on
            seq, t, level, event = e
        if isinstance(level, int):
            level = LEVELS[level] if 0 <= level < len(LEVELS) else str(level)
        lines.append(f"#{seq:<5} {uptime(t or 0)}  {level:<8} {event}")
    if not lines:
        lines.append("(no entries)")
    if d.get("next") is not None:
        lines.append(f"next: {d['next']} (--since {d['next']} for newer entries)")
    return "\n".join(lines)


def journal_rows(rows: list[dict[str, Any]], colour: bool) -> str:
    """The journal as a table: when (to the second, local), what, why; `journal show ID` and
    --json have every field."""
    short = []
    for r in rows:
        r = dict(r)
        if isinstance(r.get("created"), str):
            r["created"] = r["created"][:19].replace("T", " ")
        r.pop("updated", None)
        short.append(r)
    style = outcome_style(colour)
    return table(short, styles={"outcome": style} if style else None)


def journal_entry(d: dict[str, Any], colour: bool) -> str:
    style = outcome_style(colour)
    return keyvalue(d, styles={"outcome": style} if style else None)


def render(kind: str, result: Any, colour: bool = False, device: str | None = None) -> str:
    """The text a person reads for one command's result."""
    if kind == "device.list" and isinstance(result, list):
        return table(device_rows(result))
    if kind == "device.info" and isinstance(result, dict):
        return keyvalue(device_info(result))
    if kind == "device.health" and isinstance(result, dict):
        return keyvalue(health(result, device))
    if kind == "device.logs" and isinstance(result, dict):
        return log_lines(result)
    if kind == "journal.list" and isinstance(result, list):
        return journal_rows(result, colour)
    if kind == "journal.show" and isinstance(result, dict):
        return journal_entry(result, colour)
    return generic(result)
