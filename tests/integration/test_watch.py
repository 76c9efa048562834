"""`farm watch --once` against real servers: a checkpoint under an S3 prefix is a release; one cycle runs the
job template for it on the Ray cluster and its variants land in MLflow tagged with the release; a second cycle
does nothing; a changed checkpoint is a new release. A missing base is reported, and the others still run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import BUCKET, Stack, s3fs_client
from tests.integration.test_end_to_end import farm

pytestmark = pytest.mark.integration


def _variants(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'") if exp else []


def test_watch_builds_each_release_once(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    fs = s3fs_client(stack)
    local = fixture_paths["tiny-llama"]
    prefix = f"{BUCKET}/releases/tiny"
    for f in local.iterdir():
        fs.put(str(f), f"{prefix}/{f.name}")
    write_spec(
        tmp_path / "job.yaml",
        tiny_spec(
            fixture_paths, str(tmp_path / "out"), methods=[{"method": "fp8"}], tracking={"experiment": "watched"}
        ),
    )
    (tmp_path / "watch.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "nightly",
                "job": "job.yaml",
                "tracking_uri": stack.mlflow_uri,
                "bases": [{"source": f"s3://{prefix}", "name": "tiny"}, {"source": f"s3://{BUCKET}/releases/absent"}],
            }
        )
    )
    env = {**stack_env, "FARM_CACHE": str(tmp_path / "cache")}
    cycle = ["watch", "watch.yaml", "--once", "--ray-address", stack.ray_address]
    client = MlflowClient(stack.mlflow_uri)

    first = farm(*cycle, env=env, cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr  # the absent base failed, and says so
    lines = {line.split()[0]: line for line in first.stdout.splitlines() if line.startswith(("tiny", "absent"))}
    assert lines["tiny"].split()[1] == "built" and lines["absent"].split()[1] == "failed"
    assert "no such prefix" in lines["absent"]
    runs = _variants(client, "watched")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    release = runs[0].data.tags["farm.release"]
    assert release == runs[0].data.tags["farm.model_identity"] and runs[0].data.tags["farm.watch"] == "nightly"

    second = farm(*cycle, env=env, cwd=tmp_path)
    assert [ln.split()[1] for ln in second.stdout.splitlines() if ln.startswith("tiny")] == ["unchanged"], second.stdout
    assert len(_variants(client, "watched")) == 1

    # a new checkpoint at the same prefix (here: a changed config) is a new release, built once
    config = json.loads((local / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    fs.pipe(f"{prefix}/config.json", json.dumps(config).encode())
    third = farm(*cycle, env=env, cwd=tmp_path)
    assert [ln.split()[1] for ln in third.stdout.splitlines() if ln.startswith("tiny")] == ["built"], third.stdout
    runs = _variants(client, "watched")
    assert len(runs) == 2 and len({r.data.tags["farm.release"] for r in runs}) == 2
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    assert "RUNNING" not in {r.info.status for r in everything}
    claims = [
        e
        for e in client.search_experiments(filter_string="name LIKE 'farm-watch/%'")
        if e.tags.get("farm.watch.name") == "nightly"
    ]
    assert sorted(e.tags["farm.watch.state"] for e in claims) == ["finished", "finished"]
