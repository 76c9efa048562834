"""On CUDA: the tensor-core Hessian equals llm-compressor's fp32 one to fp32 rounding, is faster, and GPTQ's
output with it is what GPTQ gives without it. Skipped without CUDA; results in docs/BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.gpu.test_gpu_stages import TEXT, small_llama, torch  # noqa: F401 - the model fixture is shared

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _timed(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


@pytest.mark.parametrize("features", [4096, 14336])
def test_tensor_core_hessian_matches_fp32(features: int) -> None:
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian as upstream

    from farm.stages.hessian import accumulate, covers

    torch.manual_seed(0)
    x = torch.randn(8, 2048, features, device="cuda", dtype=torch.bfloat16)  # one batch of 8 x 2048 tokens
    linear = torch.nn.Linear(features, 8, device="cuda")
    ours, ref = torch.zeros(features, features, device="cuda"), torch.zeros(features, features, device="cuda")
    assert covers(x, linear, ours)
    accumulate(x, ours, torch.zeros((), device="cuda"))
    upstream(x, linear, ref, torch.zeros((), device="cuda"))
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    fast = _timed(lambda: accumulate(x, ours, torch.zeros((), device="cuda")))
    slow = _timed(lambda: upstream(x, linear, ref, torch.zeros((), device="cuda")))
    print(f"GPU Hessian {features}^2 from 16384 tokens: fp32 GEMM {slow * 1e3:.1f} ms, tensor cores "
          f"{fast * 1e3:.1f} ms ({slow / fast:.1f}x), max relative difference {rel:.1e}")
    assert rel < 1e-5


def test_gptq_output_unchanged(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    """The same windows through llm-compressor's oneshot with and without the tensor-core Hessian."""
    from llmcompressor import oneshot
    from safetensors.torch import load_file

    from farm.calibration import read_text, sample_windows
    from farm.methods import build_method
    from farm.stages.hessian import tensor_core_hessians
    from farm.stages.modelio import load_model, load_tokenizer

    tok = load_tokenizer(small_llama)
    windows = sample_windows(read_text(str(TEXT)), tok, 32, 512, 0)
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    method = build_method({"method": "gptq", "group_size": 128})
    outs = {}
    for name, ctx in [("upstream", None), ("tensor_cores", tensor_core_hessians)]:
        model = load_model(small_llama, "cuda")
        t0 = time.perf_counter()
        if ctx is None:
            oneshot(model=model, dataset=ds, recipe=method.modifiers(), num_calibration_samples=32,
                    max_seq_length=512, shuffle_calibration_samples=False, batch_size=8)
        else:
            with ctx():
                oneshot(model=model, dataset=ds, recipe=method.modifiers(), num_calibration_samples=32,
                        max_seq_length=512, shuffle_calibration_samples=False, batch_size=8)
        print(f"GPU GPTQ oneshot ({name}): {time.perf_counter() - t0:.1f} s")
        model.save_pretrained(tmp_path / name, save_compressed=True)
        outs[name] = load_file(str(next((tmp_path / name).glob("*.safetensors"))))
    a, b = outs["upstream"], outs["tensor_cores"]
    assert a.keys() == b.keys()
    packed = [k for k in a if k.endswith("weight_packed")]
    same = sum(int(torch.equal(a[k], b[k])) for k in packed)
    int_equal = sum((a[k] == b[k]).float().mean().item() for k in packed) / len(packed)
    scales = max(((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max()).item()
                 for k in a if k.endswith("weight_scale"))
    print(f"GPU GPTQ with tensor-core Hessians: {same}/{len(packed)} packed tensors identical, "
          f"{int_equal:.5f} of packed words equal, max relative scale difference {scales:.1e}")
    assert int_equal > 0.99 and scales < 1e-2
