"""Data-parallel GPTQ with the layer's longest solve shared by every rank.

llm-compressor's distributed GPTQ hands each module's whole solve to one rank (bin-packed by column count),
reduces that module's Hessian to it and broadcasts the result. On a Llama-8B layer the owner of down_proj (14336
columns) is every layer's critical path (~0.17 s) while the other ranks finish their small modules in ~0.05 s
and wait (docs/BENCHMARKS.md, session 6). Splitting every module's rows over the ranks was slower (session 7:
every rank paid every Cholesky and the loop's fixed cost per module).

Here only a module whose solve outweighs a rank's fair share of the layer is split (`plan_ranks`). One rank
factors its Hessian (the Cholesky: the part that rows cannot share) while the others solve the small modules
they own; the factor, the activation order and the dead columns are broadcast; every rank runs GPTQ's column
loop (stages/leftgptq.py) on 1/N of the rows with their own scales; the rows are all-gathered. GPTQ's rows are
independent given the factor and the scales, so the weights are the single-process ones (only GEMM blocking can
differ in the last bits). The small modules keep llm-compressor's owner path (reduce, solve, broadcast).

Scoped (stages/swap.py): `split_largest_solves()` swaps `GPTQModifier.compress_modules` for one oneshot. A layer
whose split modules have no per-row scales (2-D blocks) or whose weights the ranks share (compressed-tensors'
host cache: one rank must write them) keeps llm-compressor's path; so does a single process.
`resources.gptq_ranks: owner` keeps it always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.stages.swap import Tally, swapped

Q_PARAMS = ["weight", "weight_scale", "weight_zero_point"]  # what an owner broadcasts (llm-compressor's list)
PER_ROW = ("channel", "group", "tensor_group", "tensor")  # scale strategies a subset of rows can be solved with


def factor_cost(columns: int) -> float:
    """The Cholesky of a columns x columns Hessian (n^3 / 3 multiply-adds)."""
    return columns**3 / 3


def loop_cost(rows: int, columns: int) -> float:
    """GPTQ's column loop over `rows` rows: the blocks' GEMMs against all earlier columns, ~rows * n^2 / 2
    multiply-adds, at about a quarter of the Cholesky's rate per operation on an H100 (measured: down_proj's
    factor 46 ms, its loop with static activation order ~84 ms)."""
    return 2.0 * rows * columns**2


@dataclass(frozen=True)
class RankPlan:
    """Who does what in one layer's solves: `split` maps a module's index to the rank that factors its Hessian
    (all ranks then solve its rows); `owner` maps every other module to the rank that solves it whole."""

    split: dict[int, int] = field(default_factory=dict)
    owner: dict[int, int] = field(default_factory=dict)
    loads: tuple[float, ...] = ()


def plan_ranks(shapes: Sequence[tuple[int, int]], world: int) -> RankPlan:
    """Split each module (rows, columns) whose whole solve costs more than 1/world of the layer's; give factors
    and whole modules to the least loaded rank, largest first (the same on every rank: a pure function of the
    shapes in llm-compressor's module order)."""
    whole = [factor_cost(c) + loop_cost(r, c) for r, c in shapes]
    fair = sum(whole) / world
    loads = [0.0] * world
    split: dict[int, int] = {}
    owner: dict[int, int] = {}
    order = sorted(range(len(shapes)), key=lambda i: (-whole[i], i))
    for i in (i for i in order if world > 1 and whole[i] > fair):
        rows, columns = shapes[i]
        split[i] = min(range(world), key=lambda r: (loads[r], r))
        loads[split[i]] += factor_cost(columns)
        loads[:] = [load + loop_cost(-(-rows // world), columns) for load in loads]
    for i in (i for i in order if i not in split):
        owner[i] = min(range(world), key=lambda r: (loads[r], r))
        loads[owner[i]] += whole[i]
    return RankPlan(split, owner, tuple(loads))


def share(rows: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, chunk): a rank's contiguous rows; chunk = ceil(rows / world), the all-gather's unit (the last
    ranks may hold fewer rows, or none)."""
    chunk = -(-rows // world)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk), chunk


@dataclass
class Factor:
    """What every rank needs to solve its rows of one module: the Hessian's factor V (H = V V^T, activation
    ordered), the order (None: columns as they are), the dead columns and the round-to-nearest flag."""

    V: Any
    perm: Any
    dead: Any
    fallback: Any


def factorize(hessian: Any, columns: int, quant_args: Any, percdamp: float) -> Factor:
    """On the factoring rank, from the reduced, normalised [1, n, n] Hessian: llm-compressor's activation order,
    then the left-looking solve's factor (dead columns and dampening as `factorize_hessian` treats them)."""
    import torch
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, apply_activation_ordering

    from farm.stages.leftgptq import hessian_factor

    H = hessian.to(dtype=GPTQ_PRECISION)
    no_rows = torch.empty(1, 0, columns, dtype=GPTQ_PRECISION, device=H.device)
    _, H, perm = apply_activation_ordering(no_rows, H, quant_args.actorder)
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    fallback = torch.zeros(1, dtype=torch.bool, device=H.device)
    V = hessian_factor(no_rows, H, percdamp, fallback)
    return Factor(V, perm, dead, fallback)


def share_factor(factor: Factor | None, src: int, columns: int, ordered: bool, device: Any) -> Factor:
    """Broadcast the factoring rank's `Factor` (None on the other ranks) to every rank."""
    import torch
    import torch.distributed as dist

    if factor is None:
        factor = Factor(torch.empty(1, columns, columns, dtype=torch.float32, device=device),
                        torch.empty(1, columns, dtype=torch.int64, device=device) if ordered else None,
                        torch.empty(1, columns, dtype=torch.bool, device=device),
                        torch.empty(1, dtype=torch.bool, device=device))
    flags = torch.cat([factor.dead.reshape(-1), factor.fallback]).to(torch.uint8)  # bools travel as bytes (gloo)
    tensors = [factor.V, flags] + ([factor.perm] if ordered else [])
    for work in [dist.broadcast(t, src=src, async_op=True) for t in tensors]:
        work.wait()
    factor.dead, factor.fallback = flags[:columns].bool().reshape(1, columns), flags[columns:].bool()
    return factor


def solve_rows(weight: Any, factor: Factor, scale: Any, zero_point: Any, global_scale: Any, quant_args: Any,
               blocksize: int) -> tuple[Any, Any]:
    """This rank's rows of one module, collectively: every rank gets the whole quantized [1, rows, n] weight (in
    the weight's dtype) and the loss summed over all rows."""
    import torch
    import torch.distributed as dist
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

    from farm.stages.leftgptq import column_loop, group_index, unpermute

    rank, world = dist.get_rank(), dist.get_world_size()
    rows, columns = weight.shape
    start, stop, chunk = share(rows, rank, world)
    per_row = scale.ndim >= 2 and scale.shape[-2] == rows  # channel/group scales; a tensor's scale stays whole
    mine = (lambda t: t[..., start:stop, :]) if per_row else (lambda t: t)
    parts = [torch.zeros(chunk, columns, dtype=weight.dtype, device=weight.device) for _ in range(world)]
    loss = torch.zeros(1, dtype=torch.float32, device=weight.device)
    if stop > start:
        W = weight[start:stop].to(GPTQ_PRECISION).unsqueeze(0)
        if factor.perm is not None:
            W = torch.gather(W, -1, factor.perm.unsqueeze(-2).expand(-1, stop - start, -1))
        W.masked_fill_(factor.dead.unsqueeze(1), 0)
        g_idx = group_index(quant_args, columns, 1, factor.perm, weight.device)
        q, loss = column_loop(W, factor.V, mine(scale), mine(zero_point), global_scale, g_idx, quant_args, blocksize)
        parts[rank][: stop - start].copy_(unpermute(q, factor.perm)[0])
    dist.all_gather(parts, parts[rank].clone())
    dist.all_reduce(loss)
    return torch.cat(parts)[:rows].unsqueeze(0), loss


def splittable(modules: list[Any]) -> bool:
    """Every module has per-row (or per-tensor) weight scales and its own copy of the weights on this rank: a
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
        return str(getattr(strategy, "value", strategy)).lower() in PER_ROW

    return all(own_copy(m) and per_row(m) for m in modules)


def compress_split(modifier: Any, modules: list[Any], plan: RankPlan) -> None:
    """One layer's solves under `plan` (collective): reduce each Hessian to its factoring or owning rank; factor
    the split modules and solve the owned ones; share the factors and solve the split modules' rows; broadcast
    the owned modules' results."""
    import torch
    import torch.distributed as dist
    from compressed_tensors.utils import getattr_chain
    from llmcompressor.modifiers.gptq import base
    from llmcompressor.modifiers.gptq.helpers import update_batch_qparams
    from llmcompressor.utils.dist import broadcast_qparams_and_cleanup
    from loguru import logger

    rank = dist.get_rank()
    target = {modules[i]: r for i, r in (plan.split | plan.owner).items()}
    modifier._reduce_hessian_to_target_rank(modules, target)  # drops the Hessians this rank does not keep
    split = [(modules[i], r) for i, r in plan.split.items()]
    factors: dict[Any, Factor] = {}
    with torch.no_grad():
        for module, src in split:
            if src == rank:
                hessian = modifier._hessians.pop(module)
                samples = modifier._num_samples.pop(module).to(hessian.device)
                factors[module] = factorize((hessian / samples).unsqueeze(0), module.weight.shape[1],
                                            getattr_chain(module, "quantization_scheme.weights"),
                                            modifier.dampening_frac)
                del hessian
        modifier.compress_module_list([modules[i] for i, r in plan.owner.items() if r == rank])
        for module, src in split:
            quant_args = getattr_chain(module, "quantization_scheme.weights")
            weight = module.weight
            factor = share_factor(factors.pop(module, None), src, weight.shape[1], bool(quant_args.actorder),
                                  weight.device)
            qparams = module.weight_observer.get_qparams()
            scale, zero_point = qparams["scale"].unsqueeze(0), qparams["zero_point"].unsqueeze(0)
            global_scale = qparams["global_scale"]
            global_scale = None if global_scale is None else global_scale.reshape(-1)[:1]
            quantized, loss = solve_rows(weight.data, factor, scale, zero_point, global_scale, quant_args,
                                         modifier.block_size)
            name = modifier._module_names[module]
            if bool(factor.fallback.item()):
                modifier._rtn_fallback_module_names.append(name)
            del factor
            logger.info(f"GPTQ {name}: rows over {dist.get_world_size()} ranks, loss {loss.item():.4f}")
            update_batch_qparams([module], quantized, scale, zero_point, global_scale, quant_args)
            modifier._num_compressed_modules += 1
    owned = {modules[i]: r for i, r in plan.owner.items()}
    broadcast_qparams_and_cleanup(list(owned), owned, getattr(base, "_GPTQ_Q_PARAMS", Q_PARAMS))
    for module, _ in split:
        observer = getattr(module, "weight_observer", None)
        if observer is not None and observer.has_statistics:
            observer.delete_statistics(check_fused=True)


@contextlib.contextmanager
def split_largest_solves() -> Iterator[Tally]:
    """Within the block, a distributed GPTQModifier shares each layer's dominant solves over the ranks
    (`plan_ranks`, `compress_split`); single processes and layers it cannot split are upstream's."""
    import torch.distributed as dist
    from llmcompressor.modifiers.gptq import base

    tally = Tally("GPTQ's largest solves shared by rows over the data-parallel ranks: {n} modules "
                  "(resources.gptq_ranks: owner for llm-compressor's one rank per module)")

    def make(original: Any) -> Any:
        def compress_modules(self: Any) -> None:
            modules = list(self._hessians.keys())
            if not (dist.is_available() and dist.is_initialized()) or not modules:
                return original(self)
            plan = plan_ranks([tuple(m.weight.shape) for m in modules], dist.get_world_size())
            if not plan.split or not splittable([modules[i] for i in plan.split]):
                return original(self)
            compress_split(self, modules, plan)
            tally.n += len(plan.split)
            return None

        return compress_modules

    with swapped(base.GPTQModifier, "compress_modules", make, "the shared GPTQ solves"):
        yield tally
