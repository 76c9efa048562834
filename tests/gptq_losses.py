"""GPTQ's own per-module losses, read from llm-compressor's `quantize_weight` during a oneshot: the yardstick the
GPU and CPU tests use to say a speed-up left GPTQ's objective where it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def gptq_problem(batch: int, rows: int, n: int, group: int = 32) -> tuple[Any, Any, Any, Any]:
    """One `quantize_weight` input: weights, a positive-definite Hessian with uneven column scales, symmetric
    int4 group scales and zero points."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(batch, 4 * n, n) * (torch.rand(n) + 0.1)
    h = 2 * x.transpose(1, 2) @ x / x.shape[1]
    w = torch.randn(batch, rows, n) * 0.05
    scale = w.reshape(batch, rows, n // group, group).abs().amax(-1) / 7.5
    return w, h, scale, torch.zeros_like(scale, dtype=torch.int8)


def assert_scoped_swap(owner: Any, name: str, speedup: contextlib.AbstractContextManager[Any]) -> None:
    """Within `speedup`, `owner.name` is farm's; after the block (here left by an error) upstream's again."""
    import pytest

    original = getattr(owner, name)
    with pytest.raises(RuntimeError), speedup:
        assert getattr(owner, name) is not original
        raise RuntimeError("oneshot failed")
    assert getattr(owner, name) is original


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


def tiny_oneshot_loss(speedup: contextlib.AbstractContextManager[Any] | None = None) -> tuple[float, Any]:
    """GPTQ's summed layer loss of one oneshot of the tiny Llama fixture (fp32, CPU, 8 x 64 tokens), with a
    speed-up's swap entered under the loss observer; returns the loss and what the speed-up yielded."""
    import pytest
    from datasets import Dataset
    from llmcompressor import oneshot

    from farm.calibration import read_text, sample_windows
    from farm.methods import build_method
    from farm.stages.modelio import load_model, load_tokenizer

    root = Path(__file__).resolve().parents[1] / ".fixtures"
    model_dir, text = root / "models" / "tiny-llama", root / "shakespeare" / "calibration.txt"
    if not model_dir.exists():
        pytest.skip("fixtures not built (make fixtures)")
    windows = sample_windows(read_text(str(text)), load_tokenizer(model_dir), 8, 64, 0)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    with speedup or contextlib.nullcontext() as used, observed_losses() as losses:
        oneshot(
            model=load_model(model_dir, "cpu"),
            dataset=ds,
            recipe=build_method({"method": "gptq", "group_size": 32}).modifiers(),
            num_calibration_samples=len(ds),
            max_seq_length=64,
            shuffle_calibration_samples=False,
        )
    return sum(losses), used
