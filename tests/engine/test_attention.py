"""Calibration's fused attention computes what the model's eager attention computes, only where it can, and is
scoped to one oneshot (CPU, fp32: the two agree to rounding)."""

import types

import pytest

torch = pytest.importorskip("torch")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from farm.spec import ResourceSpec  # noqa: E402
from farm.stages.llmc.calibration_sdpa import architecture, fusable, sdpa_calibration  # noqa: E402


def tiny(**extra: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        **extra,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"  # what llm-compressor's calibration context sets
    return model


def test_same_logits_as_eager_with_the_causal_mask_and_padding() -> None:
    model = tiny()
    ids = torch.randint(0, 500, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row: the eager mask carries it, SDPA gets the same mask
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        with sdpa_calibration(model) as usage:
            fused = model(ids, attention_mask=mask).logits
    assert usage.fused == 2 and usage.eager == 0  # one call per layer
    torch.testing.assert_close(fused[mask.bool()], eager[mask.bool()], rtol=1e-5, atol=1e-5)


def test_scoped_and_undone_on_error() -> None:
    assert "eager" not in ALL_ATTENTION_FUNCTIONS
    with pytest.raises(RuntimeError), sdpa_calibration(tiny()):
        assert "eager" in ALL_ATTENTION_FUNCTIONS
        raise RuntimeError("oneshot failed")
    assert "eager" not in ALL_ATTENTION_FUNCTIONS


def test_what_sdpa_would_not_honour_stays_eager() -> None:
    attn = tiny().model.layers[0].self_attn
    assert architecture(attn) == "llama" and fusable(attn, 0.0, {})
    assert not fusable(attn, 0.1, {})  # dropout
    assert not fusable(attn, 0.0, {"softcap": 30.0})
    assert not fusable(attn, 0.0, {"s_aux": torch.zeros(1)})  # attention sinks
    capped = tiny().model.layers[0].self_attn
    capped.config = types.SimpleNamespace(attn_logit_softcapping=50.0)
    assert not fusable(capped, 0.0, {})
    other = types.new_class("Attention")()  # not a transformers architecture farm knows to be plain
    assert architecture(other) is None and not fusable(other, 0.0, {})


def test_dropout_in_training_goes_to_the_models_own_eager() -> None:
    model = tiny(attention_dropout=0.5).train()
    with sdpa_calibration(model) as usage:
        model(torch.randint(0, 500, (1, 8)))
    assert usage.fused == 0 and usage.eager == 2


def test_other_architectures_keep_llm_compressors_path() -> None:
    foreign = types.new_class("RemoteCodeModel")()  # e.g. trust_remote_code, its eager function named otherwise
    with sdpa_calibration(foreign) as usage:
        assert "eager" not in ALL_ATTENTION_FUNCTIONS
    assert usage.fused == usage.eager == 0


def test_spec_default_and_choices() -> None:
    assert ResourceSpec().calibration_attention == "sdpa"
    assert ResourceSpec(calibration_attention="eager").calibration_attention == "eager"
    with pytest.raises(ValueError):
        ResourceSpec(calibration_attention="flash")


def _normalised_source(fn: object) -> str:
    import inspect
    import re

    return re.sub(r"\s+", " ", re.sub(r"#.*", "", inspect.getsource(fn)))  # type: ignore[arg-type]


def test_every_covered_architecture_has_llamas_plain_eager_attention() -> None:
    """The allow-list is only safe while each architecture's eager attention is Llama's softmax(QK^T s + m)V: a
    transformers upgrade that changes one (soft-capping, sinks, a bias) fails here instead of silently
    calibrating with different attention."""
    import importlib

    from farm.stages.llmc.calibration_sdpa import PLAIN_EAGER

    reference = _normalised_source(
        importlib.import_module("transformers.models.llama.modeling_llama").eager_attention_forward
    )
    for arch in sorted(PLAIN_EAGER):
        module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        assert _normalised_source(module.eager_attention_forward) == reference, arch
