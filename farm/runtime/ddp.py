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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init(rank: Rank, timeout_s: float = 1800) -> str:
    """Join the group; returns the backend. Every rank sees its own GPU as device 0 (Ray sets
    CUDA_VISIBLE_DEVICES per bundle)."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR=rank.master_addr, MASTER_PORT=str(rank.master_port), RANK=str(rank.rank),
                      WORLD_SIZE=str(rank.world), LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=rank.rank, world_size=rank.world,
                            timeout=dt.timedelta(seconds=timeout_s), device_id=torch.device("cuda:0") if cuda else None)
    dist.barrier()
    return backend


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
