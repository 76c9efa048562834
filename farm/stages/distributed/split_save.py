"""Every data-parallel rank writes its share of the checkpoint's shards.

Why: llm-compressor's `save_pretrained` wrapper compresses the model on all ranks (compressed-tensors spreads the
modules and broadcasts the packed weights, so every rank ends with the whole compressed model), then only the
source process runs transformers' save and writes every shard: 5.7 GB of an 8B W4A16 checkpoint on one rank
while the others wait at a barrier. Here every rank runs transformers' save (its shard plan depends only on
the state dict's names, dtypes and shapes, the same on every rank) and writes shard i (numbered from 1) when
(i - 1) % world == rank, into rank 0's directory; a rank's other files (config, recipe, index) go to its own
directory, unused. Rank 0 writes every file but the other ranks' shards; a barrier after the save lets rank 0
go on (hash, evaluate) only once every rank's shards are on disk (llm-compressor's own barriers come before
the writer threads finish).

Ranks that cannot see rank 0's directory (another host without a shared filesystem) leave the save as
llm-compressor does it; all ranks agree on which way before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from farm.stages.llmc.swap import swapped

SHARD_NAME = re.compile(r".*-(\d+)-of-(\d+)\.safetensors$")


def shard_owner(filename: str, world: int) -> int:
    """The rank that writes a shard: round robin over the shard numbers (a single-file checkpoint: rank 0)."""
    match = SHARD_NAME.fullmatch(os.path.basename(filename))
    return (int(match.group(1)) - 1) % world if match else 0


def sees(directory: str) -> bool:
    """Whether this process sees rank 0's directory (it made it before asking)."""
    return os.path.isdir(directory)


def _shared_directory(out_dir: Path) -> str | None:
    """Rank 0's output directory when every rank sees it (collective), else None."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    where = [str(out_dir)]
    dist.broadcast_object_list(where, src=0)
    seen: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, sees(where[0]))
    return where[0] if all(seen) else None


@contextlib.contextmanager
def shards_split_over_ranks(model: Any, out_dir: str | Path) -> Iterator[Callable[[str], str | None] | None]:
    """Within the block (around `model.save_pretrained(out_dir)` on every rank of an initialised group),
    llm-compressor's and transformers' saves run on every rank. Yields where a shard file this rank's save
    names goes (rank 0's directory, or None: another rank writes it), for `parallel_shard_writes(route=...)`;
    yields None, changing nothing, outside a group of several ranks or when the ranks share no directory."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        yield None
        return
    target = _shared_directory(Path(out_dir))
    if target is None:
        yield None
        return
    rank, world = dist.get_rank(), dist.get_world_size()

    def route(filename: str) -> str | None:
        return os.path.join(target, os.path.basename(filename)) if shard_owner(filename, world) == rank else None

    from llmcompressor.transformers.compression import compressed_tensors_utils

    with (
        swapped(compressed_tensors_utils, "is_source_process", lambda _: lambda: True, "split shard writes") as on,
        every_rank_saves(model),
    ):
        yield route if on else None
    # The block's shard writes are on disk on this rank (`parallel_shard_writes` waits for them inside it); rank
    # 0 goes on to hash and evaluate the checkpoint only once every rank's are.
    dist.barrier()


@contextlib.contextmanager
def every_rank_saves(model: Any) -> Iterator[None]:
    """transformers writes a checkpoint's files on torch.distributed rank 0 only (`should_save_on_this_rank`);
    within the block this model's save writes on every rank that calls it."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank
