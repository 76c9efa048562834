"""Every variant as vLLM serves it, through `farm run` with `evaluation.serving`: base bf16 against FP8_DYNAMIC,
GPTQ W4A16 g128 and INT8 W8A8 (int8 weights per channel, dynamic per-token int8 activations) of a random-init
Llama shape, on one GPU. Prints a table (output tokens/s per concurrency level, TTFT and ITL p50, weights on
the GPU, KV-cache tokens, engine start) read back from the job's MLflow runs, and writes JSON.

`--direct` makes the variants with farm's quantize stage and runs the serving check alone (no Ray, MLflow or
evaluation): the same engine measurements in fewer minutes. The engine runs in its own environment: give its
interpreter (--vllm-python) or the directories it is installed in (--vllm-pythonpath, e.g. a `pip install
--target` folder) and any variables it needs (--vllm-env K=V).

  python bench/serving_bench.py --shape llama-8b --tokenizer TOKENIZER_DIR --text HELDOUT.txt \\
      --vllm-pythonpath /opt/vllm-site --json serving-8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_bench import SHAPES, build_model

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "fp8": {"method": "fp8", "scheme": "FP8_DYNAMIC"},
    "gptq": {"method": "gptq", "scheme": "W4A16", "group_size": 128},
    "int8": {"method": "int8", "activations": "dynamic", "weights": "rtn"},
}


def spec_for(model: Path, name: str, methods: list[str], text: Path, work: Path, args: argparse.Namespace) -> dict:
    serving: dict[str, Any] = {"concurrency": args.concurrency, "env": dict(kv.split("=", 1) for kv in args.vllm_env)}
    if args.vllm_python:
        serving["python"] = args.vllm_python
    if args.vllm_pythonpath:
        serving["pythonpath"] = args.vllm_pythonpath.split(os.pathsep)
    if args.requests:
        serving["requests_per_level"] = args.requests
    return {
        "name": f"serve-{name}",
        "models": [{"source": str(model), "name": name}],
        "methods": [METHODS[m] for m in methods],
        "calibration": {"source": str(text), "num_samples": args.samples, "max_seq_length": args.seq},
        "evaluation": {
            "perplexity": {"source": str(text), "max_tokens": 4096, "seq_len": 1024},
            "generation": {"max_new_tokens": 8},
            "serving": serving,
        },
        "resources": {"num_gpus": 1, "num_cpus": 8},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": f"serve-{name}", "log_model": False},
        "output": {"root": str(work / "out")},
    }


def table(runs: list[dict[str, Any]], levels: list[int]) -> str:
    head = [
        "variant",
        "weights GiB",
        "KV tokens",
        *[f"tok/s c{c}" for c in levels],
        "TTFT p50 c1 ms",
        "ITL p50 c1 ms",
        f"TTFT p50 c{levels[-1]} ms",
        "engine start s",
        "greedy agree",
    ]
    rows = []
    for r in runs:
        m = r["metrics"]

        def g(key: str, scale: float = 1.0, fmt: str = ".0f", m: dict[str, float] = m) -> str:
            return format(m[key] * scale, fmt) if key in m else "-"

        rows.append(
            [
                r["label"],
                g("serve_weights_bytes", 2**-30, ".2f"),
                g("serve_kv_cache_tokens", 1, ",.0f"),
                *[g(f"serve_default_c{c}_output_tokens_per_s", 1, ",.0f") for c in levels],
                g("serve_default_c1_ttft_p50_s", 1e3, ".1f"),
                g("serve_default_c1_itl_p50_s", 1e3, ".2f"),
                g(f"serve_default_c{levels[-1]}_ttft_p50_s", 1e3, ".0f"),
                g("serve_cold_start_s", 1, ".1f"),
                g("serve_greedy_token_agreement", 1, ".2f"),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def direct(model: Path, methods: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The serving check alone (no Ray, no MLflow): each variant made with farm's quantize stage in this
    process, whose GPU memory is released before each engine starts, then served like a job's worker does."""
    import torch

    from farm.methods import build_method
    from farm.serving.runner import serve
    from farm.spec import ServingSpec
    from farm.stages.modelio import load_tokenizer
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, quantize

    env = dict(kv.split("=", 1) for kv in args.vllm_env)
    spec = ServingSpec(
        python=args.vllm_python,
        pythonpath=(args.vllm_pythonpath or "").split(os.pathsep) if args.vllm_pythonpath else [],
        env=env,
        concurrency=args.concurrency,
        requests_per_level=args.requests,
    )
    text = args.text.read_text()
    rows = []
    for label, method in [("base bf16", None), *[(m, m) for m in methods]]:
        path = model
        if method:
            path = args.work / f"{model.name}-{method}"
            if not (path / "config.json").exists():
                quantize(
                    QuantizeRequest(
                        str(model),
                        build_method(METHODS[method]),
                        CalibrationDraw(str(args.text), args.samples, args.seq, 0),
                        str(path),
                    )
                )
        torch.cuda.empty_cache()
        r = serve(str(path), spec, text, load_tokenizer(path), 1.0)
        rows.append(
            {
                "label": label,
                "role": "base" if method is None else "variant",
                "metrics": r.metrics,
                "tags": {f"farm.{k}": v for k, v in r.tags.items()}
                | ({"farm.serving_error": r.error} if r.error else {}),
                "greedy": r.document.get("greedy"),
            }
        )
        print(
            f"{label}: " + (r.error or json.dumps({k: round(v, 4) for k, v in sorted(r.metrics.items())})), flush=True
        )
        if args.json:
            args.json.write_text(json.dumps({"shape": args.shape, "runs": rows}, indent=1))
    base = rows[0].get("greedy")
    for r in rows[1:]:
        if base and r.get("greedy"):
            from farm.serving import measure

            r["metrics"] |= measure.greedy_agreement(r["greedy"], base)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--methods", default="fp8,gptq,int8")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument(
        "--text", type=Path, required=True, help="calibration and held-out text (prompts are drawn from it)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/farm-serving-bench"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x level))")
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--vllm-pythonpath", default=None)
    ap.add_argument("--vllm-env", action="append", default=[], metavar="K=V")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--direct",
        action="store_true",
        help="the serving check alone, no `farm run` (no Ray, MLflow, perplexity): the same engine runs, fewer minutes",
    )
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(args.shape, 0, args.tokenizer, args.work)
    built = time.perf_counter() - t0
    if args.direct:
        rows = direct(model, methods, args)
        print(table(rows, args.concurrency))
        if args.json:
            args.json.write_text(json.dumps({"shape": args.shape, "runs": rows, "direct": True}, indent=1))
        return
    spec_path = args.work / f"{args.shape}.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(model, args.shape, methods, args.text, args.work, args)))
    t1 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "farm.cli", "run", str(spec_path)], cwd=ROOT, check=False)
    wall = time.perf_counter() - t1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{args.work}/mlflow.db")
    exp = client.get_experiment_by_name(f"serve-{args.shape}")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    order = {"base": 0, **{METHODS[m]["method"]: i + 1 for i, m in enumerate(methods)}}
    rows = sorted(
        (
            {
                "label": "base bf16" if r.data.tags.get("farm.role") == "base" else r.data.tags.get("farm.label"),
                "role": r.data.tags.get("farm.role"),
                "metrics": r.data.metrics,
                "tags": {k: v for k, v in r.data.tags.items() if k.startswith("farm.serving")},
            }
            for r in runs
            if r.data.tags.get("farm.role") in {"base", "variant"}
        ),
        key=lambda r: order.get(r["role"] if r["role"] == "base" else r["label"].split("-")[0], 9),
    )
    print(table(rows, args.concurrency))
    for r in rows:
        if "farm.serving_error" in r["tags"]:
            print(f"{r['label']}: not measured: {r['tags']['farm.serving_error']}")
    versions = next((r["tags"] for r in rows if "farm.serving_engine_version" in r["tags"]), {})
    print(f"model built in {built:.0f} s; farm run {wall:.0f} s (exit {done.returncode}); engine {versions}")
    if args.json:
        args.json.write_text(
            json.dumps({"shape": args.shape, "runs": rows, "farm_run_seconds": wall, "exit": done.returncode}, indent=1)
        )


if __name__ == "__main__":
    main()
