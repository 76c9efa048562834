"""SmoothQuant W8A8 INT8: migrate activation outliers into weights, then int8 weights (GPTQ or round-to-nearest,
per channel) with dynamic per-token int8 activations."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig


class SmoothQuantConfig(MethodConfig):
    method: Literal["smoothquant"] = "smoothquant"
    cost_rank: ClassVar[int] = 1
    scheme: Literal["W8A8"] = Field("W8A8", description="int8 weights and activations")
    smoothing_strength: float = Field(0.8, gt=0, lt=1, description="alpha: how much difficulty moves to weights")
    weights: Literal["gptq", "rtn"] = Field("gptq", description="how int8 weights are rounded after smoothing")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (weights=gptq)")

    def default_label(self) -> str:
        return f"smoothquant-w8a8-{self.weights}"

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        smooth = SmoothQuantModifier(smoothing_strength=self.smoothing_strength)
        quant: Any
        if self.weights == "gptq":
            quant = GPTQModifier(
                targets="Linear", scheme=self.scheme, ignore=list(self.ignore), dampening_frac=self.dampening_frac
            )
        else:
            quant = QuantizationModifier(targets="Linear", scheme=self.scheme, ignore=list(self.ignore))
        return [smooth, quant]
