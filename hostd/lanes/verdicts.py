"""What the cashier sees and hears for a redemption, and what the POS is typed.

Rules this module keeps:
- a redeem.Verdict becomes one `verdict` link message: outcome, beep and LED from fixed tables,
  and a text of at most 48 UTF-8 bytes (the device's display line) that says what the coupon is
  worth or exactly why not; it never holds more of the code than its last 4 characters;
- money is in fen on the wire from WeChat and shown in yuan (¥12.50);
- a keystroke macro is rendered only for an accepted coupon whose card type has one; its text
  items are templates over MACRO fields and each rendered text must still fit the `keys`
  message (48 bytes), or no macro is sent (a wrong discount typed into a POS is worse than none).
"""

from __future__ import annotations

from typing import Any

from hexiao.hostd.config import Macro
from hexiao.hostd.redeem import Verdict
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


def value_text(v: Verdict) -> str:
    """What an accepted coupon is worth, in a few words."""
    val, ctype = v.value or {}, v.card_type
    if ctype == "CASH":
        least = val.get("least_cost")
        cond = f" 满{yuan(least)}" if least else ""
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
    return ""


def text_of(v: Verdict) -> str:
    tail = v.code_tail
    if v.outcome == "accepted":
        body = f"核销成功 {value_text(v)}".strip()
    elif v.outcome == "identified":
        body = f"会员卡 {v.title or ''}".strip()
    else:
        body = _REASON_TEXT.get(v.reason or "unknown", _REASON_TEXT["unknown"])
    if not tail:
        return fit(body)
    # the code's tail always shows (the cashier matches it to the customer's phone): the
    # description gives way when the line is full
    return f"{fit(body, TEXT_MAX - len(tail.encode()) - 1).rstrip()} {tail}"


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
