"""Runs the evaluation checks a job enables on one loaded model (and, for a variant, against its base).

Every check is one entry of `CHECKS`: its name (the `seconds_check_<name>` metric), the `evaluation:` setting that
enables it, and a function from the loaded model to what it found. Adding a check is a setting in `farm.spec`, a
function in a module of this package, and one entry here; nothing else names it.

The order of `CHECKS` is the order they run, and it matters: latency first (its cold number is the first request
after load), then memory, outputs, safety, tasks and the KV-cache A/B; then the paired checks that need the base
loaded beside the variant; adapters last (each loads its own dense copy of the checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from farm.spec import EvaluationSpec
from farm.stages.checks import behaviour
from farm.stages.checks import dense_reference as benchmark
from farm.stages.modelio import load_model, load_tokenizer, pick_device


@dataclass
class ChecksResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> JSON-able content
    tags: dict[str, str] = field(default_factory=dict)  # names under farm.


@dataclass
class Loaded:
    """What a check runs on: the model under test, its tokenizer and device, and its base (loaded on first use)."""

    model: Any
    tokenizer: Any
    device: str
    model_dir: str
    ev: EvaluationSpec
    base_dir: str | None
    trust_remote_code: bool
    result: ChecksResult  # what the checks before this one found (outputs' greedy text, for the reference)
    _base: Any = None

    def base(self) -> Any:
        if self._base is None:
            if self.base_dir is None:
                raise ValueError("a paired check ran without a base model")
            self._base = load_model(self.base_dir, self.device, self.trust_remote_code)
        return self._base


@dataclass(frozen=True)
class Check:
    name: str
    setting: Callable[[EvaluationSpec], Any]  # the check's settings, falsy when the job does not ask for it
    run: Callable[[Loaded, Any], ChecksResult]  # metrics and artifacts it adds
    paired: bool = False  # compares against the base: runs only for a variant


def _metrics(fn: Callable[[Any, Any, Any, str], dict[str, float]]) -> Callable[[Loaded, Any], ChecksResult]:
    return lambda m, cfg: ChecksResult(fn(m.model, m.tokenizer, cfg, m.device))


def _with_document(
    fn: Callable[[Any, Any, Any, str], dict[str, Any]], key: str, file: str
) -> Callable[[Loaded, Any], ChecksResult]:
    def run(m: Loaded, cfg: Any) -> ChecksResult:
        out = fn(m.model, m.tokenizer, cfg, m.device)
        return ChecksResult(out["metrics"], {file: out[key]})

    return run


def _outputs(m: Loaded, cfg: Any) -> ChecksResult:
    out = behaviour.outputs(m.model, m.tokenizer, cfg, m.device)
    document = {"prompts": cfg.prompts, "greedy": out["greedy"], "sampled_twice": out["sampled"]}
    return ChecksResult(out["metrics"], {"reference_outputs.json": document})


def _reference(m: Loaded, cfg: Any) -> ChecksResult:
    """The variant's greedy outputs against the base's on the same prompts."""
    document = m.result.artifacts.get("reference_outputs.json")
    if document is None or document["greedy"] is None:
        return ChecksResult()
    base_greedy = behaviour.complete(m.base(), m.tokenizer, cfg.prompts, cfg.max_new_tokens, m.device)
    document["base_greedy"] = base_greedy
    return ChecksResult(behaviour.compare_outputs(document["greedy"], base_greedy))


def _speculative(m: Loaded, cfg: Any) -> ChecksResult:
    prompts = m.ev.outputs.prompts if m.ev.outputs else [m.ev.generation.prompt]
    return ChecksResult(behaviour.speculative(m.model, m.base(), m.tokenizer, prompts, cfg, m.device))


def _tasks(m: Loaded, cfg: Any) -> ChecksResult:
    from farm.stages.checks.tasks import accuracy

    return _with_document(accuracy, "results", "tasks.json")(m, cfg)


def _kv_cache(m: Loaded, cfg: Any) -> ChecksResult:
    from farm.stages.checks.kv_cache_ab import ab

    return _with_document(ab, "transcript", "kv_cache_ab.json")(m, cfg)


def _adapters(m: Loaded, cfg: Any) -> ChecksResult:
    from farm.stages.checks.adapters import evaluate_adapters

    return ChecksResult(evaluate_adapters(m.model_dir, m.ev, m.trust_remote_code))


CHECKS: tuple[Check, ...] = (
    Check("latency", lambda ev: ev.latency, _metrics(benchmark.latency)),
    Check("memory", lambda ev: ev.memory, _metrics(benchmark.memory)),
    Check("outputs", lambda ev: ev.outputs, _outputs),
    Check("safety", lambda ev: ev.safety, _with_document(behaviour.safety, "transcript", "safety_transcript.json")),
    Check("tasks", lambda ev: ev.tasks, _tasks),
    Check("kv_cache", lambda ev: ev.kv_cache, _kv_cache),
    Check("reference", lambda ev: ev.outputs, _reference, paired=True),
    Check("speculative", lambda ev: ev.speculative, _speculative, paired=True),
    Check("adapters", lambda ev: ev.adapters, _adapters),
)


def enabled(ev: EvaluationSpec) -> bool:
    return any(check.setting(ev) for check in CHECKS)


def run_checks(
    model_dir: str,
    ev: EvaluationSpec,
    base_dir: str | None = None,
    trust_remote_code: bool = False,
    loaded: tuple[Any, Any] | None = None,
) -> ChecksResult:
    """`loaded` = (model, tokenizer) already in memory (loaded once for evaluation and checks); call this
    before anything else runs on it, so the cold latency is the first request after load."""
    device = pick_device()
    tokenizer = loaded[1] if loaded else load_tokenizer(model_dir, trust_remote_code)
    model = loaded[0] if loaded else load_model(model_dir, device, trust_remote_code)
    res = ChecksResult()
    m = Loaded(model, tokenizer, device, model_dir, ev, base_dir, trust_remote_code, res)
    for check in CHECKS:
        cfg = check.setting(ev)
        if not cfg or (check.paired and not base_dir):
            continue
        t0 = time.perf_counter()
        found = check.run(m, cfg)
        res.metrics |= found.metrics
        res.metrics[f"seconds_check_{check.name}"] = time.perf_counter() - t0
        res.artifacts |= found.artifacts
        res.tags |= found.tags
    m._base = None  # the base's memory goes back before the caller's next step
    return res
