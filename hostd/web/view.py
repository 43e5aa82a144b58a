"""What the status page shows, read from the control socket's handlers (control/handlers.py).

Rules this module keeps:
- every figure comes from ControlHandlers (status, device_list, journal_list): the page and
  `hexiao status|device|journal` never disagree, and this module holds no state;
- the result is plain JSON-able data (the page's template and /status.json render the same
  dict); values from a device, the backend or the journal stay untrusted text, escaped by
  the template, never marked safe here;
- coupon codes only as their last 4 characters, cut again here whatever the journal gives;
- each item carries a level the page colours: "ok" (green), "warn" (amber), "bad" (red);
- a handler that fails (the journal locked or corrupt) becomes a line in `problems`, never a
  page that does not load: the lanes are still shown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from hexiao.protocol.link import NOISE

if TYPE_CHECKING:
    from hexiao.hostd.control.handlers import ControlHandlers

log = logging.getLogger("hexiao.web")

VERDICTS_SHOWN = 15
ATTENTION_SHOWN = 50
# the lane's states (lanes/lane.py) as a shop reads them
PRESENCE = {"open": ("online", "ok"), "connecting": ("connecting", "warn"),
            "waiting": ("offline", "bad"), "no key": ("no key", "bad")}
# journal outcomes (redeem.py) as the page names and colours them
OUTCOMES = {"accepted": ("redeemed", "ok"), "identified": ("member card", "ok"),
            "refused": ("refused", "bad"), "offline": ("offline", "bad"),
            "verify_manually": ("verify manually", "warn"),
            "not_consumed": ("not redeemed", "warn"), "abandoned": ("abandoned", "warn")}
TAP_COUNTERS = ("receipts", "injections", "failopen", "printer_lost", "errors")
TAMPER = ("mac", "replay", "kid", "cose", "alg", "header")  # frames that failed their checks


def last4(code: str | None) -> str:
    """A coupon code as the page may show it: its last 4 characters after an ellipsis."""
    return "…" + code[-4:] if code else ""


def _clock_time(iso: str | None) -> str:
    """A journal time (local ISO 8601) as the page shows it: the time today, the date before."""
    if not iso:
        return ""
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    today = datetime.now(t.tzinfo).date() == t.date()
    return t.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M")


def _uptime(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m" if h else f"{m}m {s}s"


def device(info: dict[str, Any]) -> dict[str, Any]:
    """One lane.info() as the page's row."""
    word, level = PRESENCE.get(info.get("state", ""), (str(info.get("state")), "warn"))
    peer = info.get("peer") or {}
    counters, stats = info.get("counters") or {}, info.get("stats") or {}
    noise = sum(counters.get(k, 0) for k in NOISE)
    tamper = sum(counters.get(k, 0) for k in TAMPER)
    link_level = "bad" if tamper else "warn" if noise or counters.get("expired") else "ok"
    if level != "ok":
        link_level = level
    return {
        "id": info.get("id"), "lane": info.get("lane"), "state": info.get("state"),
        "presence": word, "level": level, "port": info.get("port") or "",
        "firmware": peer.get("firmware") or "", "board": peer.get("board") or "",
        "error": (info.get("error") or "") if level != "ok" else "",
        "scans": stats.get("scans", 0),
        "redeemed": stats.get("verdict_accepted", 0),
        "refused": stats.get("verdict_refused", 0),
        "queued": info.get("queued", 0),
        "link": {"level": link_level, "rx": counters.get("rx_frames", 0),
                 "tx": counters.get("tx_frames", 0), "retransmits": counters.get("retransmits", 0),
                 "noise": noise, "tamper": tamper},
    }


def entry(e: dict[str, Any]) -> dict[str, Any]:
    """One journal_list() entry as the page's row (code as its last 4)."""
    if e.get("state") == "unknown":
        word, level = "verify manually", "warn"
    elif e.get("state") != "done":
        word, level = "in progress", "warn"
    else:
        word, level = OUTCOMES.get(e.get("outcome") or "", (str(e.get("outcome")), "warn"))
    code = e.get("code") or ""
    return {"id": e.get("id"), "lane": e.get("lane"), "time": _clock_time(e.get("created")),
            "at": e.get("created") or "", "code": last4(code.lstrip("…")), "result": word,
            "level": level, "reason": (e.get("reason") or "").replace("_", " "),
            "title": e.get("title") or "", "card_type": e.get("card_type") or ""}


def tap(state: dict[str, Any]) -> dict[str, Any]:
    """The receipt tap's state (TapService.state()) as the page's panel."""
    s = state.get("state", "off")
    printer = state.get("printer") or {}
    p = printer.get("state") or ""
    return {
        "state": s, "level": {"listening": "ok", "off": "off"}.get(s, "bad"),
        "listening": state.get("listening") or "", "error": state.get("error") or "",
        "printer": printer.get("target") or "", "printer_state": p,
        "printer_level": {"reachable": "ok", "lost": "bad"}.get(p, "warn"),
        "printer_error": printer.get("error") or "",
        "counters": {k: (state.get("counters") or {}).get(k, 0) for k in TAP_COUNTERS},
        "last_error": state.get("last_error") or "",
    }


def points(state: dict[str, Any]) -> dict[str, Any]:
    """Member points at the till (PointsService.state()) as the page's card: today's credits,
    what is pending, what needs a person."""
    person = list(state.get("needs_person") or [])
    return {"state": state.get("state", "off"),
            "level": "warn" if person else "ok" if state.get("running", True) else "bad",
            "credited": state.get("credited", 0), "receipts": state.get("receipts", 0),
            "taken_back": state.get("taken_back", 0), "pending": state.get("pending", 0),
            "needs_person": person, "claim_url": state.get("claim_url") or ""}


def _safe(problems: list[str], what: str, call: Callable[[], Any], default: Any) -> Any:
    try:
        return call()
    except Exception as e:  # the page still loads; the log has the traceback
        log.exception("status page: %s failed", what)
        problems.append(f"{what}: {type(e).__name__}: {e}")
        return default


def snapshot(handlers: ControlHandlers, *, refresh_s: float) -> dict[str, Any]:
    """Everything the page shows, now."""
    problems: list[str] = []
    status = _safe(problems, "status", handlers.status, {})
    devices = [device(i) for i in _safe(problems, "devices", handlers.device_list, [])]
    latest = _safe(problems, "journal",
                   lambda: handlers.journal_list(limit=VERDICTS_SHOWN), [])
    attention = _safe(problems, "journal (verify manually)",
                      lambda: handlers.journal_list(state=["unknown"], limit=ATTENTION_SHOWN),
                      [])
    offline = sum(d["level"] != "ok" for d in devices)
    if problems:
        level, headline = "bad", "hostd could not read everything: see below"
    elif not devices:
        level, headline = "warn", "no devices configured"
    elif offline:
        level = "bad" if offline == len(devices) else "warn"
        headline = f"{offline} of {len(devices)} device{'s' if len(devices) > 1 else ''} " \
                   f"not online"
    elif attention:
        level, headline = "warn", f"{len(attention)} redemption(s) need a person"
    else:
        level, headline = "ok", f"all {len(devices)} device{'s' if len(devices) > 1 else ''} " \
                                f"online"
    return {
        "level": level, "headline": headline, "problems": problems,
        "updated": time.strftime("%H:%M:%S"), "refresh_s": refresh_s,
        "pid": status.get("pid"), "uptime": _uptime(status.get("uptime_s") or 0),
        "backend": status.get("backend") or "",
        "online": len(devices) - offline, "devices": devices,
        "verdicts": [entry(e) for e in reversed(latest)],
        "attention": [entry(e) for e in reversed(attention)],
        "tap": tap(status.get("tap") or {"state": "off"}),
        "points": points(status.get("points") or {"state": "off"}),
    }
