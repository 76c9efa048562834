"""Where GPTQ's factor time goes for one module (Cholesky, triangular inverse, flips), and a left-looking solve
that needs the Cholesky factor only (farm/stages/llmc/gptq_left_looking.py) against llm-compressor's `quantize_weight`
(with its factor and with farm's one-Cholesky factor): seconds, and how far the outputs and losses are apart.

  python bench/gptq_factor_parts.py --rows 4096 --columns 14336
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gptq_solve_bench import module_problem, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--columns", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--actorder", default="static", help="static (llm-compressor's default for GPTQ), weight or none")
    args = ap.parse_args()
    import torch
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from farm.stages.llmc.gptq_left_looking import left_looking_quantize_weight
    from farm.stages.llmc.gptq_one_cholesky import one_cholesky_factor

    n, r = args.columns, args.rows
    actorder = None if args.actorder == "none" else args.actorder
    h, w, qargs, scale, zero, dev = module_problem(r, n, args.tokens, actorder, spread=True)
    hd = h[0].clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    low = hd.flip(0, 1).contiguous()
    chol = torch.linalg.cholesky(low)
    eye = torch.eye(n, device=dev)
    out: dict = {
        "shape": [r, n],
        "actorder": args.actorder,
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
    }
    out["flip_s"] = timed(lambda: hd.flip(0, 1).contiguous())
    out["cholesky_s"] = timed(lambda: torch.linalg.cholesky_ex(low, check_errors=False))
    out["triangular_inverse_s"] = timed(lambda: torch.linalg.solve_triangular(chol, eye, upper=False))

    def lc() -> tuple:
        return quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)

    def one() -> tuple:
        with one_cholesky_factor(cpu=True):
            return quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)

    def left() -> tuple:
        return left_looking_quantize_weight(w.clone(), h.clone(), scale, zero, None, qargs)

    runs = {"llmcompressor": lc, "one_cholesky": one, "left_looking": left}
    results = {k: f() for k, f in runs.items()}
    for k, f in runs.items():
        out[f"{k}_s"] = timed(f)
        q, loss, _ = results[k]
        out[f"{k}_loss"] = loss.item()
        ref = results["llmcompressor"][0].float()
        out[f"{k}_changed_vs_lc"] = (q.float() != ref).float().mean().item()
    print("FACTOR " + json.dumps(out), flush=True)
    from farm.report import table

    print(
        table(
            ["part / solve", "ms", "GPTQ loss", "weights != llm-compressor's"],
            [
                ["flip (copy)", f"{out['flip_s'] * 1e3:.1f}", "", ""],
                ["Cholesky", f"{out['cholesky_s'] * 1e3:.1f}", "", ""],
                ["triangular inverse", f"{out['triangular_inverse_s'] * 1e3:.1f}", "", ""],
            ]
            + [
                [
                    f"quantize_weight: {k}",
                    f"{out[k + '_s'] * 1e3:.1f}",
                    f"{out[k + '_loss']:.6g}",
                    f"{out[k + '_changed_vs_lc']:.2%}",
                ]
                for k in runs
            ],
        )
    )


if __name__ == "__main__":
    main()
