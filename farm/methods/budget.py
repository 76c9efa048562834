"""A quality budget for methods that choose between candidates: the largest perplexity increase over the base
on validation text, as a difference (`delta`) or a percentage of the base (`percent`). A percentage carries
from one text to another (a validation text may be harder than the evaluation text), a delta does not."""

from __future__ import annotations

from typing import Literal

BudgetUnit = Literal["delta", "percent"]
BUDGET_UNIT_HELP = "budget as a perplexity difference (delta) or a percentage of the base's perplexity (percent)"


def allowed_delta(budget: float, unit: BudgetUnit, base_perplexity: float) -> float:
    """The perplexity increase the budget allows over a base with this perplexity."""
    return budget if unit == "delta" else budget / 100 * base_perplexity
