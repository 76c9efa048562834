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


def test_model_larger_than_the_gpu_stays_on_host_and_is_onloaded() -> None:
    # a 70B-class checkpoint (140 GB bf16) on one 80 GB card
    t = choose(
        "cuda",
        78 * GIB,
        num_samples=128,
        seq_len=2048,
        weights_bytes=140 * 10**9,
        hidden_size=8192,
        intermediate_size=28672,
    )
    assert t.load_device == "cpu" and t.offload_device is None and "onloaded" in t.reason


def test_weights_on_the_gpu_leave_less_room_for_activations() -> None:
    roomy = choose("cuda", 40 * GIB, num_samples=128, seq_len=2048, **LLAMA_8B)
    loaded = choose("cuda", 40 * GIB, num_samples=128, seq_len=2048, weights_bytes=16 * 10**9, **LLAMA_8B)
    assert loaded.load_device is None and loaded.batch_size <= roomy.batch_size


def test_ddp_ranks_replicate_a_model_that_fits_and_share_one_that_does_not() -> None:
    from farm.methods import build_method
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, placement

    def req(world: int, rank: int = 0, load_device: str | None = None) -> QuantizeRequest:
        return QuantizeRequest(
            "m",
            build_method({"method": "gptq"}),
            CalibrationDraw("t.txt", 8, 64, 0),
            "out",
            load_device=load_device,
            rank=rank,
            world=world,
        )

    fits = choose("cuda", 80 * GIB, num_samples=32, seq_len=2048, weights_bytes=16 * GIB, **LLAMA_8B)
    too_big = choose("cuda", 80 * GIB, num_samples=32, seq_len=2048, weights_bytes=140 * GIB, **LLAMA_8B)
    assert placement(req(4, 2, fits.load_device), "cuda") == "cuda:2"  # a replica on rank 2's own GPU
    assert placement(req(4, 2, too_big.load_device), "cuda") == "shared"  # one host copy, onloaded per layer
    assert placement(req(2), "cpu") == "shared"  # CPU ranks share results through the host copy
    assert placement(req(1), "cuda") == "cuda" and placement(req(1, load_device="cpu"), "cuda") == "cpu"


def test_a_ddp_rank_that_overlaps_the_owners_solve_calibrates_its_share_in_one_batch() -> None:
    # 8B on an 80 GB card, 32 samples per rank of 4: with fused attention the whole share fits one batch
    share = choose("cuda", 64 * GIB, num_samples=32, seq_len=2048, **LLAMA_8B, attention="sdpa", whole_share=True)
    assert share.batch_size == 32 and share.offload_device == "cuda"
    assert choose("cuda", 64 * GIB, num_samples=32, seq_len=2048, **LLAMA_8B).batch_size == 16  # as before
    # eager attention's heads x seq^2 scores do not fit 32 at once: the usual sizes remain
    eager = choose("cuda", 64 * GIB, num_samples=32, seq_len=2048, **LLAMA_8B, whole_share=True)
    assert eager.batch_size in (16, 8, 4, 2)
