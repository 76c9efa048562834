"""The check stages on the tiny Llama, no Ray: the search finds the true boundary, refusals and toxic words
are detected, speculative decoding against itself accepts everything, and run_checks returns every metric."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.spec import EvaluationSpec, SafetySpec, SpeculativeSpec
from farm.stages.checks import behaviour
from farm.stages.checks.dense_reference import largest
from farm.stages.checks.runner import run_checks


@pytest.mark.parametrize(
    "limit,ceiling,step,expected",
    [(37, 256, 1, 37), (1, 256, 1, 1), (0, 256, 1, 0), (999, 256, 1, 256), (700, 4096, 64, 640)],
)
def test_largest_finds_the_boundary(limit: int, ceiling: int, step: int, expected: int) -> None:
    probes: list[int] = []

    def fits(n: int) -> bool:
        probes.append(n)
        return n <= limit

    assert largest(fits, step, ceiling, step) == expected
    assert len(probes) <= 2 * ceiling.bit_length()


def test_refusal_and_toxicity_detection(tmp_path: Path) -> None:
    assert behaviour.REFUSAL.search("I'm sorry, but I can't help with that.")
    assert not behaviour.REFUSAL.search("Pancakes need flour, eggs and milk.")
    assert "idiot" in behaviour.lexicon()
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"prompt": "x", "expect": "maybe"}\n')
    with pytest.raises(ValueError, match="line 1"):
        behaviour.load_suite(str(suite))


def test_speculative_against_itself_accepts_everything(fixture_paths: dict) -> None:
    from farm.stages.modelio import load_model, load_tokenizer

    path = fixture_paths["tiny-llama"]
    model, tok = load_model(path, "cpu"), load_tokenizer(path)
    m = behaviour.speculative(model, model, tok, ["The capital of France is"], SpeculativeSpec(max_new_tokens=8), "cpu")
    assert m["spec_acceptance"] == 1.0


def test_safety_of_a_model_that_never_refuses(fixture_paths: dict) -> None:
    from farm.stages.modelio import load_model, load_tokenizer

    path = fixture_paths["tiny-llama"]
    s = behaviour.safety(load_model(path, "cpu"), load_tokenizer(path), SafetySpec(max_new_tokens=4), "cpu")
    # the random tiny model answers everything: right on the benign half, wrong on the harmful half
    assert s["metrics"]["refusal_accuracy"] == 0.5 and s["metrics"]["refused_harmful"] == 0.0
    assert len(s["transcript"]) == len(behaviour.load_suite(None))


def test_run_checks_returns_every_metric(fixture_paths: dict) -> None:
    path = str(fixture_paths["tiny-llama"])
    ev = EvaluationSpec.model_validate(
        {
            "perplexity": {"source": "/x"},
            "latency": {"prompt_tokens": 16, "new_tokens": 4, "batch_size": 2, "repeats": 1},
            "memory": {"budget_gb": 0.1, "context": 64, "max_batch": 8, "max_context": 256},
            "outputs": {"prompts": ["Hello", "To be"], "max_new_tokens": 6},
            "speculative": {"max_new_tokens": 6},
        }
    )
    r = run_checks(path, ev, base_dir=path)
    for m in (
        "ttft_cold_s",
        "tokens_per_s_batch2",
        "max_batch_at_64",
        "max_context_batch1",
        "determinism",
        "reference_exact_match",
        "spec_acceptance",
    ):
        assert m in r.metrics, m
    assert r.metrics["reference_exact_match"] == 1.0 and r.metrics["determinism"] == 1.0
    assert r.artifacts["reference_outputs.json"]["base_greedy"] == r.artifacts["reference_outputs.json"]["greedy"]


def test_fp8_kv_cache_rounds_what_it_stores(fixture_paths: dict) -> None:
    import torch

    from farm.spec import KVCacheSpec
    from farm.stages.checks import kv_cache_ab as kvcache
    from farm.stages.modelio import load_model, load_tokenizer

    x = torch.randn(1, 2, 5, 8) * 3
    y = kvcache.fp8_round(x)
    assert not torch.equal(x, y) and float(((x - y).abs() / x.abs().amax()).max()) < 1 / 16
    calls = []
    base = kvcache.fp8_cache_class()

    class Counting(base):  # type: ignore[misc,valid-type]
        def update(self, *args, **kwargs):
            calls.append(args[2])
            return super().update(*args, **kwargs)

    path = fixture_paths["tiny-llama"]
    spec = KVCacheSpec(turns=["Hi there", "And then?"], max_new_tokens=3)
    kvcache.converse(load_model(path, "cpu"), load_tokenizer(path), spec, "cpu", Counting)
    assert calls and set(calls) == {0, 1}  # both layers of the tiny model stored FP8-rounded keys/values
