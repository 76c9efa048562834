"""cluster/: the Ray cluster launcher config passes Ray's own schema; the KubeRay manifests carry the fields
KubeRay requires (ray.io/v1) and run farm on GPU workers."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["containerPort"] for c in _containers(head["template"]) for p in c.get("ports", [])}
    assert {6379, 8265} <= head_ports
    workers = spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group["template"]):
            assert c["name"] and c["image"]
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert limits["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]


def test_ray_cluster_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's JSON schema after Ray fills in its defaults
    assert config["head_node_type"] in config["available_node_types"]
    assert any("farm" in cmd for cmd in config["setup_commands"])


def test_kuberay_raycluster() -> None:
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_farm() -> None:
    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["farm", "run"] and "--ray-address" in argv
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    # the spec the entrypoint names is mounted in the head pod
    mount = {
        m["mountPath"]
        for c in _containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])
        for m in c.get("volumeMounts", [])
    }
    assert any(argv[2].startswith(m) for m in mount)


def _cron_fields_ok(schedule: str) -> bool:
    fields = schedule.split()
    return len(fields) == 5 and all(
        f == "*" or f.replace("*/", "").replace(",", "").replace("-", "").isdigit() for f in fields
    )


def test_kuberay_raycronjob_runs_the_watcher_nightly() -> None:
    doc = yaml.safe_load((CLUSTER / "kuberay-raycronjob-watch.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    spec = doc["spec"]
    assert _cron_fields_ok(spec["schedule"])
    job = spec["jobTemplate"]  # a RayJob spec (KubeRay's ray-cronjob sample)
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["farm", "watch"] and "--once" in argv
    assert job["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(job["rayClusterSpec"])
    mount = {
        m["mountPath"]
        for c in _containers(job["rayClusterSpec"]["headGroupSpec"]["template"])
        for m in c.get("volumeMounts", [])
    }
    assert any(argv[2].startswith(m) for m in mount)


def test_k8s_cronjob_fallback_runs_the_watcher() -> None:
    doc = yaml.safe_load((CLUSTER / "k8s-cronjob-watch.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert _cron_fields_ok(spec["schedule"]) and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    command = pod["containers"][0]["command"]
    assert command[:2] == ["farm", "watch"] and "--once" in command


def test_example_watch_spec_is_valid() -> None:
    from farm.watch.spec import load_watch

    watch, template = load_watch(CLUSTER.parent / "jobs" / "watch.yaml")
    assert watch.bases and template.methods
