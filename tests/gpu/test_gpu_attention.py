"""On CUDA: calibration with fused attention (SDPA on llm-compressor's eager mask) leaves GPTQ's objective where
eager attention puts it, and is faster. Skipped without CUDA; results in docs/BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.gpu.test_gpu_hessian import _gptq
from tests.gpu.test_gpu_stages import TEXT, small_llama, torch  # noqa: F401 - the model fixture is shared

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fused_attention_matches_eager_in_bf16(small_llama: Path) -> None:  # noqa: F811
    """One bf16 forward of the test model under llm-compressor's eager config, with and without the override."""
    from farm.stages.llmc.calibration_sdpa import sdpa_calibration
    from farm.stages.modelio import load_model

    model = load_model(small_llama, "cuda")
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, model.config.vocab_size, (8, 1024), device="cuda")

    def timed() -> tuple[torch.Tensor, float]:  # logits, and the seconds of a second (warm) forward
        with torch.no_grad():
            logits = model(ids).logits.float()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
        return logits, time.perf_counter() - t0

    eager, t_eager = timed()
    with sdpa_calibration(model) as usage:
        fused, t_fused = timed()
    rel = ((fused - eager).norm() / eager.norm()).item()
    print(
        f"GPU attention: eager forward {t_eager * 1e3:.1f} ms, fused {t_fused * 1e3:.1f} ms; logits relative "
        f"difference {rel:.1e} (bf16)"
    )
    assert usage.fused > 0 and usage.eager == 0
    assert rel < 2e-2  # bf16 rounding of the eager scores is the difference, not the maths


def test_gptq_objective_with_fused_attention(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    """GPTQ's summed layer losses with fused attention against eager attention, both with farm's tensor-core
    Hessians, beside llm-compressor's own batch-reorder noise."""
    from datasets import Dataset

    from farm.calibration import read_text, sample_windows
    from farm.stages.modelio import load_tokenizer

    tok = load_tokenizer(small_llama)
    windows = sample_windows(read_text(str(TEXT)), tok, 32, 512, 0)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    eager = _gptq(small_llama, ds, 8, tmp_path / "eager", True)
    eager_b4 = _gptq(small_llama, ds, 4, tmp_path / "eager-b4", True)
    fused = _gptq(small_llama, ds, 8, tmp_path / "fused", True, fused_attention=True)
    noise = abs(eager_b4 - eager) / eager
    moved = abs(fused - eager) / eager
    print(
        f"GPU GPTQ summed loss: eager {eager:.4f}, eager batch 4 {eager_b4:.4f}, fused {fused:.4f}; relative "
        f"difference fused {moved:.1e}, reorder noise {noise:.1e}"
    )
    assert moved < 5e-3
