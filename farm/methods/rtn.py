"""Round-to-nearest integer weights (W4A16 / W8A16, grouped or per channel): data-free, seconds to run; the
baseline GPTQ and AWQ must beat."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from farm.methods.base import MethodConfig, int_weight_group


class RTNConfig(MethodConfig):
    method: Literal["rtn"] = "rtn"
    scheme: Literal["W4A16", "W8A16"] = Field("W8A16", description="weight bits / activation bits")
    group_size: int | None = Field(None, gt=0, le=8192, description="weights per scale; null = per output channel")
    symmetric: bool = Field(True, description="symmetric int grid (no zero point)")

    @property
    def requires_calibration(self) -> bool:
        return False

    def default_label(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"rtn-{self.scheme.lower()}{g}"

    def group_sizes(self) -> list[int]:
        return [self.group_size] if self.group_size else []

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [
            QuantizationModifier(
                config_groups=int_weight_group(int(self.scheme[1]), self.group_size, self.symmetric),
                ignore=list(self.ignore),
            )
        ]
