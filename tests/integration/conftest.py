"""Real servers for integration tests, started once per session on 127.0.0.1 and always stopped."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import servers

BUCKET = "farm-it"


@dataclass(frozen=True)
class Stack:
    s3_endpoint: str
    mlflow_uri: str
    ray_address: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("servers")
    with servers.moto_s3(work) as s3:
        servers.make_bucket(s3, BUCKET)
        env = {**servers.S3_ENV, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3}
        with (
            servers.mlflow_server(work, s3, f"s3://{BUCKET}/mlflow") as mlflow_uri,
            servers.ray_head(work, num_cpus=2, num_gpus=2, env=env) as address,
        ):
            yield Stack(s3, mlflow_uri, address, env)


@pytest.fixture
def stack_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for a farm process talking to the stack (S3 credentials and endpoint)."""
    for k, v in stack.env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **stack.env, "PYTHONUNBUFFERED": "1"}


def s3fs_client(stack: Stack):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": stack.s3_endpoint}, key="testing", secret="testing")


__all__ = ["BUCKET", "Path", "Stack", "s3fs_client"]


def recorded(stack: Stack, experiment: str, key: str = "farm.label") -> tuple[object | None, dict[str, object]]:
    """A job's base run (or None) and its variant runs keyed by a tag, straight from the MLflow server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    bases = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'base'")
    variants = client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")
    return (bases[0] if bases else None), {r.data.tags[key]: r for r in variants}
