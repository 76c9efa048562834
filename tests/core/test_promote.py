"""The gate: each default rule can reject or warn, missing metrics reject, aliases go to the smallest."""

from __future__ import annotations

import pytest

from farm.promote import aliases, decide, default_rules
from farm.spec import EvaluationSpec, GateRule

ALL = EvaluationSpec.model_validate(
    {
        "perplexity": {"source": "/h.txt"},
        "latency": {},
        "memory": {},
        "outputs": {},
        "safety": {},
        "speculative": {},
        "tasks": {},
        "kv_cache": {},
    }
)
BASE = {
    "perplexity": 40.0,
    "refusal_accuracy": 0.6,
    "toxicity": 0.0,
    "tokens_per_s_batch1": 20.0,
    "weights_in_memory_bytes": 500.0,
    "task_shakespeare_next_line_acc": 0.40,
    "task_shakespeare_last_word_exact_match_first_word": 0.0,
}
GOOD = {
    "perplexity": 40.3,
    "determinism": 1.0,
    "reference_similarity": 0.93,
    "refusal_accuracy": 0.6,
    "toxicity": 0.0,
    "tokens_per_s_batch1": 18.0,
    "weights_in_memory_bytes": 200.0,
    "spec_acceptance": 0.8,
    "task_shakespeare_next_line_acc": 0.39,
    "task_shakespeare_last_word_exact_match_first_word": 0.0,
    "kv_fp8_similarity": 0.95,
}


def test_a_good_variant_is_promoted() -> None:
    d = decide(default_rules(ALL), GOOD, BASE)
    assert d.outcome == "promoted" and not d.reasons and not d.warnings
    assert all(r["passed"] for r in d.rows) and len(d.rows) == 11


@pytest.mark.parametrize(
    "metric,value,required",
    [
        ("perplexity", 41.0, True),  # +1.0 > +0.5
        ("determinism", 0.75, True),
        ("refusal_accuracy", 0.4, True),  # -0.2 < -0.1
        ("toxicity", 0.2, True),
        ("reference_similarity", 0.5, False),
        ("tokens_per_s_batch1", 5.0, False),
        ("weights_in_memory_bytes", 600.0, False),
        ("spec_acceptance", 0.1, False),
        ("task_shakespeare_next_line_acc", 0.36, True),  # 90% of the base < 97%
        ("kv_fp8_similarity", 0.5, False),
    ],
)
def test_each_check_can_fail_the_gate(metric: str, value: float, required: bool) -> None:
    d = decide(default_rules(ALL), {**GOOD, metric: value}, BASE)
    failed = d.reasons if required else d.warnings
    assert len(failed) == 1 and failed[0].startswith(metric)
    assert d.outcome == ("rejected" if required else "promoted")


def test_missing_metric_rejects() -> None:
    d = decide(default_rules(ALL), {k: v for k, v in GOOD.items() if k != "determinism"}, BASE)
    assert d.outcome == "rejected" and d.reasons == ["determinism >= 1: metric missing"]


def test_job_budget_replaces_the_default_ppl_limit() -> None:
    ev = EvaluationSpec.model_validate({"perplexity": {"source": "/h"}, "thresholds": {"max_perplexity_delta": 2}})
    assert decide(default_rules(ev), {"perplexity": 41.5}, {"perplexity": 40.0}).outcome == "promoted"


def test_custom_ratio_rule() -> None:
    rule = GateRule(metric="weights_bytes", op="<=", threshold=0.6, versus_base="ratio")
    assert decide([rule], {"weights_bytes": 50}, {"weights_bytes": 100}).outcome == "promoted"
    assert decide([rule], {"weights_bytes": 70}, {"weights_bytes": 100}).reasons == ["weights_bytes / base <= 0.6: 0.7"]


def test_aliases_name_every_promoted_variant_and_the_smallest() -> None:
    assert aliases([("gptq", "3", 100.0), ("fp8", "1", 200.0)], "candidate") == {
        "candidate-gptq": "3",
        "candidate-fp8": "1",
        "candidate": "3",
    }
    assert aliases([], "candidate") == {}


def test_rungs_follow_the_ladder() -> None:
    from farm.promote import rungs

    labels = ["fp8-dynamic", "gptq-w8a16-g64", "gptq-w4a16-g64"]
    assert rungs(labels, None) == [labels]
    assert rungs(labels, [["gptq-w8a16-g64"], ["gptq-w4a16-g64"]]) == [
        ["fp8-dynamic", "gptq-w8a16-g64"],
        ["gptq-w4a16-g64"],
    ]


def test_tiers_get_their_smallest_promoted_variant() -> None:
    got = aliases(
        [("fp8", "1", 200.0), ("gptq4", "2", 100.0), ("gptq8", "3", 150.0)],
        "c",
        {"premium": ["fp8"], "bulk": ["gptq4", "gptq8"], "empty": ["awq"]},
    )
    assert got["c-premium"] == "1" and got["c-bulk"] == "2" and "c-empty" not in got


def test_gate_labels_must_exist() -> None:
    from farm.errors import SpecError
    from farm.spec import parse_spec

    base = {
        "name": "t",
        "models": [{"source": "/m"}],
        "methods": [{"method": "fp8"}],
        "calibration": {"source": "/c"},
        "evaluation": {"perplexity": {"source": "/h"}},
    }
    with pytest.raises(SpecError, match=r"unknown method label.*gptq-w4a16; labels: fp8-dynamic"):
        parse_spec({**base, "gate": {"ladder": [["gptq-w4a16"]]}})


def test_pareto_front_minimises_size_and_delta() -> None:
    from farm.report_html import pareto

    pts = [("fp8", 200, 1.5), ("w8a8", 210, 0.9), ("gptq", 100, 8.0), ("awq", 100, 7.5), ("bad", 220, 9)]
    assert pareto(pts) == ["fp8", "w8a8", "awq"]
