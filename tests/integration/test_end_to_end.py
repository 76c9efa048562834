"""A small job (tiny Llama x four methods) through the real CLI against a real Ray cluster, MLflow server
and S3 server; checked through their own clients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import BUCKET, Stack, s3fs_client

pytestmark = pytest.mark.integration


def farm(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_job_end_to_end(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "job.yaml",
        tiny_spec(
            fixture_paths, f"s3://{BUCKET}/variants", tracking={"experiment": "e2e", "registered_model_prefix": "e2e-"}
        ),
    )
    args = ["run", str(spec), "--ray-address", stack.ray_address, "--tracking-uri", stack.mlflow_uri]
    first = farm(*args, env=stack_env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    for label in ("gptq-w4a16-g64", "awq-w4a16-g64", "fp8-dynamic", "smoothquant-w8a8-gptq"):
        assert f"tiny-llama/{label}: built" in first.stdout
    summary = next(x for x in first.stdout.splitlines() if x.startswith("job ") and "(preflight " in x)
    assert all(f"{phase} " in summary for phase in ("preflight", "cluster", "tracking", "build", "finish")), summary

    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    parent = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'job'")[0]
    assert parent.info.status == "FINISHED"
    base = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'base'")
    assert len(base) == 1 and base[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    for r in runs:
        m = r.data.metrics
        assert m["perplexity"] > 1 and m["weights_bytes"] > 0 and "perplexity_delta" in m
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["method.method"] == r.data.tags["farm.method"]
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"manifest.json", "recipe.yaml", "model"} <= names
        if r.data.tags["farm.method"] != "fp8":  # what calibration saw: 4 windows x 64 tokens
            assert "calibration_report.json" in names and m["calibration_tokens"] == 256

    versions = client.search_model_versions("name = 'e2e-tiny-llama'")
    assert len(versions) == 4
    for v in versions:
        for tag in (
            "base_model_hash",
            "method",
            "recipe_hash",
            "calibration_hash",
            "date",
            "version.llmcompressor",
            "version.transformers",
            "version.torch",
        ):
            assert v.tags.get(tag), (tag, v.tags)

    fs = s3fs_client(stack)
    manifests = fs.glob(f"{BUCKET}/variants/tiny-llama/*/*/manifest.json")
    assert len(manifests) == 4
    manifest = json.loads(fs.cat(manifests[0]))
    assert manifest["model"]["identity"].startswith("sha256:") and manifest["versions"]["llmcompressor"]
    assert any(k.endswith(".safetensors") for k in manifest["files"])
    assert fs.glob(f"{BUCKET}/mlflow/**/model/model.safetensors"), "model not in MLflow's S3 artifact store"
    assert fs.glob(f"{BUCKET}/mlflow/**/model/config.json")

    # Re-running the same job builds nothing and registers nothing new.
    second = farm(*args, env=stack_env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "0 to build, 4 reused" in second.stdout
    assert "cluster 0.0," in second.stdout  # a recorded job connects to no cluster

    def ppl_and_delta(out: str, label: str) -> str:
        line = next(x for x in out.splitlines() if f"tiny-llama/{label}:" in x)
        return line.split(", ")[2]  # "ppl 123.45 (+0.67)"

    for label in ("gptq-w4a16-g64", "fp8-dynamic"):
        assert ppl_and_delta(first.stdout, label) == ppl_and_delta(second.stdout, label)
    assert len(client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")) == 4
    assert len(client.search_model_versions("name = 'e2e-tiny-llama'")) == 4
    parents = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'job'")
    assert len(parents) == 1 and parents[0].data.tags["farm.attempt"] == "2"  # one job, one parent run
    assert parents[0].info.status == "FINISHED"
    job_id = parents[0].data.tags["farm.job_id"]
    by_id = farm("compare", job_id, "--tracking-uri", stack.mlflow_uri, env=stack_env, cwd=tmp_path)
    assert by_id.returncode == 0 and by_id.stdout.count("tiny-llama") >= 4, by_id.stdout + by_id.stderr

    # The same checkpoint under another name is reused, and registered under that name too (once).
    renamed = tiny_spec(
        fixture_paths, f"s3://{BUCKET}/variants", tracking={"experiment": "e2e", "registered_model_prefix": "e2e-"}
    )
    renamed["models"][0]["name"] = "tiny-copy"
    rspec = write_spec(tmp_path / "renamed.yaml", renamed)
    for _ in range(2):
        third = farm("run", str(rspec), *args[2:], env=stack_env, cwd=tmp_path)
        assert third.returncode == 0 and "0 to build, 4 reused" in third.stdout, third.stdout + third.stderr
        copies = client.search_model_versions("name = 'e2e-tiny-copy'")
        assert len(copies) == 4 and all(v.tags["registered_from_reuse"] == "true" for v in copies)
        assert {v.run_id for v in copies} == {r.info.run_id for r in runs}

    cmp_ = farm("compare", "e2e", "--tracking-uri", stack.mlflow_uri, env=stack_env, cwd=tmp_path)
    assert cmp_.returncode == 0, cmp_.stderr
    assert cmp_.stdout.count("tiny-llama") >= 4
    across = farm("compare", "--model", "tiny-llama", "--tracking-uri", stack.mlflow_uri, env=stack_env, cwd=tmp_path)
    assert across.returncode == 0 and across.stdout.count("FINISHED") >= 4, across.stderr


def test_unreachable_tracking_server_fails_before_work(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(fixture_paths, str(out)))
    res = farm("run", str(spec), "--tracking-uri", "http://127.0.0.1:9", env=stack_env, cwd=tmp_path)
    assert res.returncode == 3
    assert res.stderr.strip().count("\n") == 0 and "unreachable" in res.stderr
    assert not out.exists()
