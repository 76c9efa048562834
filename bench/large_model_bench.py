"""Models bigger than their GPU share, and mixture-of-experts models, through farm.

Workloads (comma-separated in --workloads):
  capped  a random-init Llama-8B (16 GB of bf16 weights) GPTQ W4A16 through farm with `resources.gpu_memory_gb`
          (--budget-gb, default 6: the weights stay on the host and are onloaded layer by layer, the CUDA
          allocator is held to the budget)
  whole   the same variant with the whole GPU
  bare    the same with bare llm-compressor (which loads on the host and onloads through its own sequential
          pipeline)
  budget  capped, whole and bare: time, peak GPU memory, and GPTQ's loss module by module against the
          whole-GPU run
  moe     a random-init Qwen3-MoE shape (Qwen3-30B-A3B's layer: hidden 2048, 128 experts of 768, top 8) with
          --moe-layers layers through farm GPTQ W4A16 and FP8 in one job: time, peak GPU memory, expert coverage
          (calibration tokens per expert as the router chose them), and perplexity of the reloaded checkpoint.

Prints a table and writes JSON (--json, after every workload).

  python bench/large_model_bench.py --workloads budget,moe --tokenizer .benchdata/tok --text .benchdata/calib.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quantize_bench as qb

GIB = 2**30
BUDGET = ("capped", "whole", "bare")  # `budget` is all three, in this order
MOE = dict(  # Qwen3-30B-A3B's decoder layer; the vocabulary is the tokenizer's
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
)


def build_moe(layers: int, tokenizer: Path, work: Path, experts: int = MOE["num_experts"]) -> Path:
    """A random-init Qwen3-MoE of `layers` layers, bf16 safetensors, built once under `work`."""
    out = work / f"qwen3-moe-l{layers}-e{experts}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        max_position_embeddings=8192,
        num_hidden_layers=layers,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **(MOE | {"num_experts": experts, "num_experts_per_tok": min(experts, MOE["num_experts_per_tok"])}),
    )
    return qb.save_random(Qwen3MoeForCausalLM, cfg, tok, out)


def checkpoint_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def farm_row(label: str, v: dict, losses: dict | None) -> list:
    peak = v.get("gpu_peak_bytes")
    return [
        label,
        "yes" if v.get("onloaded") else "no",
        f"{v['seconds_quantize_load']:.1f}",
        f"{v['seconds_oneshot']:.1f}",
        f"{v['seconds_save']:.1f}",
        f"{qb.quantize_seconds(v):.1f}",
        f"{peak / GIB:.1f}" if peak is not None else "",
        losses_cell(losses),
        f"{v['perplexity']:.2f}" if v.get("perplexity") is not None else "",
    ]


def losses_cell(c: dict | None) -> str:
    if not c or not c["modules"]:
        return ""
    if c["median_rel_diff"] is None:
        return f"{c['sum']:.4g} ({c['modules']} modules)"
    return (
        f"{c['sum']:.4g} ({c['modules']} modules; vs whole GPU: median {100 * c['median_rel_diff']:.2f}%, "
        f"max {100 * c['max_rel_diff']:.2f}%)"
    )


def worker_errors(logs: Path = Path("/tmp/ray/session_latest/logs")) -> list[str]:
    """The last traceback lines and allocator figures in the last Ray session's worker logs (a failed run)."""
    keep = ("Tried to allocate", "Error", 'File "')
    lines = [x for f in sorted(logs.glob("worker-*.err")) for x in f.read_text(errors="replace").splitlines()]
    return [x[:600] for x in lines if any(k in x for k in keep)][-40:]


def build_budget_model(args: Any, record: Any) -> Path:
    t = time.perf_counter()
    m = qb.build_model(args.shape, 0, args.tokenizer, args.work)
    record("budget_model", {"build_s": time.perf_counter() - t, "checkpoint_gb": checkpoint_gb(m)})
    return m


def budget_workload(w: str, m: Path, args: Any, whole: int, record: Any) -> tuple[list, dict]:
    """One of capped, whole, bare: its table row and its GPTQ losses by module."""
    common = (args.text, args.samples, args.seq, whole, args.work)
    if w == "capped":
        run = record(
            "budget_capped", qb.run_farm([m], *common, "budget-capped", extra={"gpu_memory_gb": args.budget_gb})
        )
        losses = record("budget_capped_losses", qb.worker_gptq_losses(run["variants"][0]["worker"]))
        return farm_row(f"farm, gpu_memory_gb={args.budget_gb:g}", run["variants"][0], None), losses
    if w == "whole":
        run = record("budget_whole", qb.run_farm([m], *common, "budget-whole"))
        losses = record("budget_whole_losses", qb.worker_gptq_losses(run["variants"][0]["worker"]))
        return farm_row("farm, whole GPU", run["variants"][0], None), losses
    bare = record("budget_bare", qb.run_bare(m, args.text, args.samples, args.seq, args.work))
    row = [
        "bare llm-compressor",
        "yes (its pipeline)",
        f"{bare['load']:.1f}",
        f"{bare['oneshot']:.1f}",
        f"{bare['save']:.1f}",
        f"{bare['total']:.1f}",
        f"{bare['peak_gib']:.1f}",
        "",
        f"{bare['perplexity']:.2f}",
    ]
    return row, bare["gptq_losses"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="budget,moe", help="capped, whole, bare (budget: all three), moe")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(qb.SHAPES), help="the budget workload's model")
    ap.add_argument("--budget-gb", type=float, default=6.0)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--moe-layers", type=int, default=16)
    ap.add_argument("--moe-samples", type=int, default=128)
    ap.add_argument("--moe-seq", type=int, default=512)
    ap.add_argument("--moe-experts", type=int, default=MOE["num_experts"], help="fewer for a CPU smoke run")
    ap.add_argument("--tokenizer", type=Path, default=qb.ROOT / ".fixtures" / "models" / "tiny-llama")
    ap.add_argument("--text", type=Path, default=qb.ROOT / ".fixtures" / "shakespeare" / "calibration.txt")
    ap.add_argument("--work", type=Path, default=Path("/tmp/farm-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    wl = args.workloads.split(",")
    wl = [x for w in wl for x in (BUDGET if w == "budget" else (w,))]
    unknown = set(wl) - {*BUDGET, "moe"}
    if unknown:
        raise SystemExit(
            f"--workloads: unknown workload(s) {sorted(unknown)} (known: {', '.join(BUDGET)}, budget, moe)"
        )
    args.text, args.tokenizer, args.work = args.text.resolve(), args.tokenizer.resolve(), args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    whole = 1 if torch.cuda.is_available() else 0
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if whole else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }

    def record(key: str, value: Any) -> Any:
        results[key] = value
        print(f"{key}: {json.dumps(value)[:2000]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return value

    budget = [w for w in wl if w in BUDGET]
    m = build_budget_model(args, record) if budget else None
    rows: list[tuple[str, list]] = []
    losses: dict[str, dict] = {}
    for w in budget:  # in the order given: a run cut short keeps what ran first; a failed one is recorded
        try:
            row, losses[w] = budget_workload(w, m, args, whole, record)
            rows.append((w, row))
        except RuntimeError as err:
            record(f"budget_{w}_error", str(err)[-3000:])
            record(f"budget_{w}_worker_log", worker_errors())
    for w, row in rows:  # GPTQ's losses module by module against the whole-GPU run's
        row[7] = losses_cell(qb.compare_losses(losses[w], losses.get("whole", {}) if w != "whole" else {}))
    rows_out = [row for _, row in rows]
    if "moe" in wl:
        t = time.perf_counter()
        m = build_moe(args.moe_layers, args.tokenizer, args.work, args.moe_experts)
        record("moe_model", {"build_s": time.perf_counter() - t, "checkpoint_gb": checkpoint_gb(m)})
        run = record(
            "moe",
            qb.run_farm(
                [m],
                args.text,
                args.moe_samples,
                args.moe_seq,
                whole,
                args.work,
                "moe",
                methods=[
                    {"method": "gptq", "group_size": 128, "ignore": ["lm_head"]},
                    {"method": "fp8", "ignore": ["lm_head"]},
                ],
            ),
        )
        for v in [v for v in run["variants"] if v["seconds_total"] is not None]:  # not an earlier failed run
            rows_out.append(farm_row(f"farm MoE {v['method']}", v, None))
            if v.get("moe_experts"):
                record(
                    f"moe_{v['method']}_coverage",
                    {k: v[k] for k in v if k.startswith("moe_")},
                )
    from farm.report import table

    print(
        table(
            [
                "workload",
                "onloaded",
                "load s",
                "oneshot s",
                "save s",
                "quantize s",
                "peak GPU GiB",
                "GPTQ loss sum",
                "perplexity",
            ],
            rows_out,
        )
    )


if __name__ == "__main__":
    main()
