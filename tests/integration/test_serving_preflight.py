"""The serving check refuses, before any run is created, what cannot work where the variants will run: no GPU
per variant (plan and run alike), and vLLM not importable on a GPU worker of the real Ray cluster (fake GPUs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def _farm(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_serving_without_a_gpu_per_variant_is_refused_by_plan_and_run(
    fixture_paths: dict, tmp_path: Path, stack_env: dict
) -> None:
    spec = tiny_spec(fixture_paths, str(tmp_path / "out"), methods=[{"method": "fp8"}])
    spec["evaluation"]["serving"] = {}
    path = write_spec(tmp_path / "s.yaml", spec)
    for cmd in ("plan", "run"):
        res = _farm(cmd, str(path), env=stack_env, cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "evaluation.serving" in lines[0] and "resources.num_gpus is 0" in lines[0]
    assert not (tmp_path / "out").exists()


def test_vllm_missing_on_the_gpu_worker_is_one_line_before_any_run(
    fixture_paths: dict, tmp_path: Path, stack: Stack, stack_env: dict
) -> None:
    empty = tmp_path / "no-vllm-here"
    empty.mkdir()
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "fp8"}],
        resources={"num_gpus": 1, "num_cpus": 1},
        tracking={"experiment": "serving-preflight"},
    )
    spec["evaluation"]["serving"] = {"pythonpath": [str(empty)]}
    res = _farm(
        "run",
        str(write_spec(tmp_path / "s.yaml", spec)),
        "--ray-address",
        stack.ray_address,
        "--tracking-uri",
        stack.mlflow_uri,
        env=stack_env,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "vLLM cannot be imported by" in err[0] and str(empty) in err[0], err
    exp = MlflowClient(stack.mlflow_uri).get_experiment_by_name("serving-preflight")
    assert exp is None or not MlflowClient(stack.mlflow_uri).search_runs([exp.experiment_id])
