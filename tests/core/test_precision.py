"""Mixed precision, the pure part: targets, sizes, ranking and the budget search (no torch)."""

from __future__ import annotations

import re

import pytest

from farm.errors import SpecError
from farm.methods import build_method
from farm.methods.precision import (
    Grid,
    Layer,
    config_groups,
    layer_targets,
    quantized_bytes,
    rank_layers,
    smallest_meeting,
)

LINEARS = ("self_attn.q_proj", "mlp.down_proj")
LAYERS = [Layer(i, LINEARS, 1000) for i in range(4)]
W4, W8 = Grid(4, 64), Grid(8, None)


def test_targets_match_exactly_the_named_linears() -> None:
    (target,) = layer_targets([3, 1], LINEARS)
    rx = re.compile(target.removeprefix("re:"))
    assert rx.match("model.layers.1.mlp.down_proj") and rx.match("model.layers.3.self_attn.q_proj")
    assert not rx.match("model.layers.13.mlp.down_proj") and not rx.match("model.layers.1.mlp.up_proj")
    assert not rx.match("model.layers.1.input_layernorm") and layer_targets([], LINEARS) == []


def test_config_groups_split_layers_between_grids() -> None:
    groups = config_groups(LAYERS, {2}, W4, W8)
    assert groups["low"]["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": 64,
    }
    assert groups["high"]["weights"]["strategy"] == "channel" and groups["high"]["weights"]["num_bits"] == 8
    assert "(0|1|3)" in groups["low"]["targets"][0] and "(2)" in groups["high"]["targets"][0]
    assert set(config_groups(LAYERS, set(), W4, W8)) == {"low"}


def test_sizes_count_bits_and_scales() -> None:
    assert W4.bytes_per_weight() == pytest.approx(0.5 + 2 / 64) and W8.bytes_per_weight() == 1.0
    assert quantized_bytes(LAYERS, set(), W4, W8) == pytest.approx(4000 * (0.5 + 2 / 64))
    assert quantized_bytes(LAYERS, {0, 1}, W4, W8) == pytest.approx(2000 * (0.5 + 2 / 64) + 2000)


def test_ranking_prefers_perplexity_per_byte() -> None:
    layers = [Layer(0, LINEARS, 1000), Layer(1, LINEARS, 4000), Layer(2, LINEARS, 1000)]
    # layer 1 loses the most but costs 4x the bytes to keep high: layer 2 is the better buy
    assert rank_layers({0: 0.1, 1: 1.0, 2: 0.5}, layers, W4, W8) == [2, 1, 0]


def test_search_finds_fewest_upgrades_with_few_probes() -> None:
    deltas = [5.0, 3.0, 1.5, 0.9, 0.7, 0.5, 0.4, 0.3, 0.2]  # delta after k upgrades, monotone
    calls: list[int] = []

    def probe(k: int) -> float:
        calls.append(k)
        return deltas[k]

    s = smallest_meeting(probe, len(deltas) - 1, 1.0)
    assert s.met and s.upgraded == 3 and len(calls) == len(set(calls)) <= 5 and s.probes[3] == 0.9
    assert smallest_meeting(lambda k: 0.1, 8, 1.0).upgraded == 0  # uniform low already within budget
    miss = smallest_meeting(lambda k: 2.0, 8, 1.0)
    assert not miss.met and miss.upgraded == 8 and sorted(miss.probes) == [0, 8]


def test_mixed_config_is_typed_and_single_process(tmp_path) -> None:
    m = build_method({"method": "mixed", "low": {"bits": 4, "group_size": 64}, "budget": 0.5})
    assert m.label() == "mixed-w4g64-w8-d0.5" and m.requires_calibration and not m.distributable
    assert m.group_sizes() == [64]
    assert build_method({"method": "mixed", "budget": 1e9}).label() == "mixed-w4g128-w8-d1e09"
    with pytest.raises(ValueError, match="bits"):
        build_method({"method": "mixed", "low": {"bits": 3}})
    with pytest.raises(TypeError, match="modifiers_for"):
        m.modifiers()
    from farm.plan import ModelInfo, make_plan
    from farm.spec import JobSpec

    spec = JobSpec.model_validate(
        {
            "name": "m",
            "models": [{"source": str(tmp_path), "name": "x"}],
            "methods": [{"method": "mixed"}],
            "calibration": {"source": str(tmp_path / "c.txt")},
            "validation": {"source": str(tmp_path / "v.txt")},
            "evaluation": {"perplexity": {"source": str(tmp_path / "h.txt")}},
            "resources": {"num_gpus": 1, "ranks": 2},
        }
    )
    info = ModelInfo("id", {"hidden_size": 128, "intermediate_size": 256}, 1000)
    with pytest.raises(SpecError, match="ranks must be 1"):
        make_plan(spec, {"x": info}, "sha", "sha", validation_sha="vsha")


def test_guided_search_settles_in_three_probes_when_the_profile_predicts_well() -> None:
    from farm.methods.precision import predicted_upgrades

    profile = {0: 7.0, 1: 1.0, 2: 0.5, 3: 0.5, 4: 0.0}
    order = [0, 1, 2, 3, 4]
    # measured uniform delta 18 = 2x the profile's sum 9: after upgrading layer 0, 2 * 2.0 = 4 > 1; after 0,1: 2
    assert predicted_upgrades(profile, order, 18.0, 1.0) == 3 and predicted_upgrades(profile, order, 0.5, 1.0) == 0
    assert predicted_upgrades({0: -1.0}, [0], 5.0, 1.0) == 0  # no fragility measured: nothing to upgrade
    deltas = [18.0, 4.0, 2.0, 0.9, 0.8, 0.7]
    calls: list[int] = []

    def probe(k: int) -> float:
        calls.append(k)
        return deltas[k]

    s = smallest_meeting(probe, 5, 1.0, guess=lambda d0: predicted_upgrades(profile, order, d0, 1.0))
    assert s.met and s.upgraded == 3 and calls == [0, 3, 2]
    calls.clear()  # a wrong guess still ends at the right answer, by bisection from the bracket it found
    s = smallest_meeting(probe, 5, 1.0, guess=lambda d0: 1)
    assert s.met and s.upgraded == 3 and calls[:3] == [0, 1, 2] and len(calls) <= 5
    s = smallest_meeting(lambda k: 9.0, 5, 1.0, guess=lambda d0: 2)
    assert not s.met and s.upgraded == 5
