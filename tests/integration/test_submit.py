"""`farm submit/status/logs/stop` against a real `ray start --head` (with its Jobs API) on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests import servers
from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jobs_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("jobs-head")
    port = servers.free_port()
    with servers.ray_head(work, num_cpus=2, num_gpus=0, env={}, dashboard_port=port):
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                from ray.job_submission import JobSubmissionClient

                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                time.sleep(1)
        yield url


def farm(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def test_submit_follow_and_record(
    jobs_api: str, stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path / "job.yaml",
        tiny_spec(fixture_paths, str(tmp_path / "out"), methods=[{"method": "fp8"}], tracking={"experiment": "sub"}),
    )
    res = farm(
        "submit",
        str(spec),
        "--address",
        jobs_api,
        "--tracking-uri",
        stack.mlflow_uri,
        "--wait",
        env=stack_env,
        cwd=tmp_path,
    )
    job_id, state = res.stdout.split()[:2]
    assert res.returncode == 0, farm("logs", job_id, "--address", jobs_api).stdout[-3000:]
    assert state == "SUCCEEDED"
    assert farm("status", job_id, "--address", jobs_api).stdout.strip() == "SUCCEEDED"
    logs = farm("logs", job_id, "--address", jobs_api).stdout
    assert "tiny-llama/fp8-dynamic: built" in logs
    exp = MlflowClient(stack.mlflow_uri).get_experiment_by_name("sub")
    runs = MlflowClient(stack.mlflow_uri).search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_stop_and_unknown_job(
    jobs_api: str, stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path / "job.yaml", tiny_spec(fixture_paths, str(tmp_path / "out"), tracking={"experiment": "stop"})
    )
    staging = tmp_path / "tmp"
    staging.mkdir()
    job_id = farm(
        "submit",
        str(spec),
        "--address",
        jobs_api,
        "--tracking-uri",
        stack.mlflow_uri,
        env={**stack_env, "TMPDIR": str(staging)},
        cwd=tmp_path,
    ).stdout.strip()
    assert not [p for p in staging.iterdir() if p.name.startswith("farm-submit-")]  # Ray has the upload
    assert farm("stop", job_id, "--address", jobs_api).returncode == 0
    from farm.runtime.submit import wait

    assert wait(jobs_api, job_id, timeout=120) in {"STOPPED", "SUCCEEDED"}
    bad = farm("status", "no-such-job", "--address", jobs_api)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("farm: error: no Ray job")


def test_bad_spec_is_not_submitted(jobs_api: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nmodels: []\n")
    res = farm("submit", str(spec), "--address", jobs_api)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    from ray.job_submission import JobSubmissionClient

    assert not [j for j in JobSubmissionClient(jobs_api).list_jobs() if (j.metadata or {}).get("farm_job") == "x"]


def test_watch_submits_a_ray_job_and_reads_how_it_ended(
    jobs_api: str, stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    import yaml

    from farm.runtime.submit import wait

    write_spec(
        tmp_path / "job.yaml",
        tiny_spec(
            fixture_paths, str(tmp_path / "out"), methods=[{"method": "fp8"}], tracking={"experiment": "watch-sub"}
        ),
    )
    (tmp_path / "watch.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "cron",
                "job": "job.yaml",
                "tracking_uri": stack.mlflow_uri,
                "submit_address": jobs_api,
                "bases": [{"source": str(fixture_paths["tiny-llama"]), "name": "tiny"}],
            }
        )
    )
    env = {**stack_env, "FARM_CACHE": str(tmp_path / "cache")}
    first = farm("watch", "watch.yaml", "--once", env=env, cwd=tmp_path)
    assert first.returncode == 0 and " submitted " in first.stdout, first.stdout + first.stderr
    job_id = first.stdout.split()[-1]
    assert wait(jobs_api, job_id, timeout=300) == "SUCCEEDED", farm("logs", job_id, "--address", jobs_api).stdout
    second = farm("watch", "watch.yaml", "--once", env=env, cwd=tmp_path)
    assert " unchanged " in second.stdout, second.stdout + second.stderr
    claims = MlflowClient(stack.mlflow_uri).search_experiments(filter_string="name LIKE 'farm-watch/%'")
    mine = [c for c in claims if c.tags.get("farm.watch.name") == "cron"]
    assert [c.tags["farm.watch.state"] for c in mine] == ["finished"] and mine[0].tags["farm.watch.job"] == job_id
