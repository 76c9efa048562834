"""Automatic mixed precision: most decoder layers at a low integer grid, the most fragile at a high one.

A layer's fragility is measured (stages/engines/sensitivity.py: quantize that layer alone, round-to-nearest, perplexity
on the job's validation text); the layers are ranked by perplexity lost per byte saved; the fewest upgrades that keep
the perplexity delta on the validation text within `budget` are found by bisection over real quantizations
(stages/engines/mixed.py). Validation text is apart from the calibration draw and from the evaluation text, so the
evaluated figure of the chosen variant is a held-out number, not the one the search optimised.
Which layers were kept high depends on the model, so the recipe is built per model, not by `modifiers()`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.methods.base import MethodConfig
from farm.methods.budget import BUDGET_UNIT_HELP, BudgetUnit
from farm.methods.precision import Grid, Layer, config_groups
from farm.methods.rotation import ROTATION_HELP, Rotation, rotation_modifiers


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    bits: Literal[4, 8] = Field(description="integer weight bits")
    group_size: int | None = Field(None, gt=0, le=8192, description="weights per scale; null = per output channel")
    symmetric: bool = Field(True, description="symmetric int grid (no zero point)")

    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)


class MixedConfig(MethodConfig):
    method: Literal["mixed"] = "mixed"
    cost_rank: ClassVar[int] = -2
    later_fields: ClassVar[dict[str, Any]] = {"rotation": None}
    low: GridSpec = Field(GridSpec(bits=4, group_size=128), description="grid for most layers")
    high: GridSpec = Field(GridSpec(bits=8, group_size=None), description="grid for the fragile layers")
    algorithm: Literal["gptq", "rtn"] = Field("gptq", description="how weights are rounded (GPTQ reads calibration)")
    budget: float = Field(1.0, gt=0, description="largest perplexity increase allowed on the job's validation text")
    budget_unit: BudgetUnit = Field("delta", description=BUDGET_UNIT_HELP)
    high_layers: list[int] | None = Field(None, description="fixed decoder layers to keep high (skips the search)")
    rotation: Rotation | None = Field(None, description=ROTATION_HELP)

    @property
    def requires_calibration(self) -> bool:
        return self.algorithm == "gptq"

    @property
    def uses_validation(self) -> bool:
        return True

    @property
    def distributable(self) -> bool:
        return False  # each probe reloads the model in one process

    def default_label(self) -> str:
        g = f"g{self.low.group_size}" if self.low.group_size else "ch"
        budget = f"{self.budget:g}".replace("+", "")  # labels become registry aliases: [a-z0-9_.-] only
        rot = f"-{self.rotation}" if self.rotation else ""
        return f"mixed-w{self.low.bits}{g}-w{self.high.bits}-{self.budget_unit[0]}{budget}{rot}"

    def group_sizes(self) -> list[int]:
        return [g.group_size for g in (self.low, self.high) if g.group_size]

    def modifiers(self) -> list[Any]:
        raise TypeError("the mixed method's recipe depends on the model's layers; use modifiers_for()")

    def modifiers_for(self, layers: list[Layer], high: set[int]) -> list[Any]:
        """The recipe keeping `high` layers at the high grid and the rest at the low grid."""
        groups = config_groups(layers, high, self.low.grid(), self.high.grid())
        rotate = rotation_modifiers(self.rotation, list(self.ignore))
        if self.algorithm == "rtn":
            from llmcompressor.modifiers.quantization import QuantizationModifier

            return [*rotate, QuantizationModifier(config_groups=groups, ignore=list(self.ignore))]
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [*rotate, GPTQModifier(config_groups=groups, ignore=list(self.ignore), actorder="static")]

    def weight_bits(self) -> float:
        return self.low.grid().bits_per_weight()  # at least: the search upgrades layers from here
