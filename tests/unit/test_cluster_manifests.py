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
    mount = {m["mountPath"] for c in _containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])
             for m in c.get("volumeMounts", [])}
    assert any(argv[2].startswith(m) for m in mount)
