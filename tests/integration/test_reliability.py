"""Faults against the real stack: a worker killed mid-variant, a driver killed mid-job and resumed, and
credentials that must never reach MLflow, S3 or the console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests import servers
from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import BUCKET, Stack, s3fs_client

pytestmark = pytest.mark.integration


STARTED: list[subprocess.Popen] = []  # every `farm` this module starts; none outlives its test


@pytest.fixture(autouse=True)
def no_farm_left_running() -> Iterator[None]:
    """A test that fails (a timeout, an assertion) still ends the `farm` processes it started, so they cannot hold
    the shared cluster's workers while the next tests wait for them."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            servers.stop(proc)


def start_farm(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, ended as a whole
    )
    STARTED.append(proc)
    return proc


def run_farm(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def variant_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")


def test_worker_killed_mid_variant_fails_that_attempt_and_retries(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        tracking={"experiment": "worker-death"},
        methods=[{"method": "gptq", "group_size": 64}],
        calibration={
            "source": str(fixture_paths["shakespeare"] / "calibration.txt"),
            "num_samples": 256,
            "max_seq_length": 256,
        },
        resources={"num_cpus": 1, "max_retries": 2},
    )
    path = write_spec(tmp_path / "job.yaml", spec)
    proc = start_farm(
        ["run", str(path), "--ray-address", stack.ray_address, "--tracking-uri", stack.mlflow_uri], stack_env, tmp_path
    )
    client = MlflowClient(stack.mlflow_uri)
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and killed is None and proc.poll() is None:
        runs = variant_runs(client, "worker-death")
        if runs and "farm.worker" in runs[0].data.tags:  # the worker is inside the variant
            killed = int(runs[0].data.tags["farm.worker"].rpartition(":")[2])
            time.sleep(1)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert killed, "never saw the worker"
    assert proc.returncode == 0, out
    runs = variant_runs(client, "worker-death")
    by_attempt = {r.data.tags["farm.attempt"]: r for r in runs}
    assert sorted(by_attempt) == ["1", "2"], [(r.info.status, r.data.tags.get("farm.attempt")) for r in runs]
    killed_run, retry = by_attempt["1"], by_attempt["2"]
    assert killed_run.info.status == "FAILED" and "worker died" in killed_run.data.tags["farm.failure"]
    assert retry.info.status == "FINISHED"  # exactly one finished run for the variant
    assert killed_run.data.tags["farm.variant_id"] == retry.data.tags["farm.variant_id"]


def test_driver_killed_then_resumed_builds_only_the_rest(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(
        fixture_paths, str(tmp_path / "out"), tracking={"experiment": "driver-death"}, resources={"num_cpus": 2}
    )  # one variant at a time on the 2-CPU test cluster
    path = write_spec(tmp_path / "job.yaml", spec)
    args = ["run", str(path), "--ray-address", stack.ray_address, "--tracking-uri", stack.mlflow_uri]
    proc = start_farm(args, stack_env, tmp_path)
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "started" in line and any(": built," in x for x in seen):  # one done, the next one RUNNING
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert any(": built," in x for x in seen), "".join(seen)
    client = MlflowClient(stack.mlflow_uri)
    before = variant_runs(client, "driver-death")
    finished_before = {r.data.tags["farm.variant_id"] for r in before if r.info.status == "FINISHED"}
    assert finished_before and any(r.info.status == "RUNNING" for r in before)

    resumed = subprocess.run(
        [sys.executable, "-m", "farm.cli", *args, "--resume"],
        env=stack_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "left RUNNING by dead driver" in resumed.stdout
    assert f"{4 - len(finished_before)} to build, {len(finished_before)} reused" in resumed.stdout
    after = variant_runs(client, "driver-death")
    assert not [r for r in after if r.info.status == "RUNNING"]
    finished = [r.data.tags["farm.variant_id"] for r in after if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 4  # every variant once, none rebuilt
    failed = [r for r in after if r.info.status == "FAILED"]
    assert failed and all("died" in r.data.tags["farm.failure"] for r in failed)


def test_sigterm_unwinds_the_driver(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    """`kill PID` (SIGTERM, what schedulers and `timeout` send) mid-job: the driver, not Ray's own handler,
    gets it; it exits 130 and the variant that was running is FAILED, none left RUNNING."""
    spec = tiny_spec(
        fixture_paths, str(tmp_path / "out"), tracking={"experiment": "sigterm"}, resources={"num_cpus": 2}
    )
    proc = start_farm(
        [
            "run",
            str(write_spec(tmp_path / "job.yaml", spec)),
            "--ray-address",
            stack.ray_address,
            "--tracking-uri",
            stack.mlflow_uri,
        ],
        stack_env,
        tmp_path,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "started" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + (rest or "")
    runs = variant_runs(MlflowClient(stack.mlflow_uri), "sigterm")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert any(r.info.status == "FAILED" for r in runs)


def test_credentials_never_recorded(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    secret = "hunter2-s3cr3t"
    uri = stack.mlflow_uri.replace("http://", f"http://farm:{secret}@")
    spec = tiny_spec(
        fixture_paths,
        f"s3://{BUCKET}/secrets",
        tracking={"experiment": "secrets", "uri": uri},
        methods=[{"method": "fp8"}],
    )
    path = write_spec(tmp_path / "job.yaml", spec)
    res = subprocess.run(
        [sys.executable, "-m", "farm.cli", "run", str(path), "--ray-address", stack.ray_address],
        env=stack_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert secret not in res.stdout + res.stderr

    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("secrets")
    runs = client.search_runs([exp.experiment_id], "")
    assert len(runs) >= 3
    for r in runs:
        blob = json.dumps([r.data.params, r.data.tags, r.info.run_name])
        assert secret not in blob
        for a in client.list_artifacts(r.info.run_id):
            if not a.is_dir:
                local = client.download_artifacts(r.info.run_id, a.path, str(tmp_path / "dl"))
                assert secret not in Path(local).read_text(errors="replace"), a.path
    for v in client.search_model_versions("name = 'tiny-llama'"):
        assert secret not in json.dumps([v.tags, v.description, v.source])
    fs = s3fs_client(stack)
    for key in fs.glob(f"{BUCKET}/secrets/**/manifest.json"):
        assert secret not in fs.cat(key).decode()


def test_tracking_server_lost_mid_job_fails_cleanly(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = tiny_spec(fixture_paths, str(out), tracking={"experiment": "mlflow-down"}, resources={"num_cpus": 2})
    path = write_spec(tmp_path / "job.yaml", spec)
    env = {**stack_env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with servers.mlflow_process(tmp_path, None, str(tmp_path / "mlartifacts")) as (uri, server):
        proc = start_farm(["run", str(path), "--ray-address", stack.ray_address, "--tracking-uri", uri], env, tmp_path)
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if ": built," in line:
                servers.stop(server)
                break
        rest, _ = proc.communicate(timeout=600)
    lines = "".join(seen) + rest
    assert proc.returncode == 3, lines
    assert "Traceback" not in lines
    error = [x for x in lines.splitlines() if x.startswith("farm: error:")]
    assert len(error) == 1 and "failed mid-job" in error[0]
    manifests = list(out.glob("tiny-llama/*/*/manifest.json"))
    assert manifests, "the finished variant's artifact must survive"


def test_concurrent_jobs_record_each_variant_once(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    """Two `farm run` of one spec at once against one MLflow server (on a cluster that holds the workers of only
    one): both exit 0, every variant is built once (one run, FINISHED) and has one registry version; the job that
    found a variant claimed waits for it and reuses it."""
    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "fp8"}, {"method": "rtn"}],
        tracking={"experiment": "race", "registered_model_prefix": "race-"},
    )
    path = write_spec(tmp_path / "job.yaml", spec)
    args = ["run", str(path), "--ray-address", stack.ray_address, "--tracking-uri", stack.mlflow_uri]
    procs = [start_farm(args, stack_env, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    client = MlflowClient(stack.mlflow_uri)
    runs = variant_runs(client, "race")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["farm.variant_id"] for r in finished) == sorted(
        {r.data.tags["farm.variant_id"] for r in runs}
    ), [(r.data.tags["farm.label"], r.info.status) for r in runs]
    assert len(finished) == len(runs) == 2, [(r.data.tags["farm.label"], r.info.status) for r in runs]
    assert len(client.search_model_versions("name = 'race-tiny-llama'")) == 2
    exp = client.get_experiment_by_name("race")
    from mlflow.entities import ViewType

    claims = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, filter_string="name LIKE 'farm-record/%'")
    assert not [c for c in claims if c.name.startswith(f"farm-record/{exp.experiment_id}/")]  # hidden once recorded


def test_a_reused_variant_whose_artifact_is_gone_is_built_again(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    """Reuse checks the published artifact: one deleted (or a file of it) is built again, not reported cached
    at a path that no longer exists; the old run says why it was not reused."""
    import shutil

    spec = tiny_spec(
        fixture_paths,
        str(tmp_path / "out"),
        methods=[{"method": "fp8"}, {"method": "rtn"}],
        tracking={"experiment": "stale"},
    )
    path = write_spec(tmp_path / "job.yaml", spec)
    args = ["run", str(path), "--ray-address", stack.ray_address, "--tracking-uri", stack.mlflow_uri]
    first = run_farm(args, stack_env, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    client = MlflowClient(stack.mlflow_uri)
    runs = {r.data.tags["farm.label"]: r for r in variant_runs(client, "stale")}
    fp8_dir = Path(runs["fp8-dynamic"].data.tags["farm.artifact_uri"])
    rtn = next(label for label in runs if label != "fp8-dynamic")
    rtn_dir = Path(runs[rtn].data.tags["farm.artifact_uri"])
    shutil.rmtree(fp8_dir)
    next(rtn_dir.glob("*.safetensors")).write_bytes(b"short")
    second = run_farm(args, stack_env, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(runs)} to build, 0 reused" in second.stdout and "stale    tiny-llama/fp8-dynamic" in second.stdout
    assert (fp8_dir / "manifest.json").exists()
    old = client.get_run(runs["fp8-dynamic"].info.run_id)
    assert "no manifest" in old.data.tags["farm.stale"]
    assert "not the size" in client.get_run(runs[rtn].info.run_id).data.tags["farm.stale"]
