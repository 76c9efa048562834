"""On CUDA: farm's save streams each shard's GPU tensors through pinned buffers and writes shards on threads
(stages/llmc/parallel_shard_writes.py): the same tensors as transformers' own loop. Skipped without CUDA; timings in
docs/BENCHMARKS.md (bench/profile_oneshot.py --save)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests.gpu.test_gpu_stages import small_llama, torch  # noqa: F401 - the model fixture is shared

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_write_shard_streams_cuda_tensors(tmp_path: Path) -> None:
    """CUDA tensors of every kind, one larger than two staging chunks, and CPU tensors between them."""
    from safetensors.torch import load_file

    from farm.stages.llmc.parallel_shard_writes import CHUNK, write_shard

    src = {
        "big": torch.randn(CHUNK + CHUNK // 2 + 3, device="cuda", dtype=torch.bfloat16),
        "packed": torch.randint(-(2**31), 2**31 - 1, (7, 3), device="cuda", dtype=torch.int32),
        "zero_point": torch.randint(-8, 7, (5,), device="cuda", dtype=torch.int8),
        "fp8": torch.randn(4, 4, device="cuda").to(torch.float8_e4m3fn),
        "cpu": torch.arange(6),
        "mask": torch.rand(9, device="cuda") > 0.5,
        "scalar": torch.tensor(3.5, device="cuda"),
        "empty": torch.empty(0, 4, device="cuda"),
        "strided": torch.randn(8, 3, device="cuda").t(),
    }
    write_shard(src, str(tmp_path / "s.safetensors"), {"format": "pt"})
    back = load_file(tmp_path / "s.safetensors")
    assert back.keys() == src.keys()
    for k, t in src.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        if t.numel():  # bytes, so fp8 and bool compare too
            assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.cpu().reshape(-1).view(torch.uint8))


def test_pinned_threaded_save_matches_transformers(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from farm.stages.llmc.parallel_shard_writes import parallel_shard_writes

    model = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.bfloat16, device_map="cuda")
    seconds = {}
    for name in ("serial", "farm", "serial2", "farm2"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with parallel_shard_writes() if name.startswith("farm") else contextlib.nullcontext():
            model.save_pretrained(tmp_path / name, max_shard_size="20MB")
        seconds[name] = time.perf_counter() - t0
    a = {k: v for f in sorted((tmp_path / "serial").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "farm").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(
        f"GPU save {sum(v.numel() * v.element_size() for v in a.values()) / 1e6:.0f} MB: transformers "
        f"{seconds['serial']:.2f}/{seconds['serial2']:.2f} s, farm {seconds['farm']:.2f}/{seconds['farm2']:.2f} s"
    )
