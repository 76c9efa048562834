"""Planning: a validated spec plus the identities of its inputs -> the variants to build. Pure: no Ray, torch,
MLflow or I/O, so ids, dedup keys and validation are unit-testable.

A variant id hashes (model identity, method config, calibration identity); resume, dedup and the registry key
on it. A base evaluation id hashes (model identity, evaluation settings, held-out text).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from farm import resources
from farm.calibration import calibration_hash
from farm.errors import SpecError
from farm.methods import MethodConfig
from farm.packing import Shape
from farm.spec import JobSpec, ModelSpec

ID_LEN = 16


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:ID_LEN]


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs to know about a resolved model (filled by the driver from `sources`)."""

    identity: str
    config: dict[str, Any]
    weights_bytes: int


@dataclass(frozen=True)
class Calibration:
    source: str
    sha256: str
    num_samples: int
    max_seq_length: int
    seed: int

    @property
    def hash(self) -> str:
        return calibration_hash(self.sha256, self.num_samples, self.max_seq_length, self.seed)


@dataclass(frozen=True)
class Validation:
    """The job's validation text as a search or mixed variant is judged on it."""

    source: str
    sha256: str
    max_tokens: int
    seq_len: int

    def key(self) -> list[Any]:
        return ["validation", self.sha256, self.max_tokens, self.seq_len]


@dataclass(frozen=True)
class BaseEval:
    id: str
    model: ModelSpec
    model_name: str
    identity: str


@dataclass(frozen=True)
class Variant:
    id: str
    model: ModelSpec
    model_name: str
    identity: str
    method: MethodConfig
    calibration: Calibration
    resources: resources.Resources
    base_eval_id: str
    validation: Validation | None = None  # methods that choose between candidates (search, mixed)
    candidate_calibrations: tuple[Calibration, ...] = ()  # a search's draw per candidate, in its order

    @property
    def label(self) -> str:
        return f"{self.model_name}/{self.method.label()}"

    @property
    def artifact_key(self) -> tuple[str, str, str]:
        return (self.model_name, self.method.label(), self.id)


@dataclass(frozen=True)
class Plan:
    job_name: str
    job_id: str
    variants: tuple[Variant, ...]
    base_evals: tuple[BaseEval, ...]
    shapes: Mapping[str, Shape] = field(default_factory=dict)  # model identity -> what GPU packing estimates from


def _calibration_for(spec: JobSpec, method: MethodConfig, text_shas: Mapping[str, str]) -> Calibration:
    over = method.calibration
    name = over.set if over and over.set else ""
    cal = spec.calibration_sets[name] if name else spec.calibration
    if name not in text_shas:
        raise SpecError(f"calibration set {name or '(job default)'} was not hashed")
    return Calibration(
        source=cal.source,
        sha256=text_shas[name],
        num_samples=(over.num_samples if over and over.num_samples else cal.num_samples),
        max_seq_length=(over.max_seq_length if over and over.max_seq_length else cal.max_seq_length),
        seed=cal.seed,
    )


def merged_identity(base_identity: str, adapter_sha: str) -> str:
    """A base with a LoRA adapter merged in is another model: its own identity, base and adapter both named."""
    return f"{base_identity}+lora:{adapter_sha[:16]}"


def make_plan(
    spec: JobSpec,
    models: dict[str, ModelInfo],
    calibration_sha: str | Mapping[str, str],
    heldout_sha: str,
    adapter_shas: Mapping[str, str] | None = None,
    validation_sha: str | None = None,
) -> Plan:
    """`models` maps each model's display name to its resolved info; `calibration_sha` is the content hash of
    the job's calibration text, or a map of set name -> hash ("" = the job's own); `validation_sha` that of the
    job's validation text. Raises SpecError on any mismatch."""
    shas = {"": calibration_sha} if isinstance(calibration_sha, str) else dict(calibration_sha)
    ev = spec.evaluation
    eval_key: list[Any] = [ev.perplexity.model_dump(exclude={"source"}), heldout_sha, ev.generation.model_dump()]
    checks = ev.model_dump(
        mode="json", include={"latency", "memory", "outputs", "safety", "speculative", "tasks", "kv_cache"}
    )
    if any(checks.values()):  # jobs without checks keep the ids they always had
        eval_key.append(checks)
    if ev.serving:  # measured by the serving engine: a new judgement, new ids
        eval_key.append({"serving": ev.serving.identity()})
    if ev.adapters:  # an adapter is judged by its content, not its path
        eval_key.append(
            [[a.model_dump(exclude={"source"}), (adapter_shas or {}).get(a.name, a.source)] for a in ev.adapters]
        )
    validation = None
    if spec.validation is not None:
        if validation_sha is None:
            raise SpecError("the validation text was not hashed")
        validation = Validation(
            spec.validation.source, validation_sha, spec.validation.max_tokens, spec.validation.seq_len
        )
    variants, bases = [], []
    for mi, model in enumerate(spec.models):
        name = model.display_name()
        info = models.get(name)
        if info is None:
            raise SpecError(f"models.{mi}: {model.source} was not resolved")
        base_id = _hash("base", info.identity, eval_key)
        bases.append(BaseEval(base_id, model, name, info.identity))
        for ki, method in enumerate(spec.methods):
            problems = method.check_model(info.config)
            if problems:
                raise SpecError(f"methods.{ki} ({method.label()}) on model {name}: {problems[0]}")
            cal = _calibration_for(spec, method, shas)
            cal_id = cal.hash if method.requires_calibration else "data-free"
            res = resources.request(
                spec.resources.num_gpus,
                spec.resources.num_cpus,
                spec.resources.memory_gb,
                info.weights_bytes,
                cal.num_samples,
                cal.max_seq_length,
                int(info.config.get("hidden_size") or 0),
            )
            res = replace(
                res,
                gptq_hessian=spec.resources.gptq_hessian,
                gptq_inverse=spec.resources.gptq_inverse,
                calibration_attention=spec.resources.calibration_attention,
                gptq_broadcast=spec.resources.gptq_broadcast,
                gpu_memory_bytes=int((spec.resources.gpu_memory_gb or 0) * resources.GIB),
            )
            if spec.resources.ranks > 1 and not method.distributable:
                raise SpecError(
                    f"methods.{ki} ({method.label()}): {method.method} runs in one process; "
                    f"resources.ranks must be 1 (got {spec.resources.ranks})"
                )
            if method.requires_calibration and spec.resources.ranks > 1:
                # each rank holds a layer's activations for its share only; the checkpoint is shared on the host
                res = replace(res, ranks=spec.resources.ranks)
            elif getattr(method, "engine", "") == "model_free" and spec.resources.ranks > 1:
                # one worker holding `ranks` GPUs: model_free_ptq spreads the shards over them
                res = replace(res, num_gpus=res.num_gpus * spec.resources.ranks)
            key: list[Any] = ["variant", info.identity, method.config_hash(), cal_id]  # ranks change speed, not output
            drawn = tuple(_calibration_for(spec, c, shas) for c in method.candidate_methods())
            if drawn:  # a search: what each candidate reads is part of what it builds
                key.append(
                    [
                        c.hash if m.requires_calibration else "data-free"
                        for c, m in zip(drawn, method.candidate_methods(), strict=True)
                    ]
                )
            if method.uses_validation:  # which candidate wins depends on the text that judges them
                if validation is None:
                    raise SpecError(f"methods.{ki} ({method.label()}): needs the job's validation text")
                key.append(validation.key())
            vid = _hash(*key)
            variants.append(
                Variant(
                    vid,
                    model,
                    name,
                    info.identity,
                    method,
                    cal,
                    res,
                    base_id,
                    validation if method.uses_validation else None,
                    drawn,
                )
            )
    ids = [v.id for v in variants]
    job_id = _hash("job", spec.name, sorted(ids))
    shapes = {info.identity: Shape.of(info.config, info.weights_bytes) for info in models.values()}
    return Plan(spec.name, job_id, tuple(variants), tuple(bases), shapes)
