"""Real servers on 127.0.0.1 for integration tests: moto (S3), an MLflow tracking server proxying artifacts to
that S3, and a Ray head with fake GPUs. Each runs in its own process session and is killed, with everything it
started, on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        _kill_group(proc)


@contextlib.contextmanager
def moto_s3(workdir: Path) -> Iterator[str]:
    port = free_port()
    with process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], {}, workdir / "moto.log") as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/moto-api/", 30, p)
        yield url


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        **{k.lower(): v for k, v in S3_ENV.items() if "KEY" in k},
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=bucket)


@contextlib.contextmanager
def mlflow_process(workdir: Path, s3_endpoint: str | None, artifacts: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Lean MLflow server (one worker, no job execution): sqlite backend, artifacts proxied to `artifacts`."""
    port = free_port()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **S3_ENV}
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
    ]
    with process(cmd, env, workdir / "mlflow.log") as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 120, p)
        yield url, p


@contextlib.contextmanager
def mlflow_server(workdir: Path, s3_endpoint: str | None, artifacts: str) -> Iterator[str]:
    with mlflow_process(workdir, s3_endpoint, artifacts) as (url, _):
        yield url


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started by `process` now (its context manager then finds it gone)."""
    _kill_group(proc)


@contextlib.contextmanager
def ray_head(
    workdir: Path, num_cpus: int, num_gpus: int, env: dict[str, str], dashboard_port: int | None = None
) -> Iterator[str]:
    """`ray start --head --block` on loopback with fake GPUs; killing its session stops the whole cluster.
    With `dashboard_port`, the dashboard (and so the Jobs API) listens on 127.0.0.1:dashboard_port."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = (
        ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
        if dashboard_port
        else ["--include-dashboard", "false"]
    )
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        str(num_gpus),
        *dashboard,
        "--temp-dir",
        temp,
        "--disable-usage-stats",
        # several heads on one machine (the session's stack, a Jobs API head, a developer's own) must not
        # share the agents' default ports
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
    ]
    # the cluster's `python` is this environment's, as on a real node image (job entrypoints run `python`)
    ray_env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **env,
    }
    try:
        with process(cmd, ray_env, workdir / "ray.log") as p:
            address = f"127.0.0.1:{port}"
            deadline = time.time() + 90
            while time.time() < deadline:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"ray start exited with {p.returncode}: {(workdir / 'ray.log').read_text()[-2000:]}"
                    )
                if "Ray runtime started" in (workdir / "ray.log").read_text(errors="replace"):
                    break
                time.sleep(0.5)
            else:
                raise TimeoutError("ray head did not start")
            yield address
    finally:  # runtime-env virtualenvs under it are GBs each: leave nothing behind
        shutil.rmtree(temp, ignore_errors=True)
