"""Per-variant llm-compressor settings chosen from the memory a worker actually has, instead of defaults.

llm-compressor's sequential pipeline keeps every calibration sample's layer activations between layers; by
default on the host ("cpu"), which costs a host<->device copy per layer per sample. When the worker's share of
the GPU holds them comfortably, keeping them on the GPU and calibrating in batches is faster with the same
output (measured on one H100: 8B GPTQ 215 s -> 158 s). Pure: unit-tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from farm.resources import GIB


@dataclass(frozen=True)
class Tuning:
    offload_device: str | None  # None: llm-compressor's default (host)
    batch_size: int
    reason: str
    load_device: str | None = None  # "cpu": weights stay on the host, llm-compressor onloads a layer at a time


def activation_bytes(num_samples: int, seq_len: int, hidden_size: int, dtype_bytes: int = 2) -> int:
    """Hidden states of every sample at one layer boundary (what the sequential pipeline caches)."""
    return num_samples * seq_len * hidden_size * dtype_bytes


def batch_element_bytes(
    seq_len: int, hidden_size: int, intermediate_size: int, num_heads: int, attention: str = "eager"
) -> int:
    """Transient memory of one more sample in a calibration batch: eager attention scores and their softmax
    (heads x seq^2, a few fp16/fp32 copies; fused sdpa keeps only the seq^2 causal mask) plus MLP
    intermediates. Fitted to H100 measurements: 1B (h=2048, 32 heads, seq 2048, eager) adds ~1.3 GiB per sample
    going from batch 1 to 16."""
    scores = seq_len**2 * 4 if attention == "sdpa" else num_heads * seq_len**2 * 2 * 4
    return scores + seq_len * (4 * hidden_size + 4 * intermediate_size) * 2 * 2


def choose(
    device: str,
    gpu_budget_bytes: int,
    num_samples: int,
    seq_len: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int = 32,
    frugal: bool = False,
    weights_bytes: int = 0,
    attention: str = "eager",
    whole_share: bool = False,
) -> Tuning:
    """Settings for one variant. `gpu_budget_bytes` is this worker's share of its GPU (free memory x fraction);
    `weights_bytes` the checkpoint in the dtype it is loaded in. A model that does not fit 70% of the budget
    stays on the host and is onloaded layer by layer (llm-compressor's sequential pipeline), so a model larger
    than the GPU still quantizes on it. `whole_share`: a DDP rank whose propagation overlaps another rank's
    GPTQ solve (stages/llmc/ddp_forward_order.py) calibrates its `num_samples` in one batch when it fits (a later batch
    would queue behind the first one's wait on its stream)."""
    if device != "cuda":
        return Tuning(None, 1, "defaults (no GPU)")
    if weights_bytes > 0.7 * gpu_budget_bytes:
        return Tuning(
            None,
            1,
            f"weights {weights_bytes / GIB:.1f} GiB exceed 70% of the GPU budget "
            f"({gpu_budget_bytes / GIB:.1f} GiB): kept on host, onloaded layer by layer",
            "cpu",
        )
    gpu_budget_bytes -= weights_bytes
    if frugal:
        return Tuning(None, 1, "activations on host, batch 1 (frugal)")
    cached = 2 * activation_bytes(num_samples, seq_len, hidden_size)  # inputs + outputs of the layer
    # one decoder layer's weights onloaded (~12 h^2 + 3 h i params in bf16) and the GPTQ Hessians (fp32, in^2)
    layer = 2 * (4 * hidden_size**2 + 3 * hidden_size * intermediate_size) + 4 * (hidden_size**2 + intermediate_size**2)
    headroom = gpu_budget_bytes - layer - GIB
    if cached > 0.6 * headroom:
        return Tuning(None, 1, f"activations {cached / GIB:.1f} GiB exceed 60% of the GPU budget: kept on host")
    per_sample = batch_element_bytes(seq_len, hidden_size, intermediate_size, num_heads, attention)
    batch = 1
    for b in ((num_samples,) if whole_share else ()) + (16, 8, 4, 2):
        if b <= num_samples and cached + b * per_sample < 0.6 * headroom:
            batch = b
            break
    return Tuning("cuda", batch, f"activations {cached / GIB:.1f} GiB on GPU, calibration batch {batch}")
