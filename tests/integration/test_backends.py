"""A second GPTQ backend through a real job: `backend: gptqmodel` runs in its own Ray runtime environment (a
virtualenv Ray builds from the package index on top of the worker's packages), writes GPTQModel's own GPTQ
format, reloads with plain transformers for evaluation, and is recorded like every variant; the default
llm-compressor variant beside it runs in the worker's own environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack, recorded
from tests.integration.test_end_to_end import farm

pytestmark = pytest.mark.integration


def test_gptqmodel_backend_in_its_own_runtime_env(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "gptq", "group_size": 64, "backend": "gptqmodel"}, {"method": "gptq", "group_size": 64}],
        tracking={"experiment": "backends", "registered_model_prefix": "backends-"},
    )
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
    _, runs = recorded(stack, "backends")
    gm, lc = runs["gptq-w4a16-g64-gptqmodel"], runs["gptq-w4a16-g64"]
    assert "backend gptqmodel 7.6.0 (gptq format)" in gm.data.tags["farm.notes"]
    manifest = json.loads(Path(client.download_artifacts(gm.info.run_id, "manifest.json", str(tmp_path))).read_text())
    assert manifest["versions"]["gptqmodel"] == "7.6.0" and "gptqmodel" not in json.dumps(
        json.loads(Path(client.download_artifacts(lc.info.run_id, "manifest.json", str(tmp_path / "lc"))).read_text())[
            "versions"
        ]
    )
    config = json.loads(
        Path(client.download_artifacts(gm.info.run_id, "model/config.json", str(tmp_path / "m"))).read_text()
    )
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert gm.data.metrics["perplexity"] > 1 and lc.data.metrics["perplexity"] > 1


def test_autoawq_quantizes_in_its_env_and_evaluates_in_gptqmodels(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    """AutoAWQ (archived; transformers 4.51 only) quantizes in its own environment, on the same node, from a
    transformers-4 view of the base; the worker then evaluates the GEMM checkpoint with current transformers
    through GPTQModel's AWQ kernel."""
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "awq", "group_size": 64, "backend": "autoawq"}],
        calibration={
            "source": str(fixture_paths["shakespeare"] / "calibration.txt"),
            "num_samples": 8,
            "max_seq_length": 64,
        },
        tracking={"experiment": "autoawq", "registered_model_prefix": "autoawq-"},
    )
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
    (run,) = recorded(stack, "autoawq")[1].values()
    assert run.data.tags["farm.label"] == "awq-w4a16-g64-autoawq"
    assert "backend autoawq 0.2.9 (GEMM format, transformers 4.51.3)" in run.data.tags["farm.notes"]
    config = json.loads(
        Path(client.download_artifacts(run.info.run_id, "model/config.json", str(tmp_path))).read_text()
    )
    assert config["quantization_config"]["quant_method"] == "awq" and run.data.metrics["perplexity"] > 1
