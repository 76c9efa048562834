"""AutoRound, rotations and the recipe search on the tiny Llama (no Ray): each checkpoint reloads with plain
transformers and evaluates; the search keeps the smallest candidate within budget, stops early, reports every
candidate it built, keeps going past a candidate that fails, and falls back to the closest when none passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.methods import build_method
from farm.stages.evaluate import EvaluateRequest, evaluate
from farm.stages.modelio import decoder_linear_bytes
from farm.stages.quantize import CalibrationDraw, QuantizeRequest, ValidationText, quantize


def _request(paths: dict, out: Path, method: dict) -> QuantizeRequest:
    return QuantizeRequest(
        model_dir=str(paths["tiny-llama"]),
        out_dir=str(out),
        method=build_method(method),
        calibration=CalibrationDraw(str(paths["shakespeare"] / "calibration.txt"), 4, 64, 0),
        validation=ValidationText(str(paths["validation"] / "validation.txt"), None, 512, 128),
    )


def _evaluates(paths: dict, out: Path) -> float:
    text = paths["shakespeare"] / "heldout.txt"
    e = evaluate(EvaluateRequest(str(out), str(text), 256, 128, "Hello", 4))
    assert e.perplexity > 1 and e.generation
    return e.perplexity


@pytest.mark.parametrize(
    "method",
    [
        {"method": "autoround", "group_size": 64, "iters": 4, "batch_size": 2},
        {"method": "gptq", "group_size": 64, "symmetric": False, "rotation": "spinquant"},
        {"method": "rtn", "scheme": "W4A16", "group_size": 64, "rotation": "spinquant"},
    ],
    ids=["autoround", "gptq-spinquant", "rtn-spinquant"],
)
def test_new_recipes_write_checkpoints_that_reload(fixture_paths: dict, tmp_path: Path, method: dict) -> None:
    q = quantize(_request(fixture_paths, tmp_path / "q", method))
    assert any("AutoRound tuned in fp32" in n for n in q.notes) == (method["method"] == "autoround")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 64
    _evaluates(fixture_paths, tmp_path / "q")


def test_asymmetric_autoround_saves_the_grid_it_tuned(
    fixture_paths: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint of an asymmetric AutoRound variant dequantizes to the weights AutoRound tuned: its zero
    points are the tuned ones, in compressed-tensors' signed grid (llm-compressor alone saves zeros)."""
    import torch
    from compressed_tensors.compressors.base import decompress_module
    from transformers import AutoModelForCausalLM

    import farm.stages.llmc.autoround_zero_points as zero_points

    tuned: dict[str, torch.Tensor] = {}
    real = zero_points.carry

    def seen(layer, registered):  # AutoRound leaves each Linear's weight as its dequantized tuned value
        tuned.update(
            {f"{layer._tmp_name}.{n}": m.weight.detach().clone() for n, m in layer.named_modules() if hasattr(m, "zp")}
        )
        return real(layer, registered)

    monkeypatch.setattr(zero_points, "carry", seen)
    method = {"method": "autoround", "group_size": 64, "symmetric": False, "iters": 4, "batch_size": 2}
    q = quantize(_request(fixture_paths, tmp_path / "q", method))
    assert any(f"zero points carried into {len(tuned)} module" in n for n in q.notes) and tuned
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    for name, weight in tuned.items():
        module = reloaded.get_submodule(name)
        decompress_module(module)  # the weights the served checkpoint computes with: (q - zero point) * scale
        torch.testing.assert_close(module.weight, weight.float(), rtol=0, atol=1e-6, msg=name)
    _evaluates(fixture_paths, tmp_path / "q")


def test_search_stops_at_the_first_candidate_within_budget(fixture_paths: dict, tmp_path: Path) -> None:
    method = {
        "method": "search",
        "budget": 1e9,
        "candidates": [{"method": "fp8"}, {"method": "rtn", "scheme": "W4A16", "group_size": 64}],
        "vary": {"symmetric": [False, True]},
    }
    q = quantize(_request(fixture_paths, tmp_path / "q", method))
    doc = q.documents["search.json"]
    # smallest first: symmetric W4 (4.25 bits) before asymmetric (4.31) before FP8; the first passes, so it stops
    assert [c["label"] for c in q.candidates] == ["rtn-w4a16-g64.st"] and doc["chosen"] == "rtn-w4a16-g64.st"
    assert q.candidates[0]["status"] == "chosen" and q.metrics["search.met"] == 1
    assert q.metrics["search.candidates"] == 3 and q.metrics["search.built"] == 1
    assert q.candidates[0]["metrics"]["decoder_linear_bytes"] == decoder_linear_bytes(tmp_path / "q")
    assert not (tmp_path / "candidates").exists()  # only the chosen checkpoint stays
    _evaluates(fixture_paths, tmp_path / "q")


def test_search_past_a_passing_mixed_candidate_tries_what_could_be_smaller(fixture_paths: dict, tmp_path: Path) -> None:
    """A mixed candidate sorts by its low grid (the least it can take) but is built larger; once it passes, the
    candidates estimated below what it took are still tried, and the smallest within budget wins."""
    method = {
        "method": "search",
        "budget": 1e9,
        "candidates": [
            {"method": "mixed", "low": {"bits": 4, "group_size": 64}, "algorithm": "rtn", "high_layers": [0]},
            {"method": "rtn", "scheme": "W4A16", "group_size": 32},
            {"method": "rtn", "scheme": "W8A16"},
        ],
    }
    q = quantize(_request(fixture_paths, tmp_path / "q", method))
    rows = {c["label"]: c for c in q.candidates}
    assert list(rows) == ["mixed-w4g64-w8-d1", "rtn-w4a16-g32"]  # W8 (8 bits) cannot undercut either: not built
    assert rows["mixed-w4g64-w8-d1"]["status"] == "passed" and rows["rtn-w4a16-g32"]["status"] == "chosen"
    mixed, uniform = (rows[k]["metrics"]["decoder_linear_bytes"] for k in rows)
    assert uniform < mixed and q.metrics["search.decoder_linear_bytes"] == uniform


def test_search_without_a_passing_candidate_keeps_the_closest(
    fixture_paths: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import farm.stages.engines.search as search

    real = search.quantize

    def broken_fp8(req: QuantizeRequest):  # a recipe the model cannot take
        if req.method.method == "fp8":
            raise RuntimeError("this model cannot take FP8\nsecond line")
        return real(req)

    monkeypatch.setattr(search, "quantize", broken_fp8)
    method = {
        "method": "search",
        "budget": 1e-9,
        "candidates": [{"method": "rtn", "scheme": "W4A16", "group_size": 64}, {"method": "fp8"}],
        "vary": {"group_size": [64, 32]},
    }
    q = quantize(_request(fixture_paths, tmp_path / "q", method))
    rows = {c["label"]: c for c in q.candidates}
    assert set(rows) == {"rtn-w4a16-g64.gs64", "rtn-w4a16-g64.gs32", "fp8-dynamic"}  # no early stop: none passed
    assert rows["fp8-dynamic"]["status"] == "failed" and rows["fp8-dynamic"]["error"] == (
        "RuntimeError: this model cannot take FP8"
    )
    deltas = {k: r["metrics"]["validation_perplexity_delta"] for k, r in rows.items() if r["error"] is None}
    closest = min(deltas, key=deltas.__getitem__)
    assert rows[closest]["status"] == "chosen" and q.metrics["search.met"] == 0
    assert q.metrics["search.failed"] == 1 and any("outside the budget" in n for n in q.notes)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]


def test_search_needs_validation_text(fixture_paths: dict, tmp_path: Path) -> None:
    from dataclasses import replace

    req = _request(fixture_paths, tmp_path / "q", {"method": "search", "budget": 1, "candidates": [{"method": "fp8"}]})
    with pytest.raises(ValueError, match="validation text"):
        quantize(replace(req, validation=None))
