"""GPTQ's column loop in left-looking form: the Cholesky factor of H is all it needs, no inverse.

llm-compressor (right-looking, GPTQ paper section 3.4) needs U, the upper Cholesky factor of H^-1, in full: after
each block of 128 columns it subtracts Err_B U[B, later] from every later column. farm's
`stages/llmc/gptq_one_cholesky.py`
already gets U from one Cholesky plus a triangular inverse; the inverse can go too. With V = U^-1 (upper,
H = V V^T, i.e. V = J M J for J H J = M M^T) and D = W - Q the columns already quantized, GPTQ's recurrence
W - Q = E U gives, for block B,

    W_B (current) = W_B (original) + D_<B V[<B, B] U_BB,      U_BB = V_BB^-1 (128 x 128)

so each block gathers everything earlier columns owe it in one GEMM, then runs llm-compressor's own in-block
update (its Triton kernel on CUDA) with U_BB. Same algorithm and format; only the order of fp32 sums changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from farm.stages.llmc.gptq_one_cholesky import covers, reversed_cholesky
from farm.stages.llmc.swap import Tally, taken_over


def hessian_factor(weights: Any, hessians: Any, percdamp: float, used_rtn_fallback: Any) -> Any:
    """V with H = V V^T (upper: J M J), in place of each Hessian, under llm-compressor's `factorize_hessian`
    contract (the identity, hence round-to-nearest, for a Hessian that is not positive definite)."""
    return reversed_cholesky(weights, hessians, percdamp, used_rtn_fallback, lambda lower: lower.flip(0, 1))


def left_looking_quantize_weight(
    weights: Any,
    hessians: Any,
    scale: Any,
    zero_point: Any,
    global_scale: Any,
    quant_args: Any,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Any, Any, Any]:
    """llm-compressor's `quantize_weight` contract ([batch, rows, columns] weights, [batch, columns, columns]
    normalised Hessians; returns quantized weights, per-batch losses and round-to-nearest flags)."""
    import torch
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, apply_activation_ordering

    if weights.ndim != 3 or hessians.ndim != 3 or weights.shape[0] != hessians.shape[0]:
        raise ValueError("weights and hessians must have shape [batch, ...] with the same batch")
    batch, _, columns = weights.shape
    final_dtype, device = weights.dtype, weights.device
    W = weights.to(device=device, dtype=GPTQ_PRECISION)
    H = hessians.to(device=device, dtype=GPTQ_PRECISION)
    del weights, hessians
    scale, zero_point = scale.to(device), zero_point.to(device)
    global_scale = None if global_scale is None else global_scale.to(device)
    W, H, perm = apply_activation_ordering(W, H, quant_args.actorder)
    g_idx = group_index(quant_args, columns, batch, perm, device)
    used_rtn_fallback = torch.zeros(batch, dtype=torch.bool, device=device)
    V = hessian_factor(W, H, percdamp, used_rtn_fallback)
    Q, losses = column_loop(W, V, scale, zero_point, global_scale, g_idx, quant_args, blocksize)
    return unpermute(Q, perm).to(final_dtype), losses, used_rtn_fallback


def column_loop(
    W: Any, V: Any, scale: Any, zero_point: Any, global_scale: Any, g_idx: Any, quant_args: Any, blocksize: int = 128
) -> tuple[Any, Any]:
    """GPTQ's pass over the columns, 128 at a time, for [batch, rows, columns] fp32 weights (permuted and
    dead columns zeroed, as `V` was factored); W becomes D = W - Q. Returns Q and each batch entry's loss summed
    over its rows. Rows are independent here: any subset of rows, with its scales, gives those rows' result."""
    import torch
    from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update

    batch, rows, columns = W.shape
    device = W.device
    losses = torch.zeros(batch, rows, device=device)
    Q = torch.empty_like(W)  # W's quantized columns become D = W - Q as the loop passes them
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        eye = torch.eye(i2 - i1, dtype=W.dtype, device=device).expand(batch, -1, -1)
        u_bb = torch.linalg.solve_triangular(V[:, i1:i2, i1:i2], eye, upper=True)
        W1 = W[:, :, i1:i2].clone()
        if i1:
            W1.baddbmm_(W[:, :, :i1], torch.bmm(V[:, :i1, i1:i2], u_bb))
        Q1, Err1, losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        gptq_block_update(
            W1,
            u_bb,
            Q1,
            Err1,
            losses1,
            scale=scale,
            zero_point=zero_point,
            global_scale=global_scale,
            g_idx=g_idx,
            quant_args=quant_args,
            i1=i1,
        )
        Q[:, :, i1:i2] = Q1
        W[:, :, i1:i2] -= Q1
        losses += torch.sum(losses1, 2) / 2
    return Q, losses.sum(dim=1)


def unpermute(Q: Any, perm: Any) -> Any:
    """Columns back in the checkpoint's order after an activation-ordered solve (`perm` None: unchanged)."""
    import torch

    if perm is None:
        return Q
    invperm = torch.argsort(perm, dim=-1)
    return torch.gather(Q, -1, invperm.unsqueeze(-2).expand(-1, Q.shape[1], -1))


def group_index(quant_args: Any, columns: int, batch: int, perm: Any, device: Any) -> Any:
    """Column -> quantization group, as llm-compressor's `quantize_weight` builds it."""
    import torch
    from compressed_tensors.quantization import ActivationOrdering, QuantizationStrategy

    strategy = quant_args.strategy
    if strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP, QuantizationStrategy.BLOCK):
        return None
    divisor = quant_args.group_size if strategy != QuantizationStrategy.BLOCK else quant_args.block_structure[1]
    g_idx = torch.arange(columns, device=device, dtype=torch.int) // divisor
    if quant_args.actorder == ActivationOrdering.WEIGHT:
        g_idx = torch.gather(g_idx.unsqueeze(0).expand(batch, -1), 1, perm)
    return g_idx


@contextlib.contextmanager
def left_looking_solve(cpu: bool = False) -> Iterator[Tally]:
    """Within the block, GPTQModifier solves CUDA fp32 batches with `left_looking_quantize_weight` (`cpu=True`: CPU
    ones too, which is how CI checks GPTQ's objective with it); anything else goes to llm-compressor's."""
    from llmcompressor.modifiers.gptq import base

    with taken_over(
        base,
        "quantize_weight",
        lambda weights, hessians, *_, **__: covers(weights, hessians, cpu),
        left_looking_quantize_weight,
        "the left-looking GPTQ solve",
        "GPTQ solved left-looking from the Hessian's Cholesky factor "
        "alone: {n} modules (resources.gptq_inverse: llmcompressor for llm-compressor's solve)",
        count=lambda weights, *_, **__: weights.shape[0],
    ) as tally:
        yield tally
