"""Loading models and tokenizers on the device a worker was given, and sizing checkpoints."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any


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


# The CPU kernels farm pins for CPU-only workers, so that the same job gives the same numbers on any x86-64
# host: torch, MKL and oneDNN otherwise pick their kernels by the host's vector ISA, and an AVX-512 host rounds
# differently from an AVX2 one (measured: the quickstart's FP8 variant, held-out perplexity 43.758 with
# ATEN_CPU_CAPABILITY=default vs 43.824 with avx2, on one machine). Set beforehand, a variable wins.
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> dict[str, str]:
    """Pin the CPU kernels (PINNED_CPU_KERNELS) in this process before torch loads; returns what was set. Only on
    x86-64 hosts with AVX2 (every x86-64 server CPU since 2013); elsewhere the host's own kernels run."""
    import platform
    import sys

    if "torch" in sys.modules or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    if " avx2" not in flags:
        return {}
    pinned = {k: v for k, v in PINNED_CPU_KERNELS.items() if k not in os.environ}
    os.environ.update(pinned)
    return pinned


def load_model(path: str | Path, device: str, trust_remote_code: bool = False, compute: str | None = None) -> Any:
    """The model on `device`. `compute` is where it will run when that differs (weights kept on the host and
    onloaded to a GPU a layer at a time): the dtype follows the compute device, so an onloaded variant
    calibrates in the same bf16 as one that fits its GPU, and holds half the host memory of fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 computed on CPU (bf16 matmuls are slow there and change the numbers); bf16 on GPUs.
    dtype = torch.float32 if (compute or device) == "cpu" else torch.bfloat16
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


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def weights_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


_IN_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def tensor_bytes(file: Path) -> dict[str, int]:
    """Each tensor's size in one safetensors file, from its header alone."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__"}


def decoder_linear_bytes(path: str | Path) -> int:
    """Bytes the checkpoint stores for its decoder layers' Linear modules (packed weights, scales, zero points,
    biases; norms excluded), read from the safetensors headers alone: the size quantization changes, apart from
    embeddings and lm_head that stay in high precision."""
    return sum(
        size
        for shard in Path(path).glob("*.safetensors")
        for name, size in tensor_bytes(shard).items()
        if _IN_DECODER_LAYER.search(name) and not name.rsplit(".", 1)[0].endswith("norm")
    )
