"""INT8 W8A8: int8 weights per output channel (GPTQ or round-to-nearest) and int8 activations, either dynamic
per token (no calibration for RTN weights) or static per tensor (scales calibrated)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from farm.methods.base import MethodConfig


class INT8Config(MethodConfig):
    method: Literal["int8"] = "int8"
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="per-token scales at run time, or per-tensor scales calibrated ahead of time"
    )
    weights: Literal["gptq", "rtn"] = Field("rtn", description="how int8 weights are rounded")

    @property
    def requires_calibration(self) -> bool:
        return self.activations == "static" or self.weights == "gptq"

    def weight_bits(self) -> float:
        return 8.0  # one byte per weight; per-channel or per-block scales are negligible per weight

    def default_label(self) -> str:
        return f"int8-w8a8-{self.activations}-{self.weights}"

    def config_groups(self) -> dict[str, Any]:
        acts = (
            {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
            if self.activations == "dynamic"
            else {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
        )
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier

        cls = GPTQModifier if self.weights == "gptq" else QuantizationModifier
        return [cls(config_groups=self.config_groups(), ignore=list(self.ignore))]
