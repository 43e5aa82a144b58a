"""What the cashier sees and hears for a redemption, and what the POS is typed.

Rules this module keeps:
- a redeem.Verdict becomes one `verdict` link message: outcome, beep and LED from fixed tables,
  and a text of at most 48 UTF-8 bytes (the device's display line) that says what the coupon is
  worth or exactly why not; it never holds more of the code than its last 4 characters;
- money is in fen on the wire from WeChat and shown in yuan (¥12.50);
- "verify manually" (amber) only for a consume whose outcome is unknown; what is known not to
  be redeemed says "scan again", a setup problem says "call support" and what to look at;
- a code this lane consumed, scanned again, is green "本机已核销" with how long ago and its
  value (the CASH condition gives way first when the line is full);
- a keystroke macro is rendered only for an accepted coupon whose card type has one; its text
  items are templates over MACRO fields and each rendered text must still fit the `keys`
  message (48 bytes), or no macro is sent (a wrong discount typed into a POS is worse than none).
- an accepted ticket shows what the cashier checks instead of "核销成功" (green says accepted):
  film: screening time, seat, title, hall; meeting: time, zone, entrance, seat; boarding pass:
  passenger, flight, seat, departure, route; attraction: the day (or "至" the last day) and
  class. The most important come first; the line is cut at the end. Times are China time
  (UTC+8), as printed on the tickets.
"""

from __future__ import annotations

import time
from typing import Any

from hexiao.hostd.config import Macro
from hexiao.hostd.redeem import TICKETS, Verdict
from hexiao.protocol import messages

TEXT_MAX = 48  # bytes of UTF-8 in verdict.text and in each keys item

# outcome -> (beep, led), by the names in protocol/messages.py
_SIGNAL = {
    "accepted": ("ok", "green"),
    "identified": ("ok", "blue"),
    "refused": ("error", "red"),
    "offline": ("warning", "amber"),
    "verify_manually": ("warning", "amber"),
    "info": ("none", "off"),
}

_REASON_TEXT = {
    "already_used": "已使用 already used",
    "expired": "已过期 expired",
    "not_yet_valid": "未到使用时间 not yet valid",
    "gifting": "转赠中 being gifted",
    "deleted": "已删除 deleted",
    "unavailable": "不可用 unavailable",
    "not_this_merchant": "非本店券 not this store",
    "invalid_code": "无效券码 invalid code",
    "busy": "系统繁忙 请重扫 busy, scan again",
    "offline": "网络离线 offline",
    "in_progress": "处理中 in progress",
    "unknown": "请人工核实 verify manually",
    "not_redeemed": "未核销 请重扫 not redeemed",
    "quota": "额度用完 quota used up till 0:00",
    "setup": "配置错误 call support:",
}


def yuan(fen: Any) -> str:
    try:
        f = int(fen)
    except (TypeError, ValueError):
        return "?"
    return f"¥{f // 100}.{f % 100:02d}"


def fit(text: str, limit: int = TEXT_MAX) -> str:
    """text cut at a character boundary so that its UTF-8 fits `limit` bytes."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore")


def ago(seconds: float) -> str:
    s = round(seconds)
    return f"{s}秒前" if s < 60 else f"{s // 60}分钟前" if s < 3600 else f"{s // 3600}小时前"


_CHINA = 8 * 3600


def when(t: Any, fmt: str = "%m-%d %H:%M") -> str:
    """A Unix time as China time ("12-08 19:30"), "" if it is not a time."""
    if not isinstance(t, int) or isinstance(t, bool):
        return ""
    return time.strftime(fmt, time.gmtime(t + _CHINA))


def ticket_text(v: Verdict) -> str:
    """What the cashier checks on an accepted ticket, most important first (module rules)."""
    val, title = v.value or {}, v.title or ""
    parts: list[Any]
    if v.card_type == "MOVIE_TICKET":
        parts = [when(val.get("show_time")), val.get("seat_number"), title,
                 val.get("screening_room")]
    elif v.card_type == "MEETING_TICKET":
        parts = [when(val.get("begin_time")), val.get("zone"), val.get("entrance"),
                 val.get("seat_number"), title]
    elif v.card_type == "BOARDING_PASS":
        route = f"{val.get('from', '')}-{val.get('to', '')}".strip("-")
        parts = [val.get("passenger_name"), val.get("flight"), val.get("seat"),
                 when(val.get("departure_time")), route]
    else:  # SCENIC_TICKET: the day it is for, or the last day of a longer window
        start, end = val.get("valid_from"), val.get("valid_until")
        day = when(start, "%m-%d") if isinstance(start, int) and isinstance(end, int) and \
            end - start <= 86_400 else (f"至{when(end, '%m-%d')}" if when(end) else "")
        parts = [day, val.get("ticket_class"), title]
    return " ".join(str(p) for p in parts if p) or title


def value_text(v: Verdict, short: bool = False) -> str:
    """What an accepted coupon is worth, in a few words (short: without a CASH condition)."""
    val, ctype = v.value or {}, v.card_type
    if ctype == "CASH":
        least = val.get("least_cost")
        cond = f" 满{yuan(least)}" if least and not short else ""
        return f"减{yuan(val.get('reduce_cost'))}{cond}"
    if ctype == "DISCOUNT":
        off = val.get("discount")
        return f"{off}% off" if off is not None else "折扣券"
    if ctype == "GIFT":
        return f"礼品 {val.get('gift', '')}".strip()
    if ctype == "GROUPON":
        return f"团购 {val.get('deal_detail', '')}".strip()
    if ctype == "GENERAL_COUPON":
        return f"{val.get('default_detail', '')}".strip() or "优惠券"
    if ctype in TICKETS:
        return ticket_text(v)
    return ""


def text_of(v: Verdict) -> str:
    tail = v.code_tail
    room = TEXT_MAX - (len(tail.encode()) + 1 if tail else 0)
    if v.outcome == "accepted" and v.reason == "redeemed_here":
        head = f"本机已核销 {ago(v.age_s or 0)}"
        body = f"{head} {value_text(v)}".strip()
        if len(body.encode()) > room:
            body = f"{head} {value_text(v, short=True)}".strip()
    elif v.outcome == "accepted" and v.card_type in TICKETS:
        body = ticket_text(v)
    elif v.outcome == "accepted":
        body = f"核销成功 {value_text(v)}".strip()
    elif v.outcome == "identified":
        body = f"会员卡 {v.title or ''}".strip()
    elif v.outcome == "verify_manually":
        body = _REASON_TEXT["unknown"]
    else:
        # refused: never "verify manually" (that is an unknown consume's, amber)
        body = _REASON_TEXT.get(v.reason or "", "") if v.reason != "unknown" else ""
        body = body or _REASON_TEXT["not_redeemed"]
        if v.reason == "setup":
            body = f"{body} {v.why or '?'}"
    if not tail:
        return fit(body)
    # the code's tail always shows (the cashier matches it to the customer's phone): the
    # description gives way when the line is full
    return f"{fit(body, room).rstrip()} {tail}"


def verdict_message(scan_id: int, v: Verdict) -> dict[str, Any]:
    """The link message that answers scan `scan_id`."""
    beep, led = _SIGNAL[v.outcome]
    return {"type": "verdict", "scan_id": scan_id,
            "outcome": messages.OUTCOMES.index(v.outcome),
            "beep": messages.BEEPS.index(beep), "led": messages.LEDS.index(led),
            "text": text_of(v)}


def macro_fields(v: Verdict) -> dict[str, str]:
    val = v.value or {}
    return {"card_id": v.card_id or "", "title": v.title or "", "code_tail": v.code_tail,
            "reduce_cost": str(val.get("reduce_cost", "")),
            "least_cost": str(val.get("least_cost", "")),
            "reduce_cost_yuan": yuan(val["reduce_cost"])[1:] if "reduce_cost" in val else "",
            "least_cost_yuan": yuan(val["least_cost"])[1:] if "least_cost" in val else "",
            "discount": str(val.get("discount", "")), "gift": str(val.get("gift", ""))}


def keys_message(macro_id: int, v: Verdict, macros: dict[str, Macro]) -> dict[str, Any] | None:
    """The `keys` message typing an accepted coupon into the POS, or None."""
    if v.outcome != "accepted" or not v.card_type or v.card_type not in macros:
        return None
    macro = macros[v.card_type]
    fields = macro_fields(v)
    items: list[Any] = []
    for item in macro.items:
        if isinstance(item, str):
            text = item.format(**fields)
            if not text or len(text.encode()) > TEXT_MAX:
                return None
            items.append(text)
        else:
            items.append(list(item))
    return {"type": "keys", "macro_id": macro_id, "items": items, "delay_ms": macro.delay_ms}
