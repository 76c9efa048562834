"""AutoRound tunes in the model's own fp32 on a machine without an accelerator.

auto-round (0.15.1, called by llm-compressor 0.14's AutoRoundModifier) runs each layer's optimisation under bf16
autocast by default. On a CPU worker that is both slower and other numbers: farm keeps CPU models in fp32 and pins
the CPU kernels to AVX2 for reproducible figures (stages/modelio.py), where bf16 matmuls are emulated — measured on
SmolLM2-135M, 50 iterations per layer: ~16 minutes a layer under bf16 autocast in a farm worker, 20 s in fp32.
AutoRoundModifier does not expose auto-round's `amp` switch, so within the block the `AutoRound` it constructs
gets `amp=False`. With an accelerator nothing changes (bf16 autocast is what AutoRound is tuned for on GPUs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from farm.stages.llmc.swap import swapped


class Fp32Tuning:
    """Whether the block tuned AutoRound layers in fp32, as a line for the run's notes."""

    def __init__(self, active: bool):
        self.active = active

    def note(self) -> str | None:
        return (
            "AutoRound tuned in fp32, no bf16 autocast (no accelerator; stages/llmc/autoround_fp32.py)"
            if (self.active)
            else None
        )


@contextlib.contextmanager
def fp32_autoround_on_cpu() -> Iterator[Fp32Tuning]:
    import torch

    if torch.accelerator.is_available():
        yield Fp32Tuning(False)
        return
    from llmcompressor.modifiers.autoround import base

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def construct(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("amp", False)
            return original(*args, **kwargs)

        return construct

    with swapped(base, "AutoRound", make, "fp32 AutoRound tuning on CPU") as on:
        yield Fp32Tuning(on)
