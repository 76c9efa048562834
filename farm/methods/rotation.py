"""Rotations applied before weight rounding: an orthogonal (Hadamard) change of basis spreads a layer's outlier
channels over all channels, so a 4-bit grid loses less. llm-compressor 0.14 ships both as transforms:

- `spinquant`: SpinQuant's R1 (the residual stream) and R2 (each head's value/output) rotations, fused into
  the weights. The checkpoint is plain weights: it serves and reloads like any other. R1 rotates the embeddings,
  so tied embeddings are untied (a larger checkpoint for models that tie them).
- `quip`: QuIP#'s input rotation of every Linear, half fused into the weights and half applied online at
  inference (the checkpoint carries a transform config; compressed-tensors applies it on reload).

A rotation is one field of a rounding method (GPTQ, RTN, AutoRound), so a search can vary it like any knob.
"""

from __future__ import annotations

from typing import Any, Literal

Rotation = Literal["spinquant", "quip"]
ROTATION_HELP = (
    "rotate before rounding: spinquant (R1+R2, fused into the weights) or quip (input rotations, "
    "half applied online at inference); null = none"
)


def rotation_modifiers(rotation: Rotation | None, ignore: list[str]) -> list[Any]:
    """The llm-compressor transform modifier that must run before the rounding modifier (none for None)."""
    if rotation is None:
        return []
    if rotation == "spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        return [SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard")]
    from llmcompressor.modifiers.transform import QuIPModifier

    return [QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore=list(ignore))]
