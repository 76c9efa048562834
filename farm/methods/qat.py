"""QAT: a short quantization-aware fine-tune, then conversion to the same integer scheme as the PTQ variants.

The decoder's Linear weights are fake-quantized in the forward pass by torchao's QAT (straight-through
gradients, full-precision master weights) while AdamW trains on the calibration text; the trained weights are
then rounded by llm-compressor to the same grid, so the artifact has the same format and size as `rtn`/`gptq`
at this scheme and a job can compare them at equal size."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig, int_weight_group
from farm.methods.precision import Grid


class QATConfig(MethodConfig):
    method: Literal["qat"] = "qat"
    cost_rank: ClassVar[int] = -1
    scheme: Literal["W4A16", "W8A16"] = Field("W4A16", description="weight bits / activation bits")
    group_size: int | None = Field(128, gt=0, le=8192, description="weights per scale; null = per output channel")
    steps: int = Field(100, gt=0, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(4, gt=0, le=4096, description="windows per step")
    train_samples: int = Field(256, gt=0, le=1_000_000, description="calibration windows drawn for training")
    learning_rate: float = Field(1e-5, gt=0, lt=1, description="AdamW learning rate (constant after warmup)")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")

    @property
    def distributable(self) -> bool:
        return False  # one process trains; DDP fine-tuning is not wired

    @property
    def grid(self) -> Grid:
        return Grid(int(self.scheme[1]), self.group_size)

    def default_label(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"qat-{self.scheme.lower()}{g}-s{self.steps}"

    def group_sizes(self) -> list[int]:
        return [self.group_size] if self.group_size else []

    def modifiers(self) -> list[Any]:
        """The conversion after training: round-to-nearest at the trained grid (what the forward pass saw)."""
        from llmcompressor.modifiers.quantization import QuantizationModifier

        groups = int_weight_group(self.grid.bits, self.group_size, symmetric=True)
        return [QuantizationModifier(config_groups=groups, ignore=list(self.ignore))]
