"""GPU placement on a Ray cluster with fake GPUs (`ray start --num-gpus 2`): whole-GPU variants get a GPU each
and the rest wait; fractional variants share a GPU. Read back from the runs' `farm.cuda_visible_devices`."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec, write_spec
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration
METHODS = [{"method": "gptq", "group_size": g} for g in (32, 64, 128)] + [{"method": "fp8"}]


def run_job(
    stack: Stack, env: dict, paths: dict, tmp_path: Path, experiment: str, resources: dict, methods: list = METHODS
) -> list:
    spec = tiny_spec(
        paths,
        str(tmp_path / experiment),
        methods=methods,
        resources=resources,
        tracking={"experiment": experiment, "log_model": False},
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "farm.cli",
            "run",
            str(write_spec(tmp_path / f"{experiment}.yaml", spec)),
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
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`farm.role` = 'variant'")


def max_overlap(runs: list) -> int:
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_whole_gpus_one_variant_each(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    runs = run_job(stack, stack_env, fixture_paths, tmp_path, "gpu-whole", {"num_gpus": 1, "num_cpus": 0.5})
    devices = {r.data.tags["farm.cuda_visible_devices"] for r in runs}
    assert devices == {"0", "1"}  # both GPUs used, one variant per GPU at a time
    assert max_overlap(runs) <= 2  # the other variants waited


def test_fractional_gpus_pack(stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path) -> None:
    runs = run_job(stack, stack_env, fixture_paths, tmp_path, "gpu-packed", {"num_gpus": 0.5, "num_cpus": 0.5})
    workers_per_gpu: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        workers_per_gpu[r.data.tags["farm.cuda_visible_devices"]].add(r.data.tags["farm.worker"])
    assert set(workers_per_gpu) <= {"0", "1"}
    assert max(len(w) for w in workers_per_gpu.values()) == 2  # two workers share one GPU


def refused(stack: Stack, env: dict, paths: dict, tmp_path: Path, experiment: str, resources: dict) -> str:
    """`farm run` of an FP8 job with these resources, expected to be refused before any run: its one error line."""
    spec = tiny_spec(
        paths,
        str(tmp_path / "out"),
        methods=[{"method": "fp8"}],
        resources=resources,
        tracking={"experiment": experiment},
    )
    res = subprocess.run(
        [
            *(sys.executable, "-m", "farm.cli", "run", str(write_spec(tmp_path / f"{experiment}.yaml", spec))),
            *("--ray-address", stack.ray_address, "--tracking-uri", stack.mlflow_uri),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    exp = MlflowClient(stack.mlflow_uri).get_experiment_by_name(experiment)
    assert exp is None or not MlflowClient(stack.mlflow_uri).search_runs([exp.experiment_id], "")
    return line


def test_variant_that_fits_no_node_fails_before_any_run(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    line = refused(stack, stack_env, fixture_paths, tmp_path, "unfit", {"num_gpus": 4})
    assert line.startswith("farm: error: resources:") and "4 GPU" in line and "largest node has 2 CPU, 2 GPU" in line


def test_memory_packing_gives_each_variant_its_need_and_shares_a_gpu(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    """`gpu_packing: memory` on 80 GB cards: the tiny model's variants need a sixteenth of a card each, so they run
    side by side on one GPU, each held to its share, where `num_gpus: 1` alone would give each a whole GPU."""
    resources = {"num_gpus": 1, "num_cpus": 0.5, "gpu_packing": "memory", "gpu_card_gb": 80}
    data_free = [{"method": "rtn", "scheme": "W4A16", "group_size": g} for g in (32, 64, 128)] + [{"method": "fp8"}]
    runs = run_job(stack, stack_env, fixture_paths, tmp_path, "gpu-memory", resources, data_free)
    assert {r.data.params["resources.num_gpus"] for r in runs} == {"0.0625"}
    assert {r.data.params["resources.gpu_memory_bytes"] for r in runs} == {str(4 * 2**30)}  # 5 GiB less a context
    workers_per_gpu: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        workers_per_gpu[r.data.tags["farm.cuda_visible_devices"]].add(r.data.tags["farm.worker"])
    assert max(len(w) for w in workers_per_gpu.values()) >= 2 and max_overlap(runs) >= 2


def test_memory_packing_refuses_a_variant_no_share_holds_before_any_run(
    stack: Stack, stack_env: dict, fixture_paths: dict, tmp_path: Path
) -> None:
    resources = {"num_gpus": 0.25, "gpu_packing": "memory", "gpu_card_gb": 2}
    line = refused(stack, stack_env, fixture_paths, tmp_path, "no-share", resources)
    assert line.startswith("farm: error: resources.gpu_packing: ") and "0.25-GPU share of a 2.0 GiB card" in line
