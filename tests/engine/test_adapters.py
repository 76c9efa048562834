"""The QLoRA path on the tiny Llama: train a LoRA adapter, evaluate it on the base and on a W4 variant loaded
dequantized, content-hash it into the evaluation id; bad adapter input is one clear line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from farm.errors import SpecError
from farm.methods import build_method
from farm.sources import adapter_identity
from farm.spec import EvaluationSpec
from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize


@pytest.fixture(scope="module")
def tiny_adapter(fixture_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from farm.stages.checks.adapters import train_lora

    out = tmp_path_factory.mktemp("adapter") / "a"
    info = train_lora(
        str(fixture_paths["tiny-llama"]),
        str(fixture_paths["shakespeare"] / "calibration.txt"),
        str(out),
        steps=12,
        seq_len=64,
        batch_size=2,
        learning_rate=1e-2,
    )
    assert info["loss_last"] < info["loss_first"]
    return out


def test_adapter_on_base_and_on_a_quantized_variant(fixture_paths: dict, tiny_adapter: Path, tmp_path: Path) -> None:
    from farm.stages.checks.adapters import evaluate_adapters

    text = fixture_paths["shakespeare"]
    ev = EvaluationSpec.model_validate(
        {
            "perplexity": {"source": str(text / "heldout.txt")},
            "adapters": [{"name": "play", "source": str(tiny_adapter), "max_tokens": 256, "seq_len": 128}],
        }
    )
    base = evaluate_adapters(str(fixture_paths["tiny-llama"]), ev)
    assert math.isfinite(base["adapter_play_perplexity"])
    for method in ({"method": "gptq", "group_size": 64}, {"method": "nf4"}):  # compressed-tensors, bitsandbytes
        q = tmp_path / method["method"]
        quantize(
            QuantizeRequest(
                model_dir=str(fixture_paths["tiny-llama"]),
                method=build_method(method),
                calibration=CalibrationDraw(str(text / "calibration.txt"), 4, 64, 0),
                out_dir=str(q),
            )
        )
        variant = evaluate_adapters(str(q), ev)
        assert math.isfinite(variant["adapter_play_perplexity"])
        assert variant["adapter_play_perplexity"] != base["adapter_play_perplexity"]  # 4-bit weights under it


def test_adapter_identity_is_content(tiny_adapter: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_adapter, copy)
    assert adapter_identity(str(copy)) == adapter_identity(str(tiny_adapter))
    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text().replace('"r": 8', '"r": 9'))
    assert adapter_identity(str(copy)) != adapter_identity(str(tiny_adapter))
    with pytest.raises(SpecError, match=r"no adapter_config\.json"):
        adapter_identity(str(tmp_path))


def test_adapter_spec_errors() -> None:
    with pytest.raises(ValueError, match="unique"):
        EvaluationSpec.model_validate(
            {
                "perplexity": {"source": "h.txt"},
                "adapters": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}],
            }
        )
    with pytest.raises(ValueError, match="name"):
        EvaluationSpec.model_validate({"perplexity": {"source": "h.txt"}, "adapters": [{"name": "A-1", "source": "x"}]})


def test_merged_adapter_is_the_base_plus_adapter(
    fixture_paths: dict, tiny_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models[].merge_adapter`: the merged checkpoint computes what base + adapter computes, is built once per
    (base, adapter) under FARM_CACHE, and is another model identity in the plan."""
    import torch
    from peft import PeftModel

    from farm.plan import merged_identity
    from farm.runtime.workers import local_model
    from farm.spec import ModelSpec
    from farm.stages.checks.adapters import load_dense

    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(source=str(fixture_paths["tiny-llama"]), merge_adapter=str(tiny_adapter))
    merged = local_model(spec)
    assert local_model(spec).local_dir == merged.local_dir and "merged" in merged.local_dir
    ids = torch.tensor([[1, 5, 9, 14, 200, 31]])
    with torch.inference_mode():
        want = PeftModel.from_pretrained(load_dense(str(fixture_paths["tiny-llama"]), "cpu"), str(tiny_adapter))(
            input_ids=ids
        ).logits
        got = load_dense(merged.local_dir, "cpu")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert merged_identity("base", adapter_identity(str(tiny_adapter))).startswith("base+lora:")
