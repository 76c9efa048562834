"""GPTQ: second-order weight-only quantization (W4A16 / W8A16) with llm-compressor's GPTQModifier."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from farm.methods.base import MethodConfig, int_weight_bits, int_weight_group
from farm.methods.rotation import ROTATION_HELP, Rotation, rotation_modifiers


class GPTQConfig(MethodConfig):
    method: Literal["gptq"] = "gptq"
    cost_rank: ClassVar[int] = 2
    later_fields: ClassVar[dict[str, Any]] = {"rotation": None}
    scheme: Literal["W4A16", "W8A16"] = Field("W4A16", description="weight bits / activation bits")
    group_size: int | None = Field(128, gt=0, le=8192, description="weights per scale; null = per output channel")
    symmetric: bool = Field(True, description="symmetric int grid (no zero point)")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Hessian dampening as a fraction of its mean diag")
    block_size: int = Field(128, gt=0, le=8192, description="columns updated per GPTQ block")
    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="activation ordering (llm-compressor's default; null turns it off)"
    )
    rotation: Rotation | None = Field(None, description=ROTATION_HELP)
    backend: Literal["llmcompressor", "gptqmodel"] = Field(
        "llmcompressor",
        description="llmcompressor (compressed-tensors format) or gptqmodel (GPTQ format, run "
        "in its own Ray runtime environment)",
    )

    @model_validator(mode="after")
    def _backend_settings(self) -> GPTQConfig:
        if self.backend == "gptqmodel" and self.actorder == "weight":
            raise ValueError("actorder 'weight' is llm-compressor's; gptqmodel has static, group or null")
        if self.backend == "gptqmodel" and self.rotation:
            raise ValueError("rotation is llm-compressor's transform; use backend llmcompressor")
        return self

    def gptqmodel_config(self) -> dict[str, Any]:
        """GPTQModel's QuantizeConfig arguments for the same settings (actorder -> desc_act/static_groups)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size or -1,
            "sym": self.symmetric,
            "desc_act": self.actorder is not None,
            "static_groups": self.actorder == "static",
            "damp_percent": self.dampening_frac,
        }

    @property
    def bits(self) -> int:
        return int(self.scheme[1])

    def default_label(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"gptq-{self.scheme.lower()}{g}" + (f"-{self.rotation}" if self.rotation else "")

    def weight_bits(self) -> float:
        return int_weight_bits(self.bits, self.group_size, self.symmetric)

    def group_sizes(self) -> list[int]:
        return [self.group_size] if self.group_size else []

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [
            *rotation_modifiers(self.rotation, list(self.ignore)),
            GPTQModifier(
                config_groups=int_weight_group(self.bits, self.group_size, self.symmetric),
                ignore=list(self.ignore),
                dampening_frac=self.dampening_frac,
                block_size=self.block_size,
                actorder=self.actorder,
            ),
        ]
