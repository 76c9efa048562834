"""The process group of a data-parallel variant, from inside each rank (no Ray here: the driver forms the
placement group and tells every rank who rank 0 is).

llm-compressor's distributed oneshot only asks `torch.distributed.is_initialized()`: farm initialises the group
itself (NCCL on GPUs, gloo on CPUs) rather than through torchrun's environment, then each rank calibrates on
its share of the samples; GPTQ reduces Hessians to the rank that owns each module and broadcasts the result.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    master_addr: str
    master_port: int
    visible_devices: str = ""  # every rank's GPU, in rank order (the gang is packed on one node)


def use_devices(rank: Rank) -> None:
    """Before CUDA is touched: see the whole gang's GPUs and pick our own as device `rank`. compressed-tensors
    takes device index == process rank (torchrun's one-node layout), so each rank must see all of them; Ray
    alone would show each actor only its own GPU, as device 0."""
    if rank.visible_devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = rank.visible_devices
    os.environ["LOCAL_RANK"] = str(rank.rank)
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(rank.rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init(rank: Rank, timeout_s: float = 1800) -> str:
    """Join the group (after `use_devices`); returns the backend."""
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR=rank.master_addr, MASTER_PORT=str(rank.master_port), RANK=str(rank.rank), WORLD_SIZE=str(rank.world)
    )
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend,
        rank=rank.rank,
        world_size=rank.world,
        timeout=dt.timedelta(seconds=timeout_s),
        device_id=torch.device("cuda", rank.rank) if cuda else None,
    )
    dist.barrier()
    return backend


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
