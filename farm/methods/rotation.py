"""Rotations applied before weight rounding: an orthogonal (Hadamard) change of basis spreads a layer's outlier
channels over all channels, so a 4-bit grid loses less. llm-compressor 0.14 ships both as transforms:

- `spinquant`: SpinQuant's R1 (the residual stream) and R2 (each head's value/output) rotations, fused into
  the weights. The checkpoint is plain weights: it serves and reloads like any other. R1 rotates the embeddings,
  so tied embeddings are untied (a larger checkpoint for models that tie them).
- `quip`: QuIP#'s input rotation of every Linear, half fused into the weights and half applied online at
  inference. Refused for now: the checkpoint carries the online half as a compressed-tensors transform config, and
  transformers 5.17 + compressed-tensors 0.19 do not reproduce it on reload (measured: SmolLM2 GPTQ W4 g64 with
  QuIP, held-out perplexity 43.47 in memory, 6.5e9 reloaded; the 2-layer test Llama 46,935 vs 48,902), so the
  variant a team would load is not the one that was measured.

A rotation is one field of a rounding method (GPTQ, RTN, AutoRound, mixed), so a search can vary it like any knob.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator

QUIP_REFUSED = (
    "rotation quip: transformers 5.17 does not apply its online rotations when it reloads the checkpoint "
    "(SmolLM2 GPTQ W4: held-out perplexity 43.47 in memory, 6.5e9 reloaded); use spinquant"
)


def _offered(value: str | None) -> str | None:
    if value == "quip":
        raise ValueError(QUIP_REFUSED)
    return value


Rotation = Annotated[Literal["spinquant", "quip"], AfterValidator(_offered)]
ROTATION_HELP = (
    "rotate before rounding: spinquant (R1+R2, fused into the weights; tied embeddings get untied); "
    "quip is refused until transformers reloads its online rotations; null = none"
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
