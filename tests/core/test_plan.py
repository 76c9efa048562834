"""Planning is pure: stable ids, the right things change them, shapes are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.errors import SpecError
from farm.plan import ModelInfo, make_plan
from farm.spec import parse_spec

SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}


def spec(**over: object):
    data = {
        "name": "t",
        "models": [{"source": "/m", "name": "m"}],
        "methods": [{"method": "gptq", "group_size": 64}, {"method": "fp8"}],
        "calibration": {"source": "/c.txt", "num_samples": 8, "max_seq_length": 64},
        "evaluation": {"perplexity": {"source": "/h.txt"}},
    }
    data.update(over)
    return parse_spec(data)


def plan(s, identity: str = "sha256:a", cal: str = "c1", config: dict | None = None):
    return make_plan(s, {"m": ModelInfo(identity, config or SMOL, 1000)}, cal, "h1")


def test_ids_are_stable_and_distinct() -> None:
    a, b = plan(spec()), plan(spec())
    assert [v.id for v in a.variants] == [v.id for v in b.variants]
    assert len({v.id for v in a.variants}) == 2 and a.job_id == b.job_id


def test_model_identity_changes_every_id() -> None:
    a, b = plan(spec()), plan(spec(), identity="sha256:b")
    assert not {v.id for v in a.variants} & {v.id for v in b.variants}


def test_calibration_changes_only_calibrated_methods() -> None:
    a, b = plan(spec()), plan(spec(), cal="c2")
    assert a.variants[0].id != b.variants[0].id  # gptq
    assert a.variants[1].id == b.variants[1].id  # fp8 is data-free


def test_label_does_not_change_id_but_settings_do() -> None:
    named = spec(methods=[{"method": "gptq", "group_size": 64, "name": "mine"}, {"method": "fp8"}])
    other = spec(methods=[{"method": "gptq", "group_size": 32}, {"method": "fp8"}])
    base = plan(spec()).variants[0].id
    assert plan(named).variants[0].id == base
    assert plan(other).variants[0].id != base


def test_group_size_must_divide_hidden_size() -> None:
    expected = r"methods\.0 .*group_size=128 does not divide .*hidden_size=576.*use group_size 64"
    with pytest.raises(SpecError, match=expected):
        plan(spec(methods=[{"method": "gptq", "group_size": 128}]))


def test_method_calibration_override() -> None:
    s = spec(methods=[{"method": "awq", "group_size": 64, "calibration": {"num_samples": 2}}])
    v = plan(s).variants[0]
    assert v.calibration.num_samples == 2 and v.calibration.max_seq_length == 64


def test_resources_from_spec_or_estimate() -> None:
    v = plan(spec(resources={"num_gpus": 0.25, "num_cpus": 2, "memory_gb": 3})).variants[0]
    assert v.resources.ray_options() == {"num_gpus": 0.25, "num_cpus": 2, "memory": 3 * 2**30}
    assert plan(spec()).variants[0].resources.memory_bytes > 2**30


def test_pool_size_packs_by_cpus_gpus_and_memory() -> None:
    from farm.resources import pool_size

    totals = {"CPU": 16, "GPU": 2, "memory": 64 * 2**30}
    assert pool_size(totals, 1, 0.25, 2**30, 100) == 8  # 4 per GPU x 2 GPUs
    assert pool_size(totals, 1, 1, 2**30, 100) == 2
    assert pool_size(totals, 4, 0, 2**30, 100) == 4  # CPU-bound
    assert pool_size(totals, 1, 0, 32 * 2**30, 100) == 2  # memory-bound
    assert pool_size(totals, 1, 0, 2**30, 3) == 3  # never more workers than tasks
    assert pool_size({"CPU": 1}, 2, 0, 0, 5) == 1  # at least one


def test_unfit_names_the_shortfall() -> None:
    from farm.resources import unfit

    nodes = [{"CPU": 16, "GPU": 2, "memory": 64 * 2**30}, {"CPU": 4, "memory": 8 * 2**30}]
    assert unfit(nodes, 1, 0.25, 2**30) is None
    assert unfit(nodes, 8, 2, 2**30) is None
    assert "largest node has 16 CPU, 2 GPU" in unfit(nodes, 1, 4, 2**30)
    assert unfit(nodes, 32, 0, 0) is not None
    assert unfit([], 1, 0, 0) == "the Ray cluster has no live nodes"


def test_ranks_apply_to_calibrated_methods_and_keep_ids() -> None:
    one = plan(spec(resources={"num_gpus": 1}))
    four = plan(spec(resources={"num_gpus": 1, "ranks": 4}))
    assert [v.id for v in one.variants] == [v.id for v in four.variants]
    assert {v.method.method: v.resources.ranks for v in four.variants} == {"gptq": 4, "fp8": 1}


def test_a_gang_must_fit_one_node() -> None:
    from farm.runtime.cluster import gang_unfit

    nodes = [{"CPU": 8, "GPU": 2, "memory": 64e9}, {"CPU": 16, "GPU": 4, "memory": 64e9}]
    assert gang_unfit(nodes, {"CPU": 2, "GPU": 1, "memory": 8e9}, 4) is None
    assert "largest holds 4" in gang_unfit(nodes, {"CPU": 2, "GPU": 1, "memory": 8e9}, 5)


def test_calibration_matters_only_where_a_method_reads_it() -> None:
    methods = [
        {"method": "int8"},
        {"method": "int8", "activations": "static"},
        {"method": "rtn"},
        {"method": "fp8_static", "kv_cache": True},
        {"method": "kv_fp8"},
    ]
    a, b = plan(spec(methods=methods), cal="c1"), plan(spec(methods=methods), cal="c2")
    same = {va.method.label(): va.id == vb.id for va, vb in zip(a.variants, b.variants, strict=True)}
    assert same == {
        "int8-w8a8-dynamic-rtn": True,
        "int8-w8a8-static-rtn": False,
        "rtn-w8a16": True,
        "fp8-static-kv": False,
        "kv-fp8": False,
    }


def test_every_check_setting_is_part_of_the_base_evaluation_id() -> None:
    base = plan(spec()).base_evals[0].id
    seen = {base}
    for key in ("latency", "memory", "outputs", "safety", "speculative", "tasks", "kv_cache"):
        ev = {"perplexity": {"source": "/h.txt"}, key: {}}
        seen.add(plan(spec(evaluation=ev)).base_evals[0].id)
    assert len(seen) == 8  # each check changes what a finished base/variant evaluation means


def test_a_changed_tokenizer_is_another_model_with_other_variant_ids(
    fixture_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Same weights and config, another tokenizer: `farm plan` gives other ids, so nothing is reused."""
    import shutil

    from farm.cli import main
    from tests.conftest import tiny_spec, write_spec

    copy = tmp_path / "copy"
    shutil.copytree(fixture_paths["tiny-llama"], copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))

    def ids(source: Path) -> set[str]:
        spec = tiny_spec(fixture_paths, str(tmp_path / "out"))
        spec["models"][0]["source"] = str(source)
        assert main(["plan", str(write_spec(tmp_path / "job.yaml", spec))]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        return {r[0] for r in rows if r and len(r[0]) == 16 and all(c in "0123456789abcdef" for c in r[0])}

    original, changed = ids(fixture_paths["tiny-llama"]), ids(copy)
    assert original and changed and not original & changed


def test_a_submitted_job_refuses_locations_inside_rays_job_directory(tmp_path: Path) -> None:
    """`ray job submit -- farm run spec.yaml` runs in Ray's copy of the working_dir, deleted with the job: a
    relative output root or the default sqlite store there is refused in one line; s3, a server URI or an
    absolute path elsewhere is kept; outside a Ray job nothing is refused."""
    from farm.runtime.driver import job_directory_problem

    cwd = tmp_path / "runtime_resources" / "working_dir_files" / "job"
    cwd.mkdir(parents=True)

    def problem(root: str, uri: str | None = None, in_job: bool = True) -> str | None:
        return job_directory_problem(
            spec(output={"root": root}, tracking={"uri": uri} if uri else {}), None, cwd, in_job
        )

    assert "output.root out lies in the Ray job's working directory" in (problem("out") or "")
    assert "default tracking store" in (problem("s3://bucket/farm") or "")
    assert "tracking.uri" in (problem("s3://bucket/farm", "sqlite:///mlflow.db") or "")
    assert problem("s3://bucket/farm", "http://mlflow:5000") is None
    assert problem(str(tmp_path / "shared"), f"sqlite:///{tmp_path / 'shared' / 'm.db'}") is None
    assert problem("out", in_job=False) is None


def test_a_gpu_memory_budget_reaches_the_variant_and_onloads_what_exceeds_it() -> None:
    """`resources.gpu_memory_gb` caps what a variant may use on its GPU: an 8B bf16 checkpoint (16 GB) under a
    6 GB budget is kept on the host and onloaded layer by layer; with the whole card it is loaded whole."""
    from farm.resources import GIB
    from farm.stages.tuning import choose

    (v, _) = plan(spec(resources={"num_gpus": 1, "gpu_memory_gb": 6})).variants
    assert v.resources.gpu_memory_bytes == 6 * GIB
    llama8b = dict(num_samples=128, seq_len=2048, hidden_size=4096, intermediate_size=14336)
    capped = choose("cuda", v.resources.gpu_memory_bytes, weights_bytes=16 * 10**9, **llama8b)
    whole = choose("cuda", 140 * GIB, weights_bytes=16 * 10**9, **llama8b)
    assert capped.load_device == "cpu" and "onloaded layer by layer" in capped.reason
    assert whole.load_device is None
    with pytest.raises(SpecError, match="gpu_memory_gb"):
        spec(resources={"gpu_memory_gb": "6"})
