"""GPTQ's column loop (stages/leftgptq.py `column_loop`) for one module shape: eager wall time, the GPU's busy
time inside it (torch.profiler), kernel launches per 128-column block, and the same loop replayed from a CUDA
graph. The loop is 14336 / 128 = 112 dependent blocks for Llama-8B's down_proj; if its wall time does not shrink
with fewer rows, it is bound by launches and latency, not by the GPU's arithmetic.

  python bench/gptq_loop_bench.py --rows 4096 1024 --columns 14336
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gptq_solve_bench import module_problem


def measure(rows: int, columns: int, repeat: int) -> dict:
    """One module shape's loop: eager, profiled, captured, replayed; and whether the replay gives eager's Q."""
    import torch
    from llmcompressor.modifiers.gptq.helpers import apply_activation_ordering
    from torch.profiler import ProfilerActivity, profile

    from farm.stages.leftgptq import column_loop, group_index, hessian_factor
    from farm.stages.loopgraph import LoopGraphs

    h, w, qargs, scale, zero, dev = module_problem(rows, columns, 16384, "static")
    W, H, perm = apply_activation_ordering(w.float(), h.clone(), qargs.actorder)
    V = hessian_factor(W, H, 0.01, torch.zeros(1, dtype=torch.bool, device=dev))
    g_idx = group_index(qargs, columns, 1, perm, dev)
    graphs = LoopGraphs()

    def eager() -> tuple:
        return column_loop(W.clone(), V, scale, zero, None, g_idx, qargs, 128)

    def replay() -> tuple:
        return graphs.run(W.clone(), V, scale, zero, None, g_idx, qargs, 128)

    def seconds(fn, times: int) -> tuple[float, tuple]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(times):
            out = fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / times, out

    ref_q, ref_loss = eager()
    eager_s, _ = seconds(eager, repeat)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        seconds(eager, 1)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    capture_s, _ = seconds(replay, 1)
    graph_s, (q, loss) = seconds(replay, repeat)
    return {"rows": rows, "columns": columns, "eager_ms": eager_s * 1e3,
            "gpu_busy_ms": sum(e.device_time for e in kernels) / 1e3,
            "launches_per_block": len(kernels) / -(-columns // 128), "graph_capture_ms": capture_s * 1e3,
            "graph_ms": graph_s * 1e3, "same_q": bool(torch.equal(q, ref_q)),
            "loss_rel": abs(loss.item() - ref_loss.item()) / ref_loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--columns", type=int, default=14336)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import torch

    from farm.report import table

    rows_out = [measure(rows, args.columns, args.repeat) for rows in args.rows]
    print("LOOP " + json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows_out}), flush=True)
    print(table(["rows x columns", "eager ms", "GPU busy ms", "launches / block", "graph capture ms",
                 "graph replay ms", "same Q"],
                [[f"{r['rows']} x {r['columns']}", f"{r['eager_ms']:.1f}", f"{r['gpu_busy_ms']:.1f}",
                  f"{r['launches_per_block']:.0f}", f"{r['graph_capture_ms']:.1f}", f"{r['graph_ms']:.1f}",
                  str(r["same_q"])] for r in rows_out]))


if __name__ == "__main__":
    main()
