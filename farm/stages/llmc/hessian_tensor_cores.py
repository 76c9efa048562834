"""GPTQ Hessians from half-precision activations on tensor cores instead of fp32 GEMMs.

llm-compressor accumulates `H += 2 X^T X` after casting the bf16/fp16 activations to fp32, so every
calibration batch is a plain fp32 GEMM (no tensor cores: torch keeps TF32 off). For an 8B Llama at 128 x 2048
tokens that is ~5 PFLOP, most of a GPTQ run on an H100. The product of two bf16 (or fp16) numbers is exact in
fp32, so a half-precision GEMM that accumulates and returns fp32 (`torch.mm(..., out_dtype=torch.float32)`, a
cuBLAS tensor-core GEMM) sums the same exact products; no TF32-style rounding of the inputs. What differs is
the summation: Hopper's tensor cores accumulate a long product with a little less precision than an fp32 FMA
chain (5.9e-5 of the largest entry on 16k tokens against float64), so the tokens are summed in chunks of 4,096
whose partial Hessians are added in fp32: 1.1e-5, as close to float64 as llm-compressor's fp32 GEMM (1.0-1.4e-5),
10-11x faster (tests/gpu/test_gpu_hessian.py). GPTQ's own summed loss moves by +0.054% with 4,096-token products
(llm-compressor's own batch-order change: 0.0006%; 256-token chunks: +0.002%); the format and recipe are
unchanged. `resources.gptq_hessian: fp32` keeps llm-compressor's function for a job.

Scoped (stages/llmc/swap.py): `tensor_core_hessians()` swaps the function GPTQModifier's hook calls for the
duration of one oneshot and restores it; anything it does not cover (fp32 activations, CPU tensors, Conv
layers) goes to llm-compressor's own function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from farm.stages.llmc.swap import Tally, taken_over


def gram_fp32(x: Any) -> Any:
    """x^T x in fp32 from a [tokens, features] half-precision matrix: fp32 accumulation of exact products."""
    import torch

    if x.is_cuda:
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    return x.t().float() @ x.float()  # no half-in/fp32-out GEMM on CPU; same sums


def covers(inp: Any, module: Any, hessian: Any) -> bool:
    """The cases the tensor-core path handles; everything else keeps llm-compressor's function."""
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and inp.dtype in (torch.bfloat16, torch.float16)
        and hessian.dtype == torch.float32
        and hessian.is_cuda
        and inp.dim() >= 2
    )


# Tokens per tensor-core product; the chunks' sums are added to H in fp32. Measured on an H100 against float64
# (16k tokens): one product 5.9e-5 of the largest entry, chunks of 4096 1.1e-5, llm-compressor's fp32 GEMM
# 1.0-1.4e-5; 14336^2 from 16k tokens in 12.2 ms in 4096-token chunks (fp32 GEMM 126.7 ms). 0: one product.
CHUNK_TOKENS = 4096


def accumulate(inp: Any, hessian: Any, num_samples: Any, chunk: int = CHUNK_TOKENS) -> tuple[Any, Any]:
    """llm-compressor's `accumulate_hessian` for Linear inputs: unnormalised `H += 2 X^T X`, samples counted as it
    counts them (the leading dimension of a 3-D input, 1 for a 2-D one)."""
    inp = inp.to(device=hessian.device)
    num_samples += 1 if inp.dim() == 2 else inp.shape[0]
    x = inp.reshape(-1, inp.shape[-1])
    step = chunk or x.shape[0]
    for start in range(0, x.shape[0], step):
        hessian.add_(gram_fp32(x[start : start + step]), alpha=2.0)
    return hessian, num_samples


@contextlib.contextmanager
def tensor_core_hessians(chunk: int = CHUNK_TOKENS) -> Iterator[Tally]:
    """Within the block, GPTQModifier accumulates half-precision Linear inputs with `accumulate`."""
    from llmcompressor.modifiers.gptq import base

    with taken_over(
        base,
        "accumulate_hessian",
        lambda inp, module, hessian, num_samples: covers(inp, module, hessian),
        lambda inp, module, hessian, num_samples: accumulate(inp, hessian, num_samples, chunk=chunk),
        "tensor-core Hessians",
        "GPTQ Hessians on tensor cores: {n} batch accumulations, bf16 products "
        f"summed in fp32 in {chunk}-token chunks (resources.gptq_hessian: fp32 for llm-compressor's)",
    ) as tally:
        yield tally
