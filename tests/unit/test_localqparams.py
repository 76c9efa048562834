"""GPTQ's attach-time quantization parameters made on each rank (stages/localqparams.py): on replicas held in
compressed-tensors' distributed device cache, attaching the schemes broadcasts one tensor per new parameter
upstream and none within the block, which changes nothing else about them; only GPTQ recipes of several ranks
take it. (The whole DDP GPTQ path with it, on GPUs: tests/gpu/test_gpu_scale.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _replica() -> torch.nn.Module:
    """A tiny Llama whose tensors live in the distributed device cache, as a GPU rank's replica does."""
    from compressed_tensors.offload.cache import DistributedDeviceCache
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    for m in model.modules():
        m._parameters = DistributedDeviceCache.from_mapping(m._parameters, "cpu", "cpu")
        m._buffers = DistributedDeviceCache.from_mapping(m._buffers, "cpu", "cpu")
    return model


def _attach(model: torch.nn.Module, local: bool) -> tuple[int, dict[str, torch.Tensor], int]:
    """Attach GPTQ W4A16's schemes; the broadcasts it made, the new parameters, and the block's call count."""
    import contextlib

    import torch.distributed as dist
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    from farm.stages.localqparams import qparams_made_on_every_rank

    modifier = GPTQModifier(scheme="W4A16", targets=["Linear"], ignore=["lm_head"])
    sent = []
    original = dist.broadcast
    dist.broadcast = lambda *a, **k: (sent.append(1), original(*a, **k))[1]  # type: ignore[assignment]
    try:
        with qparams_made_on_every_rank() if local else contextlib.nullcontext() as attached:
            QuantizationMixin.initialize_quantization(modifier, model)
    finally:
        dist.broadcast = original
    made = {k: v for k, v in model.state_dict().items() if "zero_point" in k or "_scale" in k}
    return len(sent), made, attached.calls if local else 0


def test_attaching_schemes_broadcasts_nothing_within_the_block(one_rank_group: None) -> None:
    from compressed_tensors.offload.cache import DistributedDeviceCache
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    upstream_sent, upstream, _ = _attach(_replica(), local=False)
    sent, made, calls = _attach(_replica(), local=True)
    assert upstream_sent == len(upstream) > 0, upstream_sent  # one broadcast per new scale / zero point upstream
    assert sent == 0 and calls == 1
    assert {k: (v.shape, v.dtype) for k, v in made.items()} == {k: (v.shape, v.dtype) for k, v in upstream.items()}
    assert all(torch.equal(made[k], upstream[k]) for k in made if "zero_point" in k)
    # restored on exit: the cache broadcasts again, and the modifier's method is upstream's
    assert DistributedDeviceCache.offload is not DistributedDeviceCache.__mro__[1].offload
    assert QuantizationMixin.initialize_quantization.__qualname__.startswith("QuantizationMixin.")


def test_only_gptq_recipes_of_several_ranks() -> None:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from farm.stages.localqparams import applies

    gptq = GPTQModifier(scheme="W4A16", targets=["Linear"])
    assert applies([gptq], world=2)
    assert not applies([gptq], world=1)
    assert not applies([QuantizationModifier(scheme="FP8", targets=["Linear"])], world=2)
    assert not applies([], world=2)
