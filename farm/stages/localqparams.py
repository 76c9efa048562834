"""GPTQ's fresh quantization parameters made on every data-parallel rank instead of broadcast from rank 0.

When a modifier attaches its schemes (`initialize_quantization`), compressed-tensors registers each quantized
module's new `weight_scale` / `weight_zero_point` (and `weight_g_idx`) in the module's offload cache; on a GPU
replica in a process group that is the distributed device cache, which broadcasts rank 0's fresh tensor to the
others: one NCCL call per tensor (an 8B Llama: 519 calls, 0.4 s of a 4-rank set-up measured in session 10) for
values nobody reads. GPTQ recomputes every weight's parameters on every rank from the (identical) replica weights
when its layer's calibration ends (`observe`), then the rank that solved each module broadcasts its result; the
parameters made at attach time are only placeholders (`torch.empty` scales, zero points of zeros).

So within the block the distributed device cache offloads a new tensor like the plain device cache (no
broadcast), only while a modifier attaches its schemes, and only for recipes of GPTQ modifiers. Shared host
copies (`DistributedCPUCache`, farm's "shared" placement) are untouched: there every rank must see rank 0's tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from farm.stages.swap import swapped

GPTQ = "GPTQModifier"


def applies(recipe: list[Any], world: int) -> bool:
    """Whether the recipe's fresh parameters are all recomputed on every rank before use (GPTQ only)."""
    return world > 1 and bool(recipe) and all(type(m).__name__ == GPTQ for m in recipe)


@dataclass
class Attached:
    """Schemes attached with their parameters made on each rank (for the run's notes)."""

    calls: int = 0

    def note(self) -> str | None:
        if not self.calls:
            return None
        return "quantization parameters made on every rank at attach time, not broadcast from rank 0 " \
               "(stages/localqparams.py)"


@contextlib.contextmanager
def qparams_made_on_every_rank() -> Iterator[Attached]:
    from compressed_tensors.offload.cache import DeviceCache, DistributedDeviceCache
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    attached = Attached()

    def make(original: Any) -> Any:
        def initialize_quantization(self: Any, model: Any) -> Any:
            with patch_attr(DistributedDeviceCache, "offload", DeviceCache.offload):
                result = original(self, model)
            attached.calls += 1
            return result

        return initialize_quantization

    with swapped(QuantizationMixin, "initialize_quantization", make, "local quantization parameters"):
        yield attached
