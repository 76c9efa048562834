"""Round-to-nearest integer weights (W4A16 / W8A16, grouped or per channel): data-free, seconds to run; the
baseline GPTQ and AWQ must beat."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig, int_weight_bits, int_weight_group
from farm.methods.rotation import ROTATION_HELP, Rotation, rotation_modifiers


class RTNConfig(MethodConfig):
    method: Literal["rtn"] = "rtn"
    later_fields: ClassVar[dict[str, Any]] = {"rotation": None}
    scheme: Literal["W4A16", "W8A16"] = Field("W8A16", description="weight bits / activation bits")
    group_size: int | None = Field(None, gt=0, le=8192, description="weights per scale; null = per output channel")
    symmetric: bool = Field(True, description="symmetric int grid (no zero point)")
    rotation: Rotation | None = Field(None, description=ROTATION_HELP)

    @property
    def requires_calibration(self) -> bool:
        return False

    def default_label(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"rtn-{self.scheme.lower()}{g}" + (f"-{self.rotation}" if self.rotation else "")

    def weight_bits(self) -> float:
        return int_weight_bits(int(self.scheme[1]), self.group_size, self.symmetric)

    def group_sizes(self) -> list[int]:
        return [self.group_size] if self.group_size else []

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [
            *rotation_modifiers(self.rotation, list(self.ignore)),
            QuantizationModifier(
                config_groups=int_weight_group(int(self.scheme[1]), self.group_size, self.symmetric),
                ignore=list(self.ignore),
            ),
        ]
