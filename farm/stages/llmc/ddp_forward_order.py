"""Distributed GPTQ's results sent in the order the layer uses them, each waited for where it is first used.

llm-compressor's distributed GPTQ (`GPTQModifier.compress_modules`) reduces each module's Hessian to an owner
rank, solves each rank's modules, then broadcasts every result and waits for all of them before the layer's
propagation pass. Each rank's GPU then idles until the slowest owner is done: on an 8B Llama, down_proj's owner
(the largest Hessian, ~0.1 s of a ~0.35 s layer on 4 ranks). Here the broadcasts go out in forward order
(q, k, v, o, gate, up, down), a rank solving its own modules just before their turn and posting the others'
at once, and a module's forward waits for its own broadcast only, on its CUDA stream (NCCL's `wait` does not
hold the host): the other ranks propagate attention and gate/up while down_proj's owner solves. Propagating a
rank's share in one batch (stages/tuning.py) lets all of it overlap, not only the first batch's.

Same owners (llm-compressor's packing), same solve batches, same kernels: the same weights to the bit. Modules
that run on the host (a shared CPU copy) are not broadcast, as upstream. Only while `forward_ordered()` is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.stages.llmc.swap import swapped


def schedule(
    order: Sequence[Hashable], owner: dict[Any, int], rank: int, batches: Sequence[Sequence[Hashable]]
) -> list[tuple[str, Any]]:
    """This rank's steps, pure: ("solve", batch) before the first module of each of its own batches, then
    ("send", module) for every module in forward `order` (the same sequence of collectives on every rank)."""
    first: dict[Any, list[Any]] = {}
    for batch in batches:
        lead = min(batch, key=order.index)
        first[lead] = list(batch)
    steps: list[tuple[str, Any]] = []
    for module in order:
        if owner[module] == rank and module in first:
            steps.append(("solve", first[module]))
        steps.append(("send", module))
    return steps


@dataclass
class Pending:
    """Broadcasts not yet waited for, by module, with the hooks that wait for them (and a count for the note)."""

    works: dict[Any, list[Any]] = field(default_factory=dict)
    hooks: dict[Any, Any] = field(default_factory=dict)
    layers: int = 0
    sent: int = 0  # modules broadcast (none where ranks share one host copy)

    def add(self, module: Any, works: list[Any]) -> None:
        """`module`'s broadcasts, waited for by a forward pre-hook (a plain torch hook: llm-compressor's
        `HooksMixin.disable_hooks()` during propagation leaves it on)."""
        self.sent += 1
        self.works[module] = works
        self.hooks[module] = module.register_forward_pre_hook(lambda mod, args: self.wait(mod))

    def wait(self, module: Any) -> None:
        for work in self.works.pop(module, ()):
            work.wait()  # NCCL: the current stream waits, not the host
        hook = self.hooks.pop(module, None)
        if hook is not None:
            hook.remove()

    def flush(self) -> None:
        for module in list(self.works):
            self.wait(module)

    def drop(self) -> None:
        """After an error: the hooks go, nothing is waited for (a peer that failed would never answer)."""
        for hook in self.hooks.values():
            hook.remove()
        self.works.clear()
        self.hooks.clear()

    def note(self) -> str | None:
        if not self.layers:
            return None
        how = (
            f"{self.sent} modules' results broadcast in forward order, each waited for where first used"
            if self.sent
            else "nothing broadcast (the ranks share one host copy)"
        )
        return (
            f"distributed GPTQ, {self.layers} layers solved in forward order: {how} (stages/llmc/ddp_forward_order.py; "
            "resources.gptq_broadcast: llmcompressor for upstream's)"
        )


def exchange(
    order: Sequence[Any],
    owner: dict[Any, int],
    rank: int,
    batches: Sequence[Sequence[Any]],
    solve: Callable[[list[Any]], None],
    tensors: Callable[[Any], list[Any]],
    pending: Pending,
) -> None:
    """Run this rank's `schedule`: `solve` its batches, post each module's `tensors` as broadcasts from its
    owner (async: the host goes on), each waited for where the module is next called."""
    import torch.distributed as dist

    for kind, item in schedule(order, owner, rank, batches):
        if kind == "solve":
            solve(item)
            continue
        works = [dist.broadcast(t, src=owner[item], async_op=True) for t in tensors(item)]
        if works:
            pending.add(item, works)


def compress_in_forward_order(modifier: Any, pending: Pending) -> None:
    """`GPTQModifier.compress_modules` for a process group, with upstream's owners, batches and solves."""
    import torch
    import torch.distributed as dist
    from compressed_tensors.distributed import greedy_bin_packing
    from compressed_tensors.distributed.utils import as_broadcastable
    from compressed_tensors.offload import get_execution_device
    from llmcompressor.modifiers.gptq import base
    from llmcompressor.modifiers.gptq.helpers import assign_batches

    q_params = getattr(base, "_GPTQ_Q_PARAMS", ("weight", "weight_scale", "weight_zero_point"))  # upstream's list

    pending.flush()  # a module the previous layer never called (none in a dense model)
    rank, world = dist.get_rank(), dist.get_world_size()
    hessians = modifier._hessians
    module_list, rank_to_modules, module_to_rank = greedy_bin_packing(
        list(hessians), world, item_weight_fn=lambda m: hessians[m].shape[0]
    )
    modifier._reduce_hessian_to_target_rank(module_list, module_to_rank)
    position = {m: i for i, m in enumerate(modifier._module_names)}
    order = sorted(module_list, key=lambda m: position.get(m, len(position)))
    batches = assign_batches(rank_to_modules[rank], modifier.batched_quantization, modifier.block_size)

    def tensors(module: Any) -> list[Any]:
        if get_execution_device(module) == torch.device("cpu"):
            return []  # a shared host copy: nothing to send (as upstream's `skip_cpu`)
        return [as_broadcastable(p) for name in q_params if (p := getattr(module, name, None)) is not None]

    exchange(order, module_to_rank, rank, batches, modifier.compress_module_list, tensors, pending)
    for module in module_list:
        obs = getattr(module, "weight_observer", None)
        if obs is not None and obs.has_statistics:
            obs.delete_statistics(check_fused=True)
    pending.layers += bool(module_list)  # a subgraph without quantized modules solves nothing


@contextlib.contextmanager
def forward_ordered() -> Iterator[Pending]:
    """Within the block, distributed GPTQ sends its results in forward order (one process: upstream's path)."""
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    pending = Pending()

    def make_compress(original: Any) -> Any:
        def compress_modules(self: Any) -> None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                return original(self)
            compress_in_forward_order(self, pending)

        return compress_modules

    def make_end(original: Any) -> Any:
        def on_calibration_end(self: Any, *args: Any, **kwargs: Any) -> Any:
            pending.flush()  # before observers and hooks go, and before anything reads the weights
            return original(self, *args, **kwargs)

        return on_calibration_end

    with (
        swapped(GPTQModifier, "compress_modules", make_compress, "forward-ordered GPTQ broadcasts"),
        swapped(GPTQModifier, "on_calibration_end", make_end, "forward-ordered GPTQ broadcasts"),
    ):
        try:
            yield pending
        except BaseException:
            pending.drop()
            raise
        pending.flush()
