"""Other backends through a real job: `backend: gptqmodel` and `backend: autoawq` run in their own Ray runtime
environments (virtualenvs Ray builds from the package index on top of the worker's packages), write their own
formats, reload with plain transformers for evaluation, and are recorded like every variant; the default
llm-compressor variant beside them runs in the worker's own environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack, recorded
from tests.integration.test_end_to_end import farm

pytestmark = pytest.mark.integration


def test_backends_each_in_its_own_runtime_env(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    """One job, three backends: GPTQModel and AutoAWQ (archived; transformers 4.51 only) each quantize in their
    own environment on the same node, the llm-compressor variant in the worker's; the AutoAWQ GEMM checkpoint is
    evaluated with current transformers through GPTQModel's AWQ kernel."""
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[
            {"method": "gptq", "group_size": 64, "backend": "gptqmodel"},
            {"method": "gptq", "group_size": 64},
            {"method": "awq", "group_size": 64, "backend": "autoawq", "calibration": {"num_samples": 8}},
        ],
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
    gm, lc, aw = runs["gptq-w4a16-g64-gptqmodel"], runs["gptq-w4a16-g64"], runs["awq-w4a16-g64-autoawq"]
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
    assert "backend autoawq 0.2.9 (GEMM format, transformers 4.51.3)" in aw.data.tags["farm.notes"]
    config = json.loads(
        Path(client.download_artifacts(aw.info.run_id, "model/config.json", str(tmp_path / "a"))).read_text()
    )
    assert config["quantization_config"]["quant_method"] == "awq" and aw.data.metrics["perplexity"] > 1
