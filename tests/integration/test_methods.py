"""The newer methods through a real job (Ray, MLflow server, S3): mixed precision records its profile and
search, a recipe search its candidates as child runs, QAT its training, NF4 its bitsandbytes checkpoint, and a
LoRA adapter is judged on the base and on every variant (the QLoRA path), with the default gate holding each
adapter to the perplexity budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack, recorded
from tests.integration.test_end_to_end import farm

pytestmark = pytest.mark.integration


def test_mixed_qat_and_adapter_through_a_job(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    from farm.stages.checks.adapters import train_lora

    adapter = tmp_path / "adapter"
    train_lora(
        str(fixture_paths["tiny-llama"]),
        str(fixture_paths["shakespeare"] / "calibration.txt"),
        str(adapter),
        steps=4,
        seq_len=64,
        batch_size=2,
        learning_rate=1e-2,
    )
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[
            {
                "method": "mixed",
                "low": {"bits": 4, "group_size": 64},
                "budget": 1e9,
            },
            {
                "method": "search",
                "budget": 1e9,
                "candidates": [{"method": "rtn", "scheme": "W4A16", "group_size": 64}, {"method": "fp8"}],
                "vary": {"symmetric": [True, False]},
                "early_stop": False,
            },
            {"method": "qat", "group_size": 64, "steps": 3, "batch_size": 2, "train_samples": 8},
            {"method": "nf4"},
        ],
        tracking={"experiment": "methods", "registered_model_prefix": "methods-"},
        validation={"source": str(fixture_paths["validation"] / "validation.txt"), "max_tokens": 256, "seq_len": 128},
    )
    spec["evaluation"]["adapters"] = [{"name": "play", "source": str(adapter), "max_tokens": 256, "seq_len": 128}]
    spec["gate"] = {}
    res = farm(
        "run",
        str(write_spec(tmp_path / "job.yaml", spec)),
        "--ray-address",
        stack.ray_address,
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    client = MlflowClient(stack.mlflow_uri)
    base, runs = recorded(stack, "methods", key="farm.method")
    assert set(runs) == {"mixed", "search", "qat", "nf4"} and "adapter_play_perplexity" in base.data.metrics
    for r in runs.values():
        assert r.info.status == "FINISHED" and "adapter_play_perplexity" in r.data.metrics
        assert r.data.tags.get("farm.gate") in {"promoted", "rejected"}
    gate_rules = client.download_artifacts(runs["qat"].info.run_id, "gate.json", str(tmp_path))
    assert "adapter_play_perplexity" in Path(gate_rules).read_text()
    mixed = runs["mixed"]
    assert mixed.data.metrics["mixed.high_layers"] == 0 and "sensitivity.layer_001" in mixed.data.metrics
    files = {a.path for a in client.list_artifacts(mixed.info.run_id)}
    assert {"sensitivity.json", "mixed_search.json"} <= files
    exp = client.get_experiment_by_name("methods").experiment_id
    children = {
        r.data.tags["farm.label"]: r
        for r in client.search_runs([exp], "tags.`farm.role` = 'candidate'")
        if r.data.tags["mlflow.parentRunId"] == runs["search"].info.run_id
    }
    # every candidate built (no early stop), smallest first: the symmetric RTN grid wins a budget all of them meet
    assert sorted(children) == ["fp8-dynamic", "rtn-w4a16-g64.sf", "rtn-w4a16-g64.st"]
    status = {label: r.data.tags["farm.candidate_status"] for label, r in children.items()}
    assert status == {"rtn-w4a16-g64.st": "chosen", "rtn-w4a16-g64.sf": "passed", "fp8-dynamic": "passed"}
    assert all("validation_perplexity_delta" in r.data.metrics for r in children.values())
    search = runs["search"].data
    assert search.metrics["search.met"] == 1 and search.metrics["search.built"] == 3
    assert search.params["validation.max_tokens"] == "256" and "search.json" in {
        a.path for a in client.list_artifacts(runs["search"].info.run_id)
    }
    assert (
        len(
            [
                r
                for r in client.search_runs([exp], "tags.`farm.role` = 'candidate'")
                if r.data.tags["mlflow.parentRunId"] == mixed.info.run_id
            ]
        )
        == 1
    )  # one probe: uniform low met it
    assert "qat_losses.json" in {a.path for a in client.list_artifacts(runs["qat"].info.run_id)}
    assert runs["qat"].data.metrics["qat.steps"] == 3
    nf4 = json.loads(
        Path(client.download_artifacts(runs["nf4"].info.run_id, "model/config.json", str(tmp_path))).read_text()
    )
    assert nf4["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert runs["nf4"].data.tags["farm.model_version"]  # registered like every variant
