"""Spec validation: every mistake is one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from farm.errors import SpecError
from farm.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict:
    return {
        "name": "t",
        "models": [{"source": "/m"}],
        "methods": [{"method": "gptq"}],
        "calibration": {"source": "/c.txt"},
        "evaluation": {"perplexity": {"source": "/h.txt"}},
    }


def err(data: object) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_quickstart_is_valid() -> None:
    spec = load_spec(ROOT / "jobs" / "quickstart.yaml")
    assert [m.method for m in spec.methods] == ["gptq", "awq", "fp8", "smoothquant"]
    assert Path(spec.models[0].source).is_absolute()  # resolved against the spec's directory


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml") if p.name != "watch.yaml"))
def test_every_shipped_job_is_valid(job: str) -> None:
    spec = load_spec(ROOT / "jobs" / job)
    assert spec.methods and all(not m.uses_validation or spec.validation for m in spec.methods)


def test_defaults_keep_lm_head_embeddings_norms() -> None:
    m = parse_spec(base()).methods[0]
    assert "lm_head" in m.ignore and any("embed_tokens" in i for i in m.ignore) and any("norm" in i for i in m.ignore)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(nmae="x"), "nmae: unknown field"),
        (lambda d: d["methods"][0].update(group_sise=64), "methods.0.gptq.group_sise: unknown field"),
        (lambda d: d["methods"].append({"method": "nf5"}), "'nf5'"),
        (lambda d: d["methods"][0].update(group_size=-1), "methods.0.gptq.group_size"),
        (lambda d: d["calibration"].update(num_samples=0), "calibration.num_samples"),
        (lambda d: d["calibration"].update(num_samples="many"), "calibration.num_samples"),
        (lambda d: d.pop("models"), "models: Field required"),
        (lambda d: d.update(models=[]), "models"),
        (lambda d: d.update(name="../etc"), "name"),
        (lambda d: d["methods"].append({"method": "gptq"}), "duplicate"),
        (lambda d: d["methods"][0].update(scheme="W3A16"), "methods.0.gptq.scheme"),
        (lambda d: d["resources"] if "resources" in d else d.update(resources={"num_gpus": -1}), "resources.num_gpus"),
    ],
)
def test_bad_fields_are_named(mutate, expected: str) -> None:
    data = base()
    mutate(data)
    assert expected in err(data)


def test_unknown_method_lists_available() -> None:
    data = base()
    data["methods"] = [{"method": "nf5"}]
    msg = err(data)
    for name in ("gptq", "awq", "fp8", "smoothquant"):
        assert name in msg


def test_top_level_must_be_mapping() -> None:
    assert "mapping" in err(["a"])


def test_unreadable_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(bad)


def test_invalid_yaml_and_aliases(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(p)
    p.write_text('a: &x ["lol"]\nb: [*x, *x]\n')
    with pytest.raises(SpecError, match="aliases"):
        load_spec(p)


def test_relative_paths_resolve_against_spec_dir(tmp_path: Path) -> None:
    d = base()
    d["models"] = [{"source": "models/m"}]
    d["output"] = {"root": "s3://bucket/prefix"}
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(d))
    spec = load_spec(p)
    assert spec.models[0].source == str(tmp_path / "models" / "m")
    assert spec.output.root == "s3://bucket/prefix"


def test_ranks_need_whole_gpus(fixture_paths: dict, tmp_path) -> None:
    import pytest

    from farm.errors import SpecError
    from farm.spec import parse_spec
    from tests.conftest import tiny_spec

    with pytest.raises(SpecError, match="ranks: 2 ranks need whole GPUs"):
        parse_spec(tiny_spec(fixture_paths, str(tmp_path), resources={"num_gpus": 0.5, "ranks": 2}))
    ok = parse_spec(tiny_spec(fixture_paths, str(tmp_path), resources={"num_gpus": 1, "ranks": 4}))
    assert ok.resources.ranks == 4


def test_the_spec_reference_is_generated_from_the_models() -> None:
    from pathlib import Path

    from farm.spec_reference import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "SPEC.md"
    assert doc.read_text() == render(), "regenerate: python -m farm.spec_reference > docs/SPEC.md"
