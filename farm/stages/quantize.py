"""Quantize stage: base checkpoint + method config + calibration draw -> compressed-tensors checkpoint."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.calibration import diversity_of, draw, summed_stats, token_stats
from farm.methods import MethodConfig
from farm.methods.autoround import AutoRoundConfig
from farm.methods.fp8 import FP8Config
from farm.stages import timed_call
from farm.stages.distributed.split_load import dispatch_replica, load_split
from farm.stages.distributed.split_save import shards_split_over_ranks
from farm.stages.engines.registry import register_engine
from farm.stages.expert_coverage import expert_coverage
from farm.stages.llmc.autoround_fp32 import fp32_autoround_on_cpu
from farm.stages.llmc.autoround_zero_points import tuned_zero_points_kept
from farm.stages.llmc.calibration_sdpa import sdpa_calibration
from farm.stages.llmc.cpu_pinning import cpu_safe_pinning
from farm.stages.llmc.ddp_forward_order import forward_ordered
from farm.stages.llmc.fx_wrap_release import autowrap_namespaces_released
from farm.stages.llmc.gptq_left_looking import left_looking_solve
from farm.stages.llmc.gptq_one_cholesky import one_cholesky_factor
from farm.stages.llmc.hessian_tensor_cores import tensor_core_hessians
from farm.stages.llmc.idle_tail import applies, idle_tail_skipped
from farm.stages.llmc.parallel_shard_writes import parallel_shard_writes
from farm.stages.llmc.swap import Used, timed
from farm.stages.modelio import load_model, load_shared_model, load_tokenizer, pick_device, start_device


@dataclass(frozen=True)
class CalibrationDraw:
    source: str
    num_samples: int
    max_seq_length: int
    seed: int
    sha256: str | None = None  # the identity planned for the source: a draw from other text fails (InputChanged)


@dataclass(frozen=True)
class ValidationText:
    """The job's validation text: what search and mixed candidates are judged on (never calibration or
    evaluation text)."""

    source: str
    sha256: str | None
    max_tokens: int
    seq_len: int


@dataclass(frozen=True)
class QuantizeRequest:
    model_dir: str
    method: MethodConfig
    calibration: CalibrationDraw
    out_dir: str
    trust_remote_code: bool = False
    batch_size: int = 1
    offload_device: str | None = None  # where sequential calibration keeps activations (None: llm-compressor's)
    load_device: str | None = None  # where the weights live: None = the worker's device; "cpu" = onload per layer
    rank: int = 0  # data-parallel rank and world size (world > 1: a process group is already initialised)
    world: int = 1
    gptq_hessian: str = (
        "tensor_cores"  # or "fp32": llm-compressor's own Hessian GEMM (stages/llmc/hessian_tensor_cores.py)
    )
    gptq_inverse: str = (
        "left_looking"  # stages/llmc/gptq_left_looking.py; or "reversed_cholesky" (factor.py), "llmcompressor"
    )
    gptq_broadcast: str = "llmcompressor"  # DDP ranks: or "forward_order" (stages/llmc/ddp_forward_order.py)
    shares: tuple[int, ...] | None = (
        None  # calibration samples per rank (stages/distributed/rank_shares.py); None: even
    )
    calibration_attention: str = (
        "sdpa"  # or "eager": llm-compressor's forced eager attention (stages/llmc/calibration_sdpa.py)
    )
    validation: ValidationText | None = None  # methods that choose between candidates (search, mixed)
    candidate_calibrations: tuple[CalibrationDraw, ...] = ()  # a search's draw per candidate, in its order
    report: dict[str, Any] = field(default_factory=dict, compare=False)  # filled: the calibration's diversity


@dataclass
class QuantizeResult:
    out_dir: str
    device: str
    seconds_load: float
    seconds_oneshot: float
    seconds_save: float
    recipe: str
    notes: list[str] = field(default_factory=list)
    calibration_report: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # method-specific numbers for the variant's run
    documents: dict[str, Any] = field(default_factory=dict)  # method-specific JSON artifacts, by file name
    candidates: list[dict[str, Any]] = field(default_factory=list)  # what a search tried: one MLflow run each


def _windows(req: QuantizeRequest, tokenizer: Any) -> list[list[int]]:
    """This rank's calibration windows: the draw's `rank::world` share, the only ones it tokenizes."""
    cal = req.calibration
    return draw(
        cal.source,
        tokenizer,
        cal.num_samples,
        cal.max_seq_length,
        cal.seed,
        req.rank,
        req.world,
        req.shares,
        expect_sha256=cal.sha256,
    )


def _dataset(req: QuantizeRequest, tokenizer: Any, windows: list[list[int]] | None = None) -> Any:
    """The rank's windows as llm-compressor's dataset; the whole draw's diversity report lands in `req.report`
    on rank 0 (collective when distributed: the ranks' token counts are gathered)."""
    from datasets import Dataset

    windows = _windows(req, tokenizer) if windows is None else windows
    stats = token_stats(windows)
    if req.world > 1:
        import torch.distributed as dist

        shares: list[Any] = [None] * req.world
        dist.all_gather_object(shares, stats)
        stats = summed_stats(shares)
    if req.rank == 0:
        req.report.update(diversity_of(req.calibration.source, *stats))
    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})


@register_engine(FP8Config, when=lambda c: c.engine == "model_free")
def quantize_model_free(req: QuantizeRequest) -> QuantizeResult:
    """Data-free schemes straight from the safetensors shards (llm-compressor's model_free_ptq): no model is
    built, shards are spread over every GPU this worker holds (a sharded 8B FP8 checkpoint in seconds)."""
    import torch
    from llmcompressor import model_free_ptq

    n = torch.cuda.device_count()
    t0 = time.perf_counter()
    model_free_ptq(
        req.model_dir,
        req.out_dir,
        scheme=req.method.identity()["scheme"],
        ignore=list(req.method.ignore),
        max_workers=max(2, 2 * n),
        device=[f"cuda:{i}" for i in range(n)] if n else "cpu",
    )
    seconds = time.perf_counter() - t0
    recipe = yaml_recipe(req.method)
    (Path(req.out_dir) / "recipe.yaml").write_text(recipe)
    return QuantizeResult(
        out_dir=req.out_dir,
        device=f"cuda x{n}" if n else "cpu",
        seconds_load=0.0,
        seconds_oneshot=seconds,
        seconds_save=0.0,
        recipe=recipe,
        notes=[f"model_free_ptq over {n or 1} device(s)"],
    )


def yaml_recipe(method: MethodConfig, engine: str = "model_free_ptq") -> str:
    import yaml

    return yaml.safe_dump({engine: method.identity()}, sort_keys=True)


def calibrate(
    req: QuantizeRequest, model: Any, tokenizer: Any, recipe: list[Any], dataset: Any | None = None
) -> list[str]:
    """llm-compressor's oneshot with farm's calibration draw and tuned settings; returns notes for the run."""
    from llmcompressor import oneshot

    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    if req.method.requires_calibration:
        dataset = dataset if dataset is not None else _dataset(req, tokenizer)
        kwargs |= {
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": req.calibration.max_seq_length,
            "shuffle_calibration_samples": False,  # the draw is already seeded
            "batch_size": req.batch_size,
        }
        if req.offload_device:
            kwargs["sequential_offload_device"] = req.offload_device
    autoround = any(type(m).__name__ == "AutoRoundModifier" for m in recipe)
    speedups: list[contextlib.AbstractContextManager[Used] | None] = [  # farm's GPU speed-ups, each switchable
        tensor_core_hessians() if req.gptq_hessian == "tensor_cores" else None,
        one_cholesky_factor() if req.gptq_inverse == "reversed_cholesky" else None,
        left_looking_solve() if req.gptq_inverse == "left_looking" else None,
        sdpa_calibration(model) if req.calibration_attention == "sdpa" else None,
        idle_tail_skipped(model) if req.method.requires_calibration and applies(recipe) else None,
        forward_ordered() if req.world > 1 and req.gptq_broadcast == "forward_order" else None,
        fp32_autoround_on_cpu() if autoround else None,
        tuned_zero_points_kept(isinstance(req.method, AutoRoundConfig) and not req.method.symmetric)
        if autoround
        else None,
    ]
    with contextlib.ExitStack() as stack:
        stack.enter_context(autowrap_namespaces_released())
        guard = stack.enter_context(cpu_safe_pinning())
        used: list[Used] = [stack.enter_context(s) for s in speedups if s is not None]
        oneshot(model=model, recipe=recipe, tokenizer=tokenizer, **kwargs)
    if guard.skipped:
        notes.append(
            f"no accelerator: skipped {guard.skipped} llm-compressor activation pin(s) (stages/llmc/cpu_pinning.py)"
        )
    notes += [n for n in (u.note() for u in used) if n]
    return notes


SHARD = "1GB"  # several shards hash, upload and load in parallel (llm-compressor's default is one 20 GB file)


def save(model: Any, tokenizer: Any, out_dir: str | Path, phases: dict[str, float] | None = None) -> str:
    """Write the compressed checkpoint (collective when distributed: every rank calls it and writes its share of
    the shards into rank 0's `out_dir`, stages/distributed/split_save.py); returns the recipe.
    `phases` gets `seconds_save_compress`: compressed-tensors packing the weights, the rest of the save is
    moving them to the host and writing the shards."""
    from compressed_tensors.compressors import ModelCompressor

    out = Path(out_dir)
    with (
        shards_split_over_ranks(model, out) as route,
        parallel_shard_writes(route=route),
        timed(ModelCompressor, "compress_model") as compress,
    ):
        model.save_pretrained(out, save_compressed=True, max_shard_size=SHARD)
    tokenizer.save_pretrained(out)
    if phases is not None:
        phases["seconds_save_compress"] = compress.seconds
    recipe_file = out / "recipe.yaml"
    return recipe_file.read_text() if recipe_file.exists() else ""


def placement(req: QuantizeRequest, device: str) -> str:
    """Where this process loads the weights: a device, or "shared" (one host copy for every rank: a model too
    large for a rank's GPU, or CPU ranks, whose results llm-compressor shares through that copy). A rank of a
    model that fits its GPU gets a replica on its own GPU (`cuda:<rank>`: compressed-tensors takes device ==
    rank)."""
    if req.world > 1:
        return "shared" if device == "cpu" or req.load_device == "cpu" else f"cuda:{req.rank}"
    return req.load_device or device


def load_weights(req: QuantizeRequest, where: str, device: str) -> tuple[Any, list[str]]:
    """The model on `where` (see `placement`), and a note for the run when ranks shared the reading."""
    if where == "shared":
        return load_shared_model(req.model_dir, device, req.trust_remote_code), []
    if req.world == 1:
        return load_model(req.model_dir, where, req.trust_remote_code, compute=device), []
    # A replica per rank: each reads its share, the rest comes from the other ranks.
    model = load_split(
        req.model_dir, where, req.rank, req.world, lambda: load_model(req.model_dir, where, req.trust_remote_code)
    )
    notes = []
    if model is None:
        model = load_model(req.model_dir, where, req.trust_remote_code)
    else:
        notes.append(f"checkpoint read 1/{req.world} per rank, the rest broadcast (stages/distributed/split_load.py)")
    dispatch_replica(model, where)
    return model, notes


def _tokenizer_and_windows(req: QuantizeRequest) -> tuple[Any, list[list[int]] | None, dict[str, float]]:
    """The tokenizer and this rank's calibration windows, read while the weights load (tokenizing is CPU work
    that releases the GIL), with their seconds."""
    tokenizer, seconds = timed_call(load_tokenizer, req.model_dir, req.trust_remote_code)
    phases = {"seconds_load_tokenizer": seconds}
    if not req.method.requires_calibration:
        return tokenizer, None, phases
    windows, phases["seconds_calibration_draw"] = timed_call(_windows, req, tokenizer)
    return tokenizer, windows, phases


def quantize(req: QuantizeRequest) -> QuantizeResult:
    """The engine registered for the method's config (model_free FP8, mixed, QAT, NF4, GPTQModel:
    stages/engines/registry.py), else llm-compressor's oneshot."""
    from farm.stages.engines.registry import engine_for

    engine = engine_for(req.method)
    if engine is not None:
        return engine(req)
    device = pick_device()
    t0 = time.perf_counter()
    # transformers' lazy module is not safe to import from two threads at once: the first import of the model
    # and tokenizer classes happens here, before the tokenizer thread starts (a warm worker has them already)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="farm-tokenizer") as side:  # beside the weights
        text = side.submit(_tokenizer_and_windows, req)
        where = placement(req, device)
        start_device(where)
        t_dev = time.perf_counter()  # a fresh worker's CUDA context (a DDP rank's exists already: its group)
        model, notes = load_weights(req, where, device)
        tokenizer, windows, phases = text.result()
    t1 = time.perf_counter()
    dataset = _dataset(req, tokenizer, windows) if windows is not None else None
    with expert_coverage(model) as coverage:
        notes += calibrate(req, model, tokenizer, req.method.modifiers(), dataset)
    t2 = time.perf_counter()
    tokens = sum(len(w) for w in dataset["input_ids"]) if dataset is not None else 0
    moe_metrics, moe_document = coverage.result(tokens) if tokens else ({}, None)
    phases["seconds_load_device"] = t_dev - t0  # like the tokenizer's and the draw's: within the load
    recipe = save(model, tokenizer, req.out_dir, phases)
    t3 = time.perf_counter()
    return QuantizeResult(
        out_dir=req.out_dir,
        device=device,
        seconds_load=t1 - t0,
        seconds_oneshot=t2 - t1,
        seconds_save=t3 - t2,
        recipe=recipe,
        notes=notes,
        calibration_report=dict(req.report),
        metrics={**phases, **moe_metrics},
        documents={"expert_coverage.json": moe_document} if moe_document else {},
    )
