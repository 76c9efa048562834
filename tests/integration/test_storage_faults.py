"""S3 faults through a real TCP proxy in front of the moto server: an outage during upload is retried with
backoff; an upload that keeps failing leaves nothing visible and fails the variant's run, not the job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from farm.artifacts import ArtifactStore, PublishError
from tests.conftest import tiny_spec, write_spec
from tests.faults import FlakyProxy
from tests.integration.conftest import BUCKET, Stack, s3fs_client

pytestmark = pytest.mark.integration


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "variant"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 300_000)
    (d / "config.json").write_text("{}")
    return d


def test_outage_during_upload_is_retried(
    stack: Stack, stack_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlakyProxy(urlsplit(stack.s3_endpoint).port, outage_s=2.5).running() as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        store = ArtifactStore(f"s3://{BUCKET}/flaky")
        key = store.key("m", "fp8", "0001")
        proxy.start_outage()
        store.publish(_model_dir(tmp_path), key, {"ok": True})
        assert proxy.dropped > 0
    fs = s3fs_client(stack)
    assert fs.exists(f"{BUCKET}/flaky/m/fp8/0001/manifest.json")
    assert fs.exists(f"{BUCKET}/flaky/m/fp8/0001/model.safetensors")


def test_permanent_failure_leaves_nothing(
    stack: Stack, stack_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlakyProxy(urlsplit(stack.s3_endpoint).port, outage_s=3600).running() as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        store = ArtifactStore(f"s3://{BUCKET}/dead", attempts=3, base_delay=0.2)
        proxy.start_outage()
        with pytest.raises(PublishError, match="failed after 3 attempt"):
            store.publish(_model_dir(tmp_path), store.key("m", "fp8", "0002"), {"ok": True})
    assert not s3fs_client(stack).glob(f"{BUCKET}/dead/**")


def test_failed_upload_fails_the_run_not_the_record(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    with FlakyProxy(urlsplit(stack.s3_endpoint).port, outage_s=3600).running() as proxy:
        proxy.start_outage()
        env = {**stack_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        spec = tiny_spec(
            fixture_paths,
            f"s3://{BUCKET}/unreachable",
            tracking={"experiment": "s3-down"},
            methods=[{"method": "fp8"}],
            resources={"num_cpus": 1, "max_retries": 0},
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
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "PublishError" in res.stdout
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("s3-down")
    runs = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "upload" in runs[0].data.tags["farm.failure"]
    parent = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'job'")[0]
    assert parent.info.status == "FAILED"
    assert not s3fs_client(stack).glob(f"{BUCKET}/unreachable/**")
