"""A corpus of malformed and hostile job specs: each gets one line naming the problem, exit 2, and nothing is
submitted or written (no output root, no MLflow store, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from farm.cli import main
from tests.conftest import tiny_spec


def _with(base: dict, path: tuple, value: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


_DELETE = object()

# (case id, change to the good spec as (path, value), or raw bytes, expected text in the error line)
CASES: list[tuple[str, object, str]] = [
    ("unknown top-level key", (("nmae",), "x"), "nmae: unknown field"),
    ("unknown method field", (("methods", 0, "group_sise"), 64), "group_sise: unknown field"),
    ("unknown method", (("methods", 0), {"method": "nf5"}), "unknown method 'nf5'"),
    ("method missing", (("methods", 0), {"group_size": 64}), "methods.0.method"),
    ("wrong type samples", (("calibration", "num_samples"), "many"), "calibration.num_samples"),
    ("negative samples", (("calibration", "num_samples"), -5), "calibration.num_samples"),
    ("zero seq len", (("calibration", "max_seq_length"), 0), "calibration.max_seq_length"),
    ("huge samples", (("calibration", "num_samples"), 10**12), "calibration.num_samples"),
    ("huge seq len", (("calibration", "max_seq_length"), 2**40), "calibration.max_seq_length"),
    ("negative group size", (("methods", 0, "group_size"), -64), "group_size"),
    ("impossible group size", (("methods", 0, "group_size"), 96), "group_size=96 does not divide"),
    ("bad scheme", (("methods", 0, "scheme"), "W3A16"), "scheme"),
    ("smoothing out of range", (("methods", 3, "smoothing_strength"), 1.5), "smoothing_strength"),
    ("no models key", (("models",), _DELETE), "models: Field required"),
    ("empty models", (("models",), []), "models"),
    ("models not a list", (("models",), "tiny"), "models"),
    ("missing model dir", (("models", 0, "source"), "/nonexistent/model"), "no such directory"),
    ("empty model source", (("models", 0, "source"), "  "), "models.0.source"),
    ("unsupported scheme", (("models", 0, "source"), "ftp://host/model"), "unsupported scheme"),
    ("path traversal job name", (("name",), "../../etc/passwd"), "name"),
    ("path traversal model name", (("models", 0, "name"), "../escape"), "models.0.name"),
    ("path traversal method label", (("methods", 0, "name"), "../../x"), "methods.0.gptq.name"),
    ("slash in job name", (("name",), "a/b"), "name"),
    ("missing calibration file", (("calibration", "source"), "/nonexistent.txt"), "no such file"),
    ("negative gpus", (("resources",), {"num_gpus": -1}), "resources.num_gpus"),
    ("zero memory", (("resources",), {"memory_gb": 0}), "resources.memory_gb"),
    ("huge gpus", (("resources",), {"num_gpus": 10**6}), "resources.num_gpus"),
    ("empty experiment", (("tracking",), {"experiment": ""}), "tracking.experiment"),
    ("bad registry prefix", (("tracking",), {"registered_model_prefix": "a b"}), "registered_model_prefix"),
    ("duplicate methods", (("methods",), [{"method": "fp8"}, {"method": "fp8"}]), "duplicate"),
    ("eval window zero", (("evaluation", "perplexity", "seq_len"), 0), "evaluation.perplexity.seq_len"),
    ("generation too long", (("evaluation", "generation"), {"max_new_tokens": 10**9}), "max_new_tokens"),
    ("list as number", (("calibration", "seed"), [1, 2]), "calibration.seed"),
    ("yaml alias bomb", b'a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\nd: [*c,*c]\n', "aliases"),
    ("non utf-8", b"name: caf\xe9\n", "not UTF-8"),
    ("invalid yaml", b"name: [unclosed\n", "invalid YAML"),
    ("top-level list", b"- name: x\n", "mapping"),
    ("empty file", b"", "mapping"),
    ("python object tag", b"name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("too large", b"name: x\n" + b"#" * 1_000_001, "limit"),
]


@pytest.mark.parametrize(("case", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_one_line_exit_2_nothing_written(
    case: str, change: object, expected: str, fixture_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    good = tiny_spec(fixture_paths, str(out))
    spec = tmp_path / "job.yaml"
    if isinstance(change, bytes):
        spec.write_bytes(change)
    else:
        path, value = change
        spec.write_text(yaml.safe_dump(_with(good, path, value)))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("farm: error:"), err
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to the spec
    assert not out.exists()


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_empty_calibration_text_fails_in_preflight(
    fixture_paths: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(_with(tiny_spec(fixture_paths, str(tmp_path / "o")), ("calibration", "source"), str(empty)))
    )
    assert main(["run", str(spec)]) == 2
    assert "empty" in capsys.readouterr().err
