"""Submitting a job spec to a Ray cluster through the Ray Jobs API, and following it.

The spec travels validated, with its relative paths already resolved, in the job's `working_dir`; this
checkout of farm travels as a `py_modules` entry, so the cluster runs the same farm that validated the spec
(its Python dependencies must be installed on the cluster image). The entrypoint is `farm run` on the
cluster (`--ray-address auto`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import FarmError
from farm.secrets import redact

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep it light
    from farm.spec import JobSpec

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
FARM_PACKAGE = Path(__file__).resolve().parent.parent


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, bad address, auth
        raise FarmError(f"Ray Jobs API at {address} is unreachable ({type(err).__name__}: {err})") from None


def submit(spec: JobSpec, address: str, tracking_uri: str | None = None) -> str:
    client = _client(address)
    workdir = Path(tempfile.mkdtemp(prefix="farm-submit-"))
    try:  # Ray packages and uploads the working_dir while submitting: the staging directory is not needed after
        return _submit(client, address, spec, workdir, tracking_uri)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _submit(client: Any, address: str, spec: JobSpec, workdir: Path, tracking_uri: str | None) -> str:
    import yaml

    (workdir / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    cmd = ["python", "-m", "farm.cli", "run", "job.yaml", "--ray-address", "auto"]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    # Ray records a job's runtime_env (its dashboard, its logs): a value that carries a credential stays out of it
    # and must be configured on the cluster instead.
    env_vars = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE")
        if k in os.environ and redact(os.environ[k]) == os.environ[k]
    }
    runtime_env = {
        "working_dir": str(workdir),
        "py_modules": [str(FARM_PACKAGE)],
        "env_vars": {"PYTHONUNBUFFERED": "1", **env_vars},
    }
    deadline = time.monotonic() + 90
    while True:
        try:
            return str(
                client.submit_job(entrypoint=shlex.join(cmd), runtime_env=runtime_env, metadata={"farm_job": spec.name})
            )
        except RuntimeError as err:
            # A freshly started head answers before its job agent is up; anything else is final.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise FarmError(f"Ray Jobs API at {address} refused the job ({str(err).splitlines()[0]})") from None
            time.sleep(2)


def status(address: str, job_id: str) -> str:
    try:
        return str(_client(address).get_job_status(job_id).value)
    except RuntimeError as err:
        raise FarmError(f"no Ray job {job_id!r} at {address} ({str(err).splitlines()[0]})") from None


def logs(address: str, job_id: str) -> str:
    try:
        return str(_client(address).get_job_logs(job_id))
    except RuntimeError as err:
        raise FarmError(f"no Ray job {job_id!r} at {address} ({str(err).splitlines()[0]})") from None


def stop(address: str, job_id: str) -> bool:
    try:
        return bool(_client(address).stop_job(job_id))
    except RuntimeError as err:
        raise FarmError(f"no Ray job {job_id!r} at {address} ({str(err).splitlines()[0]})") from None


def wait(address: str, job_id: str, timeout: float, poll: float = 1.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = status(address, job_id)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll)
