"""Runs the evaluation checks a job enables on one loaded model (and, for a variant, against its base).

The order matters: latency first (its cold number is the first request after load), then memory, outputs,
safety, and last the paired checks that need the base loaded beside the variant.
"""

from __future__ import annotations

import time
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


def enabled(ev: EvaluationSpec) -> bool:
    return any((ev.latency, ev.memory, ev.outputs, ev.safety, ev.speculative, ev.tasks, ev.kv_cache, ev.adapters))


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

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        value = fn()
        res.metrics[f"seconds_check_{name}"] = time.perf_counter() - t0
        return value

    if ev.latency:
        res.metrics |= timed("latency", lambda: benchmark.latency(model, tokenizer, ev.latency, device))
    if ev.memory:
        res.metrics |= timed("memory", lambda: benchmark.memory(model, tokenizer, ev.memory, device))
    greedy = None
    if ev.outputs:
        out = timed("outputs", lambda: behaviour.outputs(model, tokenizer, ev.outputs, device))
        res.metrics |= out["metrics"]
        greedy = out["greedy"]
        res.artifacts["reference_outputs.json"] = {
            "prompts": ev.outputs.prompts,
            "greedy": greedy,
            "sampled_twice": out["sampled"],
        }
    if ev.safety:
        s = timed("safety", lambda: behaviour.safety(model, tokenizer, ev.safety, device))
        res.metrics |= s["metrics"]
        res.artifacts["safety_transcript.json"] = s["transcript"]
    if ev.tasks:
        from farm.stages.checks.tasks import accuracy

        t = timed("tasks", lambda: accuracy(model, tokenizer, ev.tasks, device))
        res.metrics |= t["metrics"]
        res.artifacts["tasks.json"] = t["results"]
    if ev.kv_cache:
        from farm.stages.checks.kv_cache_ab import ab

        kv = timed("kv_cache", lambda: ab(model, tokenizer, ev.kv_cache, device))
        res.metrics |= kv["metrics"]
        res.artifacts["kv_cache_ab.json"] = kv["transcript"]
    if base_dir and (ev.outputs or ev.speculative):
        base = load_model(base_dir, device, trust_remote_code)
        if ev.outputs and greedy is not None:
            outputs = ev.outputs
            base_greedy = behaviour.complete(base, tokenizer, outputs.prompts, outputs.max_new_tokens, device)
            res.metrics |= timed("reference", lambda: behaviour.compare_outputs(greedy, base_greedy))
            res.artifacts["reference_outputs.json"]["base_greedy"] = base_greedy
        if ev.speculative:
            prompts = ev.outputs.prompts if ev.outputs else [ev.generation.prompt]
            spec = ev.speculative
            res.metrics |= timed(
                "speculative", lambda: behaviour.speculative(model, base, tokenizer, prompts, spec, device)
            )
        del base
    if ev.adapters:  # last: each adapter loads its own dense copy of the checkpoint
        from farm.stages.checks.adapters import evaluate_adapters

        res.metrics |= evaluate_adapters(model_dir, ev, trust_remote_code)
    return res
