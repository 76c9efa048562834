"""One GPTQ solve of a given module shape, split into llm-compressor's parts: Hessian factorisation
(dampen, Cholesky, cholesky_inverse, Cholesky of the inverse) and the rest of `quantize_weight` (activation
ordering, block updates). Also times the same upper factor of H^-1 computed as the inverse of a Cholesky factor of
the reversed H (one factorisation and one triangular solve instead of three factorisations), with its distance
from llm-compressor's. This is what bounds data-parallel GPTQ: each module's whole solve runs on one rank.

  python bench/gptq_solve_bench.py --rows 4096 --columns 14336   # Llama-8B down_proj
"""

from __future__ import annotations

import argparse
import json
import time


def timed(fn, repeat: int = 3) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def module_problem(rows: int, columns: int, tokens: int, actorder: str | None, spread: bool = False) -> tuple:
    """One linear module's GPTQ inputs as `quantize_weight` takes them: a Hessian from `tokens` random
    activations (with `spread`, columns of different scales, as real activations have), bf16 weights, W4A16
    group-128 args and the weights' scales; plus the device. Seeded."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(tokens, columns, device=dev)
    if spread:
        x = x * (torch.rand(columns, device=dev) + 0.1)
    h = (x.t() @ x).unsqueeze(0) * (2 / tokens)
    w = torch.randn(1, rows, columns, device=dev, dtype=torch.bfloat16) * 0.02
    qargs = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, actorder=actorder
    )
    scale = (w.float().reshape(1, rows, columns // 128, 128).abs().amax(-1) / 7.5).to(torch.bfloat16)
    return h, w, qargs, scale, torch.zeros_like(scale, dtype=torch.int8), dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--columns", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    import torch
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import factorize_hessian

    from farm.stages.llmc.gptq_one_cholesky import upper_inverse_factor

    h, w, qargs, scale, zero, dev = module_problem(args.rows, args.columns, args.tokens, "static")

    def factorise() -> torch.Tensor:
        return factorize_hessian(w.float(), h.clone(), 0.01, torch.zeros(1, dtype=torch.bool, device=dev))

    def flipped() -> torch.Tensor:  # farm's (stages/llmc/gptq_one_cholesky.py)
        return upper_inverse_factor(w.float(), h.clone(), 0.01, torch.zeros(1, dtype=torch.bool, device=dev))

    ref, alt = factorise()[0], flipped()[0]
    out = {
        "shape": [args.rows, args.columns],
        "factorise_s": timed(factorise),
        "flipped_factor_s": timed(flipped),
        "quantize_weight_s": timed(lambda: quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)),
        "flipped_vs_llmcompressor_max_rel": ((alt - ref).abs().max() / ref.abs().max()).item(),
    }
    out["device"] = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    print("SOLVE " + json.dumps(out), flush=True)
    from farm.report import table

    print(
        table(
            [
                "module (rows x columns)",
                "llm-compressor factor ms",
                "one-Cholesky factor ms",
                "whole quantize_weight ms",
                "max difference",
            ],
            [
                [
                    f"{args.rows} x {args.columns}",
                    f"{out['factorise_s'] * 1e3:.1f}",
                    f"{out['flipped_factor_s'] * 1e3:.1f}",
                    f"{out['quantize_weight_s'] * 1e3:.1f}",
                    f"{out['flipped_vs_llmcompressor_max_rel']:.1e}",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
