"""The worker a variant runs in. It executes one plan step (quantize -> evaluate -> publish) and hands plain
results back to the driver. `cluster.remote_actor` makes it an actor; the only Ray it touches itself is
`cluster.call_in_env`, for a backend whose quantize step needs another environment (AutoAWQ)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from farm import sources
from farm.artifacts import ArtifactStore, file_table
from farm.errors import InputChanged
from farm.methods.backends import BACKENDS
from farm.plan import BaseEval, Variant
from farm.runtime import cluster, ddp
from farm.runtime.ddp import Rank
from farm.runtime.liveness import pid_alive
from farm.runtime.results import BaseResult, DataParallel, RankReport, VariantResult
from farm.secrets import redact
from farm.spec import EvaluationSpec
from farm.stages import timed_call
from farm.stages.checks.runner import ChecksResult
from farm.stages.evaluate import EvaluateResult
from farm.tracking.names import Metric, Tag

VERSIONED = ("farm", "llmcompressor", "compressed-tensors", "transformers", "torch", "ray", "mlflow")
OPTIONAL = ("gptqmodel", "bitsandbytes", "torchao", "peft")  # recorded where installed (backends, NF4, QAT, LoRA)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    for name in OPTIONAL:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str
    artifact_location: str | None
    log_model: bool


@dataclass(frozen=True)
class VariantTask:
    job_name: str
    variant: Variant
    run_id: str
    evaluation: EvaluationSpec
    artifact_root: str
    tracking: Tracking


@dataclass(frozen=True)
class BaseTask:
    job_name: str
    base: BaseEval
    evaluation: EvaluationSpec
    num_gpus: float = 0.0  # the worker's GPU share (the serving engine asks for its part of the card)


def _eval_request(model_dir: str, ev: EvaluationSpec, trust: bool) -> Any:
    from farm.stages.evaluate import EvaluateRequest

    return EvaluateRequest(
        model_dir=model_dir,
        ppl_source=ev.perplexity.source,
        ppl_max_tokens=ev.perplexity.max_tokens,
        ppl_seq_len=ev.perplexity.seq_len,
        prompt=ev.generation.prompt,
        max_new_tokens=ev.generation.max_new_tokens,
        trust_remote_code=trust,
    )


def gpu_budget_bytes(num_gpus: float, cap_bytes: int = 0) -> int:
    """This worker's share of its GPU: all free memory for a whole GPU, its fraction of the card when packed; at
    most `cap_bytes` when the spec sets `resources.gpu_memory_gb`."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    share = int(free if num_gpus >= 1 else min(free, total * num_gpus))
    return min(share, cap_bytes) if cap_bytes else share


def gpu_card_bytes() -> int:
    """The memory of the GPU Ray gave this process (a Ray task's, for GPU packing: a MIG slice's own size)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("a task given a GPU by Ray sees no CUDA device")
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


@contextlib.contextmanager
def gpu_memory_capped(cap_bytes: int) -> Iterator[dict[str, float]]:
    """Hold this process's CUDA allocator to `cap_bytes` while the block runs (an out-of-memory error past it, as
    on a smaller GPU), and report the peak it allocated as `gpu_peak_bytes`. Without a GPU: nothing."""
    import torch

    found: dict[str, float] = {}
    if not torch.cuda.is_available():
        yield found
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if cap_bytes:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
    torch.cuda.reset_peak_memory_stats()
    try:
        yield found
    finally:
        found[Metric.GPU_PEAK_BYTES] = float(torch.cuda.max_memory_allocated())
        if cap_bytes:
            torch.cuda.set_per_process_memory_fraction(1.0)


def overlapping(v: Variant, world: int) -> bool:
    """Whether DDP ranks propagate while GPTQ's owners solve (stages/llmc/ddp_forward_order.py): GPU ranks only."""
    from farm.stages.modelio import pick_device

    return world > 1 and v.resources.gptq_broadcast == "forward_order" and pick_device() == "cuda"


def rank_shares(v: Variant, model: sources.ResolvedModel, world: int) -> tuple[int, ...] | None:
    """Calibration samples per DDP rank of an `overlapping` gang, fewer for the owner of the largest solve
    (stages/distributed/rank_shares.py); None for the even split."""
    from farm.stages.distributed.rank_shares import shares

    return shares(model.config, v.calibration.num_samples, v.calibration.max_seq_length, world)


def tune(
    v: Variant,
    model: sources.ResolvedModel,
    frugal: bool = False,
    world: int = 1,
    shares: tuple[int, ...] | None = None,
    whole: bool = False,
) -> Any:
    """`whole`: an `overlapping` DDP rank, which calibrates its share in one batch when it fits."""
    from farm.stages.modelio import pick_device
    from farm.stages.tuning import choose

    cfg = model.config
    on_disk = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    per_rank = max(shares) if shares else -(-v.calibration.num_samples // world)
    loaded_bytes = model.weights_bytes // 2 if on_disk == "float32" else model.weights_bytes  # loaded as bf16
    return choose(
        pick_device(),
        gpu_budget_bytes(v.resources.num_gpus, v.resources.gpu_memory_bytes),
        per_rank,
        v.calibration.max_seq_length,
        int(cfg.get("hidden_size") or 0),
        int(cfg.get("intermediate_size") or 0),
        int(cfg.get("num_attention_heads") or 32),
        frugal,
        weights_bytes=loaded_bytes,  # DDP ranks replicate a model that fits, share one that does not
        # the single-process batches stand as measured, sized by the eager-attention bound
        attention=v.resources.calibration_attention if whole else "eager",
        whole_share=whole,
    )


def is_device_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "CUDA out of memory" in str(err)


def release_device_memory() -> None:
    """Give this process's GPU memory back: llm-compressor's global session keeps the last oneshot's model (and
    its modifiers' state) until the next oneshot resets it, so a reused worker would otherwise hold the previous
    variant's weights while the serving engine or a packed neighbour starts."""
    import gc
    import sys

    import torch

    if "llmcompressor" in sys.modules:
        from llmcompressor.core import reset_session

        reset_session()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SCRATCH = "farm-scratch-"  # + "<pid>-<variant id>-": a variant's checkpoint before it is published


def sweep_scratch(root: str | None = None) -> int:
    """Remove the scratch checkpoints of workers on this host that died without cleaning up (kill -9, out of
    memory): the worker's pid is in the name. Returns how many went."""
    gone = 0
    for path in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH}*"):
        pid = path.name[len(SCRATCH) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            gone += 1
    return gone


def device_memory_held() -> int:
    """Bytes of GPU memory this process's caching allocator holds (0 without a GPU)."""
    import torch

    return int(torch.cuda.memory_reserved()) if torch.cuda.is_available() else 0


def local_model(m: Any) -> sources.ResolvedModel:
    """The checkpoint a job's model names, on this node: resolved (hf/s3/local), and with `merge_adapter` the
    base with the adapter merged in, built once per (base, adapter) under FARM_CACHE."""
    resolved = sources.resolve(m.source, m.revision, identify=False, allow_pickle=m.allow_pickle)
    if not m.merge_adapter:
        return resolved
    from farm.stages.checks.adapters import merge_into

    key = hashlib.sha256(f"{resolved.local_dir}\0{sources.adapter_identity(m.merge_adapter)}".encode()).hexdigest()
    dest = sources.cache_root() / "merged" / key[:32]
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".merge-", dir=dest.parent)
        merge_into(resolved.local_dir, m.merge_adapter, tmp, m.trust_remote_code)
        try:
            os.replace(tmp, dest)  # atomic: a concurrent worker's identical merge may have won; either is fine
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return replace(resolved, local_dir=str(dest))


def unchanged(v: Any, local_dir: str) -> None:
    """InputChanged when a local model directory no longer has the identity the job planned on (rewritten before
    or during the build). Cheap when nothing changed: file hashes are remembered by (path, size, mtime). Remote
    sources are pinned snapshots (a revision, an S3 listing) fetched into a cache; a merged adapter's identity is
    the merge's, checked where the adapter is read."""
    if "://" in v.model.source or v.model.merge_adapter:
        return
    now = sources.content_identity(Path(local_dir), v.model.allow_pickle)
    if now != v.identity:
        raise InputChanged(
            f"model {v.model_name}: {redact(v.model.source)} changed since the job was planned ({v.identity[:19]} "
            f"planned, {now[:19]} now): this variant was not published; re-run the job to plan it on the new files"
        )


def warm_imports() -> float:
    """Import what every stage needs (torch, transformers, llm-compressor; 8-12 s in a fresh process on the GPU
    hosts) before the first job arrives; returns the seconds. A backend's environment without llm-compressor
    skips that one. A data-parallel rank calls it only after `ddp.use_devices`: llm-compressor's import asks
    torch whether CUDA is available, which fixes the visible devices."""
    import importlib

    t0 = time.perf_counter()
    for name in ("torch", "transformers", "llmcompressor"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(ImportError):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy modules, loaded here)
    return time.perf_counter() - t0


class Worker:
    """`warm`: import the stages' libraries now, while Ray schedules (a rank of a data-parallel gang does it in
    `join`, once it knows the gang's devices). What that cost is reported by the first job, as
    `seconds_worker_start`, apart from the job's own stage times."""

    def __init__(
        self, num_cpus: float = 1, warm: bool = True, secrets: dict[str, str] | None = None, cpu_only: bool = False
    ):
        from farm.stages.modelio import pin_cpu_kernels, set_threads

        os.environ.update(secrets or {})  # credential-bearing variables: through the constructor, not runtime_env
        if cpu_only:  # the same numbers on any x86-64 host (before torch loads)
            pin_cpu_kernels()
        sweep_scratch()  # what workers killed on this host left behind

        set_threads(num_cpus)
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # the GPUs Ray gave this worker (`join` widens)
        self.start_seconds = warm_imports() if warm else 0.0

    def join(self, rank: Rank) -> None:
        """Become one rank of a gang before its first variant: see the gang's GPUs, then import (the variant's
        stage then starts on every rank after the group's barrier, not after each rank's own imports)."""
        ddp.use_devices(rank)
        self.start_seconds += warm_imports()

    def _started(self) -> float:
        """The worker's start-up seconds, to the first job that asks (later jobs ran in a warm worker)."""
        seconds, self.start_seconds = self.start_seconds, 0.0
        return seconds

    def evaluate_base(self, task: BaseTask) -> BaseResult:
        self._started()  # a base evaluation reports no stage times
        model = local_model(task.base.model)
        try:
            checks, result = _evaluate(model.local_dir, task.evaluation, task.base.model.trust_remote_code, None)
            release_device_memory()
            checks = _serve(model.local_dir, task.evaluation, task.base.model.trust_remote_code, task.num_gpus, checks)
        finally:
            release_device_memory()  # the worker is reused; give its GPU share back to packed neighbours
        return BaseResult(result, checks)

    def build(self, task: VariantTask, rank: Rank | None = None) -> VariantResult | RankReport:
        """Quantize, evaluate and publish one variant. With `rank`, this worker is one rank of a data-parallel
        variant: every rank calibrates on its share; rank 0 alone evaluates, publishes and reports."""
        from farm.stages.quantize import CalibrationDraw, QuantizeRequest, ValidationText, quantize
        from farm.tracking.mlflow_store import MlflowStore

        me = RankReport(rank.rank if rank else 0, f"{socket.gethostname()}:{os.getpid()}", self.devices)
        if rank is not None:
            ddp.use_devices(rank)
        v = task.variant
        tr = task.tracking
        lead = rank is None or rank.rank == 0
        mlflow = MlflowStore(tr.uri, tr.experiment, tr.artifact_location)
        if lead:
            mlflow.log(task.run_id, tags={Tag.WORKER: me.worker, Tag.CUDA_VISIBLE_DEVICES: me.cuda_visible_devices})
        model = local_model(v.model)
        scratch = tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-{v.id}-")
        try:
            out = f"{scratch}/model"
            cal, val = v.calibration, v.validation
            t0 = time.perf_counter()
            world = rank.world if rank else 1
            lib = BACKENDS[v.method.backend_name]
            overlap = overlapping(v, world)  # stages/llmc/ddp_forward_order.py
            shares = rank_shares(v, model, world) if overlap else None
            tuned = tune(v, model, world=world, shares=shares, whole=overlap)
            request = QuantizeRequest(
                model_dir=model.local_dir,
                method=v.method,
                calibration=CalibrationDraw(cal.source, cal.num_samples, cal.max_seq_length, cal.seed, cal.sha256),
                validation=ValidationText(val.source, val.sha256, val.max_tokens, val.seq_len) if val else None,
                candidate_calibrations=tuple(
                    CalibrationDraw(c.source, c.num_samples, c.max_seq_length, c.seed, c.sha256)
                    for c in v.candidate_calibrations
                ),
                out_dir=out,
                trust_remote_code=v.model.trust_remote_code,
                batch_size=tuned.batch_size,
                offload_device=tuned.offload_device,
                load_device=tuned.load_device,
                rank=rank.rank if rank else 0,
                world=world,
                gptq_hessian=v.resources.gptq_hessian,
                calibration_attention=v.resources.calibration_attention,
                gptq_inverse=v.resources.gptq_inverse,
                gptq_broadcast=v.resources.gptq_broadcast,
                shares=shares,
            )
            started = self._started()
            if rank is not None:
                backend = ddp.init(rank)
                try:
                    q = quantize(request)
                finally:
                    ddp.destroy()
                if not lead:
                    return me
                split = (
                    f"samples per rank {list(shares)} (stages/distributed/rank_shares.py)" if shares else "even split"
                )
                q.notes.append(
                    f"data-parallel calibration: {world} ranks ({backend}), {split}; tuning per rank: {tuned.reason}"
                )
            elif lib.quantize_in and lib.stage:  # an archived library in its own environment
                from farm.stages.quantize import QuantizeResult

                q = QuantizeResult(**cluster.call_in_env(lib.stage, BACKENDS[lib.quantize_in].runtime_env(), request))
            else:
                with gpu_memory_capped(v.resources.gpu_memory_bytes) as memory:
                    q = self._quantize_with_retry(v, model, request, tuned)
                q.metrics |= memory
            q.metrics["seconds_worker_start"] = started
            q.metrics[Metric.ONLOADED] = float(tuned.load_device == "cpu")  # weights on the host, a layer at a time
            unchanged(v, model.local_dir)  # nothing is published for a model rewritten under the build
            # The checkpoint is final: hash it and upload it to MLflow while the GPU evaluates it.
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="farm-artifact") as background:
                files = background.submit(timed_call, file_table, out)
                upload = (
                    background.submit(timed_call, mlflow.upload_dir, task.run_id, out, "model")
                    if tr.log_model
                    else None
                )
                checks, e = _evaluate(out, task.evaluation, v.model.trust_remote_code, model.local_dir)
                release_device_memory()  # the serving engine is a process of its own on this GPU
                checks = _serve(out, task.evaluation, v.model.trust_remote_code, v.resources.num_gpus, checks)
                t_wait = time.perf_counter()
                table, seconds_hash = files.result()
                model_uri, seconds_upload = upload.result() if upload else (None, 0.0)
                t_manifest = time.perf_counter()
            manifest = variant_manifest(task, model.revision, q.recipe, table)
            store = ArtifactStore(task.artifact_root)
            artifact_uri = store.publish(out, store.key(*v.artifact_key), manifest)
            t_end = time.perf_counter()
            return VariantResult(
                quantize=replace(q, recipe=""),  # the manifest carries it
                evaluation=e,
                checks=checks,
                manifest=manifest,
                artifact_uri=artifact_uri,
                model_uri=model_uri,
                seconds_manifest=seconds_hash,
                seconds_mlflow_upload=seconds_upload,
                seconds_artifact_wait=t_manifest - t_wait,
                seconds_publish=t_end - t_manifest,
                seconds_total=t_end - t0,
                ddp=DataParallel(world, (me,)) if rank else None,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            release_device_memory()

    @staticmethod
    def _quantize_with_retry(v: Variant, model: sources.ResolvedModel, request: Any, tuned: Any) -> Any:
        from farm.stages.quantize import quantize

        try:
            q = quantize(request)
            q.notes.append(f"tuning: {tuned.reason}")
            return q
        except Exception as err:
            if not is_device_oom(err) or tuned.offload_device is None:
                raise
        # One retry with the frugal settings (llm-compressor's defaults: activations on the host, batch 1).
        release_device_memory()
        frugal = tune(v, model, frugal=True)
        q = quantize(
            replace(
                request,
                batch_size=frugal.batch_size,
                offload_device=frugal.offload_device,
                load_device=frugal.load_device,
            )
        )
        q.notes.append(f"GPU out of memory with {tuned.reason}; retried with {frugal.reason}")
        return q

    def visible_devices(self) -> str:
        return self.devices

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address as other nodes see it, a free port) for rank 0 of a data-parallel variant."""
        return node_address(), ddp.free_port()


def _evaluate(
    path: str, evaluation: EvaluationSpec, trust: bool, base_dir: str | None
) -> tuple[ChecksResult | None, EvaluateResult]:
    """The checks (a variant's against its base at `base_dir`) and the evaluation of the checkpoint at `path`,
    from one load; the checks go first (cold latency)."""
    from farm.stages.checks.runner import enabled, run_checks
    from farm.stages.evaluate import evaluate, load

    request = _eval_request(path, evaluation, trust)
    loaded = load(request)
    checks = (
        run_checks(path, evaluation, base_dir, trust, (loaded.model, loaded.tokenizer)) if enabled(evaluation) else None
    )
    return checks, evaluate(request, loaded)


def _serve(
    path: str, evaluation: EvaluationSpec, trust: bool, num_gpus: float, checks: ChecksResult | None
) -> ChecksResult | None:
    """The serving check (evaluation.serving) of the checkpoint at `path`, merged into the checks' record; a
    failure is one line under farm.serving_error, and the variant's other records stand."""
    if evaluation.serving is None:
        return checks
    from farm.calibration import read_text
    from farm.serving import measure
    from farm.serving.runner import serve
    from farm.stages.modelio import load_tokenizer

    tokenizer = load_tokenizer(path, trust)
    held = device_memory_held()  # what the worker keeps while the engine starts beside it (should be ~0)
    r = serve(path, evaluation.serving, read_text(evaluation.perplexity.source), tokenizer, num_gpus, trust)
    out = checks or ChecksResult()
    out.metrics |= r.metrics | {measure.WORKER_HELD_BYTES: float(held)}
    out.tags |= r.tags | ({measure.TAG_ERROR: r.error} if r.error else {})
    out.artifacts[measure.DOCUMENT] = r.document | ({"error": r.error} if r.error else {})
    return out


def variant_manifest(task: VariantTask, revision: str | None, recipe: str, files: dict[str, Any]) -> dict[str, Any]:
    """What `manifest.json` says of a published variant: where it came from, how it was made, what it holds."""
    v, cal = task.variant, task.variant.calibration
    return {
        "variant_id": v.id,
        "job": task.job_name,
        "model": {"name": v.model_name, "source": redact(v.model.source), "identity": v.identity, "revision": revision},
        "method": {"label": v.method.label(), **v.method.identity(), "config_sha256": v.method.config_hash()},
        "recipe": recipe,
        "recipe_sha256": hashlib.sha256(recipe.encode()).hexdigest(),
        "calibration": {
            "source": redact(cal.source),
            "content_sha256": cal.sha256,
            "num_samples": cal.num_samples,
            "max_seq_length": cal.max_seq_length,
            "seed": cal.seed,
            "hash": cal.hash if v.method.requires_calibration else "data-free",
        },
        "versions": library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": files,
    }


def node_address() -> str:
    """The address other nodes reach this one at: Ray's node IP when set, else the outbound interface's."""
    for key in ("RAY_NODE_IP_ADDRESS", "RAY_NODE_IP"):
        if os.environ.get(key):
            return os.environ[key]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the interface of the default route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
