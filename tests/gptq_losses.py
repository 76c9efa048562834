"""GPTQ's own per-module losses, read from llm-compressor's `quantize_weight` during a oneshot: the yardstick the
GPU and CPU tests use to say a speed-up left GPTQ's objective where it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def observed_losses() -> Iterator[list[float]]:
    from llmcompressor.modifiers.gptq import base

    losses: list[float] = []
    original = base.quantize_weight

    def observed(*args: Any, **kwargs: Any) -> Any:
        q, loss, fallback = original(*args, **kwargs)
        losses.extend(loss.tolist())
        return q, loss, fallback

    base.quantize_weight = observed
    try:
        yield losses
    finally:
        base.quantize_weight = original
