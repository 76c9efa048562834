"""Automatic mixed precision: most decoder layers at a low integer grid, the most fragile at a high one.

A layer's fragility is measured (stages/engines/sensitivity.py: quantize that layer alone, round-to-nearest, perplexity
on calibration text); the layers are ranked by perplexity lost per byte saved; the fewest upgrades that keep the
measured perplexity delta within `budget` are found by bisection over real quantizations (stages/engines/mixed.py).
Which layers were kept high depends on the model, so the recipe is built per model, not by `modifiers()`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from farm.methods.base import MethodConfig
from farm.methods.precision import Grid, Layer, config_groups


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    bits: Literal[4, 8] = Field(description="integer weight bits")
    group_size: int | None = Field(None, gt=0, le=8192, description="weights per scale; null = per output channel")

    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size)


class MixedConfig(MethodConfig):
    method: Literal["mixed"] = "mixed"
    cost_rank: ClassVar[int] = -2
    low: GridSpec = Field(GridSpec(bits=4, group_size=128), description="grid for most layers")
    high: GridSpec = Field(GridSpec(bits=8, group_size=None), description="grid for the fragile layers")
    algorithm: Literal["gptq", "rtn"] = Field("gptq", description="how weights are rounded (GPTQ reads calibration)")
    budget: float = Field(1.0, gt=0, description="largest perplexity increase allowed on the calibration probe text")
    probe_tokens: int = Field(4096, gt=0, le=1_000_000, description="calibration tokens each probe is scored on")
    probe_seq_len: int = Field(512, gt=1, le=131_072, description="tokens per probe window")
    high_layers: list[int] | None = Field(None, description="fixed decoder layers to keep high (skips the search)")

    @property
    def requires_calibration(self) -> bool:
        return True  # the sensitivity probe reads calibration text even when the rounding is RTN

    @property
    def distributable(self) -> bool:
        return False  # each probe reloads the model in one process

    def default_label(self) -> str:
        g = f"g{self.low.group_size}" if self.low.group_size else "ch"
        budget = f"{self.budget:g}".replace("+", "")  # labels become registry aliases: [a-z0-9_.-] only
        return f"mixed-w{self.low.bits}{g}-w{self.high.bits}-d{budget}"

    def group_sizes(self) -> list[int]:
        return [g.group_size for g in (self.low, self.high) if g.group_size]

    def modifiers(self) -> list[Any]:
        raise TypeError("the mixed method's recipe depends on the model's layers; use modifiers_for()")

    def modifiers_for(self, layers: list[Layer], high: set[int]) -> list[Any]:
        """The recipe keeping `high` layers at the high grid and the rest at the low grid."""
        groups = config_groups(layers, high, self.low.grid(), self.high.grid())
        if self.algorithm == "rtn":
            from llmcompressor.modifiers.quantization import QuantizationModifier

            return [QuantizationModifier(config_groups=groups, ignore=list(self.ignore))]
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=list(self.ignore), actorder="static")]
