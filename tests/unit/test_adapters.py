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
    from farm.stages.adapters import train_lora

    out = tmp_path_factory.mktemp("adapter") / "a"
    info = train_lora(str(fixture_paths["tiny-llama"]), str(fixture_paths["shakespeare"] / "calibration.txt"),
                      str(out), steps=12, seq_len=64, batch_size=2, learning_rate=1e-2)
    assert info["loss_last"] < info["loss_first"]
    return out


def test_adapter_on_base_and_on_a_quantized_variant(fixture_paths: dict, tiny_adapter: Path, tmp_path: Path) -> None:
    from farm.stages.adapters import evaluate_adapters

    text = fixture_paths["shakespeare"]
    ev = EvaluationSpec.model_validate({"perplexity": {"source": str(text / "heldout.txt")},
                                        "adapters": [{"name": "play", "source": str(tiny_adapter),
                                                      "max_tokens": 256, "seq_len": 128}]})
    base = evaluate_adapters(str(fixture_paths["tiny-llama"]), ev)
    assert math.isfinite(base["adapter_play_perplexity"])
    for method in ({"method": "gptq", "group_size": 64}, {"method": "nf4"}):  # compressed-tensors, bitsandbytes
        q = tmp_path / method["method"]
        quantize(QuantizeRequest(model_dir=str(fixture_paths["tiny-llama"]), method=build_method(method),
                                 calibration=CalibrationDraw(str(text / "calibration.txt"), 4, 64, 0), out_dir=str(q)))
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
        EvaluationSpec.model_validate({"perplexity": {"source": "h.txt"}, "adapters": [
            {"name": "a", "source": "x"}, {"name": "a", "source": "y"}]})
    with pytest.raises(ValueError, match="name"):
        EvaluationSpec.model_validate({"perplexity": {"source": "h.txt"}, "adapters": [{"name": "A-1", "source": "x"}]})
