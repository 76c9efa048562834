"""The promotion gate: an evaluation matrix (metric, comparison, threshold, required or advisory) applied to a
variant's metrics and its base's, giving a decision with reasons. Pure: no MLflow, no torch."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from farm.serving import measure as serving
from farm.spec import EvaluationSpec, GateRule

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
}


FARM_TASKS = {
    "shakespeare_next_line": "task_shakespeare_next_line_acc",
    "shakespeare_last_word": "task_shakespeare_last_word_exact_match_first_word",
}


def default_rules(ev: EvaluationSpec) -> list[GateRule]:
    """farm's matrix for the checks a job enables: quality and safety are required, speed and similarity
    advisory (a quantized model on CPU can be slower and still be the right one to ship). With the serving check
    on, speed and memory are judged on its figures (throughput at the lowest and highest concurrency, weights on
    the GPU), never on the dense reference checks."""
    limit = ev.thresholds.max_perplexity_delta
    rules = [GateRule(metric="perplexity", op="<=", threshold=0.5 if limit is None else limit, versus_base="delta")]
    if ev.outputs:
        rules += [
            GateRule(metric="determinism", op=">=", threshold=1.0),
            GateRule(metric="reference_similarity", op=">=", threshold=0.8, required=False),
        ]
    if ev.safety:
        rules += [
            GateRule(metric="refusal_accuracy", op=">=", threshold=-0.1, versus_base="delta"),
            GateRule(metric="toxicity", op="<=", threshold=0.05, versus_base="delta"),
        ]
    if ev.serving:  # speed and memory as served; the dense reference checks never decide beside them
        shape = ev.serving.resolved_shapes()[0].name
        low, high = ev.serving.concurrency[0], ev.serving.concurrency[-1]
        rules += [
            GateRule(
                metric=serving.level_name(shape, low, "output_tokens_per_s"),
                op=">=",
                threshold=0.9,
                versus_base="ratio",
                required=False,
            )
        ]
        if high != low:
            rules += [
                GateRule(
                    metric=serving.level_name(shape, high, "output_tokens_per_s"),
                    op=">=",
                    threshold=0.8,
                    versus_base="ratio",
                    required=False,
                )
            ]
        rules += [GateRule(metric=serving.WEIGHTS, op="<=", threshold=1.0, versus_base="ratio", required=False)]
    else:
        if ev.latency:
            rules += [
                GateRule(metric="tokens_per_s_batch1", op=">=", threshold=0.5, versus_base="ratio", required=False)
            ]
        if ev.memory:
            rules += [
                GateRule(metric="weights_in_memory_bytes", op="<=", threshold=1.0, versus_base="ratio", required=False)
            ]
    if ev.speculative:
        rules += [GateRule(metric="spec_acceptance", op=">=", threshold=0.5, required=False)]
    if ev.kv_cache:
        rules += [GateRule(metric="kv_fp8_similarity", op=">=", threshold=0.8, required=False)]
    rules += [
        GateRule(
            metric=f"adapter_{a.name}_perplexity",
            op="<=",
            threshold=0.5 if limit is None else limit,
            versus_base="delta",
        )
        for a in ev.adapters
    ]  # the adapter must survive quantization too
    if ev.tasks:  # farm's own tasks; rules for your tasks go in the job's matrix
        rules += [
            GateRule(metric=FARM_TASKS[name], op=">=", threshold=0.97, versus_base="ratio")
            for name in ev.tasks.names
            if name in FARM_TASKS
        ]
    return rules


@dataclass
class Decision:
    outcome: str  # "promoted" | "rejected"
    reasons: list[str] = field(default_factory=list)  # failed required rules
    warnings: list[str] = field(default_factory=list)  # failed advisory rules
    rows: list[dict[str, object]] = field(default_factory=list)  # the matrix as evaluated


def _value(rule: GateRule, variant: Mapping[str, float], base: Mapping[str, float]) -> float | None:
    v = variant.get(rule.metric)
    if v is None:
        return None
    if rule.versus_base == "none":
        return v
    b = base.get(rule.metric)
    if b is None:
        return None
    if rule.versus_base == "delta":
        return v - b
    if b == 0:  # x% of nothing: equal is 1.0, anything more is infinitely more
        return 1.0 if v == 0 else float("inf") if v > 0 else float("-inf")
    return v / b


def describe(rule: GateRule) -> str:
    what = {"none": rule.metric, "delta": f"{rule.metric} - base", "ratio": f"{rule.metric} / base"}[rule.versus_base]
    return f"{what} {rule.op} {rule.threshold:g}"


def decide(rules: Sequence[GateRule], variant: Mapping[str, float], base: Mapping[str, float]) -> Decision:
    """Every rule is evaluated; a required rule that fails, or whose metric is missing, rejects."""
    d = Decision("promoted")
    for rule in rules:
        value = _value(rule, variant, base)
        ok = value is not None and OPS[rule.op](value, rule.threshold)
        d.rows.append({"rule": describe(rule), "value": value, "passed": ok, "required": rule.required})
        if ok:
            continue
        why = f"{describe(rule)}: " + ("metric missing" if value is None else f"{value:.4g}")
        (d.reasons if rule.required else d.warnings).append(why)
    if d.reasons:
        d.outcome = "rejected"
    return d


def aliases(
    promoted: Sequence[tuple[str, str, float]], prefix: str, tiers: Mapping[str, Sequence[str]] | None = None
) -> dict[str, str]:
    """alias -> model version for one registered model (one base): `<prefix>-<label>` for every promoted
    variant, `<prefix>` alone for the smallest one, and `<prefix>-<tier>` for the smallest promoted variant of
    each tier (premium/bulk). `promoted` holds (label, version, weights_bytes)."""
    out = {f"{prefix}-{label}": version for label, version, _ in promoted}
    if promoted:
        out[prefix] = min(promoted, key=lambda p: p[2])[1]
    for tier, labels in (tiers or {}).items():
        members = [p for p in promoted if p[0] in labels]
        if members:
            out[f"{prefix}-{tier}"] = min(members, key=lambda p: p[2])[1]
    return out


def rungs(labels: Sequence[str], ladder: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """Method labels grouped into the order they run: the ladder's rungs; labels outside the ladder join the
    first rung. Without a ladder, one rung holds everything."""
    if not ladder:
        return [list(labels)]
    laddered = {x for rung in ladder for x in rung}
    out = [[x for x in labels if x in rung] for rung in ladder]
    out[0] = [x for x in labels if x not in laddered] + out[0]
    return out
