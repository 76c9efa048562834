"""On CUDA: GPTQ's inverse-Hessian factor from one Cholesky, and the left-looking solve that needs no inverse,
leave GPTQ's objective where llm-compressor's puts it, and are faster. Skipped without CUDA; results in
docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu.test_gpu_hessian import _gptq, _timed
from tests.gpu.test_gpu_stages import TEXT, small_llama, torch  # noqa: F401 - the model fixture is shared

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("n", [4096, 14336])
def test_factor_matches_and_is_faster(n: int) -> None:
    from llmcompressor.modifiers.gptq.helpers import factorize_hessian

    from farm.stages.llmc.gptq_one_cholesky import upper_inverse_factor

    torch.manual_seed(0)
    x = torch.randn(16384, n, device="cuda", dtype=torch.bfloat16)
    h = torch.mm(x.t(), x, out_dtype=torch.float32).unsqueeze(0) * (2 / 16384)
    w = torch.zeros(1, 8, n, device="cuda")

    def ours() -> torch.Tensor:
        return upper_inverse_factor(w, h.clone(), 0.01, torch.zeros(1, dtype=torch.bool, device="cuda"))

    def ref() -> torch.Tensor:
        return factorize_hessian(w, h.clone(), 0.01, torch.zeros(1, dtype=torch.bool, device="cuda"))

    a, b = ours(), ref()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    fast, slow = _timed(ours), _timed(ref)
    print(
        f"GPU GPTQ factor {n}: llm-compressor {slow * 1e3:.1f} ms, one Cholesky {fast * 1e3:.1f} ms; "
        f"max difference {rel:.1e} of the largest entry"
    )
    assert rel < 1e-4


def test_gptq_objective_with_one_cholesky(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from datasets import Dataset

    from farm.calibration import read_text, sample_windows
    from farm.stages.modelio import load_tokenizer

    tok = load_tokenizer(small_llama)
    windows = sample_windows(read_text(str(TEXT)), tok, 32, 512, 0)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    ref = _gptq(small_llama, ds, 8, tmp_path / "ref", True, fused_attention=True)
    ref_b4 = _gptq(small_llama, ds, 4, tmp_path / "ref-b4", True, fused_attention=True)
    ours = _gptq(small_llama, ds, 8, tmp_path / "ours", True, fused_attention=True, one_cholesky=True)
    left = _gptq(small_llama, ds, 8, tmp_path / "left", True, fused_attention=True, left_looking=True)
    noise, moved, moved_left = abs(ref_b4 - ref) / ref, abs(ours - ref) / ref, abs(left - ref) / ref
    print(
        f"GPU GPTQ summed loss: llm-compressor's factor {ref:.4f} (batch 4: {ref_b4:.4f}), one Cholesky "
        f"{ours:.4f}, left-looking {left:.4f}; relative difference {moved:.1e} and {moved_left:.1e}, "
        f"reorder noise {noise:.1e}"
    )
    assert moved <= max(3 * noise, 1e-4) and moved_left <= max(3 * noise, 1e-4)
