"""GPU shares from memory: how much of a GPU each variant gets when `resources.gpu_packing: memory`.

Ray accounts GPUs in fractions and never puts more than 1.0 of them on one card, so a share of `need / card`
rounded up is a memory reservation Ray enforces: variants whose needs sum to less than a card run on it
together, and one that does not fit waits for Ray to place it. Each variant's CUDA allocator is then held to its
share (`gpu_memory_bytes`), so a wrong estimate fails that variant alone instead of its neighbours.

A variant's need is what an earlier run of the same model, method and calibration shape measured
(`gpu_peak_bytes`, recorded by every GPU variant), or else an estimate from the checkpoint's shape: resident
when the weights fit 70% of the largest share a variant may take (`resources.num_gpus`), as tuning keeps them;
otherwise the working set of layer-by-layer onloading (one decoder layer, its GPTQ Hessians, a calibration
batch), which is what an onloading variant needs and all it reserves. A model whose onloading working set does
not fit that largest share is refused before any run. The evaluation that follows in the same worker loads the
quantized checkpoint whole, so the need covers it too.

Pure: no Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from farm.resources import GIB
from farm.stages.tuning import activation_bytes, batch_element_bytes

GRID = 16  # shares are multiples of 1/16 of a card: few distinct worker shapes, so workers are reused
CONTEXT_BYTES = GIB  # a CUDA context and the allocator's slack, outside what the allocator cap counts
RESIDENT_FRACTION = 0.7  # tuning keeps weights on the GPU only when they fit 70% of the budget (stages/tuning.py)
PROBE_GPUS = 0.0001  # what the task that reads a card's memory asks of a GPU (Ray's smallest fraction)
MEASURED_HEADROOM = 1.15  # over a measured peak: fragmentation, a slightly longer draw


@dataclass(frozen=True)
class Shape:
    """What the estimate reads of a model's config."""

    weights_bytes: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    vocab_size: int

    @classmethod
    def of(cls, config: Mapping[str, Any], weights_bytes: int) -> Shape:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

        def num(key: str, default: int = 0) -> int:
            value = text.get(key, default) if isinstance(text, Mapping) else default
            return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default

        hidden = num("hidden_size")
        experts = num("num_local_experts") or num("num_experts")
        moe_inter = num("moe_intermediate_size")
        # an MoE layer's Hessians and onloaded weights cover all its experts (each is calibrated on every token)
        inter = experts * (moe_inter or num("intermediate_size")) if experts else num("intermediate_size", 4 * hidden)
        return cls(
            weights_bytes=weights_bytes,
            hidden_size=hidden,
            intermediate_size=inter,
            num_heads=num("num_attention_heads", 1),
            num_layers=max(num("num_hidden_layers", 1), 1),
            vocab_size=num("vocab_size"),
        )


@dataclass(frozen=True)
class Need:
    bytes: int
    onloads: bool  # the estimate keeps the weights on the host
    reason: str


def estimate(
    shape: Shape,
    most_bytes: int,
    num_samples: int,
    seq_len: int,
    calibrated: bool,
    weight_bits: float | None,
) -> Need:
    """A variant's GPU memory need from its model's shape (see the module's docstring); `most_bytes` is the
    largest share it may take."""
    h, i = shape.hidden_size, shape.intermediate_size
    quantized = int(shape.weights_bytes * min(1.0, (weight_bits or 16) / 16))
    evaluate = quantized + 2 * shape.vocab_size * h * 2 + batch_element_bytes(512, h, i, shape.num_heads, "sdpa")
    batch = batch_element_bytes(seq_len, h, i, shape.num_heads, "sdpa") if calibrated else 0
    resident = int(shape.weights_bytes / RESIDENT_FRACTION) + batch
    if resident + CONTEXT_BYTES <= most_bytes:
        reason = f"estimated: {gib(resident)} GiB quantizing with the weights resident, {gib(evaluate)} GiB evaluating"
        return Need(max(resident, evaluate) + CONTEXT_BYTES, False, reason)
    layer_params = max(shape.weights_bytes // 2 - 2 * shape.vocab_size * h, 0) // shape.num_layers
    hessians = 4 * (h**2 + i**2) if calibrated else 0
    embedding = shape.vocab_size * h * 2  # the first subgraph onloads the embedding table
    onload = 2 * layer_params + hessians + embedding + batch + 2 * activation_bytes(1, seq_len, h)
    reason = f"estimated: {gib(onload)} GiB quantizing onloaded layer by layer, {gib(evaluate)} GiB evaluating"
    return Need(max(onload, evaluate) + CONTEXT_BYTES, True, reason)


def measured(estimated: Need, peak_bytes: float, onloaded: bool) -> Need:
    """The need when an earlier run of the variant's model, method and calibration shape measured its peak: that
    peak with headroom, where the run was placed as the estimate places this one (resident or onloaded); a
    resident variant keeps at least what tuning needs to keep its weights resident, and the evaluation's load."""
    if onloaded != estimated.onloads:
        return estimated
    floor = estimated.bytes if not onloaded else 0
    need = max(int(peak_bytes * MEASURED_HEADROOM) + CONTEXT_BYTES, floor)
    return Need(need, onloaded, f"measured peak {gib(int(peak_bytes))} GiB ({'onloaded' if onloaded else 'resident'})")


def share(need_bytes: int, card_bytes: int) -> float:
    """The GPU fraction that holds `need_bytes` on a card of `card_bytes`: a multiple of 1/GRID, at least one."""
    return max(1, math.ceil(GRID * need_bytes / card_bytes - 1e-9)) / GRID


@dataclass(frozen=True)
class Assignment:
    num_gpus: float
    gpu_memory_bytes: int  # the allocator cap: the share less the context


def assign(need: Need, card_bytes: int, most_gpus: float) -> Assignment | str:
    """The share for `need`, or why no share a variant may take (`most_gpus` of a card) holds it."""
    most = min(most_gpus, 1.0) * card_bytes
    if need.bytes > most:
        return (
            f"needs {gib(need.bytes)} GiB of GPU memory ({need.reason}), more than the "
            f"{gib(int(most))} GiB of a {most_gpus:g}-GPU share of a {gib(card_bytes)} GiB card"
        )
    fraction = min(share(need.bytes, card_bytes), most_gpus)
    return Assignment(fraction, int(fraction * card_bytes) - CONTEXT_BYTES)


def pack(
    variants: Sequence[Any],
    shapes: Mapping[str, Shape],
    card_bytes: int,
    peaks: Mapping[tuple[str, str, int, int], tuple[float, bool]],
) -> tuple[list[Any], list[str]]:
    """Every variant with its share and allocator cap set (`resources.num_gpus`, `resources.gpu_memory_bytes`),
    and one line per variant that cannot fit. `shapes` by model identity; `peaks` by `peak_key`. A cap the spec
    sets (`resources.gpu_memory_gb`) is kept when it is the smaller. `peaks`: (peak bytes, onloaded) measured."""
    out, problems = [], []
    for v in variants:
        r = v.resources
        need = estimate(
            shapes[v.identity],
            int(min(r.num_gpus, 1.0) * card_bytes),
            v.calibration.num_samples,
            v.calibration.max_seq_length,
            v.method.requires_calibration,
            v.method.weight_bits(),
        )
        if peak_key(v) in peaks:
            need = measured(need, *peaks[peak_key(v)])
        got = assign(need, card_bytes, r.num_gpus)
        if isinstance(got, str):
            problems.append(f"{v.label}: {got}")
            continue
        cap = min(got.gpu_memory_bytes, r.gpu_memory_bytes) if r.gpu_memory_bytes else got.gpu_memory_bytes
        out.append(replace(v, resources=replace(r, num_gpus=got.num_gpus, gpu_memory_bytes=cap)))
    return out, problems


def base_share(shapes: Mapping[str, Shape], card_bytes: int, most_gpus: float) -> float | str:
    """The pool workers' share for the base evaluations to run (`shapes` by model name): what evaluating the
    largest base whole on one GPU takes (its bf16 weights and one 512-token batch), or why no share a worker may
    take (`most_gpus` of a card) holds it: the evaluation does not onload."""
    needs = {
        name: s.weights_bytes
        + batch_element_bytes(512, s.hidden_size, s.intermediate_size, s.num_heads, "sdpa")
        + CONTEXT_BYTES
        for name, s in shapes.items()
    }
    name, need = max(needs.items(), key=lambda kv: kv[1])
    got = assign(Need(need, False, "the whole checkpoint on one GPU"), card_bytes, most_gpus)
    if isinstance(got, str):
        return f"base {name}: its evaluation loads the checkpoint whole, and {got}"
    return got.num_gpus


def peak_key(v: Any) -> tuple[str, str, int, int]:
    """What a measured peak is reused for: the same model, method and calibration shape."""
    return (v.identity, v.method.label(), v.calibration.num_samples, v.calibration.max_seq_length)


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"
