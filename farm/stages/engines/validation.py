"""Judging candidates on the job's validation text: the text is read once, checked against the identity the job
planned (a changed file fails the variant rather than being judged on other text), cut into windows like the
held-out text, and scored by perplexity; a budget is turned into the perplexity delta it allows."""

from __future__ import annotations

from typing import Any

from farm.calibration import heldout_windows, read_identified
from farm.errors import InputChanged
from farm.methods.budget import allowed_delta
from farm.stages.evaluate import perplexity
from farm.stages.quantize import QuantizeRequest, ValidationText

__all__ = ["allowed_delta", "judging", "perplexity_of", "validation_windows"]


def judging(req: QuantizeRequest, what: str) -> tuple[Any, list[list[int]]]:
    """The tokenizer and validation windows of a method that builds and judges candidates in one process
    (search, mixed); refuses a request that is a data-parallel rank or carries no validation text."""
    from farm.stages.modelio import load_tokenizer

    if req.world > 1:
        raise ValueError(f"{what} builds its candidates in one process (ranks: 1)")
    if req.validation is None:
        raise ValueError(f"{what} is judged on the job's validation text, and the request carries none")
    tokenizer = load_tokenizer(req.model_dir, req.trust_remote_code)
    return tokenizer, validation_windows(req.validation, tokenizer)


def validation_windows(text: ValidationText, tokenizer: Any) -> list[list[int]]:
    body, sha = read_identified(text.source)
    if text.sha256 and sha != text.sha256:
        raise InputChanged(
            f"validation text {text.source} changed since the job was planned (sha256 {text.sha256[:12]} planned, "
            f"{sha[:12]} read): this variant was not built; re-run the job to plan it on the new text"
        )
    return heldout_windows(body, tokenizer, text.max_tokens, text.seq_len)


def perplexity_of(model_dir: str, windows: list[list[int]], device: str, trust_remote_code: bool) -> float:
    """A checkpoint's perplexity on the validation windows, loaded as the evaluation loads it (the base, a
    candidate, a chosen variant)."""
    from farm.stages.modelio import load_model

    model = load_model(model_dir, device, trust_remote_code)
    try:
        return perplexity(model, windows, device)[0]
    finally:
        del model
