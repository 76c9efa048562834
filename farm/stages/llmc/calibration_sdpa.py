"""Calibration forward passes with fused attention (SDPA) instead of the eager attention llm-compressor forces.

llm-compressor's sequential pipeline sets `config._attn_implementation = "eager"` for the whole calibration
(`calibration_forward_context`): its traced graph bakes in an additive causal mask, and only the eager mask path
always produces that mask tensor. The price is the eager attention kernel itself: scores materialised in bf16,
a mask add, an fp32 softmax and two casts per head, per sample, per layer, twice per layer (calibrate, then
propagate). Measured on an H100 (bench/profile_oneshot.py, torch.profiler), that was ~60% of a 1B GPTQ run's GPU
time and ~25% of an 8B's.

The mask does not need eager attention, only the eager mask. So the mask is still built the eager way, and the
decoder layers' attention call for "eager" goes to transformers' own `sdpa_attention_forward` with that same
additive mask (`torch.nn.functional.scaled_dot_product_attention`, fp32 softmax inside a fused kernel): the same
function, the same mask, no scores in memory. Scoped: `sdpa_calibration(model)` registers the override on
transformers' attention registry for one oneshot and removes it on exit. Only models of architectures whose eager
attention is plain softmax(QK^T * scale + mask) V (`PLAIN_EAGER`) get it, others keep llm-compressor's path
untouched; a call with anything SDPA would not honour (dropout, logit soft-capping, attention sinks, training
mode) goes to the model's own eager function. `resources.calibration_attention: eager` keeps llm-compressor's
behaviour for a job.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from farm.stages.llmc import registry

log = logging.getLogger(__name__)

# transformers model modules whose `eager_attention_forward` is softmax(Q K^T * scaling + mask) V with repeated KV
# heads and nothing else; others keep eager attention.
PLAIN_EAGER = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "granite", "olmo2", "smollm3"}
)
EAGER_ONLY_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")


def architecture(module: Any) -> str | None:
    """The transformers model package a model or module comes from ("llama" for LlamaAttention), if any."""
    name = type(module).__module__
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None


def eager_function(module: Any) -> Any:
    """The model's own eager attention (what `get_interface(..., default)` would have returned)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise LookupError(f"{type(module).__name__} has no eager_attention_forward")
    return fn


def fusable(module: Any, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether SDPA computes exactly what this model's eager attention computes for this call."""
    if architecture(module) not in PLAIN_EAGER or getattr(module, "training", False) or dropout:
        return False
    config = getattr(module, "config", None)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    return all(kwargs.get(k) is None for k in EAGER_ONLY_KWARGS)


@dataclass
class Usage:
    """What the override did during one oneshot: attention calls it fused, and calls it left to eager."""

    fused: int = 0
    eager: int = 0

    def note(self) -> str | None:
        if not self.fused:
            return None
        left = f"; {self.eager} left to eager" if self.eager else ""
        return (
            f"calibration attention fused (SDPA with llm-compressor's eager mask): {self.fused} calls{left} "
            f"(resources.calibration_attention: eager for llm-compressor's)"
        )


@contextlib.contextmanager
def sdpa_calibration(model: Any) -> Iterator[Usage]:
    """Within the block, `model`'s attention dispatched as "eager" runs through SDPA where `fusable` says it is
    the same; a model of another architecture is left to llm-compressor's eager attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    usage = Usage()
    if architecture(model) not in PLAIN_EAGER:
        yield usage
        return
    if not registry.guard_key("transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.eager"):
        yield usage
        return
    if "eager" in ALL_ATTENTION_FUNCTIONS:  # someone already overrides eager: leave theirs alone
        log.warning("transformers' attention registry already overrides 'eager'; calibration keeps it")
        yield usage
        return

    def attention(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        if fusable(module, dropout, kwargs):
            usage.fused += 1
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, is_causal=False, **kwargs
            )
        usage.eager += 1
        return eager_function(module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    ALL_ATTENTION_FUNCTIONS["eager"] = attention
    try:
        yield usage
    finally:
        del ALL_ATTENTION_FUNCTIONS["eager"]
