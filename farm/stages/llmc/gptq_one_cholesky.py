"""GPTQ's inverse-Hessian factor from one Cholesky factorisation instead of three.

GPTQ needs U, the upper Cholesky factor of H^-1 (H dampened). llm-compressor's `factorize_hessian` computes it
as written: Cholesky of H, `cholesky_inverse` (H^-1), then Cholesky of H^-1: three O(n^3) factorisations in
fp32. The same U follows from one: with J the reversal permutation, if J H J = M M^T (M lower), then
H = (J M J)(J M J)^T with J M J upper, so H^-1 = R^T R for R = (J M J)^-1 = J M^-1 J, upper triangular with a
positive diagonal: the (unique) upper Cholesky factor of H^-1. M^-1 is one triangular solve against the identity.

Measured on an H100 (bench/gptq_solve_bench.py): Llama-8B's down_proj (14336 columns) 0.233 s -> 0.113 s, 78% of
its whole solve before; q_proj-sized (4096) 14.1 -> 6.3 ms; the factor differs from llm-compressor's by 2.2e-6 of
its largest entry (fp32 rounding). In data-parallel GPTQ the largest module's solve is the critical path of every
layer (one rank owns it while the others wait), so this shortens it directly.

Scoped (stages/llmc/swap.py): `one_cholesky_factor()` swaps the function `quantize_weight` calls for one
oneshot and restores it; CPU and non-fp32 inputs keep llm-compressor's function. Same contract: dead columns
(zero diagonal) zeroed in the weights, dampening `percdamp * mean(diag)`, a Hessian that is not positive
definite after dampening gets the identity and is flagged for llm-compressor's round-to-nearest fallback.
`resources.gptq_inverse: reversed_cholesky` selects it; the default, `left_looking`
(stages/llmc/gptq_left_looking.py), shares `reversed_cholesky` and drops the inverse altogether;
`llmcompressor` keeps llm-compressor's function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from farm.stages.llmc.swap import Tally, taken_over


def reversed_cholesky(
    weights: Any, hessians: Any, percdamp: float, used_rtn_fallback: Any, finish: Callable[[Any], Any]
) -> Any:
    """llm-compressor's `factorize_hessian` contract ([batch, rows, n] weights, [batch, n, n] Hessians, both
    modified in place: dead columns zeroed in the weights, `percdamp * mean(diag)` dampening, a Hessian that is
    not positive definite gets the identity and is flagged for round-to-nearest); each Hessian becomes
    `finish(M)` for M the lower Cholesky factor of J H J."""
    import torch

    diag = torch.diagonal(hessians, dim1=-2, dim2=-1)
    dead = diag == 0
    if dead.any():
        diag.masked_fill_(dead, 1.0)
        weights.masked_fill_(dead.unsqueeze(1), 0)
    info = torch.empty((), dtype=torch.int32, device=hessians.device)
    for i in range(hessians.shape[0]):  # one at a time: a few n^2 buffers instead of a batch of them
        h = hessians[i]
        torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())
        lower = h.flip(0, 1)  # a copy: J H J
        torch.linalg.cholesky_ex(lower, check_errors=False, out=(lower, info))
        if info.item() != 0:
            h.copy_(torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
            used_rtn_fallback[i] = True
            continue
        h.copy_(finish(lower))
    return hessians


def upper_inverse_factor(weights: Any, hessians: Any, percdamp: float, used_rtn_fallback: Any) -> Any:
    """U (upper, H^-1 = U^T U) in place of each Hessian: J M^-1 J, one triangular solve after the Cholesky."""
    import torch

    def inverse(lower: Any) -> Any:
        eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)

    return reversed_cholesky(weights, hessians, percdamp, used_rtn_fallback, inverse)


def covers(weights: Any, hessians: Any, cpu: bool = False) -> bool:
    import torch

    return bool((hessians.is_cuda or cpu) and hessians.dtype == torch.float32 and weights.dtype == torch.float32)


@contextlib.contextmanager
def one_cholesky_factor(cpu: bool = False) -> Iterator[Tally]:
    """Within the block, GPTQ's `quantize_weight` factorises CUDA fp32 Hessians with `upper_inverse_factor`
    (`cpu=True`: CPU ones too, which is how CI checks GPTQ's objective with it)."""
    from llmcompressor.modifiers.gptq import gptq_quantize

    with taken_over(
        gptq_quantize,
        "factorize_hessian",
        lambda weights, hessians, *_, **__: covers(weights, hessians, cpu),
        upper_inverse_factor,
        "the one-Cholesky GPTQ factor",
        "GPTQ inverse-Hessian factors from one Cholesky each: {n} "
        "(resources.gptq_inverse: llmcompressor for its three factorisations)",
        count=lambda weights, hessians, *_, **__: hessians.shape[0],
    ) as tally:
        yield tally
