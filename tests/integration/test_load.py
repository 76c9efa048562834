"""Load: a job of 50 tiny variants on the local cluster; every variant is recorded exactly once."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration
N = 50


def test_fifty_variants_each_recorded_once(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    methods = [
        {
            "method": "smoothquant",
            "weights": "rtn",
            "smoothing_strength": round(0.30 + i / 100, 2),
            "name": f"sq-{i:02d}",
        }
        for i in range(N)
    ]
    spec = tiny_spec(
        fixture_paths, str(tmp_path / "out"), methods=methods, tracking={"experiment": "load", "log_model": False}
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "farm.cli",
            "run",
            str(write_spec(tmp_path / "j.yaml", spec)),
            "--ray-address",
            stack.ray_address,
            "--tracking-uri",
            stack.mlflow_uri,
        ],
        env=stack_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 worker(s)" in res.stdout  # reused workers, sized to the 2-CPU cluster
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("load")
    runs = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'", max_results=1000)
    ids = Counter(r.data.tags["farm.variant_id"] for r in runs)
    assert len(ids) == N and set(ids.values()) == {1}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all("perplexity" in r.data.metrics for r in runs)
    assert len(list((tmp_path / "out" / "tiny-llama").iterdir())) == N
