"""Where a GPTQ oneshot's time goes, layer phase by layer phase, as farm runs it (tuned batch, activations on
the GPU, tensor-core Hessians).

Per decoder layer the sequential pipeline runs a calibration pass (forward + Hessian hooks), the GPTQ solves
(`sequential_epoch_end`), then a propagation pass; this prints the seconds of each summed over layers (CUDA
synchronised at every boundary), the set-up before the first layer (tracing, cache), and, with --profile, the
top CUDA kernels and CPU ops from torch.profiler plus how busy the GPU was. --concurrent N starts N copies at
once (as N packed variants run) and reports each; --mps runs them again under CUDA MPS when the node has it;
--ranks N runs one oneshot as N data-parallel ranks (farm's process group) and reports every rank's phases;
--parts splits the solve phase (Hessian reduce, factor, solve, broadcast; each call synchronised); --save then
writes the checkpoint as farm does and prints where the save's time went (cProfile, by cumulative time).

  python bench/profile_oneshot.py --shape llama-1b --layers 16
  python bench/profile_oneshot.py --shape llama-1b --concurrent 4 --threads 2 --mps
  python bench/profile_oneshot.py --shape llama-8b --layers 8 --batch 8 --ranks 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.quantize_bench import ROOT, SHAPES, build_model
from farm.runtime.ddp import free_port


def shares_for(args: argparse.Namespace, model_dir: Path) -> tuple[int, ...] | None:
    """Samples per rank as a farm worker gives them with resources.gptq_broadcast: forward_order."""
    if args.ranks < 2 or args.broadcast != "forward_order":
        return None
    from farm.stages.distributed.rank_shares import shares

    return shares(json.loads((model_dir / "config.json").read_text()), args.samples, args.seq, args.ranks)


class Phases:
    """Synchronised wall time per pipeline phase, from hooks on the decoder layers and the epoch-end callback."""

    def __init__(self) -> None:
        self.seconds = {"calibrate": 0.0, "solve": 0.0, "propagate": 0.0, "own_solves": 0.0}
        self.parts: dict[str, float] = {}
        self.first_layer_at: float | None = None
        self.layers: list[dict[str, float]] = []  # per decoder layer: its passes' and its solve's seconds
        self.setup: dict[str, float] = {}  # parts of the set-up before the first layer (tracing, the cache)
        self._pass = "calibrate"
        self._t = 0.0
        self._seen: set[int] = set()
        self.setup_profile: Any = None  # a cProfile.Profile running from the oneshot's start to the first layer

    def sync(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def attach(self, model, parts: bool = False) -> None:
        for layer in model.model.layers:
            layer.register_forward_pre_hook(self._pre)
            layer.register_forward_hook(self._post)
        from llmcompressor.core import LifecycleCallbacks

        original = LifecycleCallbacks.sequential_epoch_end.__func__

        def epoch_end(cls, *args, **kwargs):
            t = self.sync()
            out = original(cls, *args, **kwargs)
            self.seconds["solve"] += self.sync() - t
            if self.layers:
                self.layers[-1]["solve"] = self.layers[-1].get("solve", 0.0) + time.perf_counter() - t
            self._pass = "propagate"
            return out

        LifecycleCallbacks.sequential_epoch_end = classmethod(epoch_end)
        from llmcompressor.modifiers.gptq import GPTQModifier

        own = GPTQModifier.compress_module_list

        def compress_module_list(modifier, modules):  # the solves of the modules this rank owns
            t = self.sync()
            out = own(modifier, modules)
            self.seconds["own_solves"] += self.sync() - t
            return out

        GPTQModifier.compress_module_list = compress_module_list
        from llmcompressor.pipelines import cache
        from llmcompressor.pipelines.sequential import pipeline

        pipeline.trace_subgraphs = self._timed("trace_subgraphs", pipeline.trace_subgraphs, self.setup)
        cache.IntermediatesCache.from_dataloader = classmethod(
            self._timed("intermediates_cache", cache.IntermediatesCache.from_dataloader.__func__, self.setup)
        )
        if not parts:
            return
        from llmcompressor.modifiers.gptq import base

        from farm.stages.llmc import gptq_left_looking as leftgptq

        for owner, name in [
            (leftgptq, "left_looking_quantize_weight"),
            (leftgptq, "hessian_factor"),
            (base, "prepare_batch"),
            (base, "update_batch_qparams"),
            (base, "observe"),
            (base, "broadcast_qparams_and_cleanup"),
            (GPTQModifier, "_reduce_hessian_to_target_rank"),
        ]:
            setattr(owner, name, self._timed(name, getattr(owner, name)))

    def _timed(self, name, fn, into=None):
        """A part of the solve phase (or of the set-up), synchronised (bench only: it serialises the GPU at every
        call)."""
        into = self.parts if into is None else into

        def timed(*args, **kwargs):
            t = self.sync()
            out = fn(*args, **kwargs)
            into[name] = into.get(name, 0.0) + self.sync() - t
            return out

        return timed

    def _pre(self, module, args) -> None:
        self._t = self.sync()
        if self.first_layer_at is None:
            self.first_layer_at = self._t
            if self.setup_profile is not None:
                self.setup_profile.disable()
        if id(module) not in self._seen:  # a new layer starts with its calibration pass
            self._seen.add(id(module))
            self._pass = "calibrate"
            self.layers.append({"start": self._t})

    def _post(self, module, args, output) -> None:
        seconds = self.sync() - self._t
        self.seconds[self._pass] += seconds
        self.layers[-1][self._pass] = self.layers[-1].get(self._pass, 0.0) + seconds


def once(args: argparse.Namespace) -> dict:
    from farm.runtime import ddp

    rank = ddp.Rank(args.rank, args.ranks, "127.0.0.1", args.port) if args.ranks > 1 else None
    if rank is not None:  # one rank of farm's data-parallel calibration: the group farm's workers form
        import torch.distributed as dist

        ddp.use_devices(rank)
        if not dist.is_initialized():  # --repeat: one group for all of this process's oneshots
            ddp.init(rank)
    import torch

    from farm.methods.registry import build_method
    from farm.stages.modelio import load_model, load_shared_model, load_tokenizer, set_threads
    from farm.stages.quantize import CalibrationDraw, QuantizeRequest, calibrate, placement

    if args.threads:
        set_threads(args.threads)
    model_dir = build_model(args.shape, 0, args.tokenizer, args.work, args.layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method = build_method({"method": "gptq", "group_size": 128, "ignore": ["lm_head"]})
    req = QuantizeRequest(
        str(model_dir),
        method,
        CalibrationDraw(str(args.text), args.samples, args.seq, 0),
        str(args.work / "out"),
        batch_size=args.batch,
        offload_device="cuda" if device == "cuda" else None,
        gptq_hessian=args.hessian,
        calibration_attention=args.attention,
        gptq_inverse=args.inverse,
        rank=args.rank,
        world=max(1, args.ranks),
        gptq_broadcast=args.broadcast,
        shares=shares_for(args, model_dir),
    )
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    where = placement(req, device)
    model = load_shared_model(model_dir, device) if where == "shared" else load_model(model_dir, where)
    t1 = time.perf_counter()
    phases = Phases()
    phases.attach(model, args.parts)
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        prof = profile(activities=acts)
        prof.__enter__()
    if args.profile_setup:
        import cProfile

        phases.setup_profile = cProfile.Profile()
    t2 = phases.sync()
    if phases.setup_profile is not None:
        phases.setup_profile.enable()
    notes = calibrate(req, model, tok, method.modifiers())
    t3 = phases.sync()
    if phases.setup_profile is not None:
        print_stats(phases.setup_profile, "the set-up (oneshot's start to the first layer)")
    result = {
        "shape": args.shape,
        "layers": args.layers,
        "batch": args.batch,
        "attention": args.attention,
        "inverse": args.inverse,
        "rank": args.rank,
        "ranks": args.ranks,
        "load_s": round(t1 - t0, 2),
        "oneshot_s": round(t3 - t2, 2),
        "setup_s": round((phases.first_layer_at or t3) - t2, 2),
        **{f"{k}_s": round(v, 2) for k, v in phases.seconds.items()},
        "notes": notes,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else 0,
    }
    inside = sum(v for k, v in phases.seconds.items() if k != "own_solves")  # own solves are part of "solve"
    result["other_s"] = round(result["oneshot_s"] - result["setup_s"] - inside, 2)
    result["solve_parts_s"] = {k: round(v, 3) for k, v in phases.parts.items()}
    result["setup_parts_s"] = {k: round(v, 3) for k, v in phases.setup.items()}
    result["started_at"] = time.time() - (time.perf_counter() - t2)  # when this process reached the oneshot
    result["per_layer"] = per_layer(phases.layers, t3)
    if args.save:
        result |= profiled_save(model, tok, args.work / f"saved{args.rank}")
    if prof is not None:
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        kind = "device" if device == "cuda" else "cpu"
        busy = sum(getattr(e, f"self_{kind}_time_total") for e in events) / 1e6
        result["gpu_busy_s"] = round(busy, 2)
        print(events.table(sort_by=f"self_{kind}_time_total", row_limit=25), flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    return result


def per_layer(layers: list[dict[str, float]], end: float) -> dict:
    """The first layer's passes, and the median and max of the rest: a warm layer's cost, and how even it is."""
    import statistics

    rows = []
    for i, layer in enumerate(layers):
        period = (layers[i + 1]["start"] if i + 1 < len(layers) else end) - layer["start"]
        rows.append({k: layer.get(k, 0.0) for k in ("calibrate", "solve", "propagate")} | {"period": period})
    if not rows:
        return {}
    rest = rows[1:] or rows
    return {
        "first": {k: round(v, 3) for k, v in rows[0].items()},
        "median": {k: round(statistics.median(r[k] for r in rest), 3) for k in rows[0]},
        "max": {k: round(max(r[k] for r in rest), 3) for k in rows[0]},
        "periods": [round(r["period"], 3) for r in rows],
    }


def profiled_save(model, tokenizer, out: Path) -> dict:
    """farm's save (stages/quantize.save) under cProfile: its seconds, the compression's share, and the calls
    that took the most cumulative time."""
    import cProfile

    from farm.stages.quantize import save

    shutil.rmtree(out, ignore_errors=True)
    phases: dict[str, float] = {}
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(save, model, tokenizer, out, phases)
    seconds = time.perf_counter() - t0
    print_stats(prof, "the save")
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "save_s": round(seconds, 2),
        "save_compress_s": round(phases["seconds_save_compress"], 3),
        "saved_gb": round(written / 1e9, 2),
    }


def print_stats(prof: Any, what: str, top: int = 30) -> None:
    """A cProfile's calls by cumulative time."""
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    print(f"cProfile of {what}:\n{text.getvalue()}", flush=True)


def concurrent(args: argparse.Namespace, n: int, ranks: int = 0) -> dict:
    """N copies at once, each a fresh process (as N packed variants, or the N ranks of one data-parallel
    variant): each one's phases and the wall."""
    port = str(free_port())
    argv = [
        sys.executable,
        __file__,
        "--shape",
        args.shape,
        "--layers",
        str(args.layers),
        "--batch",
        str(args.batch),
        "--samples",
        str(args.samples),
        "--seq",
        str(args.seq),
        "--threads",
        str(args.threads),
        "--attention",
        args.attention,
        "--hessian",
        args.hessian,
        "--inverse",
        args.inverse,
        "--repeat",
        str(args.repeat),
        *(["--parts"] if args.parts else []),
        *(["--save"] if args.save else []),
        *(["--profile-setup"] if args.profile_setup else []),
        "--tokenizer",
        str(args.tokenizer),
        "--text",
        str(args.text),
        "--work",
        str(args.work),
    ]
    t0 = time.perf_counter()
    group = ["--ranks", str(ranks), "--port", port] if ranks else []
    logs = [args.work / f"process{i}.err" for i in range(n)]
    procs = [
        subprocess.Popen(
            argv + group + (["--rank", str(i)] if ranks else []),
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        for i, log in enumerate(logs)
    ]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    for i, out in enumerate(outs):  # each process's tables (--profile) and result, beside its log
        (args.work / f"process{i}.out").write_text(out)
    lines = [[x for x in o.splitlines() if x.startswith("RESULT ")] for o in outs]
    if not all(lines):
        failed = next(i for i, x in enumerate(lines) if not x)
        raise SystemExit(f"process {failed} failed:\n{logs[failed].read_text()[-3000:]}")
    each = [json.loads(x[-1][len("RESULT ") :]) for x in lines]
    return {"n": n, "wall_s": round(wall, 2), "each": each}


PHASES = ("oneshot_s", "setup_s", "calibrate_s", "solve_s", "own_solves_s", "propagate_s", "other_s", "peak_gib")


def show(label: str, each: list[dict], wall: float | None = None) -> None:
    """The phases as a table: one row per process (or data-parallel rank)."""
    from farm.report import table

    rows = [
        [f"rank {e['rank']}" if e.get("ranks") else str(i), *(e.get(k) for k in PHASES)] for i, e in enumerate(each)
    ]
    print(f"\n{label}" + (f": wall {wall:.1f} s" if wall is not None else ""))
    print(
        table(["process", *(k.removesuffix("_s") + (" s" if k.endswith("_s") else "") for k in PHASES)], rows),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (farm sets the worker's num_cpus)")
    ap.add_argument("--hessian", default="tensor_cores", choices=["tensor_cores", "fp32"])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--inverse", default="left_looking", choices=["left_looking", "reversed_cholesky", "llmcompressor"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--parts",
        action="store_true",
        help="also time the solve phase's parts (each synchronised, so everything gets slower)",
    )
    ap.add_argument("--save", action="store_true", help="then save as farm does, under cProfile")
    ap.add_argument("--profile-setup", action="store_true", help="cProfile the set-up before the first layer")
    ap.add_argument("--concurrent", type=int, default=0)
    ap.add_argument("--mps", action="store_true", help="with --concurrent: again under CUDA MPS if available")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="oneshots per process, one after another (later ones show what a warm worker pays)",
    )
    ap.add_argument("--ranks", type=int, default=0, help="data-parallel ranks (one process each, NCCL/gloo)")
    ap.add_argument(
        "--broadcast",
        default="llmcompressor",
        choices=["llmcompressor", "forward_order"],
        help="with --ranks: resources.gptq_broadcast (forward_order also splits the samples unevenly, "
        "stages/distributed/rank_shares.py; --batch still applies)",
    )
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".fixtures" / "models" / "tiny-llama")
    ap.add_argument("--text", type=Path, default=ROOT / ".fixtures" / "shakespeare" / "calibration.txt")
    ap.add_argument("--work", type=Path, default=Path("/tmp/farm-profile"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.ranks > 1 and not args.port:  # the launcher: build once, then start every rank
        build_model(args.shape, 0, args.tokenizer, args.work, args.layers)
        res = concurrent(args, args.ranks, args.ranks)
        print("RANKS " + json.dumps(res), flush=True)
        show(f"{args.shape}, {args.layers} layers, {args.ranks} data-parallel ranks", res["each"], res["wall_s"])
        return
    if not args.concurrent:
        for _ in range(args.repeat):  # each RESULT line is one oneshot; a launcher keeps the last
            one = once(args)
            print("RESULT " + json.dumps(one), flush=True)
        if not args.port:  # a rank reports to its launcher only
            show(f"{args.shape}, {args.layers} layers, batch {args.batch}, {args.attention} attention", [one])
        return
    build_model(args.shape, 0, args.tokenizer, args.work, args.layers)
    res = concurrent(args, args.concurrent)
    print("CONCURRENT " + json.dumps(res), flush=True)
    show(f"{args.concurrent} processes at once", res["each"], res["wall_s"])
    control = shutil.which("nvidia-cuda-mps-control")
    if args.mps:
        if not control:
            print("MPS unavailable: no nvidia-cuda-mps-control on PATH", flush=True)
            return
        env = os.environ | {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps-pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/mps-log"}
        for d in ("/tmp/mps-pipe", "/tmp/mps-log"):
            os.makedirs(d, exist_ok=True)
        subprocess.run([control, "-d"], env=env, check=True)
        os.environ.update(env)
        try:
            res = concurrent(args, args.concurrent)
            print("MPS " + json.dumps(res), flush=True)
            show(f"{args.concurrent} processes at once under CUDA MPS", res["each"], res["wall_s"])
        finally:
            subprocess.run([control], input="quit\n", text=True, env=env)


if __name__ == "__main__":
    main()
