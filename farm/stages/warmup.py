"""The GPU kernels a GPTQ oneshot's first layer calls, called first on small tensors while the weights load.

Why: a fresh process pays for its first call of each kernel: cuBLAS and cuSOLVER handles, the attention kernel,
and every Triton kernel (llm-compressor's GPTQ block update, compressed-tensors' fake quantization), which
Triton loads from its cache and builds a launcher for. Measured on H100s (docs/BENCHMARKS.md, session 9): the
8B oneshot's first layer took 2.1-2.4 s in a fresh process and 0.5 s in one that had run a oneshot before, on
one GPU 2.9 s against 1.2 s. Loading the weights is disk reads and copies, so the stage makes these first calls
on the worker's thread beside the load, with the method's own quantization arguments (Triton specialises a
kernel on its constant arguments, such as the bit width, and on which sizes divide by 16: the sizes here do,
as a Llama's do). Nothing here is kept: the tensors are freed when it returns.
"""

from __future__ import annotations

import time
from typing import Any

SIZE = 256  # columns and rows of the small weights: two 128-column GPTQ blocks, every size a multiple of 16


def weight_args(modifiers: list[Any]) -> list[Any]:
    """The weight quantization arguments of the GPTQ modifiers in a recipe (config groups or scheme, resolved
    as llm-compressor resolves them)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    return [scheme.weights for modifier in modifiers if isinstance(modifier, GPTQModifier)
            for scheme in modifier.resolved_config.config_groups.values() if scheme.weights is not None]


def warm_kernels(modifiers: list[Any], device: str) -> float:
    """First calls, on `device`, of what the first calibrated layer calls; returns the seconds. A recipe
    without GPTQ modifiers warms the GEMM and attention kernels only."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # this thread's current device (the CUDA runtime keeps one per thread)
    with torch.no_grad():
        x = torch.randn(2, 64, SIZE, device=dev, dtype=torch.bfloat16)
        w = torch.randn(SIZE, SIZE, device=dev, dtype=torch.bfloat16)
        F.linear(x, w)
        flat = x.reshape(-1, SIZE).float()
        hessian = (flat.T @ flat) / flat.shape[0] + torch.eye(SIZE, device=dev)  # positive definite
        q = x.reshape(2, 4, 64, SIZE // 4)
        mask = torch.zeros(2, 1, 64, 64, device=dev, dtype=torch.bfloat16)  # eager-style additive mask
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        for args in weight_args(modifiers):
            _gptq_solve(w, hessian, args)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _gptq_solve(w: Any, hessian: Any, args: Any) -> None:
    """farm's GPTQ solve (stages/leftgptq.py) of one small weight, then the quantized forward's fake quantization."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from farm.stages.leftgptq import left_looking_quantize_weight

    weights = w.float()
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP) and args.group_size:
        grouped = weights.reshape(SIZE, SIZE // args.group_size, args.group_size)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = weights.amin(-1, keepdim=True), weights.amax(-1, keepdim=True)
    else:
        return  # tensor and block strategies: not what farm's GPTQ methods use
    scale, zero_point = calculate_qparams(lo, hi, args)
    left_looking_quantize_weight(weights[None], hessian[None], scale[None], zero_point[None], None, args)
    fake_quantize(w, scale.to(w.dtype), zero_point, args)
