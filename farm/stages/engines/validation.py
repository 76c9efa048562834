"""Judging candidates on the job's validation text: the text is read once, checked against the identity the job
planned (a changed file fails the variant rather than being judged on other text), cut into windows like the
held-out text, and scored by perplexity; a budget is turned into the perplexity delta it allows."""

from __future__ import annotations

from typing import Any

from farm.calibration import heldout_windows, read_identified
from farm.errors import InputChanged
from farm.methods.budget import allowed_delta
from farm.stages.evaluate import perplexity
from farm.stages.quantize import ValidationText

__all__ = ["allowed_delta", "base_perplexity", "validation_windows"]


def validation_windows(text: ValidationText, tokenizer: Any) -> list[list[int]]:
    body, sha = read_identified(text.source)
    if text.sha256 and sha != text.sha256:
        raise InputChanged(
            f"validation text {text.source} changed since the job was planned (sha256 {text.sha256[:12]} planned, "
            f"{sha[:12]} read): this variant was not built; re-run the job to plan it on the new text"
        )
    return heldout_windows(body, tokenizer, text.max_tokens, text.seq_len)


def base_perplexity(model_dir: str, windows: list[list[int]], device: str, trust_remote_code: bool) -> float:
    """The unquantized model's perplexity on the validation windows (what every candidate is compared with)."""
    from farm.stages.modelio import load_model

    model = load_model(model_dir, device, trust_remote_code)
    try:
        return perplexity(model, windows, device)[0]
    finally:
        del model
