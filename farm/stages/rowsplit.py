"""Data-parallel GPTQ with every module's solve split by rows over the ranks.

llm-compressor's distributed GPTQ hands each module to one rank (bin-packed by column count): it reduces that
module's Hessian to the rank, which solves the whole module while the others wait, then broadcasts the result.
On a Llama-8B layer the owner of down_proj (14336 columns, the longest solve) is every layer's critical path,
and the other ranks sit in the broadcast for it (measured, docs/BENCHMARKS.md session 6).

GPTQ's rows are independent given the Hessian: error feedback runs along a row's own columns, the scales come
from the observer before the solve, and activation order depends on the Hessian alone. So farm all-reduces each
Hessian (every rank has it whole), every rank solves 1/N of each module's rows with the same Hessian and scales,
and the ranks all-gather the rows. The quantized weights are the single-process ones (same inputs for each row;
only GEMM blocking can differ in the last float bits); every rank pays each module's Cholesky.

Covers weight strategies whose scales are per row (channel, group, tensor-group) or per tensor; a layer with any
other (2-D blocks) keeps llm-compressor's owner-rank path. Scoped: `rows_split_solve()` swaps
`GPTQModifier.compress_modules` for one oneshot (stages/swap.py); `resources.gptq_ranks: owner` keeps upstream's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from farm.stages.swap import Tally, swapped

SPLITTABLE = ("channel", "group", "tensor_group", "tensor")


def share(rows: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, chunk): a rank's contiguous rows; chunk = ceil(rows / world), the all-gather's unit (the last
    ranks may hold fewer rows, or none)."""
    chunk = -(-rows // world)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk), chunk


def split_rows(inner: Any, weights: Any, hessians: Any, scale: Any, zero_point: Any, global_scale: Any,
               quant_args: Any, blocksize: int = 128, percdamp: float = 0.01) -> tuple[Any, Any, Any]:
    """llm-compressor's `quantize_weight` contract, collectively: this rank solves its rows with `inner` (the
    installed solve: left-looking or upstream's), then every rank gets all rows, the summed losses and flags."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    batch, rows, columns = weights.shape
    start, stop, chunk = share(rows, rank, world)
    per_row = scale.ndim >= 2 and scale.shape[1] == rows  # channel/group scales; a tensor's scale stays whole
    mine = (lambda t: t[:, start:stop]) if per_row else (lambda t: t)
    gathered = torch.zeros(world * chunk, batch, columns, dtype=weights.dtype, device=weights.device)
    losses = torch.zeros(batch, dtype=torch.float32, device=weights.device)
    fallback = torch.zeros(batch, dtype=torch.int32, device=weights.device)
    if stop > start:
        q, loss, flags = inner(weights[:, start:stop].clone(), hessians, mine(scale), mine(zero_point), global_scale,
                               quant_args, blocksize=blocksize, percdamp=percdamp)
        gathered[start:stop].copy_(q.transpose(0, 1))
        losses += loss.float()
        fallback += flags.to(torch.int32)
    parts = list(gathered.chunk(world))
    dist.all_gather(parts, parts[rank].clone())
    dist.all_reduce(losses)
    dist.all_reduce(fallback, op=dist.ReduceOp.MAX)
    quantized = torch.cat(parts)[:rows].transpose(0, 1).contiguous()
    return quantized, losses, fallback.bool()


def splittable(modules: list[Any]) -> bool:
    """Every module has per-row (or per-tensor) weight scales, and its own copy of the weights on this rank: a
    copy the ranks share (compressed-tensors' host or disk offload of a model too large for a GPU, CPU ranks)
    must be written by one rank only, which is upstream's owner-rank path."""
    import torch
    from compressed_tensors.offload import OffloadCache, get_offloaded_device
    from compressed_tensors.utils import getattr_chain

    def own_copy(m: Any) -> bool:
        where = get_offloaded_device(m)
        return not isinstance(m._parameters, OffloadCache) or (isinstance(where, torch.device) and where.type == "cuda")

    def per_row(m: Any) -> bool:
        strategy = getattr(getattr_chain(m, "quantization_scheme.weights", None), "strategy", None)
        return str(getattr(strategy, "value", strategy)).lower() in SPLITTABLE

    return all(own_copy(m) and per_row(m) for m in modules)


@contextlib.contextmanager
def rows_split_solve() -> Iterator[Tally]:
    """Within the block, a distributed GPTQModifier all-reduces each layer's Hessians and solves every module
    split by rows over the ranks (`split_rows`); single-process runs and non-splittable layers are upstream's."""
    import torch.distributed as dist
    from llmcompressor.modifiers.gptq import base

    tally = Tally("GPTQ solves split by rows over the data-parallel ranks: {n} modules (resources.gptq_ranks: owner "
                  "for llm-compressor's one owner rank per module)")

    def make(original: Any) -> Any:
        def compress_modules(self: Any) -> None:
            modules = list(self._hessians.keys())
            if not (dist.is_available() and dist.is_initialized()) or not modules or not splittable(modules):
                return original(self)
            work = [dist.all_reduce(t, async_op=True) for m in modules
                    for t in (self._hessians[m], self._num_samples[m])]
            for w in work:
                w.wait()
            with swapped(base, "quantize_weight", lambda inner: lambda *a, **k: split_rows(inner, *a, **k),
                         "the row-split GPTQ solve"):
                self.compress_module_list(modules)
            for m in modules:  # what upstream's broadcast step does after the solves
                obs = getattr(m, "weight_observer", None)
                if obs is not None and obs.has_statistics:
                    obs.delete_statistics(check_fused=True)
            tally.n += len(modules)
            return None

        return compress_modules

    with swapped(base.GPTQModifier, "compress_modules", make, "the row-split GPTQ solve"):
        yield tally
