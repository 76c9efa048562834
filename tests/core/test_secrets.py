"""Credentials never survive `redact`, and nothing else is changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farm.secrets import redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("http://farm:hunter2@mlflow:5000", "hunter2"),
        ("postgresql+psycopg2://user:pw0rd@db/mlflow", "pw0rd"),
        ("s3://bucket/x?X-Amz-Signature=abc123&X-Amz-Credential=AKIA42", "abc123"),
        ("https://hub/x?token=hf_secret&rev=main", "hf_secret"),
        ('{"uri": "http://a:b3@host"}', "b3"),
    ],
)
def test_secrets_removed(text: str, secret: str) -> None:
    assert secret not in redact(text)


def test_plain_text_unchanged() -> None:
    for text in ("s3://bucket/prefix/model", "/data/models/m", "hf://org/name@main", "http://127.0.0.1:5000"):
        assert redact(text) == text


def test_credentials_never_travel_in_a_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray writes a runtime_env's variables into runtime_env_agent.log: a value carrying a password goes to the
    workers through their constructor instead; plain endpoints still travel in the runtime_env."""
    from farm.runtime import cluster

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:hunter2@s3.internal:9000")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://s3.internal:9000")
    monkeypatch.setenv("HF_HOME", "/data/hf?token=abc123")
    public, secret = cluster.forwarded_env()
    assert public == {"MLFLOW_S3_ENDPOINT_URL": "http://s3.internal:9000"}
    assert set(secret) == {"AWS_ENDPOINT_URL", "HF_HOME"}
    assert "hunter2" not in repr(public) and "abc123" not in repr(public)


def test_scratch_of_dead_workers_is_swept(tmp_path: Path) -> None:
    """A worker killed with -9 cannot remove its scratch checkpoint; the next worker on the host does (the
    owner's pid is in the name), and a live worker's scratch stays."""
    import subprocess
    import sys

    from farm.runtime.workers import SCRATCH, sweep_scratch

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{SCRATCH}{dead.stdout.strip()}-abc-x1"
    live = tmp_path / f"{SCRATCH}{os.getpid()}-abc-x2"
    other = tmp_path / "someone-elses"
    for d in (gone, live, other):
        (d / "model").mkdir(parents=True)
    assert sweep_scratch(str(tmp_path)) == 1
    assert not gone.exists() and live.exists() and other.exists()
