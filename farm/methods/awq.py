"""AWQ: activation-aware scaling (llm-compressor's AWQModifier transform) followed by int4 weight quantization."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig, int_weight_bits, int_weight_group


class AWQConfig(MethodConfig):
    method: Literal["awq"] = "awq"
    cost_rank: ClassVar[int] = 0
    scheme: Literal["W4A16"] = Field("W4A16", description="weight bits / activation bits")
    group_size: int = Field(128, gt=0, le=8192, description="weights per scale")
    symmetric: bool = Field(False, description="AWQ defaults to an asymmetric grid (zero points)")
    duo_scaling: bool = Field(True, description="use weight as well as activation magnitudes for the scales")
    n_grid: int = Field(20, gt=0, le=1000, description="grid points searched per scale")
    backend: Literal["llmcompressor", "autoawq"] = Field(
        "llmcompressor",
        description="llmcompressor (compressed-tensors) or autoawq (AutoAWQ 0.2.9, GEMM format, "
        "in its own Ray runtime environment; archived upstream)",
    )

    def default_label(self) -> str:
        return f"awq-{self.scheme.lower()}-g{self.group_size}"

    def autoawq_config(self) -> dict[str, Any]:
        """AutoAWQ's quant_config for the same settings (its grid search has no n_grid/duo_scaling knobs)."""
        return {"zero_point": not self.symmetric, "q_group_size": self.group_size, "w_bit": 4, "version": "GEMM"}

    def group_sizes(self) -> list[int]:
        return [self.group_size]

    def weight_bits(self) -> float:
        return int_weight_bits(4, self.group_size, self.symmetric)

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(duo_scaling=self.duo_scaling, n_grid=self.n_grid),
            QuantizationModifier(
                config_groups=int_weight_group(4, self.group_size, self.symmetric), ignore=list(self.ignore)
            ),
        ]
