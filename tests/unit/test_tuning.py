"""Per-variant llm-compressor settings follow the memory a worker has."""

from __future__ import annotations

from farm.stages.tuning import GIB, choose

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192)


def test_cpu_keeps_defaults() -> None:
    t = choose("cpu", 0, num_samples=128, seq_len=2048, **LLAMA_8B)
    assert (t.offload_device, t.batch_size) == (None, 1)


def test_whole_h100_keeps_activations_on_gpu_and_batches() -> None:
    t = choose("cuda", 78 * GIB, num_samples=128, seq_len=2048, **LLAMA_8B)
    assert t.offload_device == "cuda" and t.batch_size > 1


def test_small_share_falls_back_to_host() -> None:
    t = choose("cuda", 4 * GIB, num_samples=128, seq_len=2048, **LLAMA_8B)
    assert t.offload_device is None


def test_quarter_gpu_still_fits_1b() -> None:
    t = choose("cuda", int(78 * GIB / 4), num_samples=128, seq_len=2048, **LLAMA_1B)
    assert t.offload_device == "cuda"


def test_frugal_retry_uses_defaults() -> None:
    t = choose("cuda", 78 * GIB, num_samples=128, seq_len=2048, frugal=True, **LLAMA_8B)
    assert (t.offload_device, t.batch_size) == (None, 1)
