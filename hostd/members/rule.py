"""A member card's bonus rule: how many points a sale of N fen earns. No I/O.

Rules this module keeps:
- The rule is the card's own (card/get member_card.bonus_rule: cost_money_unit fen per unit,
  increase_bonus points per unit, max_increase_bonus a cap per sale; 0 or absent = no cap); a
  card without one, or with supply_bonus false, earns nothing (None, never a guess).
- Whole units only: 99 fen of a 100-fen unit earn nothing (the platform's own wording: "每消费
  cost_money_unit 分 赠送 increase_bonus 积分").
- A rule that cannot be used is a RuleError naming the field: a unit of 0 or below, negative
  points, or a credit above MAX_POINTS (an overflow of the platform's 32-bit points, or a
  mistyped rule): nothing is credited rather than a wrong amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_POINTS = 10_000_000  # one sale never earns more; far below the platform's int32


class RuleError(ValueError):
    """The card's bonus rule cannot be applied; the message names the field."""


@dataclass(frozen=True)
class BonusRule:
    cost_money_unit: int  # fen
    increase_bonus: int  # points per unit
    max_increase_bonus: int = 0  # 0: no cap

    def points(self, fen: int) -> int:
        """Points for a sale of `fen` (>= 0)."""
        if fen < 0:
            raise RuleError(f"a sale of {fen} fen: expected an amount >= 0")
        points = fen // self.cost_money_unit * self.increase_bonus
        if self.max_increase_bonus:
            points = min(points, self.max_increase_bonus)
        if points > MAX_POINTS:
            raise RuleError(f"bonus_rule gives {points} points for {fen} fen, above "
                            f"{MAX_POINTS}: check increase_bonus / cost_money_unit")
        return points


def from_card(card: dict[str, Any]) -> BonusRule | None:
    """The rule of a card/get `card` object; None if it earns no points."""
    section = card.get("member_card")
    if card.get("card_type") != "MEMBER_CARD" or not isinstance(section, dict):
        return None
    raw = section.get("bonus_rule")
    if not section.get("supply_bonus") or not isinstance(raw, dict):
        return None
    values = {}
    for key in ("cost_money_unit", "increase_bonus", "max_increase_bonus"):
        v = raw.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool):
            raise RuleError(f"bonus_rule.{key}: expected an integer, got {v!r}")
        values[key] = v
    if values["cost_money_unit"] <= 0:
        raise RuleError(f"bonus_rule.cost_money_unit: expected fen per unit >= 1, got "
                        f"{values['cost_money_unit']}")
    if values["increase_bonus"] < 0 or values["max_increase_bonus"] < 0:
        raise RuleError("bonus_rule: increase_bonus and max_increase_bonus must be >= 0 "
                        "(a rule may not take points)")
    return BonusRule(**values)
