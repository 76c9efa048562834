"""Mixed precision on the tiny Llama (no Ray): the profile, a fixed and a searched assignment, the saved
recipe's groups, reload, and `farm sensitivity` recording its profile in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.methods import build_method
from farm.methods.precision import Grid
from farm.stages.evaluate import EvaluateRequest, evaluate
from farm.stages.quantize import CalibrationDraw, QuantizeRequest, ValidationText, quantize
from tests.conftest import tiny_spec, write_spec


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test profiles afresh (profiles are cached under FARM_CACHE)."""
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _request(paths: dict, out: Path, **method: object) -> QuantizeRequest:
    text = paths["shakespeare"] / "calibration.txt"
    return QuantizeRequest(
        model_dir=str(paths["tiny-llama"]),
        out_dir=str(out),
        method=build_method({"method": "mixed", **method}),
        calibration=CalibrationDraw(str(text), 4, 64, 0),
        validation=ValidationText(str(paths["validation"] / "validation.txt"), None, 512, 128),
    )


def test_round_to_grid_and_layers(fixture_paths: dict) -> None:
    import torch

    from farm.stages.engines.fakequant import round_to_grid
    from farm.stages.engines.sensitivity import decoder_layers
    from farm.stages.modelio import load_model

    model = load_model(fixture_paths["tiny-llama"], "cpu")
    layers = decoder_layers(model)
    assert [layer.index for layer in layers] == [0, 1] and "mlp.down_proj" in layers[0].linears
    assert len(layers[0].linears) == 7
    w = torch.randn(8, 128)
    q = round_to_grid(w, Grid(4, 64))
    for g in q.reshape(8, 2, 64):
        for row in g:
            assert len(torch.unique(row)) <= 16
    assert (q - w).abs().max() <= w.abs().max() / 7.5 / 2 + 1e-6  # compressed-tensors: scale = max / 7.5


def test_fixed_assignment_writes_two_grids(fixture_paths: dict, tmp_path: Path) -> None:
    q = quantize(_request(fixture_paths, tmp_path / "q", high_layers=[1], low={"bits": 4, "group_size": 64}))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g for g in cfg.values()}
    assert r"layers\.(1)\." in by_bits[8]["targets"][0] and r"layers\.(0)\." in by_bits[4]["targets"][0]
    assert q.metrics["mixed.high_layers"] == 1 and 4 < q.metrics["mixed.avg_weight_bits"] < 8
    search = q.documents["mixed_search.json"]
    assert search["high_layers"] == [1] and len(search["probes"]) == 1
    assert set(q.documents["sensitivity.json"]["layers"]) == {"0", "1"}
    assert "sensitivity.layer_000" in q.metrics and "sensitivity.embeddings_tied_lm_head" in q.metrics
    text = fixture_paths["shakespeare"]
    e = evaluate(EvaluateRequest(str(tmp_path / "q"), str(text / "heldout.txt"), 256, 128, "Hello", 4))
    assert e.perplexity > 1 and e.weights_bytes > 0
    with pytest.raises(ValueError, match="not decoder layers"):
        quantize(_request(fixture_paths, tmp_path / "bad", high_layers=[7]))


def test_search_stops_at_zero_upgrades_when_uniform_meets_budget(
    fixture_paths: dict, tmp_path: Path, own_cache: Path
) -> None:
    q = quantize(_request(fixture_paths, tmp_path / "q", algorithm="rtn", budget=1e9))
    search = q.documents["mixed_search.json"]
    assert search["met"] and search["high_layers"] == [] and [p["upgraded"] for p in search["probes"]] == [0]
    assert (tmp_path / "q" / "model.safetensors").exists()
    assert len(list((own_cache / "sensitivity").glob("*.json"))) == 1 and not any("reused" in n for n in q.notes)
    again = quantize(_request(fixture_paths, tmp_path / "q2", algorithm="rtn", budget=1e8))  # another budget
    assert any("profile reused" in n for n in again.notes)
    assert again.documents["sensitivity.json"] == q.documents["sensitivity.json"]


def test_sensitivity_command_records_the_profile(fixture_paths: dict, tmp_path: Path, capsys) -> None:
    from farm.cli import main
    from farm.tracking.mlflow_store import MlflowStore

    spec = write_spec(tmp_path / "job.yaml", tiny_spec(fixture_paths, str(tmp_path / "farm")))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        main(
            [
                "sensitivity",
                str(spec),
                "--tokens",
                "512",
                "--seq-len",
                "128",
                "--group-size",
                "64",
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "layer 0" in out and "layer 1" in out and "embeddings_tied_lm_head" in out
    store = MlflowStore(uri, "tiny")
    (run,) = store.find_runs(["tags.`farm.role` = 'sensitivity'"], status="FINISHED")
    assert {"sensitivity.layer_000", "sensitivity.layer_001", "base_perplexity"} <= set(run.metrics)
    assert store.load_json(run.run_id, "sensitivity.json")["grid"] == {"bits": 4, "group_size": 64, "symmetric": True}
    assert main(["sensitivity", str(spec), "--model", "nope", "--tracking-uri", uri]) == 2
    assert "no model 'nope'" in capsys.readouterr().err


def test_qat_trains_then_converts_to_exactly_what_it_trained(fixture_paths: dict, tmp_path: Path) -> None:
    """The loss falls (torchao's QAT), and the saved W4 checkpoint computes what training's forward pass
    computed, up to compressed-tensors and torchao rounding a -7.5 tie differently."""
    import torch

    from farm.stages.engines.fakequant import round_to_grid
    from farm.stages.engines.qat import train
    from farm.stages.modelio import load_model, load_tokenizer
    from farm.stages.quantize import calibrate, save

    method = build_method(
        {"method": "qat", "group_size": 64, "steps": 30, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0}
    )
    tok = load_tokenizer(fixture_paths["tiny-llama"])
    model = load_model(fixture_paths["tiny-llama"], "cpu")
    from farm.calibration import draw

    windows = draw(str(fixture_paths["shakespeare"] / "calibration.txt"), tok, 16, 64, 0)
    losses = train(model, windows, method, "cpu")
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([windows[0]])
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    masters = [m.weight.data.clone() for m in linears]
    for m in linears:
        m.weight.data = round_to_grid(m.weight.data, method.grid)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits  # the forward pass training saw
    for m, w in zip(linears, masters, strict=True):
        m.weight.data = w
    calibrate(_request(fixture_paths, tmp_path / "q"), model, tok, method.modifiers())
    save(model, tok, tmp_path / "q")
    with torch.inference_mode():
        got = load_model(tmp_path / "q", "cpu")(input_ids=ids).logits
    assert ((got - expected).abs() <= 1e-3 + 1e-3 * expected.abs()).float().mean() > 0.99


def test_qat_variant_records_its_training(fixture_paths: dict, tmp_path: Path) -> None:
    text = fixture_paths["shakespeare"] / "calibration.txt"
    method = build_method({"method": "qat", "group_size": 64, "steps": 4, "batch_size": 2, "train_samples": 8})
    q = quantize(
        QuantizeRequest(
            model_dir=str(fixture_paths["tiny-llama"]),
            out_dir=str(tmp_path / "q"),
            method=method,
            calibration=CalibrationDraw(str(text), 4, 64, 0),
        )
    )
    assert q.metrics["qat.steps"] == 4 and len(q.documents["qat_losses.json"]["loss"]) == 4
    assert any(n.startswith("QAT: 4 steps") for n in q.notes) and "QuantizationModifier" in q.recipe
