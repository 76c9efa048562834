"""How many calibration samples each DDP rank gets: fewer for a rank that owns a larger share of GPTQ's solves.

Every rank calibrates and propagates its own samples through each layer, but each module's GPTQ solve runs on
one owner rank (llm-compressor packs modules onto ranks greedily by Hessian size). On an 8B Llama over 4 ranks
rank 0 owns down_proj alone, whose solve (~0.08-0.1 s) outweighs the others' two small modules; with results
waited for only where used (stages/llmc/ddp_forward_order.py) the other ranks propagate meanwhile, so the layer's
critical path is rank 0's solve plus its own samples. Giving each rank `T - solve_r` samples (water-filling,
in sample-equivalents) evens the ranks' work per layer. Hessians are sums over samples divided by the total
count, so an uneven split computes the same GPTQ problem.

The cost model is first-order and pure (no torch): a sample costs two forward passes of the layer plus each
module's Hessian product, in bf16 on tensor cores; a solve is a Cholesky (in^3/3) and the column loop
(out x in^2), in fp32 and partly latency-bound, so slower per FLOP by `FP32_SLOWDOWN`, fitted on one H200
(`bench/profile_oneshot.py`, 8B shape, 8 layers, 32 x 2048 samples): down_proj's solve 0.08-0.12 s, a sample
7.1 ms per layer (calibrate + propagate), ~14 samples; the model says 13.8. The small modules' solves it puts
low (q_proj 0.7 samples, measured ~1.7), which moves a rank's share by a sample or two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FP32_SLOWDOWN = 23  # bf16 tensor-core GEMMs vs the fp32 solve, per FLOP (fitted on H200: see above)


def layer_modules(config: Mapping[str, Any]) -> list[tuple[int, int]] | None:
    """(out, in) features of a Llama-style decoder layer's linear modules in forward order (q, k, v, o, gate,
    up, down); None when the config does not describe one."""
    h, i = int(config.get("hidden_size") or 0), int(config.get("intermediate_size") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    if not (h and i and heads):
        return None
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or h // heads)
    return [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (i, h), (i, h), (h, i)]


def owners(modules: Sequence[tuple[int, int]], world: int) -> list[int]:
    """Each module's owner rank, as compressed-tensors' `greedy_bin_packing` assigns them (stable sort by
    Hessian size, in features, descending; each to the least-loaded rank, the lowest on ties)."""
    load = [0] * world
    owner = [0] * len(modules)
    for m in sorted(range(len(modules)), key=lambda m: -modules[m][1]):
        r = load.index(min(load))
        owner[m] = r
        load[r] += modules[m][1]
    return owner


def solve_in_samples(modules: Sequence[tuple[int, int]], seq_len: int, world: int) -> list[float]:
    """Each rank's GPTQ solves per layer, in calibration samples' worth of work."""
    sample = seq_len * sum(4 * o * i + 2 * i * i for o, i in modules)
    per_rank = [0.0] * world
    for (o, i), r in zip(modules, owners(modules, world), strict=True):
        per_rank[r] += FP32_SLOWDOWN * (i**3 / 3 + o * i * i) / sample
    return per_rank


def shares(config: Mapping[str, Any], num_samples: int, seq_len: int, world: int) -> tuple[int, ...] | None:
    """Samples per rank (each >= 1, summing to `num_samples`) that even the ranks' work per layer; None for an
    even split (one rank, a config of another shape, fewer samples than ranks)."""
    modules = layer_modules(config)
    if world < 2 or modules is None or num_samples < world:
        return None
    solve = solve_in_samples(modules, seq_len, world)
    level = (num_samples + sum(solve)) / world  # water level: sum(level - solve_r) = num_samples
    exact = [max(1.0, level - s) for s in solve]
    scale = num_samples / sum(exact)
    exact = [x * scale for x in exact]
    counts = [max(1, int(x)) for x in exact]
    for r in sorted(range(world), key=lambda r: (counts[r] - exact[r], r)):
        if sum(counts) >= num_samples:
            break
        counts[r] += 1
    while sum(counts) > num_samples:  # only where every rank was lifted to one sample
        r = max(range(world), key=lambda r: counts[r])
        counts[r] -= 1
    return tuple(counts)
