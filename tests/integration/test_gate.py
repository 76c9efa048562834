"""The evaluation matrix end to end against real servers: every check runs for the base and each variant and
lands in MLflow as metrics and artifacts; the gate's decision and reasons are tags on each run and model
version; promoted variants get registry aliases; `farm promote` moves an alias by hand, with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack, recorded
from tests.integration.test_end_to_end import farm

pytestmark = pytest.mark.integration

CHECKS = {
    "latency": {"prompt_tokens": 32, "new_tokens": 8, "batch_size": 4, "repeats": 2},
    "memory": {"budget_gb": 0.25, "context": 128, "max_batch": 32, "max_context": 512},
    "outputs": {"max_new_tokens": 12},
    "safety": {"max_new_tokens": 16},
    "speculative": {"max_new_tokens": 12},
    "tasks": {"limit": 10},
    "kv_cache": {"turns": ["Hello", "Tell me more", "Why?"], "max_new_tokens": 6},
}
PER_CHECK = {
    "latency": ["ttft_cold_s", "ttft_warm_s", "tokens_per_s_batch1", "tokens_per_s_batch4"],
    "memory": ["weights_in_memory_bytes", "peak_generation_bytes", "max_batch_at_128", "max_context_batch1"],
    "outputs": ["determinism"],
    "safety": ["refusal_accuracy", "toxicity"],
    "tasks": ["task_shakespeare_next_line_acc", "task_shakespeare_last_word_exact_match_first_word"],
    "kv_cache": ["kv_fp8_exact_match", "kv_fp8_similarity"],
}
PAIRED = ["reference_exact_match", "reference_similarity", "spec_acceptance"]


def test_checks_gate_aliases_and_manual_promotion(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "gptq", "group_size": 64}, {"method": "fp8"}],
        tracking={"experiment": "gate", "registered_model_prefix": "gate-"},
    )
    spec["evaluation"] |= {**CHECKS, "tasks": {**CHECKS["tasks"], "data_dir": str(fixture_paths["tasks"])}}
    # GPTQ lowers this random-init model's perplexity, FP8 raises it a little: one passes, one fails
    spec["gate"] = {
        "rules": [
            {"metric": "perplexity", "op": "<=", "threshold": 0, "versus_base": "delta"},
            {"metric": "determinism", "op": ">=", "threshold": 1},
            {"metric": "spec_acceptance", "op": ">=", "threshold": 0.999, "required": False},
        ]
    }
    path = write_spec(tmp_path / "job.yaml", spec)
    res = farm(
        "run",
        str(path),
        "--ray-address",
        stack.ray_address,
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    client = MlflowClient(stack.mlflow_uri)
    base, variants = recorded(stack, "gate")
    for names in PER_CHECK.values():
        for m in names:
            assert m in base.data.metrics and all(m in v.data.metrics for v in variants.values()), m
    for v in variants.values():
        assert all(m in v.data.metrics for m in PAIRED)
        assert 0 <= v.data.metrics["spec_acceptance"] <= 1 and v.data.metrics["max_batch_at_128"] >= 1
        files = {a.path for a in client.list_artifacts(v.info.run_id, "checks")}
        assert files == {
            "checks/reference_outputs.json",
            "checks/safety_transcript.json",
            "checks/tasks.json",
            "checks/kv_cache_ab.json",
        }

    gptq, fp8 = variants["gptq-w4a16-g64"], variants["fp8-dynamic"]
    assert gptq.data.tags["farm.gate"] == "promoted"
    assert fp8.data.tags["farm.gate"] == "rejected" and "perplexity - base <= 0" in fp8.data.tags["farm.gate_reasons"]
    gate = json.loads(Path(client.download_artifacts(fp8.info.run_id, "gate.json", str(tmp_path))).read_text())
    assert gate["decision"] == "rejected" and len(gate["matrix"]) == 3
    model = client.get_registered_model("gate-tiny-llama")
    promoted = gptq.data.tags["farm.model_version"]
    assert model.aliases == {"candidate": promoted, "candidate-gptq-w4a16-g64": promoted}
    assert client.get_model_version("gate-tiny-llama", fp8.data.tags["farm.model_version"]).tags["gate"] == "rejected"

    # a person promotes the candidate to production, with a reason
    res = farm(
        "promote",
        "gate-tiny-llama",
        "@candidate",
        "--alias",
        "production-int4",
        "--reason",
        "signed off by the eval team",
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    version = client.get_model_version_by_alias("gate-tiny-llama", "production-int4")
    assert version.version == promoted and version.tags["promotion_reason"] == "signed off by the eval team"
    record = json.loads(client.get_run(gptq.info.run_id).data.tags["farm.manual_promotion"])
    assert record["alias"] == "production-int4"
    bad = farm(
        "promote",
        "gate-tiny-llama",
        "99",
        "--alias",
        "x",
        "--reason",
        "r",
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert bad.returncode == 3 and bad.stderr.startswith("farm: error: no model version")

    # the nightly rebuild (another calibration draw) is diffed against what @candidate ships
    spec["methods"] = [{"method": "gptq", "group_size": 64}]
    spec["calibration"]["seed"] = 1
    spec["evaluation"] = {k: v for k, v in spec["evaluation"].items() if k in {"perplexity", "generation", "outputs"}}
    spec["gate"] = {"rules": spec["gate"]["rules"][:2]}
    res = farm(
        "run",
        str(write_spec(tmp_path / "nightly.yaml", spec)),
        "--ray-address",
        stack.ray_address,
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    newest = client.search_runs(
        [client.get_experiment_by_name("gate").experiment_id],
        "tags.`farm.role` = 'variant'",
        order_by=["attributes.start_time DESC"],
    )[0]
    assert newest.data.tags["farm.promoted_run"] == gptq.info.run_id
    assert 0 <= newest.data.metrics["promoted_exact_match"] <= 1
    diff = json.loads(
        Path(client.download_artifacts(newest.info.run_id, "checks/diff_vs_promoted.json", str(tmp_path))).read_text()
    )
    assert len(diff) == 8 and {"prompt", "promoted", "this", "same"} <= set(diff[0])


def test_ladder_stops_at_the_first_rung_that_fails(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "gptq", "scheme": "W8A16", "group_size": 64}, {"method": "gptq", "group_size": 64}],
        tracking={"experiment": "ladder", "registered_model_prefix": "ladder-"},
    )
    # an SLO the INT8 rung cannot meet: the 4-bit rung must not be built at all
    spec["gate"] = {
        "ladder": [["gptq-w8a16-g64"], ["gptq-w4a16-g64"]],
        "rules": [{"metric": "perplexity", "op": "<=", "threshold": -1e9, "versus_base": "delta"}],
    }
    path = write_spec(tmp_path / "job.yaml", spec)
    res = farm(
        "run",
        str(path),
        "--ray-address",
        stack.ray_address,
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gptq-w4a16-g64: skipped (ladder stopped: gptq-w8a16-g64 was rejected)" in res.stdout
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("ladder")
    runs = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")
    assert [r.data.tags["farm.label"] for r in runs] == ["gptq-w8a16-g64"]
    assert runs[0].data.tags["farm.gate"] == "rejected"
    assert client.get_registered_model("ladder-tiny-llama").aliases == {}


def test_report_renders_in_a_headless_browser(stack: Stack, stack_env: dict, tmp_path: Path) -> None:
    """Runs after the gate test (same experiment): the HTML report of that job, rendered by Chromium."""
    from PIL import Image

    from tests.browser import render

    out = tmp_path / "report.html"
    res = farm("report", "gate", "--out", str(out), "--tracking-uri", stack.mlflow_uri, env=stack_env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    shot, dom = render(out, tmp_path)
    assert 'id="plot-size-ppl"' in dom and 'id="plot-speed-quality"' in dom and dom.count("<svg") >= 2
    assert "gptq-w4a16-g64" in dom and "promoted" in dom and "rejected" in dom and "Pareto front" in dom
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 1800) and len(image.getcolors(maxcolors=1 << 20) or []) > 50  # not blank
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("gate")
    parent = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'job'")[0]
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
