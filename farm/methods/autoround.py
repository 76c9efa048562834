"""AutoRound: rounding and clipping learned per decoder layer by signed gradient descent on the layer's output
error (llm-compressor's AutoRoundModifier over Intel's auto-round). Slower than GPTQ (`iters` optimizer steps
per layer), usually closer to the unquantized model at 4 bits, and the checkpoint is the same
compressed-tensors int format GPTQ writes, so it serves the same way.

Asymmetric grids keep their tuned zero points: llm-compressor 0.14.0.1 alone saves them as 0
(stages/llmc/autoround_zero_points.py carries them; where it cannot, the variant fails rather than save them)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.methods.base import MethodConfig, int_weight_bits, int_weight_group
from farm.methods.rotation import ROTATION_HELP, Rotation, rotation_modifiers


class AutoRoundConfig(MethodConfig):
    method: Literal["autoround"] = "autoround"
    cost_rank: ClassVar[int] = 1
    scheme: Literal["W4A16", "W8A16"] = Field("W4A16", description="weight bits / activation bits")
    group_size: int | None = Field(128, gt=0, le=8192, description="weights per scale; null = per output channel")
    symmetric: bool = Field(True, description="symmetric int grid (no zero point)")
    iters: int = Field(200, gt=0, le=10_000, description="optimizer steps per decoder layer")
    lr: float | None = Field(None, gt=0, le=1, description="learning rate (null: auto-round's 1/iters)")
    batch_size: int = Field(8, gt=0, le=1024, description="calibration samples per optimizer step")
    rotation: Rotation | None = Field(None, description=ROTATION_HELP)

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        if not self.symmetric:  # checkpoints made before farm carried the tuned zero points hold zeros: new ids
            out["zero_points"] = "tuned"
        return out

    @property
    def bits(self) -> int:
        return int(self.scheme[1])

    def default_label(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"autoround-{self.scheme.lower()}{g}" + (f"-{self.rotation}" if self.rotation else "")

    def group_sizes(self) -> list[int]:
        return [self.group_size] if self.group_size else []

    def weight_bits(self) -> float:
        return int_weight_bits(self.bits, self.group_size, self.symmetric)

    def modifiers(self) -> list[Any]:
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        return [
            *rotation_modifiers(self.rotation, list(self.ignore)),
            AutoRoundModifier(
                config_groups=int_weight_group(self.bits, self.group_size, self.symmetric),
                ignore=list(self.ignore),
                iters=self.iters,
                lr=self.lr,
                batch_size=self.batch_size,
                enable_torch_compile=False,  # eager everywhere: inductor on a CPU worker needs a C++ toolchain
            ),
        ]
