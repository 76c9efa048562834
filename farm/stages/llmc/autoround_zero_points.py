"""Asymmetric AutoRound keeps the zero points it tuned.

llm-compressor 0.14.0.1's `AutoRoundModifier._postprocess_qparams` carries auto-round's (0.15.1) per-group
`scale` into compressed-tensors' `weight_scale`, but has no entry for auto-round's `zp`: the zero-point
placeholder registered before tuning (zeros) is what the checkpoint gets. An asymmetric grid saved with zero
points of 0 is not the grid AutoRound tuned (SmolLM2 W4A16 g64: held-out perplexity +64.93 instead of a few
points). Within the block each layer's `zp` becomes its `weight_zero_point` before upstream's mapping runs.

The two libraries count the grid differently: auto-round's asymmetric levels are 0..2^b-1 with
`q = round(w / s) + zp`, compressed-tensors' are -2^(b-1)..2^(b-1)-1 with the same formula, so the same
dequantized weight `s * (q - zp)` needs `zp_ct = zp_ar - 2^(b-1)`. auto-round leaves each Linear's weight as its
dequantized tuned value, so compressing it with the carried scale and zero point gives back AutoRound's levels
(tests/engine/test_search_stage.py checks the saved grid reproduces the tuned weights). Symmetric grids are left
to upstream: their zero point is 0 in compressed-tensors' convention, which is what the placeholder holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from farm.stages.llmc.swap import swapped

ZERO_POINT = "weight_zero_point"


class CarriedZeroPoints:
    """How many Linear modules got their tuned zero points during one oneshot, as a line for the run's notes."""

    def __init__(self) -> None:
        self.n = 0

    def note(self) -> str | None:
        return (
            f"AutoRound's tuned zero points carried into {self.n} module(s) (stages/llmc/autoround_zero_points.py)"
            if self.n
            else None
        )


def carry(model: Any, registered: dict[str, dict[str, Any]]) -> int:
    """Turn every asymmetric int layer's auto-round `zp` under `model` into its compressed-tensors
    `weight_zero_point` (shape and dtype of the placeholder `registered` holds for it); returns how many."""
    import torch

    n = 0
    for name, module in model.named_modules():
        zp = getattr(module, "zp", None)
        placeholder = registered.get(name, {}).get(ZERO_POINT)
        weights = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if not isinstance(zp, torch.Tensor) or placeholder is None or weights is None:
            continue
        if weights.symmetric or getattr(weights.type, "value", weights.type) != "int":
            continue
        offset = 2 ** (weights.num_bits - 1)
        value = (zp.float() - offset).round().to(placeholder.dtype).to(placeholder.device).reshape(placeholder.shape)
        delattr(module, "zp")
        module.register_parameter(ZERO_POINT, torch.nn.Parameter(value, requires_grad=False))
        n += 1
    return n


NOT_KEPT = (
    "asymmetric AutoRound: {why}, so its checkpoint would hold zero points of 0 instead of the tuned ones "
    "(stages/llmc/autoround_zero_points.py); use symmetric: true"
)


@contextlib.contextmanager
def tuned_zero_points_kept(asymmetric: bool) -> Iterator[CarriedZeroPoints]:
    """Within the block AutoRound's tuned zero points reach the checkpoint. For an `asymmetric` recipe, a block
    where they could not be carried (the replacement is off for this upstream version, or found no zero point)
    raises instead of letting a wrong checkpoint be saved."""
    from llmcompressor.modifiers.autoround.base import AutoRoundModifier

    carried = CarriedZeroPoints()

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def postprocess(self: Any, model: Any, llmc_registered_qparams: dict[str, dict[str, Any]]) -> Any:
            carried.n += carry(model, llmc_registered_qparams)
            return original(self, model, llmc_registered_qparams)

        return postprocess

    with swapped(AutoRoundModifier, "_postprocess_qparams", make, "AutoRound's zero points kept") as on:
        if asymmetric and not on:
            raise RuntimeError(NOT_KEPT.format(why="farm's zero-point carry is off for this llm-compressor"))
        yield carried
    if asymmetric and not carried.n:
        raise RuntimeError(NOT_KEPT.format(why="no tuned zero point was found on any layer"))
