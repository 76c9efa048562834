"""The production MLflow shape for real: Debian's PostgreSQL (started by mlflow/postgres-local.sh) as the
backend store, moto S3 as the artifact store proxied by the server (mlflow/production.sh, two workers). A job
runs from an environment with no S3 credentials at all; its runs live in PostgreSQL, its files in S3, and each
registry version's tags agree with the variant's manifest."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests import servers
from tests.conftest import ROOT, tiny_spec, write_spec
from tests.integration.conftest import BUCKET, Stack, s3fs_client
from tests.integration.test_end_to_end import farm

pytestmark = pytest.mark.integration
HAVE_PG = bool(shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    work = Path(tempfile.mkdtemp(prefix="farm-pg", dir="/tmp"))  # the postgres user must reach it
    work.chmod(0o755)
    script = str(ROOT / "mlflow" / "postgres-local.sh")
    port = str(servers.free_port())
    try:
        uri = subprocess.run(
            ["bash", script, "start", str(work / "data"), port, "pw-farm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.strip()
        yield uri
    finally:
        subprocess.run(["bash", script, "stop", str(work / "data")], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(not HAVE_PG, reason="PostgreSQL server binaries are not installed")
def test_job_against_postgres_and_proxied_s3(stack: Stack, fixture_paths: dict, tmp_path: Path) -> None:
    import psycopg2

    with postgres() as backend:
        port = servers.free_port()
        env = {
            **servers.S3_ENV,
            "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
            "BACKEND": backend,
            "ARTIFACTS": f"s3://{BUCKET}/prod",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "2",
            "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
        }
        with servers.process(["bash", str(ROOT / "mlflow" / "production.sh")], env, tmp_path / "mlflow.log") as p:
            uri = f"http://127.0.0.1:{port}"
            servers.wait_http(uri + "/health", 120, p)
            spec = write_spec(
                tmp_path / "job.yaml",
                tiny_spec(
                    fixture_paths,
                    str(tmp_path / "out"),
                    methods=[{"method": "fp8"}, {"method": "gptq", "group_size": 64}],
                    tracking={"experiment": "prod"},
                ),
            )
            # the job's own process (driver and local Ray workers) has no S3 credentials or endpoint
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
            clean |= {
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_CONFIG_FILE": "/nonexistent",
                "FARM_CACHE": str(tmp_path / "cache"),
            }
            res = farm("run", str(spec), "--tracking-uri", uri, env=clean, cwd=tmp_path)
            assert res.returncode == 0, res.stdout + res.stderr

            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("prod")
            runs = client.search_runs([exp.experiment_id], "")
            assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}  # job, base, 2 variants
            with psycopg2.connect(backend.replace("postgresql+psycopg2", "postgresql")) as db, db.cursor() as cur:
                cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
                assert cur.fetchone()[0] == 4
            keys = s3fs_client(stack).find(f"{BUCKET}/prod/{exp.experiment_id}")
            assert any(k.endswith("model/model.safetensors") for k in keys)

            for version in client.search_model_versions("name = 'tiny-llama'"):
                run = client.get_run(version.run_id)
                manifest = json.loads(
                    Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read_text()
                )
                assert version.tags["base_model_hash"] == manifest["model"]["identity"]
                assert version.tags["recipe_hash"] == manifest["recipe_sha256"]
                assert version.tags["calibration_hash"] == manifest["calibration"]["hash"]
                assert version.tags["method"] == manifest["method"]["method"]
                assert version.tags["variant_id"] == manifest["variant_id"] == run.data.tags["farm.variant_id"]
