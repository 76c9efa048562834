"""Data-parallel ranks that each read 1/N of the checkpoint and receive the rest from the other ranks.

Why: a model that fits a GPU is replicated, one copy per rank, and every rank read the whole checkpoint. Measured
on a 4 x H100 host (8B, 16 GB of bf16 safetensors in the page cache): 2.75-3.3 s per rank, all four at once,
bound by pageable host-to-device copies (~5 GB/s per process). Here each rank reads the tensors it owns (a
byte-balanced share) and the others arrive by broadcast from their owners (NCCL over NVLink moves 16 GB in a
fraction of a second).

How: transformers' own `from_pretrained` still builds the model (config, dtype, tied weights, generation config,
attention implementation, device placement); only its safetensors reader is wrapped so that a tensor another rank
owns comes back as an uninitialised tensor already on this rank's device (no read, no copy). After the load every
checkpoint tensor is broadcast from its owner into the parameter or buffer of the same name. Only for plain
checkpoints: with a quantization config, or when a checkpoint name is not a parameter or buffer of the loaded
model (transformers renamed or merged it), every rank loads the whole checkpoint as before.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from farm.stages.llmc.parallel_shard_writes import dtypes
from farm.stages.llmc.swap import swapped
from farm.stages.modelio import tensor_bytes


def owners(files: list[Path], world: int) -> dict[str, int]:
    """Checkpoint tensor -> the rank that reads it: largest first onto the least-loaded rank (ties: lowest rank),
    the same on every rank."""
    sizes: dict[str, int] = {}
    for file in files:
        sizes |= tensor_bytes(file)
    load = [0] * world
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += sizes[name]
    return out


class _Elsewhere:
    """A checkpoint tensor another rank reads: its shape and dtype, and uninitialised memory when sliced."""

    def __init__(self, real: Any, device: str):
        self.real, self.device = real, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __getitem__(self, index: Any) -> Any:
        import torch

        dtype = {code: dtype for dtype, code in dtypes().items()}.get(self.real.get_dtype())
        if dtype is None:  # a dtype torch has no name for here: read it (the broadcast brings the same bytes)
            return self.real[index]
        return torch.empty(self.real.get_shape(), dtype=dtype, device=self.device)[index]


class _Handle:
    def __init__(self, real: Any, elsewhere: set[str], device: str):
        self.real, self.elsewhere, self.device = real, elsewhere, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> _Handle:
        self.real.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.real.__exit__(*exc)

    def get_slice(self, name: str) -> Any:
        real = self.real.get_slice(name)
        return _Elsewhere(real, self.device) if name in self.elsewhere else real


@contextlib.contextmanager
def reading_only_own(elsewhere: set[str], device: str) -> Iterator[bool]:
    """Within the block, transformers reads no tensor named in `elsewhere` (it gets empty memory on `device`)."""
    from transformers import modeling_utils

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def open_file(*args: Any, **kwargs: Any) -> Any:
            return _Handle(original(*args, **kwargs), elsewhere, device)

        return open_file

    with swapped(modeling_utils, "safe_open", make, "reading a share of the checkpoint per rank") as done:
        yield done


def plain_checkpoint(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint this loader can share out, or [] (a quantized or .bin checkpoint)."""
    config = path / "config.json"
    if not config.exists() or "quantization_config" in json.loads(config.read_text()):
        return []
    return sorted(path.glob("*.safetensors"))


def load_split(path: str | Path, device: str, rank: int, world: int, load: Callable[[], Any]) -> Any | None:
    """`load()` (the ordinary loader for `path` onto `device`) with this rank reading only its share of the
    tensors, the rest broadcast from the ranks that read them; None where that does not apply (the caller then
    loads the whole checkpoint). Collective: every rank of the initialised process group calls it."""
    import torch.distributed as dist

    files = plain_checkpoint(Path(path))
    if world < 2 or not files or not dist.is_initialized():
        return None
    plan = owners(files, world)
    with reading_only_own({k for k, r in plan.items() if r != rank}, device) as wrapped:
        model = load()
    if not wrapped:  # transformers no longer reads through `safe_open`: it read everything itself
        return model
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    if any(name not in tensors for name in plan):  # the same answer on every rank: load it whole instead
        del model, tensors
        return None
    pending = [dist.broadcast(tensors[name].data, src=plan[name], async_op=True) for name in sorted(plan)]
    for work in pending:
        work.wait()
    return model


def dispatch_replica(model: Any, device: str) -> None:
    """Hand compressed-tensors a replica that is already identical on every rank without broadcasting it again.

    llm-compressor's sequential pipeline dispatches the model (`set_onload_device`); for a model on a GPU in a
    process group every tensor then goes through compressed-tensors' distributed device cache, which broadcasts
    rank 0's copy of it to the others: the whole model, one tensor at a time, inside the oneshot. Every rank's
    replica was read from the same checkpoint (or shared out by `load_split`), so the same dispatch is done here
    with that broadcast off (`as_single_threaded`); the caches stay the distributed kind, so what is offloaded
    later (quantization parameters, compressed weights) is still broadcast."""
    import torch
    from compressed_tensors.offload import as_single_threaded, set_onload_device

    with as_single_threaded():
        set_onload_device(model, torch.device(device))
