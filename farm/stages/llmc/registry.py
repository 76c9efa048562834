"""Every replacement of upstream internals farm makes, in one table, and the guard each goes through.

A replacement is set for one oneshot (or save, or load) by `swap.swapped`, which looks it up here by the
attribute it replaces. It applies only when the installed upstream package is a version it was checked against
and the function it replaces still takes the parameters it was written for; otherwise a warning names it and
upstream's own code runs (llm-compressor rewrote several of these functions between 0.13 and 0.14: a newer
release must be checked, its equivalence test run, and its version added here, before farm replaces anything in
it). `FARM_UPSTREAM_UNCHECKED=1` applies replacements on unchecked versions anyway, for that checking.

Pure data and stdlib: the table is read by tests and by docs/DESIGN.md's list without importing torch.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)
UNCHECKED_ENV = "FARM_UPSTREAM_UNCHECKED"


@dataclass(frozen=True)
class Replacement:
    key: str  # "<module>.<attribute>" as `swapped` sees it (module.__name__ of what it patches, then the name)
    farm: str  # the module of farm's that makes it
    what: str  # what it does instead, in a line
    package: str  # the distribution whose version decides
    checked: tuple[str, ...]  # versions its equivalence test passed on
    parameters: tuple[str, ...] | None  # the replaced function's parameters it relies on (None: not a function)
    switch: str  # how a job turns it off
    test: str  # its equivalence test


LLMC = ("0.14.0.1",)
TRANSFORMERS = ("5.17.0",)
CT = ("0.19.0",)
REPLACEMENTS: tuple[Replacement, ...] = (
    Replacement(
        "llmcompressor.modifiers.gptq.base.accumulate_hessian",
        "llmc.hessian_tensor_cores",
        "GPTQ Hessians accumulated with TF32/bf16 tensor-core GEMMs on CUDA",
        "llmcompressor",
        LLMC,
        ("inp", "module", "hessian", "num_samples"),
        "resources.gptq_hessian: fp32",
        "tests/engine/test_hessian.py, tests/gpu/test_gpu_hessian.py",
    ),
    Replacement(
        "llmcompressor.modifiers.gptq.base.quantize_weight",
        "llmc.gptq_left_looking",
        "GPTQ solved left-looking from the Cholesky factor, without the inverse Hessian",
        "llmcompressor",
        LLMC,
        ("weights", "hessians", "scale", "zero_point", "global_scale", "quant_args", "blocksize", "percdamp"),
        "resources.gptq_inverse: llmcompressor",
        "tests/engine/test_leftgptq.py",
    ),
    Replacement(
        "llmcompressor.modifiers.gptq.gptq_quantize.factorize_hessian",
        "llmc.gptq_one_cholesky",
        "the inverse Hessian's upper factor from one Cholesky of the reversed matrix",
        "llmcompressor",
        LLMC,
        ("weights", "hessians", "percdamp", "used_rtn_fallback"),
        "resources.gptq_inverse: left_looking",
        "tests/engine/test_factor.py, tests/gpu/test_gpu_factor.py",
    ),
    Replacement(
        "llmcompressor.modifiers.gptq.base.GPTQModifier.compress_modules",
        "llmc.ddp_forward_order",
        "data-parallel GPTQ results broadcast in forward order, waited for where first used",
        "llmcompressor",
        LLMC,
        ("self",),
        "resources.gptq_broadcast: llmcompressor (the default)",
        "tests/engine/test_forwardorder.py",
    ),
    Replacement(
        "llmcompressor.modifiers.gptq.base.GPTQModifier.on_calibration_end",
        "llmc.ddp_forward_order",
        "the last layer's forward-order broadcasts waited for before calibration ends",
        "llmcompressor",
        LLMC,
        ("self", "state", "event", "kwargs"),
        "resources.gptq_broadcast: llmcompressor (the default)",
        "tests/engine/test_forwardorder.py",
    ),
    Replacement(
        "llmcompressor.pipelines.sequential.pipeline.trace_subgraphs",
        "llmc.idle_tail",
        "the last calibration subgraph ends at its last quantized module (no full-vocabulary logits)",
        "llmcompressor",
        LLMC,
        ("model", "sample_input", "sequential_targets", "ignore", "targets_per_subgraph"),
        "on when the head is not quantized; no switch (byte-equal weights)",
        "tests/engine/test_tail.py",
    ),
    Replacement(
        "torch.fx._symbolic_trace._wrapped_fns_to_patch",
        "llmc.fx_wrap_release",
        "the namespaces oneshot's autowrapped forwards registered in torch.fx dropped after it (they held the model)",
        "llmcompressor",
        LLMC,
        None,
        "none: only entries of the finished oneshot go",
        "tests/engine/test_stages.py::test_release_device_memory_drops_the_last_oneshot_model",
    ),
    Replacement(
        "llmcompressor.pipelines.cache.IntermediatesCache.pin_memory",
        "llmc.cpu_pinning",
        "no activation pinning without an accelerator (upstream raises on CPU)",
        "llmcompressor",
        LLMC,
        ("self", "batch_index", "input_names"),
        "on only without an accelerator",
        "tests/engine/test_compat.py",
    ),
    Replacement(
        "llmcompressor.modifiers.autoround.base.AutoRound",
        "llmc.autoround_fp32",
        "AutoRound tunes CPU layers in fp32 (amp=False) instead of emulated bf16 autocast",
        "llmcompressor",
        LLMC,
        None,
        "on only without an accelerator",
        "tests/engine/test_search_stage.py::test_new_recipes_write_checkpoints_that_reload",
    ),
    Replacement(
        "llmcompressor.modifiers.autoround.base.AutoRoundModifier._postprocess_qparams",
        "llmc.autoround_zero_points",
        "asymmetric AutoRound's tuned zero points saved (upstream keeps zeros), in compressed-tensors' signed grid",
        "llmcompressor",
        LLMC,
        ("self", "model", "llmc_registered_qparams"),
        "none: without it an asymmetric grid is saved with zero points of 0",
        "tests/engine/test_search_stage.py::test_asymmetric_autoround_saves_the_grid_it_tuned",
    ),
    Replacement(
        "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.eager",
        "llmc.calibration_sdpa",
        "calibration's forced eager attention run through SDPA where it is the same computation",
        "transformers",
        TRANSFORMERS,
        None,
        "resources.calibration_attention: eager",
        "tests/engine/test_attention.py, tests/gpu/test_gpu_attention.py",
    ),
    Replacement(
        "transformers.modeling_utils.safe_save_file",
        "llmc.parallel_shard_writes",
        "checkpoint shards written in parallel through pinned buffers",
        "transformers",
        TRANSFORMERS,
        ("tensors", "filename", "metadata"),
        "none: byte-equal files",
        "tests/engine/test_shard_writes.py",
    ),
    Replacement(
        "llmcompressor.transformers.compression.compressed_tensors_utils.is_source_process",
        "distributed.split_save",
        "every data-parallel rank writes its share of the shards",
        "compressed-tensors",
        CT,
        (),
        "ranks without a shared directory: rank 0 writes all",
        "tests/engine/test_ranksave.py",
    ),
    Replacement(
        "transformers.modeling_utils.safe_open",
        "distributed.split_load",
        "each data-parallel rank reads its share of the checkpoint, the rest broadcast",
        "transformers",
        TRANSFORMERS,
        ("filename", "framework", "device"),
        "whole read for quantized checkpoints",
        "tests/engine/test_splitload.py",
    ),
    Replacement(
        "compressed_tensors.compressors.model_compressors.model_compressor.ModelCompressor.compress_model",
        "llmc.swap",
        "timed only (seconds_save_compress); the call itself is upstream's",
        "compressed-tensors",
        CT,
        None,
        "none: nothing replaced",
        "tests/core/test_swap.py",
    ),
)
BY_KEY = {r.key: r for r in REPLACEMENTS}


UPSTREAM = ("llmcompressor", "compressed_tensors", "transformers", "safetensors", "torch")


def key_of(owner: Any, name: str) -> str | None:
    """`owner.name` as the table keys it, or None when `owner` is not upstream code (farm's own objects, which
    the swap mechanism also serves, need no listing)."""
    if inspect.ismodule(owner):
        module = owner.__name__
    elif isinstance(owner, type):
        module = f"{owner.__module__}.{owner.__qualname__}"
    else:
        return None
    return f"{module}.{name}" if module.split(".")[0] in UPSTREAM else None


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def refusal(rep: Replacement, original: Any = None) -> str | None:
    """Why `rep` must not apply here (None: it may): an unchecked upstream version, or a replaced function
    whose parameters are no longer the ones it was written for."""
    version = installed(rep.package)
    if version not in rep.checked and os.environ.get(UNCHECKED_ENV) != "1":
        return (
            f"{rep.package} {version} is not a version farm's {rep.farm} was checked against "
            f"({', '.join(rep.checked)}); set {UNCHECKED_ENV}=1 to apply it while checking one"
        )
    if rep.parameters is not None and original is not None and callable(original):
        try:
            have = tuple(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            return None
        missing = [p for p in rep.parameters if p not in have]
        if missing:
            return f"{rep.key} no longer takes {', '.join(missing)}"
    return None


def guard(owner: Any, name: str, original: Any = None) -> bool:
    """Whether farm may replace `owner.name` now; a refusal is logged (upstream's own code then runs). A
    replacement missing from the table is a bug of farm's: it raises."""
    key = key_of(owner, name)
    return True if key is None else guard_key(key, original)


def guard_key(key: str, original: Any = None) -> bool:
    rep = BY_KEY.get(key)
    if rep is None:
        raise KeyError(f"{key} is replaced but not listed in farm.stages.llmc.registry.REPLACEMENTS")
    why = refusal(rep, original)
    if why:
        log.warning("%s is off: %s", rep.what, why)
        return False
    return True


def markdown() -> str:
    """The table docs/DESIGN.md holds (a test keeps the two equal)."""
    rows = [
        "| replaces | farm | what it does instead | checked on | switch | equivalence test |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{r.key}` | `{r.farm}` | {r.what} | {r.package} {', '.join(r.checked)} | {r.switch} | {r.test} |"
        for r in REPLACEMENTS
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
