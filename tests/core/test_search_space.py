"""The recipe search's space, pure: expansion of candidates x vary, smallest-first order, labels, strict errors,
and what feeds a search variant's id (every candidate's calibration and the validation text)."""

from __future__ import annotations

import pytest

from farm.errors import SpecError
from farm.methods import build_method
from farm.methods.budget import allowed_delta
from farm.plan import ModelInfo, make_plan
from farm.spec import JobSpec


def _search(**kw: object):
    return build_method({"method": "search", "budget": 1.0, **kw})


def test_space_is_crossed_and_ordered_smallest_first() -> None:
    s = _search(
        candidates=[{"method": "fp8"}, {"method": "gptq", "group_size": 64}, {"method": "awq", "group_size": 64}],
        vary={"symmetric": [False, True], "calibration": [{"num_samples": 32}, {"num_samples": 64}]},
    )
    labels = [c.label() for c in s.candidate_methods()]
    assert labels[:4] == [
        "gptq-w4a16-g64.st.cn32",
        "gptq-w4a16-g64.st.cn64",
        "awq-w4a16-g64.st.cn32",
        "awq-w4a16-g64.st.cn64",
    ]
    assert labels[-1] == "fp8-dynamic"  # data-free: one candidate, whatever it would read
    assert len(labels) == 9 and s.requires_calibration and not s.distributable
    assert s.label() == "search-d1" and s.uses_validation
    assert _search(budget=2.5, budget_unit="percent", candidates=[{"method": "fp8"}]).label() == "search-p2.5"


def test_the_search_calibration_is_every_candidates_default() -> None:
    s = _search(
        calibration={"num_samples": 16},
        candidates=[{"method": "gptq"}, {"method": "awq", "calibration": {"num_samples": 8}}],
    )
    samples = {c.method: c.calibration.num_samples for c in s.candidate_methods()}
    assert samples == {"gptq": 16, "awq": 8}


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"candidates": [{"method": "fp8"}], "vary": {"symmetric": [True]}}, "no candidate (fp8) has a field"),
        ({"candidates": [{"method": "gptq"}], "vary": {"method": ["awq"]}}, "declared, not varied"),
        ({"candidates": [{"method": "gptq"}], "vary": {"actorder": []}}, "at least one value"),
        (
            {"candidates": [{"method": "gptq"}], "vary": {"group_size": [0]}},
            "candidate gptq-w4a16-g128.gs0: group_size",
        ),
        ({"candidates": [{"method": "gptq"}, {"method": "gptq"}]}, "candidates repeat"),
        ({"candidates": [{"method": "search", "budget": 1, "candidates": [{"method": "fp8"}]}]}, "method"),
        ({"candidates": []}, "at least 1"),
        (
            {"candidates": [{"method": "gptq"}], "vary": {"dampening_frac": [0.01 * i for i in range(1, 66)]}},
            "limit is 64",
        ),
    ],
)
def test_a_bad_space_is_refused(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        _search(**kw)
    assert needle in str(err.value)


def test_budget_units() -> None:
    assert allowed_delta(1.0, "delta", 41.0) == 1.0
    assert allowed_delta(2.0, "percent", 50.0) == pytest.approx(1.0)


def _spec(tmp_path, methods: list[dict], **extra: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "s",
            "models": [{"source": str(tmp_path), "name": "x"}],
            "methods": methods,
            "calibration": {"source": str(tmp_path / "c.txt")},
            "calibration_sets": {"code": {"source": str(tmp_path / "code.txt")}},
            "evaluation": {"perplexity": {"source": str(tmp_path / "h.txt")}},
            **extra,
        }
    )


def test_what_feeds_a_search_variant_id(tmp_path) -> None:
    info = {"x": ModelInfo("id", {"hidden_size": 128, "intermediate_size": 256}, 1000)}
    search = {
        "method": "search",
        "budget": 1,
        "candidates": [{"method": "gptq"}],
        "vary": {"calibration": [{"set": "code"}, {}]},
    }
    spec = _spec(tmp_path, [search, {"method": "gptq"}], validation={"source": str(tmp_path / "v.txt")})
    shas = {"": "cal", "code": "code"}

    def ids(shas: dict, vsha: str, spec: JobSpec = spec) -> list[str]:
        return [v.id for v in make_plan(spec, info, shas, "held", validation_sha=vsha).variants]

    plan = make_plan(spec, info, shas, "held", validation_sha="val")
    s, g = plan.variants
    assert [c.sha256 for c in s.candidate_calibrations] == ["code", "cal"] and s.validation.sha256 == "val"
    assert g.validation is None and not g.candidate_calibrations
    base = ids(shas, "val")
    assert ids({**shas, "code": "code2"}, "val")[0] != base[0]  # a candidate's set changed: another search
    assert ids(shas, "val2")[0] != base[0] and ids(shas, "val2")[1] == base[1]  # validation feeds only the search
    no_validation = _spec(tmp_path, [{"method": "gptq"}])
    assert ids(shas, None, no_validation)[0] == base[1]  # adding a validation section changes no other id
    with pytest.raises(ValueError, match="unknown set 'nope'"):
        _spec(tmp_path, [{**search, "vary": {"calibration": [{"set": "nope"}]}}], validation={"source": "v"})
    with pytest.raises(ValueError, match="add a `validation:` section"):
        _spec(tmp_path, [search])
    with pytest.raises(SpecError, match="validation text was not hashed"):
        make_plan(spec, info, shas, "held")


def test_new_fields_leave_existing_ids_alone() -> None:
    before = build_method({"method": "gptq", "group_size": 64})
    assert "rotation" not in before.identity()
    assert "rotation" in build_method({"method": "gptq", "group_size": 64, "rotation": "spinquant"}).identity()
    for method in ("gptq", "rtn", "autoround", "mixed"):  # its checkpoints do not reload as built: refused, saying why
        with pytest.raises(ValueError, match="does not apply its online rotations"):
            build_method({"method": method, "rotation": "quip"})
    assert build_method({"method": "rtn"}).identity() == {
        k: v for k, v in build_method({"method": "rtn", "rotation": None}).identity().items()
    }
    with pytest.raises(ValueError, match="use backend llmcompressor"):
        build_method({"method": "gptq", "backend": "gptqmodel", "rotation": "spinquant"})


def test_asymmetric_autoround_is_a_searchable_grid() -> None:
    """Asymmetric AutoRound is a method like asymmetric GPTQ (its zero points are carried into the checkpoint
    by stages/llmc/autoround_zero_points.py), so a search may vary it; it costs a zero point per group."""
    asym = build_method({"method": "autoround", "group_size": 64, "symmetric": False})
    sym = build_method({"method": "autoround", "group_size": 64})
    assert asym.weight_bits() > sym.weight_bits()  # type: ignore[attr-defined]
    # an asymmetric AutoRound variant recorded before its zero points were carried is never reused
    assert asym.identity()["zero_points"] == "tuned" and "zero_points" not in sym.identity()
    s = _search(candidates=[{"method": "autoround", "group_size": 64}], vary={"symmetric": [True, False]})
    assert len(s.candidate_methods()) == 2
