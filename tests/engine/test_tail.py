"""Ending the sequential pipeline's last subgraph at its last quantized module leaves the quantized model exactly
as it was, and only applies where nothing in the head is calibrated (CPU, the tiny Llama fixture)."""

import contextlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from farm.methods import build_method  # noqa: E402
from farm.stages.llmc.idle_tail import applies, idle_tail_skipped  # noqa: E402
from tests.gptq_losses import assert_scoped_swap  # noqa: E402


def quantized(method: dict, skip: bool) -> tuple[dict, int]:
    from datasets import Dataset
    from llmcompressor import oneshot

    from farm.stages.modelio import load_model

    model_dir = Path(__file__).resolve().parents[2] / ".fixtures" / "models" / "tiny-llama"
    if not model_dir.exists():
        pytest.skip("fixtures not built (make fixtures)")
    model = load_model(model_dir, "cpu")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(1)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 8})
    with idle_tail_skipped(model) if skip else contextlib.nullcontext() as skipped:
        oneshot(
            model=model,
            dataset=ds,
            recipe=build_method(method).modifiers(),
            num_calibration_samples=8,
            max_seq_length=32,
            shuffle_calibration_samples=False,
        )
    return {k: v.clone() for k, v in model.state_dict().items()}, getattr(skipped, "nodes", 0)


def test_same_weights_without_the_head_passes() -> None:
    method = {"method": "gptq", "group_size": 32, "ignore": ["lm_head"]}
    full, _ = quantized(method, skip=False)
    fast, skipped = quantized(method, skip=True)
    assert skipped >= 2  # at least the final norm and lm_head
    assert full.keys() == fast.keys()
    for name in full:
        assert torch.equal(full[name], fast[name]), name


def test_a_quantized_head_keeps_its_passes() -> None:
    _, skipped = quantized({"method": "gptq", "group_size": 32, "ignore": []}, skip=True)
    assert skipped == 0


def test_only_for_scheme_modifiers_and_scoped() -> None:
    assert applies(build_method({"method": "gptq"}).modifiers())
    assert not applies(build_method({"method": "smoothquant"}).modifiers())
    assert not applies([])
    from llmcompressor.pipelines.sequential import pipeline

    assert_scoped_swap(pipeline, "trace_subgraphs", idle_tail_skipped(object()))
