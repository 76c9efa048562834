"""farm against bare llm-compressor on the same machine, same model, same calibration windows.

Workloads (comma-separated in --workloads):
  bare    load + GPTQ W4A16 oneshot + save with llm-compressor's defaults, in a fresh process
  farm    the same variant through `farm run` (embedded Ray, MLflow sqlite, artifact publish, evaluation)
  pack4   four different models x GPTQ through farm with num_gpus=0.25 (packed on one GPU), against 4x bare
  queue4  the same four models with num_gpus=1 on one GPU (one worker, one after another), against 4x bare
  ddpN    the `farm` variant with resources.ranks=N (data-parallel calibration over N GPUs: ddp2, ddp4, ddp8),
          against `farm`
  spread4 four different models x GPTQ through farm with num_gpus=1 (one GPU each), against 4x `farm`
--repeat 2 gives `farm` and `ddpN` a second GPTQ variant of the model (dampening 0.0101 instead of 0.01, the same
work), run after the first in the same warm worker (`farm` sees one GPU) or gang: what a farm shipping many
variants pays per variant once its processes are warm.
--resource KEY=VALUE (repeatable) sets a field of the specs' `resources` (an A/B of a setting, e.g.
gptq_broadcast=llmcompressor). Random-init Llama shapes (bf16 safetensors) are built once under --work. Prints a
table and writes JSON.

  python bench/quantize_bench.py --shape llama-1b --workloads bare,farm,pack4 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
}


def build_model(shape: str, seed: int, tokenizer: Path, work: Path, layers: int | None = None) -> Path:
    """A random-init Llama of `shape` (optionally with fewer layers), bf16 safetensors, built once under `work`."""
    out = work / (f"{shape}-seed{seed}" if layers is None else f"{shape}-l{layers}")
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **(SHAPES[shape] | ({} if layers is None else {"num_hidden_layers": layers})),
    )
    return save_random(LlamaForCausalLM, cfg, tok, out)


def save_random(model_cls: Any, cfg: Any, tok: Any, out: Path) -> Path:
    """A random-init `model_cls(cfg)` saved in bf16 with its tokenizer (built on the GPU when there is one)."""
    import torch

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():  # this process waits on the jobs that follow: hold no GPU memory for them
        torch.cuda.empty_cache()
    return out


BARE = r"""
import json, sys, time, torch
t0 = time.perf_counter()
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
from datasets import Dataset
from farm.calibration import read_text, sample_windows
model_dir, text, n, seq, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tok = AutoTokenizer.from_pretrained(model_dir)
windows = sample_windows(read_text(text), tok, n, seq, 0)
ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
t2 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        num_calibration_samples=n, max_seq_length=seq, shuffle_calibration_samples=False)
t3 = time.perf_counter()
model.save_pretrained(out, save_compressed=True)
t4 = time.perf_counter()
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
del model
tok.save_pretrained(out)
from farm.stages.evaluate import EvaluateRequest, evaluate  # scored as farm scores its variants (same tokens)
ppl = evaluate(EvaluateRequest(out, text, 2048, 512, "Hello", 8)).perplexity
print("BARE " + json.dumps({"load": t2 - t1, "oneshot": t3 - t2, "save": t4 - t3, "total": t4 - t1,
                            "peak_gib": peak, "perplexity": ppl}))
"""


def run_bare(model: Path, text: Path, n: int, seq: int, work: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", BARE, str(model), str(text), str(n), str(seq), str(work / f"bare-{model.name}")],
        capture_output=True,
        text=True,
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("BARE ")]
    if res.returncode or not line:
        raise RuntimeError(f"bare run failed:\n{res.stderr[-3000:]}")
    return json.loads(line[0][5:]) | {"gptq_losses": gptq_losses((res.stdout + res.stderr).splitlines())}


def run_farm(
    models: list[Path],
    text: Path,
    n: int,
    seq: int,
    num_gpus: float,
    work: Path,
    name: str,
    ranks: int = 1,
    repeat: int = 1,
    env: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
    methods: list[dict] | None = None,
) -> dict:
    again = [
        {
            "method": "gptq",
            "name": f"gptq-again-{i}",
            "group_size": 128,
            "ignore": ["lm_head"],
            "dampening_frac": 0.01 + 1e-4 * i,
        }
        for i in range(1, repeat)
    ]
    spec = {
        "name": name,
        "models": [{"source": str(m), "name": m.name} for m in models],
        "methods": methods or [{"method": "gptq", "group_size": 128, "ignore": ["lm_head"]}, *again],
        "calibration": {"source": str(text), "num_samples": n, "max_seq_length": seq},
        "evaluation": {
            "perplexity": {"source": str(text), "max_tokens": 2048, "seq_len": 512},
            "generation": {"max_new_tokens": 8},
        },
        "resources": {"num_gpus": num_gpus, "num_cpus": 2, "ranks": ranks, **(extra or {})},
        "tracking": {"experiment": name},
        "output": {"root": str(work / f"farm-{name}")},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "farm.cli", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=work,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"farm run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / f'farm-{name}' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs(
        [exp.experiment_id], "tags.`farm.role` = 'variant'", order_by=["attributes.start_time ASC"]
    )  # with --repeat: first, then warm
    keys = (
        "seconds_quantize_load",
        "seconds_load_tokenizer",
        "seconds_load_device",
        "seconds_oneshot",
        "seconds_save_compress",
        "seconds_save",
        "seconds_total",
        "seconds_eval_load",
        "seconds_perplexity",
        "seconds_generate",
        "perplexity",
        "seconds_manifest",
        "seconds_mlflow_upload",
        "seconds_artifact_wait",
        "seconds_publish",
        "seconds_worker_start",
        "onloaded",
        "gpu_peak_bytes",
        "moe_experts",
        "moe_expert_tokens_min",
        "moe_expert_tokens_median",
        "moe_expert_tokens_max",
        "moe_experts_without_tokens",
    )
    per = [
        {k: r.data.metrics.get(k) for k in keys}
        | {
            "notes": r.data.tags.get("farm.notes"),
            "model": r.data.tags.get("farm.model"),
            "label": r.data.tags.get("farm.label"),
            "method": r.data.tags.get("farm.method"),
            "worker": r.data.tags.get("farm.worker", ""),
        }
        for r in runs
    ]
    job = client.search_runs(
        [exp.experiment_id], "tags.`farm.role` = 'job'", order_by=["attributes.start_time DESC"], max_results=1
    )
    phases = (
        {k[len("seconds_") :]: round(v, 2) for k, v in job[0].data.metrics.items() if k.startswith("seconds_")}
        if job
        else {}
    )
    return {
        "wall": wall,
        "phases": phases,
        "variants": per,
        "timeline": timeline(client, exp.experiment_id),
        "stdout_tail": res.stdout[-1500:],
    }


def timeline(client: Any, experiment_id: str) -> list[list]:
    """Every run of the job (job, base evaluations, variants) as [role, model, start s, end s] from the job run's
    start: what ran when, and what waited."""
    runs = client.search_runs([experiment_id], max_results=1000)
    t0 = min(r.info.start_time for r in runs)
    return sorted(
        [
            [
                r.data.tags.get("farm.role", "?"),
                r.data.tags.get("farm.model", ""),
                round((r.info.start_time - t0) / 1000, 1),
                round(((r.info.end_time or r.info.start_time) - t0) / 1000, 1),
            ]
            for r in runs
        ],
        key=lambda row: row[2],
    )


def gptq_profile(logs: Path = Path("/tmp/ray/session_latest/logs")) -> dict:
    """Where GPTQ's time went in each worker of the last Ray session (one variant per worker), from
    llm-compressor's own log lines ("Quantizing N module(s): [...]" then "METRIC - time X s" per solved batch):
    per worker, the seconds spent in GPTQ solves and each layer's period (the rest of it is calibration forward
    passes, Hessians and propagation)."""
    import datetime as dt
    import re

    out: dict = {}
    for f in sorted(logs.glob("worker-*.out")) + sorted(logs.glob("worker-*.err")):
        starts: dict[int, float] = {}  # layer -> first time a module of it started solving
        solve: dict[int, float] = {}
        layer, pending = None, False
        for line in f.read_text(errors="replace").splitlines():
            stamp = re.match(r"(\d{4}-\d\d-\d\dT[\d:.]+) \|", line)
            if "Quantizing" in line and stamp:
                m = re.search(r"layers\.(\d+)\.", line)
                if m:
                    layer, pending = int(m.group(1)), True
                    starts.setdefault(layer, dt.datetime.fromisoformat(stamp.group(1)).timestamp())
            elif "METRIC - time" in line and pending and layer is not None:
                solve[layer] = solve.get(layer, 0.0) + float(re.search(r"time ([\d.]+)s", line).group(1))
                pending = False  # a batch of modules logs its one time once per module
        if not starts:
            continue
        layers = sorted(starts)
        periods = [starts[b] - starts[a] for a, b in itertools.pairwise(layers)]
        out[f.name.split("-")[-1].split(".")[0]] = {
            "layers": len(layers),
            "solve_s": round(sum(solve.values()), 2),
            "max_layer_solve_s": round(max(solve.values(), default=0.0), 3),
            "mean_layer_period_s": round(sum(periods) / len(periods), 3) if periods else None,
        }
    return out


def gptq_losses(lines: list[str]) -> dict[str, float]:
    """GPTQ's loss per module, from llm-compressor's own log lines: "Quantizing N module(s): [names]" and then,
    per module in that order, "METRIC - error X". The same lines in bare llm-compressor and in farm's workers,
    so the two runs' losses compare module by module."""
    import ast
    import re

    out: dict[str, float] = {}
    pending: list[str] = []
    for line in lines:
        if "Quantizing" in line and "module(s):" in line:
            pending = list(ast.literal_eval(line.split("module(s):", 1)[1].strip()))
        elif "METRIC - error" in line and pending:
            out[pending.pop(0)] = float(re.search(r"error ([\d.eE+-]+)", line).group(1))
    return out


def worker_gptq_losses(worker: str, root: Path = Path("/tmp/ray")) -> dict[str, float]:
    """`gptq_losses` from the logs of the Ray worker that built a variant (its `farm.worker` tag, host:pid)."""
    pid = worker.rsplit(":", 1)[-1]
    out: dict[str, float] = {}
    for f in sorted(root.glob(f"session_*/logs/worker-*-{pid}.err")) + sorted(
        root.glob(f"session_*/logs/worker-*-{pid}.out")
    ):
        out |= gptq_losses(f.read_text(errors="replace").splitlines())
    return out


def compare_losses(run: dict[str, float], reference: dict[str, float]) -> dict:
    """Module-by-module relative difference of two runs' GPTQ losses over the modules both solved (no reference:
    the run's own sum)."""
    import statistics

    common = [k for k in run if k in reference and reference[k] > 0] if reference else list(run)
    rel = [abs(run[k] - reference[k]) / reference[k] for k in common] if reference else []
    return {
        "modules": len(common),
        "sum": sum(run[k] for k in common),
        "sum_reference": sum(reference[k] for k in common) if reference else None,
        "median_rel_diff": statistics.median(rel) if rel else None,
        "max_rel_diff": max(rel) if rel else None,
    }


def quantize_seconds(v: dict) -> float:
    return v["seconds_quantize_load"] + v["seconds_oneshot"] + v["seconds_save"]


def overhead(v: dict) -> dict:
    """farm's own time inside the worker: everything but quantizing and evaluating (model resolution, tuning,
    waiting for the artifact hash/upload after evaluation, publishing), absolute and as a share of the variant."""
    evaluation = sum(v.get(k) or 0 for k in ("seconds_eval_load", "seconds_perplexity", "seconds_generate"))
    rest = v["seconds_total"] - quantize_seconds(v) - evaluation
    return {
        "seconds": rest,
        "share": rest / v["seconds_total"],
        "artifact_wait": v.get("seconds_artifact_wait"),
        "publish": v.get("seconds_publish"),
        "hash_in_background": v.get("seconds_manifest"),
        "upload_in_background": v.get("seconds_mlflow_upload"),
    }


def single_row(label: str, run: dict, i: int = 0) -> list:
    """A table row for variant `i` of a farm run of one model: the worker's start-up (its imports, before the
    variant arrived), the quantize stage split (in brackets: the tokenizer, read alongside the weights, and the
    save's compression), and the wall time of `farm run`."""
    v = run["variants"][i]

    def part(total: str, inner: str) -> str:
        return f"{v[total]:.1f}" + (f" ({v[inner]:.1f})" if v.get(inner) is not None else "")

    return [
        label,
        1,
        f"{v.get('seconds_worker_start') or 0:.1f}",
        part("seconds_quantize_load", "seconds_load_tokenizer"),
        f"{v['seconds_oneshot']:.1f}",
        part("seconds_save", "seconds_save_compress"),
        f"{quantize_seconds(v):.1f} (wall {run['wall']:.1f})",
        v["notes"],
    ]


def multi_row(label: str, run: dict) -> tuple[list, float]:
    """A table row for a several-variant farm run, and its slowest variant's time in the worker."""
    slowest = max(v["seconds_total"] for v in run["variants"])
    return [
        label,
        len(run["variants"]),
        "",
        "",
        "",
        "",
        f"wall {run['wall']:.1f} (slowest {slowest:.1f})",
        run["variants"][0]["notes"],
    ], slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--workloads", default="bare,farm")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".fixtures" / "models" / "tiny-llama")
    ap.add_argument("--text", type=Path, default=ROOT / ".fixtures" / "shakespeare" / "calibration.txt")
    ap.add_argument("--work", type=Path, default=Path("/tmp/farm-bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1, choices=(1, 2), help="variants of the model in farm and ddpN")
    ap.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of every spec's resources (repeatable)",
    )
    args = ap.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.resource if "=" in kv)}
    if len(extra) != len(args.resource):
        raise SystemExit(f"--resource: expected KEY=VALUE, got {args.resource}")
    args.text, args.tokenizer, args.work = args.text.resolve(), args.tokenizer.resolve(), args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    wl = args.workloads.split(",")
    known = {"bare", "farm", "pack4", "queue4", "spread4"}
    ddp = {w: int(w[3:]) for w in wl if w.startswith("ddp") and w[3:].isdigit() and int(w[3:]) >= 2}  # name: ranks
    for w in wl:
        if w not in known and w not in ddp:
            raise SystemExit(
                f"--workloads: unknown workload {w!r} (known: {', '.join(sorted(known))}, ddpN for N >= 2)"
            )
    results: dict = {"shape": args.shape, "samples": args.samples, "seq": args.seq, "resources": extra}
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        results["torch"] = torch.__version__
    except ImportError:
        pass
    import torch

    whole, quarter = (1, 0.25) if torch.cuda.is_available() else (0, 0)  # CPU smoke runs request no GPUs
    t = time.perf_counter()
    m0 = build_model(args.shape, 0, args.tokenizer, args.work)
    results["build_s"] = time.perf_counter() - t
    rows = []

    def record(key: str, value: Any) -> Any:
        results[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if args.json:  # after every workload, so a run cut short still leaves what it measured
            args.json.write_text(json.dumps(results, indent=2))
        return value

    if "bare" in wl:
        b = record("bare", run_bare(m0, args.text, args.samples, args.seq, args.work))
        rows.append(
            [
                "bare llm-compressor",
                1,
                "",
                f"{b['load']:.1f}",
                f"{b['oneshot']:.1f}",
                f"{b['save']:.1f}",
                f"{b['total']:.1f}",
                f"{b['peak_gib']:.1f}",
            ]
        )
    if "farm" in wl:
        one_gpu = {"CUDA_VISIBLE_DEVICES": "0"} if args.repeat > 1 and whole else None  # both in one worker
        f = record(
            "farm",
            run_farm(
                [m0],
                args.text,
                args.samples,
                args.seq,
                whole,
                args.work,
                f"farm1-{args.shape}",
                repeat=args.repeat,
                env=one_gpu,
                extra=extra,
            ),
        )
        record("farm_gptq_profile", gptq_profile())
        record("farm_overhead", overhead(f["variants"][0]))
        rows.append(single_row("farm (1 variant)", f))
        if args.repeat > 1:
            rows.append(single_row("farm, the next variant in the same worker", f, 1))
        if "bare" in results:
            record("farm_vs_bare_quantize", quantize_seconds(f["variants"][0]) / results["bare"]["total"])

    def four_models() -> list[Path]:
        return [m0] + [build_model(args.shape, s, args.tokenizer, args.work) for s in (1, 2, 3)]

    for name, gpus, label in (
        ("pack4", quarter, "farm 4 models, 0.25 GPU each"),
        ("queue4", whole, "farm 4 models, 1 GPU each, one GPU"),
    ):
        if name in wl:
            p = record(
                name,
                run_farm(
                    four_models(),
                    args.text,
                    args.samples,
                    args.seq,
                    gpus,
                    args.work,
                    f"{name}-{args.shape}",
                    extra=extra,
                ),
            )
            rows.append(multi_row(label, p)[0])
            if "bare" in results:
                record(f"{name}_vs_serial_bare", 4 * results["bare"]["total"] / p["wall"])
    for name, ranks in ddp.items():
        d = record(
            name,
            run_farm(
                [m0],
                args.text,
                args.samples,
                args.seq,
                whole,
                args.work,
                f"{name}-{args.shape}",
                ranks=ranks,
                repeat=args.repeat,
                extra=extra,
            ),
        )
        # per-rank phases: bench/profile_oneshot.py --ranks N (Ray's worker logs held no rank's GPTQ lines here)
        rows.append(single_row(f"farm, 1 variant over {ranks} GPUs (ranks {ranks})", d))
        if args.repeat > 1:
            rows.append(single_row(f"farm, the next variant on the same {ranks} ranks", d, 1))
        if "farm" in results:
            for i, suffix in enumerate(("", "_warm")[: len(d["variants"])]):
                f1, v = results["farm"]["variants"][i], d["variants"][i]
                record(f"{name}_speedup_quantize{suffix}", quantize_seconds(f1) / quantize_seconds(v))
                record(f"{name}_speedup_oneshot{suffix}", f1["seconds_oneshot"] / v["seconds_oneshot"])  # LC's doc
                record(f"{name}_ppl{suffix}", [f1["perplexity"], v["perplexity"]])
    if "spread4" in wl:
        p = record(
            "spread4",
            run_farm(
                four_models(), args.text, args.samples, args.seq, whole, args.work, f"spread4-{args.shape}", extra=extra
            ),
        )
        row, slowest = multi_row("farm 4 models, 1 GPU each", p)
        rows.append(row)
        if "farm" in results:
            record("spread4_throughput_vs_one_gpu", 4 * results["farm"]["wall"] / p["wall"])
            record(
                "spread4_throughput_vs_one_gpu_in_worker", 4 * results["farm"]["variants"][0]["seconds_total"] / slowest
            )
    from farm.report import table

    print(
        table(
            [
                "workload",
                "variants",
                "worker start s",
                "load s (tokenizer, alongside)",
                "oneshot s",
                "save s (compress)",
                "total s",
                "peak GiB / notes",
            ],
            rows,
        )
    )
    for key in (
        "farm_vs_bare_quantize",
        "farm_overhead",
        "pack4_vs_serial_bare",
        "queue4_vs_serial_bare",
        *(
            f"{w}_{what}{suffix}"
            for w in ddp
            for suffix in ("", "_warm")
            for what in ("speedup_quantize", "speedup_oneshot", "ppl")
        ),
        "spread4_throughput_vs_one_gpu",
        "spread4_throughput_vs_one_gpu_in_worker",
    ):
        if key in results:
            print(f"{key}: {results[key]}")


if __name__ == "__main__":
    main()
