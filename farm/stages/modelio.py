"""Loading models and tokenizers on the device a worker was given, writing checkpoint shards, and sizing
checkpoints."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from farm.stages.swap import swapped


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def start_device(device: str) -> None:
    """Create the CUDA context now (first allocation), so a stage can time it apart from reading weights."""
    import torch

    if device.startswith("cuda"):
        torch.empty(1, device=device)


def set_threads(num_cpus: float) -> None:
    """Use as many intra-op threads as CPUs reserved, so packed variants do not oversubscribe a node."""
    import torch

    n = max(1, int(num_cpus))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def load_model(path: str | Path, device: str, trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 on CPU (bf16 matmuls are slow there and change the numbers); bf16 on GPUs.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, device_map=device
    )
    return model.eval()


def load_shared_model(path: str | Path, device: str, trust_remote_code: bool = False) -> Any:
    """For distributed calibration of a model too large for one GPU (or on CPUs): rank 0 reads the checkpoint
    into host memory and the other ranks share it through compressed-tensors' offloading (instead of N copies);
    llm-compressor onloads layer by layer. A model that fits a GPU is instead replicated, one copy per rank's
    GPU (`load_model`): compressed-tensors' device cache broadcasts rank 0's tensors at dispatch and the
    compressed ones at save, which avoids the host round trips (measured 8B on 4 H100s: load 21 s, save 19 s
    shared)."""
    import torch
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code, device_map="auto_offload"
        )
    return model.eval()


@contextlib.contextmanager
def parallel_shard_writes(workers: int = 8) -> Iterator[None]:
    """Within the block, transformers' `save_pretrained` hands each checkpoint shard to a thread instead of
    writing them one after another. Its loop assumes safetensors holds the GIL; safetensors >= 0.6 serialises
    from pointers outside it, so the shards' device-to-host copies and file writes overlap (measured: 2 GB in
    four shards on the 2-core CI machine, 4.7 -> 2.8 s). The block ends only when every shard is on disk; a
    failed write raises, and one that fails the block still waits for the writes in flight."""
    from transformers import modeling_utils

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="farm-shard")
    writes: list[Future[None]] = []

    def make(original: Any) -> Any:
        def submit(tensors: dict[str, Any], filename: str, metadata: dict[str, str] | None = None) -> None:
            writes.append(pool.submit(original, tensors, filename, metadata=metadata))

        return submit

    try:
        with swapped(modeling_utils, "safe_save_file", make, "parallel shard writes"):
            yield
        for write in writes:
            write.result()
    finally:
        pool.shutdown(wait=True)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def weights_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
