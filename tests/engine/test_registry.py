"""Every registry entry builds a real llm-compressor recipe; unknown names list what exists."""

from __future__ import annotations

import pytest

from farm.methods import REGISTRY, build_method, get_method


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_entry_builds_modifiers(name: str) -> None:
    cfg = build_method(
        {"method": name, **({"budget": 1, "candidates": [{"method": "gptq"}]} if name == "search" else {})}
    )
    if name == "nf4":  # not an llm-compressor recipe: bitsandbytes quantizes at load
        assert type(cfg.quantization_config("cpu")).__name__ == "BitsAndBytesConfig"
        mods = None
    elif name == "mixed":  # the recipe depends on the model's layers
        from farm.methods.precision import Layer

        mods = cfg.modifiers_for([Layer(0, ("mlp.down_proj",), 10), Layer(1, ("mlp.down_proj",), 10)], {1})
    elif name == "search":  # each candidate's recipe, built one by one
        with pytest.raises(TypeError, match="one by one"):
            cfg.modifiers()
        mods = [m for c in cfg.candidate_methods() for m in c.modifiers()]
    else:
        mods = cfg.modifiers()
    assert mods is None or (mods and all(type(m).__module__.startswith("llmcompressor") for m in mods))
    assert cfg.label().startswith(name.replace("_", "-"))
    assert len(cfg.config_hash()) == 64


def test_unknown_method() -> None:
    available = "autoround, awq, fp8, fp8_static, gptq, int8, kv_fp8, mixed, nf4, qat, rtn, search, smoothquant"
    with pytest.raises(KeyError, match=f"available: {available}"):
        get_method("nf5")


def test_group_size_reaches_recipe() -> None:
    mod = build_method({"method": "gptq", "group_size": 64, "scheme": "W8A16"}).modifiers()[0]
    weights = mod.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.strategy) == (8, 64, "group")


def test_fp8_block_needs_multiples_of_128() -> None:
    cfg = build_method({"method": "fp8", "scheme": "FP8_BLOCK"})
    assert cfg.check_model({"hidden_size": 576, "intermediate_size": 1536})
    assert not build_method({"method": "fp8"}).check_model({"hidden_size": 576})
