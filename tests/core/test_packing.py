"""GPU packing by memory (farm/packing.py): shares follow measured or estimated needs, agree with what tuning
then does inside the share, and a variant no share holds is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from farm.methods import build_method
from farm.packing import CONTEXT_BYTES, GRID, Shape, assign, base_share, estimate, measured, pack, peak_key, share
from farm.plan import Calibration, Variant
from farm.resources import GIB, Resources
from farm.spec import ModelSpec
from farm.stages.tuning import choose

CARD = 80 * GIB
SMOL = Shape(int(0.27e9), 576, 1536, 9, 30, 49152)  # SmolLM2-135M, bf16
LLAMA_8B = Shape(int(16.06e9), 4096, 14336, 32, 32, 128256)
LLAMA_70B = Shape(int(141e9), 8192, 28672, 64, 80, 128256)


def variant(
    shape_id: str, method: dict, resources: Resources | None = None, samples: int = 128, seq: int = 2048
) -> Variant:
    return Variant(
        id=f"{shape_id}-{method['method']}",
        model=ModelSpec.model_validate({"source": f"/models/{shape_id}"}),
        model_name=shape_id,
        identity=shape_id,
        method=build_method(method),
        calibration=Calibration("text", "0" * 64, samples, seq, 0),
        resources=resources or Resources(num_gpus=1, num_cpus=2, memory_bytes=0),
        base_eval_id="base",
    )


def tuned(shape: Shape, cap: int):
    return choose(
        "cuda", cap, 128, 2048, shape.hidden_size, shape.intermediate_size, 32, weights_bytes=shape.weights_bytes
    )


def test_small_models_share_a_card() -> None:
    need = estimate(SMOL, CARD, 128, 2048, True, 4.0)
    assert not need.onloads and share(need.bytes, CARD) == 1 / GRID  # sixteen fit one card


def test_a_model_that_fits_stays_resident_and_tuning_agrees() -> None:
    need = estimate(LLAMA_8B, CARD, 128, 2048, True, 4.0)
    got = assign(need, CARD, 1.0)
    assert not isinstance(got, str) and not need.onloads
    assert got.num_gpus < 0.5  # two 8B GPTQ variants run on one 80 GB card
    assert tuned(LLAMA_8B, got.gpu_memory_bytes).load_device is None  # tuning keeps the weights on the GPU


def test_a_model_larger_than_its_share_reserves_its_onloading_working_set() -> None:
    need = estimate(LLAMA_70B, CARD, 128, 2048, True, 4.0)
    got = assign(need, CARD, 1.0)
    assert need.onloads and not isinstance(got, str) and got.num_gpus < 1.0
    assert tuned(LLAMA_70B, got.gpu_memory_bytes).load_device == "cpu"  # and tuning onloads inside the share


def test_a_variant_no_share_holds_is_refused_with_the_shortfall() -> None:
    need = estimate(LLAMA_8B, CARD // 16, 128, 2048, True, 4.0)
    problem = assign(need, CARD, 1 / 16)
    assert isinstance(problem, str) and "GiB of GPU memory" in problem and "1/16" not in problem
    assert "0.0625-GPU share" in problem


def test_measured_peak_replaces_the_estimate_only_where_placed_alike() -> None:
    est = estimate(SMOL, CARD, 128, 2048, True, 4.0)
    assert measured(est, 0.5 * GIB, onloaded=True) == est  # measured onloaded, estimated resident: not comparable
    m = measured(est, 6 * GIB, onloaded=False)
    assert m.bytes == int(6 * GIB * 1.15) + CONTEXT_BYTES and "measured" in m.reason
    assert measured(est, 0.01 * GIB, onloaded=False).bytes == est.bytes  # never below what residency needs


def test_pack_sets_shares_and_caps_and_keeps_a_smaller_cap_from_the_spec() -> None:
    shapes = {"smol": SMOL, "8b": LLAMA_8B}
    capped = Resources(num_gpus=1, num_cpus=2, memory_bytes=0, gpu_memory_bytes=GIB)
    vs = [
        variant("smol", {"method": "gptq"}),
        variant("8b", {"method": "fp8"}),
        variant("smol", {"method": "rtn"}, capped),
    ]
    out, problems = pack(vs, shapes, CARD, {})
    assert not problems
    assert [v.resources.num_gpus for v in out] == [1 / 16, out[1].resources.num_gpus, 1 / 16]
    assert out[1].resources.gpu_memory_bytes == int(out[1].resources.num_gpus * CARD) - CONTEXT_BYTES
    assert out[2].resources.gpu_memory_bytes == GIB


def test_pack_uses_measured_peaks_by_model_method_and_calibration_shape() -> None:
    v = variant("8b", {"method": "gptq"})
    alone, _ = pack([v], {"8b": LLAMA_8B}, CARD, {})
    bigger, _ = pack([v], {"8b": LLAMA_8B}, CARD, {peak_key(v): (40 * GIB, False)})
    other_shape, _ = pack([v], {"8b": LLAMA_8B}, CARD, {(*peak_key(v)[:2], 64, 2048): (40 * GIB, False)})
    assert bigger[0].resources.num_gpus > alone[0].resources.num_gpus == other_shape[0].resources.num_gpus


def test_pack_names_every_variant_that_cannot_fit() -> None:
    small = Resources(num_gpus=1 / 16, num_cpus=2, memory_bytes=0)
    vs = [variant("70b", {"method": "gptq"}, small), variant("smol", {"method": "gptq"}, small)]
    out, problems = pack(vs, {"70b": LLAMA_70B, "smol": SMOL}, CARD, {})
    assert (
        [v.identity for v in out] == ["smol"]
        and len(problems) == 1
        and problems[0].startswith("70b/gptq-w4a16-g128: needs")
    )


def test_moe_shape_counts_every_expert() -> None:
    cfg = {"hidden_size": 2048, "num_experts": 128, "moe_intermediate_size": 768, "num_hidden_layers": 48}
    assert Shape.of(cfg, 60 * 10**9).intermediate_size == 128 * 768
    assert Shape.of({"text_config": {"hidden_size": 64, "intermediate_size": 128}}, 1).intermediate_size == 128


def test_bases_get_what_evaluating_the_largest_takes() -> None:
    assert base_share({"smol": SMOL}, CARD, 1.0) == 1 / 16
    assert 0.2 < base_share({"smol": SMOL, "8b": LLAMA_8B}, CARD, 1.0) < 0.5  # type: ignore[operator]
    problem = base_share({"smol": SMOL, "70b": LLAMA_70B}, CARD, 1.0)
    assert isinstance(problem, str) and problem.startswith("base 70b: its evaluation loads the checkpoint whole")


@pytest.mark.parametrize(
    "resources",
    [{"gpu_packing": "memory"}, {"gpu_packing": "memory", "num_gpus": 2, "ranks": 2}],
)
def test_spec_refuses_packing_without_a_gpu_or_with_ranks(resources: dict) -> None:
    from pydantic import ValidationError

    from farm.spec import ResourceSpec

    with pytest.raises(ValidationError, match="gpu_packing"):
        ResourceSpec.model_validate(resources)
    assert ResourceSpec.model_validate({"gpu_packing": "memory", "num_gpus": 1}).gpu_packing == "memory"


def test_resources_replace_keeps_other_fields() -> None:
    r = Resources(num_gpus=1, num_cpus=2, memory_bytes=3, gptq_inverse="llmcompressor")
    assert replace(r, num_gpus=0.25).gptq_inverse == "llmcompressor"


def test_farm_plan_says_shares_are_set_at_run_time(fixture_paths: dict, tmp_path, capsys) -> None:
    """`farm plan` cannot know a card's memory or the store's measured peaks: it says the gpus column is the most a
    variant may take, and the variant ids are the same as without packing (shares change placement, not output)."""
    from farm.cli import main
    from tests.conftest import tiny_spec, write_spec

    outputs = []
    for resources in ({"num_gpus": 1}, {"num_gpus": 1, "gpu_packing": "memory"}):
        spec = tiny_spec(fixture_paths, str(tmp_path / "out"), resources=resources)
        assert main(["plan", str(write_spec(tmp_path / "job.yaml", spec))]) == 0
        outputs.append(capsys.readouterr().out)
    assert "gpu_packing: memory" in outputs[1] and "gpu_packing" not in outputs[0]
    ids = [
        {line.split()[0] for line in out.splitlines() if line[:16].isalnum() and len(line.split()[0]) == 16}
        for out in outputs
    ]
    assert ids[0] and ids[0] == ids[1]
